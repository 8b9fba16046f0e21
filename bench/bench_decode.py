"""Batch-1 greedy decoding speed on CPU: Pion's generate() against transformers' Qwen3ForCausalLM.generate()
with the same shape and weights, and both against the machine's memory-bandwidth bound.

Pion-small, fp32, random seeded weights, a 32-token prompt and 128 new tokens. Soft-capping is off for
the comparison (Qwen3 has none, so both compute the same thing); Pion with it on is printed beside.
Pion decodes with generate(compile=True) (`generate.py --compile`), its fast path, compiled during the
warm-up; eager Pion is printed beside. transformers runs its default generate(), as users call it, and
its compiled path as its docs describe it (generation_config.cache_implementation = "static" and a
torch.compile'd forward, default mode as Pion's on the CPU), so that compiled is compared with compiled
and eager with eager.
Decoding one token reads every weight once (the tied embedding once too: the lm_head multiplies by all
of it, the lookup reads one row), so tokens/s <= copy bandwidth / parameter bytes.
Targets: Pion >= 2x transformers' default generate(), and >= 0.60 of the bound. Exit code 0 either way.
Then (alone with --local_only) local inference: Pion fp32, --quantize int8 and int4 against llama.cpp's q8_0
and q4_0 files of the same weights, decoding and a 512-token prefill (targets: >= 1.0x and >= 0.8x llama.cpp).
    python bench/bench_decode.py [--runs 5] [--local_only] [--threads N]
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model  # noqa: E402
from transformers_format import qwen3_config, qwen3_state_dict  # noqa: E402
from cli import run_cli  # noqa: E402
from decoding import generate  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 32, 128
TARGET_VS_HF, TARGET_OF_BOUND = 2.0, 0.60


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(gigabytes=1.0, runs=3):
    """Bytes read + written per second by dst.copy_(src) of a ~1 GB fp32 tensor, best of `runs`."""
    src = torch.full((int(gigabytes * 2**30) // 4,), 1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy also pays dst's page faults
    return 2 * src.nbytes / min(seconds(lambda: dst.copy_(src)) for _ in range(runs))


def build_models():
    """Pion-small without and with soft-capping, and transformers' Qwen3, all with the same seeded weights."""
    torch.manual_seed(0)
    pion = model.get_model("small", use_soft_cap=False).eval()
    capped = model.Pion(dataclasses.replace(pion.config, use_soft_cap=True)).eval()
    capped.load_state_dict(pion.state_dict())
    hf = qwen3_model(pion)
    return pion, capped, hf


def qwen3_model(pion):
    import transformers
    hf = transformers.Qwen3ForCausalLM(qwen3_config(pion.config)).eval()
    hf.load_state_dict(qwen3_state_dict(pion.state_dict()))
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied, like Pion
    return hf


def compiled_qwen3_model(pion):
    """transformers' fast path: a static KV cache and the forward compiled (its docs' recipe)."""
    hf = qwen3_model(pion)
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward)
    return hf


def pion_decoder(pion, prompt, compile=True):
    # stop_ids=(): never stop at <|endoftext|>, so every run decodes exactly n tokens.
    return lambda n: generate(pion, prompt, n, stop_ids=(), compile=compile)[0]


def hf_decoder(hf, prompt):
    input_ids = torch.tensor([prompt])
    attention_mask = torch.ones_like(input_ids)
    return lambda n: hf.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)[0, len(prompt):].tolist()


def decode_rates(decoders, runs):
    """(name -> decode tokens/s, [copy bandwidth of each round]). Decoding excludes the prefill:
    (NEW_TOKENS - 1) / (best time of NEW_TOKENS - best time of 1 token), since a 1-token run is the prefill
    plus the first token. The decoders and the bandwidth measurement take turns in every round, so a shared
    machine's background load and memory traffic hit them alike."""
    for decode in decoders.values():  # warm up (compilation, allocator, oneDNN primitives, lazy imports)
        decode(NEW_TOKENS)
        decode(1)
    full = {name: float("inf") for name in decoders}
    one = dict(full)
    bandwidths = []
    for _ in range(runs):
        bandwidths.append(copy_bandwidth())
        for name, decode in decoders.items():
            full[name] = min(full[name], seconds(lambda: decode(NEW_TOKENS)))
            one[name] = min(one[name], seconds(lambda: decode(1)))
    return {name: (NEW_TOKENS - 1) / (full[name] - one[name]) for name in decoders}, bandwidths


def verdict(value, target):
    return "PASS" if value >= target else "FAIL"


def main(argv=None):
    """Print the table; return the measurements (bench/run_all.py reads vs_hf and of_bound)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (the best of each measure counts)")
    parser.add_argument("--local_only", action="store_true", help="only the int8/int4/llama.cpp table")
    parser.add_argument("--threads", type=int, default=None, help="torch's and llama.cpp's threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: Pion-small bf16 on the GPU (cuda_main); --dry_run runs that code on the CPU")
    parser.add_argument("--dry_run", action="store_true", help="with --device cuda: a tiny fp32 model on the CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        return cuda_main(args)
    if args.local_only:
        torch.manual_seed(0)
        return local_inference(model.get_model("small", use_soft_cap=False).eval(), bench_prompt(), args.runs)
    import transformers

    load_before = os.getloadavg()[0]
    pion, capped, hf = build_models()
    prompt = bench_prompt()
    hf_compiled = compiled_qwen3_model(pion)
    reference = pion_decoder(pion, prompt)(NEW_TOKENS)
    same_tokens = reference == hf_decoder(hf, prompt)(NEW_TOKENS)
    same_compiled = reference == hf_decoder(hf_compiled, prompt)(NEW_TOKENS)
    cap = capped.config.logit_cap
    rates, bandwidths = decode_rates({"pion": pion_decoder(pion, prompt), "hf": hf_decoder(hf, prompt),
                          "eager": pion_decoder(pion, prompt, compile=False),
                          "hf_compiled": hf_decoder(hf_compiled, prompt),
                          "capped": pion_decoder(capped, prompt)}, args.runs)
    load_after = os.getloadavg()[0]

    bandwidth = max(bandwidths)
    weight_bytes = sum(p.numel() * p.element_size() for p in pion.parameters())  # a tied weight counts once
    bound = bandwidth / weight_bytes
    vs_hf, of_bound = rates["pion"] / rates["hf"], rates["pion"] / bound
    print(f"greedy decode, Pion-small ({pion.count_parameters():,} params, {weight_bytes / 1e6:.0f} MB fp32), batch 1, "
          f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, CPU fp32")
    print(f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__} ({hf.config._attn_implementation} attention); "
          f"load average {load_before:.2f} before, {load_after:.2f} after (this benchmark included)")
    print(f"memory copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write; best of {len(bandwidths)} rounds, lowest "
          f"{min(bandwidths) / 1e9:.1f}) -> bound {bound:.1f} tok/s")
    print(f"greedy tokens identical (Pion vs transformers): default {'yes' if same_tokens else 'NO'}, "
          f"static cache + compile {'yes' if same_compiled else 'NO'}")
    print(f"  {'decoder':58} {'tok/s':>7} {'vs HF':>6} {'of bound':>9}")
    for name, label in [("pion", "Pion generate(compile=True), no soft-cap"),
                        ("hf", "transformers Qwen3ForCausalLM.generate()"),
                        ("eager", "Pion generate(), eager, no soft-cap"),
                        ("hf_compiled", "transformers generate(), static cache, compiled forward"),
                        ("capped", f"Pion generate(compile=True), soft-cap {cap:g}")]:
        print(f"  {label:58} {rates[name]:7.1f} {rates[name] / rates['hf']:5.2f}x {rates[name] / bound:9.2f}")
    print(f"  {'bandwidth bound':58} {bound:7.1f}")
    compiled_ratio, eager_ratio = rates["pion"] / rates["hf_compiled"], rates["eager"] / rates["hf"]
    print(f"side by side: compiled Pion / compiled transformers {compiled_ratio:.2f}x; "
          f"eager Pion / eager transformers {eager_ratio:.2f}x")
    print(f"Pion / transformers {vs_hf:.2f}x (target >= {TARGET_VS_HF:.2f}x) {verdict(vs_hf, TARGET_VS_HF)}")
    print(f"Pion / bound {of_bound:.2f} (target >= {TARGET_OF_BOUND:.2f}) {verdict(of_bound, TARGET_OF_BOUND)}")
    return {"vs_hf": vs_hf, "of_bound": of_bound, "compiled_vs_hf_compiled": compiled_ratio,
            "eager_vs_hf_eager": eager_ratio, "tokens_per_second": rates, "bound_tokens_per_second": bound,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "same_tokens": same_tokens and same_compiled,
            **local_inference(pion, prompt, args.runs)}


# ----------------------------------------------------------------------------------------------------
# Local inference (issues #16, #34): int8 and int4 weights, and llama.cpp on the GGUF export of the same model

TARGET_INT8_VS_FP32, TARGET_VS_LLAMA, TARGET_PREFILL_VS_LLAMA = 1.8, 1.0, 0.8
LONG_PROMPT_TOKENS = 512  # the prefill timed: a chat's first token waits for it
LOCAL_DECODERS = [("fp32", "Pion fp32, compiled", None), ("int8", "Pion --quantize int8, compiled", "llama_q8_0"),
                  ("int4", "Pion --quantize int4, compiled", "llama_q4_0"), ("llama_q8_0", "llama.cpp q8_0 GGUF", None),
                  ("llama_q4_0", "llama.cpp q4_0 GGUF", None)]  # (name, label, the llama.cpp file it is set against)


def bench_prompt(n=PROMPT_TOKENS):
    """The prompt of every decoder: n seeded random ids."""
    return torch.randint(3, 50000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def llama_cpp_decoder(pion, gguf_type, prompt, folder):
    """(decode(n), prefill(), the Llama to close): greedy decoding by llama.cpp (llama-cpp-python) of pion
    exported as gguf_type, on torch's thread count, token by token with the argmax of its logits, as
    tests/test_gguf.py drives it; prefill reads the long prompt in one batch, as llama-cli does."""
    import llama_cpp
    import numpy as np
    from tokenizer import load_tokenizer
    from gguf_format import write_gguf
    path = write_gguf(pion, load_tokenizer(), os.path.join(folder, f"pion-{gguf_type}.gguf"), gguf_type)
    threads, long_prompt = torch.get_num_threads(), bench_prompt(LONG_PROMPT_TOKENS)
    llm = llama_cpp.Llama(path, n_ctx=LONG_PROMPT_TOKENS + 1, n_batch=LONG_PROMPT_TOKENS, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # logits of the last position only

    def next_token():  # without logits_all, llm.scores is not filled: read the last position's logits
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def decode(n):
        llm.reset()
        llm.eval(prompt)
        new = []
        for _ in range(n):
            new.append(next_token())
            if len(new) < n:
                llm.eval(new[-1:])
        return new

    def prefill():
        llm.reset()
        llm.eval(long_prompt)
        return next_token()
    return decode, prefill, llm


def prefill_rates(prefills, runs):
    """name -> prompt tokens/s of the LONG_PROMPT_TOKENS-token prefill (with its first token), best of runs,
    the prefills taking turns in every round."""
    for prefill in prefills.values():
        prefill()  # warm up
    best = {name: float("inf") for name in prefills}
    for _ in range(runs):
        for name, prefill in prefills.items():
            best[name] = min(best[name], seconds(prefill))
    return {name: LONG_PROMPT_TOKENS / t for name, t in best.items()}


def local_inference(pion, prompt, runs):
    """Pion fp32, int8 and int4, compiled, against llama.cpp's q8_0 and q4_0 files of the same weights;
    measured together (decode_rates interleaves them), so fp32 is re-measured as this table's baseline."""
    import copy
    import tempfile
    import llama_cpp
    from quantize import cpu_kernels, quantize
    load_before = os.getloadavg()
    models = {"fp32": pion, **{method: quantize(copy.deepcopy(pion), method) for method in ("int8", "int4")}}
    long_prompt = bench_prompt(LONG_PROMPT_TOKENS)
    decoders = {name: pion_decoder(m, prompt) for name, m in models.items()}
    prefills = {name: (lambda m=m: generate(m, long_prompt, 1, stop_ids=())) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as folder:
        llms = []
        for gguf_type in ("q8_0", "q4_0"):
            decode, prefill, llm = llama_cpp_decoder(pion, gguf_type, prompt, folder)
            decoders[f"llama_{gguf_type}"], prefills[f"llama_{gguf_type}"] = decode, prefill
            llms.append(llm)
        tokens = {name: decode(NEW_TOKENS) for name, decode in decoders.items()}
        rates, _ = decode_rates(decoders, runs)
        prefilled = prefill_rates(prefills, runs)
        for llm in llms:
            llm.close()
    load_after = os.getloadavg()
    agree = {name: sum(a == b for a, b in zip(tokens[name], tokens["fp32"])) for name in tokens}
    print(f"\nlocal inference: Pion-small compiled (generate(compile=True)) vs llama.cpp {llama_cpp.__version__} "
          f"(llama-cpp-python) on the GGUF export, {torch.get_num_threads()} threads each, batch 1 greedy, CPU; "
          f"{PROMPT_TOKENS}-token prompt + {NEW_TOKENS} tokens, and a {LONG_PROMPT_TOKENS}-token prefill")
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"(this benchmark included)")
    # What the llama.cpp build uses: a portable (AVX2) build multiplies int8 without VNNI, a native one with it.
    cpu_line = next((line for line in llama_cpp.llama_print_system_info().decode().split("\n") if "AVX" in line), "?")
    pion_kernels = "quantize_cpu.cpp built with -march=native" if cpu_kernels() else "ATen's (quantize_cpu.cpp not built)"
    print(f"llama.cpp build: {' '.join(cpu_line.split())}; Pion's kernels: {pion_kernels}")
    print(f"  {'decoder':34} {'decode tok/s':>12} {'vs fp32':>8} {'vs llama':>9} {'prefill tok/s':>14} "
          f"{'vs llama':>9} {'tokens = fp32':>14}")
    for name, label, llama in LOCAL_DECODERS:
        versus = f"{rates[name] / rates[llama]:8.2f}x" if llama else f"{'':9}"
        prefill_versus = f"{prefilled[name] / prefilled[llama]:8.2f}x" if llama else f"{'':9}"
        print(f"  {label:34} {rates[name]:12.1f} {rates[name] / rates['fp32']:7.2f}x {versus} {prefilled[name]:14.1f} "
              f"{prefill_versus} {agree[name]:>10}/{NEW_TOKENS}")
    results = {"int8_vs_fp32": rates["int8"] / rates["fp32"], "local_tokens_per_second": rates,
               "local_prefill_tokens_per_second": prefilled}
    print(f"Pion int8 / Pion fp32 decode {results['int8_vs_fp32']:.2f}x (target >= {TARGET_INT8_VS_FP32:.2f}x) "
          f"{verdict(results['int8_vs_fp32'], TARGET_INT8_VS_FP32)}")
    for name, _, llama in LOCAL_DECODERS[1:3]:
        for what, measured, target in (("decode", rates, TARGET_VS_LLAMA),
                                       ("prefill", prefilled, TARGET_PREFILL_VS_LLAMA)):
            ratio = results[f"{name}_{what}_vs_{llama}"] = measured[name] / measured[llama]
            print(f"Pion {name} / llama.cpp {llama[6:]} {what} {ratio:.2f}x (target >= {target:.2f}x) "
                  f"{verdict(ratio, target)}")
    return results



# ----------------------------------------------------------------------------------------------------
# On a CUDA GPU: Pion-small in bf16, batch 1

TARGET_CUDA_MS_PER_TOKEN, TARGET_CUDA_VS_HF = 0.40, 2.0


def cuda_main(args):
    """generate(compile=True) ms/token, the bare compiled step's ms/token (with and without the fused
    projections), and transformers' static-cache compiled generate() of the same weights, in one run."""
    import decoding
    from transformers import Qwen3ForCausalLM
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU, or pass --dry_run on a CPU")
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    sizes = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128) if args.dry_run else {}
    n = 32 if args.dry_run else NEW_TOKENS

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def best_seconds(fn, runs=3):
        sync()
        return min(seconds(lambda: (fn(), sync())) for _ in range(runs))

    torch.manual_seed(0)
    pion = model.get_model("small", use_soft_cap=False, **sizes).to(device, dtype).eval()
    prompt = torch.randint(3, pion.config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()

    def pion_generate(k, compile=True):
        return decoding.generate(pion, prompt, k, stop_ids=(), compile=compile)[0]
    eager = pion_generate(n, compile=False)
    compiled = pion_generate(n)
    per_token = (best_seconds(lambda: pion_generate(n)) - best_seconds(lambda: pion_generate(1))) / (n - 1)

    def bare_step_seconds(fused):
        """The compiled step alone in a loop, no host sync: what a token costs without the loop around it."""
        step = decoding.compiled_decode_step(torch.device(device).type)
        with torch.inference_mode():
            cache = pion.new_kv_cache(1, PROMPT_TOKENS + n)
            cache.fused_projections = fused and pion.fuse_projections()
            for t in cache.k + cache.v:
                torch._dynamo.mark_dynamic(t, 2)
            token = decoding.prefill(pion, cache, [prompt]).argmax(-1)[:, None]
            position = torch.tensor([PROMPT_TOKENS], device=device)
            for _ in range(5):
                step(pion, cache, token, position)
            steps = n - 8
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                token = step(pion, cache, token, position).argmax(-1)[:, None]
                position += 1
            sync()
            return cache.fused_projections, (time.perf_counter() - start) / steps

    fused, bare = bare_step_seconds(True)
    _, bare_unfused = bare_step_seconds(False)

    hf = Qwen3ForCausalLM(qwen3_config(pion.config)).to(device, dtype).eval()
    hf.load_state_dict(qwen3_state_dict(pion.state_dict()))
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead" if device == "cuda" else None)
    ids = torch.tensor([prompt], device=device)

    def hf_generate(k):
        return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=1)[0, PROMPT_TOKENS:].tolist()
    hf_tokens = hf_generate(n)
    hf_generate(n), hf_generate(1)
    hf_per_token = (best_seconds(lambda: hf_generate(n)) - best_seconds(lambda: hf_generate(1))) / (n - 1)

    def agree(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"greedy decode, Pion-small {dtype}, batch 1, {PROMPT_TOKENS}-token prompt, {n} new tokens, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (dry run)'}, torch {torch.__version__}")
    print(f"  Pion generate(compile=True)           {per_token * 1e3:7.3f} ms/token")
    print(f"  Pion bare compiled step, fused q/k/v and gate/up ({'on' if fused else 'not available'})"
          f" {bare * 1e3:7.3f} ms/token; separate {bare_unfused * 1e3:.3f}")
    print(f"  transformers generate(), static cache, compiled {hf_per_token * 1e3:7.3f} ms/token")
    print(f"  greedy tokens: compiled = eager for the first {agree(compiled, eager)} of {n}; "
          f"Pion = transformers for the first {agree(compiled, hf_tokens)}")
    print(f"Pion {per_token * 1e3:.3f} ms/token (target <= {TARGET_CUDA_MS_PER_TOKEN}); "
          f"{hf_per_token / per_token:.2f}x transformers' compiled decode (target >= {TARGET_CUDA_VS_HF})")
    return {"ms_per_token": per_token * 1e3, "bare_ms": bare * 1e3, "hf_ms_per_token": hf_per_token * 1e3}


if __name__ == "__main__":
    run_cli(main)
