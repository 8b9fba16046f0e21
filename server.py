"""An OpenAI-compatible HTTP API and a web chat page over a BatchingEngine.

    app = create_app(engine, tokenizer, model_name="pion")   # then uvicorn.run(app, ...)

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET /v1/models,
GET /health, and the chat page at /. Every request becomes a GenerationRequest; the engine thread calls
back with its text, which reaches the request's event loop through an asyncio queue. A client that leaves
cancels its request, which frees its row before the next decode step. Errors use OpenAI's JSON shape.

In order below: reading a request, talking to the engine, writing a response (whole or streamed), the app's
routes, and serving it with uvicorn.
"""
import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from batching import GenerationRequest
from cli import is_unicode
from decoding import SamplingSettings
from chat_template import CHAT_TURN, ROLES, render_conversation

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_page.html")
MAX_STOP_STRINGS = 4  # as OpenAI's API


@dataclass
class Limits:
    """What one request may ask for. None: as much as the model's context allows."""
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_prompt_tokens: int = None  # default: max_seq_len - 1 (one new token at least)
    max_tokens: int = None         # the most new tokens a request may ask for (default: max_seq_len - 1)
    default_max_tokens: int = 512  # when a request names none (cut to what its prompt leaves)
    max_waiting: int = 256         # requests queued for a row; more are refused with 503


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 431: "invalid_request_error",
             503: "server_error"}

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self):
        error = {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                 "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ----------------------------------------------------------------------------------------------------
# Reading a request


async def read_json(request, max_bytes):
    """The body as a JSON object, refused (413) as soon as it passes max_bytes, however it is sent.

    Only application/json is read: a web page elsewhere can make a browser send a text/plain POST here
    without asking first (a "simple" request), but not a JSON one, which needs a CORS preflight we never grant."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(400, "the body must be JSON, sent with Content-Type: application/json", code="invalid_content_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is over the limit of {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise APIError(413, f"the request body is over the limit of {max_bytes} bytes",
                               code="request_too_large")
    except ClientDisconnect:  # a client that gave up mid-upload: normal, and nothing to log
        raise APIError(400, "the client went away before sending its whole body", code="client_disconnected")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json")
    except RecursionError:
        raise APIError(400, "the body is nested too deeply", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def number(body, name, default, low, high, low_open=False):
    """body[name], a finite number in [low, high] ((low, high] with low_open), or default when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not (low < value <= high if low_open else low <= value <= high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"{name} must be a number in {bounds}, got {value!r}", param=name, code="invalid_value")
    return value


def integer(body, name, low, high):
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise APIError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name,
                       code="invalid_value")
    return value


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop", code="invalid_value")
    return [unicode_text(s, "stop") for s in stop]


def unicode_text(text, param):
    """text, refused when it holds a lone surrogate (JSON can spell "\\ud800"): it is no Unicode text, and
    nothing can encode it."""
    if not is_unicode(text):
        raise APIError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param=param,
                       code="invalid_value")
    return text


def message_text(message, i):
    """A message's content: a string, or a list of text parts (OpenAI's multi-part form)."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content", code="invalid_value")
    return unicode_text(content, f"messages[{i}].content")


def chat_messages(body, limits):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    if len(messages) > limits.max_messages:
        raise APIError(413, f"{len(messages)} messages is over the limit of {limits.max_messages}",
                       param="messages", code="too_many_messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role of {', '.join(ROLES)}",
                           param=f"messages[{i}].role", code="invalid_value")
        rendered.append({"role": message["role"], "content": message_text(message, i)})
    return rendered


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt", code="invalid_value")
    return unicode_text(prompt, "prompt")


# OpenAI parameters that change what is sampled or returned, which this server does not implement, with the
# values that ask for nothing: any other value is refused rather than answered as if it had been applied.
UNSUPPORTED = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "logit_bias": ({}, None),
               "logprobs": (False, None), "top_logprobs": (0, None), "best_of": (1, None), "echo": (False, None),
               "suffix": ("", None), "tools": ([], None), "tool_choice": ("none", "auto", None),
               "response_format": ({"type": "text"}, None)}


def generation_request(body, prompt_ids, stop, max_seq_len, limits, turn=None):
    """The sampling parameters of a request, checked against the limits and the context its prompt leaves."""
    if body.get("n", 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n", code="invalid_value")
    for name, no_op in UNSUPPORTED.items():
        if body.get(name) not in no_op:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "stream must be true or false", param="stream", code="invalid_value")
    max_prompt = limits.max_prompt_tokens or max_seq_len - 1
    if len(prompt_ids) > max_prompt:
        raise APIError(413, f"the prompt has {len(prompt_ids)} tokens, over the limit of {max_prompt}",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    room = max_seq_len - len(prompt_ids)
    cap = min(limits.max_tokens or max_seq_len - 1, room)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer(body, name, 1, 2**31)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, cap)
    elif max_tokens > cap:
        raise APIError(400, f"{name} {max_tokens} is over the {cap} new tokens allowed after this prompt of "
                       f"{len(prompt_ids)} tokens (context {max_seq_len})", param=name, code="context_length_exceeded")
    settings = SamplingSettings(temperature=number(body, "temperature", 1.0, 0, 2),
                                top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                                top_k=integer(body, "top_k", 0, 2**31) or 0)
    return GenerationRequest(prompt_ids, max_tokens, settings, tuple(stop), integer(body, "seed", 0, 2**63 - 1),
                             turn=turn)


# ----------------------------------------------------------------------------------------------------
# Talking to the engine


async def engine_updates(engine, generation, request, max_waiting, poll_disconnect):
    """Submit a generation to the engine and yield its Updates, which the engine thread hands to this event
    loop through an asyncio queue; leaving early (the client went away) cancels the generation.
    poll_disconnect: look for a departed client every half second (a streamed response instead notices
    when a send fails)."""
    if engine.waiting.qsize() >= max_waiting:
        raise APIError(503, "the server is busy; try again", code="server_busy")
    loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
    generation.on_update = lambda update: loop.call_soon_threadsafe(inbox.put_nowait, update)
    engine.submit(generation)
    next_poll = loop.time() + 0.5
    try:
        while True:
            try:
                update = await asyncio.wait_for(inbox.get(), timeout=0.5)
            except asyncio.TimeoutError:
                update = None
            if loop.time() >= next_poll and (poll_disconnect or update is None):
                if await request.is_disconnected():
                    return
                next_poll = loop.time() + 0.5
            if update is None:
                continue
            yield update
            if update.finish_reason:
                return
    finally:
        engine.cancel(generation)  # no-op once it finished


# ----------------------------------------------------------------------------------------------------
# Writing a response


def server_sent_event(data):
    return f"data: {json.dumps(data)}\n\n"


class Completion:
    """One request's answer in OpenAI's shape, a chat ("chat") or text ("text") completion, from its
    generation's Updates: one JSON object once it is over, or with "stream" in the body, server-sent events
    as its text arrives (a chat reply's content: the engine's TextStream leaves out the turn's suffix)."""

    def __init__(self, kind, body, model_name, prompt_tokens):
        self.kind, self.prompt_tokens = kind, prompt_tokens
        self.stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chat_object = "chat.completion.chunk" if self.stream else "chat.completion"
        self.head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                     "object": chat_object if kind == "chat" else "text_completion",
                     "created": int(time.time()), "model": model_name}

    async def response(self, updates):
        return await (self.streamed(updates) if self.stream else self.whole(updates))

    def usage(self, completion_tokens):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def text_of(self, update):
        """An Update's text as the reply gives it; a failed generation is a 500."""
        if update.finish_reason == "error":
            raise APIError(500, f"generation failed: {update.error}", code="generation_failed")
        return update.text

    async def whole(self, updates):
        text, last = [], None
        async for last in updates:
            text.append(self.text_of(last))
        if last is None or not last.finish_reason:
            return JSONResponse({})  # the client left
        text = "".join(text)
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.kind == "chat" else {"text": text})
        return JSONResponse({**self.head, "choices": [choice], "usage": self.usage(last.completion_tokens)})

    async def streamed(self, updates):
        first = await anext(updates, None)  # errors before the first token are still a proper error response
        if first is None:
            return JSONResponse({})  # the client left before its first token
        if first.finish_reason == "error":
            self.text_of(first)  # raises: a failure before anything was sent is a 500
        return StreamingResponse(self.events(first, updates), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def chunk(self, text, finish_reason=None, first=False):
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        data = {**self.head, "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return server_sent_event(data)

    async def events(self, update, updates):
        """The stream's events from its first Update on. However the stream ends, updates is closed: that
        cancels the generation if the client left mid-stream."""
        try:
            if self.kind == "chat":
                yield self.chunk("", first=True)
            while True:
                text = self.text_of(update) if update.finish_reason != "error" else ""
                if text:
                    yield self.chunk(text)
                if update.finish_reason:
                    # An engine error mid-stream has no status code to use: the stream ends with reason "error".
                    yield self.chunk("", update.finish_reason)
                    if self.include_usage:
                        usage = self.usage(update.completion_tokens)
                        yield server_sent_event({**self.head, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                    return
                update = await anext(updates)
        finally:
            await updates.aclose()


# ----------------------------------------------------------------------------------------------------
# The app


def is_loopback(host):
    """True for an address only this machine reaches: localhost, 127.0.0.0/8, ::1 (with or without the
    brackets of a URL). The one rule for the address served on and for the Host names answered."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header):
    """A Host header's name without its port: "[::1]:8000" -> "[::1]", "LocalHost:80" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.split(":")[0]


class LoopbackHostsOnly:
    """ASGI middleware answering 400 to a request whose Host header is not a loopback name. A keyless server
    on 127.0.0.1 is safe from other machines, but a web page can point a name it controls at 127.0.0.1 (DNS
    rebinding) and then read this server's answers as its own site's: the browser still sends that name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not is_loopback(host_name(host)):
                error = APIError(400, "this server answers only requests to a loopback address (localhost, "
                                 "127.x.x.x or [::1])", param="Host", code="invalid_host")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def check_key(request, api_key):
    """Refuse (401) a request without `Authorization: Bearer api_key`, when the server has a key."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # The scheme's name is case-insensitive (RFC 9110); the key is compared in constant time.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")


async def api_error(request, error):
    return error.response()


async def http_error(request, error):
    return APIError(error.status_code, str(error.detail)).response()


async def validation_error(request, error):
    return APIError(400, "invalid request", code="invalid_value").response()


async def unexpected_error(request, error):  # one bad request must not take the server down
    return APIError(500, f"internal error: {type(error).__name__}").response()


# Every error, FastAPI's own (404, 405, a malformed request) included, is answered in OpenAI's shape.
ERROR_HANDLERS = {APIError: api_error, HTTPException: http_error, RequestValidationError: validation_error,
                  Exception: unexpected_error}


def chat_page_response(page):
    # Only the page's own script runs (it carries this response's nonce), and it talks only to this
    # server: even text that slipped into the DOM as HTML could not run a script or load anything.
    nonce = uuid.uuid4().hex
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(page.replace("{{NONCE}}", nonce),
                        headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"})


def create_app(engine, tokenizer, model_name="pion", api_key=None, limits=None, host="127.0.0.1"):
    """The FastAPI app over a started engine. api_key: required as `Authorization: Bearer KEY` on /v1/*.
    host: the address it is served on; on a loopback one without an api_key, only loopback Host headers
    are answered."""
    limits = limits or Limits()
    max_seq_len = engine.max_seq_len
    app = FastAPI(title="Pion", docs_url=None, redoc_url=None, openapi_url=None, exception_handlers=ERROR_HANDLERS)
    if api_key is None and is_loopback(host):
        app.add_middleware(LoopbackHostsOnly)
    created = int(time.time())
    page = open(CHAT_PAGE, encoding="utf-8").read()

    async def complete(request, body, generation, kind):
        completion = Completion(kind, body, model_name, len(generation.prompt_ids))
        updates = engine_updates(engine, generation, request, limits.max_waiting, poll_disconnect=not completion.stream)
        return await completion.response(updates)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, api_key)
        body = await read_json(request, limits.max_body_bytes)
        messages = chat_messages(body, limits)
        prompt_ids, _ = render_conversation(tokenizer, messages, add_generation_prompt=True)
        generation = generation_request(body, prompt_ids, stop_strings(body), max_seq_len, limits, turn=CHAT_TURN)
        return await complete(request, body, generation, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request, api_key)
        body = await read_json(request, limits.max_body_bytes)
        prompt_ids = tokenizer.encode(completion_prompt(body)).ids or [0]  # empty: a new document, as generate.py
        generation = generation_request(body, prompt_ids, stop_strings(body), max_seq_len, limits)
        return await complete(request, body, generation, "text")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pion"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_batch": engine.max_batch, "active": engine.active,
                "waiting": engine.waiting.qsize(), "prefill_seconds": engine.prefill_seconds,
                "steps": engine.steps, "decode_seconds": engine.decode_seconds}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return chat_page_response(page)

    return app


# ----------------------------------------------------------------------------------------------------
# Serving it with uvicorn

# What one connection may hold, whoever sends it: uvicorn itself never times out a request whose headers or
# body do not arrive, so connections that trickle them in would fill MAX_CONNECTIONS and every other request
# (/health included) would get 503.
HEADER_TIMEOUT = 10.0     # seconds from a connection's start (or its previous response) to a request's headers
BODY_TIMEOUT = 10.0       # seconds from a request's headers to its whole body, plus one per MIN_BODY_RATE bytes
MIN_BODY_RATE = 10_000    # bytes/s: a body sent slower than this on average is cut off after BODY_TIMEOUT
KEEP_ALIVE_TIMEOUT = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 1000    # connections and requests beyond this get 503 at once (uvicorn's limit_concurrency)
MAX_HEADER_BYTES = 16384  # request line and headers: 431 (400 from h11 when they arrive in pieces)


def header_bytes(scope):
    """The size of a request's request line and header lines as sent ("name: value" and CRLF each)."""
    query = scope["query_string"]
    request_line = len(scope["method"]) + len(scope["raw_path"]) + (len(query) + 1 if query else 0) + 11
    return request_line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class HeaderCap:
    """ASGI middleware answering 431 to a request whose headers are over max_bytes. h11 holds the cap only
    while headers arrive in pieces (its limit is on an incomplete event); one read can bring them all."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and header_bytes(scope) > self.max_bytes:
            error = APIError(431, f"the request's headers are over the limit of {self.max_bytes} bytes",
                             code="headers_too_large")
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def uvicorn_config(app, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, min_body_rate=MIN_BODY_RATE,
                   max_connections=MAX_CONNECTIONS, **kwargs):
    """uvicorn's Config for the app: h11 with deadlines for a request's headers and body, a keep-alive
    timeout, a connection cap and a header cap."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Deadlines(H11Protocol):
        """h11 that closes a connection too slow to send its request: the headers are due header_timeout
        seconds after the connection opened or answered its previous request, the body body_timeout seconds
        after the headers plus a second per min_body_rate bytes it brought. While a request is being answered
        nothing is due. One timer per connection, armed for the earliest deadline, which checks again when it
        fires."""

        def connection_made(self, transport):
            self._timer, self._request, self._idle_since = None, None, None
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._arm()

        def data_received(self, data):
            if self._request is not None and self._request is self.cycle and self.cycle.more_body:
                self._body_bytes += len(data)
            super().data_received(data)
            self._arm()

        def on_response_complete(self):
            self._idle_since = self.loop.time()
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _due(self):
            """When what the client owes must have arrived; None while its request is answered."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return self._idle_since + header_timeout
            if cycle is not self._request:  # uvicorn starts a new cycle when a request's headers are in
                self._request, self._body_since, self._body_bytes = cycle, self.loop.time(), 0
            if cycle.more_body:
                return self._body_since + body_timeout + self._body_bytes / min_body_rate
            return None

        def _arm(self):
            due = self._due()  # also notes a new request's start
            if due is None or self.transport.is_closing() or (self._timer is not None and self._timer.when() <= due):
                return  # a timer that fires earlier checks again then
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(due, self._expire)

        def _expire(self):
            self._timer = None
            due = self._due()
            if due is not None and self.loop.time() >= due:
                self.transport.close()
            else:
                self._arm()

    return uvicorn.Config(HeaderCap(app, MAX_HEADER_BYTES), http=Deadlines, timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                          limit_concurrency=max_connections, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          log_level="warning", **kwargs)


@contextlib.contextmanager
def serving_in_thread(app, host="127.0.0.1", **connection_limits):
    """uvicorn serving app on a free port of host from a background thread (tests, benchmarks): yields the
    base URL, and stops the server on exit. connection_limits: uvicorn_config's (header_timeout, ...)."""
    import uvicorn
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn_config(app, **connection_limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
