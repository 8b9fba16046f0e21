"""Training throughput and memory on CPU: Pion's train step against transformers' Qwen3ForCausalLM of the
identical shape, plus the data loader's throughput against what the step consumes.

fp32, nano shape (hidden 384, 6 layers, 6:2 heads, head_dim 64, intermediate 1024, vocab 50258, tied
embeddings), seq_len 256, batch 8, soft-capping off, no gradient checkpointing, SDPA on both sides, and the
same optimizer: trainer.build_optimizer's fused AdamW, decay on the matrices, none on the 1-D norm weights.
Each side runs in a fresh process so its peak RSS is its own. A third process measures the machine's fp32
matmul peak (a 2048 x 2048 product, best of 5), and each side is printed as a fraction of it: model FLOPs
per token (hardware.training_flops_per_token, the same shape on both sides) x tokens/s / that peak. This
fraction, unlike tokens/s, means the same on another machine.
Targets: Pion >= 1.2x transformers' tokens/s and <= 0.7x its peak RSS; loader >= 20x the step's tokens/s;
Pion >= 0.85 of the measured matmul peak.
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
    step()  # warm-up: first-touch allocations, optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * SEQ_LEN * steps / (time.perf_counter() - start)


def pion_variant(steps):
    import torch
    import model
    import trainer

    torch.manual_seed(0)
    m = model.get_model("nano", use_soft_cap=False)
    rt = trainer.Runtime("cpu")
    optimizer = trainer.build_optimizer(m, train_config(steps), rt)
    ids = torch.randint(0, m.config.vocab_size, (BATCH, SEQ_LEN))
    batches = iter(lambda: {"input_ids": ids, "labels": ids}, None)
    tokens_per_s = step_timer(lambda: trainer.train_step(m, optimizer, batches, rt, 1, 1.0, 3e-4), steps)
    report({"tokens_per_s": tokens_per_s, "peak_mb": peak_rss_mb()})


def hf_variant(steps):
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
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))

    def step():
        m(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report({"tokens_per_s": step_timer(step, steps), "peak_mb": peak_rss_mb()})


def loader_variant(steps):
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


def matmul_variant(steps):
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
    peak = run_variant(__file__, "matmul", steps)["flops"]
    pion = run_variant(__file__, "pion", steps)
    hf = run_variant(__file__, "hf", steps)
    peak = max(peak, run_variant(__file__, "matmul", steps)["flops"])  # before and after: the best counts
    loader = run_variant(__file__, "loader", steps)
    speed, memory = pion["tokens_per_s"] / hf["tokens_per_s"], pion["peak_mb"] / hf["peak_mb"]
    feed = loader["tokens_per_s"] / pion["tokens_per_s"]
    flops = flops_per_token()
    of_peak = {side: r["tokens_per_s"] * flops / peak for side, r in (("pion", pion), ("hf", hf))}
    print(f"training step, nano shape, batch {BATCH} x seq {SEQ_LEN}, fp32 CPU, fused AdamW on both sides "
          f"({steps} steps after warm-up)")
    print(f"machine: {machine()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this "
          f"benchmark included): a shared machine makes every figure noisy")
    print(f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3, best of 5, before and after); "
          f"{flops / 1e6:.1f} MFLOPs per trained token")
    print(f"  transformers Qwen3: {hf['tokens_per_s']:8.0f} tokens/s   peak RSS {hf['peak_mb']:6.0f} MB   "
          f"{of_peak['hf']:.2f} of the matmul peak")
    print(f"  Pion:               {pion['tokens_per_s']:8.0f} tokens/s   peak RSS {pion['peak_mb']:6.0f} MB   "
          f"{of_peak['pion']:.2f} of the matmul peak")
    print(f"  data loader:        {loader['tokens_per_s']:8.0f} tokens/s")
    print(f"  speed ratio  {speed:.2f}x (target >= {TARGET_SPEED}) {'PASS' if speed >= TARGET_SPEED else 'FAIL'}")
    print(f"  memory ratio {memory:.2f}x (target <= {TARGET_MEMORY}) {'PASS' if memory <= TARGET_MEMORY else 'FAIL'}")
    print(f"  loader/step  {feed:.0f}x (target >= {TARGET_LOADER:.0f}) {'PASS' if feed >= TARGET_LOADER else 'FAIL'}")
    print(f"  Pion of peak {of_peak['pion']:.2f} (target >= {TARGET_OF_PEAK}) "
          f"{'PASS' if of_peak['pion'] >= TARGET_OF_PEAK else 'FAIL'}")
    return {"speed_ratio": speed, "memory_ratio": memory, "loader_ratio": feed, "of_peak": of_peak["pion"],
            "hf_of_peak": of_peak["hf"], "pass": speed >= TARGET_SPEED and memory <= TARGET_MEMORY and
            feed >= TARGET_LOADER and of_peak["pion"] >= TARGET_OF_PEAK}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        {"pion": pion_variant, "hf": hf_variant, "loader": loader_variant,
         "matmul": matmul_variant}[sys.argv[2]](int(sys.argv[3]))
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--steps", type=int, default=6)
        main(p.parse_args().steps)
