"""trainer.py: the optimizer, one optimizer step, the loop's logs, saves and non-finite steps, the memory test."""
import itertools
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import torch

import checkpoint
import model
import runs
import process
import train_config
import trainer
from cli import PionError
from conftest import tiny_model

# ---------------------------------------------------------------------------------------------------
# The optimizer and one step


def test_norm_weights_get_no_weight_decay():
    m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    [opt] = trainer.build_optimizer(m, train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0, warmup_steps=0,
                                                                weight_decay=0.1), process.Runtime("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    norms = [p for n, p in m.named_parameters() if "norm" in n]
    assert norms and not any(id(p) in decayed for p in norms)
    assert id(m.embed.weight) in decayed and opt.defaults["betas"] == (0.9, 0.95)


def muon_config(**settings):
    return train_config.TrainConfig(**{"max_steps": 1, "lr": 1e-3, "min_lr": 0, "warmup_steps": 0, "optimizer": "muon",
                                       "muon_lr": 0.02, **settings})


def test_muon_takes_the_hidden_matrices_and_adamw_the_embedding_and_norms():
    m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32))
    adamw, muon = trainer.build_optimizer(m, muon_config(), process.Runtime("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    hidden = [p for n, p in m.named_parameters() if p.dim() == 2 and n != "embed.weight"]
    assert in_muon == {id(p) for p in hidden}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == {id(p) for p in m.parameters()} - in_muon and id(m.embed.weight) in in_adamw


def test_each_optimizer_follows_the_schedule_from_its_own_peak():
    m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    optimizers = trainer.build_optimizer(m, muon_config(), process.Runtime("cpu"))
    ids = torch.randint(0, 64, (2, 8))
    trainer.train_step(m, optimizers, iter([{"input_ids": ids, "labels": ids}]), process.Runtime("cpu"), 1, 1.0, 0.5)
    adamw, muon = optimizers
    assert {g["lr"] for g in adamw.param_groups} == {0.5e-3} and {g["lr"] for g in muon.param_groups} == {0.01}


def test_muon_with_gradient_accumulation_steps_as_one_big_batch():
    """The same 4 rows as one batch or as 2 micro-batches of 2: the same gradient, so the same update (up to the
    rounding of Muon's bf16 orthogonalization)."""
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    updates = []
    for micro_batches in ([ids], [ids[:2], ids[2:]]):
        torch.manual_seed(0)
        m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32))
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        optimizers = trainer.build_optimizer(m, muon_config(), process.Runtime("cpu"))
        batches = iter({"input_ids": b, "labels": b} for b in micro_batches)
        trainer.train_step(m, optimizers, batches, process.Runtime("cpu"), len(micro_batches), 1.0, 1.0)
        updates.append({n: p.detach() - before[n] for n, p in m.named_parameters()})
    one, accumulated = updates
    for name in one:
        assert (one[name] - accumulated[name]).norm() <= 1e-2 * one[name].norm(), name


def test_muon_with_fsdp_is_refused_in_one_line():
    m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    with pytest.raises(PionError, match="--optimizer muon does not run with --fsdp"):
        trainer.build_optimizer(m, muon_config(fsdp=True), process.Runtime("cpu"))


def test_a_non_finite_step_changes_no_weight():
    m = model.Pion(model.PionConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    opt = trainer.build_optimizer(m, train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0, warmup_steps=0),
                                  process.Runtime("cpu"))
    with torch.no_grad():
        m.layers[0].ffn.w1.weight[0, 0] = float("inf")
    before = {n: p.clone() for n, p in m.named_parameters()}
    ids = torch.randint(0, 64, (2, 8))
    loss, _, _ = trainer.train_step(m, opt, iter([{"input_ids": ids, "labels": ids}]), process.Runtime("cpu"), 1, 1.0,
                                    1.0)
    assert not np.isfinite(loss)
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())


# ---------------------------------------------------------------------------------------------------
# The loop, on a tiny model and random tokens: 6 steps, a validation every 3, a checkpoint every 3


def random_batches(samples_seen=0):
    """Batches of 4 random rows, each drawn from its own position in the stream: a resumed run gets the same."""
    for index in itertools.count(samples_seen // 4):
        ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(index))
        yield {"input_ids": ids, "labels": ids}


def train_tiny(run_dir, resume=None, **settings):
    """trainer.train of a tiny model into run_dir (made here, as runs.open_run_dir makes it) as pion_nano_*.pt,
    continuing from the checkpoint at path `resume` if given; -> the final TrainState."""
    os.makedirs(run_dir, exist_ok=True)
    config = train_config.TrainConfig(**{"max_steps": 6, "lr": 3e-3, "min_lr": 3e-5, "warmup_steps": 2,
                                         "batch_size": 4, "grad_accum": 2, "seq_len": 32, "log_interval": 1,
                                         "eval_interval": 3, "eval_steps": 2, "save_interval": 3, **settings})
    rt = process.Runtime("cpu")
    checkpointer = runs.Checkpointer(str(run_dir), "pion_nano", rt, str(resume) if resume else None, config.seed)
    model = checkpointer.resumed_model() if resume else tiny_model(vocab_size=512, d_model=32, n_heads=4, d_ff=64)
    run = trainer.TrainingRun(random_batches, random_batches, checkpointer, saved_with={"trainer": "pretrain"})
    return trainer.train(model, config, rt, run)


def record_mallopt_calls(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1
    monkeypatch.setattr(process.ctypes, "CDLL", lambda name: Libc())
    return calls


def test_a_cpu_run_asks_glibc_to_keep_freed_memory(tmp_path, monkeypatch):
    """A CPU step frees and reallocates its logits and vocab-sized gradients every step (see keep_freed_memory):
    the loop asks glibc to serve large blocks from the heap and never to trim it. Whether the pages are then
    reused also depends on the heap's room to grow, so this checks the request, not a fault count."""
    calls = record_mallopt_calls(monkeypatch)
    train_tiny(tmp_path, max_steps=1)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    assert sorted(calls) == sorted([(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)])


def test_a_runtime_alone_leaves_the_allocator_as_it_is(monkeypatch):
    """eval.py and the benchmarks make a Runtime without training: glibc keeps its own settings."""
    calls = record_mallopt_calls(monkeypatch)
    process.Runtime("cpu")
    assert calls == []


def saved(run_dir):
    return sorted(p for p in os.listdir(run_dir) if p.endswith(".pt"))


def test_the_progress_line_says_when_the_run_evaluates_and_saves(tmp_path, capsys):
    """An eval or a save pauses the steps for seconds to minutes: the bar must not look stalled."""
    train_tiny(tmp_path)
    err = capsys.readouterr().err
    for what in ("evaluating", "saving"):
        assert f"pion_nano ({what})" in err, what


def test_keep_last_prunes_old_step_checkpoints(tmp_path):
    train_tiny(tmp_path, save_interval=1, keep_last=2)
    assert saved(tmp_path) == ["pion_nano_4.pt", "pion_nano_5.pt", "pion_nano_final.pt"]


def test_a_resumed_run_prunes_the_checkpoint_it_resumed_from_like_any_other(tmp_path):
    train_tiny(tmp_path, max_steps=3, save_interval=1, keep_last=1, keep_final_optimizer=True)
    train_tiny(tmp_path, resume=tmp_path / "pion_nano_final.pt", max_steps=6, save_interval=1, keep_last=1)
    assert saved(tmp_path) == ["pion_nano_5.pt", "pion_nano_final.pt"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_run_stopped_and_resumed_ends_with_the_weights_of_the_unbroken_run(tmp_path, optimizer):
    """The run stops after its step-3 checkpoint (a copy of it in a folder of its own) and is resumed from it."""
    train_tiny(tmp_path / "unbroken", optimizer=optimizer)
    os.makedirs(tmp_path / "stopped")
    shutil.copy(tmp_path / "unbroken" / "pion_nano_3.pt", tmp_path / "stopped")
    train_tiny(tmp_path / "stopped", resume=tmp_path / "stopped" / "pion_nano_3.pt", optimizer=optimizer)
    unbroken = checkpoint.read_checkpoint(tmp_path / "unbroken" / "pion_nano_final.pt")["model"]
    resumed = checkpoint.read_checkpoint(tmp_path / "stopped" / "pion_nano_final.pt")["model"]
    assert all(torch.equal(unbroken[name], resumed[name]) for name in unbroken)


def test_the_final_checkpoint_keeps_the_optimizer_only_when_asked(tmp_path):
    train_tiny(tmp_path / "a")
    assert "optimizer" not in checkpoint.read_checkpoint(tmp_path / "a" / "pion_nano_final.pt")
    train_tiny(tmp_path / "b", keep_final_optimizer=True)
    assert "optimizer" in checkpoint.read_checkpoint(tmp_path / "b" / "pion_nano_final.pt")


# ---------------------------------------------------------------------------------------------------
# Non-finite steps


def non_finite_at(monkeypatch, steps):
    """Make the given steps (1-based) report a non-finite loss, as an overflowing step does: it changes nothing."""
    real_step, calls = trainer.train_step, []

    def train_step(*args):
        calls.append(1)
        loss, grad_norm, tokens = real_step(*args)
        return (float("nan"), float("nan"), tokens) if len(calls) in steps else (loss, grad_norm, tokens)

    monkeypatch.setattr(trainer, "train_step", train_step)


def test_no_checkpoint_is_saved_while_steps_are_non_finite(tmp_path, monkeypatch, capsys):
    non_finite_at(monkeypatch, {3, 4})
    train_tiny(tmp_path, save_interval=1)
    out = capsys.readouterr().out
    assert "not saving step 3" in out and "not saving step 4" in out
    assert saved(tmp_path) == ["pion_nano_1.pt", "pion_nano_2.pt", "pion_nano_5.pt", "pion_nano_final.pt"]


def test_pruning_keeps_the_newest_checkpoint_from_before_the_non_finite_steps(tmp_path, monkeypatch):
    non_finite_at(monkeypatch, {3, 4})
    train_tiny(tmp_path, save_interval=1, keep_last=1)
    assert saved(tmp_path) == ["pion_nano_2.pt", "pion_nano_5.pt", "pion_nano_final.pt"]


def test_a_run_stopped_by_non_finite_steps_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    non_finite_at(monkeypatch, set(range(3, 100)))
    good = tmp_path / "pion_nano_2.pt"
    with pytest.raises(PionError, match=re.escape(f"5 non-finite losses in a row at step 7; stopping (try a lower "
                                                  f"--lr); the last good checkpoint is {good}")):
        train_tiny(tmp_path, max_steps=20, save_interval=1, keep_last=1)
    assert saved(tmp_path) == ["pion_nano_2.pt"]


def test_repeated_non_finite_losses_stop_the_run_without_saving(tmp_path, capsys):
    with pytest.raises(PionError, match="non-finite losses in a row"):
        train_tiny(tmp_path, lr=1e30, warmup_steps=0, max_steps=20, save_interval=1, grad_clip=0)
    assert "step skipped" in capsys.readouterr().out
    for name in saved(tmp_path):
        m, _ = checkpoint.load_checkpoint(tmp_path / name)
        assert all(torch.isfinite(p).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------
# The memory test


def test_the_memory_test_trains_in_a_temporary_folder_it_removes(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = train_config.TrainConfig(max_steps=1000, lr=1e-3, min_lr=0, warmup_steps=100, batch_size=2, seq_len=16)
    (used, total), (host_used, host_total) = trainer.memory_test(tiny_model(), config, process.Runtime("cpu"))
    assert 0 < used < total and 0 < host_used < host_total
    assert os.listdir(tmp_path) == []
