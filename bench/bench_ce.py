"""Chunked cross-entropy vs plain F.cross_entropy(lm_head(h)): extra peak memory and time of forward+backward.

N=8192 tokens, d=640, vocab 50258, fp32 on CPU. Target: extra peak memory <= 15% of the naive version's,
time <= 1.3x.   python bench/bench_ce.py
"""
import sys
import time

from common import peak_rss_mb, report, rss_mb, run_variant

N, D, V = 8192, 640, 50258


def variant(kind, repeats):
    import torch
    import torch.nn.functional as F
    from loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,))
    before = rss_mb()
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        if kind == "naive":
            loss = F.cross_entropy(hidden @ weight.T, labels)
        else:
            loss = chunked_cross_entropy(hidden, weight, labels)
        loss.backward()
        times.append(time.perf_counter() - start)
    report({"extra_mb": peak_rss_mb() - before, "seconds": min(times), "loss": loss.item()})


def main():
    repeats = 3
    naive = run_variant(__file__, "naive", repeats)
    chunked = run_variant(__file__, "chunked", repeats)
    mem, speed = chunked["extra_mb"] / naive["extra_mb"], chunked["seconds"] / naive["seconds"]
    print(f"chunked CE, N={N} d={D} vocab={V}, fp32 CPU, forward+backward (best of {repeats})")
    print(f"  naive:   extra peak {naive['extra_mb']:8.0f} MB   {naive['seconds']:.2f} s   loss {naive['loss']:.5f}")
    print(f"  chunked: extra peak {chunked['extra_mb']:8.0f} MB   {chunked['seconds']:.2f} s   loss {chunked['loss']:.5f}")
    print(f"  memory ratio {mem:.3f} (target <= 0.15) {'PASS' if mem <= 0.15 else 'FAIL'}")
    print(f"  time ratio   {speed:.3f} (target <= 1.30) {'PASS' if speed <= 1.3 else 'FAIL'}")
    return {"memory_ratio": mem, "time_ratio": speed, "pass": mem <= 0.15 and speed <= 1.3}


if __name__ == "__main__":
    if "--variant" in sys.argv:
        variant(sys.argv[2], int(sys.argv[3]))
    else:
        main()
