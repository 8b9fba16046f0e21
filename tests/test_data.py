import os
import pickle

import numpy as np
import pytest
import torch

import data
from tokenizer import PAD_ID
from cli import PionError

VOCAB_SIZE = 10_000


def write_shards(data_dir, *shards):
    os.makedirs(data_dir, exist_ok=True)
    for i, shard in enumerate(shards):
        np.save(os.path.join(data_dir, f"shard_{i:05d}.npy"), shard)
    return str(data_dir)


def numbered_shards(data_dir, n_shards, rows, width, dtype=np.int32):
    """Shards whose tokens count up from 2 (past EOS and PAD), so a sample is known by its first token."""
    tokens = np.arange(2, 2 + n_shards * rows * width).reshape(n_shards, rows, width)
    return write_shards(data_dir, *tokens.astype(dtype))


def write_text_shard(data_dir):
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "shard_00000.npy"), "w") as f:
        f.write("not an array")


def loader(data_dir, split="train", batch_size=5, seq_len=4, **kwargs):
    return data.create_dataloader(data_dir, split, batch_size, seq_len, VOCAB_SIZE, **kwargs)


def first_tokens(batches, n):
    """The samples (by first token) of the next n batches, one list per batch."""
    return [next(batches)["input_ids"][:, 0].tolist() for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Opening a data dir

BAD_DATA_DIRS = {
    "missing dir": (lambda d: None, 4, "data dir not found"),
    "no shards": (lambda d: os.makedirs(d), 4, "no shard_*.npy files"),
    "not npy": (lambda d: write_text_shard(d), 4, "not a readable .npy file"),
    "not 2-D": (lambda d: write_shards(d, np.zeros(8, np.int32)), 4, "must be 2-D"),
    "not integer": (lambda d: write_shards(d, np.zeros((4, 4), np.float32)), 4, "must hold integer token ids"),
    "widths differ": (lambda d: write_shards(d, np.zeros((4, 4), np.int32), np.zeros((4, 8), np.int32)), 4,
                      "different widths [4, 8]"),
    "seq_len too long": (lambda d: write_shards(d, np.zeros((4, 4), np.int32)), 8, "seq_len 8 does not fit"),
    "empty split": (lambda d: write_shards(d, np.zeros((1, 4), np.int32)), 4, "train split of"),
}


@pytest.mark.parametrize("case", BAD_DATA_DIRS)
def test_bad_data_dir_raises_one_line_naming_the_problem(tmp_path, case):
    make, seq_len, problem = BAD_DATA_DIRS[case]
    data_dir = str(tmp_path / "data")
    make(data_dir)
    with pytest.raises(PionError) as error:
        data.PretrainData(data_dir, seq_len)
    assert problem in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("rows, n_val", [(2, 1), (10, 1), (100, 2), (1000, 20)])
def test_val_split_is_the_last_two_percent_of_the_rows_of_every_shard(tmp_path, rows, n_val):
    data_dir = numbered_shards(tmp_path, 3, rows=rows, width=4)
    train, val = data.PretrainData(data_dir, 4, "train"), data.PretrainData(data_dir, 4, "val")
    assert val.n_samples == 3 * n_val
    assert train.n_samples == 3 * (rows - n_val)


def test_adding_a_shard_moves_no_sample_between_the_splits(tmp_path):
    shards = np.arange(2, 2 + 3 * 100 * 4).reshape(3, 100, 4)
    first_two = data.PretrainData(write_shards(tmp_path / "a", *shards[:2]), 4, "val")
    all_three = data.PretrainData(write_shards(tmp_path / "b", *shards), 4, "val")
    assert torch.equal(all_three.batch(np.arange(first_two.n_samples))["input_ids"],
                       first_two.batch(np.arange(first_two.n_samples))["input_ids"])


def test_single_shard_splits_its_rows(tmp_path):
    shard = np.arange(2, 402).reshape(100, 4)
    data_dir = write_shards(tmp_path, shard)
    train, val = data.PretrainData(data_dir, 4, "train"), data.PretrainData(data_dir, 4, "val")
    assert (train.n_samples, val.n_samples) == (98, 2)
    assert torch.equal(val.batch(np.arange(2))["input_ids"], torch.from_numpy(shard[98:]))


def test_short_seq_len_cuts_each_row_into_windows(tmp_path):
    shard = np.arange(2, 32).reshape(3, 10)
    data_dir = write_shards(tmp_path, shard)  # rows 0 and 1 are train, row 2 val
    train = data.PretrainData(data_dir, 4)
    windows = [shard[0, 0:4], shard[0, 4:8], shard[1, 0:4], shard[1, 4:8]]  # the last 2 of a row don't fit
    assert train.n_samples == 4
    assert torch.equal(train.batch(np.arange(4))["input_ids"], torch.from_numpy(np.stack(windows)))


def test_padding_is_masked_in_labels_not_in_inputs(tmp_path):
    shard = np.array([[5, 6, 0, 7, PAD_ID, PAD_ID]] * 2, dtype=np.uint16)
    batch = data.PretrainData(write_shards(tmp_path, shard), 6).batch(np.array([0]))
    assert batch["input_ids"].tolist() == [[5, 6, 0, 7, PAD_ID, PAD_ID]]
    assert batch["labels"].tolist() == [[5, 6, 0, 7, -100, -100]]  # not shifted: the model shifts


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_shards_of_any_integer_dtype_give_int64_batches(tmp_path, dtype):
    data_dir = numbered_shards(tmp_path, 2, rows=4, width=4, dtype=dtype)  # 3 train rows per shard
    batch = data.PretrainData(data_dir, 4).batch(np.arange(3))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].tolist() == np.arange(2, 14).reshape(3, 4).tolist()


def test_shards_are_memory_mapped_not_loaded(tmp_path):
    train = data.PretrainData(numbered_shards(tmp_path, 3, rows=8, width=4), 4)
    assert train.shards and all(isinstance(shard, np.memmap) for shard in train.shards)


def test_pickled_data_reopens_the_shards_instead_of_copying_them(tmp_path):
    train = data.PretrainData(numbered_shards(tmp_path, 2, rows=2000, width=64, dtype=np.int64), 64)
    pickled = pickle.dumps(train)  # what a spawn/forkserver DataLoader worker receives
    assert len(pickled) < 10_000
    copy = pickle.loads(pickled)
    assert isinstance(copy.shards[0], np.memmap)
    assert torch.equal(copy.batch(np.arange(5))["input_ids"], train.batch(np.arange(5))["input_ids"])


# ----------------------------------------------------------------------------------------------------
# Sample order, resume, workers and ranks (train: 23 samples of 4 tokens, batches of 5 -> 4 per epoch)


@pytest.fixture
def data_dir(tmp_path):
    return numbered_shards(tmp_path, 1, rows=24, width=4)  # the last row is validation


def test_order_is_fixed_by_seed_and_epoch_not_global_rng(data_dir):
    torch.manual_seed(0), np.random.seed(0)
    first = first_tokens(loader(data_dir, seed=1), 8)
    torch.manual_seed(1), np.random.seed(1)
    assert first_tokens(loader(data_dir, seed=1), 8) == first
    assert first_tokens(loader(data_dir, seed=2), 8) != first
    epoch0, epoch1 = first[:4], first[4:]
    assert epoch0 != epoch1


def test_each_epoch_sees_every_sample_once_dropping_the_incomplete_batch(data_dir):
    batches = first_tokens(loader(data_dir), 8)
    for epoch in (batches[:4], batches[4:]):
        samples = [s for batch in epoch for s in batch]
        assert len(set(samples)) == 20 and set(samples) <= set(range(2, 2 + 23 * 4, 4))


@pytest.mark.parametrize("start_sample", [10, 25, 7])  # a later batch, the next epoch, inside a batch
def test_resume_at_a_sample_index_continues_the_uninterrupted_stream(data_dir, start_sample):
    stream = [s for batch in first_tokens(loader(data_dir), 12) for s in batch]
    resumed = [s for batch in first_tokens(loader(data_dir, start_sample=start_sample), 6) for s in batch]
    assert resumed == stream[start_sample:start_sample + 30]


def test_worker_count_does_not_change_the_batches_even_with_fewer_shards_than_workers(tmp_path):
    data_dir = numbered_shards(tmp_path, 1, rows=200, width=4)  # one shard for two workers
    train = [loader(data_dir, batch_size=4, num_workers=n) for n in (0, 2)]
    assert first_tokens(train[0], 60) == first_tokens(train[1], 60)  # 49 batches an epoch: into epoch 1
    val = [[b["input_ids"].tolist() for b in loader(data_dir, "val", batch_size=1, num_workers=n)] for n in (0, 2)]
    assert len(val[0]) == 4 and val[0] == val[1]


def test_two_ranks_with_batch_b_see_one_rank_with_batch_2b(tmp_path):
    data_dir = numbered_shards(tmp_path, 3, rows=7, width=4)
    single = loader(data_dir, batch_size=4)
    ranks = [loader(data_dir, batch_size=2, rank=rank, world_size=2) for rank in (0, 1)]
    for _ in range(10):
        assert torch.equal(torch.cat([next(r)["input_ids"] for r in ranks]), next(single)["input_ids"])


def test_val_ranks_split_each_batch_including_the_short_last_one(tmp_path):
    data_dir = numbered_shards(tmp_path, 7, rows=2, width=4)  # val: the last row of each shard, 7 samples
    single = [b["input_ids"] for b in loader(data_dir, "val", batch_size=4)]
    rank0, rank1 = ([b["input_ids"] for b in loader(data_dir, "val", batch_size=2, rank=rank, world_size=2)]
                    for rank in (0, 1))
    assert [len(b) for b in rank0] == [2, 2] and [len(b) for b in rank1] == [2, 1]
    assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(rank0, rank1, single, strict=True))


def test_val_is_one_pass_in_file_order(tmp_path):
    data_dir = numbered_shards(tmp_path, 7, rows=2, width=4)
    batches = [b["input_ids"][:, 0].tolist() for b in loader(data_dir, "val", batch_size=3)]
    last_rows = [2 + (2 * shard + 1) * 4 for shard in range(7)]  # first tokens of each shard's last row
    assert batches == [last_rows[0:3], last_rows[3:6], last_rows[6:]]


def test_a_token_id_beyond_vocab_is_refused_when_the_loader_opens_the_data_before_any_batch(tmp_path):
    shard = np.full((4, 4), 7, dtype=np.int32)
    shard[2, 1] = VOCAB_SIZE + 5
    with pytest.raises(PionError, match=f"token id {VOCAB_SIZE + 5} in .* outside the model's vocabulary") as error:
        loader(write_shards(tmp_path, shard, shard), batch_size=3, num_workers=1)
    assert "\n" not in str(error.value)


def test_a_loader_given_the_opened_split_uses_it_without_opening_the_data_again(tmp_path, monkeypatch):
    opened = data.PretrainData(numbered_shards(tmp_path / "d", 2, rows=10, width=4), 4)
    monkeypatch.setattr(data, "PretrainData", None)  # opening again would fail
    batches = loader(str(tmp_path / "d"), batch_size=2, opened=opened)
    assert next(batches)["input_ids"].shape == (2, 4)


def test_the_data_identity_notices_a_shard_rewritten_under_the_same_name_and_shape(tmp_path):
    numbered_shards(tmp_path / "d", 2, rows=10, width=4)
    before = data.PretrainData(str(tmp_path / "d"), 4).identity()
    shard = np.load(tmp_path / "d" / "shard_00001.npy")
    np.save(tmp_path / "d" / "shard_00001.npy", shard[::-1].copy())  # same rows, another order
    after = data.PretrainData(str(tmp_path / "d"), 4).identity()
    assert before["shards"] == after["shards"] and before["samples"] == after["samples"]
    assert before["content"]["shard_00000.npy"] == after["content"]["shard_00000.npy"]
    assert before["content"]["shard_00001.npy"] != after["content"]["shard_00001.npy"]


def test_loader_workers_ignore_the_stop_signals_the_trainer_handles(tmp_path):
    """SIGTERM and SIGINT sent to a process group reach the workers too: they leave stopping to the trainer,
    which saves first and then ends them."""
    import signal
    numbered_shards(tmp_path / "d", 1, rows=40, width=4)
    before = child_pids()
    batches = loader(str(tmp_path / "d"), num_workers=2, seed=0)
    first_tokens(batches, 2)  # a batch from each worker: both have started
    workers = child_pids() - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    first_tokens(batches, 3)  # a dead worker would fail this
    assert child_pids() >= workers


def child_pids():
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(pid) for pid in f.read().split()}
    return pids
