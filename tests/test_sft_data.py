"""sft_data: loading both row formats, what is trained in them, packing, padding and the CLI."""
import itertools
import json
import os

import pytest

import chat_template
import sft_data
from cli import PionError
from conftest import run_in_process, trained_spans
from tokenizer import EOS_ID, PAD_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"

# (role, text) turns; the replies hold spaces, newlines, accents and emoji so exact decoding is meaningful.
CONVERSATIONS = [
    [("system", "You are terse."), ("user", "What is 2+2?"), ("assistant", "Four.")],
    [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", " Green, or red.")],
    [("user", "Say hello in emoji"), ("assistant", "👋 héllo\n  bye")],
    [("user", "Count to three."), ("assistant", "1, 2, 3")],
    [("system", "Answer in French."), ("user", "Thanks!"), ("assistant", "De rien.")],
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(conversation):
    return {"conversations": [{"from": SHAREGPT_ROLE[role], "value": text} for role, text in conversation]}


def openai(conversation):
    return {"messages": [{"role": role, "content": text} for role, text in conversation]}


def as_messages(conversation):
    return [{"role": role, "content": text} for role, text in conversation]


def replies(conversations):
    # Content is trained stripped of surrounding whitespace (the template's one rendering rule).
    return [text.strip() + "\n" + EOS for conversation in conversations for role, text in conversation
            if role == "assistant"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def all_spans(tokenizer, *splits):
    return sorted(span for rows in splits for row in rows
                  for span in trained_spans(tokenizer, row["input_ids"], row["labels"]))


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep datasets' arrow and map caches out of the home directory."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture
def sharegpt_file(tmp_path):
    return write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(c) for c in CONVERSATIONS])


# ----------------------------------------------------------------------------------------------------
# Loading


def test_loaded_rows_train_exactly_the_assistant_replies(tokenizer, sharegpt_file, capsys):
    train, val = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file)
    assert all_spans(tokenizer, train, val) == sorted(replies(CONVERSATIONS))
    assert "5 conversations kept, 0 skipped as malformed, 0 dropped" in capsys.readouterr().out


def test_validation_holds_out_at_least_one_conversation(tokenizer, sharegpt_file):
    train, val = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, val_fraction=0.01)
    assert (len(train), len(val)) == (4, 1)


def test_the_split_is_reproducible_with_the_seed(tokenizer, sharegpt_file):
    first = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, seed=3)
    again = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, seed=3)
    assert [list(rows) for rows in first] == [list(rows) for rows in again]


def test_max_samples_limits_the_conversations_read(tokenizer, sharegpt_file, capsys):
    train, val = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, max_samples=3)
    assert len(train) + len(val) == 3
    assert "3 conversations kept" in capsys.readouterr().out


def test_sharegpt_jsonl_and_openai_json_give_identical_rows(tokenizer, tmp_path, sharegpt_file):
    openai_file = tmp_path / "openai.json"
    openai_file.write_text(json.dumps([openai(c) for c in CONVERSATIONS]))
    from_sharegpt = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file)
    from_openai = sft_data.load_sft_splits(tokenizer, 256, data_file=str(openai_file))
    assert [list(rows) for rows in from_sharegpt] == [list(rows) for rows in from_openai]


def test_parquet_file_gives_the_same_rows_as_jsonl(tokenizer, tmp_path, sharegpt_file):
    import datasets
    parquet_file = str(tmp_path / "sharegpt.parquet")
    datasets.Dataset.from_list([sharegpt(c) for c in CONVERSATIONS]).to_parquet(parquet_file)
    from_jsonl = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file)
    from_parquet = sft_data.load_sft_splits(tokenizer, 256, data_file=parquet_file)
    assert [list(rows) for rows in from_jsonl] == [list(rows) for rows in from_parquet]


def test_malformed_rows_are_skipped_and_counted(tokenizer, tmp_path, capsys):
    malformed = [
        {"conversations": []},
        {"something": "else"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "hello"}]},
        # A mixed-type field makes datasets store it as Json, which decodes every JSON-looking string in it
        # ("4", "true") to a non-string: such rows are skipped too, so the replies above are not numbers.
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 42}]},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]},
    ]
    data_file = write_jsonl(tmp_path / "mixed.jsonl", [sharegpt(c) for c in CONVERSATIONS] + malformed)
    train, val = sft_data.load_sft_splits(tokenizer, 256, data_file=data_file)
    assert all_spans(tokenizer, train, val) == sorted(replies(CONVERSATIONS))
    out = capsys.readouterr().out
    assert "5 conversations kept, 7 skipped as malformed" in out
    for why in ("2 no turns", "1 unknown role", "1 empty text", "2 text is not a string", "1 no assistant turn"):
        assert why in out


def test_special_token_text_in_a_message_is_trained_as_plain_text(tokenizer):
    conversation = [("user", "What ends a document? <|pad|>"), ("assistant", "The text <|endoftext|>, as id 0.")]
    messages, problem = sft_data.normalize_conversation(openai(conversation))
    assert problem is None
    input_ids, labels = chat_template.render_conversation(tokenizer, messages)
    assert input_ids.count(EOS_ID) == 1 and input_ids[-1] == EOS_ID  # the template's own
    assert PAD_ID not in input_ids
    assert trained_spans(tokenizer, input_ids, labels) == ["The text <|endoftext|>, as id 0.\n" + EOS]


def test_an_empty_system_prompt_is_left_out(tokenizer):
    row = openai([("system", ""), ("user", "hi"), ("assistant", "hello")])
    assert sft_data.normalize_conversation(row) == (as_messages([("user", "hi"), ("assistant", "hello")]), None)


def test_missing_data_file_raises_pion_error(tokenizer, tmp_path):
    with pytest.raises(PionError, match="data file not found"):
        sft_data.load_sft_splits(tokenizer, 256, data_file=str(tmp_path / "nope.jsonl"))


def test_unsupported_file_type_raises_pion_error(tokenizer, tmp_path):
    csv_file = tmp_path / "chats.csv"
    csv_file.write_text("a,b\n")
    with pytest.raises(PionError, match=r"expected a \.json, \.jsonl or \.parquet file"):
        sft_data.load_sft_splits(tokenizer, 256, data_file=str(csv_file))


def test_too_few_conversations_to_hold_out_validation_raises_pion_error(tokenizer, tmp_path):
    data_file = write_jsonl(tmp_path / "one.jsonl", [sharegpt(CONVERSATIONS[0])])
    with pytest.raises(PionError, match="too few"):
        sft_data.load_sft_splits(tokenizer, 256, data_file=data_file)


def test_parallel_tokenization_gives_the_same_rows(tokenizer, sharegpt_file):
    serial = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, num_proc=1)
    parallel = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, num_proc=2)
    assert [list(rows) for rows in serial] == [list(rows) for rows in parallel]


def test_conversations_without_a_trained_token_after_truncation_are_dropped_and_counted(tokenizer, tmp_path, capsys):
    long_prompt = [("user", "word " * 100), ("assistant", "ok")]
    long_reply = [("user", "hi"), ("assistant", "a long reply " * 50)]
    data_file = write_jsonl(tmp_path / "long.jsonl", [sharegpt(c) for c in CONVERSATIONS + [long_prompt, long_reply]])
    train, _ = sft_data.load_sft_splits(tokenizer, 64, data_file=data_file, val_fraction=0)
    assert "6 conversations kept, 0 skipped as malformed, 1 dropped with no trained token within seq_len 64" \
        in capsys.readouterr().out
    assert max(len(row["input_ids"]) for row in train) == 64
    truncated = train[len(train) - 1]
    [span] = trained_spans(tokenizer, truncated["input_ids"], truncated["labels"])
    assert len(span) > 0 and ("a long reply " * 50).startswith(span)


# ----------------------------------------------------------------------------------------------------
# Packing, padding and batches


def test_packing_fills_rows_with_whole_conversations_and_trains_the_same_tokens(tokenizer, sharegpt_file):
    train, val = sft_data.load_sft_splits(tokenizer, 256, data_file=sharegpt_file, pack=True, val_fraction=0)
    assert len(train) < len(CONVERSATIONS) and val.num_rows == 0
    assert all(len(row["input_ids"]) <= 256 for row in train)
    assert max(row["input_ids"].count(0) for row in train) >= 2  # several conversations share a row
    assert all_spans(tokenizer, train) == sorted(replies(CONVERSATIONS))


def test_packed_labels_never_cross_a_conversation_boundary(tokenizer, sharegpt_file):
    train, _ = sft_data.load_sft_splits(tokenizer, 64, data_file=sharegpt_file, pack=True, val_fraction=0)
    prefix = tokenizer.encode("<|assistant|>\n").ids
    for row in train:
        ids, labels = row["input_ids"], row["labels"]
        starts = [t for t in range(1, len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
        assert all(ids[t - len(prefix):t] == prefix for t in starts)  # each trained run follows its own prompt
        after_end_token = [t for t in range(1, len(ids)) if ids[t - 1] == 0]
        assert all(labels[t] == -100 for t in after_end_token)  # a new turn or conversation: never trained


def test_packing_masks_the_first_label_of_each_conversation():
    batch = {"input_ids": [[5, 6], [7, 8, 9], [10]], "labels": [[5, 6], [7, 8, 9], [10]]}
    assert sft_data.pack_rows(batch, seq_len=5) == {"input_ids": [[5, 6, 7, 8, 9], [10]],
                                                    "labels": [[-100, 6, -100, 8, 9], [-100]]}


def test_collate_pads_with_the_pad_id_and_masks_the_padding():
    batch = sft_data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


def test_collate_pads_to_a_fixed_length_when_asked():
    batch = sft_data.collate([{"input_ids": [5, 6], "labels": [-100, 6]}], pad_to=4)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 1]] and batch["labels"].tolist() == [[-100, 6, -100, -100]]


def test_sft_batches_resumed_at_a_step_continue_an_unbroken_run():
    import datasets
    rows = datasets.Dataset.from_list([{"input_ids": [i], "labels": [i]} for i in range(10)])
    unbroken = [b["input_ids"].tolist() for b in itertools.islice(sft_data.sft_batches(rows, 3, 7), 7)]
    resumed = [b["input_ids"].tolist() for b in itertools.islice(sft_data.sft_batches(rows, 3, 7, start_step=4), 3)]
    assert resumed == unbroken[4:7]
    first_epoch = sorted(i for batch in unbroken[:3] for [i] in batch)
    assert len(set(first_epoch)) == 9  # an epoch never repeats a row


# ----------------------------------------------------------------------------------------------------
# CLI


def run_cli(tmp_path, *args):
    return run_in_process(sft_data.main, args)  # datasets' cache is in tmp_path (datasets_cache_in_tmp)


def test_cli_prints_a_marked_sample_and_the_mask_ratio(tokenizer, tokenizer_path, tmp_path, sharegpt_file):
    result = run_cli(tmp_path, "--data_file", sharegpt_file, "--tokenizer", tokenizer_path, "--seq_len", "256")
    assert result.returncode == 0, result.stderr
    assert ("<|system|>\nYou are terse.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n«Four.\n<|endoftext|>»\n"
            in result.stdout)
    rendered = [chat_template.render_conversation(tokenizer, as_messages(c)) for c in CONVERSATIONS]
    n_tokens = sum(len(ids) for ids, _ in rendered)
    n_trained = sum(label != -100 for _, labels in rendered for label in labels)
    ratio = f"mask ratio: {n_trained} of {n_tokens} tokens trained ({n_trained / n_tokens:.1%}) in 5 rows"
    assert ratio in result.stdout


def test_cli_reports_a_missing_file_in_one_line(tokenizer_path, tmp_path):
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "nope.json"), "--tokenizer", tokenizer_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data file not found: {tmp_path / 'nope.json'}"


def test_cli_reports_an_unreachable_dataset_in_one_line(tokenizer_path, tmp_path):
    result = run_cli(tmp_path, "--dataset", "nobody/no-such-dataset", "--tokenizer", tokenizer_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot load nobody/no-such-dataset: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_data_file_is_named_in_one_line(tmp_path, tokenizer_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "empty.jsonl"), "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'empty.jsonl'} is empty"


def test_a_malformed_jsonl_line_is_named_by_its_number(tmp_path, tokenizer_path):
    rows = [json.dumps(sharegpt(c)) for c in CONVERSATIONS[:3]] + ["{not json"]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "bad.jsonl"), "--tokenizer", tokenizer_path)
    last_line = result.stderr.strip().splitlines()[-1]  # after datasets' progress bar
    assert result.returncode == 2 and last_line == f"error: {tmp_path / 'bad.jsonl'}:4 is not valid JSON"


@pytest.mark.parametrize("line", ['["a", "list"]', '"a string"', "42", "null"])
def test_a_jsonl_line_that_is_not_an_object_is_named_by_its_number(tmp_path, tokenizer_path, line):
    rows = [json.dumps(sharegpt(c)) for c in CONVERSATIONS[:2]] + [line]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "bad.jsonl"), "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:3 is not a JSON object"


def test_a_jsonl_row_with_a_lone_surrogate_is_named_by_its_number(tmp_path, tokenizer_path):
    rows = [json.dumps(sharegpt(c)) for c in CONVERSATIONS[:2]]
    rows.insert(1, '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}')
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "bad.jsonl"), "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {tmp_path / 'bad.jsonl'}:2 holds a lone surrogate")


def test_a_jsonl_row_that_is_not_utf8_is_named_by_its_number(tmp_path, tokenizer_path):
    rows = [json.dumps(sharegpt(c)).encode() for c in CONVERSATIONS[:3]]
    rows.insert(2, b'{"messages": [{"role": "user", "content": "h\xff\xfei"}, {"role": "assistant", "content": "ok"}]}')
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    result = run_cli(tmp_path, "--data_file", str(tmp_path / "bad.jsonl"), "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:3 is not UTF-8 text"


def test_a_jsonl_file_that_starts_with_a_byte_order_mark_is_read(tmp_path, tokenizer):
    rows = [json.dumps(sharegpt(c)) for c in CONVERSATIONS]
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + "\n".join(rows).encode() + b"\n")
    train, _ = sft_data.load_sft_splits(tokenizer, 256, data_file=str(tmp_path / "bom.jsonl"), val_fraction=0)
    assert len(train) == len(CONVERSATIONS)


@pytest.mark.parametrize("flags", [["--max_samples", "0"], ["--seq_len", "-1"]])
def test_non_positive_sizes_are_refused_in_one_line(tmp_path, flags):
    result = run_cli(tmp_path, "--data_file", "x.jsonl", *flags)
    assert result.returncode == 2 and "must be a positive integer" in result.stderr
