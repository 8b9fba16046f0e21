"""Shared by the benchmarks: run each variant in a fresh process and read back its peak memory and time."""
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_variant(script, *args):
    """Run `python script --variant args...` in a fresh process (so peak RSS is this variant's alone)
    and return the JSON object it prints on its last line."""
    out = subprocess.run([sys.executable, script, "--variant", *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"variant {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(result):
    print(json.dumps(result))


def machine():
    import platform
    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
