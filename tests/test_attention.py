"""attention.py: the soft-capped attention kernel (tiled, with its own backward) against naive attention and
FlexAttention, the cache path at per-row positions, and GQA without repeated K/V."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention
from conftest import saved_tensor_sizes, tiny_model


def naive_softcap_attention(q, k, v, cap):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[2]
    s = cap * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) / cap)
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v


def test_softcap_attention_gradients_match_naive_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 40, 8, dtype=torch.double, requires_grad=True)
    k = torch.randn(2, 2, 40, 8, dtype=torch.double, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 6, 40, 8, dtype=torch.double)
    ours = torch.autograd.grad((attention.SoftCappedAttention.apply(q, k, v, 2.0, 16) * g).sum(), (q, k, v))
    ref = torch.autograd.grad((naive_softcap_attention(q, k, v, 2.0) * g).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_softcap_attention_passes_gradcheck_over_several_blocks():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 4, dtype=torch.double, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=torch.double, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention.SoftCappedAttention.apply(q, k, v, 2.0, 4), (q, k, v))


def test_inference_shortcut_matches_the_tiled_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    tiled = attention.SoftCappedAttention.apply(q, k, v, 2.0, 3)
    with torch.no_grad():
        assert torch.allclose(attention.attention(q, k, v, 2.0), tiled, atol=1e-6)


@pytest.mark.parametrize("soft_cap", [2.0, None])
def test_cache_attention_at_per_row_positions_matches_causal_attention(soft_cap):
    """Rows at different positions of one cache attend exactly what causal attention gives each of them."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    with torch.no_grad():
        causal = attention.attention(q, k, v, soft_cap)
        stale = torch.randn(2, 2, 4, 8)  # slots after a row's position: never seen
        cache_k, cache_v = torch.cat([k, stale], 2), torch.cat([v, stale], 2)
        positions = torch.tensor([[3], [9]])
        rows = attention.attention(q[torch.arange(2), :, positions[:, 0]][:, :, None], cache_k, cache_v, soft_cap, positions)
    assert torch.allclose(rows[0, :, 0], causal[0, :, 3], atol=1e-6)
    assert torch.allclose(rows[1, :, 0], causal[1, :, 9], atol=1e-6)


def test_flex_attention_score_mod_matches_the_tiled_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    with pytest.warns(UserWarning):  # eager FlexAttention on CPU (on CUDA it is compiled)
        flex = attention.flex_softcap_attention(q, k, v, 2.0, compiled=False)
    assert torch.allclose(flex, attention.SoftCappedAttention.apply(q, k, v, 2.0, 8), atol=1e-5)


def test_softcap_training_keeps_no_quadratic_attention_scores_for_backward():
    m = tiny_model(use_soft_cap=True, max_seq_len=256)
    ids = torch.randint(0, 101, (1, 256))
    sizes = saved_tensor_sizes(lambda: m(ids, labels=ids))
    assert max(sizes) < 256 * 256  # one head's score matrix would already be 65,536 numbers


def test_gqa_attention_runs_without_repeating_kv():
    """K and V for 6 query heads over 2 kv heads are passed to SDPA as 2 heads (enable_gqa)."""
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert torch.allclose(attention.attention(q, k, v), ref, atol=1e-6)
