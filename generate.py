"""Sample text from a Pion checkpoint.

    python generate.py --checkpoint PATH --prompt "Once upon a time"
    python generate.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt   # interactive

`generate()` is the repo's one decoding loop (train.py and finetune.py call it for samples, chat.py for
answers): a preallocated KV cache, one prefill of the left-padded batch, then one token per step.
`StreamingDetokenizer` and `TextStream` turn the tokens into printable text as they arrive.
"""
import argparse
import functools
import math
import sys
import time
import warnings

import torch

from model import EOS_ID, PAD_ID, PionError, load_checkpoint, load_tokenizer, run_cli


class PromptTruncatedWarning(UserWarning):
    """A prompt did not fit in the context left after max_new_tokens: only its last tokens were kept."""


# ----------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty, generator):
    """logits (B, V) fp32 -> the next token of each row (B,). seen (B, V) bool marks the tokens already in
    each row (prompt and output) for the repetition penalty, or is None. Every filter works row by row."""
    if seen is not None:
        # CTRL's penalty: an already-present token gets less likely whatever the sign of its logit.
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    candidates = None  # token ids of the columns of logits/probs, when they are not the whole vocabulary
    if 0 < top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, so top-p needs no full-vocab sort
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        if candidates is None:
            probs, candidates = probs.sort(dim=-1, descending=True)
        # Nucleus: keep the most likely tokens until they cover top_p (the one that crosses it included).
        covered_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(covered_before >= top_p, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    # argmax(p / Exp(1)) is a draw from p (unnormalized is fine) without multinomial's host sync. The clamp
    # keeps a zero-probability token from winning by 0/0 = NaN when a draw is exactly 0.
    noise = torch.empty_like(probs).exponential_(1, generator=generator).clamp_(min=1e-20)
    choice = (probs / noise).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# The decoding loop


def decode_one_token(model, token, kv_cache, input_pos):
    """One decoding step: token (B, 1) at cache position input_pos ((1,) tensor) -> logits (B, V) of the
    position after it. Every step has the same shapes and changes no Python state, so one compiled graph
    serves every step of a generation (--compile)."""
    return model(token, kv_cache=kv_cache, input_pos=input_pos)["logits"][:, -1]


@functools.cache
def compiled_decode_step(device_type):
    """decode_one_token, torch.compile'd once per process; on CUDA in reduce-overhead mode, which uses CUDA
    graphs where torch can (it skips them for graphs that write to inputs, such as the cache)."""
    return torch.compile(decode_one_token, mode="reduce-overhead" if device_type == "cuda" else None)


def prompt_rows(prompt_ids):
    """A list of ints, a list of lists, or a (T,) / (B, T) tensor -> a list of rows (lists of ints)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not len(prompt_ids) or isinstance(prompt_ids[0], int):
        prompt_ids = [prompt_ids]
    rows = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in prompt_ids]
    # An empty prompt starts a new document: <|endoftext|> is what precedes every document in training.
    return [row or [EOS_ID] for row in rows]


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, stop_ids=(EOS_ID,), generator=None, on_token=None, stats=None, compile=False):
    """Continue each prompt by up to max_new_tokens tokens; returns one list of new token ids per prompt.

    prompt_ids: one prompt (list of ints or a (T,) tensor) or several (list of lists or a (B, T) tensor),
        decoded together as one batch, left-padded to the longest. A prompt longer than the context left
        (model.config.max_seq_len - max_new_tokens) keeps its last tokens, with a PromptTruncatedWarning.
    temperature: 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch those filters off.
    stop_ids: a row ends at any of these tokens, which is not returned.
    generator: a torch.Generator on the model's device for the sampling noise (seed it for repeatable text).
    on_token(row, token) -> bool: called with each returned token as soon as it is chosen; return True
        to end that row there (chat.py and the CLI end a row at a stop string this way).
    stats: an optional dict, filled with prompt_tokens, new_tokens, prefill_seconds, decode_seconds and
        decode_tokens (batch rows x decode steps).
    compile: run the decoding steps through torch.compile (the first call with a new shape compiles).
    The model may be in train mode (train.py's samples): it is run in eval mode and switched back after.
    """
    rows = prompt_rows(prompt_ids)
    if max_new_tokens < 1:
        return [[] for _ in rows]
    context = model.config.max_seq_len
    if max_new_tokens >= context:
        warnings.warn(f"max_new_tokens {max_new_tokens} does not fit in the {context}-token context; "
                      f"generating at most {context - 1}", PromptTruncatedWarning, stacklevel=3)
        max_new_tokens = context - 1
    room = context - max_new_tokens
    for i, row in enumerate(rows):
        if len(row) > room:
            warnings.warn(f"the prompt has {len(row)} tokens but only {room} fit with {max_new_tokens} new "
                          f"ones in the {context}-token context: keeping its last {room}",
                          PromptTruncatedWarning, stacklevel=3)
            rows[i] = row[-room:]

    device = model.embed.weight.device
    batch, longest = len(rows), max(len(row) for row in rows)
    padding = [longest - len(row) for row in rows]
    input_ids = torch.tensor([[PAD_ID] * pad + row for pad, row in zip(padding, rows)], device=device)
    # key_start tells the model where each row really starts: padding is masked out and every row gets
    # its own rotary positions, so a padded row decodes exactly like the same prompt alone.
    key_start = torch.tensor(padding, device=device) if any(padding) else None
    seen = None
    if repetition_penalty != 1.0:
        is_real = torch.tensor([[0] * pad + [1] * len(row) for pad, row in zip(padding, rows)], device=device)
        vocab = model.config.vocab_size
        seen = torch.zeros(batch, vocab, dtype=torch.long, device=device).scatter_add_(1, input_ids, is_real) > 0
    stop_ids = set(stop_ids)
    outputs = [[] for _ in rows]
    finished = [False] * batch

    decode_step = compiled_decode_step(device.type) if compile else decode_one_token
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        kv_cache = model.new_kv_cache(batch, longest + max_new_tokens, key_start=key_start)
        logits = model(input_ids, kv_cache=kv_cache, last_only=True)["logits"][:, -1]
        input_pos = torch.tensor([longest], device=device)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty,
                                           generator)
            chosen = next_token.tolist()  # the one host sync per step: we must know whether to stop
            if step == 0:
                prefill_end = time.perf_counter()
            for row, token in enumerate(chosen):
                if finished[row]:
                    continue  # a finished row is still fed (one batch, one shape) but its tokens are dropped
                if token in stop_ids:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None and on_token(row, token):
                    finished[row] = True
            if all(finished) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, next_token[:, None], True)
            logits = decode_step(model, next_token[:, None], kv_cache, input_pos)
            input_pos += 1
        end = time.perf_counter()
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(prompt_tokens=sum(map(len, rows)), new_tokens=sum(map(len, outputs)),
                     prefill_seconds=prefill_end - start, decode_seconds=end - prefill_end,
                     decode_tokens=batch * step)
    return outputs


# ----------------------------------------------------------------------------------------------------
# Streaming text


class StreamingDetokenizer:
    """Token ids in, one at a time; out comes the text that is final, ready to print.

    Byte-level BPE splits a multi-byte character (emoji, CJK, accents) across tokens, and decoding a
    prefix of them gives U+FFFD at the end, which later tokens turn into the real character. So the last
    character is held back while it is U+FFFD; everything before it can no longer change (UTF-8 decoding
    is left to right). Every piece is a slice of decode(all ids so far), so the pieces concatenate to
    tokenizer.decode(all ids) exactly. Decoding restarts at `start`, the last token boundary where the
    text ended on a whole character (UTF-8 resynchronizes there), so a push decodes a few tokens, not the
    whole sequence. This relies on a byte-level decoder (Pion's), which adds nothing at the start of a text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.start = 0     # decoding restarts here; the text of ids[:start] was all returned
        self.returned = 0  # characters of decode(ids[start:]) already returned

    def push(self, token_id):
        """Add one token; return the new final text (often "", never a broken character)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self.start:])
        if not text.endswith("\ufffd"):
            piece = text[self.returned:]
            self.start, self.returned = len(self.ids), 0
            return piece
        piece = text[self.returned:-1]
        self.returned += len(piece)
        if len(self.ids) - self.start > 8:
            self._restart_later(text)
        return piece

    def _restart_later(self, text):
        # Invalid bytes (an undertrained model's output) can end the text in U+FFFD for ever, and `start`
        # would never move. Restart 4 tokens back when decoding the two sides apart gives the same text as
        # decoding them together: then the bytes after the cut did not continue a character begun before
        # it, and no later byte can.
        cut = len(self.ids) - 4
        head, tail = self.tokenizer.decode(self.ids[self.start:cut]), self.tokenizer.decode(self.ids[cut:])
        if tail and head + tail == text:
            self.start, self.returned = cut, self.returned - len(head)

    def flush(self):
        """The held-back rest, when no token will follow (an unfinished character stays U+FFFD, as in decode)."""
        piece = self.tokenizer.decode(self.ids[self.start:])[self.returned:]
        self.start, self.returned = len(self.ids), 0
        return piece


class TextStream:
    """One row's streamed text, cut before the first stop string.

    Text that could be the beginning of a stop string is held back until it is known not to be one, so
    no part of a stop string is ever released. `text` is everything released so far; after finish() it is
    the row's whole answer."""

    def __init__(self, tokenizer, stop_strings=()):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""  # decoded but not released: it might start a stop string
        self.stopped = False
        self.text = ""

    def push(self, token_id):
        """Add one token; return the newly released text. Sets `stopped` once a stop string appears."""
        return self._release(self.detokenizer.push(token_id))

    def finish(self):
        """Release what was held back (no token follows)."""
        piece = self._release(self.detokenizer.flush())
        rest, self.pending = self.pending, ""  # empty once stopped
        self.text += rest
        return piece + rest

    def _release(self, new_text):
        if self.stopped:
            return ""
        self.pending += new_text
        # A stop string can only start in `pending`: anything that could start one was held back.
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            piece, self.pending = self.pending[:min(hits)], ""
        else:
            keep = self._partial_match_length()
            piece, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.text += piece
        return piece

    def _partial_match_length(self):
        """Length of the longest end of `pending` that is the beginning of a stop string."""
        for n in range(min(len(self.pending), max(map(len, self.stop_strings), default=1) - 1), 0, -1):
            if any(s.startswith(self.pending[-n:]) for s in self.stop_strings):
                return n
        return 0


def generate_text(model, tokenizer, prompt_ids, max_new_tokens, stop_strings=(), on_text=None, **kwargs):
    """generate() with text out: one string per prompt, ending before its first stop string.

    on_text(row, piece) gets each row's text as soon as it is final (for streaming). kwargs go to
    generate() (sampling settings, stop_ids, generator, stats, compile)."""
    streams = [TextStream(tokenizer, stop_strings) for _ in prompt_rows(prompt_ids)]

    def on_token(row, token):
        piece = streams[row].push(token)
        if piece and on_text is not None:
            on_text(row, piece)
        return streams[row].stopped

    generate(model, prompt_ids, max_new_tokens, on_token=on_token, **kwargs)
    for row, stream in enumerate(streams):
        piece = stream.finish()
        if piece and on_text is not None:
            on_text(row, piece)
    return [stream.text for stream in streams]


# ----------------------------------------------------------------------------------------------------
# Command line (chat.py uses these pieces too)

# name -> (type, valid?, what is valid): the one check of generate.py's flags and chat.py's /commands.
SETTINGS = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1 = off)"),
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "num_samples": (int, lambda v: v >= 1, "an integer >= 1"),
}


def setting(name):
    """An argparse `type` for SETTINGS[name]: text -> checked value, or argparse.ArgumentTypeError."""
    kind, is_valid, valid_values = SETTINGS[name]

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not is_valid(value):
            raise argparse.ArgumentTypeError(f"must be {valid_values}, got {text!r}")
        return value

    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (a PionError for run_cli), not usage + error."""

    def error(self, message):
        raise PionError(f"{message} (see --help)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name="auto"):
    """auto: cuda, else mps, else cpu. An unavailable device is a PionError, not a crash mid-load."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PionError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise PionError(f"device {name} is not available on this machine")
    return device


def load_model(checkpoint, device="auto", dtype=None):
    """-> (model in eval mode, its device). dtype: a DTYPES name; None is bfloat16 on CUDA, float32 elsewhere."""
    device = pick_device(device)
    model, _ = load_checkpoint(checkpoint, map_location=device)
    dtype = DTYPES[dtype] if dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(dtype).eval(), device


def seeded_generator(device, seed=None):
    """The sampling noise's generator: the same seed gives the same text; no seed, a random one."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def speed_report(stats):
    prefill = stats["prompt_tokens"] / max(stats["prefill_seconds"], 1e-9)
    decode = stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_tokens"] else 0.0
    return (f"{stats['new_tokens']} tokens generated; prefill of {stats['prompt_tokens']} tokens {prefill:.1f} "
            f"tokens/s, decode {decode:.1f} tokens/s")


def use_one_line_warnings():
    """Prompt truncation warnings as `warning: ...` lines, every time (not once per call site)."""
    warnings.simplefilter("always", PromptTruncatedWarning)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def typed_lines(prompt=">>> "):
    """Lines typed at an interactive prompt, until Ctrl-D. Ctrl-C at the prompt starts a fresh line, as in
    the Python REPL (during an answer, the caller catches it)."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()


def parse_args(argv=None):
    parser = ArgumentParser(description="Sample text from a Pion checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file, or hf:OWNER/REPO/FILE")
    parser.add_argument("--prompt", action="append",
                        help="repeat for several prompts, decoded as one batch; none: interactive prompts")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--max_tokens", type=setting("max_tokens"), default=200, help="new tokens at most")
    parser.add_argument("--temperature", type=setting("temperature"), default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=setting("top_k"), default=200, help="0 = off")
    parser.add_argument("--top_p", type=setting("top_p"), default=1.0, help="nucleus sampling; 1 = off")
    parser.add_argument("--min_p", type=setting("min_p"), default=0.0, help="0 = off")
    parser.add_argument("--repetition_penalty", type=setting("repetition_penalty"), default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable); not printed")
    parser.add_argument("--num_samples", type=setting("num_samples"), default=1, help="samples per prompt")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")
    parser.add_argument("--no_stream", action="store_true", help="print each text whole at the end")
    args = parser.parse_args(argv)
    if any(not s for s in args.stop):
        parser.error("argument --stop: must not be empty")
    return args


def complete(model, tokenizer, prompts, args, generator, echo_prompt):
    """Generate for the prompts (x num_samples) as one batch and print them, streaming a single one."""
    rows = [(prompt, tokenizer.encode(prompt).ids) for prompt in prompts for _ in range(args.num_samples)]
    stream = len(rows) == 1 and not args.no_stream

    def print_piece(row, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream and echo_prompt:
        print_piece(0, rows[0][0])
    stats = {}
    texts = generate_text(model, tokenizer, [ids for _, ids in rows], args.max_tokens, stop_strings=args.stop,
                          on_text=print_piece if stream else None, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, generator=generator, stats=stats,
                          compile=args.compile)
    if stream:
        print()
    else:
        for i, ((prompt, _), text) in enumerate(zip(rows, texts)):
            if len(rows) > 1:
                print(f"--- sample {i + 1} of {len(rows)} ---")
            print((prompt if echo_prompt else "") + text)
    print(speed_report(stats), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    use_one_line_warnings()
    model, device = load_model(args.checkpoint, args.device, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer)
    generator = seeded_generator(device, args.seed)
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
