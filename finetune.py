"""Supervised fine-tuning of a Pion checkpoint on chat data: only the assistant replies are trained.

    python finetune.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt            # OpenHermes 2.5
    python finetune.py --checkpoint checkpoints/small/pion_small_final.pt --data_file chats.jsonl --pack
    torchrun --nproc_per_node 8 finetune.py --checkpoint ... [--fsdp]

Saves save_dir/sft/pion_sft_<step>.pt and pion_sft_final.pt, which chat.py and generate.py load. The loop is
trainer.py's (precision and signals process.py's, checkpoints and resume rules runs.py's, metrics
trackers.py's); this script adds the chat data, a cosine schedule and a sample answer at each eval.
"""
import contextlib
import io
import os
import sys

import torch.distributed as dist

from chat_template import CHAT_TURN, render_conversation
from checkpoint import load_checkpoint
from cli import (ArgumentParser, PionError, add_device_arg, dataclass_from_args, non_negative_int, positive_int,
                 run_cli)
from runs import Checkpointer, is_sft_checkpoint, open_run_dir
from process import Runtime, signal_exit_code
from sft_data import collate, load_sft_splits, sft_batches
from tokenizer import load_tokenizer
from trackers import add_logger_args
from train_config import TrainConfig, add_benchmark_args, add_train_config_args, benchmark_from_args
from trainer import TrainingRun, train
from validation import EvalSample, check_sample_tokens, token_byte_lengths

PREFIX = "pion_sft"
DEFAULTS = TrainConfig(max_steps=3000, lr=2e-5, min_lr=2e-6, warmup_steps=100, batch_size=8, grad_accum=4,
                       save_interval=500, schedule="cosine")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])  # bad flags: one line, exit 2
    p.add_argument("--checkpoint", required=True, help="the model to finetune: a path or hf:OWNER/REPO/FILE")
    p.add_argument("--data_file", default=None, help="local .json, .jsonl or .parquet (ShareGPT or OpenAI rows)")
    p.add_argument("--dataset", default="teknium/OpenHermes-2.5", help="hub dataset, when no --data_file")
    p.add_argument("--pack", action="store_true", help="pack several conversations into each row")
    p.add_argument("--max_samples", type=positive_int, default=None,
                   help="train on a seeded sample of this many conversations (default: all)")
    p.add_argument("--sample_question", default="What is the capital of France?",
                   help="the question answered at each eval")
    p.add_argument("--sample_tokens", type=non_negative_int, default=48, help="tokens of that answer; 0 = none")
    add_train_config_args(p, DEFAULTS)
    add_benchmark_args(p)
    add_logger_args(p)
    p.add_argument("--refuse_soft_cap", action="store_true",
                   help="refuse a soft-capped checkpoint (to keep a model that exports to transformers exactly)")
    p.add_argument("--save_dir", default="checkpoints", help="checkpoints go to SAVE_DIR/sft/")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in the save dir")
    p.add_argument("--tokenize_workers", type=non_negative_int, default=None,
                   help="processes that tokenize the data (default: by data size; 0 = this process)")
    add_device_arg(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    return p.parse_args(argv)


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


def eval_sample(args, tokenizer):
    """The greedy answer to a fixed question, up to the end of the reply or the start of a user turn."""
    if not args.sample_tokens:
        return None
    prompt, _ = render_conversation(tokenizer, [{"role": "user", "content": args.sample_question}],
                                    add_generation_prompt=True)
    return EvalSample(tokenizer, prompt, args.sample_tokens, shown_prompt=args.sample_question,
                      turn=CHAT_TURN, strip=True)


def load_data(args, config, tokenizer, rt):
    """Rank 0 tokenizes (and fills datasets' cache) first; the other ranks then read the cache."""
    if rt.distributed and not rt.is_main:
        dist.barrier()
    quiet = contextlib.nullcontext() if rt.is_main else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        train_rows, val_rows = load_sft_splits(tokenizer, config.seq_len, args.data_file, args.dataset, pack=args.pack,
                                               max_samples=args.max_samples, seed=config.seed,
                                               num_proc=args.tokenize_workers)
    if rt.distributed and rt.is_main:
        dist.barrier()
    if len(val_rows) < rt.world_size:
        raise PionError(f"{len(val_rows)} validation row(s) for {rt.world_size} processes: use more data "
                        f"(validation holds out 1% of the conversations)")
    return train_rows, val_rows


def finetune(args, config, rt):
    run_dir = os.path.join(args.save_dir, "sft")
    with open_run_dir(run_dir, PREFIX, args.resume, lock=rt.is_main) as resume:  # locked until the run ends
        checkpointer = Checkpointer(run_dir, PREFIX, rt, resume, config.seed)
        # A resumed run continues from its own checkpoint (weights, optimizer, RNG, data position);
        # --checkpoint only names where the run started.
        source = resume or args.checkpoint
        model = checkpointer.resumed_model() if resume else load_checkpoint(source)[0]
        if model.config.soft_capped and args.refuse_soft_cap:
            raise PionError(f"{source} was trained with soft-capped attention (use_soft_cap=True); plain SDPA would "
                            f"change what it computes: drop --refuse_soft_cap")
        if config.seq_len > model.config.max_seq_len:
            raise PionError(f"--seq_len {config.seq_len} is larger than the model's max_seq_len "
                            f"{model.config.max_seq_len}")
        check_sample_tokens(args.sample_tokens, model.config.max_seq_len)
        if resume and not is_sft_checkpoint(checkpointer.resumed):  # e.g. a pretraining checkpoint given as --resume
            raise PionError(f"{resume} is not a finetune.py checkpoint; to finetune it, pass it as --checkpoint")

        tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
        train_rows, val_rows = load_data(args, config, tokenizer, rt)
        # The data stream is in global batches (all ranks' rows of one micro-step), so its position depends
        # only on the samples seen. Static shapes under CUDA or --compile: no recompiles or allocator churn.
        global_batch = config.batch_size * rt.world_size
        pad_to = config.seq_len if rt.device.type == "cuda" or config.compile else None
        rt.print(f"Pion SFT: {model.count_parameters():,} parameters on {rt.device} x {rt.world_size}, "
                 f"{'soft-capped' if model.config.soft_capped else 'SDPA'} attention, {len(train_rows):,} train rows, "
                 f"{global_batch * config.grad_accum:,} rows/step")
        rt.print(f"cosine schedule: warmup {config.warmup_steps}, lr {config.lr:g} to {config.min_lr:g} at step "
                 f"{config.max_steps}")
        run = TrainingRun(
            train_batches=lambda start: rank_slices(sft_batches(train_rows, global_batch, config.seed,
                                                                start // global_batch, pad_to), rt),
            val_batches=lambda: val_batches(val_rows, config.batch_size, rt, pad_to),
            checkpointer=checkpointer,
            sample=eval_sample(args, tokenizer), saved_with={"trainer": "sft", "source": args.checkpoint},
            data_identity={"data": os.path.basename(args.data_file) if args.data_file else args.dataset,
                           "train_rows": len(train_rows), "pack": args.pack},
            token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size),
            benchmark=benchmark_from_args(args, tokenizer, model.config.vocab_size),
            loggers=args.logger, plot=True)
        state = train(model, config, rt, run)
        if state.finished:
            rt.print(f"done: {state.step} steps, {state.tokens_seen:,} tokens; "
                     f"chat with it: python chat.py --checkpoint {os.path.join(run_dir, PREFIX + '_final.pt')}")
        return state


def main(argv=None):
    args = parse_args(argv)
    config = dataclass_from_args(TrainConfig, args, schedule="cosine")
    rt = Runtime(args.device)
    try:
        state = finetune(args, config, rt)
    finally:
        rt.close()
    if not state.finished:  # saved after a signal: a pipeline (finetune.py && ...) must not go on
        sys.exit(signal_exit_code(state.stopped_by))

if __name__ == "__main__":
    run_cli(main)
