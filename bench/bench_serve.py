"""Serving throughput with continuous batching: serve.py's server in this process, 8 concurrent clients
sending 4 streamed completions each (64 new tokens, greedy), with --max_batch 8 against --max_batch 1.

Models: nano and small shapes with random seeded weights, fp32 on CPU. With random weights the end-of-text
token is not a stop (the engine gets no stop ids), so every request must come back with exactly 64 tokens
and finish_reason "length": anything else counts as lost or truncated.
Printed: aggregate tokens/s, p50/p99 time to first token, and a late request's first token while 7
others decode, against its own prefill time plus two decode steps (the engine's timings from /health).
Targets: max_batch 8 >= 4x the aggregate tokens/s of max_batch 1; no request lost; late first token
<= prefill + 2 steps. Exit code 0 either way.
    python bench/bench_serve.py [--sizes nano small] [--threads N]
"""
import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
import urllib.request

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model  # noqa: E402
from batching import BatchingEngine  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from server import create_app, serving_in_thread  # noqa: E402

CLIENTS, REQUESTS_PER_CLIENT, NEW_TOKENS = 8, 4, 64
TARGET_SPEEDUP = 4.0
WORDS = "river stone light market winter garden letter engine harbor silver forest lantern".split()


def prompt(i):
    """A different prompt of about 30 tokens for every request."""
    return f"Request {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(24))


def openai_client(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)


def stream_completion(client, text, max_tokens):
    """One streamed greedy completion -> (seconds to the first text, completion tokens, finish_reason)."""
    start, first, tokens, finish = time.perf_counter(), None, 0, None
    for chunk in client.completions.create(model="bench", prompt=text, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - start, tokens, finish


def run_clients(url):
    """CLIENTS threads, each sending REQUESTS_PER_CLIENT requests one after another -> (results, seconds)."""
    results, lock = [], threading.Lock()

    def client_loop(c):
        client = openai_client(url)
        for r in range(REQUESTS_PER_CLIENT):
            try:
                result = stream_completion(client, prompt(c * REQUESTS_PER_CLIENT + r), NEW_TOKENS)
            except Exception as e:  # a lost request: counted, not fatal
                result = (float("nan"), 0, f"error {type(e).__name__}")
            with lock:
                results.append(result)

    return results, run_threads([threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)])


def run_threads(threads):
    """Start the threads together and wait for all; returns the seconds that took."""
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def health(url):
    with urllib.request.urlopen(url + "/health") as response:
        return json.load(response)


def late_join(url, probes=5):
    """Requests sent while 7 others decode: the worst first-token time / (its prefill + 2 decode steps). The
    prefill time is the engine's own for that request (from /health); the step time is the mean over the
    probes' window (a probe that lands between two steps sees none of its own)."""
    background = [threading.Thread(target=stream_completion, args=(openai_client(url), prompt(100 + i), 400))
                  for i in range(CLIENTS - 1)]
    for thread in background:
        thread.start()
    while health(url)["active"] < CLIENTS - 1:
        time.sleep(0.01)
    time.sleep(0.5)  # steady decoding
    client, probed, start = openai_client(url), [], health(url)
    for i in range(probes):
        ttft, _, _ = stream_completion(client, prompt(200 + i), 1)
        probed.append((ttft, health(url)["prefill_seconds"]))
        time.sleep(0.2)
    end = health(url)
    step = (end["decode_seconds"] - start["decode_seconds"]) / max(end["steps"] - start["steps"], 1)
    for thread in background:
        thread.join()
    return max((ttft / (prefill + 2 * step), ttft, prefill, step) for ttft, prefill in probed)


def client_side(url, join):
    """Everything the clients do, run in a process of their own (as real clients are): their JSON parsing
    then does not compete with the server for this process's interpreter lock."""
    stream_completion(openai_client(url), prompt(-1), 4)  # warm-up
    results, seconds = run_clients(url)
    return results, seconds, late_join(url) if join else None


def measure(size, max_batch, tokenizer, join=False):
    torch.manual_seed(0)
    pion = model.get_model(size).eval()
    engine = BatchingEngine(pion, tokenizer, max_batch, stop_ids=()).start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "bench")) as url, \
                multiprocessing.get_context("spawn").Pool(1) as clients:
            results, seconds, joined = clients.apply(client_side, (url, join))
    finally:
        engine.close()
    ttfts = [r[0] for r in results if r[1] == NEW_TOKENS]
    lost = sum(1 for r in results if r[1] != NEW_TOKENS or r[2] != "length") + CLIENTS * REQUESTS_PER_CLIENT - len(results)
    return {"tokens_per_s": sum(r[1] for r in results) / seconds, "lost": lost, "seconds": seconds, "join": joined,
            "ttft_p50": percentile(ttfts, 50) if ttfts else float("nan"),
            "ttft_p99": percentile(ttfts, 99) if ttfts else float("nan")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["nano", "small"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a CPU shared with other jobs, 1 thread keeps a "
                             "multi-threaded product from stalling on a busy core")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: Pion-small bf16 on the GPU with 1 to 64 concurrent clients (cuda_main)")
    parser.add_argument("--dry_run", action="store_true", help="with --device cuda: the same code, nano fp32, CPU")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return cuda_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    print(f"{CLIENTS} clients x {REQUESTS_PER_CLIENT} streamed requests, {NEW_TOKENS} new tokens each, greedy, "
          f"fp32 CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    result = {"lost": 0, "join_ratio": 0.0}
    for size in args.sizes:
        runs = {b: measure(size, b, tokenizer, join=b == 8) for b in (1, 8)}
        for b, r in runs.items():
            print(f"{size:5} max_batch {b}: {r['tokens_per_s']:7.1f} tokens/s aggregate ({r['seconds']:.1f} s), "
                  f"first token p50 {r['ttft_p50'] * 1000:.0f} ms p99 {r['ttft_p99'] * 1000:.0f} ms, "
                  f"{r['lost']} lost or truncated")
        ratio, ttft, prefill, step = runs[8]["join"]
        print(f"{size:5} late request while 7 decode (worst of 5): first token {ttft * 1000:.0f} ms, prefill "
              f"{prefill * 1000:.0f} ms + 2 steps of {step * 1000:.0f} ms -> {ratio:.2f} of that budget")
        speedup = runs[8]["tokens_per_s"] / runs[1]["tokens_per_s"]
        print(f"{size:5} max_batch 8 vs 1: {speedup:.2f}x aggregate tokens/s (target >= {TARGET_SPEEDUP:.0f}x)")
        result[f"speedup_{size}"] = speedup
        result["lost"] += runs[1]["lost"] + runs[8]["lost"]
        result["join_ratio"] = max(result["join_ratio"], ratio)
    return result


# ----------------------------------------------------------------------------------------------------
# On a CUDA GPU: many concurrent users

CUDA_CLIENTS, CUDA_NEW_TOKENS, CUDA_MAX_BATCH, TARGET_CUDA_TOKENS_PER_S = (1, 8, 32, 64), 128, 64, 10_000


def concurrent_completions(url, texts, max_tokens):
    """One streamed greedy completion per text, all at once, each from its own client -> (results, seconds)."""
    results = [None] * len(texts)

    def one(i):
        try:
            results[i] = stream_completion(openai_client(url), texts[i], max_tokens)
        except Exception as e:  # a lost request: counted, not fatal
            results[i] = (float("nan"), 0, f"error {type(e).__name__}")
    return results, run_threads([threading.Thread(target=one, args=(i,)) for i in range(len(texts))])


def greedy_texts(url, texts, max_tokens):
    client = openai_client(url)
    return [client.completions.create(model="bench", prompt=t, max_tokens=max_tokens, temperature=0).choices[0].text
            for t in texts]


def cuda_side(url, clients, new_tokens):
    """The clients' process: warm-up, each concurrency in turn, then the replies of 4 of the 64 concurrent
    requests (run together with 60 others) against the same requests sent alone."""
    stream_completion(openai_client(url), prompt(-1), 4)
    rows = {n: concurrent_completions(url, [prompt(i) for i in range(n)], new_tokens) for n in clients}
    probes = [prompt(i) for i in range(4)]
    together = {}

    def batch_of_many():
        texts = greedy_texts(url, probes, new_tokens)
        together.update(enumerate(texts))
    background = threading.Thread(target=concurrent_completions,
                                  args=(url, [prompt(100 + i) for i in range(clients[-1] - 4)], new_tokens))
    background.start()
    batch_of_many()
    background.join()
    alone = greedy_texts(url, probes, new_tokens)
    return rows, sum(together[i] == alone[i] for i in range(len(probes)))


def cuda_main(args):
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU, or pass --dry_run on a CPU")
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    size, clients, new_tokens = ("nano", (1, 4), 16) if args.dry_run else ("small", CUDA_CLIENTS, CUDA_NEW_TOKENS)
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    pion = model.get_model(size, use_soft_cap=False).to(device, dtype).eval()
    engine = BatchingEngine(pion, tokenizer, clients[-1], compile=not args.dry_run, stop_ids=()).start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "bench")) as url, \
                multiprocessing.get_context("spawn").Pool(1) as pool:
            rows, same = pool.apply(cuda_side, (url, clients, new_tokens))
    finally:
        engine.close()
    print(f"Pion-{size} {dtype}, {device}, max_batch {clients[-1]}, streamed greedy completions of {new_tokens} tokens")
    for n, (results, seconds) in rows.items():
        done = [r for r in results if r[1] == new_tokens and r[2] == "length"]
        ttfts = [r[0] for r in done]
        print(f"  {n:3} concurrent clients: {sum(r[1] for r in results) / seconds:9,.0f} tokens/s aggregate, first token "
              f"p50 {percentile(ttfts, 50) * 1e3 if ttfts else float('nan'):.0f} ms p99 "
              f"{percentile(ttfts, 99) * 1e3 if ttfts else float('nan'):.0f} ms, {len(results) - len(done)} lost or cut")
    results, seconds = rows[clients[-1]]
    rate = sum(r[1] for r in results) / seconds
    print(f"  greedy replies among {clients[-1]} concurrent = the same requests alone: {same} of 4")
    print(f"{clients[-1]} clients: {rate:,.0f} tokens/s (target >= {TARGET_CUDA_TOKENS_PER_S:,})")
    return {"tokens_per_s": rate, "same": same}


if __name__ == "__main__":
    main()
