"""Tokens to a loss: Pion's training recipe against nanoGPT's, on the same text, batches and held-out windows.

What a user pays for is (tokens needed for the loss they want) / (tokens per second); bench_train measures the
second, this the first. The text: the Python standard library's own sources and docstrings (every machine
has them, found through sysconfig), or --text FILE...; split into training and held-out text by whole
documents (a file, or a few kB of a --text file's paragraphs), so no held-out document was trained on. A
byte-level BPE (--vocab, 2048) is trained on the training part with `tokenizers` (--tokenizer: Pion's own).

The models have the same width, depth and parameter count: Pion (a model.PionConfig; its d_ff is chosen so
the counts match) and transformers' GPT2LMHeadModel with nanoGPT's recipe as the peer (AdamW 0.9/0.95,
weight decay 0.1 on the matrices, gradient clip 1, linear warmup then a cosine to lr/10). Pion trains with
its own recipe: trainer.build_optimizer and trainer.train_step on a train_config.TrainConfig and its WSD
schedule, at train_config.default_lr (the lr train.py picks when --lr is not given), at 0.5x and 2x of it,
with soft-capping off, and with optimizer "muon". Every run sees the same batches in the same order; every
validation scores the same held-out windows (loss in nats per token and bits per UTF-8 byte).

Printed: each run's validation loss; the peer's best loss over its lr sweep; the tokens each run needs to
reach it (linear between evaluations) as a multiple of the peer's. Targets: Pion at its default lr <= 0.75x
the peer's tokens and within 0.05 nats of the best of its own sweep; Muon <= 0.5x. --seeds N repeats the
peer's best, Pion's default and Muon with N model seeds (the batches stay). A PNG of the curves: --plot.
    python bench/bench_recipe.py                       # CPU: d_model 64, 4 layers, 120 steps of 16 x 256
    python bench/bench_recipe.py --device cuda --width 512 --depth 8 --tokens 100e6 --batch_size 64 \\
        --tokenizer pile_tokenizer.json --text corpus.txt --text_mb 1000 --peer_lrs 5e-4 1e-3 2e-3
    python bench/bench_recipe.py --dry_run             # tiny, a minute: every piece once
"""
import argparse
import glob
import multiprocessing
import os
import statistics
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as pion  # noqa: E402
import process  # noqa: E402
import train_config  # noqa: E402
import trainer  # noqa: E402
from cli import human_count  # noqa: E402
from common import machine  # noqa: E402
from validation import evaluate, token_byte_lengths  # noqa: E402

EOS = "<|endoftext|>"
TARGET_DEFAULT, TARGET_DEFAULT_GAP, TARGET_MUON = 0.75, 0.05, 0.5
# The peer's sweep brackets its best at the CPU default's sizes (2e-3 at d_model 64 and 128; nanoGPT's own 6e-4 is
# for 124M parameters at 0.5M tokens a step); Pion's, as multiples of train_config.default_lr, brackets its default.
PEER_LRS, PION_LR_FACTORS = (1e-3, 2e-3, 4e-3), (0.5, 1.0, 2.0)
TEXT_DOCUMENT_BYTES = 4096  # a --text file is cut into documents of whole paragraphs of at least this size


# ----------------------------------------------------------------------------------------------------
# The text: documents, the held-out split, the tokenizer, the batches


def stdlib_documents():
    """[(name, text)] of the standard library's .py files (its sources and docstrings), installed packages left out."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(p for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                   if "site-packages" not in p and "dist-packages" not in p)
    documents = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            documents.append((os.path.relpath(path, stdlib), f.read()))
    return documents


def text_documents(paths):
    """[(name, text)]: each file cut at blank lines into documents of whole paragraphs, about TEXT_DOCUMENT_BYTES each."""
    documents = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = f.read().split("\n\n")
        current = []
        for paragraph in paragraphs:
            current.append(paragraph)
            if sum(len(p) for p in current) >= TEXT_DOCUMENT_BYTES:
                documents.append((f"{path}#{len(documents)}", "\n\n".join(current)))
                current = []
        if current:
            documents.append((f"{path}#{len(documents)}", "\n\n".join(current)))
    return documents


def first_megabytes(documents, megabytes):
    """The documents, in an order fixed by a hash of their names (a mix of every part of the library), up to
    about `megabytes` of text: the tokenizer and the token stream need no more than the runs can train on."""
    kept, size = [], 0
    for name, text in sorted(documents, key=lambda d: zlib.crc32(d[0].encode())):
        if size >= megabytes * 1e6:
            break
        kept.append((name, text))
        size += len(text)
    return kept


def split_documents(documents, held_out=0.05):
    """(training, held-out) lists of whole documents, chosen by a hash of each name: the same split on every
    machine and run, whatever order the documents come in."""
    train, val = [], []
    for name, text in documents:
        (val if zlib.crc32(name.encode()) % 1000 < held_out * 1000 else train).append((name, text))
    return train, val


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE of vocab_size ids trained on texts, <|endoftext|> its id 0 (as in Pion's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, bpe)
    return tokenizer


def token_stream(tokenizer, texts):
    """The texts' ids, each document followed by <|endoftext|>, as one int64 array."""
    eos = tokenizer.token_to_id(EOS)
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int64)


def training_batches(stream, steps, batch_size, seq_len, seed=0):
    """steps x (batch_size, seq_len) windows at random offsets of stream, the same for every run."""
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, (steps, batch_size))
    return torch.from_numpy(stream[starts[..., None] + np.arange(seq_len)])


def held_out_windows(stream, count, seq_len):
    """Up to count non-overlapping windows spread evenly over the held-out stream."""
    fits = len(stream) // seq_len
    if fits == 0:
        raise SystemExit(f"the held-out text has {len(stream)} tokens, fewer than one window of {seq_len}")
    picks = np.linspace(0, fits - 1, min(count, fits)).astype(np.int64)
    return torch.from_numpy(stream[picks[:, None] * seq_len + np.arange(seq_len)])


@dataclass
class Data:
    train: torch.Tensor  # (steps, batch, seq_len): every run's batches
    val: torch.Tensor  # (windows, seq_len): every evaluation's windows
    token_bytes: torch.Tensor  # each id's UTF-8 length, for bits per byte
    vocab_size: int


def load_data(args):
    """Data of the run the flags describe; says what it found."""
    documents = text_documents(args.text) if args.text else stdlib_documents()
    documents = first_megabytes(documents, 1 if args.dry_run else args.text_mb)
    train_docs, val_docs = split_documents(documents)
    if not train_docs or not val_docs:
        raise SystemExit(f"{len(documents)} documents are too few to hold some out: give more text")
    if args.tokenizer:
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_tokenizer([text for _, text in train_docs], args.vocab)
    train_stream = token_stream(tokenizer, [text for _, text in train_docs])
    val_stream = token_stream(tokenizer, [text for _, text in val_docs])
    vocab = tokenizer.get_vocab_size()
    steps = max(1, int(args.tokens) // (args.batch_size * args.seq_len))
    print(f"text: {len(train_docs)} training documents ({len(train_stream):,} tokens), {len(val_docs)} held out "
          f"({len(val_stream):,} tokens); {'tokenizer ' + args.tokenizer if args.tokenizer else 'BPE trained on the training part'}, "
          f"{vocab} ids; {steps} steps of {args.batch_size} x {args.seq_len} tokens = "
          f"{steps * args.batch_size * args.seq_len:,} tokens, {steps * args.batch_size * args.seq_len / len(train_stream):.2f} "
          f"passes over the training text")
    return Data(training_batches(train_stream, steps, args.batch_size, args.seq_len),
                held_out_windows(val_stream, args.val_windows, args.seq_len),
                token_byte_lengths(tokenizer), vocab)


# ----------------------------------------------------------------------------------------------------
# The matched models


def heads(width):
    return max(4, width // 64)  # head_dim 64 as Pion's sizes have, but at least 4 heads on a narrow model


def peer_model(args, vocab):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab, n_positions=args.seq_len, n_embd=args.width, n_layer=args.depth,
                        n_head=heads(args.width), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def pion_config(args, vocab, parameters, **overrides):
    """A PionConfig of args' width and depth whose d_ff (a multiple of 8) brings it to `parameters`."""
    base = dict(vocab_size=vocab, d_model=args.width, n_layers=args.depth, n_heads=heads(args.width),
                n_kv_heads=heads(args.width) // 2, max_seq_len=args.seq_len, **overrides)
    with torch.device("meta"):
        at_8 = pion.Pion(pion.PionConfig(**base, d_ff=8)).count_parameters()
    per_unit = 3 * args.width * args.depth  # each unit of d_ff adds a row or column to w1, w2, w3 of each block
    return pion.PionConfig(**base, d_ff=max(8, 8 + round((parameters - at_8) / per_unit / 8) * 8))


# ----------------------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True)
class Run:
    name: str
    recipe: str  # "nanogpt": GPT-2 with nanoGPT's recipe; "pion": Pion with trainer.py's
    lr: float
    optimizer: str = "adamw"
    soft_cap: bool = True
    seed: int = 0


def peer_optimizer(model, lr):
    """nanoGPT's configure_optimizers: fused AdamW (0.9, 0.95), decay 0.1 on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [torch.optim.AdamW([{"params": decay, "weight_decay": 0.1, "peak_lr": lr},
                               {"params": no_decay, "weight_decay": 0.0, "peak_lr": lr}],
                              lr=lr, betas=(0.9, 0.95), fused=True)]


def train_run(run, args, data, parameters):
    """Train one run on data.train; returns its records (plotting.draw's format: training steps and evaluations
    against tokens_seen) and its mean step time in seconds."""
    rt = process.Runtime(args.device)
    if rt.device.type == "cpu":
        process.keep_freed_memory()  # as trainer.train does
    steps, warmup = len(data.train), max(1, len(data.train) // 10)
    config = train_config.TrainConfig(max_steps=steps, lr=run.lr, min_lr=run.lr / 10, warmup_steps=warmup,
                                      batch_size=args.batch_size, seq_len=args.seq_len,
                                      schedule="cosine" if run.recipe == "nanogpt" else "wsd",
                                      optimizer=run.optimizer, gradient_checkpointing=False, seed=run.seed,
                                      **({} if args.muon_lr is None else {"muon_lr": args.muon_lr}))
    torch.manual_seed(run.seed)
    if run.recipe == "nanogpt":
        model = peer_model(args, data.vocab_size).to(rt.device)
        optimizers = peer_optimizer(model, run.lr)
    else:
        model = process.prepare_model(pion.Pion(pion_config(args, data.vocab_size, parameters,
                                                            use_soft_cap=run.soft_cap)), config, rt)
        optimizers = trainer.build_optimizer(model, config, rt)
    batches = iter({"input_ids": ids, "labels": ids} for ids in data.train)
    val = [{"input_ids": ids, "labels": ids} for ids in data.val.split(args.batch_size)]
    eval_every = max(1, steps // args.evals)
    records, seconds, tokens = [], 0.0, 0
    for step in range(steps):
        start = time.perf_counter()
        loss, _, step_tokens = trainer.train_step(model, optimizers, batches, rt, 1, config.grad_clip,
                                                  train_config.lr_scale(config, step))
        seconds += time.perf_counter() - start
        tokens += step_tokens
        records.append({"step": step + 1, "tokens_seen": tokens, "loss": loss,
                        "lr": run.lr * train_config.lr_scale(config, step)})
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            records.append({"step": step + 1, "tokens_seen": tokens,
                            **evaluate(model, val, rt, len(val), data.token_bytes)})
    return records, seconds / steps


def train_runs(runs, args, data, parameters):
    """{run: train_run's result} of each run, said as it ends. --jobs N trains N at a time, each in a fresh
    process of one thread: a model this small keeps one core busier than two."""
    results = {}

    def done(run, result, seconds):
        results[run] = result
        print(f"{run.name}: val loss {final(result[0], 'val_loss'):.4f}, bpb {final(result[0], 'val_bpb'):.4f} "
              f"({seconds:.0f} s)", flush=True)

    if args.jobs == 1:
        for run in runs:
            started = time.perf_counter()
            done(run, train_run(run, args, data, parameters), time.perf_counter() - started)
        return results
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(train_run, run, args, data, parameters): run for run in runs}
        for future in as_completed(futures):
            done(futures[future], future.result(), time.perf_counter() - started)
    return {run: results[run] for run in runs}  # in the order asked, for the table


def val_curve(records):
    return [(r["tokens_seen"], r["val_loss"]) for r in records if "val_loss" in r]


def tokens_to_reach(curve, target):
    """The tokens at which a validation curve [(tokens, loss)] first reaches target, linear between its
    evaluations (from 0 tokens at the first one's loss), or None if it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return tokens
            t0, l0 = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


# ----------------------------------------------------------------------------------------------------
# The report


def best_loss(records):
    return min(loss for _, loss in val_curve(records))


def final(records, key):
    return [r[key] for r in records if key in r][-1]


def ratio_text(tokens, peer_tokens):
    return "never" if tokens is None else f"{human_count(round(tokens))} ({tokens / peer_tokens:.2f}x)"


def report(results, target, peer_tokens):
    """The table of every run: its lr, final and best validation loss, bits per byte, tokens to the target."""
    print(f"\n| run | peak lr | val loss (final / best) | val bpb | s/step | tokens to reach {target:.4f} |")
    print("|---|---|---|---|---|---|")
    for run, (records, step_s) in results.items():
        reached = tokens_to_reach(val_curve(records), target)
        print(f"| {run.name} | {run.lr:.2g} | {final(records, 'val_loss'):.4f} / {best_loss(records):.4f} | "
              f"{final(records, 'val_bpb'):.4f} | {step_s:.3f} | {ratio_text(reached, peer_tokens)} |")


def verdict(name, ratios, target):
    """A target line over one ratio per seed: its mean decides (a missing one, never reached, fails it)."""
    shown = ", ".join("never" if r is None else f"{r:.2f}" for r in ratios)
    mean = None if None in ratios else statistics.mean(ratios)
    ok = mean is not None and mean <= target
    print(f"  {name}: {'never' if mean is None else f'{mean:.2f}x'} the peer's tokens (seeds: {shown}; "
          f"target <= {target}x) {'PASS' if ok else 'FAIL'}")
    return ok


def save_curves(results, path):
    """The validation curves of the first seed's runs, drawn by plotting.draw, into a PNG."""
    from plotting import draw
    runs = [(run.name, [r for r in records if "val_loss" in r]) for run, (records, _) in results.items()
            if run.seed == 0]
    draw(runs).savefig(path, format="png", dpi=70)
    print(f"curves: {path}")


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="text of your own (default: the stdlib)")
    p.add_argument("--text_mb", type=float, default=8, help="megabytes of the text used at most")
    p.add_argument("--tokenizer", default=None, help="a tokenizer JSON instead of a BPE trained here")
    p.add_argument("--vocab", type=int, default=2048, help="ids of the BPE trained here")
    p.add_argument("--width", type=int, default=64, help="d_model of both models")
    p.add_argument("--depth", type=int, default=4, help="layers of both models")
    p.add_argument("--tokens", type=float, default=120 * 16 * 256, help="training tokens of each run")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--val_windows", type=int, default=32, help="held-out windows of seq_len scored at each eval")
    p.add_argument("--evals", type=int, default=12, help="evaluations per run")
    p.add_argument("--seeds", type=int, default=1, help="model seeds of the peer's best, Pion's default and Muon")
    p.add_argument("--peer_lrs", type=float, nargs="+", default=PEER_LRS, help="the peer's lr sweep")
    p.add_argument("--muon_lr", type=float, default=None, help="Muon's peak lr (default: TrainConfig's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=None, help="runs trained at a time, in processes of one thread each "
                   "(default: one per core on the CPU, 1 on CUDA)")
    p.add_argument("--plot", default="recipe_curves.png", help="PNG of the validation curves")
    p.add_argument("--dry_run", action="store_true", help="tiny shapes and text, one lr per recipe: every piece once")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = os.cpu_count() or 1 if args.device == "cpu" else 1
    if args.dry_run:
        args.vocab, args.width, args.depth, args.tokens = 300, 32, 1, 4 * 2 * 32
        args.batch_size, args.seq_len, args.val_windows, args.evals = 2, 32, 4, 2
        args.peer_lrs = args.peer_lrs[:1]
    return args


def main(argv=None):
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    data = load_data(args)
    parameters = peer_model(args, data.vocab_size).num_parameters()
    config = pion_config(args, data.vocab_size, parameters)
    with torch.device("meta"):
        pion_parameters = pion.Pion(config).count_parameters()
    tokens_per_step = args.batch_size * args.seq_len
    default = train_config.default_lr(config, tokens_per_step)
    print(f"models: GPT-2 {parameters:,} parameters, Pion {pion_parameters:,} (d_model {args.width}, {args.depth} "
          f"layers, {heads(args.width)} heads, Pion's d_ff {config.d_ff}); Pion's default lr for "
          f"{tokens_per_step:,} tokens a step: {default:.3g}")

    peers = [Run(f"GPT-2, nanoGPT recipe, lr {lr:.2g}", "nanogpt", lr) for lr in args.peer_lrs]
    sweep = [Run(f"Pion, lr {default * factor:.2g}" + (" (default)" if factor == 1 else ""), "pion", default * factor)
             for factor in ((1.0,) if args.dry_run else PION_LR_FACTORS)]
    pion_default = next(r for r in sweep if r.lr == default)
    uncapped = Run(f"Pion, lr {default:.2g}, soft-cap off", "pion", default, soft_cap=False)
    muon_run = Run(f"Pion, Muon, AdamW lr {default:.2g}", "pion", default, optimizer="muon")
    results = train_runs(peers + sweep + [uncapped, muon_run], args, data, parameters)
    peer_best = min(peers, key=lambda r: best_loss(results[r][0]))
    seeds = {spec: [replace(spec, name=f"{spec.name}, seed {seed}", seed=seed) for seed in range(1, args.seeds)]
             for spec in (peer_best, pion_default, muon_run)}
    results.update(train_runs([r for runs in seeds.values() for r in runs], args, data, parameters))
    seeds = {spec: [spec, *runs] for spec, runs in seeds.items()}

    target = best_loss(results[peer_best][0])
    peer_tokens = tokens_to_reach(val_curve(results[peer_best][0]), target)
    report(results, target, peer_tokens)
    print(f"\npeer's best: {target:.4f} nats ({final(results[peer_best][0], 'val_bpb'):.4f} bpb) at lr "
          f"{peer_best.lr:.2g}, reached after {peer_tokens:,.0f} tokens")

    def ratios(spec):
        reached = [tokens_to_reach(val_curve(results[r][0]), target) for r in seeds[spec]]
        return [None if tokens is None else tokens / peer_tokens for tokens in reached]

    sweep_best = min(best_loss(results[r][0]) for r in sweep)
    for name, runs in (("the peer's", peers), ("Pion's", sweep)):
        best = min(runs, key=lambda r: best_loss(results[r][0]))
        if len(runs) > 1 and best in (runs[0], runs[-1]):
            print(f"  note: {name} best lr {best.lr:.2g} is at the edge of its sweep: a wider one may do better")
    gap = best_loss(results[pion_default][0]) - sweep_best
    checks = [verdict(f"Pion at its default lr {default:.2g}", ratios(pion_default), TARGET_DEFAULT),
              verdict("Pion with Muon", ratios(muon_run), TARGET_MUON)]
    print(f"  Pion's default lr is {gap:.4f} nats from the best of its sweep (target <= {TARGET_DEFAULT_GAP}) "
          f"{'PASS' if gap <= TARGET_DEFAULT_GAP else 'FAIL'}")
    checks.append(gap <= TARGET_DEFAULT_GAP)
    (capped, capped_s), (plain, plain_s) = results[pion_default], results[uncapped]
    print(f"  soft-capping: val loss {best_loss(capped):.4f} on, {best_loss(plain):.4f} off; step "
          f"{capped_s / plain_s:.2f}x the uncapped step's time (one run each on a possibly shared machine)")
    save_curves(results, args.plot)
    print(f"machine: {machine()}, {args.device}, {args.jobs} runs at a time; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{(time.perf_counter() - started) / 60:.0f} minutes")
    return {"peer_loss": target, "pass": all(checks)}


if __name__ == "__main__":
    main()
