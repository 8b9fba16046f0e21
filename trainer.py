"""The training loop that pretraining (train.py) and SFT (finetune.py) share: the optimizer, one optimizer
step, train(model, config, rt, run) by a TrainConfig on a TrainingRun, and the memory test. The process
(device, ranks, autocast, the model's wrapping, RNG) is process.py's; the run's checkpoints, TrainState and
resume (runs.Checkpointer) runs.py's; validation and the eval sample validation.py's."""
import contextlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import PionError, human_count
from hardware import gpu_peak_flops, training_flops_per_token
from loss import trained_targets
from process import (StopSignal, gradient_sync, host_memory_peak, host_memory_total, keep_freed_memory,
                     prepare_model)
from runs import Checkpointer, prune_checkpoints
from train_config import fit_schedule, learning_rate, lr_scale
from trackers import RunLog
from validation import evaluate, sample_text

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up


# ----------------------------------------------------------------------------------------------------
# The optimizer, and one step


def build_optimizer(model, config, rt):
    """The run's optimizers, as a list that train_step steps together. AdamW (0.9, 0.95), fused (one kernel for
    all its parameters) on CUDA and CPU, with no weight decay on the norm weights (the 1-D parameters). With
    config.optimizer "muon", torch.optim.Muon takes the hidden matrices: it orthogonalizes each matrix's
    update, which is defined for the 2-D weights of a linear map; the embedding (a lookup table, tied to the
    output head) and the norm weights stay with AdamW, as in Muon's published recipes. Each param group keeps
    its peak learning rate as "peak_lr" for the schedule."""
    muon = config.optimizer == "muon"
    if muon and config.fsdp:
        raise PionError("--optimizer muon does not run with --fsdp: Muon orthogonalizes each whole matrix, and "
                        "FSDP2 gives every rank a shard of it; use DDP (no --fsdp) or --optimizer adamw")
    named = list(model.named_parameters())
    to_muon = lambda name, p: muon and p.dim() == 2 and not name.endswith(("embed.weight", "lm_head.weight"))
    adamw = torch.optim.AdamW(
        [{"params": [p for n, p in named if p.dim() >= 2 and not to_muon(n, p)], "weight_decay": config.weight_decay,
          "peak_lr": config.lr},
         {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0, "peak_lr": config.lr}],
        lr=config.lr, betas=(0.9, 0.95), fused=rt.device.type in ("cuda", "cpu"))
    if not muon:
        return [adamw]
    hidden = [p for n, p in named if to_muon(n, p)]
    return [adamw, torch.optim.Muon([{"params": hidden, "peak_lr": config.muon_lr}], lr=config.muon_lr,
                                    weight_decay=config.weight_decay)]


def train_step(model, optimizers, batches, rt, grad_accum, grad_clip, lr_scale):
    """One optimizer step over grad_accum micro-batches, each param group at its peak lr times lr_scale (the
    schedule, train_config.lr_scale). Returns (loss, grad norm, tokens): the loss is the mean over every
    trained token of the step, on all ranks. A step whose loss or gradient is not finite changes nothing."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
    micro_batches = [next(batches) for _ in range(grad_accum)]
    # The model returns each micro-batch's mean loss. Weighting it by its share of the step's trained
    # tokens makes the gradient the true token mean over the whole global step, however padding is
    # spread over micro-batches and ranks (DDP and FSDP average gradients over ranks: hence world_size).
    counts = [int(trained_targets(batch["labels"]).sum()) for batch in micro_batches]
    step_tokens = max(rt.all_reduce(sum(counts)), 1)
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (batch, count) in enumerate(zip(micro_batches, counts)):
        input_ids = batch["input_ids"].to(rt.device, non_blocking=True)
        labels = batch["labels"].to(rt.device, non_blocking=True)
        with gradient_sync(model, sync=micro == grad_accum - 1):  # all-reduce once per step, not per micro-batch
            with rt.autocast():
                loss = model(input_ids, labels=labels)["loss"]
            (loss * (count * rt.world_size / step_tokens)).backward()
        loss_sum += loss.detach() * count
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    loss = rt.all_reduce(loss_sum.item()) / step_tokens
    finite = rt.all_reduce(float(math.isfinite(loss) and torch.isfinite(grad_norm).item()), dist.ReduceOp.MIN)
    for optimizer in optimizers:
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * rt.world_size
    return (loss if finite else float("nan")), grad_norm.item(), tokens


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainingRun:
    """What train() trains on and where it writes, besides the model, its TrainConfig and the Runtime."""
    train_batches: Callable  # samples_seen -> this rank's training batches, after the samples already seen
    val_batches: Callable  # () -> a fresh validation pass; both give {"input_ids", "labels"} of this rank
    checkpointer: Checkpointer  # the run folder's checkpoints (and metrics.jsonl): the one to resume, and saves
    saved_with: dict = field(default_factory=dict)  # extra entries of every checkpoint (which trainer wrote it)
    data_identity: Optional[dict] = None  # what the data is (shards, sample count): saved, compared on resume
    token_bytes: Optional[torch.Tensor] = None  # each id's UTF-8 length (validation.token_byte_lengths): val_bpb
    sample: Optional[Callable] = None  # a validation.EvalSample: model, cache_dtype -> printed at each eval
    benchmark: Optional[Callable] = None  # harness.benchmark_scorer's: model -> scores, at each eval
    loggers: tuple = ()  # trackers (trackers.TRACKERS) that get every metrics line besides metrics.jsonl
    plot: bool = False  # redraw run_dir/metrics.png at each eval


def train(model, config, rt, run):
    """Train `model` (unwrapped, on any device) by `config` (a TrainConfig) on `run` (a TrainingRun); returns the
    final TrainState."""
    config = fit_schedule(config, rt)
    if rt.device.type == "cpu":
        keep_freed_memory()  # the steps free and reallocate the same large buffers
    wrapped = prepare_model(model, config, rt)
    optimizers = build_optimizer(wrapped, config, rt)
    state = run.checkpointer.load(wrapped, optimizers, config, {"data": run.data_identity, **run.saved_with})
    if run.checkpointer.finished:
        return state
    loop = Loop(model, wrapped, optimizers, config, rt, run, state)
    try:
        return loop.train()
    finally:
        loop.close()


class Loop:
    """The steps of one train() call: train() steps until max_steps, a stop signal or too many non-finite
    steps, and hands each step's work to step, log, validate and save."""

    def __init__(self, model, wrapped, optimizers, config, rt, run, state):
        self.model, self.wrapped, self.optimizers = model, wrapped, optimizers
        self.config, self.rt, self.run, self.state = config, rt, run, state
        self.checkpointer = checkpointer = run.checkpointer
        self.samples_per_step = config.batch_size * config.grad_accum * rt.world_size
        self.metrics = RunLog(checkpointer.run_dir, rt.is_main, run.loggers, resume_step=state.step, plot=run.plot,
                              say=rt.print, config={"model": asdict(model.config), "train": asdict(config),
                                                    "data": run.data_identity, "world_size": rt.world_size,
                                                    **run.saved_with})
        checkpointer.begin()  # every check has passed: from here on the run may change its folder
        self.stop = StopSignal()
        self.batches = iter(run.train_batches(state.samples_seen))
        self.flops_per_token = training_flops_per_token(model, config.seq_len)
        self.peak_flops = gpu_peak_flops(rt.device)
        self.bar = tqdm(total=config.max_steps, initial=state.step, desc=checkpointer.prefix, unit="step",
                        dynamic_ncols=True, disable=not rt.is_main)
        # The newest checkpoint saved before the latest streak of non-finite steps began (set when one begins):
        # finite weights can already be untrainable then, so pruning keeps this one and the stop message names it.
        self.last_good = None
        self.bad_steps, self.last_saved = 0, None
        self.smooth_loss, self.t0, self.tokens_since_log = None, time.perf_counter(), 0

    def train(self):
        config, state = self.config, self.state
        self.wrapped.train()
        while state.step < config.max_steps:
            loss, grad_norm, lr = self.step()
            step = state.step
            if step % config.log_interval == 0 or step == config.max_steps:
                self.log(loss, grad_norm, lr)
            if step % config.eval_interval == 0 or step == config.max_steps:
                self.validate()
            if step % config.save_interval == 0 and step < config.max_steps:
                self.save_step()
            if self.rt.all_reduce(float(self.stop.received is not None), dist.ReduceOp.MAX):
                return self.stop_early()
        if self.bad_steps:
            raise PionError(f"the last {self.bad_steps} steps had non-finite losses: the final model is not saved; "
                            f"{self.good_checkpoint()}")
        self.save(final=True)
        return state

    def step(self):
        """One optimizer step. A non-finite one still counts, as its batches were consumed and resuming must
        not replay them; MAX_BAD_STEPS of them in a row stop the run. Returns (loss, grad norm, lr)."""
        state, config = self.state, self.config
        lr = learning_rate(config, state.step)
        loss, grad_norm, tokens = train_step(self.wrapped, self.optimizers, self.batches, self.rt, config.grad_accum,
                                             config.grad_clip, lr_scale(config, state.step))
        if not math.isfinite(loss):
            if self.bad_steps == 0:
                self.last_good = self.checkpointer.last_path
            self.bad_steps += 1
            self.rt.print(f"warning: non-finite loss at step {state.step + 1}, step skipped "
                          f"({self.bad_steps} in a row)")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise PionError(f"{self.bad_steps} non-finite losses in a row at step {state.step + 1}; "
                                f"stopping (try a lower --lr); {self.good_checkpoint()}")
        else:
            self.bad_steps = 0
            self.smooth_loss = loss if self.smooth_loss is None else 0.9 * self.smooth_loss + 0.1 * loss
        state.step += 1
        state.tokens_seen += tokens
        state.samples_seen += self.samples_per_step
        self.tokens_since_log += tokens
        self.bar.update(1)
        return loss, grad_norm, lr

    def log(self, loss, grad_norm, lr):
        """A metrics line, and the progress line's figures."""
        state = self.state
        tok_per_s = self.tokens_since_log / (time.perf_counter() - self.t0)
        self.t0, self.tokens_since_log = time.perf_counter(), 0
        record = {"step": state.step, "loss": loss, "lr": lr, "tokens_seen": state.tokens_seen,
                  "tokens_per_s": round(tok_per_s, 1), "grad_norm": grad_norm,
                  "memory_gb": round(self.rt.memory_used() / 1e9, 2)}
        # The step's loss, as metrics.jsonl logs it, beside a moving average that is easier to read.
        postfix = (f"loss {loss:.3f} (avg {self.smooth_loss:.3f}) lr {lr:.2e} {tok_per_s:,.0f} tok/s "
                   f"{human_count(state.tokens_seen)} tok {record['memory_gb']:.1f}GB"
                   if self.smooth_loss is not None else "loss nan")
        if self.peak_flops:
            record["mfu"] = round(self.flops_per_token * tok_per_s / (self.peak_flops * self.rt.world_size), 4)
            postfix += f" mfu {record['mfu']:.0%}"
        self.bar.set_postfix_str(postfix)
        self.metrics.write(**record)

    def validate(self):
        """The validation loss (and benchmarks), printed and logged, then the sample."""
        run, rt, step = self.run, self.rt, self.state.step
        with self.shown_on_the_bar("evaluating"):
            val = evaluate(self.wrapped, run.val_batches(), rt, self.config.eval_steps, run.token_bytes)
            if run.benchmark is not None:
                val.update(run.benchmark(self.model))
        rt.print(f"step {step}: val loss {val['val_loss']:.4f}, ppl {math.exp(min(val['val_loss'], 20)):.2f}"
                 + "".join(f", {name.replace('val_', '')} {value:.4f}" for name, value in val.items()
                           if name != "val_loss"))
        self.metrics.write(step=step, **val, tokens_seen=self.state.tokens_seen)
        if run.sample is not None:
            with self.shown_on_the_bar("sampling"):
                sample = sample_text(run.sample, self.model, self.wrapped, self.config, rt)
            rt.print(f"sample: {sample}")

    def save_step(self):
        """A step checkpoint, then pruning; none while non-finite steps are happening: it could replace the good one."""
        if self.bad_steps:
            self.rt.print(f"warning: not saving step {self.state.step}: its loss was not finite; "
                          f"{self.good_checkpoint()}")
            return
        self.save()
        if self.rt.is_main:
            prune_checkpoints(self.checkpointer.run_dir, self.checkpointer.prefix, self.config.keep_last,
                              keep=self.last_good)

    def save(self, final=False):
        with self.shown_on_the_bar("saving"):
            self.checkpointer.save(self.state, final)
        self.last_saved = self.state.step

    def stop_early(self):
        """A stop signal: save this step (unless its loss was not finite) and return the state."""
        state, step = self.state, self.state.step
        state.stopped_by = self.stop.received or "signal"
        if self.bad_steps:
            self.rt.print(f"{state.stopped_by} received at step {step}, whose loss was not finite: exiting "
                          f"without saving; {self.good_checkpoint()}")
            return state
        self.rt.print(f"{state.stopped_by} received: saving step {step} and exiting; continue the run with "
                      f"the same command and --resume auto")
        if self.last_saved != step:
            self.save()
        return state

    def good_checkpoint(self):
        return f"the last good checkpoint is {self.last_good}" if self.last_good else \
            "no checkpoint was saved before it"

    @contextlib.contextmanager
    def shown_on_the_bar(self, what):
        """A pause of the steps (an eval, a save: seconds to minutes) says what it is on the progress line."""
        self.bar.set_description_str(f"{self.checkpointer.prefix} ({what})")
        try:
            yield
        finally:
            self.bar.set_description_str(self.checkpointer.prefix)

    def close(self):
        self.bar.close()
        self.stop.restore()
        self.metrics.close()


def memory_test(model, config, rt, token_bytes=None, sample=None):
    """A run's first steps at its batch, accumulation and precision, for their peak memory: train() on random
    tokens into a temporary folder, removed after: a step, a checkpoint save, a second step (the first to hold
    the optimizer's state through its backward: a run's peak), a validation (token_bytes, sample) and the final save.
    Returns (peak, total) bytes of the device and of host memory, where checkpoints are gathered (the same
    figures on the CPU), or None when it ran out of memory."""
    config = replace(config, max_steps=2, warmup_steps=0, decay_frac=0.5, save_interval=1, keep_last=None,
                     eval_steps=1)

    def random_batches(samples_seen=0):
        while True:
            ids = torch.randint(0, model.config.vocab_size, (config.batch_size, config.seq_len))
            yield {"input_ids": ids, "labels": ids}

    with tempfile.TemporaryDirectory(prefix="pion_memory_test_") as run_dir:
        run = TrainingRun(random_batches, random_batches, Checkpointer(run_dir, "memory_test", rt, seed=config.seed),
                          token_bytes=token_bytes, sample=sample)
        try:
            train(model, config, rt, run)
        except torch.OutOfMemoryError:
            return None
    return (rt.memory_used(), rt.memory_total()), (host_memory_peak(), host_memory_total())
