"""trackers.py: metrics.jsonl and the --logger trackers (TensorBoard, wandb, trackio), read back with each one's own
reader after a short CPU run and its resume after a crash; metrics.png at each eval."""
import glob
import importlib.util
import json
import os
import struct
import time

import pytest

import train
import trackers
from conftest import assert_one_line_error as assert_error_line, run_in_process, run_script
from conftest import TINY_MODEL_FLAGS, write_shards
from checkpoint import load_checkpoint

STEPS = [1, 2, 3, 4, 5, 6]


@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


def run_train(save_dir, data_dir, tokenizer_path, *args):
    """6 steps of a tiny train.py in-process: a line per step, evals and checkpoints at steps 3 and 6."""
    flags = ["--data_dir", data_dir, "--save_dir", save_dir, "--seq_len", 32, "--batch_size", 4, "--max_steps", 6,
             "--log_interval", 1, "--eval_interval", 3, "--eval_steps", 2, "--save_interval", 3, "--num_workers", 0,
             "--warmup_steps", 2, "--lr", 3e-3, "--tokenizer", tokenizer_path, "--sample_tokens", 0]
    result = run_in_process(train.main, [*TINY_MODEL_FLAGS, *flags, *args])
    assert result.returncode == 0, result.stderr
    return result


def run_crash_and_resume(tmp_path, data_dir, tokenizer_path, *args):
    """A run whose process died after logging step 6 but before its final save, then --resume auto: the resumed
    run starts from step 3's checkpoint and replays steps 4-6. Returns the run folder."""
    run_train(tmp_path / "ck", data_dir, tokenizer_path, *args)
    run_dir = tmp_path / "ck" / "nano"
    os.remove(run_dir / "pion_nano_final.pt")
    run_train(tmp_path / "ck", data_dir, tokenizer_path, "--resume", "auto", *args)
    return run_dir


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_a_non_finite_value_is_written_as_null_so_every_line_is_strict_json(tmp_path):
    log = trackers.RunLog(str(tmp_path))
    log.write(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}")) == \
        {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def write_steps(log, steps):
    for step in steps:
        log.write(step=step, loss=1.0 / step, tokens_seen=step * 128)


def test_resuming_drops_the_lines_past_the_resumed_step(tmp_path):
    write_steps(trackers.RunLog(str(tmp_path)), STEPS)
    write_steps(trackers.RunLog(str(tmp_path), resume_step=3), [4, 5, 6])
    assert [r["step"] for r in records(tmp_path)] == STEPS


def test_a_new_run_drops_the_lines_of_an_attempt_that_never_saved_a_checkpoint(tmp_path):
    write_steps(trackers.RunLog(str(tmp_path)), [1, 2])
    write_steps(trackers.RunLog(str(tmp_path), resume_step=0), [1])
    assert [r["step"] for r in records(tmp_path)] == [1]


def test_resuming_drops_a_torn_last_line(tmp_path):
    write_steps(trackers.RunLog(str(tmp_path)), [1, 2, 3])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    write_steps(trackers.RunLog(str(tmp_path), resume_step=3), [4])
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


def test_resuming_over_a_metrics_jsonl_with_a_binary_block_is_one_line_naming_it(tmp_path):
    write_steps(trackers.RunLog(str(tmp_path)), [1, 2])
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\xff\x93NUMPY\n" + trackers.json_line({"step": 3, "loss": 1.0}).encode())
    with pytest.raises(trackers.PionError, match=f"{tmp_path / 'metrics.jsonl'}:3 is not UTF-8 text"):
        trackers.RunLog(str(tmp_path), resume_step=2)


def test_older_runs_bare_nan_is_rewritten_as_null_when_resuming(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.5}\n')
    trackers.RunLog(str(tmp_path), resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": null}\n{"step": 2, "loss": 1.5}\n'


def test_other_ranks_write_nothing(tmp_path):
    log = trackers.RunLog(str(tmp_path), enabled=False, trackers=["tensorboard"], plot=True)
    write_steps(log, [1])
    log.write(step=1, val_loss=1.0)
    log.close()
    assert os.listdir(tmp_path) == []


def test_a_run_without_trackers_writes_no_tracker_state(tmp_path):
    write_steps(trackers.RunLog(str(tmp_path)), [1])
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_crashed_and_resumed_run_has_each_step_once_in_metrics_jsonl(data_dir, tmp_path, tokenizer_path):
    run_dir = run_crash_and_resume(tmp_path, data_dir, tokenizer_path)
    lines = records(run_dir)
    assert [r["step"] for r in lines if "loss" in r] == STEPS
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]


# ---------------------------------------------------------------------------------------------------
# --logger: flags


def test_an_unknown_tracker_is_one_line(data_dir, tmp_path, tokenizer_path):
    result = run_in_process(train.main, [*TINY_MODEL_FLAGS, "--data_dir", data_dir, "--logger", "mlflow"])
    assert_error_line(result, "must be one of tensorboard, wandb, trackio")


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_pip_command(data_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    result = run_in_process(train.main, [*TINY_MODEL_FLAGS, "--data_dir", data_dir, "--save_dir", tmp_path, "--logger", "wandb"])
    assert_error_line(result, "pip install wandb")
    assert not os.path.exists(tmp_path / "nano")


def test_a_corrupt_tracker_state_is_one_line(tmp_path):
    (tmp_path / "trackers.json").write_text("{not json")
    with pytest.raises(trackers.PionError, match="cannot read .*trackers.json"):
        trackers.RunLog(str(tmp_path), trackers=["tensorboard"], resume_step=3)


@pytest.mark.parametrize("state, wrong", [('{"open": 5}', '"open"'), ('{"logged_through": []}', '"logged_through"'),
                                          ('{"logged_through": {"wandb": "x"}}', '"logged_through"'),
                                          ('{"id": 7}', '"id"')])
def test_a_tracker_state_pion_did_not_write_is_one_line_naming_the_file_and_the_problem(tmp_path, state, wrong):
    path = tmp_path / "trackers.json"
    path.write_text(state)
    with pytest.raises(trackers.PionError, match=f"cannot read {path} .*{wrong}"):
        trackers.RunLog(str(tmp_path), trackers=["tensorboard"], resume_step=3)


# ---------------------------------------------------------------------------------------------------
# TensorBoard


def tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_metric_of_each_step_once_after_a_crash_and_resume(data_dir, tmp_path,
                                                                                   tokenizer_path):
    pytest.importorskip("tensorboard")
    run_dir = run_crash_and_resume(tmp_path, data_dir, tokenizer_path, "--logger", "tensorboard")
    scalars = tensorboard_scalars(run_dir)
    losses = train_losses(run_dir)
    assert [step for step, _ in scalars["loss"]] == STEPS
    assert [value for _, value in scalars["loss"]] == pytest.approx([losses[s] for s in STEPS], rel=1e-6)
    for tag in ("lr", "tokens_per_s", "grad_norm", "memory_gb", "tokens_seen"):
        assert [step for step, _ in scalars[tag]] == STEPS, tag
    for tag in ("val_loss", "val_bpb"):
        assert [step for step, _ in scalars[tag]] == [3, 6], tag


def test_tensorboard_records_the_runs_config_once(data_dir, tmp_path, tokenizer_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = run_crash_and_resume(tmp_path, data_dir, tokenizer_path, "--logger", "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("config/text_summary")
    assert len(texts) == 1
    config = json.loads(texts[0].tensor_proto.string_val[0].decode().strip("`\n"))
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 6 and config["trainer"] == "pretrain"


# ---------------------------------------------------------------------------------------------------
# Weights & Biases (offline)


def wandb_records(path):
    """The protobuf Records of a .wandb file. wandb 0.31 ships no Python reader for its offline run files (wandb-core
    writes them), so this reads their framing, LevelDB's log format behind a 7-byte ':W&B' header, and parses each
    record with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir, wait_seconds=30):
    """{run id: {"config": {...}, "history": [rows]}} of every offline wandb session of a run. wandb-core, a
    process of its own, may still be writing a finished run's file: it is read again until a run is in it."""
    deadline = time.monotonic() + wait_seconds
    while not (runs := wandb_runs_written(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return runs


def wandb_runs_written(run_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(record.run.run_id, {"config": {}, "history": []})
                run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in record.history.item})
    return runs


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # keep wandb's stdout capture off the in-process test run


def test_wandb_continues_the_same_run_without_repeating_a_step(data_dir, tmp_path, tokenizer_path, wandb_offline):
    run_dir = run_crash_and_resume(tmp_path, data_dir, tokenizer_path, "--logger", "wandb")
    assert len(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))) == 2  # two sessions ...
    runs = wandb_runs(run_dir)
    assert len(runs) == 1  # ... of one run
    rows = next(iter(runs.values()))["history"]
    assert sorted(row["_step"] for row in rows) == STEPS
    assert {row["_step"]: row["loss"] for row in rows} == pytest.approx(train_losses(run_dir), rel=1e-6)
    assert [row["_step"] for row in rows if "val_loss" in row] == [3, 6]


def test_wandb_records_the_runs_config(data_dir, tmp_path, tokenizer_path, wandb_offline):
    run_train(tmp_path, data_dir, tokenizer_path, "--logger", "wandb")
    config = next(iter(wandb_runs(tmp_path / "nano").values()))["config"]
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 6 and config["trainer"] == "pretrain"


# ---------------------------------------------------------------------------------------------------
# trackio (local)


@pytest.fixture
def trackio_store(tmp_path, monkeypatch):
    """A trackio local store of the test's own (TRACKIO_DIR), and trackio's reader pointed at it."""
    pytest.importorskip("trackio")
    from trackio import sqlite_storage
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", store)  # read when trackio is imported
    return sqlite_storage.SQLiteStorage


def run_train_process(save_dir, data_dir, tokenizer_path, *args):
    """run_train in a fresh process: trackio reads TRACKIO_DIR once, when it is imported."""
    flags = ["--data_dir", data_dir, "--save_dir", save_dir, "--seq_len", 32, "--batch_size", 4, "--max_steps", 6,
             "--log_interval", 1, "--eval_interval", 3, "--eval_steps", 2, "--save_interval", 3, "--num_workers", 0,
             "--warmup_steps", 2, "--lr", 3e-3, "--tokenizer", tokenizer_path, "--sample_tokens", 0]
    result = run_script("train.py", *TINY_MODEL_FLAGS, *flags, *args, env=dict(os.environ))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_trackio_continues_the_same_run_without_repeating_a_step(data_dir, tmp_path, tokenizer_path, trackio_store):
    run_train_process(tmp_path / "ck", data_dir, tokenizer_path, "--logger", "trackio")
    os.remove(tmp_path / "ck" / "nano" / "pion_nano_final.pt")  # the crash before the final save
    run_train_process(tmp_path / "ck", data_dir, tokenizer_path, "--logger", "trackio", "--resume", "auto")
    run_dir = tmp_path / "ck" / "nano"
    assert len(trackio_store.get_runs(trackers.PROJECT)) == 1
    name = trackio_store.get_runs(trackers.PROJECT)[0]
    logs = trackio_store.get_logs(trackers.PROJECT, name)
    assert sorted(row["step"] for row in logs if "loss" in row) == STEPS
    assert {row["step"]: row["loss"] for row in logs if "loss" in row} == pytest.approx(train_losses(run_dir),
                                                                                           rel=1e-6)
    assert sorted(row["step"] for row in logs if "val_loss" in row) == [3, 6]
    config = trackio_store.get_run_config(trackers.PROJECT, name)
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 6


# ---------------------------------------------------------------------------------------------------
# metrics.png


def test_a_training_run_draws_metrics_png_at_its_evals(data_dir, tmp_path, tokenizer_path):
    run_train(tmp_path, data_dir, tokenizer_path)
    with open(tmp_path / "nano" / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_end_of_a_run_redraws_metrics_png_with_the_lines_since_its_last_eval(tmp_path):
    log = trackers.RunLog(str(tmp_path), plot=True)
    write_steps(log, [1, 2])
    assert not os.path.exists(tmp_path / "metrics.png")  # drawn at evals, not at every line
    log.close()
    assert (tmp_path / "metrics.png").read_bytes().startswith(b"\x89PNG")


def test_a_plot_that_fails_warns_once_and_training_goes_on(data_dir, tmp_path, tokenizer_path, monkeypatch):
    import plotting

    def broken(*args):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plotting, "save_plot", broken)
    result = run_train(tmp_path, data_dir, tokenizer_path)
    assert result.stdout.count("warning: no ") == 1 and "no fonts; training goes on" in result.stdout
    assert load_checkpoint(tmp_path / "nano" / "pion_nano_final.pt")[1]["step"] == 6


def test_without_matplotlib_a_run_says_how_to_get_its_picture_once(data_dir, tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # importing it -> ImportError
    result = run_train(tmp_path, data_dir, tokenizer_path)
    assert result.stdout.count("pip install matplotlib") == 1
    assert not os.path.exists(tmp_path / "nano" / "metrics.png")
