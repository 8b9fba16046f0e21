"""Training throughput and memory on CPU: Pion's train step against transformers' Qwen3ForCausalLM of the
identical shape, eager and compiled, plus the data loader's throughput against what the step consumes.

fp32, nano shape (hidden 384, 6 layers, 6:2 heads, head_dim 64, intermediate 1024, vocab 50258, tied
embeddings), seq_len 256, batch 8, soft-capping off, no gradient checkpointing, SDPA on both sides, and the
same optimizer: trainer.build_optimizer's fused AdamW, decay on the matrices, none on the 1-D norm weights,
and the same process settings: both call process.keep_freed_memory() first, as a training run does, so glibc
keeps freed memory for reuse on both sides. Left at glibc's default, transformers' step faults in 1.8 GB
of fresh pages for its full-vocab logits and their gradients every step and takes ~16% longer (Pion's: 0.28 GB,
~3.5%): a cost of the allocator, which either side's users can avoid, so both are measured without it.
Compiled means what each side's users do: Pion as `train.py --compile` (each block compiled), transformers
as its docs describe (torch.compile of the whole model, loss included). Speed is compared eager vs eager
and compiled vs compiled.

Each side runs in a fresh process (so its peak RSS, compared eager, is its own): eager steps, then the same
model compiled. The machine is shared and its speed drifts from minute to minute, so the sides alternate
for --rounds rounds and each keeps its best round (of the median step). Each step is also set against the
machine as it was at that moment: right after it, a 2048 x 2048 fp32 product is timed (best of 3), and the
step's FLOP rate (model FLOPs per token, hardware.training_flops_per_token, the same shape on both sides, x
tokens/s) divided by it is the step's fraction of the matmul peak; each round reports its steps' median, as
bench_decode interleaves its bandwidth measurement. This fraction, unlike tokens/s, means the same on
another machine, and the ratio of two sides' fractions is their speed ratio on an equally fast machine.
Targets: Pion >= 1.2x transformers' tokens/s (both pairs) and <= 0.7x its peak RSS; loader >= 20x the
step's tokens/s; Pion's compiled step >= 0.85 of the measured matmul peak. Both sides do the same FLOPs per
token, so the speed target is also a fraction of the peak, 1.2 x transformers' own, which is printed: where
it is near or above 1.0, no code can meet it on this machine.

Muon: its extra work (Newton-Schulz on each hidden matrix) is per optimizer step, not per token, so its cost
depends on the step's size. The target, Muon's step time over AdamW's <= 1.05x (eager), is checked on a step
of train.py's shape, batch 8 x seq 2048 (16,384 tokens): a sixteenth of train.py's default step (64 x 2
micro-batches of 2048), so a ratio met here is met there with room. Each optimizer trains its own copy of nano
through trainer.train_step on the same fresh random batches, their steps alternating (--steps / 2 each) so
that the machine's drift falls on both alike. The forward and backward passes are the same code either way;
only optimizer.step() differs, and it is timed inside each step. The machine's jitter between whole steps
(up to a tenth of a step) is larger than Muon's cost, so the ratio is AdamW's median step plus what Muon's
optimizer step adds to it (the difference of the two optimizer steps' medians); the whole steps' medians are
printed beside it. What Muon adds is also set against train.py's default step and the 2,048-token step above,
where it is about a tenth of a CPU step.
    python bench/bench_train.py [--steps 8] [--rounds 2]
"""
import argparse
import statistics
import sys
import tempfile
import time

from common import machine, peak_rss_mb, report, run_variant

SEQ_LEN, BATCH = 256, 8
TARGET_SPEED, TARGET_MEMORY, TARGET_LOADER, TARGET_OF_PEAK, TARGET_MUON = 1.2, 0.7, 20.0, 0.85, 1.05
MODES = ("eager", "compiled")
MUON_BATCH, MUON_SEQ_LEN = 8, 2048  # Muon's step: train.py's sequences, a sixteenth of its default step
TRAIN_PY_TOKENS_PER_STEP = 64 * 2 * 2048  # train.py's default step (batch 64 x grad_accum 2 x seq 2048)


def step_settings(steps, compile=False, optimizer="adamw"):
    from train_config import TrainConfig
    return TrainConfig(max_steps=steps, lr=3e-4, min_lr=3e-5, warmup_steps=0, weight_decay=0.1,
                       compile=compile, gradient_checkpointing=False, optimizer=optimizer)


def timed_steps(step, steps):
    """(tokens/s of the median step, the median over steps of each step's fraction of the matmul peak timed
    right after it, the peaks timed), after two warm-up steps (first-touch allocations, optimizer state,
    compilation)."""
    import hardware
    flops_per_step = flops_per_token() * BATCH * SEQ_LEN
    step()
    step()
    seconds, peaks = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        peaks.append(hardware.matmul_peak_flops(runs=3))
    of_peak = statistics.median(flops_per_step / s / peak for s, peak in zip(seconds, peaks))
    return BATCH * SEQ_LEN / statistics.median(seconds), of_peak, peaks


def measure(build, compile_model, steps):
    """Eager steps, then compiled ones, of the (model, step) that build() returns; reports both speeds, their
    fractions of the matmul peak, and the eager peak RSS."""
    m, step = build()
    eager, eager_of_peak, eager_peaks = timed_steps(step, steps)
    eager_mb = peak_rss_mb()
    compile_model(m)
    compiled, compiled_of_peak, compiled_peaks = timed_steps(step, steps)
    report({"eager": eager, "compiled": compiled, "eager_of_peak": eager_of_peak,
            "compiled_of_peak": compiled_of_peak, "peak_mb": eager_mb, "peaks": eager_peaks + compiled_peaks})


def pion_variant(steps):
    import torch
    import model
    import process
    import trainer

    def build():
        torch.manual_seed(0)
        config = step_settings(steps)
        m = process.prepare_model(model.get_model("nano", use_soft_cap=False), config, rt)
        optimizers = trainer.build_optimizer(m, config, rt)
        ids = torch.randint(0, m.config.vocab_size, (BATCH, SEQ_LEN))
        batches = iter(lambda: {"input_ids": ids, "labels": ids}, None)
        return m, lambda: trainer.train_step(m, optimizers, batches, rt, 1, 1.0, 1.0)

    rt = process.Runtime("cpu")
    process.keep_freed_memory()  # as trainer.train does
    measure(build, lambda m: process.prepare_model(m, step_settings(steps, compile=True), rt), steps)


def optimizers_variant(pairs):
    """AdamW's and Muon's eager steps of MUON_BATCH x MUON_SEQ_LEN tokens, alternating, each on its own copy
    of nano (the same initial weights and batches), after one warm-up step each: the medians over `pairs` steps
    of the whole step and of the optimizer.step() calls within it."""
    import torch
    import model
    import process
    import trainer

    rt = process.Runtime("cpu")
    process.keep_freed_memory()
    steps, seconds, vocab_size = {}, {}, model.get_config("nano").vocab_size
    for name in ("adamw", "muon"):
        # A fresh batch each step, the same ones for both sides, as in a run: trained on one batch over and
        # over, the Muon-trained model's forward and backward measured a few percent slower than AdamW's.
        generator = torch.Generator().manual_seed(1)
        batches = iter(lambda generator=generator: dict.fromkeys(("input_ids", "labels"), torch.randint(
            0, vocab_size, (MUON_BATCH, MUON_SEQ_LEN), generator=generator)), None)
        torch.manual_seed(0)
        config = step_settings(pairs, optimizer=name)
        m = process.prepare_model(model.get_model("nano", use_soft_cap=False), config, rt)
        optimizers = trainer.build_optimizer(m, config, rt)
        seconds[name] = {"step": [], "optimizer": []}
        for optimizer in optimizers:
            optimizer.step = timed(optimizer.step, seconds[name]["optimizer"])
        steps[name] = lambda m=m, optimizers=optimizers, batches=batches: trainer.train_step(
            m, optimizers, batches, rt, 1, 1.0, 1.0)
    for pair in range(pairs + 1):
        for name in ("adamw", "muon") if pair % 2 else ("muon", "adamw"):
            seconds[name]["optimizer"].append(0.0)
            start = time.perf_counter()
            steps[name]()
            seconds[name]["step"].append(time.perf_counter() - start)
    for parts in seconds.values():  # the forward and backward passes and the clipping: the same code either way
        parts["rest"] = [step - optimizer for step, optimizer in zip(parts["step"], parts["optimizer"])]
    report({f"{name}_{part}": statistics.median(values[1:])  # the first step warms up
            for name, parts in seconds.items() for part, values in parts.items()})


def timed(function, seconds):
    """function, adding the seconds each call takes to seconds[-1]."""
    def call(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[-1] += time.perf_counter() - start
        return result
    return call


def hf_variant(steps):
    import torch
    from transformers import Qwen3ForCausalLM
    import model
    import process
    import trainer
    from transformers_format import qwen3_config

    def build():
        torch.manual_seed(0)
        config = qwen3_config(model.get_config("nano", use_soft_cap=False))
        config._attn_implementation = "sdpa"
        m = Qwen3ForCausalLM(config)
        [optimizer] = trainer.build_optimizer(m, step_settings(steps), rt)  # Pion's AdamW, groups and all
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))

        def step():
            m(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return m, step

    rt = process.Runtime("cpu")
    process.keep_freed_memory()  # Pion's process settings, as the Pion side has them
    measure(build, lambda m: m.compile(), steps)


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


def flops_per_token():
    import torch
    import hardware
    import model
    with torch.device("meta"):
        return hardware.training_flops_per_token(model.get_model("nano", use_soft_cap=False), SEQ_LEN)


def main(steps=8, rounds=2):
    import os
    load_before = os.getloadavg()[0]
    runs = {"pion": [], "hf": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(run_variant(__file__, side, steps))
    loader = run_variant(__file__, "loader", steps)
    pairs = max(2, steps // 2)
    optimizers = run_variant(__file__, "optimizers", pairs)
    peaks = [peak for side in runs.values() for r in side for peak in r["peaks"]]
    best = {(side, mode): max(r[mode] for r in runs[side]) for side in runs for mode in MODES}
    of_peak = {(side, mode): max(r[mode + "_of_peak"] for r in runs[side]) for side in runs for mode in MODES}
    speed = {mode: best["pion", mode] / best["hf", mode] for mode in MODES}
    memory = min(r["peak_mb"] for r in runs["pion"]) / min(r["peak_mb"] for r in runs["hf"])
    feed = loader["tokens_per_s"] / best["pion", "eager"]
    print(f"training step, nano shape, batch {BATCH} x seq {SEQ_LEN}, fp32 CPU, fused AdamW on both sides "
          f"(median of {steps} steps after 2 warm-up steps; best of {rounds} alternating rounds)")
    print(f"machine: {machine()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this "
          f"benchmark included): a shared machine makes every figure noisy")
    print(f"fp32 matmul peak (2048^3, best of 3, timed after each step) from {min(peaks) / 1e9:.0f} to "
          f"{max(peaks) / 1e9:.0f} GFLOP/s; {flops_per_token() / 1e6:.1f} MFLOPs per trained token")
    names = {"hf": "transformers Qwen3", "pion": "Pion"}
    for mode in MODES:
        for side in ("hf", "pion"):
            speeds = ", ".join(f"{r[mode]:.0f}" for r in runs[side])
            fractions = ", ".join(f"{r[mode + '_of_peak']:.3f}" for r in runs[side])
            print(f"  {names[side] + ' ' + mode:28s} {best[side, mode]:6.0f} tokens/s ({speeds})   "
                  f"{of_peak[side, mode]:.3f} of the matmul peak ({fractions})")
        # Both sides do the same FLOPs per token, so this is where the speed target sits on the peak scale.
        print(f"  {'':28s} ({TARGET_SPEED}x transformers' {mode} step would be "
              f"{TARGET_SPEED * of_peak['hf', mode]:.2f} of the peak)")
    print(f"  peak RSS, eager: transformers {min(r['peak_mb'] for r in runs['hf']):.0f} MB, "
          f"Pion {min(r['peak_mb'] for r in runs['pion']):.0f} MB")
    print(f"  data loader:                 {loader['tokens_per_s']:8.0f} tokens/s")
    # Muon's work is per optimizer step: its fraction of a step shrinks as the step grows.
    muon_s = optimizers["muon_optimizer"] - optimizers["adamw_optimizer"]
    muon = 1 + muon_s / optimizers["adamw_step"]
    print(f"  Muon, a step of {MUON_BATCH} x {MUON_SEQ_LEN} tokens (eager, median of {pairs} alternating steps each): "
          f"optimizer.step() {optimizers['muon_optimizer'] * 1e3:.0f} ms vs AdamW's "
          f"{optimizers['adamw_optimizer'] * 1e3:.0f} ms, adding {muon_s * 1e3:.0f} ms to AdamW's "
          f"{optimizers['adamw_step']:.2f} s step: {muon:.3f}x")
    print(f"    the rest of each step, the same code on either side: AdamW {optimizers['adamw_rest']:.2f} s, Muon "
          f"{optimizers['muon_rest']:.2f} s; whole steps: AdamW {optimizers['adamw_step']:.2f} s, Muon "
          f"{optimizers['muon_step']:.2f} s (the machine's jitter, larger than Muon's cost)")
    tokens_per_s = MUON_BATCH * MUON_SEQ_LEN / optimizers["adamw_step"]
    print(f"  the same {muon_s * 1e3:.0f} ms on train.py's default step of {TRAIN_PY_TOKENS_PER_STEP:,} tokens: "
          f"{1 + muon_s / (TRAIN_PY_TOKENS_PER_STEP / tokens_per_s):.3f}x; on the {BATCH * SEQ_LEN:,}-token step "
          f"above: {1 + muon_s * best['pion', 'eager'] / (BATCH * SEQ_LEN):.3f}x")
    checks = [(f"speed, eager vs eager        {speed['eager']:.2f}x", speed["eager"] >= TARGET_SPEED, f">= {TARGET_SPEED}x"),
              (f"speed, compiled vs compiled  {speed['compiled']:.2f}x", speed["compiled"] >= TARGET_SPEED,
               f">= {TARGET_SPEED}x"),
              (f"peak RSS, eager              {memory:.2f}x", memory <= TARGET_MEMORY, f"<= {TARGET_MEMORY}x"),
              (f"loader / step                {feed:.0f}x", feed >= TARGET_LOADER, f">= {TARGET_LOADER:.0f}x"),
              (f"Pion compiled, of peak       {of_peak['pion', 'compiled']:.3f}",
               of_peak["pion", "compiled"] >= TARGET_OF_PEAK, f">= {TARGET_OF_PEAK}"),
              (f"Muon step / AdamW step, eager, {MUON_BATCH} x {MUON_SEQ_LEN} {muon:.3f}x", muon <= TARGET_MUON,
               f"<= {TARGET_MUON}x")]
    for text, ok, target in checks:
        print(f"  {text} (target {target}) {'PASS' if ok else 'FAIL'}")
    return {"speed_ratio": speed["eager"], "compiled_speed_ratio": speed["compiled"], "memory_ratio": memory,
            "loader_ratio": feed, "muon_ratio": muon,
            "of_peak": of_peak["pion", "compiled"], "eager_of_peak": of_peak["pion", "eager"],
            "pass": all(ok for _, ok, _ in checks)}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        {"pion": pion_variant, "hf": hf_variant,
         "loader": loader_variant, "optimizers": optimizers_variant}[sys.argv[2]](int(sys.argv[3]))
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--steps", type=int, default=8)
        p.add_argument("--rounds", type=int, default=2)
        args = p.parse_args()
        main(args.steps, args.rounds)
