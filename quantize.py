"""int8 weight-only quantization for decoding: every linear layer and the output projection keep their
weights as int8 with one fp32 scale per output channel (symmetric: w ~= int8 * scale, scale = max|row| / 127).

Batch-1 decoding on a CPU is bound by the bytes of weights it streams per token, and int8 is a quarter of
fp32's. The weights are dequantized inside the product, never stored dequantized: under torch.compile the
one-row product is the same multiply-and-sum as model.Linear's, with the int8 -> float conversion and the
scale fused into that one pass over the weights. Activations, norms, the KV cache and the embedding lookup
keep the model's dtype.

    model = quantize(model, "int8")   # in place; the decoding scripts call it on checkpoint.load_model's model
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import PionError
from model import Linear

QUANTIZATIONS = ("int8",)
INT8_DEVICES = ("cpu", "cuda")  # cuda takes the plain dequantizing path; only the CPU has been measured


def quantize_rows_int8(weight):
    """(out, in) float weight -> (int8 weight, fp32 scale per row), symmetric, round to nearest."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row gets a tiny scale, not 0/0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and a per-output-channel scale: y = (x @ w_int8.T) * scale."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        int8_weight, scale = quantize_rows_int8(weight)
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scale", scale)

    @property
    def weight(self):
        """The dequantized weight in fp32 (for code that reads lm_head.weight, e.g. the training loss); decoding
        never builds it."""
        return self.int8_weight.float() * self.scale[:, None]

    def forward(self, x):
        rows = x.numel() // self.in_features
        if torch.compiler.is_compiling() and x.device.type == "cpu" and rows <= 4:
            # As model.Linear: inductor fuses this into one vectorized pass over the int8 rows, converting
            # each to x's dtype in registers; the scale multiplies the (out,) result, not the weight.
            y = (x.unsqueeze(-2) * self.int8_weight.to(x.dtype)).sum(-1)
        elif x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # Eager and prefill: ATen's CPU int8-weight kernel (as gpt-fast uses), which reads the int8
            # weight as it is instead of building a dequantized copy: ~3x faster for one row.
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.int8_weight, self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        else:
            # Elsewhere a temporary dequantized copy (exact: |int8| <= 127 fits any float dtype).
            y = F.linear(x, self.int8_weight.to(x.dtype))
        return (y * self.scale).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize(model, method):
    """Quantize a Pion's linear layers and output projection in place for decoding; returns the model.

    The tied output projection gets a quantized copy of the embedding: the lookup keeps reading its one
    row per token from the full-precision table, the projection streams int8. Inference only: the model
    is put in eval mode and its parameters no longer train."""
    if method is None:
        return model
    if method not in QUANTIZATIONS:
        raise PionError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    device = model.embed.weight.device
    if device.type not in INT8_DEVICES:
        raise PionError(f"--quantize {method} runs on {' or '.join(INT8_DEVICES)}, not {device.type}; "
                        f"pass --device cpu")
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, Int8Linear(child.weight))
    return model.eval().requires_grad_(False)
