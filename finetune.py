"""Supervised fine-tuning of a Pion checkpoint on chat data: only the assistant replies are trained.

    python finetune.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt            # OpenHermes 2.5
    python finetune.py --checkpoint checkpoints/small/pion_small_final.pt --data_file chats.jsonl --pack
    torchrun --nproc_per_node 8 finetune.py --checkpoint ... [--fsdp]

Saves save_dir/sft/pion_sft_<step>.pt and pion_sft_final.pt, which chat.py and generate.py load. The loop,
precision, metrics, checkpoints, signals and resume are train.py's (run_training); this file adds the chat
data, a cosine schedule and a sample answer at each eval. --num_workers is the number of processes that
tokenize the data (default: by data size; 0 = this process).
"""
import contextlib
import io
import math
import os

import torch.distributed as dist

import model as pion
from generate import ArgumentParser, generate_text
from model import PionError
from sft_data import USER_MARKER, collate, load_sft_splits, render_conversation, sft_batches
from train import (Runtime, add_training_args, build_optimizer, check_save_dir, find_resume_checkpoint,
                   prepare_model, restore_optimizer_and_rng, run_training, seed_everything)

PREFIX = "pion_sft"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])  # bad flags: one line, exit 2
    p.add_argument("--checkpoint", required=True, help="the model to finetune: a path or hf:OWNER/REPO/FILE")
    p.add_argument("--data_file", default=None, help="local .json, .jsonl or .parquet (ShareGPT or OpenAI rows)")
    p.add_argument("--dataset", default="teknium/OpenHermes-2.5", help="hub dataset, when no --data_file")
    p.add_argument("--pack", action="store_true", help="pack several conversations into each row")
    p.add_argument("--max_samples", type=int, default=None, help="train on a seeded sample of this many conversations")
    p.add_argument("--sample_question", default="What is the capital of France?",
                   help="the question answered at each eval")
    add_training_args(p, lr=2e-5, min_lr=2e-6, warmup_steps=100, max_steps=3000, batch_size=8, grad_accum=4,
                      save_interval=500)
    p.set_defaults(num_workers=None)  # tokenizing processes; None lets load_sft_splits pick by data size
    args = p.parse_args(argv)
    if args.warmup_steps < 0 or (args.num_workers is not None and args.num_workers < 0):
        p.error("--warmup_steps and --num_workers must be >= 0")
    if args.max_samples is not None and args.max_samples <= 0:
        p.error("--max_samples must be a positive integer")
    return args


def cosine_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to lr, then half a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def rank_slices(batches, rt):
    """Each rank trains on its own rows of every global batch: together the ranks see what one process
    would, and the stream's position depends only on the global step."""
    for batch in batches:
        yield {key: value[rt.rank::rt.world_size] for key, value in batch.items()}


def val_batches(rows, batch_size, rt, pad_to):
    """One pass over the validation rows, this rank's share. Every rank gets the same number of batches
    (FSDP gathers in each forward, so ranks must step together): up to world_size - 1 rows are left out."""
    mine = range(rt.rank, len(rows) - len(rows) % rt.world_size, rt.world_size)
    for start in range(0, len(mine), batch_size):  # lazily: an eval reads only eval_steps batches
        yield collate([rows[i] for i in mine[start:start + batch_size]], pad_to)


def make_sample_fn(args, tokenizer):
    """The greedy answer to a fixed question, up to the end of the reply or the start of a user turn.
    Greedy and seedless, so it draws nothing from the RNG that a resumed run must reproduce."""
    prompt, _ = render_conversation(tokenizer, [{"role": "user", "content": args.sample_question}],
                                    add_generation_prompt=True)

    def sample(model):
        answer = generate_text(model, tokenizer, prompt, args.sample_tokens, stop_strings=(USER_MARKER,),
                               temperature=0.0)[0]  # generate() stops at <|endoftext|> itself
        return f"{args.sample_question} -> {answer.strip()}"

    return sample


def load_data(args, tokenizer, rt):
    """Rank 0 tokenizes (and fills datasets' cache) first; the other ranks then read the cache."""
    if rt.distributed and not rt.is_main:
        dist.barrier()
    quiet = contextlib.nullcontext() if rt.is_main else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        train_rows, val_rows = load_sft_splits(tokenizer, args.seq_len, args.data_file, args.dataset, pack=args.pack,
                                               max_samples=args.max_samples, seed=args.seed,
                                               num_proc=args.num_workers)
    if rt.distributed and rt.is_main:
        dist.barrier()
    if len(val_rows) < rt.world_size:
        raise PionError(f"{len(val_rows)} validation row(s) for {rt.world_size} processes: use more data "
                        f"(validation holds out 1% of the conversations)")
    return train_rows, val_rows


def main(argv=None):
    args = parse_args(argv)
    rt = Runtime(args.device)
    try:
        finetune(args, rt)
    finally:
        rt.close()


def finetune(args, rt):
    save_dir = os.path.join(args.save_dir, "sft")
    resume = find_resume_checkpoint(save_dir, PREFIX) if args.resume == "auto" else args.resume
    check_save_dir(save_dir, PREFIX, resuming=resume is not None or args.resume == "auto")

    seed_everything(args.seed)
    # A resumed run continues from its own checkpoint (weights, optimizer, RNG, data position);
    # --checkpoint only names where the run started.
    source = resume or args.checkpoint
    model, checkpoint = pion.load_checkpoint(source)
    if model.config.use_soft_cap and args.no_soft_cap:
        raise PionError(f"{source} was trained with soft-capped attention (use_soft_cap=True); plain SDPA would "
                        f"change what it computes: drop --no_soft_cap")
    if args.seq_len > model.config.max_seq_len:
        raise PionError(f"--seq_len {args.seq_len} is larger than the model's max_seq_len {model.config.max_seq_len}")
    state = {"step": 0, "tokens_seen": 0, "samples_seen": 0}
    if resume:
        if "checkpoint" not in checkpoint.get("args", {}):  # e.g. a pretraining checkpoint given as --resume
            raise PionError(f"{resume} is not a finetune.py checkpoint; to finetune it, pass it as --checkpoint")
        state = {key: checkpoint.get(key, 0) for key in state}
        rt.print(f"resuming from {resume} at step {state['step']}")
    else:
        checkpoint = None  # the weights are in the model now: free the copy

    tokenizer = pion.load_tokenizer(args.tokenizer)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise PionError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but {source} only "
                        f"{model.config.vocab_size}: pass the tokenizer it was trained with")
    train_rows, val_rows = load_data(args, tokenizer, rt)

    wrapped = prepare_model(model, args, rt)
    optimizer = build_optimizer(wrapped, args, rt)
    if resume:
        restore_optimizer_and_rng(resume, checkpoint, wrapped, optimizer)
        checkpoint = None

    # The data stream is in global batches (all ranks' rows of one micro-step), so its position depends
    # only on the samples seen. Static shapes under CUDA or --compile: no recompiles or allocator churn.
    global_batch = args.batch_size * rt.world_size
    samples_per_step = global_batch * args.grad_accum
    pad_to = args.seq_len if rt.device.type == "cuda" or args.compile else None
    rt.print(f"Pion SFT: {model.count_parameters():,} parameters on {rt.device} x {rt.world_size}, "
             f"{'soft-capped' if model.config.use_soft_cap else 'SDPA'} attention, {len(train_rows):,} train rows, "
             f"{samples_per_step:,} rows/step")
    rt.print(f"cosine schedule: warmup {args.warmup_steps}, lr {args.lr:g} to {args.min_lr:g} at step {args.max_steps}")
    finished = run_training(
        args=args, rt=rt, model=model, wrapped=wrapped, optimizer=optimizer,
        lr_at=lambda step: cosine_lr(step, args.lr, args.min_lr, args.warmup_steps, args.max_steps),
        make_batches=lambda start: rank_slices(sft_batches(train_rows, global_batch, args.seed,
                                                           start // global_batch, pad_to), rt),
        make_val_batches=lambda: val_batches(val_rows, args.batch_size, rt, pad_to),
        save_dir=save_dir, prefix=PREFIX, state=state, sample_fn=make_sample_fn(args, tokenizer),
        samples_per_step=samples_per_step)
    if finished:
        rt.print(f"done: {state['step']} steps, {state['tokens_seen']:,} tokens; "
                 f"chat with it: python chat.py --checkpoint {os.path.join(save_dir, PREFIX + '_final.pt')}")


if __name__ == "__main__":
    pion.run_cli(main)
