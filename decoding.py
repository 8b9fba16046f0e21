"""The decoding engine: prefill, one decode step, sampling, and a generator of token columns for a batch,
plus the streaming detokenizer that turns tokens into printable text. generate.py, chat.py and the trainers'
samples all decode through generate_tokens.

    columns = generate_tokens(model, prompts, max_new_tokens, SamplingSettings(temperature=0.8))
    streams = [TextStream(tokenizer) for _ in prompts]
    for row, piece in stream_text(columns, streams): ...

Rows are right-padded into one batch and every row keeps its own positions in the KV cache, so a batch of
prompts of different lengths decodes exactly as each prompt alone.
"""
import functools
import time
import warnings
from dataclasses import dataclass

import torch

from tokenizer import EOS_ID, PAD_ID
from cli import PionError, checked


class PromptTruncatedWarning(UserWarning):
    """A prompt did not fit in the context left after max_new_tokens: only its last tokens were kept."""


# ----------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. temperature 0 is greedy (so is one too small to divide by); top_k 0,
    top_p 1, min_p 0 and repetition_penalty 1 switch those filters off."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


GREEDY = SamplingSettings(temperature=0.0)

# field -> (argparse type that checks it, help): the one check of the CLIs' flags and chat.py's /commands.
SETTING_TYPES = {
    "temperature": checked(float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": checked(int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": checked(float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repetition_penalty": checked(float, lambda v: v > 0, "a number > 0 (1 = off)"),
}
SETTING_HELP = {"temperature": "0 = greedy", "top_k": "sample from the k most likely tokens; 0 = off",
                "top_p": "nucleus sampling; 1 = off", "min_p": "drop tokens below min_p x the top probability; 0 = off",
                "repetition_penalty": "CTRL's penalty on tokens already present; 1 = off"}
max_tokens_type = checked(int, lambda v: v >= 1, "an integer >= 1")


def add_sampling_args(parser, defaults, max_tokens, max_tokens_bound=""):
    """The sampling flags of generate.py and chat.py (one set, their own defaults) and --max_tokens, --seed.
    --max_tokens means the same in both: a reply's new tokens at most, beside which the prompt keeps its latest
    tokens that fit in the context; max_tokens_bound says what else bounds it in that script."""
    for name, kind in SETTING_TYPES.items():
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, name), help=SETTING_HELP[name])
    parser.add_argument("--max_tokens", type=max_tokens_type, default=max_tokens,
                        help="new tokens at most; the prompt keeps its latest tokens that fit beside them"
                        + max_tokens_bound)
    parser.add_argument("--seed", type=checked(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
                        default=None, help="the same seed gives the same text (default: a random seed)")


def sample_next_token(logits, seen, settings, generator=None):
    """logits (B, V) fp32 -> the next token of each row (B,). seen (B, V) bool marks the tokens already in
    each row (prompt and output) for the repetition penalty, or is None. Every filter works row by row."""
    s = settings
    if seen is not None:
        # CTRL's penalty: an already-present token gets less likely whatever the sign of its logit.
        penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if s.temperature < torch.finfo(logits.dtype).tiny:  # 0, or 0 once in the logits' dtype
        return logits.argmax(dim=-1)
    # Shift each row's maximum to 0 before dividing: a tiny temperature then sends the other logits to -inf
    # (sampling becomes greedy, its limit) instead of sending the maximum to inf and softmax to NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / s.temperature
    candidates = None  # token ids of the columns of logits/probs, when they are not the whole vocabulary
    if 0 < s.top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, s.top_k, dim=-1)  # sorted, so top-p needs no full-vocab sort
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        if candidates is None:
            probs, candidates = probs.sort(dim=-1, descending=True)
        # Nucleus: keep the most likely tokens until they cover top_p (the one that crosses it included).
        covered_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(covered_before >= s.top_p, 0.0)
    if s.min_p > 0.0:
        probs = probs.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    # argmax(p / Exp(1)) is a draw from p (unnormalized is fine) without multinomial's host sync. The clamp
    # keeps a zero-probability token from winning by 0/0 = NaN when a draw is exactly 0.
    noise = torch.empty_like(probs).exponential_(1, generator=generator).clamp_(min=1e-20)
    choice = (probs / noise).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


def seeded_generator(device, seed=None):
    """The sampling noise's generator: the same seed gives the same text; no seed, a random one."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------------------------------
# Prefill and decode steps


def prefill(model, kv_cache, rows):
    """Write the prompts (lists of ids, one per cache row) into the cache at positions 0..len-1 and return
    the logits (B, V) after each row's last token. Rows are right-padded to the longest: the padding's keys
    land after a row's end, where its later tokens overwrite them before any query can see them."""
    T = max(map(len, rows))
    device = kv_cache.k[0].device
    input_ids = torch.tensor([row + [PAD_ID] * (T - len(row)) for row in rows], device=device)
    hidden = model.hidden_states(input_ids, kv_cache, torch.arange(T, device=device))
    last = torch.tensor([len(row) - 1 for row in rows], device=device)
    return model.logits(hidden[torch.arange(len(rows), device=device), last])


def decode_step(model, kv_cache, tokens, input_pos):
    """tokens (B, 1) at cache positions input_pos (B, 1) -> the logits (B, V) of the position after each.
    Every step has the same shapes and changes no Python state, so one compiled graph serves them all."""
    return model.logits(model.hidden_states(tokens, kv_cache, input_pos)[:, -1])


COMPILE_NOTICE = ("--compile: the first answer waits while the decode step compiles (about 45 s for small on a "
                  "2-core CPU, once per process); the speeds reported leave that out")


@functools.cache
def compiled_decode_step(device_type):
    """decode_step, torch.compile'd once per process; on CUDA in reduce-overhead mode: CUDA graphs, which
    capture the cache's in-place writes because KVCache marks its tensors as static addresses."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None)


def prompt_rows(prompts):
    """A list of ints, a list of lists, or a (T,) / (B, T) tensor -> a list of rows (lists of ints)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not len(prompts) or isinstance(prompts[0], int):
        prompts = [prompts]
    rows = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in prompts]
    # An empty prompt starts a new document: <|endoftext|> is what precedes every document in training.
    return [row or [EOS_ID] for row in rows]


def cache_length(model, rows, max_new_tokens):
    """The KV cache length generate_tokens decodes `rows` (lists of ids) in: the longest prompt as it is
    kept (at most its last max_seq_len - max_new_tokens tokens), plus the new tokens."""
    return min(max(map(len, rows)), model.config.max_seq_len - max_new_tokens) + max_new_tokens


@torch.inference_mode()
def generate_tokens(model, prompts, max_new_tokens, settings=GREEDY, generator=None, compile=False, cache_dtype=None):
    """Yield the next token of every row, a (B,) tensor, once per step, max_new_tokens times at most.

    prompts: one prompt (list of ints or a (T,) tensor) or several (list of lists or a (B, T) tensor),
        decoded together as one batch. A prompt longer than the context left (max_seq_len - max_new_tokens)
        keeps its last tokens, with a PromptTruncatedWarning.
    The consumer decides when a row is finished (a stop token or string) and stops iterating when every
    row is: finished rows keep being decoded (one batch, one shape), their tokens to be ignored.
    generator: a torch.Generator on the model's device for the sampling noise (seed it for repeatable text).
    compile: run the decode steps through torch.compile (the first call with a new shape compiles).
    cache_dtype: the KV cache's dtype, when it differs from the weights' (FSDP's bf16 policy)."""
    rows = prompt_rows(prompts)
    context = model.config.max_seq_len - max_new_tokens
    if context < 1:
        raise PionError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of "
                        f"{model.config.max_seq_len} tokens: ask for fewer (--max_tokens)")
    for i, row in enumerate(rows):
        if len(row) > context:
            warnings.warn(f"prompt {i} has {len(row)} tokens, more than the {context} that fit before "
                          f"{max_new_tokens} new ones (max_seq_len {model.config.max_seq_len}): keeping its last "
                          f"{context}", PromptTruncatedWarning, stacklevel=3)
            rows[i] = row[-context:]
    was_training = model.training
    model.eval()
    try:
        batch, device = len(rows), model.embed.weight.device
        kv_cache = model.new_kv_cache(batch, cache_length(model, rows, max_new_tokens), cache_dtype)
        kv_cache.fused_projections = model.fuse_projections()
        step = decode_step
        if compile:
            # Every call sizes its cache to its prompt, so a step compiled for one length would be compiled
            # again, for any length, at the next call (chat's second answer would wait for a whole new
            # compilation). Compiled for any length at once, it is compiled once per process.
            for tensor in kv_cache.k + kv_cache.v:
                torch._dynamo.mark_dynamic(tensor, 2)
            step = compiled_decode_step(device.type)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
            for b, row in enumerate(rows):
                seen[b, row] = True
        logits = prefill(model, kv_cache, rows)
        lengths = [len(row) for row in rows]
        # Rows at one position share it: writing the cache with index_copy_ is cheaper than a per-row scatter.
        input_pos = torch.tensor(lengths[:1] if len(set(lengths)) == 1 else [[n] for n in lengths], device=device)
        for i in range(max_new_tokens):
            token = sample_next_token(logits, seen, settings, generator)
            yield token
            if i == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            logits = step(model, kv_cache, token[:, None], input_pos)
            input_pos += 1
    finally:
        model.train(was_training)


# On CUDA the host reads the new tokens (and so checks for stop tokens) once per this many steps instead of
# after each: the device then runs ahead of Python instead of waiting for it at every token. A row that ends
# costs at most this many - 1 extra steps, and streamed text arrives this many tokens at a time.
CUDA_TOKENS_PER_SYNC = 8


def tokens_per_sync(device):
    """On CUDA, CUDA_TOKENS_PER_SYNC; elsewhere 1: a CPU step has already finished when it is yielded, and
    a step past a row's end would be spent for nothing."""
    return CUDA_TOKENS_PER_SYNC if device.type == "cuda" else 1


def host_columns(columns):
    """generate_tokens' (B,) device columns as lists of ints, in order, read from the device
    tokens_per_sync(device) at a time (one sync for all)."""
    pending = []
    for column in columns:
        pending.append(column)
        if len(pending) == tokens_per_sync(column.device):
            yield from torch.stack(pending).tolist()
            pending = []
    if pending:
        yield from torch.stack(pending).tolist()


def generate(model, prompts, max_new_tokens, settings=GREEDY, stop_ids=(EOS_ID,), **kwargs):
    """Continue each prompt by up to max_new_tokens tokens; returns one list of new token ids per prompt.
    A row ends at any of stop_ids, which is not returned. kwargs go to generate_tokens."""
    outputs = [[] for _ in prompt_rows(prompts)]
    finished = [False] * len(outputs)
    for column in host_columns(generate_tokens(model, prompts, max_new_tokens, settings, **kwargs)):
        for row, token in enumerate(column):
            if finished[row] or token in stop_ids:
                finished[row] = True
            else:
                outputs[row].append(token)
        if all(finished):
            break
    return outputs


class DecodeTimer:
    """Wraps generate_tokens' columns and times them: the first column costs the prefill (and, with
    compile, nothing more: compiling happens at the first decode step, timed apart as warm-up), the rest
    a decode step each. With bytes_per_step (hardware.decode_bytes_per_step) and the device, the report
    adds MBU: bytes read per step x steps/s / the device's memory bandwidth (hardware.memory_bandwidth)."""

    def __init__(self, columns, prompt_tokens, bytes_per_step=None, device=None):
        self.columns, self.prompt_tokens = columns, prompt_tokens
        self.bytes_per_step, self.device = bytes_per_step, device
        self.prefill_seconds = self.first_step_seconds = self.decode_seconds = 0.0
        self.rows = self.steps = 0

    def __iter__(self):
        start = time.perf_counter()
        try:
            for column in self.columns:
                if self.steps < 2:
                    if column.device.type == "cuda":
                        torch.cuda.synchronize(column.device)  # a launched step is not a finished one
                    now = time.perf_counter()
                    if self.steps == 0:
                        self.prefill_seconds, self.rows = now - start, len(column)
                    else:
                        self.first_step_seconds = now - start
                self.steps += 1
                yield column
                # The consumer's time between the first columns is not decoding. From the third on the steps
                # are timed as a whole, the consumer's time included: on CUDA the consumer is where they are
                # waited for (host_columns reads them in blocks).
                if self.steps <= 2:
                    start = time.perf_counter()
        finally:
            if self.steps > 2:
                self.decode_seconds = time.perf_counter() - start

    def report(self):
        prefill = self.prompt_tokens / max(self.prefill_seconds, 1e-9)
        timed_steps = self.steps - 2  # the first step (compile, warm-up) is left out of the speed
        if timed_steps > 0:
            speed = f"decode {self.rows * timed_steps / self.decode_seconds:.1f} tokens/s"
            speed += self._bandwidth_utilization(timed_steps / self.decode_seconds)
        else:
            speed = "too few steps to time decoding"
        return (f"{self.steps} tokens x {self.rows} row(s); prefill of {self.prompt_tokens} tokens "
                f"{prefill:.1f} tokens/s, {speed}")

    def _bandwidth_utilization(self, steps_per_second):
        from hardware import memory_bandwidth
        bandwidth = memory_bandwidth(self.device) if self.bytes_per_step and self.device is not None else None
        if not bandwidth:
            return ""
        mbu = self.bytes_per_step * steps_per_second / bandwidth
        return f", MBU {mbu:.0%} ({self.bytes_per_step / 1e6:,.0f} MB a step of {bandwidth / 1e9:,.0f} GB/s)"


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
    """One row's text, streamed from its tokens up to where the row ends: at one of stop_ids (not decoded), before
    the first of stop_strings, or at its max_tokens-th token. add() takes each token and returns the text that
    became final; `finish_reason` is then "stop" or "length" once the row has ended, and `stop_reason` the stop
    id or string that ended it. `text` is everything released, the row's whole answer once it has ended.

    Text that could be the beginning of a stop string is held back until it is known not to be one, so no
    part of a stop string is ever released. A chat `turn` (chat_template.CHAT_TURN) adds the stop strings that
    end a turn, and drops the suffix the template closes a turn with where the reply ends as a turn ends (a
    stop id or the turn's stop strings): text that could be that suffix is held back the same way, in the
    same buffer, so the stream gives the reply's content and nothing after it."""

    def __init__(self, tokenizer, stop_strings=(), stop_ids=(EOS_ID,), max_tokens=None, turn=None):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.turn_stops = tuple(turn.stop_strings) if turn else ()
        self.suffix = turn.suffix if turn else ""
        self.stop_strings = [s for s in (*stop_strings, *self.turn_stops) if s]
        # What the end of the held-back text may grow into: a stop string, or the turn's suffix and a turn's end.
        self.could_become = self.stop_strings + ([self.suffix, *(self.suffix + s for s in self.turn_stops)]
                                                 if self.suffix else [])
        self.stop_ids, self.max_tokens = stop_ids, max_tokens
        self.tokens = 0  # tokens added, the stop id included
        self.pending = ""  # decoded but not released
        self.stop_reason = None
        self.finish_reason = None
        self.text = ""

    @property
    def finished(self):
        return self.finish_reason is not None

    def add(self, token_id):
        """The row's next token -> the text it made final (often "", never part of a stop string)."""
        self.tokens += 1
        if token_id in self.stop_ids:
            return self._end("stop", stop_id=token_id)
        piece = self._release(self.detokenizer.push(token_id))
        if self.stop_reason is not None:
            return piece + self._end("stop")
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return piece + self._end("length")
        return piece

    def finish(self):
        """End the row where its tokens ran out; return the text held back until now."""
        return "" if self.finished else self._end("length")

    def _end(self, reason, stop_id=None):
        piece = self._release(self.detokenizer.flush()) if self.stop_reason is None else ""
        if self.stop_reason is None and stop_id is not None:
            self.stop_reason = stop_id
        rest, self.pending = self.pending, ""
        if self.stop_reason is not None and (self.stop_reason in self.stop_ids or self.stop_reason in self.turn_stops):
            rest = rest.removesuffix(self.suffix) if self.suffix else rest
        self.finish_reason = "stop" if self.stop_reason is not None else reason
        self.text += rest
        return piece + rest

    def _release(self, new_text):
        self.pending += new_text
        # A stop string can only start in `pending`: anything that could start one was held back.
        hits = [(i, s) for s in self.stop_strings if (i := self.pending.find(s)) >= 0]
        if hits:
            cut, self.stop_reason = min(hits)
            self.pending = self.pending[:cut]  # released by _end, which knows whether a suffix ends it
            return ""
        keep = self._partial_match_length()
        piece, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.text += piece
        return piece

    def _partial_match_length(self):
        """Length of the longest end of `pending` that is the beginning of what it could become."""
        for n in range(min(len(self.pending), max(map(len, self.could_become), default=1)), 0, -1):
            if any(s.startswith(self.pending[-n:]) for s in self.could_become):
                return n
        return 0


def stream_text(columns, streams):
    """Feed generate_tokens' columns into one TextStream per row and yield (row, piece) as each row's text
    becomes final; iteration ends once every row has ended."""
    for column in host_columns(columns):
        for row, token in enumerate(column):
            if not streams[row].finished:
                piece = streams[row].add(token)
                if piece:
                    yield row, piece
        if all(stream.finished for stream in streams):
            return
    for row, stream in enumerate(streams):
        piece = stream.finish()
        if piece:
            yield row, piece


def generate_text(model, tokenizer, prompts, max_new_tokens, settings=GREEDY, stop_strings=(), turn=None, **kwargs):
    """generate() with text out: one string per prompt, ending before its first stop string or stop token (a
    chat reply's content, with turn=chat_template.CHAT_TURN). kwargs go to generate_tokens."""
    streams = [TextStream(tokenizer, stop_strings, turn=turn) for _ in prompt_rows(prompts)]
    for _ in stream_text(generate_tokens(model, prompts, max_new_tokens, settings, **kwargs), streams):
        pass
    return [stream.text for stream in streams]
