"""A training run's folder, checkpoints and state (TrainState), and the rules that keep them safe: one run per
folder (a lock), nothing overwritten, which checkpoint a resume takes, what it must match (the model, the data,
the optimizer and its state's shapes), what is pruned. The Checkpointer is the one owner of a resume and of the
saves: the weights, the optimizers' state (AdamW, Muon), every rank's RNG and the data position."""
import contextlib
import dataclasses
import fcntl
import glob
import os
import re
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from cli import PionError, first_line
from files import remove_leftovers
from process import gather_rng_states, seed_everything, set_rng_state

# ----------------------------------------------------------------------------------------------------
# The step checkpoints of a training run: <prefix>_<step>.pt and <prefix>_final.pt in one folder


def run_checkpoints(directory, prefix):
    """The checkpoints of a run, `<prefix>_<step>.pt` by step and `<prefix>_final.pt` last: resume order by
    what the files are, not by their times (a copied folder gets new times in any order)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"{prefix}_*.pt")):
        match = re.fullmatch(re.escape(prefix) + r"_(\d+|final)\.pt", os.path.basename(path))
        if match:
            found.append((float("inf") if match.group(1) == "final" else int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def step_checkpoints(directory, prefix):
    """Step checkpoints `<prefix>_<step>.pt` in the directory, oldest step first."""
    return [path for path in run_checkpoints(directory, prefix) if not path.endswith("_final.pt")]


def find_resume_checkpoint(directory, prefix):
    """The newest complete checkpoint (saves are atomic, so any file under a final name is complete)."""
    paths = run_checkpoints(directory, prefix)
    return paths[-1] if paths else None


@contextlib.contextmanager
def open_run_dir(directory, prefix, resume, lock=True):
    """with open_run_dir(...) as resume_path: the folder a run writes its checkpoints to, for the run's life.

    resume: None (a new run), "auto" (the newest checkpoint in the folder, if any) or a path; yields the
    checkpoint to resume, or None. An OS lock on the folder (dropped by the kernel when the process dies,
    even by kill -9) keeps a second run from writing into it; the run removes the file when it ends. A new
    run never writes into a folder that holds checkpoints, and a resumed one only into its own folder or an
    empty one: nothing is overwritten.
    A run that fails before writing anything leaves no empty folder behind, nor the parents it created."""
    created = outermost_missing_folder(directory)
    lock_path, held = os.path.join(directory, ".lock"), False
    try:
        os.makedirs(directory, exist_ok=True)
        lock_file = open(lock_path, "a") if lock else contextlib.nullcontext()
    except OSError as e:
        raise PionError(f"cannot write to save dir {directory}: {e.strerror}")
    try:
        if lock:
            lock_file, held = lock_run_dir(lock_file, lock_path, directory), True
            remove_leftovers(directory, f"{prefix}_*.pt", all_stale=True)  # saves a crash cut short
        yield resume_checkpoint(directory, prefix, resume)
    except BaseException:
        if held:
            remove_lock(lock_path)
        if created and not os.listdir(directory):
            path = os.path.abspath(directory)
            while True:  # the run's folder, then each parent this run created, while they are empty
                if os.listdir(path):
                    break
                os.rmdir(path)
                if path == created:
                    break
                path = os.path.dirname(path)
        raise
    else:
        if held:
            remove_lock(lock_path)  # a run that ended leaves no lock file behind
    finally:
        if lock:
            lock_file.close()


def lock_run_dir(lock_file, lock_path, directory):
    """lock_file, locked; or a PionError when another run holds it. A run that ends removes .lock while it
    holds it: a lock taken on the removed file (opened just before) locks nothing, so it is taken again on the
    file now at lock_path."""
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise PionError(f"another run is writing to {directory} (it holds {directory}/.lock); wait "
                            f"for it to end or choose another --save_dir")
        try:
            if os.stat(lock_path).st_ino == os.fstat(lock_file.fileno()).st_ino:
                return lock_file
        except FileNotFoundError:
            pass
        lock_file.close()
        lock_file = open(lock_path, "a")


def remove_lock(lock_path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path)


def outermost_missing_folder(directory):
    """The first folder on the way down to `directory` that does not exist yet, or None if it does."""
    missing = None
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def resume_checkpoint(directory, prefix, resume):
    existing = find_resume_checkpoint(directory, prefix)
    if resume == "auto":
        return existing
    if resume is None and existing:
        raise PionError(f"{directory} already holds {prefix} checkpoints from an earlier run; pass --resume auto "
                        f"to continue it, or choose another --save_dir")
    if resume is not None and existing and \
            os.path.dirname(os.path.abspath(resume)) != os.path.abspath(directory):
        raise PionError(f"{directory} holds the checkpoints of another run, which resuming {resume} would "
                        f"overwrite; resume into its own folder or an empty --save_dir")
    if resume is not None and existing and os.path.abspath(resume) != os.path.abspath(existing):
        raise PionError(f"{directory} holds checkpoints past {os.path.basename(resume)} (up to "
                        f"{os.path.basename(existing)}), which resuming it there would overwrite; resume it into "
                        f"an empty --save_dir")
    return resume


def keep_final_as_step_checkpoint(path, directory, prefix, step):
    """A run continued from its own <prefix>_final.pt would replace that file when it ends: the finished run's
    model is kept under its step's name instead, as the step checkpoint it is. Returns where it now is."""
    final = os.path.join(directory, f"{prefix}_final.pt")
    as_step = os.path.join(directory, f"{prefix}_{step}.pt")
    if os.path.abspath(path) == os.path.abspath(final) and not os.path.exists(as_step):
        os.replace(final, as_step)
        return as_step
    return path


def prune_checkpoints(directory, prefix, keep_last, keep=None):
    """Remove all but the newest keep_last step checkpoints, and never `keep` (a path)."""
    if keep_last:
        for path in step_checkpoints(directory, prefix)[:-keep_last]:
            if keep is None or os.path.abspath(path) != os.path.abspath(keep):
                os.remove(path)


# ----------------------------------------------------------------------------------------------------
# Checkpoints of a run


@dataclasses.dataclass
class TrainState:
    """Where a run is: restored on resume, saved in every checkpoint, returned by train()."""
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    stopped_by: Optional[str] = None  # the signal that stopped the run early, if one did

    @property
    def finished(self):
        return self.stopped_by is None


class Checkpointer:
    """The one owner of a run's checkpoints once open_run_dir has chosen the one to resume: it seeds the process,
    reads that checkpoint once, checks it against this run before anything in the run folder changes, restores
    the weights' optimizer state (AdamW's moments, Muon's momentum), each rank's RNG and the data position into
    a TrainState, and saves the run's checkpoints.

        checkpointer = Checkpointer(run_dir, prefix, rt, resume, seed)  # resume: a path, or None
        model = checkpointer.resumed_model()  # when resuming: the checkpoint's weights
        state = checkpointer.load(model, optimizers, config, contents)  # after the model is wrapped
        checkpointer.save(state, final=False)
    """

    def __init__(self, run_dir, prefix, rt, resume=None, seed=0):
        self.run_dir, self.prefix, self.rt = run_dir, prefix, rt
        self.resume_path, self.resumed = resume, None  # the checkpoint to continue and, once read, its contents
        self.last_path = None  # the newest checkpoint of this run
        self.finished = False  # the resumed checkpoint ends a finished run: load() restored nothing
        self.seed = seed
        seed_everything(seed)  # the weights of a new model

    def resumed_model(self):
        """The resumed checkpoint's model (fp32, on the CPU); the rest of the file is kept for load()."""
        model, self.resumed = load_checkpoint(self.resume_path)
        return model

    def load(self, model, optimizers, config, contents):
        """The TrainState to start from. model (possibly wrapped) and optimizers (trainer.build_optimizer's list)
        take the checkpoint's state; config is this run's TrainConfig and contents what its checkpoints record
        besides the state (its "data" entry is compared with the checkpoint's). Every check that can refuse
        runs before anything is restored; a new run seeds each rank's own stream (its dropout masks)."""
        self.model, self.optimizers, self.config, self.contents = model, optimizers, config, contents
        rt = self.rt
        if self.resume_path is None:
            torch.manual_seed(self.seed + 1_000_003 * rt.rank)
            return TrainState()
        path, checkpoint = self.resume_path, self.resumed
        check_same_data(path, checkpoint, contents.get("data"), config)
        try:
            step = int(checkpoint.get("step", 0))
            # Checkpoints from before data positions were saved: assume this run's batch layout.
            samples = checkpoint.get("samples_seen", step * config.batch_size * config.grad_accum * rt.world_size)
            state = TrainState(step, int(checkpoint.get("tokens_seen", 0)), int(samples))
        except (TypeError, ValueError):
            raise PionError(f"{path} has a corrupt step or token count")
        self.finished = path.endswith("_final.pt") and state.step >= config.max_steps
        if self.finished:
            rt.print(f"{path} is the end of a finished run (step {state.step}, --max_steps {config.max_steps}): "
                     f"nothing to train and nothing changed; pass a larger --max_steps to train it further")
            return state
        restore, warning = optimizer_state_to_restore(path, checkpoint, config)
        if restore:
            check_optimizer_state(path, checkpoint["optimizer"], model, optimizers)
        rt.print(f"resuming from {path} at step {state.step}")
        if warning:
            rt.print(f"warning: {warning}")
        warn_flag_changes(path, checkpoint, config, rt)
        if restore:
            restore_optimizer(path, checkpoint.pop("optimizer"), model, optimizers)  # popped: free the copy
        restore_rng(path, checkpoint.get("rng"), rt)
        self.last_path, self.resumed_step = path, state.step
        return state

    def begin(self):
        """Every check passed and the run starts (trackers included): from here on it may change its folder. A
        run continued from its own _final.pt would replace that file when it ends, so the finished run's model
        is first kept under its step's name, as the step checkpoint it is."""
        if self.last_path is not None and self.rt.is_main:
            self.last_path = keep_final_as_step_checkpoint(self.last_path, self.run_dir, self.prefix,
                                                           self.resumed_step)

    def save(self, state, final):
        """<prefix>_<step>.pt (with the optimizer state, to resume) or, final, <prefix>_final.pt (with it only
        under --keep_final_optimizer), written by rank 0 with every rank's part; returns its path."""
        contents = {"config": getattr(self.model, "module", self.model).config, "train_config":
                    dataclasses.asdict(self.config), **self.contents, "step": state.step,
                    "tokens_seen": state.tokens_seen, "samples_seen": state.samples_seen}
        keep_optimizer = not final or self.config.keep_final_optimizer
        path = os.path.join(self.run_dir, f"{self.prefix}_{'final' if final else state.step}.pt")
        save_training_checkpoint(path, self.model, self.optimizers if keep_optimizer else None, self.rt, contents)
        self.last_path = path
        return path


def training_checkpoint(model, optimizers, rt, contents):
    """A run's checkpoint dict, in host memory on rank 0 (None on the others): every rank takes part (FSDP
    gathers shards). optimizers (trainer.build_optimizer's list) None leaves the optimizer state out; their
    states are saved as one, keyed by parameter name, as AdamW's alone always was."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizers is not None:
        contents = {**contents, "optimizer": get_optimizer_state_dict(model, optimizers, options=options)}
    rng_states = gather_rng_states(rt)
    return {"model": model_state, "rng": rng_states, **contents} if rt.is_main else None


def save_training_checkpoint(path, model, optimizers, rt, contents):
    """training_checkpoint, written atomically by rank 0."""
    checkpoint = training_checkpoint(model, optimizers, rt, contents)
    if rt.is_main:
        save_checkpoint(path, checkpoint)
        rt.print(f"saved {path}")
    if rt.distributed:
        dist.barrier()


def optimizer_state_to_restore(path, checkpoint, config):
    """(restore it?, a warning or None): a checkpoint records the optimizer that trained it (in its train_config;
    AdamW before Muon existed). Continuing with the other one starts every parameter's state from zero, so it
    is refused unless --allow_optimizer_change asks for it."""
    saved = (checkpoint.get("train_config") or {}).get("optimizer", "adamw")
    if saved != config.optimizer:
        if not config.allow_optimizer_change:
            raise PionError(f"{path} was trained with --optimizer {saved}, not {config.optimizer}: resume it with "
                            f"--optimizer {saved}, or pass --allow_optimizer_change to start {config.optimizer} "
                            f"from zero state")
        return False, (f"{path} was trained with --optimizer {saved}: {config.optimizer}'s state (AdamW's moments, "
                       f"Muon's momentum) starts from zero")
    if "optimizer" not in checkpoint:
        return False, (f"{path} holds no optimizer state (a _final.pt keeps it only with --keep_final_optimizer): "
                       f"the optimizer's moments start again from zero")
    return True, None


def restore_optimizer(path, saved, model, optimizers):
    """The optimizers' state (checked by check_optimizer_state) into the wrapped model's, possibly sharded, one.
    The hyperparameters stay this run's: loading a state dict also loads the saved groups' weight decay."""
    param_groups = lambda: [group for optimizer in optimizers for group in optimizer.param_groups]
    groups = [{k: v for k, v in group.items() if k != "params"} for group in param_groups()]
    try:
        set_optimizer_state_dict(model, optimizers, saved, options=StateDictOptions(full_state_dict=True))
    except Exception as e:
        raise PionError(f"cannot restore the optimizer from {path} ({first_line(e)})")
    for group, hyperparameters in zip(param_groups(), groups):  # loading replaced the group dicts
        group.update(hyperparameters)


def restore_rng(path, states, rt):
    """Each rank's RNG as the checkpoint's run had it (its dropout masks continue)."""
    if isinstance(states, dict):
        states = [states]  # checkpoints before per-rank states kept rank 0's alone
    if states:
        try:
            set_rng_state(states[rt.rank] if len(states) == rt.world_size else states[0], rt.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise PionError(f"{path} has a corrupt RNG state ({first_line(e)})")


# The tensors each optimizer keeps per parameter, and which of them have the parameter's shape.
OPTIMIZER_STATE = {torch.optim.AdamW: ({"step", "exp_avg", "exp_avg_sq"}, ("exp_avg", "exp_avg_sq")),
                   torch.optim.Muon: ({"momentum_buffer"}, ("momentum_buffer",))}


def check_optimizer_state(path, saved, model, optimizers):
    """Refuse optimizer state that does not fit the model and its optimizers before anything loads it: fused
    AdamW trusts every moment to have its parameter's shape and writes past a smaller buffer (a crash, or
    worse, from a downloaded file). Every parameter is listed once, and each has all of its optimizer's
    tensors (AdamW's moments, or Muon's momentum) or none (a run that has not stepped yet)."""
    params = clean_state_dict(dict(model.named_parameters()))
    owner = {id(p): type(optimizer) for optimizer in optimizers for group in optimizer.param_groups
             for p in group["params"]}
    names = {kind.__name__ for kind in owner.values()}

    def refuse(problem):
        raise PionError(f"{path} has optimizer state that does not fit the model: {problem}")

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or \
            not isinstance(saved.get("param_groups"), list) or not all(isinstance(g, dict) for g in saved["param_groups"]):
        refuse("expected 'state' and 'param_groups'")
    listed = [name for group in saved["param_groups"] for name in group.get("params", [])]
    if sorted(map(str, listed)) != sorted(params):
        refuse(f"its groups list {len(listed)} parameters, the model has {len(params)}")
    if saved["state"] and set(saved["state"]) != set(params):
        refuse(f"it has moments for {len(saved['state'])} of the model's {len(params)} parameters")
    for name, entry in saved["state"].items():
        param = params[name]
        kind = owner[id(param)]
        expected, shaped = OPTIMIZER_STATE[kind]
        if not isinstance(entry, dict) or set(entry) != expected or \
                not all(isinstance(t, torch.Tensor) for t in entry.values()):
            refuse(f"{name} has {sorted(entry) if isinstance(entry, dict) else type(entry).__name__}, expected "
                   f"{kind.__name__}'s tensors {sorted(expected)} ({' and '.join(sorted(names))} train this run)")
        if "step" in entry and entry["step"].numel() != 1:
            refuse(f"the step of {name} is not one number")
        for key in shaped:
            tensor = entry[key]
            if tensor.shape != param.shape or tensor.dtype != param.dtype:
                refuse(f"{key} of {name} is {tuple(tensor.shape)} {tensor.dtype}, the parameter is "
                       f"{tuple(param.shape)} {param.dtype}")


RESUME_FLAGS = ("max_steps", "lr", "min_lr", "warmup_steps", "schedule", "decay_frac", "weight_decay", "muon_lr",
                "grad_clip", "batch_size", "grad_accum", "seed")


def warn_flag_changes(path, checkpoint, config, rt):
    """Resuming with other schedule flags (a longer run, another lr) is how a run is extended, so it is allowed;
    but it moves the learning rate from where the checkpoint's run had it, and another seed reorders the data
    from the middle of an epoch on, so it is said."""
    saved = checkpoint.get("train_config")
    saved = saved if isinstance(saved, dict) else {}
    changed = [f"{key} {saved[key]} -> {getattr(config, key)}" for key in RESUME_FLAGS
               if key in saved and saved[key] != getattr(config, key)]
    if changed:
        reorder = "; the new seed also reorders the data from here on" if "seed" in saved and \
            saved["seed"] != config.seed else ""
        rt.print(f"warning: resuming {path} with other training flags than its run's ({', '.join(changed)}); "
                 f"the schedule from step {checkpoint.get('step', 0)} on follows the new ones{reorder}")


def check_same_data(path, checkpoint, data_identity, config):
    """Resuming on other data (shards added or removed, another seq_len) silently changes which samples
    come next: refuse it unless the user asks for it."""
    saved = checkpoint.get("data")
    if saved is None or data_identity is None or config.allow_data_change:
        return
    if not isinstance(saved, dict):
        raise PionError(f"{path} has a corrupt 'data' entry (a {type(saved).__name__}, not what the data was): its "
                        f"data cannot be checked; pass --allow_data_change to resume it anyway")
    # What both record: a checkpoint from before a field was added is compared on the fields it has.
    changed = []
    for key in sorted(set(saved) & set(data_identity)):
        before, now = saved[key], data_identity[key]
        if isinstance(before, dict) and isinstance(now, dict):  # per shard: name the ones that changed
            changed += [f"{key} of {name}" for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        elif before != now:
            changed.append(f"{key} {before!r:.60} -> {now!r:.60}")
    if not changed:
        return
    changed = ", ".join(changed)
    raise PionError(f"the training data differs from what {path} was trained on ({changed}); pass "
                    f"--allow_data_change to resume on it anyway")


def check_same_model(path, checkpoint_config, asked):
    """Resuming with other model flags would train one model under another's name: refuse it."""
    differ = [f"{f.name} {getattr(checkpoint_config, f.name)!r} (flags: {getattr(asked, f.name)!r})"
              for f in dataclasses.fields(asked) if getattr(checkpoint_config, f.name) != getattr(asked, f.name)]
    if differ:
        raise PionError(f"{path} is a different model than --model_size/--override/--no_soft_cap ask for: "
                        f"{', '.join(differ)}; resume it with the flags it was trained with")


def is_sft_checkpoint(checkpoint):
    # Checkpoints before "trainer" was saved stored finetune.py's flags, which include --checkpoint.
    return checkpoint.get("trainer") == "sft" or "checkpoint" in checkpoint.get("args", {})
