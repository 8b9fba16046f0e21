"""quantize.py: int8 and int4 weight-only decoding keep what the model says, and --quantize is wired into the CLIs."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cli import PionError
from conftest import assert_one_line_error, run_in_process, tiny_pion
from decoding import generate
from model import Linear
import quantize as quantize_module
from quantize import Int4Linear, Int8Linear, cpu_kernels, quantize, quantize_blocks_int4, quantize_rows_int8
from generate import main as generate_main

PROMPTS = [[464, 2068, 7586, 21831], [7454, 2402, 257, 640, 11], [4299, 277, 7, 87, 2599], [50, 1000, 20000]]


@pytest.fixture(scope="module")
def models():
    """(fp32 tiny_pion, its int8 copy): greedy decoding follows the prompt with these weights."""
    fp32 = tiny_pion()
    return fp32, quantize(copy.deepcopy(fp32), "int8")


def perplexity(m, ids):
    with torch.no_grad():
        logits = m(ids[None])["logits"][0, :-1]
    return F.cross_entropy(logits, ids[1:]).exp().item()


def test_rows_round_to_the_nearest_int8_step_of_their_own_scale():
    w = torch.randn(8, 32) * torch.linspace(0.01, 10, 8)[:, None]  # rows of very different ranges
    q, scale = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_an_all_zero_row_stays_zero():
    q, scale = quantize_rows_int8(torch.zeros(2, 4))
    assert q.eq(0).all() and torch.isfinite(scale).all()


def test_every_linear_and_the_tied_output_projection_become_int8_while_the_embedding_stays(models):
    fp32, int8 = models
    assert not any(isinstance(m, Linear) for m in int8.modules())
    layers = [name for name, m in int8.named_modules() if isinstance(m, Int8Linear) and "fused_layer" not in name]
    assert len(layers) == 7 * fp32.config.n_layers + 1
    assert isinstance(int8.lm_head, Int8Linear) and int8.lm_head.int8_weight.shape == fp32.embed.weight.shape
    assert int8.embed.weight.dtype == torch.float32 and torch.equal(int8.embed.weight, fp32.embed.weight)


def test_int8_predicts_fp32s_greedy_continuations_on_at_least_90_percent_of_tokens(models):
    # Teacher-forced along fp32's own greedy path, as tests/test_gguf.py checks q8_0: this random tiny model
    # has near-ties (top-2 gaps of 0.01 logit) that rounding flips, and free-running, one flip changes the
    # whole rest of the continuation. About 1 token in 10 disagrees (1 in 20 before the products took bf16 rows).
    fp32, int8 = models
    agree = total = 0
    for prompt in PROMPTS:
        continuation = generate(fp32, prompt, 32, stop_ids=())[0]
        assert len(set(continuation)) > 5  # a real continuation, not one token repeated
        with torch.no_grad():
            logits = int8(torch.tensor([prompt + continuation[:-1]]))["logits"][0, len(prompt) - 1:]
        agree += sum(p == t for p, t in zip(logits.argmax(-1).tolist(), continuation))
        total += len(continuation)
    assert agree >= 0.9 * total, f"{agree}/{total} tokens agree"


def test_int8_perplexity_is_within_1_percent_of_fp32(models):
    fp32, int8 = models
    ids = torch.randint(3, 50000, (100,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, torch.tensor(sum(PROMPTS, []))])
    assert perplexity(int8, ids) == pytest.approx(perplexity(fp32, ids), rel=0.01)


def test_bfloat16_weights_quantize_too(models):
    fp32, _ = models
    int8 = quantize(copy.deepcopy(fp32).to(torch.bfloat16), "int8")
    logits = int8(torch.tensor([PROMPTS[0]]))["logits"]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_compiled_int8_decoding_gives_the_same_tokens_as_eager_int8(models):
    _, int8 = models
    for prompt in PROMPTS[:2]:
        assert generate(int8, prompt, 16, stop_ids=(), compile=True) == generate(int8, prompt, 16, stop_ids=())


# ---------------------------------------------------------------------------------------------------
# int4: llama.cpp's Q4_0 blocks


def test_int4_blocks_are_llama_cpps_q4_0():
    gguf = pytest.importorskip("gguf")
    w = torch.randn(48, 96) * torch.linspace(0.01, 10, 48)[:, None]
    w[0, :32] = 0  # an all-zero block stays zero
    stored = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    expected = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(Int4Linear(w).weight, torch.from_numpy(expected))
    q, _ = quantize_blocks_int4(w)
    assert q.dtype == torch.uint8 and q.max() <= 15


@pytest.mark.parametrize("rows", [1, 9], ids=["decode step", "prompt"])
def test_an_int4_layer_multiplies_by_its_q4_0_weights(rows):
    # Up to a few rows go through the int4 kernel, more through a bf16 copy of the weight: both compute
    # x @ weight.T with the rows rounded to bf16. 50 outputs: not a multiple of the kernel's 16.
    w = torch.randn(50, 64)
    layer = Int4Linear(w)
    x = torch.randn(rows, 64)
    expected = x @ layer.weight.T
    assert (layer(x) - expected).norm() <= 0.01 * expected.norm()
    assert (layer.weight - w).norm() <= 0.15 * w.norm()  # 4-bit steps of each block's range


def test_int4_logits_are_fp32s_with_the_weights_rounded_to_q4_0(models):
    fp32, _ = models
    int4 = quantize(copy.deepcopy(fp32), "int4")
    rounded = copy.deepcopy(fp32)
    with torch.no_grad():
        for name, layer in int4.named_modules():
            if isinstance(layer, Int4Linear) and "fused_layer" not in name:  # the fused layers view these
                rounded.get_submodule(name).weight.copy_(layer.weight)
        rounded.embed.weight.copy_(int4.embed.weight)
    assert torch.equal(int4.embed.weight, int4.lm_head.weight)  # the lookup reads what q4_0 stores, as llama.cpp
    ids = torch.tensor([sum(PROMPTS, [])])
    with torch.no_grad():
        expected, got = rounded(ids)["logits"], int4(ids)["logits"]
        step = int4(ids[:, :1])["logits"]  # one row: the int4 kernel's path
    assert (got - expected).norm() <= 0.02 * expected.norm()
    # The kernel also rounds the row to int8 in blocks of 32, as llama.cpp's q4_0 product does.
    assert (step - expected[:, :1]).norm() <= 0.03 * expected[:, :1].norm()


@pytest.mark.slow
def test_compiled_int4_decoding_gives_the_same_tokens_as_eager_int4(models):
    int4 = quantize(copy.deepcopy(models[0]), "int4")
    for prompt in PROMPTS[:2]:
        assert generate(int4, prompt, 16, stop_ids=(), compile=True) == generate(int4, prompt, 16, stop_ids=())


def test_int4_refuses_layers_that_do_not_split_into_blocks_of_32():
    with pytest.raises(PionError, match="blocks of 32"):
        quantize(tiny_pion(d_model=48, n_heads=4, n_kv_heads=2), "int4")


def test_an_unknown_quantization_is_an_error():
    with pytest.raises(PionError, match="int8, int4"):
        quantize(tiny_pion(), "int3")


def test_quantizing_on_a_device_without_support_is_one_clear_line():
    m = tiny_pion().to("meta")
    with pytest.raises(PionError) as excinfo:
        quantize(m, "int8")
    message = str(excinfo.value)
    assert "\n" not in message and "meta" in message and "--device cpu" in message


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_cli_decodes_with_quantized_weights(method, tiny_checkpoint, tokenizer_path):
    path, _ = tiny_checkpoint
    result = run_in_process(generate_main, ["--checkpoint", path, "--tokenizer", tokenizer_path, "--device", "cpu",
                                     "--quantize", method, "--prompt", "The quick brown fox", "--max_tokens", "8",
                                     "--temperature", "0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quick brown fox") and "8 tokens" in result.stderr


def test_cli_unknown_quantize_value_is_one_line(tiny_checkpoint):
    path, _ = tiny_checkpoint
    result = run_in_process(generate_main, ["--checkpoint", path, "--quantize", "int3", "--prompt", "x"])
    assert_one_line_error(result, "--quantize")


def test_chat_and_eval_take_the_same_flag():
    import chat
    import eval as eval_script
    assert chat.parse_args(["--quantize", "int8"]).quantize == "int8"
    assert chat.parse_args([]).quantize is None
    assert eval_script.parse_args(["--checkpoint", "x", "--tasks", "arc_easy", "--quantize", "int4"]).quantize == "int4"


def test_the_bytes_a_decode_step_reads_count_the_int8_weights():
    import hardware
    from conftest import tiny_model
    fp32 = tiny_model()
    int8 = quantize(tiny_model(), "int8")
    assert 0 < hardware.parameter_bytes(int8) < hardware.parameter_bytes(fp32)
    assert hardware.parameter_bytes(int8) > sum(p.numel() * p.element_size() for p in int8.parameters())


# ----------------------------------------------------------------------------------------------------
# quantize_cpu.cpp: the few-row kernels, and ATen's kernels where they cannot be built

needs_kernels = pytest.mark.skipif(not cpu_kernels(), reason="quantize_cpu.cpp does not build on this machine")


def rows_as_int8_blocks(x):
    """The kernels' rounding of activation rows: int8 in blocks of 32, each scaled by its largest |value| / 127
    -> (q (M, K / 32, 32), d (M, K / 32, 1))."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0.0))
    return q, amax / 127


def int8_reference(x, weight, scale):
    q, d = rows_as_int8_blocks(x)
    w = weight.float().view(weight.shape[0], -1, 32)
    return torch.einsum("mbk,nbk,mb->mn", q, w, d[..., 0]) * scale


def int4_reference(x, q4, d4):
    q, d = rows_as_int8_blocks(x)
    w = (q4.float() - 8).view(q4.shape[0], -1, 32)
    return torch.einsum("mbk,nbk,mb,nb->mn", q, w, d[..., 0], d4)


def kernel_arguments(method, n, k):
    """(the weight arguments of torch.ops.pion.<method>_linear for a random (n, k) weight, the same product
    computed in torch for rows x)."""
    if method == "int8":
        weight, scale = quantize_rows_int8(torch.randn(n, k))
        return (weight, scale), lambda x: int8_reference(x, weight, scale)
    q, d = quantize_blocks_int4(torch.randn(n, k))
    return (quantize_module.q4_0_nibbles(q), d.half()), lambda x: int4_reference(x, q, d)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(4, 1, 64), (37, 3, 160), (20, 2, 256)], ids=["1 row", "3 rows, 5 blocks", "2 rows"])
def test_a_kernel_multiplies_rows_rounded_to_int8_blocks_by_its_weights(method, shape):
    # Output counts that are not a multiple of 4 and block counts that are odd or not a multiple of 4 take
    # every path: several outputs at a time and one at a time, 512-bit steps and the 256-bit tail.
    n, m, k = shape
    arguments, reference = kernel_arguments(method, n, k)
    x = torch.randn(m, k)
    x[0, :32] = 0  # an all-zero block
    got = getattr(torch.ops.pion, f"{method}_linear")(x, *arguments)
    torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_bf16_rows_go_through_the_kernels_as_their_fp32_values():
    weight, scale = quantize_rows_int8(torch.randn(8, 64))
    x = torch.randn(1, 64).bfloat16()
    assert torch.equal(torch.ops.pion.int8_linear(x, weight, scale),
                       torch.ops.pion.int8_linear(x.float(), weight, scale))


AVX2_BUILD = """
import sys, torch
sys.path.insert(0, {root!r})
import quantize
assert quantize.cpu_kernels(flags=("-march=haswell",))  # AVX2 and FMA: no AVX-512, no VNNI
torch.manual_seed(0)
x = torch.randn(3, 160)
w8, s8 = quantize.quantize_rows_int8(torch.randn(37, 160))
q4, d4 = quantize.quantize_blocks_int4(torch.randn(37, 160))
int8 = torch.ops.pion.int8_linear(x, w8, s8)
torch.save([int8, torch.ops.pion.int4_linear(x, quantize.q4_0_nibbles(q4), d4.half())], {out!r})
"""


@pytest.mark.slow
@needs_kernels
def test_the_avx2_build_computes_what_the_native_build_does(tmp_path):
    # This machine runs one build per process (each registers torch.ops.pion), so the AVX2 one runs apart.
    import os
    import subprocess
    import sys
    from conftest import ROOT
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    out = tmp_path / "avx2.pt"
    result = subprocess.run([sys.executable, "-c", AVX2_BUILD.format(root=ROOT, out=str(out))], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    int8, int4 = torch.load(out)
    torch.manual_seed(0)
    x = torch.randn(3, 160)
    w8, s8 = quantize_rows_int8(torch.randn(37, 160))
    q4, d4 = quantize_blocks_int4(torch.randn(37, 160))
    torch.testing.assert_close(int8, torch.ops.pion.int8_linear(x, w8, s8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(int4, torch.ops.pion.int4_linear(x, quantize_module.q4_0_nibbles(q4), d4.half()),
                               rtol=1e-5, atol=1e-5)


def test_a_kernel_build_that_fails_warns_once_and_leaves_atens_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    if platform_has_no_kernels():
        pytest.skip("not an x86 CPU with AVX2: no build is tried")
    with pytest.warns(UserWarning, match="could not build broken.cpp.*ATen"):
        assert cpu_kernels(source=str(broken)) is False


def platform_has_no_kernels():
    import platform
    return platform.machine().lower() not in ("x86_64", "amd64") \
        or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")


def test_without_the_kernels_the_layers_multiply_through_atens(monkeypatch):
    monkeypatch.setattr(quantize_module, "cpu_kernels", lambda: False)
    w = torch.randn(48, 64)
    x = torch.randn(1, 64)
    for layer in (Int8Linear(w), Int4Linear(w)):
        assert not layer.use_kernels
        expected = x @ layer.weight.T
        assert (layer(x) - expected).norm() <= 0.01 * expected.norm()
    assert hasattr(Int4Linear(w), "packed")  # ATen's own int4 packing


def test_without_the_kernels_projections_stay_unfused(monkeypatch):
    monkeypatch.setattr(quantize_module, "cpu_kernels", lambda: False)
    int8 = quantize(tiny_pion(), "int8")
    assert all(owner.fused_layer is None for owner, _ in int8.projection_groups())
    assert not int8.fuse_projections()


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_fused_layer_gives_its_layers_outputs_side_by_side_from_their_own_buffers(method):
    m = quantize(tiny_pion(), method)
    assert m.fuse_projections()
    x = torch.randn(1, 1, m.config.d_model)
    for owner, layers in m.projection_groups():
        assert torch.equal(owner.fused_layer(x), torch.cat([layer(x) for layer in layers], -1))
        for name, buffer in owner.fused_layer.named_buffers():  # the layers view the fused layer's rows
            assert all(getattr(layer, name).untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                       for layer in layers)
