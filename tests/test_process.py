"""process.py: which device a process trains on. No GPU is needed: the CUDA calls are recorded, not made."""
import pytest
import torch

import finetune
import process
import train
from cli import PionError


@pytest.fixture
def fake_cuda(monkeypatch):
    """--device resolves as on a machine with GPUs; -> the devices torch.cuda.set_device was given."""
    selected = []
    monkeypatch.setattr(process, "pick_device", lambda name: torch.device("cuda" if name == "auto" else name))
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return selected


def test_an_explicit_gpu_is_the_one_the_process_trains_on(fake_cuda):
    assert process.Runtime("cuda:1").device == torch.device("cuda", 1)
    assert fake_cuda == [torch.device("cuda", 1)]


def test_cuda_without_an_index_is_the_gpu_of_the_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process.Runtime("cuda").device == torch.device("cuda", 3)


def test_one_explicit_gpu_for_several_torchrun_processes_is_refused_in_one_line(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(PionError, match="--device cuda:1 names one GPU for the 2 processes"):
        process.Runtime("cuda:1")


@pytest.mark.parametrize("parse", [lambda argv: train.parse_args(["--data_dir", "d", *argv]),
                                   lambda argv: finetune.parse_args(["--checkpoint", "c", *argv])],
                         ids=["train", "finetune"])
def test_the_trainers_take_the_device_flag_of_the_model_loading_scripts(parse):
    assert parse(["--device", "cuda:1"]).device == "cuda:1"
