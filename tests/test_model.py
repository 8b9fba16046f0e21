"""model.py: architecture, fused projections, KV cache, gradient checkpointing (the attention kernels are
tests/test_attention.py's, the loss tests/test_loss.py's)."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tokenizer import PAD_ID
from conftest import ROOT, saved_tensor_sizes, tiny_config, tiny_model
import model
from cli import PionError


# ---------------------------------------------------------------------------------------------------
# Config, sizes, names


def test_config_defaults_are_the_published_ones():
    c = model.PionConfig()
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.max_seq_len) == \
        (50258, 640, 16, 10, 2, 1792, 2048)
    assert (c.dropout, c.rope_theta, c.logit_cap, c.use_soft_cap, c.tie_embeddings) == (0.0, 10000.0, 30.0, True, True)


@pytest.mark.parametrize("field", ["use_soft_cap", "tie_embeddings"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_a_boolean_field_takes_only_true_or_false(field, value):
    with pytest.raises(PionError, match=f"bad model config: {field} must be true or false, got {value!r}"):
        model.PionConfig(**{field: value})


@pytest.mark.parametrize("size,expected", [
    ("nano", 28_742_016), ("micro", 59_563_008), ("small", 102_967_168),
    ("base", 164_461_312), ("large", 322_050_048), ("xl", 770_922_240)])
def test_size_table_parameter_counts_are_exact(size, expected):
    with torch.device("meta"):
        assert model.get_model(size).count_parameters() == expected


def test_unknown_size_is_a_clear_error():
    with pytest.raises(PionError, match="unknown model size"):
        model.get_model("huge")


def test_python_model_py_prints_the_size_table():
    out = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "28,742,016" in out and "770,922,240" in out and "xl" in out


def test_state_dict_names_are_the_published_ones():
    names = set(tiny_model().state_dict())
    expected = {"embed.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"layers.{i}."
        expected |= {p + "norm1.weight", p + "norm2.weight"}
        expected |= {p + f"attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        expected |= {p + f"ffn.{n}.weight" for n in ("w1", "w2", "w3")}
    assert names == expected


def test_lm_head_is_tied_to_the_embedding():
    m = tiny_model()
    assert m.lm_head.weight is m.embed.weight


def test_a_cap_of_0_is_no_soft_cap():
    assert model.PionConfig().soft_capped and not model.PionConfig(use_soft_cap=False).soft_capped
    assert not model.PionConfig(logit_cap=0.0).soft_capped  # use_soft_cap alone does not cap


def test_linears_have_no_bias_and_init_std_is_0_02():
    torch.manual_seed(0)
    m = model.Pion(tiny_config(d_model=240, n_heads=6, d_ff=480))
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert abs(m.layers[0].ffn.w1.weight.std().item() - 0.02) < 1e-3


# ---------------------------------------------------------------------------------------------------
# Forward semantics against an explicit reference


def reference_forward(m, ids):
    """The architecture written out naively: repeated K/V, full score matrix, rotate-half RoPE."""
    c = m.config
    hd = c.head_dim
    T = ids.shape[1]
    pos = torch.arange(T).float()
    inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)  # (T, hd): pairs (i, i + hd/2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    x = m.embed.weight[ids]
    for layer in m.layers:
        a = layer.attn
        h = rms(x, layer.norm1.weight)
        B = h.shape[0]
        q = rope(rms((h @ a.q_proj.weight.T).view(B, T, c.n_heads, hd), a.q_norm.weight).transpose(1, 2))
        k = rope(rms((h @ a.k_proj.weight.T).view(B, T, c.n_kv_heads, hd), a.k_norm.weight).transpose(1, 2))
        v = (h @ a.v_proj.weight.T).view(B, T, c.n_kv_heads, hd).transpose(1, 2)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if c.use_soft_cap:
            s = c.logit_cap * torch.tanh(s / c.logit_cap)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ a.o_proj.weight.T
        x = x + y
        h = rms(x, layer.norm2.weight)
        f = layer.ffn
        x = x + (F.silu(h @ f.w1.weight.T) * (h @ f.w3.weight.T)) @ f.w2.weight.T
    return rms(x, m.norm.weight) @ m.lm_head.weight.T


@pytest.mark.parametrize("soft_cap", [True, False])
def test_forward_matches_the_reference_architecture(soft_cap):
    m = tiny_model(use_soft_cap=soft_cap)
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        assert torch.allclose(m(ids)["logits"], reference_forward(m, ids), atol=1e-5)


def test_forward_returns_loss_dict_without_full_logits():
    m = tiny_model()
    ids = torch.randint(0, 101, (2, 9))
    out = m(ids, labels=ids)
    assert out["logits"] is None and out["loss"].dtype == torch.float32
    ref = F.cross_entropy(reference_forward(m, ids)[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    assert torch.allclose(out["loss"], ref, atol=1e-5)


def test_loss_counts_only_labelled_positions():
    m = tiny_model()
    ids = torch.randint(0, 101, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # a masked prompt
    loss = m(ids, labels=labels)["loss"]
    ref = F.cross_entropy(reference_forward(m, ids)[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-5)


def test_training_and_inference_paths_compute_the_same_logits():
    """Train mode with gradients runs the tiled soft-cap kernel; eval mode without them, the inference path."""
    m = tiny_model(use_soft_cap=True)
    ids = torch.randint(0, 101, (2, 12))
    train_logits = m.train()(ids)["logits"]
    assert train_logits.requires_grad
    with torch.no_grad():
        eval_logits = m.eval()(ids)["logits"]
    assert torch.allclose(train_logits.detach(), eval_logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Fused projections


def test_linear_group_with_concatenated_weights_equals_the_separate_layers():
    torch.manual_seed(0)
    layers = [model.Linear(16, 24), model.Linear(16, 8), model.Linear(16, 8)]
    x = torch.randn(2, 5, 16)
    fused = model.linear_group(x, layers, torch.cat([m.weight for m in layers]))
    for y, m in zip(fused, layers):
        assert torch.allclose(y, m(x), atol=1e-6)


def test_training_through_fused_projections_gives_the_unfused_loss_and_gradients(monkeypatch):
    """On CUDA a block of rows goes through one q/k/v and one gate/up product: the same loss, and each
    separate parameter gets its own gradient."""
    ids = torch.randint(0, 101, (2, 160))  # 320 rows: over FUSED_PROJECTION_MIN_ROWS
    results = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(model, "FUSED_PROJECTION_DEVICES", devices)
        m = tiny_model(max_seq_len=160)
        loss = m(ids, labels=ids)["loss"]
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters()}))
    (fused_loss, fused_grads), (loss, grads) = results[1], results[0]
    assert torch.allclose(fused_loss, loss, rtol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_fused_projection_weights_are_made_only_where_they_pay_and_never_saved():
    m = tiny_model()
    assert m.fuse_projections() is False  # the CPU keeps its own few-row products
    assert all(layer.attn.fused_weight is None for layer in m.layers)
    assert not any("fused" in name for name in m.state_dict())


def test_fused_projection_weights_are_refreshed_in_place_from_the_current_weights(monkeypatch):
    """A captured CUDA graph keeps reading the fused weights' address: a refresh after training must
    write the new values there."""
    monkeypatch.setattr(model, "FUSED_PROJECTION_DEVICES", ("cpu",))
    m = tiny_model()
    assert m.fuse_projections() is True
    attn = m.layers[0].attn
    address = attn.fused_weight.data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)
    m.fuse_projections()
    assert attn.fused_weight.data_ptr() == address
    assert torch.equal(attn.fused_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_decoding_with_fused_projections_gives_the_unfused_logits(monkeypatch):
    m = tiny_model().eval()
    prompt = torch.randint(0, 101, (1, 7))
    logits = []
    for fused in (False, True):
        monkeypatch.setattr(model, "FUSED_PROJECTION_DEVICES", ("cpu",) if fused else ())
        cache = m.new_kv_cache(1, 16)
        cache.fused_projections = m.fuse_projections()
        assert cache.fused_projections is fused
        with torch.no_grad():
            m(prompt, kv_cache=cache, input_pos=torch.arange(7))
            logits.append(m(prompt[:, -1:], kv_cache=cache, input_pos=torch.tensor([7]))["logits"])
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_fused_projection_weights_go_unused_on_a_cache_that_did_not_ask_for_them(monkeypatch):
    """Stale copies (weights trained since the last refresh) are never read: only a cache whose owner just
    refreshed them uses them."""
    monkeypatch.setattr(model, "FUSED_PROJECTION_DEVICES", ("cpu",))
    m = tiny_model().eval()
    m.fuse_projections()
    for layer in m.layers:
        layer.attn.fused_weight.fill_(float("nan"))
        layer.ffn.fused_weight.fill_(float("nan"))
    with torch.no_grad():
        logits = m(torch.randint(0, 101, (1, 5)), kv_cache=m.new_kv_cache(1, 8), input_pos=torch.arange(5))["logits"]
    assert torch.isfinite(logits).all()


def test_the_cache_path_never_runs_a_block_compiled_for_training():
    """train.py --compile compiles each block for training shapes; its eval sample decodes through the cache
    path, which must not recompile those blocks for every decode shape."""
    m = tiny_model().eval()
    for layer in m.layers:
        def refuse(*args, **kwargs):
            raise AssertionError("the compiled block was called on the cache path")
        layer._compiled_call_impl = refuse
    with torch.no_grad():
        m(torch.randint(0, 101, (1, 5)), kv_cache=m.new_kv_cache(1, 8), input_pos=torch.arange(5))
        with pytest.raises(AssertionError, match="compiled block"):
            m(torch.randint(0, 101, (1, 5)))


# ---------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("soft_cap", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (10, 2)])  # GQA 3:1 and 5:1
def test_full_forward_prefill_and_decoding_agree(soft_cap, heads, kv_heads):
    m = tiny_model(n_heads=heads, n_kv_heads=kv_heads, use_soft_cap=soft_cap).eval()
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full = m(ids)["logits"]
        cache = m.new_kv_cache(2, 32)
        prefill = m(ids, kv_cache=cache, input_pos=torch.arange(24))["logits"]
        cache = m.new_kv_cache(2, 32)
        steps = [m(ids[:, :10], kv_cache=cache, input_pos=torch.arange(10))["logits"]]
        steps += [m(ids[:, i:i + 1], kv_cache=cache, input_pos=torch.tensor([i]))["logits"] for i in range(10, 24)]
    assert torch.allclose(full, prefill, atol=1e-4)
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-4)


def test_kv_cache_is_preallocated_and_written_in_place():
    m = tiny_model().eval()
    cache = m.new_kv_cache(1, 16)
    storage = [k.data_ptr() for k in cache.k]
    with torch.no_grad():
        m(torch.randint(0, 101, (1, 5)), kv_cache=cache, input_pos=torch.arange(5))
        for i in range(5, 8):
            m(torch.randint(0, 101, (1, 1)), kv_cache=cache, input_pos=torch.tensor([i]))
    assert [k.data_ptr() for k in cache.k] == storage and cache.k[0].shape[2] == 16
    assert cache.k[0][0, :, :8].abs().sum(-1).all() and not cache.k[0][0, :, 8:].any()  # written: slots 0..7


@pytest.mark.parametrize("soft_cap", [True, False])
def test_rows_at_different_positions_decode_like_each_row_alone(soft_cap):
    """Per-row input_pos: a short and a long prompt share one cache, each row at its own position."""
    m = tiny_model(use_soft_cap=soft_cap).eval()
    short, long = torch.randint(3, 101, (1, 4)), torch.randint(3, 101, (1, 7))
    batch = torch.cat([torch.cat([short, torch.full((1, 3), PAD_ID)], 1), long])  # right-padded
    with torch.no_grad():
        cache = m.new_kv_cache(2, 16)
        m(batch, kv_cache=cache, input_pos=torch.arange(7))
        step = m(torch.tensor([[5], [6]]), kv_cache=cache, input_pos=torch.tensor([[4], [7]]))["logits"]
        short_alone = m(torch.cat([short, torch.tensor([[5]])], 1))["logits"]
        long_alone = m(torch.cat([long, torch.tensor([[6]])], 1))["logits"]
    assert torch.allclose(step[0, 0], short_alone[0, -1], atol=1e-4)
    assert torch.allclose(step[1, 0], long_alone[0, -1], atol=1e-4)


def test_a_cache_without_positions_is_refused():
    m = tiny_model().eval()
    with pytest.raises(ValueError, match="go together"):
        m(torch.randint(0, 101, (1, 5)), kv_cache=m.new_kv_cache(1, 8))


# ---------------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 101, (2, 16))
    grads = []
    for checkpointing in (False, True):
        m = tiny_model()
        m.gradient_checkpointing = checkpointing
        m(ids, labels=ids)["loss"].backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_saves_only_block_inputs():
    m = tiny_model(max_seq_len=128)
    ids = torch.randint(0, 101, (1, 128))
    plain = sum(saved_tensor_sizes(lambda: m(ids, labels=ids)))
    m.gradient_checkpointing = True
    assert sum(saved_tensor_sizes(lambda: m(ids, labels=ids))) < plain / 2
