"""Continuous batching: one engine thread owns the model and decodes every running request together.

    engine = BatchingEngine(model, tokenizer, max_batch=8).start()
    engine.submit(GenerationRequest(prompt_ids, max_tokens=64, on_update=print))

The KV cache has max_batch rows and each row is one request at its own position (the model takes a (B, 1)
input_pos), so requests start and end independently. Between two decode steps the engine frees the rows of
finished and cancelled requests and admits waiting ones: each prompt is prefilled alone into its free row
(through a one-row view of the cache) and its first token goes out at once; from the next step on it
decodes with the others. A row attends only to its own slots and is sampled with the very calls
decoding.generate_tokens makes for that prompt alone, so greedy and seeded replies are generate_text's (a
product over several rows may round the last bit differently from one over a single row; that could only
swap two near-equal tokens, and tests/test_batching.py checks it does not). Other threads talk to the engine only through submit(), cancel() and the
on_update callback, which the engine calls from its own thread.
"""
import copy
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tokenizer import EOS_ID, PAD_ID
from decoding import GREEDY, SamplingSettings, TextStream, compiled_decode_step, decode_step, prefill, \
    sample_next_token, seeded_generator


SLOTS_ROUNDING = 64  # an eager step attends to the slots in use rounded up to this: fewer distinct shapes


@dataclass
class Update:
    """What the engine sends a request: newly final text, and once it is over, why and how many tokens."""
    text: str
    finish_reason: str = None  # None while running; "stop" (stop token or string), "length", or "error"
    completion_tokens: int = 0
    error: str = None
    stop_reason: object = None  # what ended a "stop": the stop id or string (TextStream.stop_reason)


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to continue. on_update(Update) is called from the engine thread: keep it short (hand the
    update to another thread or event loop); its last Update has a finish_reason."""
    prompt_ids: list
    max_tokens: int
    settings: SamplingSettings = GREEDY
    stop_strings: tuple = ()
    seed: int = None
    on_update: Callable = None  # required: submit() refuses a request without one
    cancelled: bool = False  # set by cancel(): the engine frees the row before its next step
    turn: object = None  # chat_template.CHAT_TURN for a chat reply: its content, without the turn's suffix


@dataclass(eq=False)
class Running:
    """A request in a cache row: where its next token goes and what it has produced."""
    request: GenerationRequest
    stream: TextStream
    generator: torch.Generator
    position: int = 0  # the slot of the token after the one the row feeds next: slots 0..position-1 are in use


def cache_rows(kv_cache, start, stop, length=None):
    """A KVCache over rows start..stop-1 and slots 0..length-1 of kv_cache that shares its storage: writes
    through it land in kv_cache. Prefill of one row and a step over the rows and slots in use copy nothing,
    and attention reads only those slots instead of the whole max_seq_len."""
    view = copy.copy(kv_cache)
    view.k = [k[start:stop, :, :length] for k in kv_cache.k]
    view.v = [v[start:stop, :, :length] for v in kv_cache.v]
    view.batch_size, view.max_len = stop - start, length or kv_cache.max_len
    return view


def sample_rows(logits, running):
    """The next token of each running row, each with its request's settings and generator: the same calls
    generate_tokens makes for a one-row batch, so a seeded request samples the same text as it would alone."""
    return torch.cat([sample_next_token(logits[i:i + 1], None, run.request.settings, run.generator)
                      for i, run in enumerate(running)]).tolist()


class BatchingEngine:
    def __init__(self, model, tokenizer, max_batch=8, compile=False, stop_ids=(EOS_ID,), max_context=None):
        """max_context: the most tokens (prompt and reply) a request may hold, which sizes the KV cache;
        default and at most: the model's max_seq_len."""
        self.model, self.tokenizer, self.max_batch, self.stop_ids = model.eval(), tokenizer, max_batch, stop_ids
        self.device = model.embed.weight.device
        self.max_seq_len = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.kv_cache = model.new_kv_cache(max_batch, self.max_seq_len)
        self.kv_cache.fused_projections = model.fuse_projections()  # the served weights never change
        # A compiled step keeps one shape (every row, busy or free); eager steps run over the rows in use.
        self.compiled = compile
        self.step = compiled_decode_step(self.device.type) if compile else decode_step
        self.rows = [None] * max_batch  # the Running request in each cache row; None: free
        self.tokens = torch.full((max_batch, 1), PAD_ID, device=self.device)  # each row's latest token
        self.positions = torch.zeros((max_batch, 1), dtype=torch.long, device=self.device)
        self.waiting = queue.Queue()
        self.sample_rows = sample_rows  # the token source; tests may script it
        self.prefill_seconds = 0.0  # the latest prefill's
        self.steps, self.decode_seconds = 0, 0.0  # decode steps so far and their time, for /health and benchmarks
        self.thread = threading.Thread(target=self._run, name="pion-batching-engine", daemon=True)
        self.closed = False

    # The interface, for any thread

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.closed = True
        self.waiting.put(None)  # wakes an idle engine
        self.thread.join(timeout=30)

    def submit(self, request):
        """Queue a request; it gets a row at the engine's next step (or when a row frees up)."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        if not callable(request.on_update):
            raise ValueError("a request needs an on_update callback: its text has nowhere else to go")
        if len(request.prompt_ids) + request.max_tokens > self.max_seq_len or not request.prompt_ids:
            raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens and max_tokens {request.max_tokens} do "
                             f"not fit in max_seq_len {self.max_seq_len}")
        self.waiting.put(request)

    @staticmethod
    def cancel(request):
        """Stop a request (its client left): its row is freed before the next step. No more updates come."""
        request.cancelled = True

    @property
    def active(self):
        return sum(run is not None for run in self.rows)

    # The engine thread

    def _run(self):
        with torch.inference_mode():
            while not self.closed:
                try:
                    self._free_cancelled()
                    if not self._admit(block=self.active == 0):
                        break
                    if self.active:
                        self._decode_step()
                except Exception as e:  # a bug must not stop the engine thread: end the rows it hit, go on
                    self._fail_all(e)

    def _fail_all(self, error):
        for slot, run in enumerate(self.rows):
            if run is not None:
                self._free(slot)
                self._send(run.request, Update("", "error", run.stream.tokens, f"{type(error).__name__}: {error}"))

    def _free(self, slot):
        # A free row in a step's view still decodes (one batch): at slot 0 it stays inside any view's slots.
        self.rows[slot] = None
        self.tokens[slot, 0], self.positions[slot, 0] = PAD_ID, 0

    def _free_cancelled(self):
        for slot, run in enumerate(self.rows):
            if run is not None and run.request.cancelled:
                self._free(slot)

    def _admit(self, block):
        """Prefill waiting requests into free rows (waiting for one when block); False once closed."""
        while None in self.rows:
            try:
                request = self.waiting.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            if not request.cancelled:
                self._start(self.rows.index(None), request)
        return True

    def _start(self, slot, request):
        run = Running(request, TextStream(self.tokenizer, request.stop_strings, self.stop_ids, request.max_tokens,
                                          request.turn),
                      seeded_generator(self.device, request.seed), position=len(request.prompt_ids))
        start = time.perf_counter()
        try:
            logits = prefill(self.model, cache_rows(self.kv_cache, slot, slot + 1, len(request.prompt_ids)),
                             [request.prompt_ids])
            token = self.sample_rows(logits, [run])[0]
        except Exception as e:  # this request's problem (e.g. out of memory): the others go on
            self._send(request, Update("", "error", error=f"{type(e).__name__}: {e}"))
            return
        self.prefill_seconds = time.perf_counter() - start
        self.rows[slot] = run
        self._accept(slot, token)

    def _decode_step(self):
        if self.compiled:  # one shape for every step
            in_use, length = self.max_batch, self.max_seq_len
        else:
            in_use = max(s for s, run in enumerate(self.rows) if run) + 1
            length = max(run.position for run in self.rows if run)  # the furthest slot written this step, + 1
            length = min(self.max_seq_len, -(-length // SLOTS_ROUNDING) * SLOTS_ROUNDING)
        # The compiled step gets the cache itself: a fresh view object every step could make it recompile.
        cache = self.kv_cache if self.compiled else cache_rows(self.kv_cache, 0, in_use, length)
        start = time.perf_counter()
        logits = self.step(self.model, cache, self.tokens[:in_use], self.positions[:in_use])
        slots = [s for s in range(in_use) if self.rows[s] is not None]
        tokens = self.sample_rows(logits[slots], [self.rows[s] for s in slots])  # a failure here ends every row
        self.steps += 1
        self.decode_seconds += time.perf_counter() - start
        for slot, token in zip(slots, tokens):
            self._accept(slot, token)

    def _accept(self, slot, token):
        """A row's new token: stream its text, end the row at a stop or its token budget, else feed it next."""
        run = self.rows[slot]
        text = run.stream.add(token)
        reason = run.stream.finish_reason
        if reason:
            self._free(slot)  # at once: a waiting request can take it before the next step
        else:
            self.tokens[slot, 0] = token
            self.positions[slot, 0] = run.position
            run.position += 1
        if text or reason:
            self._send(run.request, Update(text, reason, run.stream.tokens, stop_reason=run.stream.stop_reason))

    def _send(self, request, update):
        try:
            request.on_update(update)
        except Exception:  # the receiver is gone (its event loop closed): nobody reads this row any more
            request.cancelled = True
