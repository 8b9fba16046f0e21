"""Where and how this process trains: the device, its rank under torchrun, bf16 autocast, the settings the
device wants of the process, the model on the device (compiled, wrapped for DDP or sharded by FSDP2), the
random number generators (seeding, and their state for exact resume), and
the stop signals (SIGINT, SIGTERM) it answers by saving."""
import contextlib
import ctypes
import os
import random
import resource
import signal

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import PionError, pick_device


class Runtime:
    """Where and how this process runs the model: device, rank/world size under torchrun, autocast, and TF32
    on CUDA. device: a --device value; "cuda" is cuda:LOCAL_RANK (one GPU per process under torchrun), and an
    explicit cuda:N is that GPU. The training loop adds its own allocator setting (keep_freed_memory)."""

    def __init__(self, device="auto"):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)  # one GPU per process under torchrun
            elif int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
                raise PionError(f"--device {device} names one GPU for the {os.environ['LOCAL_WORLD_SIZE']} processes "
                                f"torchrun starts on this machine; use --device cuda (each takes cuda:LOCAL_RANK)")
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA (fp32 master weights and optimizer state); fp32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, value, op=None):
        """Sum (or op) a float over ranks; identity in a single process."""
        if not self.distributed:
            return value
        t = torch.tensor(float(value), device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.item()

    def print(self, *args):
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    def memory_used(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return host_memory_peak()

    def memory_total(self):
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return host_memory_total()

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def fsdp_param_dtype(config, rt):
    """The dtype FSDP2 gathers the weights in, which is the compute dtype of the sharded model's forward."""
    if config.fsdp_param_dtype == "auto":
        return torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    return getattr(torch, config.fsdp_param_dtype)


def prepare_model(model, config, rt):
    """Move to the device, then checkpointing, compile and the data-parallel wrapper. Returns the module
    to train with; the unwrapped model stays reachable as `model` (FSDP2 shards it in place)."""
    model.gradient_checkpointing = config.gradient_checkpointing
    model.to(rt.device)
    if config.compile:
        for block in model.layers:  # per block: one small graph, reused by every layer
            block.compile()
    if not rt.distributed:
        return model
    if config.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dtype = fsdp_param_dtype(config, rt)
        # Blocks get their inputs uncast: the residual stream is already in the compute dtype (the embedding
        # is gathered in it), and the RoPE tables stay fp32. Cast by FSDP, they would also differ between
        # the forward (cast) and a checkpointed block's recompute in backward (which FSDP2 does not cast).
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if dtype != torch.float32 else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def gradient_sync(wrapped, sync):
    """A context in which backward all-reduces gradients over ranks only if sync (a step's last micro-batch):
    DDP's no_sync, FSDP2's set_requires_gradient_sync; nothing to do in one process."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def host_memory_peak():
    """This process's peak resident memory in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def host_memory_total():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    Every CPU step frees and reallocates the same large buffers (the loss's logits block and the vocab-sized
    gradients: ~280 MB for nano). glibc serves blocks over 32 MB with mmap and unmaps them when freed, so each
    page of the next step's copy faults in again, zero-filled: ~25 ms per 100 MB, 3-4% of a nano step. Kept in
    the heap, they are reused as a GPU's caching allocator reuses its blocks. No-op outside glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too (glibc still falls back to mmap if it must)
    mallopt(M_TRIM_THRESHOLD, -1)  # read as SIZE_MAX: never shrink the heap


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # this rank's GPU only
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(rt):
    """Every rank's RNG state, on rank 0 (each rank draws its own dropout masks)."""
    state = rng_state(rt.device)
    if not rt.distributed:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


def signal_exit_code(name):
    """The shell's exit code for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signal.Signals[name].value if name in signal.Signals.__members__ else 1


class StopSignal:
    """SIGINT/SIGTERM (Ctrl-C, a preempted cloud GPU) ask the loop to save and exit after this step.
    A second signal interrupts immediately."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
