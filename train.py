"""Pretrain Pion: WSD schedule, bf16 autocast, gradient checkpointing, exact resume, DDP or FSDP2.

    python train.py --model_size nano --data_dir data/mixed
    torchrun --nproc_per_node 8 train.py --model_size small --data_dir data/mixed [--fsdp]

The pieces finetune.py shares (runtime setup, optimizer, the training loop, checkpoints) live here.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import model as pion
from model import PionError

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run gives up


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_training_args(p, lr, min_lr, warmup_steps, max_steps, batch_size, grad_accum, save_interval):
    """The flags pretraining and finetuning share; the defaults differ per job."""
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: pile_tokenizer.json, fetched once)")
    p.add_argument("--batch_size", type=positive_int, default=batch_size, help="sequences per device per micro-step")
    p.add_argument("--grad_accum", type=positive_int, default=grad_accum, help="micro-steps per optimizer step")
    p.add_argument("--seq_len", type=positive_int, default=2048)
    p.add_argument("--lr", type=non_negative_float, default=lr)
    p.add_argument("--min_lr", type=non_negative_float, default=min_lr)
    p.add_argument("--warmup_steps", type=int, default=warmup_steps)
    p.add_argument("--max_steps", type=positive_int, default=max_steps)
    p.add_argument("--weight_decay", type=non_negative_float, default=0.1)
    p.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="max grad norm, 0 = off")
    p.add_argument("--log_interval", type=positive_int, default=10)
    p.add_argument("--eval_interval", type=positive_int, default=500)
    p.add_argument("--eval_steps", type=positive_int, default=20)
    p.add_argument("--save_interval", type=positive_int, default=save_interval)
    p.add_argument("--save_dir", default="checkpoints")
    p.add_argument("--keep_last", type=positive_int, default=None, help="keep only the newest N step checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in the save dir")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--no_soft_cap", action="store_true", help="plain SDPA attention without logit soft-capping")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 instead of DDP (torchrun)")
    p.add_argument("--sample_tokens", type=int, default=48, help="tokens of the sample printed at each eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_size", choices=list(pion.SIZES), default="small")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a PionConfig field of the size, e.g. --override n_layers=8 (repeatable)")
    p.add_argument("--data_dir", default=None, help="folder of shard_*.npy (see data.py)")
    add_training_args(p, lr=3e-4, min_lr=3e-5, warmup_steps=1000, max_steps=100_000, batch_size=64, grad_accum=2,
                      save_interval=1000)
    p.add_argument("--decay_frac", type=float, default=0.2, help="WSD: fraction of max_steps spent decaying")
    p.add_argument("--memory_test", action="store_true", help="one forward/backward, report peak memory, exit")
    p.add_argument("--sample_prompt", default="The meaning of life is")
    args = p.parse_args(argv)
    if args.warmup_steps < 0 or args.num_workers < 0:
        p.error("--warmup_steps and --num_workers must be >= 0")
    if not 0 <= args.decay_frac <= 1:
        p.error("--decay_frac must be between 0 and 1")
    if not args.memory_test and args.data_dir is None:
        p.error("--data_dir is required (see `python data.py --help` to get data)")
    return args


def config_overrides(pairs):
    """["n_layers=8", "rope_theta=5e5"] -> {"n_layers": 8, "rope_theta": 500000.0}"""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PionError(f"--override expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise PionError(f"--override {pair!r}: {value!r} is not a number or true/false")
    return overrides


def wsd_lr(step, lr, min_lr, warmup_steps, max_steps, decay_frac):
    """Warmup-stable-decay: linear warmup, constant lr, then linear decay to min_lr over the last decay_frac."""
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * (step - decay_start + 1) / (max_steps - decay_start)


# ----------------------------------------------------------------------------------------------------
# Runtime: device, processes, precision


class Runtime:
    """Where and how this process trains: device, rank/world size under torchrun, autocast."""

    def __init__(self, device="auto"):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise PionError("--device cuda, but CUDA is not available")
        if device == "mps" and not torch.backends.mps.is_available():
            raise PionError("--device mps, but MPS is not available")
        self.device = torch.device(f"cuda:{self.local_rank}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA (fp32 master weights and optimizer state); fp32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, value, op=None):
        """Sum (or op) a float over ranks; identity in a single process."""
        if not self.distributed:
            return value
        t = torch.tensor(float(value), device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.item()

    def print(self, *args):
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    def memory_used(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def memory_total(self):
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_model(model, args, rt):
    """Move to the device, then checkpointing, compile and the data-parallel wrapper. Returns the module
    to train with; the unwrapped model stays reachable as `model` (FSDP2 shards it in place)."""
    model.gradient_checkpointing = not args.no_gradient_checkpointing
    model.to(rt.device)
    if args.compile:
        for block in model.layers:  # per block: one small graph, reused by every layer
            block.compile()
    if not rt.distributed:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if rt.device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def build_optimizer(model, args, rt):
    """AdamW (0.9, 0.95), fused (one kernel for all parameters) on CUDA and CPU; no weight decay on norm
    weights (the 1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), fused=rt.device.type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_paths(directory, prefix):
    """Step checkpoints `<prefix>_<step>.pt` in the directory, oldest step first."""
    found = []
    for path in glob.glob(os.path.join(directory, f"{prefix}_*.pt")):
        match = re.fullmatch(re.escape(prefix) + r"_(\d+)\.pt", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(directory, prefix):
    """The newest complete checkpoint (saves are atomic, so any file under a final name is complete)."""
    candidates = checkpoint_paths(directory, prefix) + glob.glob(os.path.join(directory, f"{prefix}_final.pt"))
    return max(candidates, key=os.path.getmtime) if candidates else None


def check_save_dir(directory, prefix, resuming):
    """Fail early on an unwritable save dir, and never let a new run overwrite an earlier run's checkpoints."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PionError(f"cannot write to save dir {directory}: {e.strerror}")
    if not resuming and find_resume_checkpoint(directory, prefix):
        raise PionError(f"{directory} already holds {prefix} checkpoints from an earlier run; pass --resume auto "
                        f"to continue it, or choose another --save_dir")


def save_training_checkpoint(path, model, optimizer, rt, state, config, args):
    """Every rank takes part (FSDP gathers shards); rank 0 writes the file atomically."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rt.is_main:
        pion.save_checkpoint(path, {"model": model_state, "optimizer": optimizer_state, "config": config,
                                    "rng": rng_state(), "args": vars(args), **state})
        rt.print(f"saved {path}")
    if rt.distributed:
        dist.barrier()


def restore_optimizer_and_rng(path, checkpoint, model, optimizer):
    """Resume: the optimizer's moments (into the wrapped model's, possibly sharded, state) and the RNG streams."""
    if "optimizer" in checkpoint:
        try:
            set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        except Exception as e:
            raise PionError(f"cannot restore the optimizer from {path} ({str(e).splitlines()[0]})")
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])


def prune_checkpoints(directory, prefix, keep_last):
    if keep_last:
        for path in checkpoint_paths(directory, prefix)[:-keep_last]:
            os.remove(path)


# ----------------------------------------------------------------------------------------------------
# The loop


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


class MetricsLog:
    """JSON lines, one object per logged step or eval, appended (a resumed run continues the file)."""

    def __init__(self, path, enabled):
        self.path = path if enabled else None

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def peak_flops(device):
    """bf16 dense peak of common GPUs, for MFU; None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("4090", 165), ("A10", 125),
                        ("L4", 121), ("3090", 71)):
        if key in name:
            return tflops * 1e12
    return None


@torch.no_grad()
def evaluate(model, batches, rt, steps):
    """Mean loss per trained token over up to `steps` validation batches on every rank. Ranks stop together
    when any runs out (an FSDP forward is a collective: a rank running one batch more would hang)."""
    was_training = model.training
    model.eval()
    batches = iter(batches)
    loss_sum, tokens = 0.0, 0
    for _ in range(steps):
        batch = next(batches, None)
        if not rt.all_reduce(float(batch is not None), dist.ReduceOp.MIN):
            break
        labels = batch["labels"].to(rt.device)
        count = int((labels[:, 1:] != -100).sum())
        with rt.autocast():
            loss_sum += model(batch["input_ids"].to(rt.device), labels=labels)["loss"].item() * count
        tokens += count
    model.train(was_training)
    return rt.all_reduce(loss_sum) / max(rt.all_reduce(tokens), 1)


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


def run_training(*, args, rt, model, wrapped, optimizer, lr_at, make_batches, make_val_batches, save_dir,
                 prefix, state, sample_fn=None, samples_per_step):
    """The loop pretraining and finetuning share: steps, logging, eval, samples, checkpoints, signals.

    state: {"step", "tokens_seen", "samples_seen"} (restored on resume). make_batches(samples_seen) gives the
    training batch iterator positioned after the samples already seen; make_val_batches() a fresh val pass."""
    metrics = MetricsLog(os.path.join(save_dir, "metrics.jsonl"), rt.is_main)
    stop = StopSignal()
    batches = iter(make_batches(state["samples_seen"]))
    n_params = model.count_parameters()
    flops_per_token = 6 * n_params + 12 * model.config.n_layers * model.config.d_model * args.seq_len
    peak = peak_flops(rt.device)
    bar = tqdm(total=args.max_steps, initial=state["step"], desc=prefix, unit="step", dynamic_ncols=True,
               disable=not rt.is_main)
    wrapped.train()
    bad_steps, last_saved = 0, None
    smooth_loss, t0, tokens_since_log = None, time.perf_counter(), 0

    def save(name):
        nonlocal last_saved
        path = os.path.join(save_dir, f"{prefix}_{name}.pt")
        save_training_checkpoint(path, wrapped, optimizer, rt, state, model.config, args)
        last_saved = state["step"]

    try:
        while state["step"] < args.max_steps:
            lr = lr_at(state["step"])
            loss, grad_norm, tokens = train_step(wrapped, optimizer, batches, rt, args.grad_accum, args.grad_clip, lr)
            if not math.isfinite(loss):
                bad_steps += 1
                rt.print(f"warning: non-finite loss at step {state['step'] + 1}, step skipped "
                         f"({bad_steps} in a row)")
                if bad_steps >= MAX_BAD_STEPS:
                    raise PionError(f"{bad_steps} non-finite losses in a row at step {state['step'] + 1}; "
                                    f"stopping (try a lower --lr); the last good checkpoint is kept")
            else:
                bad_steps = 0
            # The step counts even when skipped: its batches were consumed, and resuming must not replay them.
            state["step"] += 1
            state["tokens_seen"] += tokens
            state["samples_seen"] += samples_per_step
            tokens_since_log += tokens
            step = state["step"]
            if math.isfinite(loss):
                smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
            bar.update(1)

            if step % args.log_interval == 0 or step == args.max_steps:
                tok_per_s = tokens_since_log / (time.perf_counter() - t0)
                t0, tokens_since_log = time.perf_counter(), 0
                record = {"step": step, "loss": loss, "lr": lr, "tokens_seen": state["tokens_seen"],
                          "tokens_per_s": round(tok_per_s, 1), "grad_norm": grad_norm,
                          "memory_gb": round(rt.memory_used() / 1e9, 2)}
                postfix = (f"loss {smooth_loss:.3f} ppl {math.exp(min(smooth_loss, 20)):.1f} lr {lr:.2e} "
                           f"{tok_per_s:,.0f} tok/s {state['tokens_seen'] / 1e6:,.1f}M tok "
                           f"{record['memory_gb']:.1f}GB") if smooth_loss is not None else "loss nan"
                if peak:
                    record["mfu"] = round(flops_per_token * tok_per_s / (peak * rt.world_size), 4)
                    postfix += f" mfu {record['mfu']:.0%}"
                bar.set_postfix_str(postfix)
                metrics.write(**record)

            if step % args.eval_interval == 0 or step == args.max_steps:
                val_loss = evaluate(wrapped, make_val_batches(), rt, args.eval_steps)
                rt.print(f"step {step}: val loss {val_loss:.4f}, ppl {math.exp(min(val_loss, 20)):.2f}")
                metrics.write(step=step, val_loss=val_loss, tokens_seen=state["tokens_seen"])
                if sample_fn is not None:
                    text = sample_fn(model)  # unwrapped (FSDP2 shards in place, so all ranks call it)
                    rt.print(f"sample: {text!r}")

            if step % args.save_interval == 0 and step < args.max_steps:
                save(str(step))
                if rt.is_main:
                    prune_checkpoints(save_dir, prefix, args.keep_last)

            if rt.all_reduce(float(stop.received is not None), dist.ReduceOp.MAX):
                rt.print(f"{stop.received or 'signal'} received: saving step {step} and exiting")
                if last_saved != step:
                    save(str(step))
                return False
        save("final")
        return True
    finally:
        bar.close()
        stop.restore()


# ----------------------------------------------------------------------------------------------------
# Pretraining


def memory_test(args, rt):
    """One forward/backward at the requested size and batch; exit 0 when it fits the device."""
    model = pion.get_model(args.model_size, use_soft_cap=not args.no_soft_cap,
                           **{"max_seq_len": max(args.seq_len, 2048), **config_overrides(args.override)})
    wrapped = prepare_model(model, args, rt)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=rt.device)
    try:
        with rt.autocast():
            loss = wrapped(ids, labels=ids)["loss"]
        loss.backward()
    except torch.OutOfMemoryError:
        rt.print(f"memory test: out of memory at batch {args.batch_size} x seq {args.seq_len}")
        return False
    used, total = rt.memory_used(), rt.memory_total()
    rt.print(f"memory test: Pion-{args.model_size}, batch {args.batch_size} x seq {args.seq_len}, "
             f"checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, soft-cap "
             f"{'off' if args.no_soft_cap else 'on'}: peak {used / 1e9:.2f} GB of {total / 1e9:.1f} GB "
             f"({used / total:.0%}) on {rt.device.type}")
    return used < total


def make_sample_fn(args, rt, vocab_size):
    """A short greedy continuation of a fixed prompt, printed at each eval. Greedy and seedless, so it
    draws nothing from the RNG that a resumed run must reproduce."""
    from generate import generate
    tokenizer = pion.load_tokenizer(args.tokenizer)
    prompt = tokenizer.encode(args.sample_prompt).ids
    if tokenizer.get_vocab_size() > vocab_size:  # a toy vocabulary (e.g. --override vocab_size=512)
        rt.print(f"no samples: the tokenizer's {tokenizer.get_vocab_size()} ids exceed vocab_size {vocab_size}")
        return None

    def sample(model):
        ids = generate(model, [prompt], max_new_tokens=args.sample_tokens, temperature=0.0)[0]
        return args.sample_prompt + tokenizer.decode(ids)

    return sample


def main(argv=None):
    args = parse_args(argv)
    rt = Runtime(args.device)
    try:
        if args.memory_test:
            if not memory_test(args, rt):
                sys.exit(1)
            return
        pretrain(args, rt)
    finally:
        rt.close()


def pretrain(args, rt):
    import data

    save_dir = os.path.join(args.save_dir, args.model_size)
    prefix = f"pion_{args.model_size}"
    resume = find_resume_checkpoint(save_dir, prefix) if args.resume == "auto" else args.resume
    check_save_dir(save_dir, prefix, resuming=resume is not None or args.resume == "auto")

    seed_everything(args.seed)
    samples_per_step = args.batch_size * args.grad_accum * rt.world_size
    state = {"step": 0, "tokens_seen": 0, "samples_seen": 0}
    if resume:
        model, checkpoint = pion.load_checkpoint(resume)
        if model.config.use_soft_cap == args.no_soft_cap:
            raise PionError(f"{resume} was trained with use_soft_cap={model.config.use_soft_cap}; "
                            f"{'drop' if args.no_soft_cap else 'pass'} --no_soft_cap to resume it")
        step = checkpoint.get("step", 0)
        # Checkpoints from before data positions were saved: assume this run's batch layout.
        state = {"step": step, "tokens_seen": checkpoint.get("tokens_seen", 0),
                 "samples_seen": checkpoint.get("samples_seen", step * samples_per_step)}
        rt.print(f"resuming from {resume} at step {state['step']}")
    else:
        model = pion.get_model(args.model_size, use_soft_cap=not args.no_soft_cap, **config_overrides(args.override))
    if args.seq_len > model.config.max_seq_len:
        raise PionError(f"--seq_len {args.seq_len} is larger than the model's max_seq_len {model.config.max_seq_len}")

    train_data = data.PretrainData(args.data_dir, args.seq_len, "train")
    loader_args = dict(batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=model.config.vocab_size,
                       rank=rt.rank, world_size=rt.world_size, pin_memory=rt.device.type == "cuda")

    wrapped = prepare_model(model, args, rt)
    optimizer = build_optimizer(wrapped, args, rt)
    if resume:
        restore_optimizer_and_rng(resume, checkpoint, wrapped, optimizer)
        del checkpoint

    rt.print(f"Pion-{args.model_size}: {model.count_parameters():,} parameters on {rt.device} x {rt.world_size}, "
             f"{samples_per_step * args.seq_len:,} tokens/step, {train_data.n_samples:,} train samples/epoch")
    rt.print(f"WSD schedule: warmup {args.warmup_steps}, constant until step "
             f"{args.max_steps - int(args.decay_frac * args.max_steps)}, decay to {args.min_lr:g} at {args.max_steps}")
    finished = run_training(
        args=args, rt=rt, model=model, wrapped=wrapped, optimizer=optimizer,
        lr_at=lambda step: wsd_lr(step, args.lr, args.min_lr, args.warmup_steps, args.max_steps, args.decay_frac),
        make_batches=lambda start: data.create_dataloader(args.data_dir, "train", seed=args.seed, start_sample=start,
                                                          num_workers=args.num_workers, **loader_args),
        make_val_batches=lambda: data.create_dataloader(args.data_dir, "val", num_workers=0, **loader_args),
        save_dir=save_dir, prefix=prefix, state=state, sample_fn=make_sample_fn(args, rt, model.config.vocab_size),
        samples_per_step=samples_per_step)
    if finished:
        rt.print(f"done: {state['tokens_seen']:,} tokens in {state['step']} steps")


if __name__ == "__main__":
    pion.run_cli(main)
