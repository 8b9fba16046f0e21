"""Pion: a dense decoder-only transformer language model.

GQA, QK-norm, attention logit soft-capping, SwiGLU, RoPE, tied embeddings and a preallocated KV cache. The
attention kernels are in attention.py, the chunked cross-entropy in loss.py, checkpoint I/O in checkpoint.py,
decoding in decoding.py.
`python model.py` prints the size table.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from attention import attention
from cli import PionError, run_cli
from loss import chunked_cross_entropy, trained_targets


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

    def __post_init__(self):
        """A config from a flag or a checkpoint is checked here, once: a bad one is one line, not a crash."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise PionError(f"bad model config: {name} must be a positive integer, got {value!r}")
        for name, low in (("dropout", 0), ("rope_theta", 0), ("logit_cap", 0)):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value >= low or value == float("inf"):
                raise PionError(f"bad model config: {name} must be a finite number >= {low}, got {value!r}")
        for name in ("use_soft_cap", "tie_embeddings"):
            if type(getattr(self, name)) is not bool:  # "no" or 0 would pass as what Python makes of them
                raise PionError(f"bad model config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.dropout >= 1 or self.rope_theta == 0:
            raise PionError(f"bad model config: need dropout < 1 and rope_theta > 0, got {self.dropout}, "
                            f"{self.rope_theta}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise PionError(f"bad model config: d_model {self.d_model} must split into {self.n_heads} heads of "
                            f"even size, and n_heads into {self.n_kv_heads} kv heads")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def soft_capped(self):
        """Whether attention soft-caps its logits: use_soft_cap with a cap above 0 (a cap of 0 caps nothing)."""
        return self.use_soft_cap and self.logit_cap > 0

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


# Devices whose products are fused (linear_group): on a GPU a launch costs more than a small product. The CPU
# keeps Linear's own few-row paths.
FUSED_PROJECTION_DEVICES = ("cuda",)
# Below this many rows a weight concatenated per call costs more to build than a shared launch saves.
FUSED_PROJECTION_MIN_ROWS = 256


def linear_group(x, layers, fused=None):
    """x through several bias-free Linear layers that all read it, as one product where that pays: with
    fused, their weights already concatenated (decoding, see Pion.fuse_projections) or one quantized layer
    for all of them (quantize.py); on CUDA for a block of rows (training, prefill), with the weights
    concatenated here: one launch and larger tiles instead of several, and under torch.compile the
    concatenation fuses with autocast's cast of the weights, which happens anyway. The parameters stay
    separate, so checkpoints and exports keep their tensor names."""
    if fused is None and x.device.type in FUSED_PROJECTION_DEVICES \
            and x.numel() // x.shape[-1] >= FUSED_PROJECTION_MIN_ROWS \
            and all(type(m) is Linear for m in layers):
        fused = torch.cat([m.weight for m in layers])
    if fused is None:
        return [m(x) for m in layers]
    product = fused(x) if isinstance(fused, nn.Module) else F.linear(x, fused)
    return product.split([m.out_features for m in layers], dim=-1)


def fused_projection(module, kv_cache):
    """module's fused projection (its fused_layer, else its concatenated fused_weight) when this forward may
    use it: on the cache path of a generation that made them (KVCache.fused_projections), never in training."""
    if kv_cache is None or not kv_cache.fused_projections:
        return None
    return module.fused_layer if module.fused_layer is not None else module.fused_weight


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)  # gate
        self.w2 = Linear(d_ff, d_model)  # down
        self.w3 = Linear(d_model, d_ff)  # up
        self.register_buffer("fused_weight", None, persistent=False)  # [w1; w3] for decoding (fuse_projections)
        self.fused_layer = None  # or quantize.py's one quantized layer for w1 and w3

    def forward(self, x, kv_cache=None):
        gate, up = linear_group(x, (self.w1, self.w3), fused_projection(self, kv_cache))
        return self.w2(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------
# Attention layer and KV cache (the attention kernels are in attention.py)


class KVCache:
    """Keys and values of every layer, preallocated for (batch, max_len) and written in place at the
    positions each forward names. It keeps no position of its own: rows may be at different positions
    (a batch of prompts of different lengths, or requests that joined at different times)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        # A tensor per layer, not slices of one: a compiled step updates each in place, whereas a slice of
        # a shared tensor gets its whole layer copied every step (on the CPU that copy costs more than the
        # step itself).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        if torch.device(device).type == "cuda":
            # The compiled step writes the cache in place. CUDA graphs (reduce-overhead) replay fixed addresses
            # and skip graphs that mutate inputs they would copy; a static address lets them capture it (gpt-fast).
            for tensor in self.k + self.v:
                torch._dynamo.mark_static_address(tensor)
        self.batch_size, self.max_len = batch_size, max_len
        self.fused_projections = False  # set by whoever refreshed the model's fused weights for this cache

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
        self.register_buffer("fused_weight", None, persistent=False)  # [q; k; v] for decoding (fuse_projections)
        self.fused_layer = None  # or quantize.py's one quantized layer for q, k and v

    def forward(self, x, cos, sin, kv_cache=None, input_pos=None):
        B, T, _ = x.shape
        c, hd = self.config, self.config.head_dim
        q, k, v = linear_group(x, (self.q_proj, self.k_proj, self.v_proj), fused_projection(self, kv_cache))
        q, k, v = q.view(B, T, c.n_heads, hd), k.view(B, T, c.n_kv_heads, hd), v.view(B, T, c.n_kv_heads, hd)
        # QK-norm before RoPE: it bounds the logits; rotating first would normalize rotated vectors.
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, input_pos)
        soft_cap = c.logit_cap if c.soft_capped else None
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
        return x + F.dropout(self.ffn(self.norm2(x), kv_cache), self.dropout, self.training)


# ----------------------------------------------------------------------------------------------------
# The model


class Pion(nn.Module):
    def __init__(self, config: PionConfig):
        super().__init__()
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

    def projection_groups(self):
        """(owner, layers) for each group of projections that read the same input: q/k/v, and gate/up."""
        return [(layer.attn, (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj)) for layer in self.layers] \
            + [(layer.ffn, (layer.ffn.w1, layer.ffn.w3)) for layer in self.layers]

    @torch.no_grad()
    def fuse_projections(self):
        """Make or refresh, from the current weights, each block's concatenated q/k/v and gate/up weights, so a
        decode step runs 4 products per block instead of 7 (a one-row product costs its launch more than
        its bytes). They are copies (non-persistent buffers: not in checkpoints), used only on the cache path
        of a KVCache whose fused_projections is set, by the caller that refreshed them. Returns whether fused
        projections exist: on FUSED_PROJECTION_DEVICES with plain weights (not sharded), where they pay, and
        where quantize.py fused the quantized layers (their weights never change)."""
        groups = self.projection_groups()
        if all(owner.fused_layer is not None for owner, _ in groups):
            return True
        if not all(type(m) is Linear and type(m.weight) is nn.Parameter and m.weight.device.type in FUSED_PROJECTION_DEVICES
                   for _, layers in groups for m in layers):
            return False
        for owner, layers in groups:
            weights = [m.weight for m in layers]
            fused = owner.fused_weight
            if fused is not None and fused.shape[0] == sum(w.shape[0] for w in weights) \
                    and (fused.dtype, fused.device) == (weights[0].dtype, weights[0].device):
                torch.cat(weights, out=fused)  # in place: a captured CUDA graph keeps reading its address
            else:
                owner.fused_weight = torch.cat(weights)
        return True

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
            if kv_cache is not None:
                # A block compiled for training (Module.compile, train.py --compile) would recompile for every
                # cached shape; the cache path calls it uncompiled (hooks included: FSDP's gather). A compiled
                # decode step (decoding.py) compiles this path as a whole instead.
                x = layer._call_impl(x, cos, sin, kv_cache, input_pos)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = activation_checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)

    def logits(self, hidden):
        """fp32 next-token logits of hidden states: computing them only where needed saves (positions x vocab)."""
        return self.lm_head(hidden).float()

    def forward(self, input_ids, labels=None, kv_cache=None, input_pos=None):
        """input_ids (B, T). labels (B, T), aligned with input_ids (the shift happens here), IGNORE_INDEX
        ignored:
        returns {"loss": fp32 mean CE, "logits": None}; the full logits are never built for a loss.
        Without labels returns {"logits": (B, T, V), "loss": None}. kv_cache and input_pos: see
        hidden_states."""
        x = self.hidden_states(input_ids, kv_cache, input_pos)
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            trained = trained_targets(labels).reshape(-1)
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
