"""Peak memory of `data_prep.py prepare` on one huge document (what `cat *.txt > corpus.txt` makes) against the
same text split into ordinary JSONL documents, and tokens/s of both: for English text (README.md repeated),
and for text written without spaces, as Chinese and Japanese are.

A whole-document encoding costs ~150 bytes per byte of text; prepare tokenizes a long document in pieces
cut where the tokenizer's pre-tokenization cuts anyway, so its memory stays flat in the document's size.
Target, for each text: the single document's peak RSS <= 1.5x the JSONL baseline's, and under 1 GB at 200 MB.
    python bench/bench_prepare.py [--megabytes 200] [--text english|cjk|both]
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

from common import ROOT, peak_rss_mb, report, run_variant

TARGET_RATIO, TARGET_MB = 1.5, 1024
# Common Chinese characters, and Japanese kana; clauses of them end in a mark, with no space anywhere.
CJK_CHARACTERS = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着"
                  "去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主"
                  "行方又如前所本见经头面公同三已老从动两长知民样现分将外のはにをたがでしてとなるれ"
                  "られるからまでありますいうこともないかった日本語")
CJK_MARKS = "，。、！？"


def english_seed():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read() + "\nhéllo wörld 👋🏽 日本語 ✓\n"


def cjk_seed(chars=1 << 16):
    """About `chars` characters of CJK-like text: clauses of 4 to 40 characters, each ending in a mark, a line
    break after every tenth. No spaces: the only safe cuts are at the marks."""
    rng, clauses = random.Random(0), []
    while sum(map(len, clauses)) < chars:
        clause = "".join(rng.choices(CJK_CHARACTERS, k=rng.randint(4, 40))) + rng.choice(CJK_MARKS)
        clauses.append(clause + ("\n" if len(clauses) % 10 == 9 else ""))
    return "".join(clauses)


def write_corpus(folder, megabytes, seed):
    """corpus.txt (one document) and corpus.jsonl (the same text as 4096-character documents), written a
    piece at a time: the benchmark's own memory stays small."""
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


def compare(megabytes, name, seed):
    """Prepare the seed's corpus as one document and as JSONL documents; print and return the peak RSS ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(tmp, megabytes, seed)
        single = run_variant(__file__, os.path.join(tmp, "corpus.txt"))
        jsonl = run_variant(__file__, os.path.join(tmp, "corpus.jsonl"))
    ratio = single["peak_mb"] / jsonl["peak_mb"]
    print(f"prepare of {megabytes} MB of {name} text:")
    print(f"  one document:       peak {single['peak_mb']:7.0f} MB, {single['tokens_per_s']:,.0f} tokens/s")
    print(f"  JSONL documents:    peak {jsonl['peak_mb']:7.0f} MB, {jsonl['tokens_per_s']:,.0f} tokens/s")
    print(f"  peak memory ratio:  {ratio:.2f}x (target <= {TARGET_RATIO}x, and < {TARGET_MB} MB: "
          f"{'met' if ratio <= TARGET_RATIO and single['peak_mb'] < TARGET_MB else 'NOT met'})")
    return ratio, single["peak_mb"]


def main(megabytes=200, text="both"):
    results = {}
    if text in ("english", "both"):
        results["memory_ratio"], results["peak_mb"] = compare(megabytes, "English", english_seed())
    if text in ("cjk", "both"):
        results["cjk_memory_ratio"], results["cjk_peak_mb"] = compare(megabytes, "CJK (no spaces)", cjk_seed())
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        variant(sys.argv[2])
    else:
        p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        p.add_argument("--megabytes", type=int, default=200)
        p.add_argument("--text", choices=["english", "cjk", "both"], default="both")
        args = p.parse_args()
        main(args.megabytes, args.text)
