"""Evaluate a Pion checkpoint: benchmark tasks through lm-evaluation-harness, and/or validation loss and bits
per byte on a pretraining data set.

    python eval.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt --tasks hellaswag,arc_easy,piqa
    python eval.py --checkpoint checkpoints/sft/pion_sft_final.pt --tasks arc_easy --apply_chat_template
    python eval.py --checkpoint checkpoints/nano/pion_nano_final.pt --data_dir data/mixed

Tasks are the harness's (`lm_eval ls tasks`) or YAML files of your own in --include_path. The scoring is
harness.py's; needs `pip install lm-eval` (requirements-dev.txt) for --tasks.
"""
import json
import os
import sys

from cli import ArgumentParser, PionError, add_model_args, import_optional, positive_int, run_cli
from files import atomic_write


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a path or hf:OWNER/REPO/FILE")
    p.add_argument("--tasks", default=None, help="comma-separated harness tasks, e.g. hellaswag,arc_easy")
    p.add_argument("--limit", type=positive_int, default=None, help="examples per task (default: all)")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--batch_size", type=positive_int, default=16,
                   help="contexts per forward (a question's choices share one); --data_dir: sequences per batch")
    p.add_argument("--include_path", default=None, help="folder of task YAML files of your own")
    p.add_argument("--apply_chat_template", action="store_true", help="prompt an SFT model with its chat template")
    p.add_argument("--output_path", default=None, help="write results.json into this folder")
    p.add_argument("--data_dir", default=None, help="report val loss and bits per byte on this data's val split")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help="--data_dir: tokens per sequence (default: the model's max_seq_len, at most the shards')")
    p.add_argument("--eval_steps", type=positive_int, default=None, help="--data_dir: batches (default: all)")
    add_model_args(p)
    args = p.parse_args(argv)
    if not args.tasks and not args.data_dir:
        p.error("nothing to evaluate: pass --tasks, --data_dir or both")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        p.error("--num_fewshot must be >= 0")
    return args


def validation_metrics(args, model, tokenizer, device):
    """Val loss and bpb over the val split of a pretraining data dir, as the trainer computes them."""
    import data
    from process import Runtime
    from validation import evaluate, token_byte_lengths
    seq_len = args.seq_len or min(model.config.max_seq_len, data.PretrainData(args.data_dir, 1, "val").width)
    if seq_len > model.config.max_seq_len:
        raise PionError(f"--seq_len {seq_len} is larger than the model's max_seq_len {model.config.max_seq_len}")
    val_data = data.PretrainData(args.data_dir, seq_len, "val")
    val_data.check_tokens(model.config.vocab_size)
    batches = data.create_dataloader(args.data_dir, "val", args.batch_size, seq_len, model.config.vocab_size,
                                     opened=val_data)
    n_batches = -(-val_data.n_samples // args.batch_size)
    steps = min(args.eval_steps or n_batches, n_batches)
    from tqdm import tqdm

    def counted(batches, bar):
        for batch in batches:
            bar.update(1)  # as each batch is handed over: evaluate never asks for one past its last
            yield batch
    with tqdm(total=steps, desc="val", unit="batch", file=sys.stderr) as bar:
        return evaluate(model, counted(batches, bar), Runtime(str(device)), steps,
                        token_byte_lengths(tokenizer, model.config.vocab_size))


def main(argv=None):
    args = parse_args(argv)
    tasks = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if args.output_path:
        check_new_results(args.output_path)  # before the slow part: a finished evaluation must have a place to go
    if tasks:
        harness = import_optional("harness", "--tasks", "lm-eval")
        manager = harness.task_manager(tasks, args.include_path)  # unknown names fail before the model loads
    from checkpoint import load_model
    from tokenizer import load_tokenizer
    from quantize import quantize
    model, device, _ = load_model(args.checkpoint, args.device, args.dtype)
    model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    print(f"{args.checkpoint}: {model.count_parameters():,} parameters, "
          f"{'soft-capped' if model.config.soft_capped else 'SDPA'} attention, on {device}", file=sys.stderr)

    report = {}
    if args.data_dir:
        report["validation"] = validation_metrics(args, model, tokenizer, device)
        print(f"{args.data_dir}: val loss {report['validation']['val_loss']:.4f}, "
              f"bpb {report['validation']['val_bpb']:.4f}")
    if tasks:
        from lm_eval.utils import handle_non_serializable, make_table
        lm = harness.PionLM(model, tokenizer, batch_size=args.batch_size, tokenizer_path=args.tokenizer)
        results = harness.run_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                       apply_chat_template=args.apply_chat_template)
        results["config"]["model"] = args.checkpoint
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        report.update(results)
    if args.output_path:
        path = check_new_results(args.output_path)
        text = json.dumps(report, indent=2, default=handle_non_serializable if tasks else str)
        try:
            os.makedirs(args.output_path, exist_ok=True)
        except OSError as e:
            raise PionError(f"cannot create --output_path {args.output_path}: {e.strerror or e}")
        atomic_write(path, lambda f: f.write(text.encode()))
        print(f"wrote {path}", file=sys.stderr)


def check_new_results(output_path):
    """DIR/results.json, refused when it exists (an earlier evaluation's results are never overwritten) or
    when DIR cannot be made: its nearest existing folder must be a writable folder, not a file."""
    path = os.path.join(output_path, "results.json")
    if os.path.exists(path):
        raise PionError(f"{path} already exists; choose another --output_path (results are never overwritten)")
    existing = os.path.abspath(output_path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PionError(f"--output_path {output_path}: {existing} is a file, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PionError(f"--output_path {output_path}: cannot write into {existing} (permission denied)")
    return path


if __name__ == "__main__":
    run_cli(main)
