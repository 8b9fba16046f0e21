"""Weight quantization for decoding on a CPU: every linear layer and the output projection keep their weights
as int8 or 4-bit integers with scales, and multiply through ATen's CPU kernels for them.

    int8  one fp32 scale per output channel, symmetric: w ~= int8 * scale, scale = max|row| / 127
    int4  one scale per block of 32 inputs, llama.cpp's Q4_0 rule: w ~= (q - 8) * d, q in 0..15,
          d = (the block's value of largest magnitude) / -8, stored in fp16. The same weights as the
          `export_hf.py --gguf_type q4_0` file, so Pion and llama.cpp run the same model.

Batch-1 decoding multiplies one row by every weight. ATen's int8- and int4-weight kernels
(torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) read the packed weights as they are and
are fast for bfloat16 rows only (with fp32 rows they measured several times slower than fp32), so the few
rows of a decode step are rounded to bf16 for the product (llama.cpp rounds them to 8 bits) and its result comes back in the
model's dtype. Those kernels work row by row, so a long prompt instead multiplies a bf16 copy of the weight,
made per call (never stored), with the bf16 matrix product, which uses the CPU's bf16 matrix units.
Norms, the KV cache and the embedding lookup keep the model's dtype.

    model = quantize(model, "int4")   # in place; the decoding scripts call it on checkpoint.load_model's model
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import PionError
from model import Linear

QUANTIZATIONS = ("int8", "int4")
DEVICES = {"int8": ("cpu", "cuda"), "int4": ("cpu",)}  # int8 on cuda: the plain dequantizing path, unmeasured
GROUP = 32  # int4 inputs per scale: Q4_0's block
FEW_ROWS = 4  # up to this many rows (decode steps of small batches) go through the row-by-row kernels


def quantize_rows_int8(weight):
    """(out, in) float weight -> (int8 weight, fp32 scale per row), symmetric, round to nearest."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row gets a tiny scale, not 0/0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_blocks_int4(weight):
    """(out, in) float weight -> (q (out, in) uint8 in 0..15, d (out, in / 32) fp32 holding fp16 values), by
    llama.cpp's Q4_0 rule (the gguf package's), so that (q - 8) * d is what llama.cpp reads from a q4_0 file."""
    w = weight.detach().float().view(weight.shape[0], -1, GROUP)
    extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))  # signed: it maps to -8, the end with a step to spare
    d = extreme / -8
    inverse = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc(w * inverse + 8.5).clamp(0, 15).to(torch.uint8)
    return q.view(weight.shape), d.squeeze(-1).half().float()


def dequantize_blocks_int4(q, d):
    """quantize_blocks_int4's (q, d) -> the fp32 weight (q - 8) * d."""
    return ((q.float() - 8).view(*d.shape, GROUP) * d[..., None]).view(q.shape)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and a per-output-channel scale: y = (x @ w_int8.T) * scale."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        int8_weight, scale = quantize_rows_int8(weight)
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scale", scale)
        # The kernel wants the rows' dtype; a buffer, since inductor's lowering of the kernel fails on a
        # scale converted inside the compiled step.
        self.register_buffer("kernel_scale", scale.bfloat16())

    @property
    def weight(self):
        """The dequantized weight in fp32 (for code that reads lm_head.weight, e.g. the training loss); decoding
        never builds it."""
        return self.int8_weight.float() * self.scale[:, None]

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            y = F.linear(rows, self.int8_weight.to(x.dtype)) * self.scale  # exact: |int8| <= 127 fits any float
        elif len(rows) <= FEW_ROWS:
            y = torch._weight_int8pack_mm(rows.bfloat16(), self.int8_weight, self.kernel_scale)
        else:
            y = F.linear(rows.bfloat16(), self.int8_weight.bfloat16()) * self.scale  # int8 is exact in bf16
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int4Linear(nn.Module):
    """A bias-free linear layer with Q4_0 weights: 4-bit values, one fp16 scale per 32 inputs.

    It keeps two copies of the 4-bit values: the int4 kernel's own packing (which depends on the CPU's vector
    width) for decode steps, and plain nibbles for long prompts, from which a bf16 weight is made per call.
    Both are half a byte per weight: together still half of int8."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise PionError(f"--quantize int4 needs layers whose inputs split into blocks of {GROUP}; one has "
                            f"{self.in_features}")
        q, d = quantize_blocks_int4(weight)
        padded = -self.out_features % 16  # the kernel packs output channels 16 at a time
        packed_q = F.pad(q.int(), (0, 0, 0, padded))
        padded_d = F.pad(d, (0, 0, 0, padded))
        scales_and_zeros = torch.stack([padded_d, torch.zeros_like(padded_d)], -1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(packed_q, 1))
        # (blocks, out, 2): the kernel computes (q - 8) * scale + zero; Q4_0 has no zero
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous().bfloat16())
        self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scale", d)

    @property
    def weight(self):
        """The dequantized weight in fp32, as llama.cpp reads it from the q4_0 file."""
        q = torch.stack([self.nibbles & 15, self.nibbles >> 4], -1).view(self.out_features, self.in_features)
        return dequantize_blocks_int4(q, self.scale)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).bfloat16()
        if len(rows) <= FEW_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
            y = y[:, :self.out_features]  # less the padding
        else:
            y = F.linear(rows, self.weight.bfloat16())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit, a scale per {GROUP}"


QUANTIZED_LINEAR = {"int8": Int8Linear, "int4": Int4Linear}


def quantize(model, method):
    """Quantize a Pion's linear layers and output projection in place for decoding; returns the model.

    The tied output projection gets a quantized copy of the embedding: the lookup keeps reading its one
    row per token from the full-precision table, the projection streams the quantized copy. With int4 that
    table is rounded to its Q4_0 values, which is what llama.cpp looks up in a q4_0 file: Pion's int4 and the
    exported file are then one model, whose greedy tokens can be checked against each other. Inference only:
    the model is put in eval mode and its parameters no longer train."""
    if method is None:
        return model
    if method not in QUANTIZATIONS:
        raise PionError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    device = model.embed.weight.device
    if device.type not in DEVICES[method]:
        raise PionError(f"--quantize {method} runs on {' or '.join(DEVICES[method])}, not {device.type}; "
                        f"pass --device cpu")
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, QUANTIZED_LINEAR[method](child.weight))
        if method == "int4":
            model.embed.weight.copy_(dequantize_blocks_int4(*quantize_blocks_int4(model.embed.weight)))
    return model.eval().requires_grad_(False)
