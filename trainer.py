"""The training loop that pretraining (train.py) and SFT (finetune.py) share: the model's wrapping, the
optimizer, one optimizer step, and the loop. Configured by a TrainConfig (train_config.py); train()
returns the run's final TrainState. The process (device, ranks, autocast, RNG) is runtime.py's, the run's
checkpoints and resume rules runs.py's, validation validation.py's.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import PionError
from hardware import gpu_peak_flops, training_flops_per_token
from runtime import StopSignal, host_memory_peak, host_memory_total
from runs import (check_same_data, keep_final_as_step_checkpoint, prune_checkpoints, restore_optimizer_and_rng,
                  save_training_checkpoint, training_checkpoint, warn_schedule_change)
from train_config import fit_schedule, learning_rate
from trackers import RunLog
from validation import evaluate

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up


@dataclass
class TrainState:
    """Where a run is: restored on resume, saved in every checkpoint, returned by train()."""
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    stopped_by: Optional[str] = None  # the signal that stopped the run early, if one did

    @property
    def finished(self):
        return self.stopped_by is None


# ----------------------------------------------------------------------------------------------------
# The model on the device, and its optimizer


def fsdp_param_dtype(config, rt):
    """The dtype FSDP2 gathers the weights in, which is the compute dtype of the sharded model's forward."""
    if config.fsdp_param_dtype == "auto":
        return torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    return getattr(torch, config.fsdp_param_dtype)


def prepare_model(model, config, rt):
    """Move to the device, then checkpointing, compile and the data-parallel wrapper. Returns the module
    to train with; the unwrapped model stays reachable as `model` (FSDP2 shards it in place)."""
    model.gradient_checkpointing = config.gradient_checkpointing
    model.to(rt.device)
    if config.compile:
        for block in model.layers:  # per block: one small graph, reused by every layer
            block.compile()
    if not rt.distributed:
        return model
    if config.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dtype = fsdp_param_dtype(config, rt)
        # Blocks get their inputs uncast: the residual stream is already in the compute dtype (the embedding
        # is gathered in it), and the RoPE tables stay fp32. Cast by FSDP, they would also differ between
        # the forward (cast) and a checkpointed block's recompute in backward (which FSDP2 does not cast).
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if dtype != torch.float32 else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def build_optimizer(model, config, rt):
    """AdamW (0.9, 0.95), fused (one kernel for all parameters) on CUDA and CPU; no weight decay on norm
    weights (the 1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.95), fused=rt.device.type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------------------------------
# The loop


def human_count(n):
    """12,345 -> '12.3k', 4,500,000 -> '4.5M': readable at every scale of a run."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def sample_text(sample_fn, model, wrapped, config, rt):
    """sample_fn(model, cache_dtype) on the unwrapped model, on every rank (FSDP2 shards in place). Decoding
    calls hidden_states, not forward, so FSDP2's hooks gather the blocks' weights but not the root's
    (embedding, final norm): gather those here, in the compute dtype, which the KV cache must share."""
    if not (config.fsdp and rt.distributed):
        return sample_fn(model, None)
    wrapped.unshard()
    try:
        return sample_fn(model, fsdp_param_dtype(config, rt))
    finally:
        wrapped.reshard()


def train_step(model, optimizer, batches, rt, grad_accum, grad_clip, lr):
    """One optimizer step over grad_accum micro-batches. Returns (loss, grad norm, tokens): the loss is the
    mean over every trained token of the step, on all ranks. A step whose loss or gradient is not finite
    changes nothing."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro_batches = [next(batches) for _ in range(grad_accum)]
    # The model returns each micro-batch's mean loss. Weighting it by its share of the step's trained
    # tokens makes the gradient the true token mean over the whole global step, however padding is
    # spread over micro-batches and ranks (DDP and FSDP average gradients over ranks: hence world_size).
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches]
    step_tokens = max(rt.all_reduce(sum(counts)), 1)
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (batch, count) in enumerate(zip(micro_batches, counts)):
        input_ids = batch["input_ids"].to(rt.device, non_blocking=True)
        labels = batch["labels"].to(rt.device, non_blocking=True)
        sync = micro == grad_accum - 1  # all-reduce gradients once per step, not per micro-batch
        if hasattr(model, "no_sync"):
            context = contextlib.nullcontext() if sync else model.no_sync()
        else:
            context = contextlib.nullcontext()
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(sync)
        with context:
            with rt.autocast():
                loss = model(input_ids, labels=labels)["loss"]
            (loss * (count * rt.world_size / step_tokens)).backward()
        loss_sum += loss.detach() * count
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    loss = rt.all_reduce(loss_sum.item()) / step_tokens
    finite = rt.all_reduce(float(math.isfinite(loss) and torch.isfinite(grad_norm).item()), dist.ReduceOp.MIN)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * rt.world_size
    return (loss if finite else float("nan")), grad_norm.item(), tokens


def train(model, config, rt, train_batches, val_batches, run_dir, prefix, resume=None, sample_fn=None,
          saved_with=None, data_identity=None, token_bytes=None, benchmark_fn=None, loggers=(), plot=False):
    """Train `model` (unwrapped, on any device) by `config`; returns the final TrainState.

    train_batches(samples_seen): the training batch iterator positioned after the samples already seen;
    val_batches(): a fresh validation pass. Both give {"input_ids", "labels"} of this rank.
    Checkpoints are run_dir/<prefix>_<step>.pt and <prefix>_final.pt.
    resume: (path, checkpoint dict) of the run to continue: its state, optimizer moments and RNG.
    sample_fn(model, cache_dtype) -> text: printed at each eval (on the unwrapped model, on every rank); its
        KV cache must be cache_dtype, the compute dtype (None: the weights'), as FSDP's bf16 policy computes
        in bf16 while the sharded weights stay fp32.
    saved_with: extra entries for every checkpoint (e.g. which trainer wrote it).
    data_identity: what the data is (shards, sample count); saved, and compared when resuming.
    token_bytes: each id's UTF-8 length (bpb.token_byte_lengths), for val_bpb next to val_loss.
    benchmark_fn(model) -> {"eval/<task>/<metric>": value}: benchmark scores at each eval (on the unwrapped
    model, on every rank: each scores its share of the requests).
    loggers: the trackers (trackers.TRACKERS) that get every metrics line besides metrics.jsonl; plot: redraw
    run_dir/metrics.png at each eval."""
    config = fit_schedule(config, rt)
    state = TrainState()
    last_path = None  # the newest checkpoint of this run
    if resume is not None:
        path, checkpoint = resume
        last_path = path
        check_same_data(path, checkpoint, data_identity, config)
        try:
            state = TrainState(**{k: int(checkpoint.get(k, 0)) for k in ("step", "tokens_seen", "samples_seen")})
        except (TypeError, ValueError):
            raise PionError(f"{path} has a corrupt step or token count")
        rt.print(f"resuming from {path} at step {state.step}")
        warn_schedule_change(path, checkpoint, config, rt)
        if state.step < config.max_steps:
            if rt.distributed:
                dist.barrier()  # every rank has opened the checkpoint before rank 0 renames it
            if rt.is_main:
                last_path = keep_final_as_step_checkpoint(path, run_dir, prefix, state.step)
    else:
        torch.manual_seed(config.seed + 1_000_003 * rt.rank)  # each rank its own dropout masks
    wrapped = prepare_model(model, config, rt)
    optimizer = build_optimizer(wrapped, config, rt)
    if resume is not None:
        restore_optimizer_and_rng(path, checkpoint, wrapped, optimizer, rt)
        checkpoint.pop("optimizer", None)  # restored: free the copy

    samples_per_step = config.batch_size * config.grad_accum * rt.world_size
    metrics = RunLog(run_dir, rt.is_main, loggers, resume_step=state.step, plot=plot, say=rt.print,
                     config={"model": asdict(model.config), "train": asdict(config), "data": data_identity,
                             "world_size": rt.world_size, **(saved_with or {})})
    stop = StopSignal()
    batches = iter(train_batches(state.samples_seen))
    flops_per_token = training_flops_per_token(model, config.seq_len)
    peak = gpu_peak_flops(rt.device)
    bar = tqdm(total=config.max_steps, initial=state.step, desc=prefix, unit="step", dynamic_ncols=True,
               disable=not rt.is_main)
    wrapped.train()
    bad_steps, last_saved = 0, None
    # The newest checkpoint saved before the latest streak of non-finite steps began: finite weights can
    # already be untrainable when such a streak starts, so pruning keeps this one and the stop message names it.
    last_good = last_path
    smooth_loss, t0, tokens_since_log = None, time.perf_counter(), 0

    @contextlib.contextmanager
    def shown_on_the_bar(what):
        """A pause of the steps (an eval, a save: seconds to minutes) says what it is on the progress line."""
        bar.set_description_str(f"{prefix} ({what})")
        try:
            yield
        finally:
            bar.set_description_str(prefix)

    def save(name):
        nonlocal last_saved, last_path
        contents = {"config": model.config, "train_config": asdict(config), "data": data_identity, **(saved_with or {}),
                    "step": state.step, "tokens_seen": state.tokens_seen, "samples_seen": state.samples_seen}
        keep_optimizer = name != "final" or config.keep_final_optimizer
        last_path = os.path.join(run_dir, f"{prefix}_{name}.pt")
        with shown_on_the_bar("saving"):
            save_training_checkpoint(last_path, wrapped, optimizer if keep_optimizer else None, rt, contents)
        last_saved = state.step

    def good_checkpoint():
        return f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"

    try:
        while state.step < config.max_steps:
            lr = learning_rate(config, state.step)
            loss, grad_norm, tokens = train_step(wrapped, optimizer, batches, rt, config.grad_accum, config.grad_clip, lr)
            if not math.isfinite(loss):
                if bad_steps == 0:
                    last_good = last_path
                bad_steps += 1
                rt.print(f"warning: non-finite loss at step {state.step + 1}, step skipped ({bad_steps} in a row)")
                if bad_steps >= MAX_BAD_STEPS:
                    raise PionError(f"{bad_steps} non-finite losses in a row at step {state.step + 1}; "
                                    f"stopping (try a lower --lr); {good_checkpoint()}")
            else:
                bad_steps = 0
            # The step counts even when skipped: its batches were consumed, and resuming must not replay them.
            state.step += 1
            state.tokens_seen += tokens
            state.samples_seen += samples_per_step
            tokens_since_log += tokens
            step = state.step
            if math.isfinite(loss):
                smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
            bar.update(1)

            if step % config.log_interval == 0 or step == config.max_steps:
                tok_per_s = tokens_since_log / (time.perf_counter() - t0)
                t0, tokens_since_log = time.perf_counter(), 0
                record = {"step": step, "loss": loss, "lr": lr, "tokens_seen": state.tokens_seen,
                          "tokens_per_s": round(tok_per_s, 1), "grad_norm": grad_norm,
                          "memory_gb": round(rt.memory_used() / 1e9, 2)}
                # The step's loss, as metrics.jsonl logs it, beside a moving average that is easier to read.
                postfix = (f"loss {loss:.3f} (avg {smooth_loss:.3f}) lr {lr:.2e} {tok_per_s:,.0f} tok/s "
                           f"{human_count(state.tokens_seen)} tok {record['memory_gb']:.1f}GB"
                           if smooth_loss is not None else "loss nan")
                if peak:
                    record["mfu"] = round(flops_per_token * tok_per_s / (peak * rt.world_size), 4)
                    postfix += f" mfu {record['mfu']:.0%}"
                bar.set_postfix_str(postfix)
                metrics.write(**record)

            if step % config.eval_interval == 0 or step == config.max_steps:
                with shown_on_the_bar("evaluating"):
                    val = evaluate(wrapped, val_batches(), rt, config.eval_steps, token_bytes)
                    if benchmark_fn is not None:
                        val.update(benchmark_fn(model))
                rt.print(f"step {step}: val loss {val['val_loss']:.4f}, ppl {math.exp(min(val['val_loss'], 20)):.2f}"
                         + "".join(f", {name.replace('val_', '')} {value:.4f}" for name, value in val.items()
                                   if name != "val_loss"))
                metrics.write(step=step, **val, tokens_seen=state.tokens_seen)
                if sample_fn is not None:
                    with shown_on_the_bar("sampling"):
                        sample = sample_text(sample_fn, model, wrapped, config, rt)
                    rt.print(f"sample: {sample!r}")

            # No checkpoint while non-finite steps are happening: it could replace the good one.
            if step % config.save_interval == 0 and step < config.max_steps:
                if bad_steps:
                    rt.print(f"warning: not saving step {step}: its loss was not finite; {good_checkpoint()}")
                else:
                    save(str(step))
                    if rt.is_main:
                        prune_checkpoints(run_dir, prefix, config.keep_last, keep=last_good)

            if rt.all_reduce(float(stop.received is not None), dist.ReduceOp.MAX):
                state.stopped_by = stop.received or "signal"
                if bad_steps:
                    rt.print(f"{state.stopped_by} received at step {step}, whose loss was not finite: exiting "
                             f"without saving; {good_checkpoint()}")
                    return state
                rt.print(f"{state.stopped_by} received: saving step {step} and exiting; continue the run with "
                         f"the same command and --resume auto")
                if last_saved != step:
                    save(str(step))
                return state
        if bad_steps:
            raise PionError(f"the last {bad_steps} steps had non-finite losses: the final model is not saved; "
                            f"{good_checkpoint()}")
        save("final")
        return state
    finally:
        bar.close()
        stop.restore()
        metrics.close()


def memory_test(model, config, rt):
    """One real training step (forward, backward, clipping, AdamW step, zero_grad) on random tokens at the
    configured batch and precision, then a checkpoint save as a run makes it (serialized, written nowhere):
    a run whose steps fit can still be killed at its first save. Returns (peak bytes, total bytes) of the
    device and (peak, total) of host memory (the same figures on the CPU), or None when it ran out of memory."""
    wrapped = prepare_model(model, config, rt)
    optimizer = build_optimizer(wrapped, config, rt)
    ids = torch.randint(0, model.config.vocab_size, (config.batch_size, config.seq_len))
    try:  # one micro-batch: more of them accumulate into the same gradient buffers, at the same peak
        train_step(wrapped, optimizer, iter([{"input_ids": ids, "labels": ids}]), rt, 1, config.grad_clip, config.lr)
    except torch.OutOfMemoryError:
        return None
    checkpoint = training_checkpoint(wrapped, optimizer, rt, {"step": 1})
    if checkpoint is not None:
        with open(os.devnull, "wb") as nowhere:
            torch.save(checkpoint, nowhere)
    del checkpoint
    return (rt.memory_used(), rt.memory_total()), (host_memory_peak(), host_memory_total())
