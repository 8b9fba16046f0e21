"""Pretraining data: token shards on disk and a shuffled, resumable loader over them.

A data dir holds shard_00000.npy, shard_00001.npy, ...: 2-D integer arrays (rows, width) of token ids,
documents separated by EOS_ID and the last row padded with PAD_ID, plus an optional metadata.json.
Shards are memory-mapped, so memory stays flat however many there are. data_prep.py downloads the
published shards or makes them from your own text.
"""
import functools
import glob
import hashlib
import itertools
import json
import os
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenizer import PAD_ID
from cli import PionError, first_line
from loss import IGNORE_INDEX

VAL_FRACTION = 0.02  # the last ~2% of the rows of every shard are validation


def open_shard(path):
    """Memory-map one shard (np.load reads just the header) and check that it is a 2-D integer array."""
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise PionError(f"{path} is not a readable .npy file ({first_line(e)})")
    if shard.ndim != 2:
        raise PionError(f"{path} has shape {shard.shape}; a shard must be 2-D (rows, tokens per row)")
    if not np.issubdtype(shard.dtype, np.integer):
        raise PionError(f"{path} has dtype {shard.dtype}; a shard must hold integer token ids")
    return shard


def read_metadata(data_dir):
    path = os.path.join(data_dir, "metadata.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PionError(f"{path} is not readable JSON ({first_line(e)})")


class PretrainData:
    """One split of a data dir, seen as n_samples windows of seq_len tokens.

    A row of width W holds W // seq_len non-overlapping windows, so short-context runs use all the data.
    Sample i is the i-th window of the split in (shard, row, window) order."""

    def __init__(self, data_dir, seq_len, split="train"):
        if split not in ("train", "val"):
            raise PionError(f"unknown split {split!r}; use 'train' or 'val'")
        if not os.path.isdir(data_dir):
            raise PionError(f"data dir not found: {data_dir}")
        paths = sorted(glob.glob(os.path.join(data_dir, "shard_*.npy")))
        if not paths:
            raise PionError(f"no shard_*.npy files in {data_dir}; get some with `python data_prep.py download` "
                            f"or `python data_prep.py prepare`")
        shards = [open_shard(path) for path in paths]
        widths = sorted({shard.shape[1] for shard in shards})
        if len(widths) > 1:
            raise PionError(f"the shards in {data_dir} have different widths {widths}; they must all be equal")
        self.width = widths[0]
        if not 1 <= seq_len <= self.width:
            raise PionError(f"seq_len {seq_len} does not fit the shards of {data_dir}: it must be between 1 and "
                            f"their width {self.width}")

        # Every shard gives its last ~2% of rows (at least one) to validation: the split of a shard never
        # depends on how many other shards there are, so adding shards never turns validation into training.
        row_ranges = []
        for shard in shards:
            first_val_row = len(shard) - max(1, round(len(shard) * VAL_FRACTION))
            row_ranges.append((first_val_row, len(shard)) if split == "val" else (0, first_val_row))
        self.shard_paths, self.shards = paths, shards

        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.windows_per_row = self.width // seq_len
        self.first_row = np.array([start for start, _ in row_ranges])  # per shard, like first_sample
        self.rows = np.array([stop - start for start, stop in row_ranges])
        self.first_sample = np.concatenate([[0], np.cumsum(self.rows * self.windows_per_row)])
        self.n_samples = int(self.first_sample[-1])
        if self.n_samples == 0:
            raise PionError(f"the {split} split of {data_dir} has no samples ({self.rows.sum()} rows); it needs "
                            f"more rows or shards")
        self.metadata = read_metadata(data_dir)

    def describe(self):
        text = (f"{self.split} data: {self.n_samples:,} samples of {self.seq_len} tokens from "
                f"{len(self.shard_paths)} shard(s) of width {self.width} in {self.data_dir}")
        return text + (f"; metadata: {json.dumps(self.metadata)}" if self.metadata else "")

    def batch(self, sample_indices):
        """{"input_ids", "labels"}: LongTensors (len(sample_indices), seq_len). labels are the same tokens
        (the model shifts them itself) with padding set to IGNORE_INDEX, so it never counts in the loss."""
        shard = np.searchsorted(self.first_sample, sample_indices, side="right") - 1
        local = sample_indices - self.first_sample[shard]
        row = self.first_row[shard] + local // self.windows_per_row
        col = local % self.windows_per_row * self.seq_len
        input_ids = np.empty((len(sample_indices), self.seq_len), dtype=np.int64)
        for i in np.lexsort((row, shard)):  # in file order: the reads move forward through each shard
            input_ids[i] = self.shards[shard[i]][row[i], col[i]:col[i] + self.seq_len]
        input_ids = torch.from_numpy(input_ids)
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(input_ids == PAD_ID, IGNORE_INDEX)}

    def check_tokens(self, vocab_size):
        """Refuse token ids the model has no embedding for, and a split of padding alone (it would train at
        loss 0). Reads the split's rows once, a shard at a time (they are memory-mapped)."""
        real_tokens = 0
        for path, shard, start, stop in zip(self.shard_paths, self.shards, self.first_row, self.first_row + self.rows):
            rows = shard[start:stop]
            low, high = (int(rows.min()), int(rows.max())) if rows.size else (0, 0)
            if low < 0 or high >= vocab_size:
                bad = high if high >= vocab_size else low
                raise PionError(f"token id {bad} in {path} is outside the model's vocabulary of {vocab_size}: the "
                                f"data was tokenized with another tokenizer")
            real_tokens += int(np.count_nonzero(rows != PAD_ID))
        if real_tokens == 0:
            raise PionError(f"the {self.split} split of {self.data_dir} is all padding: there is nothing to learn")

    def identity(self):
        """What a checkpoint records of its data, so that resuming on other data is noticed: the shards,
        and a cheap check of each one's contents (its size and a hash of its first and last rows), which
        notices a shard rewritten with other data under the same name and shape."""
        content = {}
        for path, shard in zip(self.shard_paths, self.shards):
            digest = hashlib.sha256(np.ascontiguousarray(shard[0]).tobytes())
            digest.update(np.ascontiguousarray(shard[-1]).tobytes())
            content[os.path.basename(path)] = f"{os.path.getsize(path)} bytes, sha256 {digest.hexdigest()[:16]}"
        return {"shards": [os.path.basename(p) for p in self.shard_paths], "samples": self.n_samples,
                "seq_len": self.seq_len, "content": content}

    # Workers started by spawn or forkserver get a pickled copy: send the paths, not the shards' contents.
    def __getstate__(self):
        return {**self.__dict__, "shards": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.shards = [np.load(path, mmap_mode="r") for path in self.shard_paths]


# ----------------------------------------------------------------------------------------------------
# Sample order and the loader


def epoch_order(n_samples, seed, epoch):
    """An epoch's shuffled sample order: a function of (seed, epoch) alone, so any point can be resumed."""
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


def train_global_batches(n_samples, global_batch, seed, start_sample):
    """The endless training stream as global batches of sample indices: each epoch's order without its
    incomplete last batch, laid end to end, starting at position start_sample of that stream without
    building what comes before it."""
    per_epoch = n_samples // global_batch * global_batch
    epoch, offset = divmod(start_sample, per_epoch)
    carry = np.empty(0, dtype=np.int64)  # a start inside a batch makes batches straddle epoch ends
    while True:
        order = np.concatenate([carry, epoch_order(n_samples, seed, epoch)[offset:per_epoch]])
        n_full = len(order) // global_batch * global_batch
        yield from order[:n_full].reshape(-1, global_batch)
        carry, epoch, offset = order[n_full:], epoch + 1, 0


def val_global_batches(n_samples, global_batch):
    """One pass over the val samples in order; the last global batch may be short."""
    for start in range(0, n_samples, global_batch):
        yield np.arange(start, min(start + global_batch, n_samples))


class BatchStream(IterableDataset):
    """This rank's slice of each global batch, as whole batches. DataLoader worker w of W builds only
    batches w, w+W, w+2W, ...; DataLoader takes batches from its workers in turn, so the order is the
    same for any num_workers, and no worker needs whole files to itself (there may be fewer shards)."""

    def __init__(self, data, global_batches, rank, batch_size):
        self.data, self.global_batches, self.rank, self.batch_size = data, global_batches, rank, batch_size

    def rank_batches(self):
        for global_batch in self.global_batches():
            mine = global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine):  # only the short last val batch can leave a rank without samples
                yield mine

    def __iter__(self):
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for sample_indices in itertools.islice(self.rank_batches(), worker_id, None, n_workers):
            yield self.data.batch(sample_indices)


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C, systemd's stop, Slurm's scancel and cloud
    preemption signal the whole process group, and a worker killed by one would crash the trainer before
    it saves. They end with the trainer's loader, or when the trainer exits after saving (a worker exits
    once its parent is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def create_dataloader(data_dir, split, batch_size, seq_len, vocab_size, seed=42, start_sample=0,
                      rank=0, world_size=1, num_workers=0, pin_memory=False, opened=None):
    """Iterator of {"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)} for this rank.
    split="train": infinite, shuffled per (seed, epoch), begins at global sample index start_sample
    (counted in samples over all ranks: a run's samples_seen, which the trainer passes on resume).
    split="val": one pass, fixed order (seed and start_sample are not used).

    The split's token ids are checked against vocab_size here, once, a shard at a time (in the main process:
    an error raised in a DataLoader worker comes back as a multi-line traceback), unless `opened` is the
    split already opened as PretrainData and checked with check_tokens: then it is used as it is.

    Global batch g is samples [g*B*W, (g+1)*B*W) of the stream and rank r takes its r-th B, so W ranks
    with batch B see the same global batches as one rank with batch B*W."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_sample < 0 or num_workers < 0:
        raise PionError(f"bad loader settings: batch_size {batch_size}, rank {rank}, world_size {world_size}, "
                        f"start_sample {start_sample}, num_workers {num_workers}")
    data = opened
    if data is None:
        data = PretrainData(data_dir, seq_len, split)
        data.check_tokens(vocab_size)
    global_batch = batch_size * world_size
    if split == "train":
        if data.n_samples < global_batch:
            raise PionError(f"the train split of {data_dir} has {data.n_samples} samples of {seq_len} tokens, "
                            f"fewer than one global batch of {global_batch}")
        global_batches = functools.partial(train_global_batches, data.n_samples, global_batch, seed, start_sample)
        if rank == 0:
            print(data.describe())
    else:
        global_batches = functools.partial(val_global_batches, data.n_samples, global_batch)
    # The loader draws its workers' seeds from a generator of its own: from the global RNG, that draw would
    # shift the dropout masks of a resumed run away from those of the uninterrupted one.
    loader = DataLoader(BatchStream(data, global_batches, rank, batch_size), batch_size=None,
                        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=ignore_stop_signals)
    return (batch for batch in loader)  # its workers start at the first batch asked for, not here
