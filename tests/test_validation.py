"""validation.py: bits per byte (the tokenizer's byte lengths), the trainer's val_bpb, and eval.py --data_dir."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import process
import validation
from tokenizer import EOS_ID, PAD_ID
from conftest import run_in_process, save_tiny_checkpoint, tiny_pion

TEXTS = ["Hello world", " leading space and  double  spaces\n\nnew lines\t", "naïve café 東京 🙂 — ½",
         "code: def f(x):\n    return x**2"]


def test_token_byte_lengths_add_up_to_the_utf8_length_of_any_text(tokenizer):
    lengths = validation.token_byte_lengths(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text


def test_special_tokens_count_zero_bytes(tokenizer):
    lengths = validation.token_byte_lengths(tokenizer)
    ids = tokenizer.encode("one").ids + [EOS_ID] + tokenizer.encode("two").ids  # a document boundary, by id
    assert int(lengths[ids].sum()) == len("onetwo")
    assert lengths[EOS_ID] == lengths[PAD_ID] == 0


def test_ids_beyond_the_tokenizer_count_zero_bytes_and_the_table_fits_the_model(tokenizer):
    assert validation.token_byte_lengths(tokenizer, 50258)[50000:].eq(0).all()
    assert len(validation.token_byte_lengths(tokenizer, 512)) == 512


def test_val_bpb_is_the_summed_loss_in_bits_over_the_target_bytes(tokenizer):
    pion = tiny_pion()
    rows = [tokenizer.encode(text).ids[:12] for text in TEXTS]
    rows = [row + [PAD_ID] * (12 - len(row)) for row in rows]
    input_ids = torch.tensor(rows)
    labels = input_ids.masked_fill(input_ids == PAD_ID, -100)
    labels[0, 1:4] = -100  # a masked prompt, as in SFT
    lengths = validation.token_byte_lengths(tokenizer, 50258)
    metrics = validation.evaluate(pion, [{"input_ids": input_ids[:2], "labels": labels[:2]},
                                {"input_ids": input_ids[2:], "labels": labels[2:]}], process.Runtime("cpu"), 10, lengths)
    with torch.no_grad():
        logits = pion(input_ids)["logits"][:, :-1]
    targets = labels[:, 1:]
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    n_bytes = int(lengths[targets[targets != -100]].sum())
    assert metrics["val_bpb"] == pytest.approx(float(nats) / math.log(2) / n_bytes, rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(float(nats) / int((targets != -100).sum()), rel=1e-5)


def test_evaluate_reads_its_sums_back_from_the_device_once_not_per_batch(tokenizer, monkeypatch):
    pion = tiny_pion()
    batch = {"input_ids": torch.randint(3, 50000, (2, 12)), "labels": torch.randint(3, 50000, (2, 12))}
    lengths = validation.token_byte_lengths(tokenizer, 50258)
    reads = []
    for name in ("item", "tolist", "__int__", "__float__"):
        read = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, read=read, name=name: reads.append(name) or read(t, *a))

    def reads_over(n_batches):
        reads.clear()
        validation.evaluate(pion, [batch] * n_batches, process.Runtime("cpu"), n_batches, lengths)
        return len(reads)

    assert reads_over(4) == reads_over(1) <= 3


def test_eval_data_dir_reports_val_loss_and_bpb(tmp_path, tokenizer, tokenizer_path):
    import data
    import eval as eval_script
    pion = save_tiny_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(tmp_path / "data" / f"shard_{i:05d}.npy", rng.integers(3, 50000, size=(8, 32)).astype(np.uint16))
    result = run_in_process(eval_script.main, ["--checkpoint", tmp_path / "tiny.pt", "--data_dir", tmp_path / "data",
                                               "--tokenizer", tokenizer_path, "--device", "cpu", "--batch_size", 3,
                                               "--output_path", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    assert "val loss" in result.stdout and "bpb" in result.stdout
    saved = json.load(open(tmp_path / "out" / "results.json"))["validation"]
    batches = data.create_dataloader(str(tmp_path / "data"), "val", 3, 32, 50258)
    expected = validation.evaluate(pion, batches, process.Runtime("cpu"), 100, validation.token_byte_lengths(tokenizer, 50258))
    assert saved["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert saved["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-5)


def test_eval_data_dir_progress_ends_at_its_last_batch(tmp_path, tokenizer_path):
    import eval as eval_script
    save_tiny_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # 4 validation rows a shard: 8, in batches of 3, 3 and 2
        np.save(tmp_path / "data" / f"shard_{i:05d}.npy", rng.integers(3, 50000, size=(200, 32)).astype(np.uint16))
    result = run_in_process(eval_script.main, ["--checkpoint", tmp_path / "tiny.pt", "--data_dir", tmp_path / "data",
                                               "--tokenizer", tokenizer_path, "--device", "cpu", "--batch_size", 3])
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr.replace("\r", "\n").splitlines()[-1]
