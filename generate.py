"""Sample text from a Pion checkpoint.

    python generate.py --checkpoint PATH --prompt "Once upon a time"
    python generate.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt   # interactive

Decoding is decoding.py's: one prefill of the batch, then one token per step over a preallocated KV cache.
"""
import sys

from checkpoint import load_model
from quantize import quantize
from tokenizer import load_tokenizer
from cli import (ArgumentParser, add_inference_args, dataclass_from_args, positive_int, run_cli, typed_lines,
                 use_one_line_warnings, valid_text)
from decoding import (COMPILE_NOTICE, DecodeTimer, PromptTruncatedWarning, SamplingSettings, TextStream,
                      add_sampling_args, cache_length, generate_tokens, prompt_rows, seeded_generator,
                      stream_text)
from hardware import decode_bytes_per_step


def parse_args(argv=None):
    parser = ArgumentParser(description="Sample text from a Pion checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file, or hf:OWNER/REPO/FILE")
    parser.add_argument("--prompt", action="append",
                        help="repeat for several prompts, decoded as one batch; none: interactive prompts")
    add_sampling_args(parser, SamplingSettings(temperature=0.8, top_k=200), max_tokens=200)
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable); not printed")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="samples per prompt")
    add_inference_args(parser)
    parser.add_argument("--no_stream", action="store_true", help="print each text whole at the end")
    args = parser.parse_args(argv)
    if any(not s for s in args.stop):
        parser.error("argument --stop: must not be empty")
    return args


def complete(model, tokenizer, prompts, args, generator, echo_prompt):
    """Generate for the prompts (x num_samples) as one batch and print them, streaming a single one."""
    texts = [valid_text(prompt) for prompt in prompts for _ in range(args.num_samples)]
    rows = prompt_rows([tokenizer.encode(text).ids for text in texts])  # an empty prompt is <|endoftext|>
    stream = len(rows) == 1 and not args.no_stream
    # A prompt longer than the context left keeps only its last tokens (PromptTruncatedWarning says so): the
    # tokens it drops are not prefilled, so the prefill speed counts only those kept.
    kept = sum(min(len(row), model.config.max_seq_len - args.max_tokens) for row in rows)
    columns = DecodeTimer(generate_tokens(model, rows, args.max_tokens, dataclass_from_args(SamplingSettings, args), generator,
                                          compile=args.compile), kept,
                          decode_bytes_per_step(model, len(rows), cache_length(model, rows, args.max_tokens)),
                          model.embed.weight.device)
    streams = [TextStream(tokenizer, args.stop) for _ in rows]
    if stream and echo_prompt:
        sys.stdout.write(texts[0])
    for _, piece in stream_text(columns, streams):
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if stream:
        print()
    else:
        for i, (prompt, row) in enumerate(zip(texts, streams)):
            if len(rows) > 1:
                print(f"--- sample {i + 1} of {len(rows)} ---")
            print((prompt if echo_prompt else "") + row.text)
    print(columns.report(), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    use_one_line_warnings(PromptTruncatedWarning)
    model, device, _ = load_model(args.checkpoint, args.device, args.dtype)
    model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    generator = seeded_generator(device, args.seed)
    if args.compile:
        print(COMPILE_NOTICE, file=sys.stderr)
    if args.prompt:
        try:
            complete(model, tokenizer, args.prompt, args, generator, echo_prompt=True)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(130)
        return
    print("Type a prompt; quit, exit or Ctrl-D ends.", file=sys.stderr)
    for prompt in typed_lines():
        if prompt.strip() in ("quit", "exit"):
            return
        try:
            complete(model, tokenizer, [prompt], args, generator, echo_prompt=False)
        except KeyboardInterrupt:  # stops this answer, not the session
            print("\n[interrupted]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
