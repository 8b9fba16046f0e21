"""serve.py, server.py and batching.py: a real server on 127.0.0.1 answering the official openai client exactly
as decoding.generate_text answers, continuous batching, limits and errors, and the chat page in a real
headless browser."""
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

try:  # the HTTP client the openai package brings: httpx2 in its newer releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

import decoding as D
import serve
from batching import BatchingEngine, GenerationRequest, cache_rows
from tokenizer import EOS_ID
from conftest import ROOT, assert_one_line_error, run_in_process, tiny_pion
from decoding import GREEDY, SamplingSettings
from model import Linear
from quantize import Int8Linear
from server import Limits, create_app, serving_in_thread
from chat_template import TURN_SUFFIX, USER_MARKER, render_conversation

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


@contextlib.contextmanager
def serving(model, tokenizer, max_batch=4, api_key=None, limits=None, sample_rows=None):
    """A real server for the model on a free port of 127.0.0.1 (uvicorn in a thread): yields (base url, engine).
    sample_rows replaces the engine's token source (a scripted reply)."""
    engine = BatchingEngine(model, tokenizer, max_batch)
    if sample_rows is not None:
        engine.sample_rows = sample_rows
    engine.start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "tiny", api_key, limits)) as url:
            yield url, engine
    finally:
        engine.close()


def scripted_reply(tokens, seconds_per_step=0.0):
    """A token source for the engine that writes `tokens` (again and again) whatever the model says."""
    def sample_rows(logits, running):
        time.sleep(seconds_per_step)
        return [tokens[run.completion_tokens % len(tokens)] for run in running]
    return sample_rows


@pytest.fixture(scope="module")
def pion(tokenizer):
    # No more ids than the tokenizer has: an id past a small test tokenizer's (a fresh clone's) decodes to
    # nothing, and replies would be empty.
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The same weights as `pion` in a second model: references are computed apart from the served one."""
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def server(pion, tokenizer):
    with serving(pion, tokenizer, max_batch=6, limits=Limits(max_body_bytes=20_000, max_messages=8)) as served:
        yield served


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt(tokenizer, messages=MESSAGES):
    return render_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def expected_reply(model, tokenizer, messages, max_tokens, stop=(), settings=GREEDY, seed=None):
    """generate_text's reply as chat.py takes it: stopped at <|user|>, without the turn's suffix."""
    generator = D.seeded_generator("cpu", seed) if seed is not None else None
    text = D.generate_text(model, tokenizer, [chat_prompt(tokenizer, messages)], max_tokens, settings,
                           [USER_MARKER, *stop], generator=generator)[0]
    return text.removesuffix(TURN_SUFFIX)


def streamed(chunks):
    """(text, finish_reason, usage) of a stream of chat or completion chunks."""
    text, finish, usage = "", None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


# ---------------------------------------------------------------------------------------------------
# Replies equal generate_text's


def test_a_greedy_chat_reply_equals_generate_text_streamed_or_not(client, reference, tokenizer):
    expected = expected_reply(reference, tokenizer, MESSAGES, 24)
    assert len(expected) > 20
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "length")
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stream=True)
    assert streamed(chunks)[:2] == (expected, "length")


def test_a_reply_ends_before_a_stop_string_with_finish_reason_stop(client, reference, tokenizer):
    whole = expected_reply(reference, tokenizer, MESSAGES, 24)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    expected = expected_reply(reference, tokenizer, MESSAGES, 24, stop=[stop])
    assert expected == whole[:whole.index(stop)]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stop=stop)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=24, temperature=0,
                                            stop=[stop, "never appears"], stream=True)
    assert streamed(chunks)[:2] == (expected, "stop")


def test_a_chat_reply_cut_by_max_tokens_or_a_stop_string_keeps_its_final_newline(pion, tokenizer):
    # The template ends a turn with "\n" then <|endoftext|> (or the user's next turn): only there is the
    # "\n" the template's, and dropped. A reply cut mid-turn keeps the "\n" the model wrote.
    line = tokenizer.encode("Hello there\n").ids
    cases = [(line + [EOS_ID], {}, ("Hello there", "stop")),
             (tokenizer.encode("Hello there\n<|user|>").ids, {}, ("Hello there", "stop")),
             (line, {"max_tokens": len(line)}, ("Hello there\n", "length")),
             (tokenizer.encode("Hello there\nEND").ids, {"stop": "END"}, ("Hello there\n", "stop"))]
    with serving(pion, tokenizer) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        for tokens, options, expected in cases:
            engine.sample_rows = scripted_reply(tokens)  # the engine is idle between the requests
            reply = client.chat.completions.create(model="tiny", messages=MESSAGES, **options)
            assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == expected, options
            chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **options)
            assert streamed(chunks)[:2] == expected, options


def test_a_text_completion_equals_generate_text(client, reference, tokenizer):
    prompt = "The history of the river"
    expected = D.generate_text(reference, tokenizer, [tokenizer.encode(prompt).ids], 20)[0]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "length")
    assert streamed(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                              stream=True))[:2] == (expected, "length")


def test_a_seeded_sampled_reply_equals_generate_text_with_that_seed(client, reference, tokenizer):
    settings = SamplingSettings(temperature=0.9, top_p=0.8)
    expected = expected_reply(reference, tokenizer, MESSAGES, 20, settings=settings, seed=1234)
    replies = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0.9,
                                              top_p=0.8, seed=1234).choices[0].message.content for _ in range(2)]
    assert replies == [expected, expected]


def test_usage_counts_the_prompt_and_the_new_tokens(client, tokenizer):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=7, temperature=0)
    prompt_tokens = len(chat_prompt(tokenizer))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt_tokens, 7, prompt_tokens + 7)
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    assert streamed(chunks)[2].completion_tokens == 7


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 6


# ---------------------------------------------------------------------------------------------------
# Continuous batching


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
        D.prefill(pion, cache_rows(cache, 1, 2), [[5, 6, 7]])
    assert cache.k[0][1, :, :3].abs().sum() > 0 and cache.k[0][[0, 2]].abs().sum() == 0


def long_context_pion(tokenizer):
    """Room for the chat prompt (longer in a small test tokenizer's tokens) and 100 new tokens."""
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size(), max_seq_len=512)


def test_a_client_that_disconnects_mid_stream_frees_its_row(tokenizer):
    slow = scripted_reply(tokenizer.encode(" and so on").ids, seconds_per_step=0.02)
    with serving(long_context_pion(tokenizer), tokenizer, sample_rows=slow) as (url, engine):
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            next(response.iter_lines())
            assert engine.active == 1
        deadline = time.monotonic() + 5
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 0


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_row(tokenizer):
    slow = scripted_reply(tokenizer.encode(" and so on").ids, seconds_per_step=0.02)
    with serving(long_context_pion(tokenizer), tokenizer, sample_rows=slow) as (url, engine):
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 100}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 5  # the server notices within a second or so
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 0 and engine.steps < 90


def test_a_failing_request_leaves_the_others_and_the_server_running(pion, tokenizer):
    poison = tokenizer.encode("poison").ids

    def sample_rows(logits, running):
        if any(run.request.prompt_ids[-len(poison):] == poison for run in running if len(running) == 1):
            raise RuntimeError("boom")
        return [int(row.argmax()) for row in logits]

    with serving(pion, tokenizer, sample_rows=sample_rows) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="poison", max_tokens=5)
        assert client.completions.create(model="tiny", prompt="fine", max_tokens=5).choices[0].finish_reason == "length"
        assert httpx.get(url + "/health").json()["status"] == "ok"


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


# ---------------------------------------------------------------------------------------------------
# Bad input: OpenAI's error shape and status


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(server, body, path="/v1/chat/completions", **kwargs):
    return httpx.post(server[0] + path, json=body, timeout=30, **kwargs)


@pytest.mark.parametrize("field, value", [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
                                          ("max_tokens", 0), ("max_tokens", 1.5), ("seed", -3), ("stop", [""]),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("n", 2), ("stream", "yes")])
def test_an_invalid_parameter_is_a_400_naming_it(server, field, value):
    error = error_of(post(server, {"messages": MESSAGES, field: value}), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == field


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 10}),
                                          ("logprobs", True), ("top_logprobs", 3)])
def test_a_parameter_the_server_does_not_implement_is_a_400_not_ignored(client, field, value):
    with pytest.raises(openai.BadRequestError, match=f"{field} is not supported"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **{field: value})


def test_a_parameter_the_server_does_not_implement_is_accepted_at_its_no_op_value(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, presence_penalty=0,
                                           frequency_penalty=0.0, logit_bias={}, logprobs=False)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "robot", "content": "hi"}], [{"role": "user"}],
                                      [{"role": "user", "content": 5}]])
def test_invalid_messages_are_a_400(server, messages):
    assert error_of(post(server, {"messages": messages}), 400)["param"].startswith("messages")


def test_a_content_given_as_text_parts_is_the_same_as_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "rivers."}]}]
    as_string = [{"role": "user", "content": "Name three rivers."}]
    replies = [client.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0) for m in (parts, as_string)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens


def test_a_body_that_is_not_a_json_object_is_a_400(server):
    headers = {"Content-Type": "application/json"}
    error_of(httpx.post(server[0] + "/v1/completions", content=b"{not json", headers=headers, timeout=30), 400)
    error_of(post(server, ["a", "list"], "/v1/completions"), 400)


def test_a_body_not_sent_as_json_is_refused_so_other_sites_cannot_post_here(server):
    # A page on another site can send a text/plain POST without a CORS preflight; it must not start a generation.
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    error = error_of(httpx.post(server[0] + "/v1/completions", content=body, headers={"Content-Type": "text/plain"}), 400)
    assert error["code"] == "invalid_content_type"


def test_max_tokens_beyond_the_context_left_is_a_400(server):
    error = error_of(post(server, {"messages": MESSAGES, "max_tokens": 500}), 400)
    assert error["code"] == "context_length_exceeded"


def test_a_body_over_the_size_limit_is_a_413(server):
    error_of(post(server, {"messages": [{"role": "user", "content": "x" * 30_000}]}), 413)


def test_too_many_messages_is_a_413(server):
    error_of(post(server, {"messages": [{"role": "user", "content": "hi"}] * 9}), 413)


def test_a_prompt_over_the_context_is_a_413(server):
    error = error_of(post(server, {"prompt": "word " * 200}, "/v1/completions"), 413)
    assert error["code"] == "context_length_exceeded"


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)


def test_an_unknown_path_is_a_404_in_the_same_shape(server):
    error_of(httpx.get(server[0] + "/v1/nothing"), 404)


def test_with_an_api_key_a_missing_or_wrong_key_is_a_401(pion, tokenizer):
    with serving(pion, tokenizer, api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert error_of(httpx.get(url + "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
            error_of(httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        assert httpx.get(url + "/health").status_code == 200  # the page and health need no key


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "hi \ud800"}],
                                      [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]])
def test_a_lone_surrogate_in_a_message_is_a_400_and_the_connection_is_kept(server, messages):
    with httpx.Client(timeout=30) as keep_alive:
        body = json.dumps({"messages": messages, "max_tokens": 2})  # json.dumps writes the surrogate as \ud800
        headers = {"Content-Type": "application/json"}
        assert error_of(keep_alive.post(server[0] + "/v1/chat/completions", content=body, headers=headers),
                        400)["param"] == "messages[0].content"
        assert keep_alive.post(server[0] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert keep_alive.post(server[0] + "/v1/completions", json={"prompt": "x"}).num_bytes_downloaded > 0


def test_a_lone_surrogate_in_a_prompt_or_a_stop_string_is_a_400(server):
    headers = {"Content-Type": "application/json"}
    for body, param in (({"prompt": "a \ud800 b"}, "prompt"), ({"prompt": "a", "stop": ["\ud800"]}, "stop")):
        response = httpx.post(server[0] + "/v1/completions", content=json.dumps(body), headers=headers, timeout=30)
        assert error_of(response, 400)["param"] == param


def test_json_nested_too_deeply_is_a_400(server):
    body = "[" * 9_000 + "]" * 9_000  # within this server's 20 kB body limit, deeper than Python's JSON parser goes
    response = httpx.post(server[0] + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert error_of(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required"), ("response_format", {"type": "json_object"})])
def test_tools_and_response_formats_are_a_400_not_ignored(server, field, value):
    error = error_of(post(server, {"messages": MESSAGES, field: value}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"


def test_tools_and_response_formats_that_ask_for_nothing_are_accepted(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="none",
                                           response_format={"type": "text"})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_special_token_text_in_a_prompt_is_text_not_a_control_id(client, tokenizer):
    reply = client.completions.create(model="tiny", prompt="<|endoftext|>", max_tokens=1)
    assert reply.usage.prompt_tokens == len(tokenizer.encode("<|endoftext|>").ids) > 1


def test_the_bearer_scheme_is_matched_in_any_case(pion, tokenizer):
    with serving(pion, tokenizer, api_key="s3cret") as (url, _):
        for scheme in ("Bearer", "bearer", "BEARER"):
            response = httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} s3cret"})
            assert response.status_code == 200, scheme
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:8000"])
def test_a_keyless_loopback_server_answers_loopback_host_names(server, host):
    assert httpx.get(server[0] + "/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example",
                                  "192.168.1.5", "localhost.example", ""])
def test_a_keyless_loopback_server_refuses_other_host_names_against_dns_rebinding(server, host):
    response = httpx.get(server[0] + "/v1/models", headers={"Host": host})
    assert error_of(response, 400)["code"] == "invalid_host"
    assert httpx.get(server[0] + "/health", headers={"Host": host}).status_code == 400


def test_a_server_with_a_key_answers_any_host_name(pion, tokenizer):
    with serving(pion, tokenizer, api_key="s3cret") as (url, _):
        response = httpx.get(url + "/v1/models", headers={"Host": "pion.example", "Authorization": "Bearer s3cret"})
        assert response.status_code == 200


def test_a_connection_that_never_finishes_its_headers_is_closed(pion, tokenizer):
    engine = BatchingEngine(pion, tokenizer, 1).start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "tiny"), header_timeout=0.5) as url:
            port = int(url.rsplit(":", 1)[1])
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as slow:
                slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
                slow.settimeout(10)
                assert slow.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 5
            with socket.create_connection(("127.0.0.1", port)) as idle:
                idle.settimeout(10)
                assert idle.recv(1024) == b""  # a connection that sends nothing at all is closed too
            # A keep-alive connection gets the same deadline for its next request's headers.
            with socket.create_connection(("127.0.0.1", port)) as kept:
                kept.settimeout(10)
                kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert kept.recv(4096).startswith(b"HTTP/1.1 200")
                kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                assert kept.recv(1024) == b""
            assert httpx.get(url + "/health").status_code == 200
    finally:
        engine.close()


def test_the_server_caps_connections_and_times_out_idle_ones():
    import server as S
    config = S.uvicorn_config(None)
    assert config.limit_concurrency == S.MAX_CONNECTIONS and config.timeout_keep_alive == S.KEEP_ALIVE_TIMEOUT
    assert config.h11_max_incomplete_event_size == S.MAX_HEADER_BYTES


# ---------------------------------------------------------------------------------------------------
# serve.py


def test_serve_rejects_a_bad_flag_in_one_line():
    assert_one_line_error(run_in_process(serve.main, ["--checkpoint", "x.pt", "--max_batch", "0"]), "--max_batch")


def test_serve_reports_a_missing_checkpoint_in_one_line(tmp_path):
    assert_one_line_error(run_in_process(serve.main, ["--checkpoint", tmp_path / "none.pt"]), "not found")


def test_serve_reports_a_busy_port_in_one_line_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_in_process(serve.main, ["--checkpoint", tmp_path / "none.pt", "--port", port])
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5"])
def test_serving_beyond_loopback_without_a_key_is_refused(host, monkeypatch):
    monkeypatch.delenv("PION_API_KEY", raising=False)
    result = run_in_process(serve.main, ["--checkpoint", "x.pt", "--host", host])
    assert_one_line_error(result, f"--host {host} opens the server to other machines")


def test_serving_beyond_loopback_takes_a_key_or_allow_unauthenticated(monkeypatch):
    monkeypatch.delenv("PION_API_KEY", raising=False)
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "0.0.0.0", "--api_key", "k"]).api_key == "k"
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "0.0.0.0", "--allow_unauthenticated"]).host == "0.0.0.0"
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "localhost"]).host == "localhost"


def test_serve_defaults_to_localhost_and_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PION_API_KEY", "from-env")
    args = serve.parse_args(["--checkpoint", "x.pt"])
    assert (args.host, args.port, args.max_batch, args.api_key) == ("127.0.0.1", 8000, 8, "from-env")


def test_serve_with_quantize_int8_serves_an_int8_model(tiny_checkpoint, tokenizer_path, monkeypatch):
    import uvicorn
    engines = []  # what serve.main hands the app: the engine, with the model it decodes with
    monkeypatch.setattr(serve, "create_app",
                        lambda engine, *args, **kwargs: engines.append(engine) or create_app(engine, *args, **kwargs))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # main returns instead of serving
    result = run_in_process(serve.main, ["--checkpoint", tiny_checkpoint[0], "--tokenizer", tokenizer_path,
                                         "--port", 0, "--device", "cpu", "--quantize", "int8"])
    assert result.returncode == 0, result.stderr
    [engine] = engines
    layers = {type(m) for m in engine.model.modules()}
    assert Int8Linear in layers and Linear not in layers


@pytest.mark.slow
def test_serve_py_serves_a_checkpoint_until_interrupted(tiny_checkpoint, tokenizer_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint[0], "--tokenizer",
                                tokenizer_path, "--port", str(port), "--max_batch", "2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=4).usage.completion_tokens <= 4
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------------
# The chat page in a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_page_is_one_file_that_loads_nothing_from_elsewhere_and_runs_only_its_own_script(server):
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page.text and page.text.count("<script") == 1
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http://" not in page.text and "https://" not in page.text and "innerHTML" not in page.text
    assert httpx.get(server[0] + "/").headers["content-security-policy"] != policy  # a fresh nonce each time


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium (install it with .ci/install_browser)")
def test_the_chat_page_streams_a_reply_as_text_and_stops_it(tokenizer):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    injected = '<script>document.title = "pwned"</script><img src=x onerror="document.title = \'pwned\'">'
    reply = tokenizer.encode(f"Hello {injected} and then" + " more" * 200).ids
    scripted, asked = scripted_reply(reply, seconds_per_step=0.03), []

    def sample_rows(logits, running):
        asked.extend(run.request for run in running if run.request not in asked)
        return scripted(logits, running)

    with serving(long_context_pion(tokenizer), tokenizer, sample_rows=sample_rows) as (url, engine), \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#system", "Be brief.")
            page.fill("#max_tokens", "100")
            page.fill("#input", "Say hello")
            page.keyboard.press("Enter")
            assistant = page.locator(".message.assistant")
            sync_api.expect(assistant).to_contain_text("and then", timeout=10_000)  # streamed: not finished yet
            assert page.locator(".message.user").text_content() == "Say hello"
            assert page.locator("#stop").is_visible()
            page.click("#stop")
            page.wait_for_selector("#send", state="visible")
            stopped = assistant.text_content()
            assert stopped.startswith(f"Hello {injected} and then") and len(reply) > 100
            assert page.locator("#messages script, #messages img").count() == 0
            assert page.title() == "Pion chat"
            assert page.text_content("#status") == "stopped"
            deadline = time.monotonic() + 5
            while engine.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.active == 0  # stopping in the page freed the row
            [request] = asked  # the page sent its settings and the system prompt
            assert request.max_tokens == 100 and request.settings.temperature == 0.7
            assert "<|system|>\nBe brief.\n<|user|>\nSay hello" in tokenizer.decode(request.prompt_ids)
            time.sleep(0.2)
            assert assistant.text_content() == stopped  # nothing more arrives
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()
