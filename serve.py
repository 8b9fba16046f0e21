"""Serve a Pion checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /.

    python serve.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_sft.pt
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "pion", "messages": [{"role": "user", "content": "Hi!"}]}'

Concurrent requests decode together, up to --max_batch at a time (batching.py); the API is server.py's.
"""
import os
import socket
import sys

import torch

from batching import BatchingEngine
from checkpoint import base_model_note, load_model
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
    parser.add_argument("--max_context", type=positive_int, default=None,
                        help="the most tokens a request's prompt and reply may hold together, which sizes the KV "
                             "cache (--max_batch rows of it); default: the model's max_seq_len")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    if args.api_key and not args.api_key.isascii():
        # Clients send the header's bytes as UTF-8 and the server reads them as latin-1: never equal.
        parser.error("--api_key must be ASCII: clients cannot send other characters in a header that match")
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


def check_cache_fits(model, max_batch, context, device):
    """Refuse a KV cache larger than the device's whole memory, in one line: a checkpoint's max_seq_len can
    be any number (10^12 would otherwise end in an allocation failure deep inside torch)."""
    config = model.config
    needed = 2 * config.n_layers * max_batch * config.n_kv_heads * context * config.head_dim * \
        model.embed.weight.element_size()
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total:
        raise PionError(f"the KV cache for --max_batch {max_batch} requests of {context} tokens needs "
                        f"{needed / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} GiB of {device.type}: pass "
                        f"a smaller --max_context (or --max_batch)")


def main(argv=None):
    args = parse_args(argv)
    import uvicorn  # after the flags are checked: --help needs no web server
    sock = listening_socket(args.host, args.port)
    model, device, saved = load_model(args.checkpoint, args.device, args.dtype)
    model = quantize(model, args.quantize)
    context = min(args.max_context or model.config.max_seq_len, model.config.max_seq_len)
    check_cache_fits(model, args.max_batch, context, device)
    tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    name = args.model_name or os.path.splitext(os.path.basename(args.checkpoint))[0]
    note = base_model_note(args.checkpoint, saved)
    if note:  # its chat replies will disappoint: say why before anyone asks
        print(note, file=sys.stderr)
    engine = BatchingEngine(model, tokenizer, args.max_batch, compile=args.compile, max_context=context).start()
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
