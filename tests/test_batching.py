"""batching.py: the BatchingEngine decodes concurrent requests together, each getting the reply it would get
alone; a request joins at the next step, a finished one frees its row for a waiting one, and a failing step
ends only its own rows."""
import concurrent.futures
import threading

import torch

import decoding
from batching import BatchingEngine, GenerationRequest, cache_rows
from conftest import expected_reply, streamed


# ---------------------------------------------------------------------------------------------------
# Through the server: replies from a shared batch


def test_concurrent_requests_each_get_the_reply_they_would_get_alone(client, reference, tokenizer):
    conversations = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in
                     ("cats", "the sea", "a long and winding road", "x", "bread and butter", "seven stars",
                                   "rain", "the first of many long words")]
    # 8 requests, 6 rows: some wait for a row and join mid-decode. 60 runs past 64 slots, where an eager step
    # starts attending to a longer view of the cache; more than 4 rows take the model's many-row products.
    lengths = [30, 12, 60, 8, 18, 22, 40, 5]
    expected = [expected_reply(reference, tokenizer, m, n) for m, n in zip(conversations, lengths)]

    def ask(i):
        return client.chat.completions.create(model="tiny", messages=conversations[i], max_tokens=lengths[i],
                                              temperature=0, stream=i % 2 == 0)

    with concurrent.futures.ThreadPoolExecutor(len(lengths)) as pool:
        replies = list(pool.map(ask, range(len(lengths))))
    texts = [streamed(r)[0] if i % 2 == 0 else r.choices[0].message.content for i, r in enumerate(replies)]
    assert texts == expected


# ---------------------------------------------------------------------------------------------------
# The engine alone: rows joining, leaving and failing


def engine_events(pion, tokenizer, max_batch):
    engine = BatchingEngine(pion, tokenizer, max_batch)
    events, done = [], threading.Semaphore(0)

    def request(name, prompt, max_tokens, then=None):
        def on_update(update):
            events.append((name, update.finish_reason))
            if then and len(events) == then[0]:
                engine.submit(then[1])
            if update.finish_reason:
                done.release()
        return GenerationRequest(prompt, max_tokens, on_update=on_update)

    return engine, events, done, request


def test_a_request_that_arrives_mid_decode_gets_its_first_token_at_the_next_step(pion, tokenizer):
    engine, events, done, request = engine_events(pion, tokenizer, max_batch=2)
    late = request("late", [5, 6, 7], 3)
    early = request("early", [9, 10, 11, 12], 20, then=(5, late))  # submitted at early's 5th update
    engine.start()
    try:
        engine.submit(early)
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.close()
    assert events[5][0] == "late"  # before early's next token
    assert [e for e in events if e[0] == "late"][-1] == ("late", "length")


def test_a_finished_request_frees_its_row_for_a_waiting_one(pion, tokenizer):
    engine, events, done, request = engine_events(pion, tokenizer, max_batch=1)
    engine.start()
    try:
        for name in ("first", "second", "third"):
            engine.submit(request(name, [5, 6, 7], 4))
        assert all(done.acquire(timeout=30) for _ in range(3))
    finally:
        engine.close()
    assert [name for name, reason in events if reason] == ["first", "second", "third"]
    assert engine.active == 0


def test_a_row_view_writes_into_the_shared_cache(pion):
    cache = pion.new_kv_cache(3, 16)
    with torch.inference_mode():
        decoding.prefill(pion, cache_rows(cache, 1, 2), [[5, 6, 7]])
    assert cache.k[0][1, :, :3].abs().sum() > 0 and cache.k[0][[0, 2]].abs().sum() == 0


def test_a_failing_decode_step_ends_its_rows_with_an_error_and_the_engine_goes_on(pion, tokenizer):
    failures = [RuntimeError("boom")]

    def sample_rows(logits, running):
        if len(running) == 2 and failures:
            raise failures.pop()
        return [5] * len(running)

    engine, events, done, request = engine_events(pion, tokenizer, max_batch=2)
    engine.sample_rows = sample_rows
    engine.start()
    try:
        engine.submit(request("a", [5, 6], 10, then=(1, request("b", [7, 8], 10))))  # b joins a at once
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        engine.submit(request("c", [9], 3))
        assert done.acquire(timeout=30)
    finally:
        engine.close()
    assert {(name, reason) for name, reason in events if reason} == {("a", "error"), ("b", "error"), ("c", "length")}
