"""Soft-capped attention vs SDPA: peak memory of one training step (forward+backward) at seq_len 2048.

Pion-small shape, batch 1, fp32 on CPU, no gradient checkpointing (so attention memory is not hidden by
recomputation). Target: the soft-capped step's extra peak memory <= 1.3x the use_soft_cap=False step's.
    python bench/bench_softcap.py
"""
import sys
import time

from common import peak_rss_mb, report, rss_mb, run_variant

SEQ_LEN, BATCH = 2048, 1


def variant(soft_cap):
    import torch
    import model

    torch.manual_seed(0)
    m = model.get_model("small", use_soft_cap=soft_cap == "on")
    ids = torch.randint(0, m.config.vocab_size, (BATCH, SEQ_LEN))
    before = rss_mb()
    start = time.perf_counter()
    m(ids, labels=ids)["loss"].backward()
    report({"extra_mb": peak_rss_mb() - before, "seconds": time.perf_counter() - start})


def main():
    sdpa = run_variant(__file__, "off")
    capped = run_variant(__file__, "on")
    mem = capped["extra_mb"] / sdpa["extra_mb"]
    print(f"soft-capped attention, Pion-small, batch {BATCH} x seq {SEQ_LEN}, fp32 CPU, one forward+backward")
    print(f"  SDPA (use_soft_cap=False): extra peak {sdpa['extra_mb']:7.0f} MB   {sdpa['seconds']:.1f} s")
    print(f"  soft-capped (tiled):       extra peak {capped['extra_mb']:7.0f} MB   {capped['seconds']:.1f} s")
    print(f"  memory ratio {mem:.3f} (target <= 1.30) {'PASS' if mem <= 1.3 else 'FAIL'}")
    return {"memory_ratio": mem, "time_ratio": capped["seconds"] / sdpa["seconds"], "pass": mem <= 1.3}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        variant(sys.argv[2])
    else:
        main()
