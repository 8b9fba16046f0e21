"""Plot training runs: loss, validation loss and bits per byte, lr, tokens/s and eval scores against tokens seen.

    python plot.py checkpoints/nano                                   # -> plot.png
    python plot.py runs/a/nano runs/b/nano --out compare.png         # two runs overlaid, named by their folders

Reads each run folder's metrics.jsonl (train.py and finetune.py write it; train.py also redraws
<run>/metrics.png at every eval).
"""
import os

import plotting
from cli import ArgumentParser, PionError, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or their metrics.jsonl)")
    p.add_argument("--out", default="plot.png", help="the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        p.error(f"--out must be a .png file, got {args.out!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        raise PionError(f"--out {args.out} already exists; choose another path or pass --overwrite")
    plotting.save_plot(args.runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
