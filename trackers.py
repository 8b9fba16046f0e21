"""Where a training run's metrics go: <run_dir>/metrics.jsonl always, plus each experiment tracker chosen with
--logger (TensorBoard, Weights & Biases, trackio) and, optionally, a <run_dir>/metrics.png redrawn at each eval
(plotting.py reads metrics.jsonl back and draws it).

Only the process that writes checkpoints (global rank 0) opens any of them. A resumed run continues the same
tracker run: its id is kept in <run_dir>/trackers.json, and no step reaches a tracker twice.
"""
import argparse
import importlib.util
import json
import math
import os
import secrets

import plotting
from cli import PionError, first_line
from files import atomic_write

# --logger NAME -> (module to import, what to pip install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}
PROJECT = "pion"  # the trackio project, and wandb's unless WANDB_PROJECT names another


def tracker_name(text):
    """argparse type of --logger: a known tracker whose package is installed, checked before anything is loaded."""
    if text not in TRACKERS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(TRACKERS)}, got {text!r}")
    module, package = TRACKERS[text]
    if importlib.util.find_spec(module) is None:
        raise argparse.ArgumentTypeError(f"{text} is not installed: pip install {package}")
    return text


def add_logger_args(parser):
    parser.add_argument("--logger", type=tracker_name, action="append", default=[], metavar="TRACKER",
                        help=f"also log metrics to {', '.join(TRACKERS)} (repeatable; default: metrics.jsonl only)")


def finite_or_none(value):
    """NaN and infinities are not JSON: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_line(record):
    """A record as one line of strict JSON (a non-finite number as null)."""
    return json.dumps({key: finite_or_none(value) for key, value in record.items()}, allow_nan=False) + "\n"


def read_tracker_state(path):
    """trackers.json as Pion writes it: {"id": str, "open": [tracker, ...], "logged_through": {tracker: step}},
    any key may be missing. Anything else is a PionError naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        if not isinstance(state.get("id", ""), str):
            raise ValueError('"id" is not a string')
        if not isinstance(state.get("open", []), list) or not all(isinstance(t, str) for t in state.get("open", [])):
            raise ValueError('"open" is not a list of tracker names')
        logged_through = state.get("logged_through", {})
        if not isinstance(logged_through, dict) or not all(
                isinstance(step, int) and not isinstance(step, bool) and step >= 0 for step in logged_through.values()):
            raise ValueError('"logged_through" is not an object of tracker names and steps')
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PionError(f"cannot read {path} ({first_line(e)}): move it away to start new tracker runs")
    return state


class RunLog:
    """One run's metrics: write(**record) sends a step's record to each tracker, then appends it to
    metrics.jsonl. On other ranks than the main one (enabled=False) it does nothing.

    resume_step: the step of the checkpoint a resumed run continues (0 for a new run in a folder that may hold
    an earlier, never-saved attempt): metrics.jsonl keeps only the lines up to it, as the run replays the rest.
    config: recorded once, when the tracker run is created. say: prints a line to the user."""

    def __init__(self, run_dir, enabled=True, trackers=(), resume_step=0, config=None, plot=False, say=print):
        self.enabled, self.say = enabled, say
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.plot_path = os.path.join(run_dir, "metrics.png") if plot else None
        self.trackers, self.sent, self.undrawn = [], (None, set()), False
        if not enabled:
            return
        # Everything that can refuse (an unreadable metrics.jsonl or trackers.json, a tracker that cannot start)
        # runs before anything in the run folder is written: a refused run changes nothing there.
        records = plotting.read_records(self.path) if os.path.exists(self.path) else []
        logged = max((r["step"] for r in records), default=0)
        state_path = os.path.join(run_dir, "trackers.json")
        state = read_tracker_state(state_path) if resume_step and os.path.exists(state_path) else {}
        # A resumed run replays the steps after its checkpoint bit for bit. Those that an earlier session already
        # sent to a tracker (up to the last line it wrote to metrics.jsonl, which follows the trackers) are not
        # sent again: wandb and trackio cannot take a step back.
        logged_through = state.get("logged_through", {})
        for tracker in state.get("open", []):
            logged_through[tracker] = max(logged_through.get(tracker, 0), logged)
        trackers = list(dict.fromkeys(trackers))  # --logger wandb twice is one wandb run
        state = {"id": state.get("id") or secrets.token_hex(4), "open": trackers, "logged_through": logged_through}
        name = f"{os.path.basename(os.path.normpath(run_dir))}-{state['id']}"
        kinds = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
        for tracker in trackers:
            try:
                self.trackers.append(kinds[tracker](run_dir, state["id"], name, resume_step,
                                                    logged_through.get(tracker, 0),
                                                    config if tracker not in logged_through else None))
            except Exception as e:  # a tracker that cannot start (bad credentials, a full disk) stops the run now
                self.close()
                raise PionError(f"--logger {tracker} could not start: {first_line(e)}")
        if trackers or os.path.exists(state_path):  # a run that never used a tracker has no state file
            atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
        if os.path.exists(self.path):
            # Only the lines up to the resumed step stay (rewritten through a temp file: a crash now leaves the
            # old file); also drops a torn last line.
            kept = [r for r in records if r["step"] <= resume_step]
            atomic_write(self.path, lambda f: f.writelines(json_line(record).encode() for record in kept))

    def write(self, **record):
        if not self.enabled:
            return
        record = {key: finite_or_none(value) for key, value in record.items()}
        # A step's eval line repeats its tokens_seen: trackers get each value of a step once.
        if self.sent[0] != record["step"]:
            self.sent = (record["step"], set())
        new = {key: value for key, value in record.items() if key == "step" or key not in self.sent[1]}
        self.sent[1].update(new)
        for tracker in self.trackers:
            tracker.log(new)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(record))
        self.undrawn = True
        if "val_loss" in record:
            self.draw()

    def draw(self):
        """metrics.png of this run. Plotting is a convenience: when it fails, training goes on, said once."""
        if not self.plot_path:
            return
        self.undrawn = False
        try:
            plotting.save_plot([os.path.dirname(self.path)], self.plot_path)
        except Exception as e:
            self.say(f"warning: no {self.plot_path}: {first_line(e)}; training goes on without it")
            self.plot_path = None

    def close(self):
        """The end of the run (finished, stopped or failed): the picture catches up with the last lines."""
        if self.undrawn:
            self.draw()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def scalars(record):
    """The record's numbers, by name, without the step (None: a non-finite value, not sent)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    """Event files in <run_dir>/tensorboard/. TensorBoard can take a step back: a purge marker at the resumed
    step hides what an earlier session logged past it, and the replayed steps are logged again."""

    def __init__(self, run_dir, run_id, name, resume_step, logged_through, config):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)
        if config is not None:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```", 0)

    def log(self, record):
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self):
        self.writer.close()


class AppendOnlyTracker:
    """A tracker that cannot take a step back (wandb, trackio): the steps an earlier session of the run already
    sent (up to logged_through) are not sent again when a resumed run replays them."""

    def log(self, record):
        if record["step"] > self.logged_through:
            self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class WandB(AppendOnlyTracker):
    """A wandb run under <run_dir>/wandb/ (WANDB_MODE=offline keeps it there until `wandb sync`)."""

    def __init__(self, run_dir, run_id, name, resume_step, logged_through, config):
        import wandb
        self.logged_through = logged_through
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, name=name,
                              resume="allow", dir=run_dir, config=config)


class Trackio(AppendOnlyTracker):
    """A trackio run in its local store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio)."""

    def __init__(self, run_dir, run_id, name, resume_step, logged_through, config):
        import trackio
        self.logged_through = logged_through
        self.run = trackio.init(project=PROJECT, name=name, resume="allow", config=config)
