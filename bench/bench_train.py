"""Training throughput and memory on CPU: Pion's train step against transformers' Qwen3ForCausalLM of the
identical shape, eager and compiled, plus the data loader's throughput against what the step consumes.

fp32, nano shape (hidden 384, 6 layers, 6:2 heads, head_dim 64, intermediate 1024, vocab 50258, tied
embeddings), seq_len 256, batch 8, soft-capping off, no gradient checkpointing, SDPA on both sides, and the
same optimizer: trainer.build_optimizer's fused AdamW, decay on the matrices, none on the 1-D norm weights.
Compiled means what each side's users do: Pion as `train.py --compile` (each block compiled), transformers
as its docs describe (torch.compile of the whole model, loss included). Speed is compared eager vs eager
and compiled vs compiled. Each side runs in a fresh process so its peak RSS is its own (compared eager).

A separate process measures the machine's fp32 matmul peak (a 2048 x 2048 product, best of 5, before and
after), and each step is printed as a fraction of it: model FLOPs per token (hardware.training_flops_per_token,
the same shape on both sides) x tokens/s / that peak. This fraction, unlike tokens/s, means the same on
another machine.
Targets: Pion >= 1.2x transformers' tokens/s (both pairs) and <= 0.7x its peak RSS; loader >= 20x the
step's tokens/s; Pion's compiled step >= 0.85 of the measured matmul peak.
    python bench/bench_train.py [--steps 6]
"""
import argparse
import sys
import tempfile
import time

from common import machine, peak_rss_mb, report, run_variant

SEQ_LEN, BATCH = 256, 8
TARGET_SPEED, TARGET_MEMORY, TARGET_LOADER, TARGET_OF_PEAK = 1.2, 0.7, 20.0, 0.85


def train_config(steps):
    import trainer
    return trainer.TrainConfig(max_steps=steps, lr=3e-4, min_lr=3e-5, warmup_steps=0, weight_decay=0.1)


def step_timer(step, steps):
    step()  # warm-up: first-touch allocations, optimizer state, compilation
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * SEQ_LEN * steps / (time.perf_counter() - start)


def pion_variant(steps, compiled):
    import dataclasses
    import torch
    import model
    import trainer

    torch.manual_seed(0)
    rt = trainer.Runtime("cpu")
    config = dataclasses.replace(train_config(steps), compile=compiled, gradient_checkpointing=False)
    m = trainer.prepare_model(model.get_model("nano", use_soft_cap=False), config, rt)
    optimizer = trainer.build_optimizer(m, config, rt)
    ids = torch.randint(0, m.config.vocab_size, (BATCH, SEQ_LEN))
    batches = iter(lambda: {"input_ids": ids, "labels": ids}, None)
    tokens_per_s = step_timer(lambda: trainer.train_step(m, optimizer, batches, rt, 1, 1.0, 3e-4), steps)
    report({"tokens_per_s": tokens_per_s, "peak_mb": peak_rss_mb()})


def hf_variant(steps, compiled):
    import torch
    from transformers import Qwen3ForCausalLM
    import model
    import trainer
    from hf_export import qwen3_config

    torch.manual_seed(0)
    config = qwen3_config(model.get_config("nano", use_soft_cap=False))
    config._attn_implementation = "sdpa"
    m = Qwen3ForCausalLM(config)
    optimizer = trainer.build_optimizer(m, train_config(steps), trainer.Runtime("cpu"))  # Pion's, groups and all
    if compiled:
        m.compile()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))

    def step():
        m(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report({"tokens_per_s": step_timer(step, steps), "peak_mb": peak_rss_mb()})


def loader_variant(steps, compiled):
    import numpy as np
    import data

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in range(4):  # the published format: rows of 2048 uint16 token ids
            np.save(f"{folder}/shard_{i:05d}.npy", rng.integers(0, 50000, (512, 2048), dtype=np.uint16))
        loader = iter(data.create_dataloader(folder, "train", BATCH, SEQ_LEN, vocab_size=50258, num_workers=0))
        next(loader)
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            next(loader)
        report({"tokens_per_s": BATCH * SEQ_LEN * n / (time.perf_counter() - start)})


def matmul_variant(steps, compiled):
    import hardware
    report({"flops": hardware.matmul_peak_flops()})


def flops_per_token():
    import torch
    import hardware
    import model
    with torch.device("meta"):
        return hardware.training_flops_per_token(model.get_model("nano", use_soft_cap=False), SEQ_LEN)


def main(steps):
    import os
    load_before = os.getloadavg()[0]
    peak = run_variant(__file__, "matmul", steps, 0)["flops"]
    steps_of = {(side, compiled): run_variant(__file__, side, steps, int(compiled))
                for compiled in (False, True) for side in ("pion", "hf")}
    peak = max(peak, run_variant(__file__, "matmul", steps, 0)["flops"])  # before and after: the best counts
    loader = run_variant(__file__, "loader", steps, 0)
    flops = flops_per_token()
    speed = {c: steps_of["pion", c]["tokens_per_s"] / steps_of["hf", c]["tokens_per_s"] for c in (False, True)}
    memory = steps_of["pion", False]["peak_mb"] / steps_of["hf", False]["peak_mb"]
    feed = loader["tokens_per_s"] / steps_of["pion", False]["tokens_per_s"]
    of_peak = {key: r["tokens_per_s"] * flops / peak for key, r in steps_of.items()}
    print(f"training step, nano shape, batch {BATCH} x seq {SEQ_LEN}, fp32 CPU, fused AdamW on both sides "
          f"({steps} steps after 2 warm-up steps)")
    print(f"machine: {machine()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this "
          f"benchmark included): a shared machine makes every figure noisy")
    print(f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3, best of 5, before and after); "
          f"{flops / 1e6:.1f} MFLOPs per trained token")
    names = {"hf": "transformers Qwen3", "pion": "Pion"}
    for compiled in (False, True):
        for side in ("hf", "pion"):
            r = steps_of[side, compiled]
            print(f"  {names[side] + (' compiled' if compiled else ''):28s} {r['tokens_per_s']:6.0f} tokens/s   "
                  f"peak RSS {r['peak_mb']:6.0f} MB   {of_peak[side, compiled]:.2f} of the matmul peak")
    print(f"  data loader:                 {loader['tokens_per_s']:8.0f} tokens/s")
    checks = [(f"speed, eager vs eager        {speed[False]:.2f}x", speed[False] >= TARGET_SPEED, f">= {TARGET_SPEED}x"),
              (f"speed, compiled vs compiled  {speed[True]:.2f}x", speed[True] >= TARGET_SPEED, f">= {TARGET_SPEED}x"),
              (f"peak RSS, eager              {memory:.2f}x", memory <= TARGET_MEMORY, f"<= {TARGET_MEMORY}x"),
              (f"loader / step                {feed:.0f}x", feed >= TARGET_LOADER, f">= {TARGET_LOADER:.0f}x"),
              (f"Pion compiled, of peak       {of_peak['pion', True]:.2f}", of_peak["pion", True] >= TARGET_OF_PEAK,
               f">= {TARGET_OF_PEAK}")]
    for text, ok, target in checks:
        print(f"  {text} (target {target}) {'PASS' if ok else 'FAIL'}")
    return {"speed_ratio": speed[False], "compiled_speed_ratio": speed[True], "memory_ratio": memory,
            "loader_ratio": feed, "of_peak": of_peak["pion", True], "eager_of_peak": of_peak["pion", False],
            "hf_of_peak": of_peak["hf", True], "pass": all(ok for _, ok, _ in checks)}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        {"pion": pion_variant, "hf": hf_variant, "loader": loader_variant,
         "matmul": matmul_variant}[sys.argv[2]](int(sys.argv[3]), bool(int(sys.argv[4])))
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--steps", type=int, default=6)
        main(p.parse_args().steps)
