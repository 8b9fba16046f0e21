"""Pretrain Pion: WSD schedule, bf16 autocast, gradient checkpointing, exact resume, DDP or FSDP2.

    python train.py --model_size nano --data_dir data/mixed
    torchrun --nproc_per_node 8 train.py --model_size small --data_dir data/mixed [--fsdp]

The loop is trainer.py's, the process and precision process.py's, checkpoints and resume rules runs.py's;
this script picks the model and the data.
"""
import json
import os
import sys

import numpy as np

import data
import model as pion
from cli import ArgumentParser, PionError, add_device_arg, dataclass_from_args, non_negative_int, run_cli
from runs import Checkpointer, check_same_model, open_run_dir
from process import Runtime, signal_exit_code
from tokenizer import PAD_ID, load_tokenizer
from trackers import add_logger_args
from train_config import (TrainConfig, add_benchmark_args, add_train_config_args, benchmark_from_args,
                          with_default_lr, wsd_decay_start)
from trainer import TrainingRun, memory_test, train
from validation import EvalSample, check_sample_tokens, token_byte_lengths

DEFAULTS = TrainConfig(max_steps=100_000, lr=None, min_lr=None, warmup_steps=1000, batch_size=64, grad_accum=2,
                       save_interval=1000)  # lr, min_lr: train_config.default_lr's rule for the model and batch
LR_HELP = {"lr": "peak learning rate (default: train_config.default_lr for the model's width and the tokens per step, "
                 "1e-3 for small at the default batch; printed at start)",
           "min_lr": "learning rate at the end of the schedule (default: a tenth of the peak)"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_size", choices=list(pion.SIZES), default="small", help="see `python model.py`")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a PionConfig field of the size, e.g. --override n_layers=8 (repeatable)")
    p.add_argument("--data_dir", default=None, help="folder of shard_*.npy (see data_prep.py)")
    add_train_config_args(p, DEFAULTS, LR_HELP)
    add_benchmark_args(p)
    add_logger_args(p)
    p.add_argument("--no_soft_cap", action="store_true",
                   help="plain SDPA attention without logit soft-capping: soft-capping costs about a quarter of a "
                        "GPU step's throughput and did not change the loss at small scale, where QK-norm already "
                        "keeps the logits small (docs/performance.md). Turn it off for speed or an exact Qwen3 "
                        "export; it stays on by default as a guard against attention logits growing in long or "
                        "high-lr runs")
    p.add_argument("--save_dir", default="checkpoints", help="checkpoints go to SAVE_DIR/MODEL_SIZE/")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in the save dir")
    p.add_argument("--num_workers", type=non_negative_int, default=4, help="data loader processes")
    add_device_arg(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON for the eval samples (default: the Pion one)")
    p.add_argument("--sample_prompt", default=None,
                   help="prompt of the sample at each eval (default: the first 16 tokens of the validation data)")
    p.add_argument("--sample_tokens", type=non_negative_int, default=48, help="tokens of that sample; 0 = none")
    p.add_argument("--memory_test", action="store_true",
                   help="run two real training steps and their saves, report peak memory, exit")
    args = p.parse_args(argv)
    if not args.memory_test and args.data_dir is None:
        p.error("--data_dir is required (see `python data_prep.py --help` to get data)")
    return args


def config_overrides(pairs):
    """["n_layers=8", "rope_theta=5e5"] -> {"n_layers": 8, "rope_theta": 500000.0}"""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PionError(f"--override expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise PionError(f"--override {pair!r}: {value!r} is not a number or true/false")
    return overrides


def model_config(args, **config):
    """The PionConfig the flags ask for: --model_size, --no_soft_cap and --override."""
    return pion.get_config(args.model_size, **{"use_soft_cap": not args.no_soft_cap, **config,
                                               **config_overrides(args.override)})


def eval_sample(args, tokenizer, vocab_size, rt, start):
    """A short greedy continuation of a fixed prompt, printed at each eval: --sample_prompt, or `start`, the
    first ids of the validation data (text like the data's, whatever it is)."""
    if not args.sample_tokens:
        return None
    if tokenizer.get_vocab_size() > vocab_size:  # a toy vocabulary (e.g. --override vocab_size=512)
        rt.print(f"no samples: the tokenizer's {tokenizer.get_vocab_size()} ids exceed vocab_size {vocab_size}")
        return None
    if args.sample_prompt is None:
        prompt = [t for t in start if t != PAD_ID]
        text = tokenizer.decode(prompt)
    else:
        text, prompt = args.sample_prompt, tokenizer.encode(args.sample_prompt).ids
    return EvalSample(tokenizer, prompt, args.sample_tokens, shown_prompt=text)


def run_memory_test(args, config, rt):
    """train.py's run, but two steps of random tokens into a temporary folder (trainer.memory_test): the same
    model, batch layout, tokenizer (for val_bpb and the eval sample) and saves."""
    model = pion.Pion(model_config(args, max_seq_len=max(config.seq_len, 2048)))
    check_sample_tokens(args.sample_tokens, model.config.max_seq_len)
    tokenizer = load_tokenizer(args.tokenizer)
    rt.print(f"memory test: two training steps of Pion-{args.model_size}, batch {config.batch_size} x seq "
             f"{config.seq_len} x {config.grad_accum} micro-batches, with a checkpoint save, a validation and the "
             f"final save into a temporary folder, on {rt.device.type}...")
    sample = eval_sample(args, tokenizer, model.config.vocab_size, rt, start=range(3, 19))
    measured = memory_test(model, config, rt, token_byte_lengths(tokenizer, model.config.vocab_size), sample)
    if measured is None:
        rt.print(f"memory test: out of memory at batch {config.batch_size} x seq {config.seq_len}")
        return False
    (used, total), (host_used, host_total) = measured
    host = f"; host memory peak {host_used / 1e9:.2f} GB of {host_total / 1e9:.1f} GB ({host_used / host_total:.0%})"
    rt.print(f"memory test: Pion-{args.model_size}, batch {config.batch_size} x seq {config.seq_len}, "
             f"checkpointing {'on' if config.gradient_checkpointing else 'off'}, soft-cap "
             f"{'off' if args.no_soft_cap else 'on'}: peak {used / 1e9:.2f} GB of {total / 1e9:.1f} GB "
             f"({used / total:.0%}) on {rt.device.type}{host if rt.device.type != 'cpu' else ''}")
    return used < total and host_used < host_total


def pretrain(args, config, rt):
    run_dir = os.path.join(args.save_dir, args.model_size)
    prefix = f"pion_{args.model_size}"
    with open_run_dir(run_dir, prefix, args.resume, lock=rt.is_main) as resume:  # locked until the run ends
        checkpointer = Checkpointer(run_dir, prefix, rt, resume, config.seed)
        if resume:
            model = checkpointer.resumed_model()
            check_same_model(resume, model.config, model_config(args))
        else:
            model = pion.Pion(model_config(args))
        if config.seq_len > model.config.max_seq_len:
            raise PionError(f"--seq_len {config.seq_len} is larger than the model's max_seq_len "
                            f"{model.config.max_seq_len}")
        check_sample_tokens(args.sample_tokens, model.config.max_seq_len)
        config = with_default_lr(config, model.config, rt.world_size, rt.print,
                                 resumed=checkpointer.resumed.get("train_config") if resume else None)

        # Both splits are checked before step 1: bad validation data must not end a run at its first eval.
        train_data = data.PretrainData(args.data_dir, config.seq_len, "train")
        val_data = data.PretrainData(args.data_dir, config.seq_len, "val")
        for split in (train_data, val_data):
            split.check_tokens(model.config.vocab_size)
        tokenizer = load_tokenizer(args.tokenizer)  # its byte lengths give val_bpb; --eval_tasks encodes with it
        loader_args = dict(batch_size=config.batch_size, seq_len=config.seq_len, vocab_size=model.config.vocab_size,
                           rank=rt.rank, world_size=rt.world_size, pin_memory=rt.device.type == "cuda")
        tokens_per_step = config.batch_size * config.grad_accum * rt.world_size * config.seq_len
        rt.print(f"Pion-{args.model_size}: {model.count_parameters():,} parameters on {rt.device} x {rt.world_size}, "
                 f"{tokens_per_step:,} tokens/step, {train_data.n_samples:,} train samples/epoch")
        rt.print(f"WSD schedule: warmup {config.warmup_steps}, constant until step "
                 f"{wsd_decay_start(config.max_steps, config.decay_frac)}, decay to {config.min_lr:g} at "
                 f"{config.max_steps}")
        run = TrainingRun(
            train_batches=lambda start: data.create_dataloader(args.data_dir, "train", seed=config.seed,
                                                               start_sample=start, num_workers=args.num_workers,
                                                               opened=train_data, **loader_args),
            val_batches=lambda: data.create_dataloader(args.data_dir, "val", num_workers=0, opened=val_data,
                                                       **loader_args),
            checkpointer=checkpointer,
            sample=eval_sample(args, tokenizer, model.config.vocab_size, rt,
                               val_data.batch(np.array([0]))["input_ids"][0, :16].tolist()),
            saved_with={"trainer": "pretrain"}, data_identity=train_data.identity(),
            token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size),
            benchmark=benchmark_from_args(args, tokenizer, model.config.vocab_size),
            loggers=args.logger, plot=True)
        state = train(model, config, rt, run)
        if state.finished:
            rt.print(f"done: {state.tokens_seen:,} tokens in {state.step} steps")
        return state


def main(argv=None):
    args = parse_args(argv)
    config = dataclass_from_args(TrainConfig, args, schedule="wsd")
    rt = Runtime(args.device)
    try:
        if args.memory_test:
            config = with_default_lr(config, model_config(args), rt.world_size, rt.print)
            if not run_memory_test(args, config, rt):
                sys.exit(1)
            return
        state = pretrain(args, config, rt)
    finally:
        rt.close()
    if not state.finished:  # saved after a signal: a pipeline (train.py && export_hf.py) must not go on
        sys.exit(signal_exit_code(state.stopped_by))


if __name__ == "__main__":
    run_cli(main)
