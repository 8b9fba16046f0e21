"""What int8 and int4 weights cost in quality, on a trained checkpoint: perplexity on held-out text and greedy
agreement with fp32, each model loaded as generate.py loads it (checkpoint.load_model, fp32 on the CPU).
Perplexity is measured two ways, since quantized layers multiply a long prompt's rows in bf16 but the rows
of a decode step in int8 (quantize.py): over whole windows, as a prompt is read, and token by token through
the KV cache, as a reply is decoded.

Defaults fit the README's CPU quickstart, which trains Pion-nano on the repo's top-level *.py: the held-out
text is then tests/*.py (code it never saw). Greedy agreement: 10 prompts of 32 tokens taken from the
held-out text, 128 new tokens each, decoded by the quantized model and by fp32; counted two ways: position by
position (one flipped near-tie changes the rest of a continuation) and teacher-forced along fp32's path (the
quantized model's next-token choice after each prefix of fp32's continuation, as tests/test_quantize.py checks).
Targets: perplexity (both ways) within 1% of fp32 for int8, 5% for int4; agreement >= 90%. Exit code 0 either way.
    python bench/bench_quality.py [--checkpoint checkpoints/nano/pion_nano_final.pt] [--text FILE ...]
"""
import argparse
import glob
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from cli import run_cli  # noqa: E402
from decoding import decode_step, generate  # noqa: E402
from quantize import quantize  # noqa: E402

PROMPTS, PROMPT_TOKENS, NEW_TOKENS, WINDOW = 10, 32, 128, 256
TARGET_PPL_RATIO, TARGET_AGREEMENT = {"int8": 1.01, "int4": 1.05}, 0.90


@torch.inference_mode()
def perplexity(model, ids):
    """exp(mean next-token cross-entropy) over consecutive windows of WINDOW tokens."""
    windows = ids[:len(ids) // WINDOW * WINDOW].view(-1, WINDOW)
    total = 0.0
    for batch in windows.split(4):
        logits = model(batch)["logits"][:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
    return torch.tensor(total / (windows.numel() - len(windows))).exp().item()


@torch.inference_mode()
def decoded_perplexity(model, ids):
    """perplexity as decoding computes it: each window of WINDOW tokens fed one token at a time through the KV
    cache (decode_step: one-row products, the quantized kernels' path)."""
    windows = ids[:len(ids) // WINDOW * WINDOW].view(-1, WINDOW)
    total = 0.0
    for window in windows:
        cache = model.new_kv_cache(1, WINDOW)
        cache.fused_projections = model.fuse_projections()
        for t in range(WINDOW - 1):
            logits = decode_step(model, cache, window[None, t:t + 1], torch.tensor([t]))
            total += F.cross_entropy(logits, window[t + 1:t + 2], reduction="sum").item()
    return torch.tensor(total / (windows.numel() - len(windows))).exp().item()


def greedy(model, prompts):
    """Each prompt's greedy continuation, decoded alone as a chat user's is: batch 1, whose steps take the
    quantized kernels' path (a batch of more than quantize.FEW_ROWS rows would multiply in bf16)."""
    return [generate(model, prompt, NEW_TOKENS, stop_ids=())[0] for prompt in prompts]


@torch.inference_mode()
def teacher_forced_agreement(model, prompts, continuations):
    """Tokens of each continuation that model predicts (argmax) after the prompt and the continuation before it."""
    rows = torch.tensor([p + c[:-1] for p, c in zip(prompts, continuations)])
    predicted = model(rows)["logits"][:, PROMPT_TOKENS - 1:].argmax(-1)
    return (predicted == torch.tensor(continuations)).sum().item()


def verdict(agreement):
    return "PASS" if agreement >= TARGET_AGREEMENT else "FAIL"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints/nano/pion_nano_final.pt"))
    parser.add_argument("--text", nargs="+", default=sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))),
                        help="held-out text files")
    parser.add_argument("--max_tokens", type=int, default=16 * WINDOW, help="held-out tokens for perplexity")
    args = parser.parse_args(argv)

    fp32, _, _ = load_model(args.checkpoint, "cpu")
    tokenizer = load_tokenizer(None, fp32.config.vocab_size)
    text = "".join(open(path, encoding="utf-8").read() for path in args.text)
    ids = torch.tensor(tokenizer.encode(text).ids[:args.max_tokens])
    step = (len(ids) - PROMPT_TOKENS) // PROMPTS
    prompts = [ids[i * step:i * step + PROMPT_TOKENS].tolist() for i in range(PROMPTS)]
    ours = greedy(fp32, prompts)
    ppl_fp32, decoded_fp32 = perplexity(fp32, ids), decoded_perplexity(fp32, ids)
    total = PROMPTS * NEW_TOKENS
    print(f"int8 and int4 vs fp32 on {args.checkpoint} ({fp32.count_parameters():,} params), CPU")
    print(f"held-out text: {len(args.text)} file(s), {len(ids) // WINDOW * WINDOW} tokens in windows of {WINDOW}; "
          f"greedy: {PROMPTS} prompts x {NEW_TOKENS} tokens ({len({t for row in ours for t in row})} distinct "
          f"tokens in fp32's output); perplexity fp32 {ppl_fp32:.3f} (windows), {decoded_fp32:.3f} (decoded)")
    results = {"ppl_fp32": ppl_fp32, "decoded_ppl_fp32": decoded_fp32}
    for method, target in TARGET_PPL_RATIO.items():
        quantized = quantize(load_model(args.checkpoint, "cpu")[0], method)
        ratio = perplexity(quantized, ids) / ppl_fp32
        decoded_ratio = decoded_perplexity(quantized, ids) / decoded_fp32
        theirs = greedy(quantized, prompts)
        free = sum(a == b for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)) / total
        forced = teacher_forced_agreement(quantized, prompts, ours) / total
        print(f"{method}: perplexity {ratio * ppl_fp32:.3f}, ratio {ratio:.4f} (target <= {target}) "
              f"{'PASS' if ratio <= target else 'FAIL'}; decoded {decoded_ratio * decoded_fp32:.3f}, ratio "
              f"{decoded_ratio:.4f} {'PASS' if decoded_ratio <= target else 'FAIL'}; "
              f"greedy agreement position by position {free:.1%} "
              f"{verdict(free)}, teacher-forced {forced:.1%} {verdict(forced)} (target >= {TARGET_AGREEMENT:.0%})")
        results[method] = {"ppl_ratio": ratio, "decoded_ppl_ratio": decoded_ratio, "greedy_agreement": free,
                           "teacher_forced_agreement": forced}
    return results

if __name__ == "__main__":
    run_cli(main)
