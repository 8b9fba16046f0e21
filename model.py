"""Pion: a dense decoder-only transformer language model.

GQA, QK-norm, attention logit soft-capping, SwiGLU, RoPE, tied embeddings, chunked cross-entropy and a
preallocated KV cache. Checkpoint I/O is in checkpoint.py, decoding in decoding.py.
`python model.py` prints the size table.
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from cli import PionError, run_cli


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class PionConfig:
    # Field names and defaults are fixed: published checkpoints pickle this class (as model.PionConfig).
    vocab_size: int = 50258
    d_model: int = 640
    n_layers: int = 16
    n_heads: int = 10
    n_kv_heads: int = 2
    d_ff: int = 1792
    max_seq_len: int = 2048
    dropout: float = 0.0
    rope_theta: float = 10000.0
    logit_cap: float = 30.0
    use_soft_cap: bool = True
    tie_embeddings: bool = True

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


SIZES = {  # name -> overrides of the PionConfig defaults (which are "small")
    "nano": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024),
    "micro": dict(d_model=512, n_layers=12, n_heads=8, n_kv_heads=2, d_ff=1408),
    "small": dict(),
    "base": dict(d_model=768, n_layers=20, n_heads=12, n_kv_heads=4, d_ff=2048),
    "large": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, d_ff=2816),
    "xl": dict(d_model=1536, n_layers=28, n_heads=16, n_kv_heads=4, d_ff=4096),
}


def get_config(size="small", **overrides):
    if size not in SIZES:
        raise PionError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    known = {f.name for f in dataclasses.fields(PionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise PionError(f"unknown PionConfig field(s): {', '.join(unknown)}")
    return PionConfig(**{**SIZES[size], **overrides})


def get_model(size="small", **overrides):
    return Pion(get_config(size, **overrides))


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 whatever the activation dtype: bf16 squares lose too much precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_cos_sin(positions, head_dim, theta):
    """RoPE tables for integer positions of shape (T,) or (B, T), as (B|1, T, 1, head_dim) each:
    cos = [cos, cos] and a signed sin = [-sin, sin], so that apply_rope is two multiplies and an add.

    Computed per forward from the positions (cheap, shared by all layers) instead of kept as buffers, so
    they stay fp32 when the model is cast to bf16 and need no resizing for any sequence length."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    if angles.dim() == 2:
        angles = angles[None]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x of shape (B, T, H, D): dimension i is paired with i + D/2, i.e.
    x * cos + [-x2, x1] * sin_abs, where roll gives [x2, x1] and the signed table supplies the minus."""
    x32 = x.float()
    return torch.addcmul(x32 * cos, x32.roll(x.shape[-1] // 2, dims=-1), sin).type_as(x)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameter names) whose few-row products on the CPU use every core.

    Decoding multiplies one row by each weight matrix. For that shape MKL's matrix-vector kernel streams
    the weight on about one core (half the machine's memory bandwidth on 2 cores); splitting the output
    features into one slice per thread and running the slices as a batched matmul keeps every core busy."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or rows > 4:
            return F.linear(x, self.weight)
        if torch.compiler.is_compiling():
            # Inductor turns a product-and-sum into one vectorized pass over the weight rows, parallel over
            # output features and fused with the ops around it: ~1.6x the bandwidth of MKL's kernel.
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        threads = torch.get_num_threads()
        if threads == 1 or self.out_features % threads:
            return F.linear(x, self.weight)
        slices = self.weight.view(threads, self.out_features // threads, self.in_features).transpose(1, 2)
        y = torch.bmm(x.reshape(1, rows, self.in_features).expand(threads, rows, self.in_features), slices)
        return y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)  # gate
        self.w2 = Linear(d_ff, d_model)  # down
        self.w3 = Linear(d_model, d_ff)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------------------------------
# Attention: SDPA without soft-capping; with it, FlexAttention on CUDA or a tiled recomputing kernel.
#
# Two cases only. Without a cache, T queries attend themselves causally (training, evaluation). With a
# cache, the keys are the whole preallocated cache (positions 0..S-1) and each query's position comes from
# a tensor, so every step of a generation has the same shapes and a compiled step is compiled once.


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


class KVCache:
    """Keys and values of every layer, preallocated for (batch, max_len) and written in place at the
    positions each forward names. It keeps no position of its own: rows may be at different positions
    (a batch of prompts of different lengths, or requests that joined at different times)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        # A tensor per layer, not slices of one: a compiled step updates each in place, whereas a slice of
        # a shared tensor gets its whole layer copied every step (Pion-small, CPU, 2048 slots: 26 ms a
        # token instead of 10).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer, k, v, input_pos):
        """Write k, v (B, Hkv, T, D) at input_pos ((T,) shared by the rows, or (B, T) per row); return the
        layer's whole cache."""
        if input_pos.dim() == 1:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, input_pos] = k.transpose(1, 2)
            self.v[layer][rows, :, input_pos] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, hd = config.d_model, config.head_dim
        self.q_proj = Linear(d, config.n_heads * hd)
        self.k_proj = Linear(d, config.n_kv_heads * hd)
        self.v_proj = Linear(d, config.n_kv_heads * hd)
        self.o_proj = Linear(config.n_heads * hd, d)
        self.q_norm = RMSNorm(hd)
        self.k_norm = RMSNorm(hd)

    def forward(self, x, cos, sin, kv_cache=None, input_pos=None):
        B, T, _ = x.shape
        c, hd = self.config, self.config.head_dim
        q = self.q_proj(x).view(B, T, c.n_heads, hd)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, hd)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, hd)
        # QK-norm before RoPE: it bounds the logits; rotating first would normalize rotated vectors.
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, input_pos)
        soft_cap = c.logit_cap if (c.use_soft_cap and c.logit_cap > 0) else None
        y = attention(q, k, v, soft_cap, input_pos if kv_cache is not None else None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_heads * hd))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.attn = Attention(config, layer_idx)
        self.norm2 = RMSNorm(config.d_model)
        self.ffn = SwiGLU(config.d_model, config.d_ff)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, kv_cache=None, input_pos=None):
        x = x + F.dropout(self.attn(self.norm1(x), cos, sin, kv_cache, input_pos), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


# ----------------------------------------------------------------------------------------------------
# Chunked cross-entropy


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean CE of (hidden @ weight.T) against labels, never holding more than one chunk of logits.

    The gradients w.r.t. hidden and weight are computed chunk by chunk in the forward pass (the
    logits are needed there anyway) and only scaled in backward, so neither pass materializes the
    (tokens, vocab) matrix. Logits and loss are fp32 whatever the matmul dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype):
        valid = labels != -100
        n_valid = valid.sum().clamp(min=1).float()
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        # One (chunk, vocab) fp32 buffer for every chunk: a fresh one each time costs its page faults again.
        logits_buffer = torch.empty(min(chunk_size, len(labels)), weight.shape[0], device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, m = hidden[s:s + chunk_size].to(compute_dtype), labels[s:s + chunk_size], valid[s:s + chunk_size]
            logits = logits_buffer[:len(y)]
            if compute_dtype == torch.float32:
                torch.mm(h, w.T, out=logits)
            else:
                logits.copy_(h @ w.T)
            target = y.clamp(min=0)
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            row_max = logits.max(dim=-1, keepdim=True).values
            exp = logits.sub_(row_max).exp_()  # everything below is in place
            sum_exp = exp.sum(dim=-1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            loss += ((lse - target_logit) * m).sum()
            if want_grad:  # d(mean CE)/d(logits) = (softmax - onehot) * row_weight, row_weight = counted / n
                grad = exp.div_(sum_exp)
                grad[torch.arange(len(y), device=y.device), target] -= 1
                grad = grad.to(compute_dtype)
                # Apply row_weight to the small (chunk, d) side of each product, not the (chunk, vocab) one.
                row_weight = (m / n_valid).to(compute_dtype)[:, None]
                grad_hidden[s:s + chunk_size] = (grad @ w) * row_weight
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h * row_weight)  # accumulate in place, no (vocab, d) temporary
                else:
                    grad_weight += grad.T @ (h * row_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # Scale the precomputed gradients in place: a copy of grad_weight would cost another vocab x d.
        # That consumes them, so a second backward (retain_graph=True) must fail loudly, not silently.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("chunked cross-entropy supports a single backward pass")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss).to(ctx.weight_dtype),
                None, None, None)


def chunked_cross_entropy(hidden, weight, labels, chunk_size=512):
    """hidden (N, d), weight (V, d), labels (N,) with -100 ignored -> fp32 mean loss over counted tokens."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):  # the function casts explicitly
        return ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size, dtype)


# ----------------------------------------------------------------------------------------------------
# The model


class Pion(nn.Module):
    def __init__(self, config: PionConfig):
        super().__init__()
        if config.d_model % config.n_heads or config.n_heads % config.n_kv_heads or config.head_dim % 2:
            raise PionError(f"bad shape: d_model {config.d_model} must split into {config.n_heads} heads of "
                            f"even size, and n_heads into {config.n_kv_heads} kv heads")
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in backward (set by the trainers)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model)
        self.lm_head = Linear(config.d_model, config.vocab_size)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def count_parameters(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def new_kv_cache(self, batch_size, max_len=None, dtype=None):
        """An empty cache for batch_size rows of up to max_len positions (default: max_seq_len). Its dtype is
        the compute dtype (dtype, else the weights'): under FSDP's bf16 policy pass the policy's dtype."""
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, p.device, dtype or p.dtype)

    def hidden_states(self, input_ids, kv_cache=None, input_pos=None):
        """input_ids (B, T) -> the final-norm hidden states (B, T, d_model).

        Without kv_cache the tokens sit at positions 0..T-1 and attend causally. With kv_cache, input_pos
        ((T,) long tensor shared by the rows, or (B, T) per row) gives each token's position: its keys and
        values are written into the cache there, and it attends every cached position up to its own."""
        if (kv_cache is None) != (input_pos is None):
            raise ValueError("kv_cache and input_pos go together")
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device) if input_pos is None else input_pos
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = activation_checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, input_pos)
        return self.norm(x)

    def logits(self, hidden):
        """fp32 next-token logits of hidden states: computing them only where needed saves (positions x vocab)."""
        return self.lm_head(hidden).float()

    def forward(self, input_ids, labels=None, kv_cache=None, input_pos=None):
        """input_ids (B, T). labels (B, T), aligned with input_ids (the shift happens here), -100 ignored:
        returns {"loss": fp32 mean CE, "logits": None}; the full logits are never built for a loss.
        Without labels returns {"logits": (B, T, V), "loss": None}. kv_cache and input_pos: see
        hidden_states."""
        x = self.hidden_states(input_ids, kv_cache, input_pos)
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            trained = targets != -100
            # Only positions with a target reach the vocab projection: in SFT most are masked prompt tokens.
            hidden = x[:, :-1].reshape(-1, x.shape[-1])[trained]
            loss = chunked_cross_entropy(hidden, self.lm_head.weight, targets[trained])
            return {"logits": None, "loss": loss}
        return {"logits": self.logits(x), "loss": None}


# ----------------------------------------------------------------------------------------------------


def main():
    print(f"{'size':6} {'d_model':>7} {'layers':>6} {'heads':>6} {'d_ff':>5} {'params':>13}")
    for name in SIZES:
        config = get_config(name)
        with torch.device("meta"):
            n = Pion(config).count_parameters()
        print(f"{name:6} {config.d_model:>7} {config.n_layers:>6} {config.n_heads:>3}:{config.n_kv_heads:<2} "
              f"{config.d_ff:>5} {n:>13,}")


if __name__ == "__main__":
    run_cli(main)
