"""Ready for a GPU: bf16 training, fused AdamW, FSDP2's bf16 policy, MBU in the decoding report, and
bench/gpu_check.py (hardware.py's figures are tests/test_hardware.py's).

Tests marked `cuda` run the GPU checks' own functions (bench/gpu_checks.py) and skip without CUDA; the rest show
on the CPU what the GPU runs depend on: bf16 autocast steps, FSDP2 with a bf16 policy on gloo, and
gpu_check.py --dry_run.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import hardware
import process
import train_config
import trainer
from attention import SoftCappedAttention, flex_softcap_attention
from conftest import ROOT, assert_one_line_error, run_in_process, tiny_model
from decoding import DecodeTimer

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_checks  # noqa: E402  (bench/: support of bench/gpu_check.py)



def on_cuda(test):
    """Marked `cuda` (select with -m cuda) and skipped where there is no CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))

CPU_TARGET = gpu_checks.Target(torch.device("cpu"), dry_run=True)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------------
# On a CUDA GPU


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.usefixtures("no_tf32")
@on_cuda
def test_flex_softcap_attention_matches_the_tiled_kernel_forward_and_backward(dtype, tolerance):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, 256, 32, device="cuda", dtype=dtype) * 2 for heads in (4, 2, 2))
    grad_out = torch.randn_like(q)
    results = []
    for attend in (lambda q, k, v: flex_softcap_attention(q, k, v, 5.0),
                   lambda q, k, v: SoftCappedAttention.apply(q.float(), k.float(), v.float(), 5.0, 64)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(grad_out.to(out.dtype))
        results.append([out] + [t.grad for t in leaves])
    for flex, tiled in zip(*results):
        assert relative_error(flex, tiled) < tolerance


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@on_cuda
def test_compiled_decoding_on_cuda_equals_eager_and_uses_cuda_graphs():
    rows = list(gpu_checks.check_decoding(gpu_checks.Target(torch.device("cuda"), dry_run=True), new_tokens=12))
    assert all(passed for _, _, passed in rows), rows  # greedy tokens identical; no cudagraph skips


@on_cuda
def test_the_kv_cache_is_a_static_address_on_cuda():
    cache = tiny_model().cuda().new_kv_cache(1, 16)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in cache.k + cache.v)


@on_cuda
@pytest.mark.parametrize("soft_cap", [False, True], ids=["sdpa", "flex-softcap"])
def test_a_bf16_training_step_on_cuda_gives_a_finite_loss(soft_cap):
    target = gpu_checks.Target(torch.device("cuda"), dry_run=True)
    assert torch.isfinite(torch.tensor(gpu_checks.train_speed(target, "tiny", soft_cap, False, True)["loss"]))


# ---------------------------------------------------------------------------------------------------
# bf16 and the optimizer on the CPU


def test_bf16_autocast_training_steps_on_the_cpu_give_finite_falling_losses():
    losses = gpu_checks.training_losses(CPU_TARGET, "tiny", steps=6,
                                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0]


def test_the_optimizer_is_fused_adamw_and_steps_like_the_per_parameter_loop():
    models = [tiny_model(), tiny_model()]
    config = train_config.TrainConfig(max_steps=1, lr=1e-2, min_lr=0, warmup_steps=0, weight_decay=0.1)
    [fused] = trainer.build_optimizer(models[0], config, process.Runtime("cpu"))
    loop = torch.optim.AdamW([{"params": [p for p in models[1].parameters() if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in models[1].parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"]
    ids = torch.randint(0, 101, (2, 16))
    for m, optimizer in zip(models, (fused, loop)):
        m(ids, labels=ids)["loss"].backward()
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# FSDP2 with a bf16 policy, on gloo


def test_fsdp_compute_dtype_is_bf16_on_cuda_and_fp32_elsewhere_unless_set():
    config = train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0, warmup_steps=0)
    on = {kind: types.SimpleNamespace(device=torch.device(kind)) for kind in ("cuda", "cpu")}
    assert process.fsdp_param_dtype(config, on["cuda"]) == torch.bfloat16
    assert process.fsdp_param_dtype(config, on["cpu"]) == torch.float32
    config.fsdp_param_dtype = "bfloat16"
    assert process.fsdp_param_dtype(config, on["cpu"]) == torch.bfloat16


SHARDED_SAMPLE = """
import os, sys; sys.path[:0] = [{root!r}, os.path.join({root!r}, 'bench')]
import itertools, torch, gpu_checks, process, train_config, trainer, validation
from decoding import generate
rt = process.Runtime("cpu")
model = gpu_checks.new_model("tiny")
config = train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0, warmup_steps=0, fsdp=True, fsdp_param_dtype="bfloat16")
wrapped = process.prepare_model(model, config, rt)
optimizer = trainer.build_optimizer(wrapped, config, rt)
ids = torch.randint(0, 512, (2, 16))
trainer.train_step(wrapped, optimizer, itertools.repeat({{"input_ids": ids, "labels": ids}}), rt, 1, 1.0, 1.0)
seen = []
def sample(m, cache_dtype):
    seen.append(cache_dtype)
    return generate(m, [5, 6, 7], 4)[0]
tokens = validation.sample_text(sample, model, wrapped, config, rt)
sys.stdout.write(f"tokens {{tokens}} cache {{seen[0]}}\\n")  # one write: the two ranks share the pipe
rt.close()
"""


@pytest.mark.slow
def test_a_bf16_sharded_model_samples_after_a_training_step_on_two_gloo_processes(tmp_path):
    """After a step FSDP2 leaves the root's weights (embedding, final norm) sharded, and decoding never
    calls the root's forward: the trainer gathers them, in bf16, which is also the cache's dtype."""
    script = tmp_path / "sharded_sample.py"
    script.write_text(SHARDED_SAMPLE.format(root=ROOT))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("tokens")]
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].endswith("cache torch.bfloat16")


ROPE_UNDER_FSDP = """
import os, sys; sys.path[:0] = [{root!r}, os.path.join({root!r}, 'bench')]
import itertools, torch, gpu_checks, process, train_config, trainer
rt = process.Runtime("cpu")
model = gpu_checks.new_model("tiny")
config = train_config.TrainConfig(max_steps=1, lr=1e-3, min_lr=0, warmup_steps=0, fsdp=True, fsdp_param_dtype="bfloat16",
                             gradient_checkpointing=True)
wrapped = process.prepare_model(model, config, rt)
seen = []
model.layers[0].register_forward_pre_hook(lambda block, args: seen.append(args[1].dtype))  # after FSDP's own hook
ids = torch.randint(0, 512, (2, 16))
trainer.train_step(wrapped, trainer.build_optimizer(wrapped, config, rt), itertools.repeat({{"input_ids": ids,
                   "labels": ids}}), rt, 1, 1.0, 1.0)
print("rope tables", *seen)
rt.close()
"""


def test_fsdp2_bf16_blocks_get_fp32_rope_tables_in_the_forward_and_in_its_recompute(tmp_path):
    """FSDP2 casts a block's floating inputs to the policy's dtype, but not when activation checkpointing
    recomputes the block in backward (torch 2.11 on CUDA): bf16 tables saved, fp32 recomputed, and the
    checkpoint refuses. Uncast, the tables are the same both times, and RoPE keeps its fp32 angles."""
    script = tmp_path / "rope_under_fsdp.py"
    script.write_text(ROPE_UNDER_FSDP.format(root=ROOT))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["rope", "tables", "torch.float32", "torch.float32"]  # forward, recompute


@pytest.mark.slow
def test_fsdp2_with_the_bf16_policy_on_two_gloo_processes_trains_through_an_eval_sample(tokenizer_path):
    target = gpu_checks.Target(torch.device("cpu"), dry_run=True, tokenizer=tokenizer_path)
    passed, samples, result = gpu_checks.fsdp_sample_run(target, nproc=2, param_dtype="bfloat16")
    assert passed, result.stderr[-3000:]
    assert all(sample.startswith("sample: 'The meaning of life is") for sample in samples)


# ---------------------------------------------------------------------------------------------------
# MBU in the decoding report (the figures themselves are tests/test_hardware.py's)


def test_decode_timer_reports_mbu_against_the_devices_bandwidth(monkeypatch):
    monkeypatch.setattr(hardware, "memory_bandwidth", lambda device: 1e9)  # 1 GB/s
    timer = DecodeTimer(iter([torch.zeros(1)] * 12), prompt_tokens=4, bytes_per_step=1e6, device=torch.device("cpu"))
    for _ in timer:
        pass
    timer.decode_seconds = 0.02  # the 10 timed steps: 500 steps/s x 1 MB = 50% of 1 GB/s
    assert timer.report().endswith("decode 500.0 tokens/s, MBU 50% (1 MB a step of 1 GB/s)")


def test_decode_timer_without_bytes_reports_no_mbu():
    timer = DecodeTimer(iter([torch.zeros(1)] * 4), prompt_tokens=4)
    list(timer)
    assert "MBU" not in timer.report()


# ---------------------------------------------------------------------------------------------------
# bench/gpu_check.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_is_one_line_and_points_to_dry_run():
    sys.path.insert(0, f"{ROOT}/bench")
    import gpu_check
    assert_one_line_error(run_in_process(gpu_check.main, []), "--dry_run")


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check_on_the_cpu(tokenizer_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry_run", "--tokenizer", tokenizer_path],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(rows) == 14 and all(row.startswith("ok") for row in rows)
    assert "MFU" in result.stdout and "MBU" in result.stdout


def test_a_failed_torchrun_row_names_the_error_not_the_closing_banner():
    output = ("[rank0]: Traceback (most recent call last):\n"
              "[rank0]: torch.utils.checkpoint.CheckpointError: Recomputed values differ\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
              "  error_file: <N/A>\n"
              "============================================================\n")
    result = subprocess.CompletedProcess([], 1, "", output)
    assert gpu_checks.last_line(result) == "[rank0]: torch.utils.checkpoint.CheckpointError: Recomputed values differ"
