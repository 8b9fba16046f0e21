"""train.py: schedule, exact resume, data-parallel equivalence, signals, bad input."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
from tokenizer import PAD_ID
import train
from conftest import (ROOT, TINY_MODEL_FLAGS, assert_one_line_error as assert_error_line, run_in_process, run_train,
                      train_argv, write_shards)

@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


def assert_one_line_error(result, text):
    """A run's one error line among its progress output."""
    assert_error_line(result, text, after_progress=True)


def losses_records(save_dir):
    with open(os.path.join(save_dir, "nano", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(save_dir):
    with open(os.path.join(save_dir, "nano", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---------------------------------------------------------------------------------------------------
# Runs (the schedule itself is tests/test_train_config.py's)


def test_training_writes_metrics_and_checkpoints(data_dir, tmp_path, tokenizer_path):
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "ck"], tokenizer_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "ck" / "nano"
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl", "metrics.png", "pion_nano_3.pt", "pion_nano_final.pt"]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert {"step", "loss", "lr", "tokens_seen"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    final, contents = checkpoint.load_checkpoint(run_dir / "pion_nano_final.pt")
    assert contents["step"] == 6 and contents["tokens_seen"] == 6 * 4 * 2 * 32  # batch x grad_accum x seq
    assert "optimizer" not in contents and contents["trainer"] == "pretrain"  # final: weights for use
    assert "optimizer" in checkpoint.read_checkpoint(run_dir / "pion_nano_3.pt")  # a step checkpoint: to resume
    assert final.config.d_model == 32


def test_training_lowers_the_loss_on_repetitive_data(tmp_path, tokenizer_path):
    path = tmp_path / "data"
    path.mkdir()
    for i in range(2):
        np.save(path / f"shard_{i:05d}.npy", np.tile(np.arange(3, 67, dtype=np.uint16), (32, 1)))
    result = run_train(["--data_dir", path, "--save_dir", tmp_path / "ck", "--max_steps", "30", "--lr", "1e-2",
                        "--eval_interval", "30", "--save_interval", "30"], tokenizer_path)
    assert result.returncode == 0, result.stderr
    curve = losses(tmp_path / "ck")
    assert curve[30] < 0.5 * curve[1]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # slow: loader processes
def test_resuming_reproduces_the_uninterrupted_run(data_dir, tmp_path, tokenizer_path, workers):
    """With dropout on, so that the losses also depend on the restored RNG stream."""
    dropout = ["--override", "dropout=0.1"]
    full = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a", "--num_workers", workers, *dropout],
                     tokenizer_path)
    assert full.returncode == 0, full.stderr
    resumed = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--num_workers", workers,
                         "--resume", tmp_path / "a" / "nano" / "pion_nano_3.pt", *dropout], tokenizer_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_resume_auto_continues_from_the_newest_checkpoint(data_dir, tmp_path, tokenizer_path):
    first = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "3"], tokenizer_path)
    assert first.returncode == 0, first.stderr
    more = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", "auto"], tokenizer_path)
    assert more.returncode == 0, more.stderr
    assert "resuming from" in more.stdout + more.stderr and "pion_nano_final.pt" in more.stdout + more.stderr
    assert checkpoint.load_checkpoint(tmp_path / "nano" / "pion_nano_final.pt")[1]["step"] == 6


def test_resuming_a_final_checkpoint_warns_that_adams_moments_start_from_zero(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "3"], tokenizer_path).returncode == 0
    more = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", "auto"], tokenizer_path)
    assert more.returncode == 0, more.stderr
    assert "holds no optimizer state" in more.stdout + more.stderr


def test_resume_auto_on_a_finished_run_says_so_and_changes_nothing(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    before = {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano")}
    again = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", "auto"], tokenizer_path)
    assert again.returncode == 0, again.stderr
    assert "finished run" in again.stdout and "resuming" not in again.stdout + again.stderr
    assert {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano")} == before


def test_resuming_with_other_schedule_flags_names_each_change(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a"], tokenizer_path).returncode == 0
    more = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--max_steps", "9", "--lr", "1e-3",
                      "--resume", tmp_path / "a" / "nano" / "pion_nano_3.pt"], tokenizer_path)
    assert more.returncode == 0, more.stderr
    assert re.search(r"warning: resuming .* \(max_steps 6 -> 9, lr 0\.003 -> 0\.001, min_lr 0\.0003 -> 0\.0001\)",
                     more.stdout + more.stderr)


def test_a_resume_without_lr_flags_keeps_the_checkpoint_s_learning_rate(data_dir, tmp_path, tokenizer_path):
    first = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a"], tokenizer_path)
    assert first.returncode == 0, first.stderr
    argv = [flag for flag in train_argv(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume",
                                         tmp_path / "a" / "nano" / "pion_nano_3.pt"], tokenizer_path)
            if flag not in ("--lr", "3e-3")]
    resumed = run_in_process(train.main, argv)
    assert resumed.returncode == 0, resumed.stderr
    assert "learning rate 0.003 to " in resumed.stdout and "the resumed run's" in resumed.stdout
    assert "other training flags" not in resumed.stdout + resumed.stderr


def test_a_resumed_run_decays_weights_by_its_own_weight_decay_flag(data_dir, tmp_path, tokenizer_path):
    """Loading the optimizer's state also loads the saved groups' hyperparameters: the flag must win."""
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a"], tokenizer_path).returncode == 0
    resumed = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--weight_decay", "0",
                         "--keep_final_optimizer", "--resume", tmp_path / "a" / "nano" / "pion_nano_3.pt"],
                        tokenizer_path)
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(tmp_path / "b" / "nano" / "pion_nano_final.pt", weights_only=False)
    assert [group["weight_decay"] for group in final["optimizer"]["param_groups"]] == [0.0, 0.0]


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "3"], tokenizer_path).returncode == 0
    before = (tmp_path / "nano" / "pion_nano_final.pt").read_bytes()
    again = run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path)
    assert_one_line_error(again, "already holds pion_nano checkpoints")
    assert (tmp_path / "nano" / "pion_nano_final.pt").read_bytes() == before


@pytest.mark.slow  # the process-group test below covers the quick suite
def test_sigterm_saves_a_checkpoint_before_exiting(data_dir, tmp_path, tokenizer_path):
    flags = ["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "100000", "--save_interval", "100000",
             "--eval_interval", "100000", "--seq_len", "32", "--batch_size", "4", "--num_workers", "0",
             "--log_interval", "1", "--tokenizer", tokenizer_path]
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_MODEL_FLAGS, *map(str, flags)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "nano" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # saved, but not finished: `train.py && ...` stops
    saved = [p for p in os.listdir(tmp_path / "nano") if p.endswith(".pt")]
    assert len(saved) == 1 and "SIGTERM received" in out + err and "--resume auto" in out + err
    step = checkpoint.load_checkpoint(tmp_path / "nano" / saved[0])[1]["step"]
    assert saved[0] == f"pion_nano_{step}.pt" and step >= 3


def test_sigterm_to_the_whole_process_group_with_loader_workers_saves_and_exits_143(data_dir, tmp_path,
                                                                                     tokenizer_path):
    """systemd's stop, Slurm's scancel and cloud preemption signal every process of the group, the DataLoader
    workers too."""
    flags = ["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "100000", "--save_interval", "100000",
             "--eval_interval", "100000", "--seq_len", "32", "--batch_size", "4", "--num_workers", "2",
             "--log_interval", "1", "--sample_tokens", "0", "--tokenizer", tokenizer_path]
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_MODEL_FLAGS, *map(str, flags)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "nano" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    [saved] = [p for p in os.listdir(tmp_path / "nano") if p.endswith(".pt")]
    assert checkpoint.load_checkpoint(tmp_path / "nano" / saved)[1]["step"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"], ["--optimizer", "muon"]], ids=["ddp", "fsdp2", "ddp-muon"])
def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path, tokenizer_path, sharding):
    muon = [flag for flag in sharding if flag != "--fsdp"]
    single = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "one", "--batch_size", 4, *muon],
                       tokenizer_path)
    assert single.returncode == 0, single.stderr
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    double = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "two", "--batch_size", 2, *sharding],
                       tokenizer_path, launcher=torchrun)
    assert "Traceback" not in double.stderr
    assert double.returncode == 0, double.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    # Muon orthogonalizes each update in bf16: a last-bit difference in the all-reduced gradient can round there.
    tolerance = 1e-4 if muon else 1e-5
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=tolerance), step
    assert checkpoint.load_checkpoint(tmp_path / "two" / "nano" / "pion_nano_final.pt")[1]["step"] == 6


@pytest.mark.slow
def test_two_processes_with_dropout_resume_exactly_with_each_ranks_rng(data_dir, tmp_path, tokenizer_path):
    """Each rank draws its own dropout masks from its own saved RNG: resuming both reproduces the run."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    flags = ["--data_dir", data_dir, "--batch_size", 2, "--override", "dropout=0.1"]
    full = run_train([*flags, "--save_dir", tmp_path / "a"], tokenizer_path, launcher=torchrun)
    assert full.returncode == 0, full.stderr
    assert len(checkpoint.read_checkpoint(tmp_path / "a" / "nano" / "pion_nano_3.pt")["rng"]) == 2  # one state per rank
    resumed = run_train([*flags, "--save_dir", tmp_path / "b", "--resume", tmp_path / "a" / "nano" / "pion_nano_3.pt"],
                        tokenizer_path, launcher=torchrun)
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (4, 5, 6):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


# ---------------------------------------------------------------------------------------------------
# Several machines: torchrun --nnodes 2, two "nodes" of one process each on this machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_nodes(args, save_dirs, tokenizer_path, logs):
    """train.py on two torchrun "nodes" of one process each, meeting through a c10d rendezvous on 127.0.0.1 as
    they would on HOST:PORT across machines; save_dirs: each node's own disk. Returns the exit codes."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank, save_dir in enumerate(save_dirs):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                    "--rdzv_id", "pion-test"]
        with open(logs / f"node{node_rank}.log", "w") as log:
            nodes.append(subprocess.Popen([*torchrun, "train.py", *train_argv([*args, "--save_dir", save_dir],
                                                                            tokenizer_path)],
                                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return [node.wait(timeout=300) for node in nodes]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, tokenizer_path):
    """The same 6 steps as one 2-process torchrun and as two 1-process nodes: (folder, the nodes' run folders)."""
    tmp = tmp_path_factory.mktemp("nodes")
    data = write_shards(tmp / "data")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    one = run_train(["--data_dir", data, "--save_dir", tmp / "one", "--batch_size", 2], tokenizer_path,
                    launcher=torchrun)
    assert one.returncode == 0, one.stderr
    codes = train_on_two_nodes(["--data_dir", data, "--batch_size", 2], [tmp / "node0", tmp / "node1"],
                               tokenizer_path, tmp)
    assert codes == [0, 0], (tmp / "node0.log").read_text() + (tmp / "node1.log").read_text()
    return tmp, [tmp / "node0" / "nano", tmp / "node1" / "nano"]


def written(run_dir):
    # Every rank opens the folder's lock file; only global rank 0 takes the lock and writes.
    return sorted(name for name in os.listdir(run_dir) if name != ".lock")


@pytest.mark.slow
def test_two_nodes_train_as_one_two_process_run(two_node_run):
    tmp, nodes = two_node_run
    rank0 = next(node for node in nodes if written(node))
    one, two = losses(tmp / "one"), losses(rank0.parent)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-6), step


@pytest.mark.slow
def test_on_two_nodes_only_global_rank_0_writes(two_node_run):
    _, nodes = two_node_run
    assert sorted(bool(written(node)) for node in nodes) == [False, True]  # node_rank 1's local rank 0 does not
    rank0 = next(node for node in nodes if written(node))
    assert written(rank0) == ["metrics.jsonl", "metrics.png", "pion_nano_3.pt", "pion_nano_final.pt"]


@pytest.mark.slow
def test_two_nodes_resume_auto_from_the_checkpoint_rank_0_wrote(two_node_run, tokenizer_path):
    """A run preempted after step 3's checkpoint: each node's disk gets a copy of the checkpoint folder, and the
    same command with --resume auto continues it."""
    tmp, nodes = two_node_run
    rank0 = next(node for node in nodes if written(node))
    resumed = [tmp / "resumed0" / "nano", tmp / "resumed1" / "nano"]
    for node in resumed:
        shutil.copytree(rank0, node)
        os.remove(node / "pion_nano_final.pt")
    codes = train_on_two_nodes(["--data_dir", tmp / "data", "--batch_size", 2, "--resume", "auto"],
                               [node.parent for node in resumed], tokenizer_path, tmp)
    assert codes == [0, 0], (tmp / "node0.log").read_text() + (tmp / "node1.log").read_text()
    writer = next(node for node in resumed if os.path.exists(node / "pion_nano_final.pt"))
    one, again = losses(tmp / "one"), losses(writer.parent)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(one[step], abs=1e-6), step


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_memory_test_reports_peak_memory_and_exits_0(tokenizer_path, optimizer):
    result = run_train(["--memory_test", "--batch_size", "2", "--seq_len", "64", "--optimizer", optimizer],
                       tokenizer_path)
    assert result.returncode == 0, result.stderr
    assert "memory test" in result.stdout + result.stderr and "GB of" in result.stdout + result.stderr


@pytest.mark.parametrize("run", [["--memory_test"], ["--data_dir", "unused"]])
def test_a_sample_longer_than_the_context_is_refused_by_its_own_flag_before_step_1(tmp_path, tokenizer_path, run):
    result = run_train([*run, "--save_dir", tmp_path, "--override", "max_seq_len=8", "--seq_len", "8"], tokenizer_path)
    assert_error_line(result, "--sample_tokens 48 leaves no room for a prompt in the model's max_seq_len 8")


@pytest.mark.slow
def test_the_memory_test_peak_is_a_real_runs_peak_after_its_first_save(data_dir, tmp_path, tokenizer_path):
    """Pion-nano's full vocabulary, where AdamW's two state buffers are most of the memory. A run peaks after
    its first save, in its second step, whose backward holds AdamW's moments (and, with --grad_accum 2, a second
    gradient): the memory test reports that peak, not less, and not much more. Peak RSS is per process: each
    figure comes from a fresh one. On the CPU each process's heap takes one of two layouts, 8% apart (here 0.89
    or 0.96 GB, docs/training.md), whichever the run or the memory test lands in: hence 0.90, not 0.95."""
    shape = ["--model_size", "nano", "--override", "n_layers=2", "--batch_size", "2", "--seq_len", "64", "--tokenizer",
             tokenizer_path]
    test = subprocess.run([sys.executable, "train.py", *shape, "--memory_test"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert test.returncode == 0 and "memory test: two training steps" in test.stdout, test.stderr
    reported = float(re.search(r"peak ([\d.]+) GB", test.stdout).group(1))
    for i in range(2):  # data with the full vocabulary's ids
        np.save(os.path.join(data_dir, f"shard_{i:05d}.npy"),
                np.random.default_rng(i).integers(3, 50258, size=(48, 64)).astype(np.uint16))
    run = subprocess.run([sys.executable, "train.py", *shape, "--data_dir", data_dir, "--save_dir", tmp_path,
                          "--max_steps", "2", "--save_interval", "1", "--log_interval", "1", "--num_workers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert os.path.exists(tmp_path / "nano" / "pion_nano_1.pt")
    real = next(r["memory_gb"] for r in losses_records(tmp_path) if r["step"] == 2 and "memory_gb" in r)
    assert 0.90 * real <= reported <= 1.10 * real, (reported, real)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


def test_missing_data_dir_is_one_line_from_the_command_line(tmp_path, tokenizer_path):
    result = run_train(["--data_dir", tmp_path / "nope", "--save_dir", tmp_path], tokenizer_path,
                       launcher=(sys.executable,))
    assert_one_line_error(result, "nope")


def test_empty_data_dir_is_one_line(tmp_path, tokenizer_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_train(["--data_dir", tmp_path / "empty", "--save_dir", tmp_path], tokenizer_path),
                          "shard")


def test_shard_that_is_not_2d_is_one_line(tmp_path, tokenizer_path):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "shard_00000.npy", np.zeros((2, 3, 4), dtype=np.int32))
    assert_one_line_error(run_train(["--data_dir", tmp_path / "d", "--save_dir", tmp_path], tokenizer_path), "2-D")


def test_token_ids_beyond_the_vocabulary_are_one_line(data_dir, tmp_path, tokenizer_path):
    for shard in data_dir.iterdir():
        np.save(shard, np.full((48, 64), 600, dtype=np.uint16))
    assert_one_line_error(run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path), "600")


def test_seq_len_beyond_the_shard_width_is_one_line(data_dir, tmp_path, tokenizer_path):
    assert_one_line_error(run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--seq_len", 128],
                                    tokenizer_path), "128")


def test_seq_len_beyond_max_seq_len_is_one_line(data_dir, tmp_path, tokenizer_path):
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--override", "max_seq_len=16"], tokenizer_path)
    assert_one_line_error(result, "max_seq_len 16")


def test_unwritable_save_dir_is_one_line(data_dir, tmp_path, tokenizer_path):
    (tmp_path / "file").write_text("not a directory")
    assert_one_line_error(run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "file" / "ck"], tokenizer_path),
                          "cannot write to save dir")


def test_resume_from_a_file_that_is_not_a_checkpoint_is_one_line(data_dir, tmp_path, tokenizer_path):
    (tmp_path / "notes.pt").write_text("hello")
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", tmp_path / "notes.pt"],
                       tokenizer_path)
    assert_one_line_error(result, "not a readable checkpoint")


def test_bad_flag_value_exits_2(data_dir, tmp_path, tokenizer_path):
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--batch_size", "0"], tokenizer_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--batch_size" in result.stderr


# ---------------------------------------------------------------------------------------------------
# Nothing the user has is overwritten or lost


def test_a_second_run_on_a_locked_save_dir_is_refused(data_dir, tmp_path, tokenizer_path):
    import fcntl
    (tmp_path / "nano").mkdir()
    with open(tmp_path / "nano" / ".lock", "a") as held:  # as a running train.py holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path)
    assert_one_line_error(result, "another run is writing to")
    assert not any(p.endswith(".pt") for p in os.listdir(tmp_path / "nano"))


def test_the_lock_dies_with_its_run(data_dir, tmp_path, tokenizer_path):
    first = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a"], tokenizer_path)
    again = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a", "--resume", "auto", "--max_steps", 7],
                      tokenizer_path)
    assert first.returncode == 0 and again.returncode == 0, again.stderr


def test_resuming_into_a_folder_of_another_run_is_refused(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a"], tokenizer_path).returncode == 0
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--seed", 1], tokenizer_path).returncode == 0
    before = {p: os.path.getmtime(tmp_path / "b" / "nano" / p) for p in os.listdir(tmp_path / "b" / "nano")}
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume",
                        tmp_path / "a" / "nano" / "pion_nano_3.pt"], tokenizer_path)
    assert_one_line_error(result, "holds the checkpoints of another run")
    assert {p: os.path.getmtime(tmp_path / "b" / "nano" / p) for p in os.listdir(tmp_path / "b" / "nano")} == before


def test_resuming_a_checkpoint_older_than_the_newest_in_its_folder_is_refused(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    before = {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano") if p.endswith(".pt")}
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume",
                        tmp_path / "nano" / "pion_nano_3.pt"], tokenizer_path)
    assert_one_line_error(result, "holds checkpoints past pion_nano_3.pt (up to pion_nano_final.pt)")
    assert {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano") if p.endswith(".pt")} == before


def test_continuing_a_finished_run_keeps_its_final_checkpoint_under_its_step(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--max_steps", "3"], tokenizer_path).returncode == 0
    finished = (tmp_path / "nano" / "pion_nano_final.pt").read_bytes()
    more = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", "auto"], tokenizer_path)
    assert more.returncode == 0, more.stderr
    assert (tmp_path / "nano" / "pion_nano_3.pt").read_bytes() == finished
    assert checkpoint.load_checkpoint(tmp_path / "nano" / "pion_nano_final.pt")[1]["step"] == 6


def test_resuming_as_another_size_is_refused_naming_the_fields(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--override", "d_ff=128",
                        "--resume", tmp_path / "nano" / "pion_nano_3.pt"], tokenizer_path)
    assert_one_line_error(result, "d_ff 64 (flags: 128)")


@pytest.mark.slow
def test_resuming_on_a_shard_rewritten_with_other_tokens_is_refused(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    shard = np.load(os.path.join(data_dir, "shard_00001.npy"))
    np.save(os.path.join(data_dir, "shard_00001.npy"), (shard + 1) % 512)  # same name, shape and sample count
    resume = ["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume", tmp_path / "nano" / "pion_nano_3.pt"]
    assert_one_line_error(run_train(resume, tokenizer_path), "content of shard_00001.npy")


def test_a_checkpoint_whose_adam_moments_do_not_fit_their_parameters_is_refused(data_dir, tmp_path, tokenizer_path):
    """Fused AdamW trusts the moments' shapes and writes past a smaller buffer: a downloaded checkpoint must
    not be able to do that."""
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    contents = checkpoint.read_checkpoint(tmp_path / "nano" / "pion_nano_3.pt")
    moments = contents["optimizer"]["state"]["layers.0.ffn.w1.weight"]
    moments["exp_avg"] = moments["exp_avg"][:3].clone()
    torch.save(contents, tmp_path / "bad.pt")
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume", tmp_path / "bad.pt"],
                       tokenizer_path, launcher=[sys.executable])  # a process of its own: unchecked, it crashes
    assert_one_line_error(result, "exp_avg of layers.0.ffn.w1.weight is (3, 32) torch.float32, the parameter is "
                                  "(64, 32) torch.float32")


@pytest.mark.parametrize("change", ["a missing parameter", *(pytest.param(change, marks=pytest.mark.slow)
                                                      for change in ("a missing moment", "an int moment"))])
def test_optimizer_state_of_the_wrong_count_or_dtype_is_refused(data_dir, tmp_path, tokenizer_path, change):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    contents = checkpoint.read_checkpoint(tmp_path / "nano" / "pion_nano_3.pt")
    state = contents["optimizer"]["state"]
    if change == "a missing parameter":
        del state["layers.1.ffn.w2.weight"]
    elif change == "a missing moment":
        del state["norm.weight"]["exp_avg_sq"]
    else:
        state["norm.weight"]["exp_avg_sq"] = state["norm.weight"]["exp_avg_sq"].int()
    torch.save(contents, tmp_path / "bad.pt")
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume", tmp_path / "bad.pt"],
                       tokenizer_path)
    assert_one_line_error(result, "has optimizer state that does not fit the model")


def test_a_run_that_fails_before_step_1_leaves_no_save_dir_it_created(tmp_path, tokenizer_path):
    result = run_train(["--data_dir", tmp_path / "no_data", "--save_dir", tmp_path / "new" / "runs"], tokenizer_path)
    assert_one_line_error(result, "data dir not found")
    assert os.listdir(tmp_path) == []


def test_a_resume_refused_by_its_trackers_changes_nothing_in_the_run_folder(data_dir, tmp_path, tokenizer_path):
    """The run died after logging step 6 and before its final save: metrics.jsonl holds lines past step 3's
    checkpoint, which only a resume that starts may drop."""
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    os.remove(tmp_path / "nano" / "pion_nano_final.pt")
    (tmp_path / "nano" / "trackers.json").write_text("{not json")
    before = {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano")}
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--resume", "auto"], tokenizer_path)
    assert_one_line_error(result, "trackers.json")
    assert {p: (tmp_path / "nano" / p).read_bytes() for p in os.listdir(tmp_path / "nano")} == before


def test_a_run_whose_tracker_cannot_start_leaves_no_save_dir_it_created(data_dir, tmp_path, tokenizer_path,
                                                                        monkeypatch):
    import trackers

    class Unreachable:
        def __init__(self, *args):
            raise RuntimeError("no API key")
    monkeypatch.setattr(trackers, "tracker_name", lambda name: name)  # installed or not
    monkeypatch.setattr(trackers, "WandB", Unreachable)
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "runs", "--logger", "wandb"], tokenizer_path)
    assert_one_line_error(result, "--logger wandb could not start: no API key")
    assert not os.path.exists(tmp_path / "runs")


def test_resuming_on_changed_data_is_refused_unless_allowed(data_dir, tmp_path, tokenizer_path):
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    np.save(os.path.join(data_dir, "shard_00003.npy"), np.load(os.path.join(data_dir, "shard_00000.npy")))
    resume = ["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--resume", tmp_path / "nano" / "pion_nano_3.pt"]
    assert_one_line_error(run_train(resume, tokenizer_path), "--allow_data_change")
    assert run_train(resume + ["--allow_data_change"], tokenizer_path).returncode == 0


def test_stale_temp_files_of_a_killed_save_are_removed_at_the_next_start(data_dir, tmp_path, tokenizer_path):
    (tmp_path / "nano").mkdir()
    (tmp_path / "nano" / ".pion_nano_20.pt.tmp4242").write_bytes(b"half a checkpoint")
    assert run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path).returncode == 0
    assert not any(".tmp" in p for p in os.listdir(tmp_path / "nano"))


@pytest.mark.parametrize("split_row", [-1, 0])  # a validation row (the last of a shard), a training row
def test_out_of_range_ids_in_either_split_are_refused_before_step_1(data_dir, tmp_path, tokenizer_path, split_row):
    shard = np.load(os.path.join(data_dir, "shard_00001.npy"))
    shard[split_row, 5] = 600
    np.save(os.path.join(data_dir, "shard_00001.npy"), shard)
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path], tokenizer_path)
    assert_one_line_error(result, "token id 600")
    assert not os.path.exists(tmp_path / "nano" / "metrics.jsonl")  # refused before any step


def test_data_of_padding_alone_is_refused(tmp_path, tokenizer_path):
    path = tmp_path / "data"
    path.mkdir()
    np.save(path / "shard_00000.npy", np.full((48, 64), PAD_ID, dtype=np.uint16))
    assert_one_line_error(run_train(["--data_dir", path, "--save_dir", tmp_path], tokenizer_path), "all padding")


def test_decay_frac_is_derived_from_train_config_for_the_wsd_trainer_only():
    import finetune
    from cli import PionError
    assert train.parse_args(["--data_dir", "d", "--decay_frac", "0.3"]).decay_frac == 0.3
    with pytest.raises(PionError, match="--decay_frac: must be a number from 0 to 1"):
        train.parse_args(["--data_dir", "d", "--decay_frac", "1.5"])
    with pytest.raises(PionError, match="unrecognized arguments: --decay_frac"):  # cosine: no use for it
        finetune.parse_args(["--checkpoint", "c", "--decay_frac", "0.3"])


def test_warmup_running_into_the_decay_is_refused(data_dir, tmp_path, tokenizer_path):
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--warmup_steps", 5, "--decay_frac", 0.5],
                       tokenizer_path)
    assert_one_line_error(result, "runs into the decay")


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(data_dir, tmp_path, tokenizer_path):
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path, "--warmup_steps", 1000], tokenizer_path)
    assert result.returncode == 0, result.stderr
    assert "warmup of 1000 steps does not fit in max_steps 6; using 0 warmup steps" in result.stdout + result.stderr


def test_the_eval_sample_starts_from_the_validation_data_unless_given_a_prompt(data_dir, tmp_path, tokenizer_path):
    # A tokenizer within the toy vocabulary of 512, so that samples are decoded.
    from conftest import build_tokenizer
    small = build_tokenizer(tmp_path / "small.json", vocab_size=300)
    first = np.load(os.path.join(data_dir, "shard_00000.npy"))[-1]  # the first validation row
    first = np.where(first < 300, first, 5)
    shard = np.load(os.path.join(data_dir, "shard_00000.npy")) % 300
    shard[-1] = first
    np.save(os.path.join(data_dir, "shard_00000.npy"), shard)
    for i in (1, 2):
        np.save(os.path.join(data_dir, f"shard_{i:05d}.npy"), np.load(os.path.join(data_dir, f"shard_{i:05d}.npy")) % 300)
    result = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "a", "--tokenizer", small], tokenizer_path)
    from tokenizers import Tokenizer
    start = Tokenizer.from_file(small).decode([int(t) for t in first[:16] if t != PAD_ID])
    assert result.returncode == 0 and f"sample: {start!r} -> '" in result.stdout + result.stderr
    given = run_train(["--data_dir", data_dir, "--save_dir", tmp_path / "b", "--tokenizer", small, "--sample_prompt",
                       "def main"], tokenizer_path)
    assert "sample: 'def main' -> '" in given.stdout + given.stderr  # where the prompt ends shows
