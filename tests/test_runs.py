"""runs.py: a run's folder (lock, what a resume takes, nothing overwritten) and its Checkpointer (what a resumed
checkpoint must match, what it restores, what it says), on a tiny model without the scripts around them."""
import os

import pytest
import torch

import runs
import process
import train_config
import trainer
from cli import PionError
from conftest import tiny_model

PREFIX = "pion_nano"


def config(**settings):
    return train_config.TrainConfig(**{"max_steps": 4, "lr": 1e-3, "min_lr": 0, "warmup_steps": 0, "batch_size": 2,
                                       "seq_len": 8, **settings})


def batches():
    while True:
        ids = torch.randint(3, 101, (2, 8))
        yield {"input_ids": ids, "labels": ids}


def saved_step(run_dir, contents=None, final=False, **settings):
    """A checkpoint of a tiny run after one optimizer step, saved by its Checkpointer; -> its path."""
    os.makedirs(run_dir, exist_ok=True)
    rt, run_config = process.Runtime("cpu"), config(**settings)
    checkpointer = runs.Checkpointer(str(run_dir), PREFIX, rt, seed=run_config.seed)
    model = tiny_model()
    optimizers = trainer.build_optimizer(model, run_config, rt)
    state = checkpointer.load(model, optimizers, run_config, contents or {"data": {"shards": 2}})
    trainer.train_step(model, optimizers, batches(), rt, 1, 1.0, 1.0)
    state.step, state.samples_seen = 1, 2
    return checkpointer.save(state, final)


def resume(path, contents=None, **settings):
    """A Checkpointer resuming `path` into its own folder: -> (checkpointer, model, optimizers, state)."""
    rt, run_config = process.Runtime("cpu"), config(**settings)
    checkpointer = runs.Checkpointer(os.path.dirname(path), PREFIX, rt, path, run_config.seed)
    model = checkpointer.resumed_model()
    optimizers = trainer.build_optimizer(model, run_config, rt)
    state = checkpointer.load(model, optimizers, run_config, contents or {"data": {"shards": 2}})
    return checkpointer, model, optimizers, state


def folder(path):
    return {name: os.path.getmtime(os.path.join(path, name)) for name in os.listdir(path)}


# ---------------------------------------------------------------------------------------------------
# The run folder


def test_resume_auto_picks_the_highest_step_not_the_newest_file(tmp_path):
    for name, mtime in [("pion_nano_29.pt", 100), ("pion_nano_9.pt", 300), ("pion_nano_final.pt", 50),
                        ("pion_nano_100.pt", 200)]:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (mtime, mtime))
    assert runs.find_resume_checkpoint(str(tmp_path), PREFIX) == str(tmp_path / "pion_nano_final.pt")
    os.remove(tmp_path / "pion_nano_final.pt")
    assert runs.find_resume_checkpoint(str(tmp_path), PREFIX) == str(tmp_path / "pion_nano_100.pt")


def test_a_run_that_ends_removes_its_lock_file(tmp_path):
    with runs.open_run_dir(str(tmp_path / "run"), PREFIX, None):
        assert os.path.exists(tmp_path / "run" / ".lock")
        (tmp_path / "run" / "pion_nano_1.pt").write_bytes(b"")
    assert os.listdir(tmp_path / "run") == ["pion_nano_1.pt"]


def test_a_run_that_fails_before_writing_leaves_no_folder_it_created(tmp_path):
    with pytest.raises(PionError):
        with runs.open_run_dir(str(tmp_path / "new" / "run"), PREFIX, None):
            raise PionError("a tracker could not start")
    assert os.listdir(tmp_path) == []


def test_a_run_refused_by_the_lock_leaves_the_holders_lock_file(tmp_path):
    with runs.open_run_dir(str(tmp_path), PREFIX, None):
        with pytest.raises(PionError, match="another run is writing to"):
            with runs.open_run_dir(str(tmp_path), PREFIX, None):
                pass
        assert os.path.exists(tmp_path / ".lock")


def test_a_lock_taken_on_a_lock_file_its_run_removed_is_taken_again_on_the_new_one(tmp_path):
    """A run that ends removes .lock while holding it; a second run that opened the old file just before must
    not count that lock, or a third run could lock a new .lock beside it."""
    (tmp_path / ".lock").write_bytes(b"")
    stale = open(tmp_path / ".lock", "a")
    os.remove(tmp_path / ".lock")
    locked = runs.lock_run_dir(stale, str(tmp_path / ".lock"), str(tmp_path))
    try:
        assert os.stat(tmp_path / ".lock").st_ino == os.fstat(locked.fileno()).st_ino
    finally:
        locked.close()


def test_a_new_run_never_writes_into_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "pion_nano_3.pt").write_bytes(b"")
    with pytest.raises(PionError, match="already holds pion_nano checkpoints"):
        with runs.open_run_dir(str(tmp_path), PREFIX, None):
            pass


# ---------------------------------------------------------------------------------------------------
# The Checkpointer


def test_a_checkpoint_records_the_optimizer_that_trained_it(tmp_path):
    path = saved_step(tmp_path, optimizer="muon")
    assert torch.load(path, weights_only=False)["train_config"]["optimizer"] == "muon"


def test_resuming_with_the_other_optimizer_is_refused_in_one_line(tmp_path):
    path = saved_step(tmp_path, optimizer="adamw")
    before = folder(tmp_path)
    with pytest.raises(PionError, match="trained with --optimizer adamw, not muon: .*--allow_optimizer_change") as e:
        resume(path, optimizer="muon")
    assert "\n" not in str(e.value) and folder(tmp_path) == before


def test_allow_optimizer_change_starts_the_new_optimizers_state_from_zero_and_says_so(tmp_path, capsys):
    path = saved_step(tmp_path, optimizer="adamw")
    _, _, optimizers, state = resume(path, optimizer="muon", allow_optimizer_change=True)
    assert state.step == 1 and all(not optimizer.state for optimizer in optimizers)
    assert "muon's state (AdamW's moments, Muon's momentum) starts from zero" in capsys.readouterr().out


def test_muons_momentum_is_restored_exactly(tmp_path):
    path = saved_step(tmp_path, optimizer="muon")
    saved = torch.load(path, weights_only=False)["optimizer"]["state"]
    _, model, optimizers, _ = resume(path, optimizer="muon")
    muon = optimizers[1]
    names = {id(p): n for n, p in model.named_parameters()}
    restored = {names[id(p)]: s["momentum_buffer"] for p, s in muon.state.items()}
    assert restored and all(torch.equal(buffer, saved[name]["momentum_buffer"]) for name, buffer in restored.items())


def test_muon_momentum_of_the_wrong_shape_is_refused(tmp_path):
    path = saved_step(tmp_path, optimizer="muon")
    contents = torch.load(path, weights_only=False)
    state = contents["optimizer"]["state"]["layers.0.ffn.w1.weight"]
    state["momentum_buffer"] = state["momentum_buffer"][:3].clone()
    torch.save(contents, path)
    with pytest.raises(PionError, match="momentum_buffer of layers.0.ffn.w1.weight is \\(3, "):
        resume(path, optimizer="muon")


def test_a_data_entry_that_is_not_a_dict_is_refused_in_one_line(tmp_path):
    path = saved_step(tmp_path, contents={"data": "shards"})
    with pytest.raises(PionError, match="corrupt 'data' entry \\(a str"):
        resume(path)


def test_resuming_with_another_seed_warns_that_the_data_is_reordered(tmp_path, capsys):
    path = saved_step(tmp_path)
    resume(path, seed=7)
    assert "seed 42 -> 7" in capsys.readouterr().out.replace("\n", " ")


def test_a_checkpoint_without_a_data_position_assumes_this_runs_batch_layout(tmp_path):
    path = saved_step(tmp_path)
    contents = torch.load(path, weights_only=False)
    del contents["samples_seen"]
    torch.save(contents, path)
    assert resume(path, grad_accum=3)[3].samples_seen == 1 * 2 * 3


def test_the_final_checkpoint_of_a_finished_run_restores_nothing_and_changes_nothing(tmp_path, capsys):
    path = saved_step(tmp_path, final=True, max_steps=1)
    before = folder(tmp_path)
    checkpointer, _, optimizers, state = resume(path, max_steps=1)
    assert checkpointer.finished and state.step == 1 and not any(o.state for o in optimizers)
    assert "finished run" in capsys.readouterr().out and folder(tmp_path) == before


def test_a_finished_runs_final_checkpoint_is_kept_under_its_step_once_the_run_begins(tmp_path):
    path = saved_step(tmp_path, final=True, max_steps=1, keep_final_optimizer=True)
    checkpointer, *_ = resume(path, max_steps=4)
    assert os.listdir(tmp_path) == ["pion_nano_final.pt"]  # loading checks and restores; it renames nothing
    checkpointer.begin()
    assert os.listdir(tmp_path) == ["pion_nano_1.pt"] and checkpointer.last_path == str(tmp_path / "pion_nano_1.pt")


def test_a_refused_resume_leaves_the_model_and_the_optimizer_as_they_were(tmp_path):
    path = saved_step(tmp_path)
    contents = torch.load(path, weights_only=False)
    del contents["optimizer"]["state"]["norm.weight"]["exp_avg"]
    torch.save(contents, path)
    rt, run_config = process.Runtime("cpu"), config()
    checkpointer = runs.Checkpointer(str(tmp_path), PREFIX, rt, str(path), run_config.seed)
    model = checkpointer.resumed_model()
    optimizers = trainer.build_optimizer(model, run_config, rt)
    rng = torch.get_rng_state()
    with pytest.raises(PionError, match="does not fit the model"):
        checkpointer.load(model, optimizers, run_config, {})
    assert not optimizers[0].state and torch.equal(torch.get_rng_state(), rng)
