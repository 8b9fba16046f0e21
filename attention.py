"""Causal GQA attention kernels: SDPA without soft-capping; with it, FlexAttention on CUDA or a tiled
recomputing kernel (FlashAttention's memory without its kernels), and the masks of cached decoding.

Two cases only. Without a cache, T queries attend themselves causally (training, evaluation). With a
cache, the keys are the whole preallocated cache (positions 0..S-1) and each query's position comes from
a tensor, so every step of a generation has the same shapes and a compiled step is compiled once.
"""
import functools

import torch
import torch.nn.functional as F


def cache_mask(q_pos, S):
    """Boolean (B|1, 1, T, S) mask for queries at positions q_pos ((T,) or (B, T)) over S cache slots:
    a query at position p sees slots 0..p. Slots after p hold nothing yet, or stale keys of a longer row."""
    allowed = torch.arange(S, device=q_pos.device) <= q_pos[..., None]
    return allowed.view(-1, 1, *allowed.shape[-2:])


def causal_mask(T, S, q_offset, device):
    """Boolean (1, 1, T, S) mask of causal self-attention for queries q_offset..q_offset+T-1 (an int: a
    block of the tiled kernel) over keys 0..S-1."""
    return (torch.arange(S, device=device) <= torch.arange(q_offset, q_offset + T, device=device)[:, None])[None, None]


def _fp32_at_least(x):
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def fold_groups(x, n_kv_heads):
    """(B, H, T, D) -> (B, Hkv, G*T, D): each kv head's query group becomes rows of one matrix, so a
    product with K or V (B, Hkv, S, D) serves the whole group and K/V are never repeated per head."""
    B, H, T, D = x.shape
    return x.reshape(B, n_kv_heads, H // n_kv_heads * T, D)


def softcapped_scores(q, k, cap, mask):
    """Scores cap * tanh(q.k * scale / cap) of queries q (B, H, T, D) against keys k (B, Hkv, S, D), in fp32
    or wider, -inf where the (B|1, 1, T, S) mask is False (None: nothing masked). Returns them as
    (B, Hkv, G*T, S) (fold_groups' rows) and the tanh, which backward needs."""
    raw = _fp32_at_least(fold_groups(q, k.shape[1]) @ k.transpose(-1, -2))
    tanh = torch.tanh(raw * (q.shape[-1] ** -0.5 / cap))
    scores = cap * tanh
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(1, 1, q.shape[1] // k.shape[1], 1), float("-inf"))
    return scores, tanh


def softcapped_attention_block(q, k, v, cap, mask):
    """Soft-capped attention of one block of queries (see softcapped_scores): the output (B, H, T, D) and
    each row's logsumexp (B, Hkv, G*T, 1). Alone, it is the inference path for small score matrices."""
    scores, _ = softcapped_scores(q, k, cap, mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return (torch.exp(scores - lse).to(v.dtype) @ v).view(q.shape), lse


class SoftCappedAttention(torch.autograd.Function):
    """Soft-capped causal self-attention, one block of queries at a time.

    Forward keeps only the output and the per-row logsumexp; backward recomputes each block's scores
    (as FlashAttention does), so memory is O(seq * block) instead of O(seq^2) per layer."""

    @staticmethod
    def forward(ctx, q, k, v, cap, block_size):
        out = torch.empty_like(q)
        lse = torch.empty(*q.shape[:3], 1, device=q.device, dtype=_fp32_at_least(q[:0]).dtype)
        for t0 in range(0, q.shape[2], block_size):
            t1 = min(q.shape[2], t0 + block_size)  # keys after t1 are masked for every row of this block
            out[:, :, t0:t1], lse_block = softcapped_attention_block(
                q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1], cap, causal_mask(t1 - t0, t1, t0, q.device))
            lse[:, :, t0:t1] = lse_block.view(*q.shape[:2], t1 - t0, 1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cap, block_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        cap, block_size = ctx.args
        B, H, T, D = q.shape
        n_kv = k.shape[1]
        q32, k32, v32, do = (_fp32_at_least(t) for t in (q, k, v, grad_out))
        delta = (do * _fp32_at_least(out)).sum(-1, keepdim=True)  # rowsum(dO * O), the softmax backward term
        dq, dk, dv = torch.zeros_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
        for t0 in range(0, T, block_size):
            t1 = min(T, t0 + block_size)
            qb, kb, vb = q32[:, :, t0:t1], k32[:, :, :t1], v32[:, :, :t1]
            scores, tanh = softcapped_scores(qb, kb, cap, causal_mask(t1 - t0, t1, t0, q.device))
            p = torch.exp(scores - fold_groups(lse[:, :, t0:t1], n_kv))
            dob = fold_groups(do[:, :, t0:t1], n_kv)
            dv[:, :, :t1] += p.transpose(-1, -2) @ dob
            d_raw = (1 - tanh * tanh) * D ** -0.5  # d(cap * tanh(x * scale / cap)) / dx
            ds = p * (dob @ vb.transpose(-1, -2) - fold_groups(delta[:, :, t0:t1], n_kv)) * d_raw
            dq[:, :, t0:t1] = (ds @ kb).view(B, H, t1 - t0, D)
            dk[:, :, :t1] += ds.transpose(-1, -2) @ fold_groups(qb, n_kv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, T, T, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_softcap_attention(q, k, v, cap, compiled=True):
    """Causal soft-capped attention as one fused FlexAttention kernel (score_mod), for training on CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    flex = _compiled_flex_attention() if compiled else flex_attention
    return flex(q, k, v, score_mod=softcap, block_mask=_causal_block_mask(q.shape[2], str(q.device)), enable_gqa=True)


def attention(q, k, v, soft_cap=None, q_pos=None, block_size=256):
    """GQA attention of q (B, H, T, D) over k, v (B, Hkv, S, D). q_pos None: causal self-attention (S == T).
    q_pos, a (T,) or (B, T) tensor: k, v are a whole cache and each query sees the slots up to its position.
    soft_cap None means plain softmax attention."""
    T, S = q.shape[2], k.shape[2]
    if q_pos is not None:
        mask = cache_mask(q_pos, S)
        if soft_cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return softcapped_attention_block(q, k, v, soft_cap, mask)[0]
    if soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.is_cuda and torch.is_grad_enabled():
        return flex_softcap_attention(q, k, v, soft_cap)
    if not torch.is_grad_enabled() and T * S <= 2**16:  # small: one block, no autograd bookkeeping
        return softcapped_attention_block(q, k, v, soft_cap, causal_mask(T, S, 0, q.device))[0]
    return SoftCappedAttention.apply(q, k, v, float(soft_cap), block_size)
