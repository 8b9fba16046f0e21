"""Training throughput and memory on CPU: Pion's train step against transformers' Qwen3ForCausalLM of the
identical shape, plus the data loader's throughput against what the step consumes.

fp32, nano shape (hidden 384, 6 layers, 6:2 heads, head_dim 64, intermediate 1024, vocab 50258, tied
embeddings), seq_len 256, batch 8, soft-capping off, no gradient checkpointing, SDPA on both sides, the
same AdamW. Each side runs in a fresh process so its peak RSS is its own.
Targets: Pion >= 1.2x transformers' tokens/s and <= 0.7x its peak RSS; loader >= 20x the step's tokens/s.
    python bench/bench_train.py [--steps 6]
"""
import argparse
import sys
import tempfile
import time

from common import peak_rss_mb, report, run_variant

SEQ_LEN, BATCH = 256, 8
TARGET_SPEED, TARGET_MEMORY, TARGET_LOADER = 1.2, 0.7, 20.0


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
    optimizer = trainer.build_optimizer(m, trainer.TrainConfig(max_steps=steps, lr=3e-4, min_lr=3e-5, warmup_steps=0,
                                                               weight_decay=0.1), rt)
    ids = torch.randint(0, m.config.vocab_size, (BATCH, SEQ_LEN))
    batches = iter(lambda: {"input_ids": ids, "labels": ids}, None)
    tokens_per_s = step_timer(lambda: trainer.train_step(m, optimizer, batches, rt, 1, 1.0, 3e-4), steps)
    report({"tokens_per_s": tokens_per_s, "peak_mb": peak_rss_mb()})


def hf_variant(steps):
    import torch
    from transformers import Qwen3ForCausalLM
    import model
    from hf_export import qwen3_config

    torch.manual_seed(0)
    config = qwen3_config(model.get_config("nano", use_soft_cap=False))
    config._attn_implementation = "sdpa"
    m = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
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


def main(steps):
    pion = run_variant(__file__, "pion", steps)
    hf = run_variant(__file__, "hf", steps)
    loader = run_variant(__file__, "loader", steps)
    speed, memory = pion["tokens_per_s"] / hf["tokens_per_s"], pion["peak_mb"] / hf["peak_mb"]
    feed = loader["tokens_per_s"] / pion["tokens_per_s"]
    print(f"training step, nano shape, batch {BATCH} x seq {SEQ_LEN}, fp32 CPU, AdamW ({steps} steps after warm-up)")
    print(f"  transformers Qwen3: {hf['tokens_per_s']:8.0f} tokens/s   peak RSS {hf['peak_mb']:6.0f} MB")
    print(f"  Pion:               {pion['tokens_per_s']:8.0f} tokens/s   peak RSS {pion['peak_mb']:6.0f} MB")
    print(f"  data loader:        {loader['tokens_per_s']:8.0f} tokens/s")
    print(f"  speed ratio  {speed:.2f}x (target >= {TARGET_SPEED}) {'PASS' if speed >= TARGET_SPEED else 'FAIL'}")
    print(f"  memory ratio {memory:.2f}x (target <= {TARGET_MEMORY}) {'PASS' if memory <= TARGET_MEMORY else 'FAIL'}")
    print(f"  loader/step  {feed:.0f}x (target >= {TARGET_LOADER:.0f}) {'PASS' if feed >= TARGET_LOADER else 'FAIL'}")
    return {"speed_ratio": speed, "memory_ratio": memory, "loader_ratio": feed,
            "pass": speed >= TARGET_SPEED and memory <= TARGET_MEMORY and feed >= TARGET_LOADER}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        {"pion": pion_variant, "hf": hf_variant, "loader": loader_variant}[sys.argv[2]](int(sys.argv[3]))
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--steps", type=int, default=6)
        main(p.parse_args().steps)
