"""The checks of bench/gpu_check.py, one function each, shared with the `cuda` tests of tests/test_gpu.py.

Each check runs on a Target: a CUDA GPU at the real model sizes in bf16, or (dry run) a tiny fp32 model on
the CPU, which runs the same code with the CUDA-only parts (FlexAttention, CUDA graphs) left out. A check
yields rows of the table, (check, what was measured, passed), each as soon as it is measured: a run cut
short (a rented GPU's time running out) still shows what it got through.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import model as pion
import process
import train_config
import trainer
from decoding import generate
from hardware import decode_bytes_per_step, training_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dry run's model: every code path of the real ones at a size a CPU trains in milliseconds.
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)


@dataclass
class Target:
    """Where the checks run. peak_flops (FLOP/s) and bandwidth (bytes/s) are the denominators of MFU and
    MBU; None prints n/a."""
    device: torch.device
    dry_run: bool = False
    peak_flops: Optional[float] = None
    bandwidth: Optional[float] = None
    tokenizer: Optional[str] = None  # the Pion tokenizer's path, for the FSDP sample and the export

    @property
    def sizes(self):
        return ["tiny"] if self.dry_run else ["nano", "small", "base"]

    @property
    def batch_size(self):
        return 2 if self.dry_run else 8

    @property
    def seq_len(self):
        return 32 if self.dry_run else 2048

    @property
    def timed_steps(self):
        return 2 if self.dry_run else 10


def new_model(size, **overrides):
    """A seeded Pion of a named size; "tiny" is the dry run's (TINY)."""
    torch.manual_seed(0)
    if size == "tiny":
        return pion.get_model("nano", **{**TINY, **overrides})
    return pion.get_model(size, **overrides)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_settings(target, **fields):
    return train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0.0, warmup_steps=0, batch_size=target.batch_size,
                               seq_len=target.seq_len, **fields)


# ----------------------------------------------------------------------------------------------------
# Training


def fixed_batch_trainer(target, model, config, ids, autocast=None):
    """The model prepared as train.py prepares it (device, checkpointing, compile, fused AdamW), training on
    the one batch `ids` -> (process, step): step(lr) is one trainer.train_step at learning rate lr (config.lr
    its peak) -> (loss, grad norm, tokens).
    autocast: a context factory replacing the process's (e.g. bf16 autocast on the CPU)."""
    rt = process.Runtime(str(target.device))
    if autocast is not None:
        rt.autocast = autocast
    wrapped = process.prepare_model(model, config, rt)
    optimizers = trainer.build_optimizer(wrapped, config, rt)
    batches = itertools.repeat({"input_ids": ids, "labels": ids})
    return rt, lambda lr: trainer.train_step(wrapped, optimizers, batches, rt, 1, config.grad_clip, lr / config.lr)


def train_speed(target, size, soft_cap, compile, checkpointing):
    """Timed trainer.train_step's (bf16 autocast on CUDA) of one size and variant: tokens/s, MFU and peak
    memory. The first steps are warm-up (compilation, allocator, optimizer state)."""
    torch._dynamo.reset()  # each variant compiles afresh, so none runs into another's recompile limit
    model = new_model(size, use_soft_cap=soft_cap)
    config = check_settings(target, compile=compile, gradient_checkpointing=checkpointing)
    ids = torch.randint(0, model.config.vocab_size, (config.batch_size, config.seq_len))
    rt, step = fixed_batch_trainer(target, model, config, ids)
    if target.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(target.device)
    for _ in range(2):
        step(config.lr)
    synchronize(target.device)
    start = time.perf_counter()
    for _ in range(target.timed_steps):
        loss, _, _ = step(config.lr)
    synchronize(target.device)
    tokens_per_s = ids.numel() * target.timed_steps / (time.perf_counter() - start)
    flops = training_flops_per_token(model, config.seq_len) * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "mfu": flops / target.peak_flops if target.peak_flops else None,
            "peak_gb": rt.memory_used() / 1e9, "loss": loss}


def check_training_speed(target):
    """{eager, compiled} x every size x {SDPA, soft-cap} x {checkpointing on, off}: the eager rows (seconds
    each) before the compiled ones (a compile each). The dry run leaves out compiling the soft-capped step: on
    CUDA that is FlexAttention, which a CPU does not compile."""
    for compile, size, soft_cap, checkpointing in itertools.product((False, True), target.sizes, (False, True),
                                                                    (True, False)):
        name = (f"train {size} {'soft-cap' if soft_cap else 'SDPA'} {'compiled' if compile else 'eager'} "
                f"ckpt {'on' if checkpointing else 'off'}")
        if target.dry_run and soft_cap and compile:
            yield name, "skipped (dry run: no FlexAttention compile)", True
            continue
        try:
            r = train_speed(target, size, soft_cap, compile, checkpointing)
        except Exception as e:  # one failed variant (out of memory, a compile error) is one failed row
            yield name, f"{type(e).__name__}: {' '.join(str(e).split())[:150]}", False
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        yield name, (f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak {r['peak_gb']:.2f} GB, loss "
                     f"{r['loss']:.2f}"), np.isfinite(r["loss"])


def repeated_batch(vocab_size, batch_size, seq_len, period=64):
    """Rows of one repeating run of `period` tokens (each row starts elsewhere in it): learnable in a few
    dozen steps, so a training step that does not learn shows as a loss that does not fall."""
    positions = torch.arange(seq_len)[None] + torch.arange(batch_size)[:, None] * 7
    return 3 + positions % min(period, vocab_size - 3)


def training_losses(target, size, steps=50, lr=3e-3, autocast=None):
    """Losses of `steps` trainer.train_step's on one repeated batch (autocast: as fixed_batch_trainer's)."""
    model = new_model(size)
    config = check_settings(target, gradient_checkpointing=True)
    ids = repeated_batch(model.config.vocab_size, config.batch_size, config.seq_len)
    _, step = fixed_batch_trainer(target, model, config, ids, autocast)
    return [step(lr)[0] for _ in range(steps)]


def check_loss_falls(target, steps=50):
    size = target.sizes[0]
    losses = training_losses(target, size, steps)
    falls = all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    yield f"loss falls: {size}, {steps} steps, repeated batch", f"{losses[0]:.3f} -> {losses[-1]:.3f}", falls


# ----------------------------------------------------------------------------------------------------
# Scripts run as their own processes: train.py --memory_test, torchrun FSDP2


def model_flags(target, size, real_vocab=False):
    """train.py flags for a size; the dry run's tiny model (with the real vocabulary for a text sample)."""
    if not target.dry_run:
        return ["--model_size", size]
    tiny = {**TINY, "vocab_size": 50258} if real_vocab else TINY
    return ["--model_size", "nano"] + [arg for k, v in tiny.items() for arg in ("--override", f"{k}={v}")]


def run_train(args, nproc=None, timeout=600):
    """train.py in a fresh process (its own peak memory), under torchrun with nproc processes if given."""
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def last_line(result):
    """What a failed script run says: its last error line (torchrun ends with a banner that names none)."""
    lines = (result.stdout + result.stderr).strip().splitlines()
    errors = [line for line in lines if re.search(r"(Error|Exception|error):", line) and "ChildFailed" not in line]
    return (errors or lines or [f"exit code {result.returncode}"])[-1]


def check_memory_test(target):
    """train.py --memory_test of the largest size, xl (tiny in the dry run): a run's first two steps and their
    saves at batch 8 x 2048."""
    size = "tiny" if target.dry_run else "xl"
    tokenizer = ["--tokenizer", target.tokenizer] if target.tokenizer else []
    result = run_train([*model_flags(target, size), "--memory_test", "--device", target.device.type,
                        "--batch_size", target.batch_size, "--seq_len", target.seq_len, *tokenizer])
    found = re.search(r"peak [\d.]+ GB of [\d.]+ GB \(\d+%\)", result.stdout + result.stderr)
    yield (f"memory test: {size}, batch {target.batch_size} x {target.seq_len}",
           found.group(0) if found else last_line(result), result.returncode == 0 and found is not None)


def write_shards(folder, vocab_size, width, rows=48, count=3):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        np.save(os.path.join(folder, f"shard_{i:05d}.npy"), rng.integers(3, vocab_size, (rows, width), dtype=np.uint16))


def fsdp_sample_run(target, nproc=1, param_dtype="bfloat16", steps=4):
    """torchrun train.py --fsdp with the given compute dtype, through an eval and its text sample every 2
    steps. Returns (passed, the samples, the CompletedProcess)."""
    with tempfile.TemporaryDirectory() as work:
        seq_len = target.seq_len if target.dry_run else 256
        write_shards(os.path.join(work, "data"), 50258, 2 * seq_len)
        args = [*model_flags(target, "nano", real_vocab=True), "--fsdp", "--fsdp_param_dtype", param_dtype,
                "--device", target.device.type, "--data_dir", os.path.join(work, "data"),
                "--save_dir", os.path.join(work, "ck"), "--max_steps", steps, "--eval_interval", 2, "--eval_steps", 1,
                "--save_interval", steps, "--log_interval", 1, "--num_workers", 0, "--warmup_steps", 1,
                "--batch_size", 2, "--seq_len", seq_len, "--sample_tokens", 8,
                "--sample_prompt", "The meaning of life is"]
        if target.tokenizer:
            args += ["--tokenizer", target.tokenizer]
        result = run_train(args, nproc=nproc)
    samples = re.findall(r"^sample: .*$", result.stdout + result.stderr, re.MULTILINE)
    return result.returncode == 0 and len(samples) == steps // 2, samples, result


def check_fsdp(target):
    passed, samples, result = fsdp_sample_run(target)
    detail = f"{len(samples)} eval samples, e.g. {samples[0][8:48]}" if passed else last_line(result)
    yield "torchrun FSDP2, bf16 policy, 1 process, eval sample", detail, passed


# ----------------------------------------------------------------------------------------------------
# Decoding and export


def decode_tokens(model, prompt, new_tokens, compile):
    return generate(model, prompt, new_tokens, stop_ids=(), compile=compile)[0]


def decode_rate(model, prompt, new_tokens, compile, runs=3):
    """Decode tokens/s without the prefill: (n - 1) / (best time of n tokens - best time of 1), or None
    when the difference is lost in noise."""
    def best(n):
        times = []
        for _ in range(runs):
            synchronize(model.embed.weight.device)
            start = time.perf_counter()
            decode_tokens(model, prompt, n, compile)
            synchronize(model.embed.weight.device)
            times.append(time.perf_counter() - start)
        return min(times)
    decode_tokens(model, prompt, new_tokens, compile)  # warm-up: compilation, CUDA graph capture
    seconds = best(new_tokens) - best(1)
    return (new_tokens - 1) / seconds if seconds > 0 else None  # None: lost in a busy machine's noise


def greedy_compiled_equals_eager(model, prompt, new_tokens):
    """Greedy tokens of compiled and eager decoding; TF32 off, so both multiply in full fp32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return decode_tokens(model, prompt, new_tokens, True), decode_tokens(model, prompt, new_tokens, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def check_decoding(target, new_tokens=None):
    """Greedy compiled = eager (fp32), then compiled batch-1 decoding in bf16 (fp32 on the CPU): tokens/s and
    MBU, and on CUDA that reduce-overhead captured CUDA graphs (no cudagraph skips)."""
    from torch._dynamo.utils import counters
    size = "tiny" if target.dry_run else "small"
    new_tokens = new_tokens or (48 if target.dry_run else 128)
    model = new_model(size).to(target.device).eval()
    prompt = torch.randint(3, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    compiled, eager = greedy_compiled_equals_eager(model, prompt, new_tokens)
    yield (f"decode {size}: greedy compiled = eager (fp32, {new_tokens} tokens)",
           "identical" if compiled == eager else f"differ from token {next_difference(compiled, eager)}",
           compiled == eager)
    if target.device.type == "cuda":
        model = model.to(torch.bfloat16)
    counters["inductor"]["cudagraph_skips"] = 0
    rate = decode_rate(model, prompt, new_tokens, compile=True)
    bytes_per_step = decode_bytes_per_step(model, 1, len(prompt) + new_tokens)
    mbu = f"{bytes_per_step * rate / target.bandwidth:.1%}" if target.bandwidth and rate else "n/a"
    skips = counters["inductor"]["cudagraph_skips"]
    graphs = f", cudagraph skips {skips}" if target.device.type == "cuda" else ""
    speed = f"{rate:,.1f} tok/s" if rate else "too noisy to time"
    yield (f"decode {size}: compiled, batch 1, {str(next(model.parameters()).dtype)[6:]}",
           f"{speed}, MBU {mbu} ({bytes_per_step / 1e6:,.0f} MB a step){graphs}", skips == 0)


def next_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def export_logit_difference(model, tokenizer, folder):
    """transformers_format's folder of a soft-cap-free Pion, loaded by transformers: the largest |logit difference|."""
    import transformers
    from transformers_format import write_folder
    transformers.utils.logging.disable_progress_bar()  # one table, no loading bars
    write_folder(model, tokenizer, folder, torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(input_ids=ids).logits - model(ids)["logits"]).abs().max().item()


def check_export(target):
    from tokenizer import load_tokenizer
    size = target.sizes[0]
    model = new_model(size, use_soft_cap=False).eval()
    with tempfile.TemporaryDirectory() as folder:
        difference = export_logit_difference(model, load_tokenizer(target.tokenizer), os.path.join(folder, "hf"))
    yield (f"export round trip: {size} -> transformers", f"max |logit difference| {difference:.1e}",
           difference < 1e-4)


# The quick checks first and the long training matrix (a compile per variant) last.
CHECKS = [check_loss_falls, check_export, check_memory_test, check_fsdp, check_decoding, check_training_speed]
