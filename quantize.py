"""Weight quantization for decoding on a CPU: every linear layer and the output projection keep their weights
as int8 or 4-bit integers with scales.

    int8  one fp32 scale per output channel, symmetric: w ~= int8 * scale, scale = max|row| / 127
    int4  one scale per block of 32 inputs, llama.cpp's Q4_0 rule: w ~= (q - 8) * d, q in 0..15,
          d = (the block's value of largest magnitude) / -8, stored in fp16. The same weights as the
          `export_hf.py --gguf_type q4_0` file, so Pion and llama.cpp run the same model.

Batch-1 decoding multiplies one row by every weight, so its speed is how fast the weights stream in while
each costs little arithmetic. On x86 CPUs with AVX2, quantize_cpu.cpp's kernels (built for the CPU at first
use, see cpu_kernels) do what llama.cpp does: they round the few rows of a decode step to int8 in blocks of
32 and multiply int8 by int8 (VNNI where the CPU has it). Elsewhere, or if the build fails, ATen's
weight-only kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) take the rows in bf16.
Where the kernels run, each block's q/k/v and gate/up products are one call, as Pion.fuse_projections makes
them on a GPU: one quantized layer (the block's fused_layer, see fuse) whose buffers the separate layers
view. A long prompt multiplies a bf16 copy of each weight, made per call (never stored), with the bf16
matrix product, which uses the CPU's matrix units. Norms, the KV cache and the embedding lookup keep the
model's dtype.

    model = quantize(model, "int4")   # in place; the decoding scripts call it on checkpoint.load_model's model
"""
import copy
import functools
import hashlib
import os
import platform
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import PionError
from model import Linear

QUANTIZATIONS = ("int8", "int4")
DEVICES = {"int8": ("cpu", "cuda"), "int4": ("cpu",)}  # int8 on cuda: the plain dequantizing path, unmeasured
GROUP = 32  # int4 inputs per scale: Q4_0's block
FEW_ROWS = 4  # up to this many rows (decode steps of small batches) go through the row-by-row kernels
KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantize_cpu.cpp")


def cpu_flags():
    """This CPU's feature flags (Linux) or its name: a build made with -march=native is only reused on a CPU
    with the same ones."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


@functools.cache
def cpu_kernels(source=KERNEL_SOURCE, flags=("-march=native",)):
    """Whether quantize_cpu.cpp's torch.ops.pion.int8_linear and int4_linear are loaded: built with the C++
    compiler torch.compile uses, for this CPU (flags), once: the build is kept in ~/.cache/pion/kernels under
    a name from the CPU's flags, torch's version and the source, so it is reused only where it fits. False
    on CPUs without AVX2 (such as ARM) or when the build fails, with a warning: ATen's kernels run instead."""
    if platform.machine().lower() not in ("x86_64", "amd64") \
            or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils import cpp_extension
    with open(source, "rb") as f:
        fingerprint = f.read() + repr((cpu_flags(), torch.__version__, flags)).encode()
    name = f"pion_quantize_cpu_{hashlib.sha256(fingerprint).hexdigest()[:12]}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "pion", "kernels", name)
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, f"{name}.so")):
        print("building quantize_cpu.cpp's int8/int4 kernels for this CPU (once, about 30 s)", file=sys.stderr)
    try:
        cpp_extension.load(name, [source], extra_cflags=["-O3", *flags, "-fopenmp"], extra_ldflags=["-fopenmp"],
                           build_directory=folder, is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compiler error: the ATen kernels still work
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        warnings.warn(f"could not build {os.path.basename(source)} ({reason}); --quantize uses ATen's slower kernels")
        return False
    for op in ("pion::int8_linear", "pion::int4_linear"):  # output shapes, for torch.compile
        torch.library.register_fake(op)(lambda x, weight, scale: x.new_empty(x.shape[0], weight.shape[0],
                                                                             dtype=torch.float32))
    return True


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


def q4_0_nibbles(q):
    """(out, in) values 0..15 -> (out, in / 2) bytes in Q4_0's order: in each block of 32, byte j holds value
    j in its low half and value j + 16 in its high half."""
    halves = q.view(q.shape[0], -1, 2, GROUP // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(q.shape[0], -1)


def q4_0_values(nibbles):
    """q4_0_nibbles inverted: (out, in / 2) bytes -> (out, in) values 0..15."""
    blocks = nibbles.view(nibbles.shape[0], -1, GROUP // 2)
    return torch.stack([blocks & 15, blocks >> 4], 2).view(nibbles.shape[0], -1)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and a per-output-channel scale: y = (x @ w_int8.T) * scale."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.use_kernels = weight.device.type == "cpu" and self.in_features % GROUP == 0 and cpu_kernels()
        int8_weight, scale = quantize_rows_int8(weight)
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scale", scale)
        if not self.use_kernels:
            # ATen's kernel wants the rows' dtype; a buffer, since inductor's lowering of the kernel fails on a
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
        elif len(rows) <= FEW_ROWS and self.use_kernels:
            y = torch.ops.pion.int8_linear(rows, self.int8_weight, self.scale)
        elif len(rows) <= FEW_ROWS:
            y = torch._weight_int8pack_mm(rows.bfloat16(), self.int8_weight, self.kernel_scale)
        else:
            y = F.linear(rows.bfloat16(), self.int8_weight.bfloat16()) * self.scale  # int8 is exact in bf16
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int4Linear(nn.Module):
    """A bias-free linear layer with Q4_0 weights: 4-bit values, one fp16 scale per 32 inputs (4.5 bits a
    weight), as nibbles in Q4_0's order, which quantize_cpu.cpp reads. Without those kernels it keeps a
    second copy of the values in the packing of ATen's int4 kernel (which depends on the CPU's vector width)
    for decode steps."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise PionError(f"--quantize int4 needs layers whose inputs split into blocks of {GROUP}; one has "
                            f"{self.in_features}")
        self.use_kernels = cpu_kernels()
        q, d = quantize_blocks_int4(weight)
        self.register_buffer("nibbles", q4_0_nibbles(q))
        self.register_buffer("scale", d.half())  # exact: Q4_0's scales are fp16
        if not self.use_kernels:
            padded = -self.out_features % 16  # ATen's kernel packs output channels 16 at a time
            padded_d = F.pad(d, (0, 0, 0, padded))
            scales_and_zeros = torch.stack([padded_d, torch.zeros_like(padded_d)], -1)
            packed = torch._convert_weight_to_int4pack_for_cpu(F.pad(q.int(), (0, 0, 0, padded)), 1)
            self.register_buffer("packed", packed)
            # (blocks, out, 2): the kernel computes (q - 8) * scale + zero; Q4_0 has no zero
            self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous().bfloat16())

    @property
    def weight(self):
        """The dequantized weight in fp32, as llama.cpp reads it from the q4_0 file."""
        return dequantize_blocks_int4(q4_0_values(self.nibbles), self.scale.float())

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if len(rows) <= FEW_ROWS and self.use_kernels:
            y = torch.ops.pion.int4_linear(rows, self.nibbles, self.scale)
        elif len(rows) <= FEW_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(rows.bfloat16(), self.packed, GROUP, self.scales_and_zeros)
            y = y[:, :self.out_features]  # less the padding
        else:
            y = F.linear(rows.bfloat16(), self.weight.bfloat16())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit, a scale per {GROUP}"


def fuse(layers):
    """One quantized layer whose output is the given layers' outputs side by side, for layers that read the
    same input (a block's q/k/v, its gate/up): a decode step makes one call instead of several. Every buffer
    is per output row, so the fused layer's are the layers' concatenated, and each layer then reads its own
    rows of them (views: no second copy)."""
    fused = copy.copy(layers[0])
    fused._buffers = {name: torch.cat([layer._buffers[name] for layer in layers]) for name in layers[0]._buffers}
    fused.out_features = sum(layer.out_features for layer in layers)
    start = 0
    for layer in layers:
        for name, buffer in fused._buffers.items():
            layer._buffers[name] = buffer[start:start + layer.out_features]
        start += layer.out_features
    return fused


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
        for owner, layers in model.projection_groups():
            if all(layer.use_kernels for layer in layers):  # ATen's int4 packing cannot be cut into rows
                owner.fused_layer = fuse(layers)
    return model.eval().requires_grad_(False)
