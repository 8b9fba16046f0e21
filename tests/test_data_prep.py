import glob
import json
import os
import signal
import subprocess

import numpy as np
import pytest

import data
import data_prep
from tokenizer import EOS_ID, PAD_ID
from cli import PionError
from conftest import assert_one_line_error, run_in_process


def run_data_prep(*args):
    return run_in_process(data_prep.main, args)


def test_prepare_packs_documents_separated_by_eos_into_uint16_shards(tmp_path, tokenizer, tokenizer_path):
    documents = ["The first document.\nIt has two lines.", "Third, from JSON lines.", "And a fourth one.",
                 "Second document, in a subdirectory."]
    (tmp_path / "text" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "a.txt").write_text(documents[0])
    (tmp_path / "text" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[1:3]))
    (tmp_path / "text" / "sub" / "c.txt").write_text(documents[3])
    out = str(tmp_path / "out")
    data_prep.main(["prepare", "--input", str(tmp_path / "text"), "--out", out, "--seq_len", "8", "--shard_rows", "2",
                    "--tokenizer", tokenizer_path])

    shards = [np.load(path) for path in sorted(glob.glob(os.path.join(out, "shard_*.npy")))]
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert len(shards) >= 2 and all(s.dtype == np.uint16 and s.shape[1] == 8 for s in shards)
    tokens = np.concatenate(shards).ravel()
    assert metadata["n_rows"] * 8 == len(tokens) and metadata["seq_len"] == 8
    assert (tokens[metadata["total_tokens"]:] == PAD_ID).all()  # only the last row is padded
    text = tokenizer.decode(tokens[:metadata["total_tokens"]].tolist(), skip_special_tokens=False)
    assert text == "".join(d + "<|endoftext|>" for d in documents)
    assert data.PretrainData(out, 8).n_samples > 0


def test_prepare_refuses_an_out_dir_that_holds_shards(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "shard_00000.npy", np.zeros((2, 4), np.uint16))
    before = (out / "shard_00000.npy").read_bytes()
    with pytest.raises(PionError, match="already exists and is not an empty folder"):
        data_prep.main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(out),
                        "--tokenizer", tokenizer_path])
    assert (tmp_path / "out" / "shard_00000.npy").read_bytes() == before


def test_a_prepare_that_fails_midway_leaves_no_data_set(tmp_path, tokenizer_path):
    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(3000)] + ["{not json"]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    result = run_data_prep("prepare", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out", "--seq_len", 64,
                           "--shard_rows", 16, "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and f"docs.jsonl:{len(lines)} is not valid JSON" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]  # no out folder, no staging folder left behind


class SignalReachedTheTest(Exception):
    pass


def reach_the_test(signum, frame):
    raise SignalReachedTheTest(signum)  # rather than end pytest itself


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_prepare_ends_it_in_one_line_leaving_nothing(tmp_path, tokenizer_path, monkeypatch, stop):
    lines = [json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3000)]
    (tmp_path / "docs.jsonl").write_text("".join(lines))
    take_batch, calls = data_prep.take_batch, []

    def take_batch_then_signal(pieces, max_bytes):  # after the first shards are in the staging folder
        calls.append(len(os.listdir(tmp_path)))
        if len(calls) == 3:
            os.kill(os.getpid(), stop)
        return take_batch(pieces, 4096)
    monkeypatch.setattr(data_prep, "take_batch", take_batch_then_signal)
    previous = signal.signal(stop, reach_the_test)
    try:
        result = run_data_prep("prepare", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out",
                               "--seq_len", 64, "--shard_rows", 4, "--tokenizer", tokenizer_path)
        assert signal.getsignal(stop) is reach_the_test  # prepare gave the process its handler back
    finally:
        signal.signal(stop, previous)
    assert calls[2] == 2  # the staging folder was there
    assert result.returncode == 128 + stop and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"stopped by {stop.name}: nothing was written to {tmp_path / 'out'}"
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def test_prepare_removes_staging_folders_of_killed_prepares_not_those_of_live_ones(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in (gone.pid, os.getppid()):
        (tmp_path / f".out.tmp{pid}").mkdir()
        (tmp_path / f".out.tmp{pid}" / "shard_00000.npy").write_bytes(b"half a shard")
    data_prep.main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--seq_len", "8",
                    "--tokenizer", tokenizer_path])
    assert sorted(os.listdir(tmp_path)) == [f".out.tmp{os.getppid()}", "a.txt", "out"]


@pytest.mark.parametrize("out", ["/proc/pion-data", "a.txt/out"])  # a kernel folder; under a file
def test_prepare_into_an_unwritable_place_is_one_line(tmp_path, tokenizer_path, out):
    (tmp_path / "a.txt").write_text("some text " * 500)
    out = os.path.join(tmp_path, out)
    result = run_data_prep("prepare", "--input", tmp_path / "a.txt", "--out", out, "--seq_len", 16,
                           "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: cannot write {out}")
    assert result.stderr.count("\n") == 1


def test_a_full_disk_while_writing_a_shard_is_one_line_and_leaves_nothing(tmp_path, tokenizer_path, monkeypatch):
    import errno
    (tmp_path / "a.txt").write_text("some text " * 500)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    result = run_data_prep("prepare", "--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--seq_len", 16,
                           "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "No space left on device" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_a_long_document_is_tokenized_in_pieces_that_give_the_whole_texts_ids(tokenizer):
    text = "".join(f"Line {i}:  héllo\twörld 👋🏽 {'x' * (i % 7)}   \n\n  " for i in range(400))
    chunks = [text[i:i + 50] for i in range(0, len(text), 50)]  # as a .txt file is read
    pieces = list(data_prep.document_pieces(chunks, piece_chars=97))
    assert len(pieces) > 50 and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(piece for piece, _ in pieces) == text
    ids = [i for piece, _ in pieces for i in tokenizer.encode(piece, add_special_tokens=False).ids]
    assert ids == tokenizer.encode(text, add_special_tokens=False).ids


# Chinese and Japanese as they are written: no spaces, a mark at the end of each clause.
CJK_TEXT = "".join(f"我们今天学习第{i}课的中文语法和词汇{'。' if i % 3 else '，'}日本語の文章は空白なしで書かれます{i % 10}！"
                   for i in range(300))


def test_text_without_spaces_is_cut_into_small_pieces_that_give_the_whole_texts_ids(tokenizer):
    chunks = [CJK_TEXT[i:i + 50] for i in range(0, len(CJK_TEXT), 50)]
    pieces = list(data_prep.document_pieces(chunks, piece_chars=97))
    assert "".join(piece for piece, _ in pieces) == CJK_TEXT
    assert len(pieces) > 50 and max(len(piece) for piece, _ in pieces) < 2 * 97
    ids = [i for piece, _ in pieces for i in tokenizer.encode(piece, add_special_tokens=False).ids]
    assert ids == tokenizer.encode(CJK_TEXT, add_special_tokens=False).ids


def test_a_run_without_any_safe_cut_is_cut_at_max_piece_chars(tokenizer):
    text = "字" * 10_000  # one pre-token: no space, no punctuation
    pieces = list(data_prep.document_pieces([text[i:i + 300] for i in range(0, len(text), 300)], piece_chars=97,
                                            max_piece_chars=1000))
    assert [len(piece) for piece, _ in pieces] == [1000] * 10
    assert [last for _, last in pieces] == [False] * 9 + [True]


def test_prepare_refuses_text_too_short_for_two_rows(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("Too short.")
    out = tmp_path / "out"
    with pytest.raises(PionError, match="not enough text for two rows of 64 tokens"):
        data_prep.main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(out), "--seq_len", "64",
                        "--tokenizer", tokenizer_path])
    assert not out.exists()


def test_prepare_names_a_jsonl_line_without_text(tmp_path, tokenizer_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(PionError, match=r"a.jsonl:2 has no text field 'text'"):
        data_prep.main(["prepare", "--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"),
                        "--tokenizer", tokenizer_path])


def test_prepare_reads_a_hugging_face_dataset(tmp_path, tokenizer_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train.jsonl").write_text('{"text": "one document"}\n{"text": "and another"}\n')
    result = run_data_prep("prepare", "--hf_dataset", str(tmp_path / "dataset"), "--out", str(tmp_path / "out"),
                           "--seq_len", "2", "--tokenizer", tokenizer_path)
    assert result.returncode == 0, result.stderr
    assert json.load(open(tmp_path / "out" / "metadata.json"))["n_documents"] == 2


def test_download_offline_exits_2_with_one_line(tmp_path):
    result = run_data_prep("download", "--num_shards", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot download") and result.stderr.count("\n") == 1


def fake_snapshot_download(repo_id, repo_type, allow_patterns, local_dir):
    """huggingface_hub's download, offline: every shard asked for, 8 rows of 4 tokens."""
    os.makedirs(os.path.join(local_dir, ".cache", "huggingface"), exist_ok=True)
    for name in allow_patterns:
        if name.startswith("shard_"):
            np.save(os.path.join(local_dir, name), np.full((8, 4), 5, dtype=np.uint16))


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub, offline: every repo exists and snapshot_download is fake_snapshot_download."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, repo_type: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return huggingface_hub


def test_download_refuses_a_folder_of_prepared_shards_and_leaves_it_as_it_was(tmp_path, fake_hub):
    (tmp_path / "mine").mkdir()
    np.save(tmp_path / "mine" / "shard_00000.npy", np.arange(16, dtype=np.uint16).reshape(4, 4))
    with pytest.raises(PionError, match=r"--out .*mine already exists and is not an empty folder"):
        data_prep.main(["download", "--num_shards", "1", "--out", str(tmp_path / "mine")])
    assert np.load(tmp_path / "mine" / "shard_00000.npy").ravel().tolist() == list(range(16))
    assert sorted(os.listdir(tmp_path / "mine")) == ["shard_00000.npy"]


def test_download_can_be_rerun_to_add_shards_of_the_same_repo(tmp_path, fake_hub):
    data_prep.main(["download", "--num_shards", "1", "--out", str(tmp_path / "mixed")])
    data_prep.main(["download", "--num_shards", "2", "--out", str(tmp_path / "mixed")])
    assert sorted(glob.glob(str(tmp_path / "mixed" / "shard_*.npy"))) == \
        [str(tmp_path / "mixed" / f"shard_0000{i}.npy") for i in range(2)]


def test_download_refuses_a_download_of_another_repo(tmp_path, fake_hub):
    data_prep.main(["download", "--num_shards", "1", "--out", str(tmp_path / "data"), "--repo", "someone/other"])
    with pytest.raises(PionError, match=r"holds a download of someone/other, not SuperGoatScriptGuy/PreprocessedMIXED"):
        data_prep.main(["download", "--num_shards", "2", "--out", str(tmp_path / "data")])
    assert not (tmp_path / "data" / "shard_00001.npy").exists()


def test_an_interrupted_download_cannot_be_continued_under_another_repo(tmp_path, fake_hub, monkeypatch):
    def first_shard_then_interrupted(repo_id, repo_type, allow_patterns, local_dir):
        fake_snapshot_download(repo_id, repo_type, allow_patterns[:1], local_dir)
        raise KeyboardInterrupt
    monkeypatch.setattr(fake_hub, "snapshot_download", first_shard_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_prep.main(["download", "--num_shards", "2", "--out", str(tmp_path / "data"), "--repo", "someone/other"])
    monkeypatch.setattr(fake_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(PionError, match=r"holds a download of someone/other, not SuperGoatScriptGuy/PreprocessedMIXED"):
        data_prep.main(["download", "--num_shards", "2", "--out", str(tmp_path / "data")])
    assert not (tmp_path / "data" / "shard_00001.npy").exists()


def test_a_download_that_gets_nothing_leaves_no_folder(tmp_path):
    result = run_data_prep("download", "--num_shards", "1", "--out", tmp_path / "out", "--repo", "not a repo name")
    assert_one_line_error(result, "cannot download not a repo name")
    assert os.listdir(tmp_path) == []


def test_special_token_text_in_a_document_is_prepared_as_plain_text(tmp_path, tokenizer, tokenizer_path):
    documents = ["A quickstart corpus can quote <|endoftext|> and <|pad|> as text.", "A second document."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    data_prep.main(["prepare", "--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--seq_len", "8",
                    "--tokenizer", tokenizer_path])
    tokens = np.concatenate([np.load(p) for p in sorted(glob.glob(str(tmp_path / "out" / "shard_*.npy")))]).ravel()
    n_tokens = json.load(open(tmp_path / "out" / "metadata.json"))["total_tokens"]
    real = tokens[:n_tokens].tolist()
    assert PAD_ID not in real and real.count(EOS_ID) == 2  # only the separators after each document
    assert tokenizer.decode(real, skip_special_tokens=False) == "".join(d + "<|endoftext|>" for d in documents)


def test_prepare_names_a_jsonl_line_whose_text_holds_a_lone_surrogate(tmp_path, tokenizer_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken \\ud800 text"}\n')
    result = run_data_prep("prepare", "--input", tmp_path / "a.jsonl", "--out", tmp_path / "out",
                           "--tokenizer", tokenizer_path)
    assert_one_line_error(result, f"{tmp_path / 'a.jsonl'}:2 holds a lone surrogate", after_progress=True)


def test_prepare_names_a_jsonl_line_that_is_not_utf8(tmp_path, tokenizer_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "broken \xff\xfe text"}\n')
    result = run_data_prep("prepare", "--input", tmp_path / "a.jsonl", "--out", tmp_path / "out",
                           "--tokenizer", tokenizer_path)
    assert_one_line_error(result, f"{tmp_path / 'a.jsonl'}:2 is not UTF-8 text", after_progress=True)


@pytest.mark.parametrize("name, text", [("a.jsonl", '{"text": "a first document"}\n'), ("a.txt", "a first document")])
def test_prepare_reads_a_file_that_starts_with_a_byte_order_mark_as_its_text_alone(tmp_path, tokenizer,
                                                                                   tokenizer_path, name, text):
    (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
    data_prep.main(["prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "out"), "--seq_len", "2",
                    "--tokenizer", tokenizer_path])
    tokens = np.load(tmp_path / "out" / "shard_00000.npy").ravel().tolist()
    assert tokens[:tokens.index(EOS_ID)] == tokenizer.encode("a first document").ids
