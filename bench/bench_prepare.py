"""Peak memory of `data_prep.py prepare` on one huge document (what `cat *.txt > corpus.txt` makes) against the
same text split into ordinary JSONL documents, and tokens/s of both.

A whole-document encoding costs ~150 bytes per byte of text; prepare tokenizes a long document in pieces
cut where the tokenizer's pre-tokenization cuts anyway, so its memory stays flat in the document's size.
Target: the single document's peak RSS <= 1.5x the JSONL baseline's, and under 1 GB at 200 MB of text.
    python bench/bench_prepare.py [--megabytes 200]
"""
import argparse
import json
import os
import sys
import tempfile
import time

from common import ROOT, peak_rss_mb, report, run_variant

TARGET_RATIO, TARGET_MB = 1.5, 1024


def write_corpus(folder, megabytes):
    """corpus.txt (one document) and corpus.jsonl (the same text as 4096-character documents), written a
    piece at a time: the benchmark's own memory stays small."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        seed = f.read() + "\nhéllo wörld 👋🏽 日本語 ✓\n"
    repeats = megabytes * 2**20 // len(seed.encode()) + 1
    with open(os.path.join(folder, "corpus.txt"), "w", encoding="utf-8") as txt, \
            open(os.path.join(folder, "corpus.jsonl"), "w", encoding="utf-8") as jsonl:
        for _ in range(repeats):
            txt.write(seed)
            for start in range(0, len(seed), 4096):
                jsonl.write(json.dumps({"text": seed[start:start + 4096]}) + "\n")


def variant(path):
    import data_prep
    out = os.path.join(os.path.dirname(path), "out-" + os.path.basename(path))
    start = time.perf_counter()
    data_prep.main(["prepare", "--input", path, "--out", out, "--seq_len", "2048"])
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "metadata.json")) as f:
        tokens = json.load(f)["total_tokens"]
    report({"peak_mb": peak_rss_mb(), "tokens_per_s": tokens / seconds})


def main(megabytes=200):
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(tmp, megabytes)
        single = run_variant(__file__, os.path.join(tmp, "corpus.txt"))
        jsonl = run_variant(__file__, os.path.join(tmp, "corpus.jsonl"))
    ratio = single["peak_mb"] / jsonl["peak_mb"]
    print(f"prepare of {megabytes} MB of text:")
    print(f"  one document:       peak {single['peak_mb']:7.0f} MB, {single['tokens_per_s']:,.0f} tokens/s")
    print(f"  JSONL documents:    peak {jsonl['peak_mb']:7.0f} MB, {jsonl['tokens_per_s']:,.0f} tokens/s")
    print(f"  peak memory ratio:  {ratio:.2f}x (target <= {TARGET_RATIO}x, and < {TARGET_MB} MB: "
          f"{'met' if ratio <= TARGET_RATIO and single['peak_mb'] < TARGET_MB else 'NOT met'})")
    return {"memory_ratio": ratio, "peak_mb": single["peak_mb"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        variant(sys.argv[2])
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--megabytes", type=int, default=200)
        main(p.parse_args().megabytes)
