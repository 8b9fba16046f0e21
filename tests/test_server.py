"""server.py: a real server on 127.0.0.1 (uvicorn in a thread) answering the official openai client exactly
as decoding.generate_text answers, freeing the row of a client that leaves, refusing bad input in OpenAI's
error shape, and guarding its hosts and connections."""
import json
import socket
import time

import openai
import pytest

try:  # the HTTP client the openai package brings: httpx2 in its newer releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

import decoding
from batching import BatchingEngine
from tokenizer import EOS_ID
from conftest import MESSAGES, chat_prompt, expected_reply, long_context_pion, scripted_reply, serving, streamed
from server import KEEP_ALIVE_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES, create_app, serving_in_thread, uvicorn_config


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


def test_a_chat_reply_is_its_turn_s_content_whole_or_streamed(pion, tokenizer):
    # Which "\n" is the template's is decoding.TextStream's rule (tests/test_decoding.py); here, that the
    # server gives that content, whole and streamed, for a turn's end and for a caller's stop string.
    cases = [(tokenizer.encode("Hello there\n").ids + [EOS_ID], {}, ("Hello there", "stop")),
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
    expected = decoding.generate_text(reference, tokenizer, [tokenizer.encode(prompt).ids], 20)[0]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "length")
    assert streamed(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                              stream=True))[:2] == (expected, "length")


def test_a_seeded_sampled_reply_equals_generate_text_with_that_seed(client, reference, tokenizer):
    settings = decoding.SamplingSettings(temperature=0.9, top_p=0.8)
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
# A client that leaves frees its row; a failed generation fails alone


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


# ---------------------------------------------------------------------------------------------------
# Keys, hosts and connections


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
    config = uvicorn_config(None)
    assert config.limit_concurrency == MAX_CONNECTIONS and config.timeout_keep_alive == KEEP_ALIVE_TIMEOUT
    assert config.h11_max_incomplete_event_size == MAX_HEADER_BYTES


def closed_by_server(sock):
    """True once the server has closed sock (a read gives b"" or the connection is reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


BODY_HEADERS = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n")


def test_connections_that_trickle_their_bodies_are_closed_and_the_server_answers_others(pion, tokenizer):
    engine = BatchingEngine(pion, tokenizer, 1).start()
    app = create_app(engine, tokenizer, "tiny")
    try:
        with serving_in_thread(app, body_timeout=0.5, min_body_rate=100, max_connections=4) as url:
            port = int(url.rsplit(":", 1)[1])
            slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            for sock in slow:
                sock.sendall(BODY_HEADERS % 1000 + b'{"prompt": "')
            started, open_ = time.monotonic(), list(slow)
            while open_ and time.monotonic() - started < 10:  # 10 bytes/s each, under the 100 asked for
                for sock in open_:
                    try:
                        sock.sendall(b"a")
                    except ConnectionError:
                        pass
                time.sleep(0.1)
                open_ = [sock for sock in open_ if not closed_by_server(sock)]
            assert not open_ and time.monotonic() - started < 5
            assert httpx.get(url + "/health").status_code == 200  # not 503: their slots are free again
            for sock in slow:
                sock.close()
    finally:
        engine.close()


def test_a_body_sent_slowly_but_above_the_minimum_rate_is_read_whole(pion, tokenizer):
    body = json.dumps({"prompt": "Hi" + " " * 500, "max_tokens": 2}).encode()
    engine = BatchingEngine(pion, tokenizer, 1).start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "tiny"), body_timeout=1.0, min_body_rate=200) as url:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
                sock.sendall(BODY_HEADERS % len(body))
                for i in range(0, len(body), 100):  # 250 bytes/s, for longer than body_timeout
                    time.sleep(0.4)
                    sock.sendall(body[i:i + 100])
                sock.settimeout(30)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        engine.close()


def test_an_upload_the_client_abandons_logs_no_traceback(server):
    import logging
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", int(server[0].rsplit(":", 1)[1]))) as sock:
                sock.sendall(BODY_HEADERS % 1000 + b'{"prompt": "')
                time.sleep(0.1)
        deadline = time.monotonic() + 1
        while not records and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server[0] + "/health").status_code == 200
    finally:
        logger.removeHandler(handler)
    assert [r for r in records if r.exc_info or r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("size", [20_000, 60_000])
def test_headers_over_the_cap_are_refused_when_they_arrive_in_one_piece(server, size):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(server[0].rsplit(":", 1)[1]))) as sock:
        sock.sendall(request)
        sock.settimeout(10)
        status = sock.recv(4096).split(b"\r\n")[0]
    assert status in (b"HTTP/1.1 431 Request Header Fields Too Large", b"HTTP/1.1 400 Bad Request")


def test_headers_just_under_the_cap_are_answered(server):
    filler = MAX_HEADER_BYTES - 200
    response = httpx.get(server[0] + "/health", headers={"X-Filler": "a" * filler})
    assert response.status_code == 200


def test_a_keyless_server_on_any_loopback_address_answers_its_own_address(pion, tokenizer):
    engine = BatchingEngine(pion, tokenizer, 1).start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "tiny", host="127.0.0.2"), host="127.0.0.2") as url:
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(url + "/health", headers={"Host": "attacker.example"}).status_code == 400
    finally:
        engine.close()
