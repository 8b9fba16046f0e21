"""hardware.py: the figures behind MFU and MBU (a GPU's peak and bandwidth by name, the CPU's measured ones) and
what the model asks of them (training FLOPs per token, the bytes a decode step reads)."""
import pytest
import torch

import hardware
from conftest import tiny_model


def test_a_decode_step_reads_every_weight_once_and_the_whole_cache():
    m = tiny_model()  # tied embeddings: the lm_head's weight is the embedding, read once
    c = m.config
    weights = sum(p.numel() for p in m.parameters()) * 4
    cache = 2 * c.n_layers * 3 * c.n_kv_heads * 40 * c.head_dim * 2
    assert hardware.decode_bytes_per_step(m, 3, 40, torch.bfloat16) == weights + cache


def test_cpu_copy_bandwidth_is_measured_once_per_process():
    assert hardware.cpu_copy_bandwidth() is hardware.cpu_copy_bandwidth() and hardware.cpu_copy_bandwidth() > 1e8


@pytest.mark.parametrize("name, peak_tflops, bandwidth_tbs", [
    ("NVIDIA H100 80GB HBM3", 989, 3.35), ("NVIDIA H100 PCIe", 756, 2.0), ("NVIDIA A100-SXM4-80GB", 312, 2.0),
    ("NVIDIA A10", 125, 0.6), ("NVIDIA L40S", 181, 0.864), ("NVIDIA L4", 121, 0.3), ("Some Future GPU", None, None)])
def test_a_gpus_peak_and_bandwidth_come_from_its_name_the_first_match_winning(monkeypatch, name, peak_tflops,
                                                                               bandwidth_tbs):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, bandwidth = hardware.gpu_peak_flops("cuda"), hardware.gpu_bandwidth("cuda")
    assert (peak and peak / 1e12, bandwidth and bandwidth / 1e12) == (peak_tflops, bandwidth_tbs)
    assert hardware.gpu_peak_flops("cpu") is None


def test_training_flops_per_token_is_6n_plus_attention():
    m = tiny_model()
    c = m.config
    assert hardware.training_flops_per_token(m, 32) == 6 * m.count_parameters() + 12 * c.n_layers * c.d_model * 32
