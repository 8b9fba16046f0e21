"""What the hardware can do, and what the model asks of it: the figures behind MFU and MBU.

MFU (model FLOPs utilization) = model FLOPs per token x tokens/s / the device's dense peak (gpu_peak_flops
for GPUs, a measured matmul peak for a CPU). MBU (memory bandwidth utilization) = bytes a decode step reads
x steps/s / the device's memory bandwidth: batch-1 decoding is bound by reading the weights, not by FLOPs.
"""
import functools
import time

import torch

# Device-name substring -> figure; the first match wins (H100 PCIe before H100 SXM, A100 before A10).
GPU_BF16_PEAK = (  # dense bf16 FLOP/s
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("A40", 150e12), ("L40", 181e12),
    ("4090", 165e12), ("A10", 125e12), ("L4", 121e12), ("3090", 71e12),
)
GPU_BANDWIDTH = (  # memory bandwidth in bytes/s
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12), ("A40", 0.696e12),
    ("L40", 0.864e12), ("4090", 1.008e12), ("A10", 0.6e12), ("L4", 0.3e12), ("3090", 0.936e12),
)


def gpu_figure(table, device):
    """A known CUDA GPU's figure from one of the tables above; None for another device or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table if key in name), None)


def gpu_peak_flops(device):
    """The dense bf16 peak of a known CUDA GPU in FLOP/s, for MFU; None otherwise."""
    return gpu_figure(GPU_BF16_PEAK, device)


def gpu_bandwidth(device):
    """The memory bandwidth of a known CUDA GPU in bytes/s; None otherwise."""
    return gpu_figure(GPU_BANDWIDTH, device)


@functools.cache
def cpu_copy_bandwidth(megabytes=64, runs=3):
    """Bytes read + written per second by dst.copy_(src) of a 64 MB fp32 tensor, best of `runs`: the
    measure bench/bench_decode.py bounds decoding by. Measured once per process, at first use (~0.2 s)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy also pays dst's page faults
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def memory_bandwidth(device):
    """Bytes/s to compare a decode step's reads against: the GPU table on CUDA, measured copy bandwidth on
    a CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_bandwidth(device)
    return cpu_copy_bandwidth() if device.type == "cpu" else None


def matmul_peak_flops(device="cpu", dtype=torch.float32, n=2048, runs=5):
    """FLOP/s of the best of `runs` (n x n) @ (n x n) products: what this machine's matmul can do, measured."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = a @ b  # warm-up: kernel choice, thread pool, first-touch pages
    best = float("inf")
    for _ in range(runs):
        if out.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def training_flops_per_token(model, seq_len):
    """Forward + backward FLOPs per trained token: 6 per weight (the tied lm_head's product included; the
    embedding lookup is no matmul but is counted once with it) plus 12 L d T for attention's scores and
    values (PaLM's estimate)."""
    c = model.config
    return 6 * model.count_parameters() + 12 * c.n_layers * c.d_model * seq_len


def parameter_bytes(model):
    """The weights' bytes: parameters and buffers (int8/int4 weights and their scales, see quantize.py), each
    stored tensor once (a tied weight, and quantized layers that view a fused layer's buffers). With --quantize
    int8 the fp32 embedding counts whole though a step looks up one row."""
    # The fused projection weights (Pion.fuse_projections) are read instead of the parameters they copy; int4's
    # nibbles only by long prompts where ATen's packing of them is there for the decode steps (quantize.Int4Linear).
    packed = {name.rsplit(".", 1)[0] for name, _ in model.named_buffers() if name.endswith(".packed")}
    storages = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        owner, _, leaf = name.rpartition(".")
        if leaf != "fused_weight" and not (leaf == "nibbles" and owner in packed):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def kv_cache_bytes(config, batch_size, cache_len, dtype):
    return 2 * config.n_layers * batch_size * config.n_kv_heads * cache_len * config.head_dim * dtype.itemsize


def decode_bytes_per_step(model, batch_size, cache_len, cache_dtype=None):
    """Bytes one decode step reads: every weight once (the tied embedding once: the lm_head reads all of it)
    and the whole KV cache, since the fixed-shape step attends every slot of it, masked."""
    dtype = cache_dtype or next(model.parameters()).dtype
    return parameter_bytes(model) + kv_cache_bytes(model.config, batch_size, cache_len, dtype)
