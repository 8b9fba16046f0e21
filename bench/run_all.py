"""Run every benchmark in bench/ and print the performance table; --record appends it, dated, to a file.

    python bench/run_all.py --record docs/performance.md

Each benchmark measures its baseline in the same run and prints its own details first. Run it on an
otherwise idle machine: the timings are ratios, but a busy CPU still skews them.
"""
import argparse
import datetime
import os
import time

import bench_ce
import bench_decode
import bench_prepare
import bench_serve
import bench_eval
import bench_softcap
import bench_train
from common import machine

ROWS = [  # (name, run, [(result key, what, target text, is the target met)])
    ("chunked cross-entropy (N=8192, d=640, V=50258)", bench_ce.main,
     [("memory_ratio", "extra peak memory vs naive", "<= 0.15", lambda x: x <= 0.15),
      ("time_ratio", "time vs naive", "<= 1.30", lambda x: x <= 1.3)]),
    ("soft-capped attention, seq 2048 training step", bench_softcap.main,
     [("memory_ratio", "extra peak memory vs SDPA", "<= 1.30", lambda x: x <= 1.3)]),
    ("training step vs transformers Qwen3 (nano, CPU)", lambda: bench_train.main(),
     [("speed_ratio", "tokens/s vs transformers, eager", ">= 1.20", lambda x: x >= 1.2),
      ("compiled_speed_ratio", "tokens/s vs transformers, both compiled", ">= 1.20", lambda x: x >= 1.2),
      ("memory_ratio", "peak RSS vs transformers", "<= 0.70", lambda x: x <= 0.7),
      ("loader_ratio", "data loader vs step tokens/s", ">= 20", lambda x: x >= 20),
      ("muon_ratio", "Muon step vs AdamW step, eager, 8 x 2048 tokens", "<= 1.05", lambda x: x <= 1.05),
      ("of_peak", "compiled step, of the measured fp32 matmul peak", ">= 0.85", lambda x: x >= 0.85)]),
    ("data_prep.py prepare of one 200 MB document vs the same text as JSONL documents", bench_prepare.main,
     [("memory_ratio", "peak RSS vs JSONL documents", "<= 1.50", lambda x: x <= 1.5),
      ("peak_mb", "peak RSS in MB", "< 1024", lambda x: x < 1024),
      ("cjk_memory_ratio", "text without spaces (CJK): peak RSS vs JSONL", "<= 1.50", lambda x: x <= 1.5),
      ("cjk_peak_mb", "text without spaces (CJK): peak RSS in MB", "< 1024", lambda x: x < 1024)]),
    ("greedy decode vs transformers Qwen3 (small, CPU)", lambda: bench_decode.main([]),
     [("vs_hf", "decode tokens/s vs transformers", ">= 2.00", lambda x: x >= 2.0),
      ("of_bound", "of the memory-bandwidth bound", ">= 0.60", lambda x: x >= 0.6),
      ("compiled_vs_hf_compiled", "compiled vs transformers static cache + compile", "-", lambda x: True),
      ("eager_vs_hf_eager", "eager vs transformers eager", "-", lambda x: True),
      ("int8_vs_fp32", "--quantize int8 decode tokens/s vs fp32", ">= 1.80", lambda x: x >= 1.8),
      ("int8_decode_vs_llama_q8_0", "--quantize int8 decode vs llama.cpp q8_0", ">= 1.00", lambda x: x >= 1.0),
      ("int4_decode_vs_llama_q4_0", "--quantize int4 decode vs llama.cpp q4_0", ">= 1.00", lambda x: x >= 1.0),
      ("int8_prefill_vs_llama_q8_0", "--quantize int8 512-token prefill vs llama.cpp", ">= 0.80", lambda x: x >= 0.8),
      ("int4_prefill_vs_llama_q4_0", "--quantize int4 512-token prefill vs llama.cpp", ">= 0.80", lambda x: x >= 0.8)]),
    ("serving: 8 clients x 4 requests x 64 tokens, max_batch 8 vs 1 (CPU)", lambda: bench_serve.main([]),
     [("speedup_nano", "aggregate tokens/s, nano", ">= 4.00", lambda x: x >= 4.0),
      ("speedup_small", "aggregate tokens/s, small", ">= 4.00", lambda x: x >= 4.0),
      ("lost", "requests lost or truncated", "== 0", lambda x: x == 0),
      ("join_ratio", "late first token / (prefill + 2 steps)", "<= 1.00", lambda x: x <= 1.0)]),
    ("multiple-choice eval vs the harness's hf backend (nano, CPU)", lambda: bench_eval.main([]),
     [("speed_ratio", "examples/s vs hf backend", ">= 2.00", lambda x: x >= 2.0)]),
]


def table(results, load):
    lines = [f"machine: {machine()}; load average {load:.2f} at the start",
             "", "| benchmark | measure | result | target | |", "|---|---|---:|---|---|"]
    lines += [f"| {name} | {what} | {value:.2f} | {target} | {'pass' if ok else 'FAIL'} |"
              for name, what, value, target, ok in results]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--record", metavar="FILE", help="append the table, under the run's date, to FILE "
                   "(docs/performance.md); nothing in FILE is changed")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    results = []
    for name, run, checks in ROWS:
        print(f"\n=== {name}")
        start = time.perf_counter()
        measured = run()
        print(f"({time.perf_counter() - start:.0f} s)")
        results += [(name, what, measured[key], target, ok(measured[key])) for key, what, target, ok in checks]
    text = table(results, load)
    print("\n" + text, end="")
    if args.record:
        with open(args.record, "a") as f:
            f.write(f"\n## bench/run_all.py, {datetime.date.today().isoformat()}\n\n{text}")


if __name__ == "__main__":
    main()
