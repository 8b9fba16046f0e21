"""Serve a Pion checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /.

    python serve.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_sft.pt
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "pion", "messages": [{"role": "user", "content": "Hi!"}]}'

Concurrent requests decode together, up to --max_batch at a time (batching.py); the API is server.py's.
"""
import os
import socket
import sys

from batching import BatchingEngine
from checkpoint import load_model
from quantize import quantize
from tokenizer import load_tokenizer
from cli import ArgumentParser, PionError, add_inference_args, checked, positive_int, run_cli
from server import Limits, create_app, is_loopback, uvicorn_config


def parse_args(argv=None):
    parser = ArgumentParser(description="Serve a Pion checkpoint over an OpenAI-compatible HTTP API.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file, or hf:OWNER/REPO/FILE")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the server to the network (set --api_key)")
    parser.add_argument("--allow_unauthenticated", action="store_true",
                        help="serve a non-loopback --host without --api_key: anyone who reaches it may use it")
    parser.add_argument("--port", type=checked(int, lambda v: 0 <= v < 65536, "a port number"), default=8000)
    parser.add_argument("--max_batch", type=positive_int, default=8, help="requests decoded together at most")
    parser.add_argument("--api_key", default=os.environ.get("PION_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/* (default: $PION_API_KEY; unset: no key)")
    parser.add_argument("--model_name", default=None, help="the model id the API reports (default: the file's name)")
    parser.add_argument("--default_max_tokens", type=positive_int, default=512,
                        help="new tokens of a request that names no max_tokens (cut to the room its prompt leaves)")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key and not args.allow_unauthenticated:
        parser.error(f"--host {args.host} opens the server to other machines: set --api_key (or PION_API_KEY), "
                     f"or pass --allow_unauthenticated to serve it to anyone who can reach it")
    return args


def listening_socket(host, port):
    """The server's socket, bound before the model loads: a busy port fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PionError(f"cannot listen on {host}:{port} ({e.strerror or e})")
    return sock


def main(argv=None):
    args = parse_args(argv)
    import uvicorn  # after the flags are checked: --help needs no web server
    sock = listening_socket(args.host, args.port)
    model, device, _ = load_model(args.checkpoint, args.device, args.dtype)
    model = quantize(model, args.quantize)
    tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    name = args.model_name or os.path.splitext(os.path.basename(args.checkpoint))[0]
    engine = BatchingEngine(model, tokenizer, args.max_batch, compile=args.compile).start()
    app = create_app(engine, tokenizer, name, args.api_key or None, Limits(default_max_tokens=args.default_max_tokens),
                     host=args.host)
    host, port = sock.getsockname()[:2]  # port 0 picks a free one
    print(f"serving {name} on {device} (max_batch {args.max_batch}) at http://{host}:{port}/", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(app)).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


if __name__ == "__main__":
    run_cli(main)
