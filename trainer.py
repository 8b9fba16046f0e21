"""The training loop that pretraining (train.py) and SFT (finetune.py) share: the model's wrapping, the
optimizer, one optimizer step, checkpoints with exact resume, signals and metrics. Configured by a
TrainConfig; train() returns the run's final TrainState. The process (device, ranks, autocast, RNG) is
runtime.py's; validation is validation.py's.
"""
import contextlib
import dataclasses
import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

from checkpoint import clean_state_dict, keep_final_as_step_checkpoint, prune_checkpoints, save_checkpoint
from cli import PionError, first_line, non_negative_float, non_negative_int, positive_int
from hardware import gpu_peak_flops, training_flops_per_token
from runtime import gather_rng_states, set_rng_state
from trackers import RunLog
from validation import evaluate

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up


def setting(help, default=dataclasses.MISSING, flag_type=None, flag=None, **flag_options):
    """A TrainConfig field documented once: `help` is also its command-line flag's help (add_train_config_args).
    flag_type checks the flag's value; flag names it when it is not --<field> (False: no flag)."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=flag_type, flag=flag, options=flag_options))


@dataclass
class TrainConfig:
    """How to train: the schedule, batch layout, intervals and performance switches of one run."""
    max_steps: int = setting("optimizer steps of the whole run", flag_type=positive_int)
    lr: float = setting("peak learning rate", flag_type=non_negative_float)
    min_lr: float = setting("learning rate at the end of the schedule", flag_type=non_negative_float)
    warmup_steps: int = setting("steps of linear warmup", flag_type=non_negative_int)
    batch_size: int = setting("sequences per device per micro-step", 8, positive_int)
    grad_accum: int = setting("micro-steps per optimizer step", 1, positive_int)
    seq_len: int = setting("tokens per training sequence", 2048, positive_int)
    schedule: str = setting('"wsd" (warmup, constant, linear decay) or "cosine": each trainer sets its own', "wsd",
                            flag=False)
    decay_frac: float = setting("WSD: the fraction of max_steps spent decaying", 0.2, flag=False)  # train.py's own
    weight_decay: float = setting("AdamW decay (not on norm weights)", 0.1, non_negative_float)
    grad_clip: float = setting("max gradient norm, 0 = off", 1.0, non_negative_float)
    log_interval: int = setting("steps between metrics lines", 10, positive_int)
    eval_interval: int = setting("steps between validations", 500, positive_int)
    eval_steps: int = setting("validation batches per evaluation", 20, positive_int)
    save_interval: int = setting("steps between checkpoints", 1000, positive_int)
    keep_last: Optional[int] = setting("keep only the newest N step checkpoints", None, positive_int)
    compile: bool = setting("torch.compile each block", False)
    gradient_checkpointing: bool = setting("keep activations instead of recomputing them in backward (faster, more "
                                           "memory)", True, flag="--no_gradient_checkpointing")
    fsdp: bool = setting("shard parameters with FSDP2 instead of DDP (torchrun)", False)
    fsdp_param_dtype: str = setting("FSDP2 compute dtype (auto: bfloat16 on CUDA, float32 elsewhere)", "auto",
                                    choices=["auto", "bfloat16", "float32"])
    seed: int = setting("seeds the weights, the data order and dropout", 42, non_negative_int)
    allow_data_change: bool = setting("resume although the data differs from the checkpoint's (its sample order "
                                      "then changes)", False)
    keep_final_optimizer: bool = setting("keep the optimizer state in the _final checkpoint too (only to train "
                                         "further from it; it triples the file); step checkpoints always keep it, "
                                         "to resume", False)


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


def add_train_config_args(parser, defaults):
    """A flag per TrainConfig field, defaulting to `defaults` (a TrainConfig) and helped by the field's own text.
    A switch that is on by default is turned off by its named flag (--no_...)."""
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if meta["flag"] is False:
            continue
        default = getattr(defaults, field.name)
        if field.type == "bool" or field.type is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(meta["flag"] or f"--{field.name}", dest=field.name, action=action, help=meta["help"])
        else:
            parser.add_argument(meta["flag"] or f"--{field.name}", dest=field.name, type=meta["type"], default=default,
                                help=meta["help"], **meta["options"])


def add_benchmark_args(parser):
    """--eval_tasks and its companions: harness benchmarks scored at each eval, in both trainers."""
    parser.add_argument("--eval_tasks", default=None, help="lm-evaluation-harness tasks scored at each eval, e.g. "
                        "hellaswag,arc_easy (pip install lm-eval; default: none)")
    parser.add_argument("--eval_limit", type=positive_int, default=None,
                        help="examples per task at each eval (default: all)")
    parser.add_argument("--eval_include_path", default=None,
                        help="folder of task YAML files of your own for --eval_tasks (default: none)")


def benchmark_scorer(tasks, tokenizer, vocab_size, limit, include_path, batch_size):
    """model -> {"eval/<task>/<metric>": value} for --eval_tasks, or None without them. lm_eval is imported
    only then: training needs none of it."""
    if not tasks:
        return None
    try:
        import evaluation
    except ImportError as e:
        raise PionError(f"--eval_tasks needs lm-evaluation-harness ({e}): pip install lm-eval")
    return evaluation.training_benchmarks(tasks, tokenizer, vocab_size, limit, include_path, batch_size)


def wsd_decay_start(max_steps, decay_frac):
    return max_steps - round(decay_frac * max_steps)


def wsd_lr(step, lr, min_lr, warmup_steps, max_steps, decay_frac):
    """Warmup-stable-decay: linear warmup, constant lr, then linear decay to min_lr over the last decay_frac."""
    decay_start = wsd_decay_start(max_steps, decay_frac)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * (step - decay_start + 1) / (max_steps - decay_start)


def cosine_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to lr, then half a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def fit_schedule(config, rt):
    """The config with a warmup that fits the run: a default warmup longer than a short run would keep the lr
    near 0 for all of it, so it shrinks to a tenth of the run (said out loud). Warmup running into WSD's
    decay is refused: the schedule would jump down mid-warmup."""
    c = config
    if c.warmup_steps >= c.max_steps:
        warmup = c.max_steps // 10
        rt.print(f"warning: warmup of {c.warmup_steps} steps does not fit in max_steps {c.max_steps}; "
                 f"using {warmup} warmup steps instead")
        c = dataclasses.replace(c, warmup_steps=warmup)
    if c.schedule == "wsd" and c.warmup_steps > wsd_decay_start(c.max_steps, c.decay_frac):
        raise PionError(f"warmup ({c.warmup_steps} steps) runs into the decay, which starts at step "
                        f"{wsd_decay_start(c.max_steps, c.decay_frac)} of {c.max_steps}: lower --warmup_steps or "
                        f"--decay_frac")
    if c.schedule == "wsd" and c.decay_frac > 0 and round(c.decay_frac * c.max_steps) == 0:
        rt.print(f"warning: decay_frac {c.decay_frac} of {c.max_steps} steps is no step: the lr never decays")
    return c


def learning_rate(config, step):
    c = config
    if c.schedule == "cosine":
        return cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
    return wsd_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps, c.decay_frac)


# ----------------------------------------------------------------------------------------------------
# Runtime: device, processes, precision


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
# Checkpoints of a run


def training_checkpoint(model, optimizer, rt, contents):
    """A run's checkpoint dict, in host memory on rank 0 (None on the others): every rank takes part (FSDP
    gathers shards). optimizer None leaves the optimizer state out."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is not None:
        contents = {**contents, "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    rng_states = gather_rng_states(rt)
    return {"model": model_state, "rng": rng_states, **contents} if rt.is_main else None


def save_training_checkpoint(path, model, optimizer, rt, contents):
    """training_checkpoint, written atomically by rank 0."""
    checkpoint = training_checkpoint(model, optimizer, rt, contents)
    if rt.is_main:
        save_checkpoint(path, checkpoint)
        rt.print(f"saved {path}")
    if rt.distributed:
        dist.barrier()


def restore_optimizer_and_rng(path, checkpoint, model, optimizer, rt):
    """Resume: the optimizer's moments (into the wrapped model's, possibly sharded, state) and each rank's RNG.
    The hyperparameters stay this run's: loading a state dict also loads the saved groups' weight decay."""
    if "optimizer" in checkpoint:
        check_optimizer_state(path, checkpoint["optimizer"], model)
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        except Exception as e:
            raise PionError(f"cannot restore the optimizer from {path} ({first_line(e)})")
        for group, hyperparameters in zip(optimizer.param_groups, groups):
            group.update(hyperparameters)
    else:
        rt.print(f"warning: {path} holds no optimizer state (a _final.pt keeps it only with --keep_final_optimizer):"
                 f" AdamW's moments start again from zero")
    states = checkpoint.get("rng")
    if isinstance(states, dict):
        states = [states]  # checkpoints before per-rank states kept rank 0's alone
    if states:
        try:
            set_rng_state(states[rt.rank] if len(states) == rt.world_size else states[0], rt.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise PionError(f"{path} has a corrupt RNG state ({first_line(e)})")


ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


def check_optimizer_state(path, saved, model):
    """Refuse optimizer state that does not fit the model before anything loads it: fused AdamW trusts every
    moment to have its parameter's shape and writes past a smaller buffer (a crash, or worse, from a
    downloaded file). Every parameter is listed once, and each has all of AdamW's tensors or none (a run
    that has not stepped yet)."""
    params = clean_state_dict(dict(model.named_parameters()))

    def refuse(problem):
        raise PionError(f"{path} has optimizer state that does not fit the model: {problem}")

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or \
            not isinstance(saved.get("param_groups"), list) or not all(isinstance(g, dict) for g in saved["param_groups"]):
        refuse("expected 'state' and 'param_groups'")
    listed = [name for group in saved["param_groups"] for name in group.get("params", [])]
    if sorted(map(str, listed)) != sorted(params):
        refuse(f"its groups list {len(listed)} parameters, the model has {len(params)}")
    if saved["state"] and set(saved["state"]) != set(params):
        refuse(f"it has moments for {len(saved['state'])} of the model's {len(params)} parameters")
    for name, entry in saved["state"].items():
        param = params[name]
        if not isinstance(entry, dict) or set(entry) != ADAMW_STATE or \
                not all(isinstance(t, torch.Tensor) for t in entry.values()):
            refuse(f"{name} has {sorted(entry) if isinstance(entry, dict) else type(entry).__name__}, expected "
                   f"AdamW's tensors {sorted(ADAMW_STATE)}")
        if entry["step"].numel() != 1:
            refuse(f"the step of {name} is not one number")
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = entry[key]
            if tensor.shape != param.shape or tensor.dtype != param.dtype:
                refuse(f"{key} of {name} is {tuple(tensor.shape)} {tensor.dtype}, the parameter is "
                       f"{tuple(param.shape)} {param.dtype}")


SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr", "warmup_steps", "schedule", "decay_frac", "weight_decay", "grad_clip",
                   "batch_size", "grad_accum")


def warn_schedule_change(path, checkpoint, config, rt):
    """Resuming with other schedule flags (a longer run, another lr) is how a run is extended, so it is allowed;
    but it moves the learning rate from where the checkpoint's run had it, so it is said."""
    saved = checkpoint.get("train_config") or {}
    changed = [f"{key} {saved[key]} -> {getattr(config, key)}" for key in SCHEDULE_FIELDS
               if key in saved and saved[key] != getattr(config, key)]
    if changed:
        rt.print(f"warning: resuming {path} with other training flags than its run's ({', '.join(changed)}); "
                 f"the schedule from step {checkpoint.get('step', 0)} on follows the new ones")


def check_same_data(path, checkpoint, data_identity, config):
    """Resuming on other data (shards added or removed, another seq_len) silently changes which samples
    come next: refuse it unless the user asks for it."""
    saved = checkpoint.get("data")
    if saved is None or data_identity is None or config.allow_data_change:
        return
    # What both record: a checkpoint from before a field was added is compared on the fields it has.
    changed = []
    for key in sorted(set(saved) & set(data_identity)):
        before, now = saved[key], data_identity[key]
        if isinstance(before, dict) and isinstance(now, dict):  # per shard: name the ones that changed
            changed += [f"{key} of {name}" for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        elif before != now:
            changed.append(f"{key} {before!r:.60} -> {now!r:.60}")
    if not changed:
        return
    changed = ", ".join(changed)
    raise PionError(f"the training data differs from what {path} was trained on ({changed}); pass "
                    f"--allow_data_change to resume on it anyway")


# ----------------------------------------------------------------------------------------------------
# The loop


def signal_exit_code(name):
    """The shell's exit code for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signal.Signals[name].value if name in signal.Signals.__members__ else 1


class StopSignal:
    """SIGINT/SIGTERM (Ctrl-C, a preempted cloud GPU) ask the loop to save and exit after this step.
    A second signal interrupts immediately."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (rt.memory_used(), rt.memory_total()), (host_peak, host_total)
