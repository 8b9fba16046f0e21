"""Is this CUDA machine ready to train Pion? One command, one table, exit code 1 if any check fails.

    python bench/gpu_check.py                      # on a CUDA GPU (H100, A100, A40, L4, RTX 4090: known peaks)
    python bench/gpu_check.py --peak_tflops 200 --bandwidth_gbs 1000   # another GPU
    python bench/gpu_check.py --dry_run            # on a CPU: tiny fp32 models, no CUDA-only parts

Checks (gpu_checks.py, shared with the `cuda` tests): bf16 training steps of nano, small and base with SDPA
and soft-cap (FlexAttention), compiled and eager, gradient checkpointing on and off (tokens/s, MFU against
the GPU's dense bf16 peak, peak memory); the loss of 50 steps on a repeated batch falls; train.py
--memory_test of xl; a 1-process torchrun FSDP2 run with the bf16 policy through an eval sample; greedy
compiled decoding = eager, and compiled decoding with CUDA graphs (tokens/s, MBU against the GPU's memory
bandwidth); the Hugging Face export loads in transformers with the same logits.
"""
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpu_checks  # noqa: E402
import hardware  # noqa: E402
from cli import ArgumentParser, PionError, first_line, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", help="tiny fp32 models on the CPU: the checks' own logic")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak, for a GPU not in the table")
    p.add_argument("--bandwidth_gbs", type=float, default=None, help="memory GB/s, for a GPU not in the table")
    p.add_argument("--tokenizer", default=None, help="the Pion tokenizer JSON (default: fetched once)")
    p.add_argument("--only", action="append", default=[], help="run only checks whose name contains this")
    return p.parse_args(argv)


def target_from_args(args):
    if args.dry_run:
        device = torch.device("cpu")
        peak, bandwidth = hardware.matmul_peak_flops(), hardware.cpu_copy_bandwidth()  # fp32 CPU: measured
    else:
        if not torch.cuda.is_available():
            raise PionError("no CUDA device: run it on the GPU machine, or pass --dry_run on a CPU")
        device = torch.device("cuda")
        peak, bandwidth = hardware.gpu_peak_flops(device), hardware.memory_bandwidth(device)
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    if args.bandwidth_gbs:
        bandwidth = args.bandwidth_gbs * 1e9
    return gpu_checks.Target(device, args.dry_run, peak, bandwidth, args.tokenizer)


def describe(target):
    name = torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else "CPU (dry run)"
    peak = f"{target.peak_flops / 1e12:,.1f} TFLOPS" if target.peak_flops else "unknown (--peak_tflops)"
    bandwidth = f"{target.bandwidth / 1e9:,.0f} GB/s" if target.bandwidth else "unknown (--bandwidth_gbs)"
    kind = "measured fp32 matmul, copy bandwidth" if target.dry_run else "dense bf16"
    return f"{name}, torch {torch.__version__}: peak {peak}, memory {bandwidth} ({kind})"


def run_checks(target, checks):
    """Each check's rows, each also printed to stderr as it comes (a run cut short keeps what it measured);
    a check that raises adds one failed row, and the others still run."""
    rows = []
    for check in checks:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        start = time.perf_counter()
        try:
            for row in check(target):
                rows.append(row)
                print(format_row(*row), file=sys.stderr, flush=True)
        except Exception as e:
            rows.append((name, f"{type(e).__name__}: {first_line(e)}"[:200], False))
            print(format_row(*rows[-1]), file=sys.stderr, flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def format_row(check, result, passed, width=0):
    return f"{'ok  ' if passed else 'FAIL'}  {check:{width}}  {result}"


def print_table(rows):
    width = max(len(check) for check, _, _ in rows)
    for row in rows:
        print(format_row(*row, width))


def main(argv=None):
    args = parse_args(argv)
    target = target_from_args(args)
    print(describe(target))
    checks = [c for c in gpu_checks.CHECKS if not args.only or any(o in c.__name__ for o in args.only)]
    rows = run_checks(target, checks)
    print_table(rows)
    failed = sum(not passed for _, _, passed in rows)
    ready = "" if failed or args.dry_run else ": this GPU is ready to train Pion"
    print(f"{len(rows) - failed} of {len(rows)} checks passed{ready}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
