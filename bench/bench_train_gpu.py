"""Pion's training step on one CUDA GPU against transformers' compiled Qwen3ForCausalLM of the same shape.

Both sides: bf16 autocast, fp32 weights, the same fused AdamW (trainer.build_optimizer's decay groups),
gradient clipping, no gradient checkpointing, batch 16 x 2048, SDPA attention. Pion runs trainer.train_step
with train.py --compile's per-block compilation; transformers runs model.compile(). 3 warm-up steps, then
10 timed. Rows: tokens/s, MFU (6 x weights + attention FLOPs per token over the GPU's dense bf16 peak), peak
memory; then Pion over transformers. Targets: Pion >= 1.3x transformers for small and base, base MFU >= 40%
(SDPA) and >= 36% (soft-capped), peak memory <= 0.7x transformers'.

Sections (--part, repeatable; default train):
  train    the side-by-side above, plus Pion's step with --optimizer muon (its time over the AdamW step's:
           target <= 1.05x), its soft-capped step and train.py's defaults (checkpointing on)
  ce       the loss alone, forward + backward of small's hidden states: Pion's compiled chunks, its CPU-tuned
           chunks, transformers-style whole-vocabulary logits (compiled), Liger-Kernel's fused linear
           cross-entropy and cut-cross-entropy when installed; time and error against an fp32 reference
  profile  a torch.profiler table (self CUDA time) of 3 compiled steps of Pion-small

    python bench/bench_train_gpu.py [--part train --part ce --part profile] [--sizes small base]
    python bench/bench_train_gpu.py --dry_run --part train --part ce --part profile   # tiny, on the CPU
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hardware  # noqa: E402
from loss import chunked_cross_entropy  # noqa: E402
import model as pion  # noqa: E402
import process  # noqa: E402
import train_config  # noqa: E402
import trainer  # noqa: E402
from transformers_format import qwen3_config  # noqa: E402

TINY = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
TARGET_SPEEDUP, TARGET_MFU, TARGET_MFU_SOFTCAP, TARGET_MEMORY, TARGET_MUON = 1.3, 0.40, 0.36, 0.7, 1.05


class Bench:
    """The device and the shapes of this run: the real ones on CUDA, tiny fp32 ones with --dry_run."""

    def __init__(self, dry_run):
        self.dry_run = dry_run
        if not dry_run and not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on a GPU, or pass --dry_run on a CPU")
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.batch, self.seq, self.steps = (2, 64, 2) if dry_run else (16, 2048, 10)
        self.peak = hardware.matmul_peak_flops() if dry_run else hardware.gpu_peak_flops(self.device)

    def config(self, size, **overrides):
        return pion.get_config(size, **{**(TINY if self.dry_run else {}), **overrides})

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def fresh(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gb(self):
        return torch.cuda.max_memory_allocated() / 1e9 if self.device.type == "cuda" else float("nan")


def step_settings(bench, checkpointing=False, optimizer="adamw"):
    return train_config.TrainConfig(max_steps=1, lr=3e-4, min_lr=0.0, warmup_steps=0, batch_size=bench.batch,
                                    seq_len=bench.seq, compile=True, gradient_checkpointing=checkpointing,
                                    optimizer=optimizer)


def pion_step(bench, config, checkpointing=False, optimizer="adamw"):
    """One trainer.train_step of Pion with train.py --compile's setup; returns the loss."""
    rt = process.Runtime(str(bench.device))
    settings = step_settings(bench, checkpointing, optimizer)
    model = process.prepare_model(pion.Pion(config), settings, rt)
    optimizers = trainer.build_optimizer(model, settings, rt)
    ids = torch.randint(0, config.vocab_size, (bench.batch, bench.seq))
    batches = itertools.repeat({"input_ids": ids, "labels": ids})
    return lambda: trainer.train_step(model, optimizers, batches, rt, 1, 1.0, 1.0)[0]


def transformers_step(bench, config):
    """The same step for transformers' Qwen3 of Pion's shape (no soft-cap: Qwen3 has none), model.compile()."""
    from transformers import Qwen3ForCausalLM
    qwen = qwen3_config(config)
    qwen._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(qwen).to(bench.device)
    rt = process.Runtime(str(bench.device))
    [optimizer] = trainer.build_optimizer(model, step_settings(bench), rt)  # Pion's AdamW
    model.compile()
    ids = torch.randint(0, config.vocab_size, (bench.batch, bench.seq), device=bench.device)

    def step():
        with rt.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def time_steps(bench, name, config, build):
    """Warm up (compiling) and time bench.steps steps; prints and returns the row."""
    bench.fresh()
    start = time.perf_counter()
    step = build()
    for _ in range(3):
        loss = step()
    bench.sync()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(bench.steps):
        loss = step()
    bench.sync()
    tok_s = bench.batch * bench.seq * bench.steps / (time.perf_counter() - start)
    with torch.device("meta"):
        flops = hardware.training_flops_per_token(pion.Pion(config), bench.seq)
    row = dict(name=name, tok_s=round(tok_s), mfu=round(flops * tok_s / bench.peak, 4),
               peak_gb=round(bench.peak_memory_gb(), 2), loss=round(loss, 3), warmup_s=round(warmup, 1))
    print(json.dumps(row), flush=True)
    return row


def part_train(bench, sizes):
    rows = {}
    for size in sizes:
        sdpa = bench.config(size, use_soft_cap=False)
        rows[size, "pion"] = time_steps(bench, f"pion {size} sdpa", sdpa, lambda: pion_step(bench, sdpa))
        rows[size, "hf"] = time_steps(bench, f"transformers {size} sdpa", sdpa, lambda: transformers_step(bench, sdpa))
        rows[size, "muon"] = time_steps(bench, f"pion {size} sdpa, muon", sdpa,
                                        lambda: pion_step(bench, sdpa, optimizer="muon"))
        if size == sizes[-1]:
            capped = bench.config(size)
            rows[size, "softcap"] = time_steps(bench, f"pion {size} soft-cap", capped, lambda: pion_step(bench, capped))
    small = bench.config(sizes[0])
    default = time_steps(bench, f"pion {sizes[0]} soft-cap, checkpointing on (train.py's default)", small,
                         lambda: pion_step(bench, small, checkpointing=True))
    print(f"\n{'':34} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8}")
    for (size, kind), row in rows.items():
        print(f"{row['name']:34} {row['tok_s']:>10,} {row['mfu']:>6.1%} {row['peak_gb']:>8.2f}")
    print(f"{'(train.py defaults, ' + sizes[0] + ')':34} {default['tok_s']:>10,} {default['mfu']:>6.1%} "
          f"{default['peak_gb']:>8.2f}")
    print()
    for size in sizes:
        p, h = rows[size, "pion"], rows[size, "hf"]
        speed, memory = p["tok_s"] / h["tok_s"], p["peak_gb"] / h["peak_gb"]
        print(f"{size}: Pion {speed:.2f}x transformers' tokens/s (target >= {TARGET_SPEEDUP}), "
              f"peak memory {memory:.2f}x (target <= {TARGET_MEMORY}), MFU {p['mfu']:.1%}; Muon's step "
              f"{p['tok_s'] / rows[size, 'muon']['tok_s']:.3f}x AdamW's time (target <= {TARGET_MUON})")
    last = sizes[-1]
    print(f"{last}: MFU {rows[last, 'pion']['mfu']:.1%} SDPA (target >= {TARGET_MFU:.0%}), "
          f"{rows[last, 'softcap']['mfu']:.1%} soft-capped (target >= {TARGET_MFU_SOFTCAP:.0%}); "
          f"soft-cap step time {rows[last, 'pion']['tok_s'] / rows[last, 'softcap']['tok_s']:.2f}x SDPA's")


# ----------------------------------------------------------------------------------------------------
# The loss alone


def loss_variants(bench):
    """name -> fn(hidden, weight, labels) returning the mean loss, differentiable in hidden and weight."""
    import torch.nn.functional as F

    def whole_vocabulary(h, w, y):
        return F.cross_entropy((h.to(torch.bfloat16) @ w.to(torch.bfloat16).T).float(), y)

    variants = {
        "pion compiled chunks 4096": lambda h, w, y: chunked_cross_entropy(h, w, y, 4096, fused=True),
        "pion compiled chunks 8192": lambda h, w, y: chunked_cross_entropy(h, w, y, 8192, fused=True),
        "pion CPU-tuned chunks": lambda h, w, y: chunked_cross_entropy(h, w, y, 512, fused=False),
        "whole vocabulary, compiled": torch.compile(whole_vocabulary),
    }
    if bench.device.type == "cuda":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            variants["liger-kernel fused linear CE"] = lambda h, w, y: liger(w.to(torch.bfloat16), h.to(torch.bfloat16), y)
        except ImportError as e:
            print(f"liger-kernel not measured: {e}")
        try:
            from cut_cross_entropy import linear_cross_entropy
            variants["cut-cross-entropy"] = lambda h, w, y: linear_cross_entropy(h.to(torch.bfloat16), w.to(torch.bfloat16), y)
        except ImportError as e:
            print(f"cut-cross-entropy not measured: {e}")
    return variants


def part_ce(bench):
    config = bench.config("small")
    n = bench.batch * (bench.seq - 1)
    torch.manual_seed(0)
    hidden = torch.randn(n, config.d_model, device=bench.device)
    weight = (torch.randn(config.vocab_size, config.d_model, device=bench.device) * 0.02)
    labels = torch.randint(0, config.vocab_size, (n,), device=bench.device)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(h64 @ w64.T, labels)
    reference.backward()
    print(f"\nloss of {n} tokens x d {config.d_model} x vocab {config.vocab_size}, forward + backward, "
          f"bf16 products under autocast; error against an fp64 reference")
    for name, fn in loss_variants(bench).items():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def run():
            h.grad = w.grad = None
            with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.device.type == "cuda"):
                loss = fn(h, w, labels)
            loss.backward()
            return loss
        try:
            for _ in range(3):
                loss = run()
            bench.sync()
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(bench.steps):
                loss = run()
            bench.sync()
            ms = (time.perf_counter() - start) / bench.steps * 1e3
            extra = (torch.cuda.max_memory_allocated() - base) / 1e9 if bench.device.type == "cuda" else float("nan")
            grad_error = max(((g.double() - r).norm() / r.norm()).item() for g, r in ((h.grad, h64.grad), (w.grad, w64.grad)))
            print(json.dumps(dict(name=name, ms=round(ms, 2), extra_gb=round(extra, 2),
                                  loss_error=float(f"{abs(loss.item() - reference.item()):.2e}"),
                                  grad_rel_error=float(f"{grad_error:.2e}"))), flush=True)
        except Exception as e:  # a library that fails here is a row, not the end of the run
            print(json.dumps(dict(name=name, error=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)


def part_profile(bench):
    from torch.profiler import ProfilerActivity, profile
    config = bench.config("small", use_soft_cap=False)
    bench.fresh()
    step = pion_step(bench, config)
    for _ in range(4):
        step()
    bench.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        bench.sync()
    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    print(f"\n===== pion small sdpa compiled, batch {bench.batch} x {bench.seq}, 3 steps")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", help="tiny fp32 models on the CPU: the benchmark's own logic")
    p.add_argument("--part", action="append", choices=["train", "ce", "profile"], help="default: train")
    p.add_argument("--sizes", nargs="+", default=["small", "base"], help="model sizes of the side-by-side")
    args = p.parse_args(argv)
    bench = Bench(args.dry_run)
    name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}, peak {bench.peak / 1e12:,.0f} TFLOPS", flush=True)
    for part in args.part or ["train"]:
        {"train": lambda: part_train(bench, args.sizes), "ce": lambda: part_ce(bench),
         "profile": lambda: part_profile(bench)}[part]()


if __name__ == "__main__":
    main()
