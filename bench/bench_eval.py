"""Multiple-choice evaluation speed on CPU: Pion's lm-evaluation-harness model (harness.PionLM) against the
harness's own `hf` backend on the same model exported to transformers, same task, same batch size.

Pion-nano without soft-capping (so both compute the same thing), fp32, random seeded weights; a local
HellaSwag-shaped task (a ~40-word context, 4 endings of a few words each) of 200 examples, written to a
temporary folder. Both run the whole harness pipeline (simple_evaluate); examples/s counts the documents.
The per-request log-likelihoods must agree (1e-4 nats) and the accuracies be identical.
Target: Pion >= 2x the hf backend. Exit code 0 either way.
    python bench/bench_eval.py [--examples 200] [--batch_size 16] [--runs 2]
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import harness  # noqa: E402
import transformers_format  # noqa: E402
import model  # noqa: E402
from cli import run_cli  # noqa: E402

TARGET = 2.0
TASK = "bench_pion_mc"
WORDS = ("the a river stone city bread apple window music winter summer walked quickly under over across "
         "old new bright dark small large carried opened closed found lost garden street kitchen morning "
         "evening friend teacher child dog cat market bridge tower letter story").split()


def write_task(folder, n_examples, seed=0):
    """A HellaSwag-shaped multiple-choice task over a local JSONL file, as harness YAML."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    with open(os.path.join(folder, "mc.jsonl"), "w") as f:
        for i in range(n_examples):
            context = words(int(torch.randint(30, 50, (1,), generator=g)))
            endings = [words(int(torch.randint(4, 12, (1,), generator=g))) for _ in range(4)]
            f.write(json.dumps({"ctx": context, "endings": endings, "label": i % 4}) + "\n")
    with open(os.path.join(folder, "mc.yaml"), "w") as f:
        f.write(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(folder, 'mc.jsonl')}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def run(lm, manager):
    """(seconds, results) of the whole harness pipeline on the task."""
    start = time.perf_counter()
    results = harness.run_tasks(lm, [TASK], manager, log_samples=True, bootstrap_iters=0)
    return time.perf_counter() - start, results


def log_likelihoods(results):
    return [ll for sample in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
            for ll, _ in sample["filtered_resps"]]


def main(argv=None):
    """Print the comparison; return the measurements (bench/run_all.py reads speed_ratio)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="documents of the task")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward, both backends")
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each (the best counts)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both backends (0: torch's default). One, because on a shared "
                             "machine OpenMP threads stall whenever another process holds a core")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        pion = model.get_model("nano", use_soft_cap=False).eval()
        checkpoint.save_checkpoint(os.path.join(tmp, "nano.pt"), {"model": pion.state_dict(), "config": pion.config})
        folder = transformers_format.export(os.path.join(tmp, "nano.pt"), os.path.join(tmp, "hf"), args.tokenizer)
        write_task(tmp, args.examples)
        manager = harness.task_manager([TASK], tmp)
        ours = harness.PionLM(pion, args.tokenizer, batch_size=args.batch_size, progress=False)
        theirs = HFLM(pretrained=folder, device="cpu", batch_size=args.batch_size, dtype="float32")
        pion_seconds, hf_seconds = float("inf"), float("inf")
        for _ in range(args.runs):  # alternate, so that a shared machine's load hits both alike
            seconds, pion_results = run(ours, manager)
            pion_seconds = min(pion_seconds, seconds)
            seconds, hf_results = run(theirs, manager)
            hf_seconds = min(hf_seconds, seconds)
    load_after = os.getloadavg()[0]

    worst = max(abs(a - b) for a, b in zip(log_likelihoods(pion_results), log_likelihoods(hf_results)))
    accuracies = [(r["results"][TASK]["acc,none"], r["results"][TASK]["acc_norm,none"])
                  for r in (pion_results, hf_results)]
    identical = worst <= 1e-4 and accuracies[0] == accuracies[1]
    ratio = hf_seconds / pion_seconds
    print(f"{args.examples}-example 4-way multiple choice, Pion-nano ({pion.count_parameters():,} params, no soft-cap), "
          f"fp32 CPU, batch {args.batch_size}, best of {args.runs}")
    print(f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"  Pion (harness.PionLM)   {args.examples / pion_seconds:7.1f} examples/s ({pion_seconds:.1f} s)")
    print(f"  harness hf backend         {args.examples / hf_seconds:7.1f} examples/s ({hf_seconds:.1f} s)")
    print(f"scores identical: {'yes' if identical else 'NO'} (acc {accuracies[0][0]:.4f} vs {accuracies[1][0]:.4f}, "
          f"acc_norm {accuracies[0][1]:.4f} vs {accuracies[1][1]:.4f}, largest log-likelihood gap {worst:.1e} nats)")
    print(f"Pion / hf backend {ratio:.2f}x (target >= {TARGET:.2f}x) {'PASS' if ratio >= TARGET else 'FAIL'}")
    return {"speed_ratio": ratio, "identical": identical, "pion_examples_per_s": args.examples / pion_seconds,
            "hf_examples_per_s": args.examples / hf_seconds}


if __name__ == "__main__":
    run_cli(main)
