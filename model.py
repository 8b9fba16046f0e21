"""Pion: a dense decoder-only transformer language model.

GQA, QK-norm, attention logit soft-capping, SwiGLU, RoPE, tied embeddings, chunked cross-entropy and a
preallocated KV cache, plus the checkpoint and tokenizer I/O that every script shares.
`python model.py` prints the size table.
"""
import dataclasses
import functools
import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))


class PionError(Exception):
    """A problem with what the user gave us (a file, a flag, data): reported as one line, exit code 2."""


def run_cli(main):
    """Run a script's main(); a PionError becomes one line on stderr and exit code 2, not a traceback."""
    try:
        main()
    except PionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


def attention_mask(T, S, q_offset, key_start, device):
    """Boolean (B|1, 1, T, S) mask: query i (absolute position q_offset + i) sees key j when
    key_start[b] <= j <= q_offset + i. key_start marks left padding; a query always sees itself, so
    a padding row never becomes an all-masked (NaN) row. q_offset may be a (1,) tensor (KVCache.update)."""
    q_pos = (torch.arange(T, device=device) + q_offset)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = k_pos <= q_pos
    if key_start is not None:
        allowed = (allowed & (k_pos >= key_start.view(-1, 1, 1))) | (k_pos == q_pos)
    return allowed.view(-1, 1, T, S)


def needs_mask(T, S, q_offset, key_start):
    """Whether causal attention needs an explicit mask: not for one unpadded query that comes right after
    every key (the usual decoding step), which sees them all. q_offset as a tensor means the keys are the
    whole preallocated cache, whose unwritten slots must be masked."""
    return not (T == 1 and key_start is None and isinstance(q_offset, int) and q_offset + 1 == S)


def _fp32_at_least(x):
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def fold_groups(x, n_kv_heads):
    """(B, H, T, D) -> (B, Hkv, G*T, D): each kv head's query group becomes rows of one matrix, so a
    product with K or V (B, Hkv, S, D) serves the whole group and K/V are never repeated per head."""
    B, H, T, D = x.shape
    return x.reshape(B, n_kv_heads, H // n_kv_heads * T, D)


def softcapped_scores(q, k, cap, q_offset, key_start):
    """Masked scores cap * tanh(q.k * scale / cap) of queries q (B, H, T, D) at positions q_offset.. against
    keys k (B, Hkv, S, D) at positions 0..S-1 with S = q_offset + T, in fp32 or wider. Returns them as
    (B, Hkv, G*T, S) (fold_groups' rows) and the tanh, which backward needs."""
    T, S = q.shape[2], k.shape[2]
    raw = _fp32_at_least(fold_groups(q, k.shape[1]) @ k.transpose(-1, -2))
    tanh = torch.tanh(raw * (q.shape[-1] ** -0.5 / cap))
    scores = cap * tanh
    if needs_mask(T, S, q_offset, key_start):
        mask = attention_mask(T, S, q_offset, key_start, q.device).repeat(1, 1, q.shape[1] // k.shape[1], 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, tanh


def softcapped_attention_block(q, k, v, cap, q_offset, key_start):
    """Soft-capped attention of one block of queries (see softcapped_scores): the output (B, H, T, D) and
    each row's logsumexp (B, Hkv, G*T, 1). Alone, it is the inference path for small score matrices."""
    scores, _ = softcapped_scores(q, k, cap, q_offset, key_start)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return (torch.exp(scores - lse).to(v.dtype) @ v).view(q.shape), lse


class SoftCappedAttention(torch.autograd.Function):
    """Soft-capped causal attention, one block of queries at a time.

    Forward keeps only the output and the per-row logsumexp; backward recomputes each block's scores
    (as FlashAttention does), so memory is O(seq * block) instead of O(seq^2) per layer."""

    @staticmethod
    def forward(ctx, q, k, v, cap, q_offset, key_start, block_size):
        out = torch.empty_like(q)
        lse = torch.empty(*q.shape[:3], 1, device=q.device, dtype=_fp32_at_least(q[:0]).dtype)
        for t0 in range(0, q.shape[2], block_size):
            t1 = min(q.shape[2], t0 + block_size)
            end = q_offset + t1  # later keys are masked for every row of this block
            out[:, :, t0:t1], lse_block = softcapped_attention_block(
                q[:, :, t0:t1], k[:, :, :end], v[:, :, :end], cap, q_offset + t0, key_start)
            lse[:, :, t0:t1] = lse_block.view(*q.shape[:2], t1 - t0, 1)
        ctx.save_for_backward(q, k, v, out, lse, key_start)
        ctx.args = (cap, q_offset, block_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_start = ctx.saved_tensors
        cap, q_offset, block_size = ctx.args
        B, H, T, D = q.shape
        n_kv = k.shape[1]
        q32, k32, v32, do = (_fp32_at_least(t) for t in (q, k, v, grad_out))
        delta = (do * _fp32_at_least(out)).sum(-1, keepdim=True)  # rowsum(dO * O), the softmax backward term
        dq, dk, dv = torch.zeros_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
        for t0 in range(0, T, block_size):
            t1 = min(T, t0 + block_size)
            end = q_offset + t1
            qb, kb, vb = q32[:, :, t0:t1], k32[:, :, :end], v32[:, :, :end]
            scores, tanh = softcapped_scores(qb, kb, cap, q_offset + t0, key_start)
            p = torch.exp(scores - fold_groups(lse[:, :, t0:t1], n_kv))
            dob = fold_groups(do[:, :, t0:t1], n_kv)
            dv[:, :, :end] += p.transpose(-1, -2) @ dob
            d_raw = (1 - tanh * tanh) * D ** -0.5  # d(cap * tanh(x * scale / cap)) / dx
            ds = p * (dob @ vb.transpose(-1, -2) - fold_groups(delta[:, :, t0:t1], n_kv)) * d_raw
            dq[:, :, t0:t1] = (ds @ kb).view(B, H, t1 - t0, D)
            dk[:, :, :end] += ds.transpose(-1, -2) @ fold_groups(qb, n_kv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


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


def attention(q, k, v, soft_cap=None, q_offset=0, key_start=None, block_size=256):
    """Causal GQA attention. q: (B, H, T, D); k, v: (B, Hkv, S, D) holding absolute positions 0..S-1;
    queries sit at positions q_offset..q_offset+T-1 (an int, or a (1,) tensor when k, v are a whole
    preallocated cache). soft_cap None means plain softmax attention."""
    T, S = q.shape[2], k.shape[2]
    whole_cache = isinstance(q_offset, torch.Tensor)
    plain_causal = not whole_cache and q_offset == 0 and key_start is None and T == S
    if soft_cap is None:
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = attention_mask(T, S, q_offset, key_start, q.device) if needs_mask(T, S, q_offset, key_start) else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if plain_causal and q.is_cuda and torch.is_grad_enabled():
        return flex_softcap_attention(q, k, v, soft_cap)
    if not torch.is_grad_enabled() and (T * S <= 2**16 or whole_cache):
        return softcapped_attention_block(q, k, v, soft_cap, q_offset, key_start)[0]  # decoding: one block
    return SoftCappedAttention.apply(q, k, v, float(soft_cap), q_offset, key_start, block_size)


class KVCache:
    """Keys and values of every layer, preallocated for (batch, max_len) and written in place.

    `pos` is the number of positions already written (shared by all rows) by forwards without input_pos.
    `key_start[b]` is the first real position of row b when prompts of different lengths are left-padded
    into one batch."""

    def __init__(self, config, batch_size, max_len, device, dtype, key_start=None):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        # A tensor per layer, not slices of one: a compiled step updates each in place, whereas a slice of
        # a shared tensor gets its whole layer copied every step (Pion-small, CPU, 2048 slots: 26 ms a
        # token instead of 10).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.pos = 0
        self.key_start = key_start

    def update(self, layer, k, v, input_pos=None):
        """Write k, v (B, Hkv, T, D) at positions pos..pos+T-1 and return the filled part of the cache and
        the position of the first query. With input_pos ((T,) tensor) write there instead and return the
        whole cache: its shape never changes, so a compiled decoding step is compiled once."""
        if input_pos is not None:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
            return self.k[layer], self.v[layer], input_pos[:1]
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise PionError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.pos

    def positions(self, input_pos):
        """Rotary positions of tokens written at input_pos, per row when rows are left-padded."""
        return input_pos if self.key_start is None else (input_pos[None] - self.key_start[:, None]).clamp(min=0)


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
        q_offset, key_start = 0, None
        if kv_cache is not None:
            k, v, q_offset = kv_cache.update(self.layer_idx, k, v, input_pos)
            key_start = kv_cache.key_start
        soft_cap = c.logit_cap if (c.use_soft_cap and c.logit_cap > 0) else None
        y = attention(q, k, v, soft_cap, q_offset, key_start)
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

    def new_kv_cache(self, batch_size, max_len=None, key_start=None, dtype=None):
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, p.device, dtype or p.dtype, key_start)

    def forward(self, input_ids, labels=None, kv_cache=None, last_only=False, input_pos=None):
        """input_ids (B, T). labels (B, T), aligned with input_ids (the shift happens here), -100 ignored:
        returns {"loss": fp32 mean CE, "logits": None}; the full logits are never built for a loss.
        Without labels returns {"logits": (B, T, V) or (B, 1, V) with last_only, "loss": None}.
        With kv_cache the tokens continue the cached sequence and are written into it, and kv_cache.pos
        advances. With input_pos too ((T,) long tensor) they are written at those positions and attend the
        whole cache under a mask, and kv_cache.pos is left alone: the shapes and the Python state then
        stay the same from step to step, which a compiled decoding step needs (generate.py --compile)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        if kv_cache is not None:
            positions = kv_cache.positions(positions + kv_cache.pos if input_pos is None else input_pos)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = activation_checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, input_pos)
        if kv_cache is not None and input_pos is None:
            kv_cache.pos += T
        x = self.norm(x)
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            trained = targets != -100
            # Only positions with a target reach the vocab projection: in SFT most are masked prompt tokens.
            hidden = x[:, :-1].reshape(-1, x.shape[-1])[trained]
            loss = chunked_cross_entropy(hidden, self.lm_head.weight, targets[trained])
            return {"logits": None, "loss": loss}
        if last_only:
            x = x[:, -1:]
        return {"logits": self.lm_head(x).float(), "loss": None}


# ----------------------------------------------------------------------------------------------------
# Checkpoint I/O


def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (with "model" and "config") atomically: a crash mid-save leaves the previous
    file, never a truncated one. The config is stored as a plain dict; non-finite weights are refused."""
    checkpoint = dict(checkpoint)
    if dataclasses.is_dataclass(checkpoint.get("config")):
        checkpoint["config"] = dataclasses.asdict(checkpoint["config"])
    bad = [k for k, t in checkpoint["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PionError(f"refusing to save {path}: non-finite weights in {bad[0]}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP/FSDP wrappers (`module.`) add."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def infer_config(state_dict):
    """Rebuild a PionConfig from tensor shapes alone, for checkpoints saved without a config."""
    try:
        vocab_size, d_model = state_dict["embed.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
        head_dim = state_dict["layers.0.attn.q_norm.weight"].shape[0]
        tied = "lm_head.weight" not in state_dict or torch.equal(state_dict["lm_head.weight"], state_dict["embed.weight"])
        return PionConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
            n_heads=state_dict["layers.0.attn.q_proj.weight"].shape[0] // head_dim,
            n_kv_heads=state_dict["layers.0.attn.k_proj.weight"].shape[0] // head_dim,
            d_ff=state_dict["layers.0.ffn.w1.weight"].shape[0], tie_embeddings=tied)
    except (KeyError, ValueError, IndexError) as e:
        raise PionError(f"cannot infer the model shape from the checkpoint's tensors (missing {e})")


def resolve_checkpoint(path):
    """A local path, or `hf:OWNER/REPO/FILE` (e.g. hf:SuperGoatScriptGuy/Pion/pion_small_final.pt), which is
    downloaded once into the Hugging Face cache (with a progress bar) and returned as a local path."""
    path = str(path)
    if not path.startswith("hf:"):
        return path
    parts = path[3:].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise PionError(f"bad hub reference {path!r}: expected hf:OWNER/REPO/FILE")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2])
    except Exception as e:
        raise PionError(f"cannot get {path} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the name, your network, "
                        f"or download the file and pass its local path")


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, plus the legacy pickled PionConfig."""
    path = resolve_checkpoint(path)
    if not os.path.isfile(path):
        raise PionError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([PionConfig]):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise PionError(f"refusing to load {path}: it pickles objects other than tensors and a PionConfig")
        raise PionError(f"{path} is not a readable checkpoint (truncated or not a torch file): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model", checkpoint), dict):
        raise PionError(f"{path} is not a Pion checkpoint (expected a dict with a 'model' state dict)")
    return checkpoint


def load_checkpoint(path, map_location="cpu", **config_overrides):
    """Load any Pion checkpoint (ours, the published ones, compiled/DDP, bf16 or fp32, with or without a
    config) and return (model, checkpoint). The model is fp32 on map_location."""
    checkpoint = read_checkpoint(path, map_location)
    state = checkpoint.get("model", checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PionError(f"{path} is not a Pion checkpoint (its 'model' entry is not a state dict)")
    state = clean_state_dict(state)
    config = checkpoint.get("config")
    if isinstance(config, PionConfig):
        config = dataclasses.asdict(PionConfig.from_dict(vars(config)))  # legacy pickles may lack new fields
    config = PionConfig.from_dict({**config, **config_overrides}) if isinstance(config, dict) else         dataclasses.replace(infer_config(state), **config_overrides)
    with torch.device("meta"):
        model = Pion(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k] is not None and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise PionError(f"{path} does not match its config ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(wrong)} mis-shaped tensors; {detail})")
    model = model.to_empty(device=map_location)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    checkpoint["config"] = config
    return model, checkpoint


# ----------------------------------------------------------------------------------------------------
# Tokenizer

TOKENIZER_PATH = os.path.join(ROOT, "pile_tokenizer.json")
TOKENIZER_URL = ("https://raw.githubusercontent.com/Supergoatscriptguy/Pion/"
                 "d84c8d501ae7aed36d11b477808ce6b8faf03b92/pile_tokenizer.json")
TOKENIZER_SHA256 = "1e1d10c83bbac16a87b5796eeec281b4a0cd245e03f842f9dd76af629c7f88d8"
EOS_ID, PAD_ID, UNK_ID = 0, 1, 2  # <|endoftext|>, <|pad|>, <|unk|>


def download_tokenizer(path=TOKENIZER_PATH, url=TOKENIZER_URL):
    """Fetch the pinned tokenizer once, check its sha256, and save it atomically."""
    print(f"downloading the Pion tokenizer to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise PionError(f"cannot download the tokenizer ({getattr(e, 'reason', e)}); fetch {url} by hand "
                        f"and save it as {path}, or pass --tokenizer PATH")
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise PionError(f"downloaded tokenizer has sha256 {digest}, expected {TOKENIZER_SHA256}; not saved")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_tokenizer(path=None):
    """The Pion tokenizer (tokenizers.Tokenizer): `path`, or pile_tokenizer.json at the repo root,
    downloaded on first use."""
    from tokenizers import Tokenizer
    if path is None:
        path = TOKENIZER_PATH
        if not os.path.exists(path):
            download_tokenizer(path)
    if not os.path.isfile(path):
        raise PionError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise PionError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0]})")


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
