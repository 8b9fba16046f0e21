"""Pictures of training runs from their metrics.jsonl: loss (raw and smoothed), validation loss and bits per
byte, learning rate, tokens/s and each eval/<task>/<metric>, against tokens seen, several runs overlaid.
trackers.py writes metrics.jsonl; this module reads it back (read_records) and draws it.

matplotlib's object API and Agg canvas, never pyplot: drawing needs no display and changes no global
backend, so a training run can draw between steps.
"""
import math
import os

from cli import PionError
from files import atomic_write
from jsonl import jsonl_objects

SMOOTHING = 0.9  # the progress bar's moving average of the loss, for runs of 100 logged steps or more
# (panel title, the record key it shows); eval/... panels follow, one per metric the runs hold
PANELS = [("training loss", "loss"), ("validation loss", "val_loss"), ("validation bits per byte", "val_bpb"),
          ("learning rate", "lr"), ("tokens/s", "tokens_per_s")]


def read_records(path):
    """The records of a metrics.jsonl (read by jsonl.py's rules). A last line cut short by a crash is left out;
    any other line that is not a metrics record is a PionError naming it."""
    records = []
    for number, record in jsonl_objects(path, torn_end_ok=True):  # also reads the bare NaN that older runs wrote
        if not isinstance(record.get("step"), int) or not all(map(is_metric_value, record.values())):
            raise PionError(f"{path}:{number} is not a metrics record")
        records.append(record)
    return records


def is_metric_value(value):
    """A number no tracker or plot can take (an integer beyond float's range: 400 digits) is not one."""
    return not isinstance(value, int) or abs(value) < 2 ** 64


def metrics_path(run):
    """A run folder (or its metrics.jsonl) -> the metrics.jsonl path, or a PionError."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise PionError(f"{run} is not a run folder: it holds no metrics.jsonl" if os.path.isdir(run)
                        else f"{run} does not exist")
    if not path.endswith(".jsonl"):  # a checkpoint or a shard given as the run, an easy slip
        raise PionError(f"{run} is not a run folder or a metrics.jsonl")
    return path


def load_runs(runs):
    """[(name, records)] of each run folder, named as given."""
    loaded = []
    for run in runs:
        records = read_records(metrics_path(run))
        if not records:
            raise PionError(f"{metrics_path(run)} holds no metrics yet")
        loaded.append((os.path.normpath(run), records))
    return loaded


def series(records, key):
    """(tokens seen, values) of the records that hold a finite `key`."""
    points = [(r["tokens_seen"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "tokens_seen" in r]
    return [x for x, _ in points], [y for _, y in points]


def smoothing_weight(count):
    """The moving average's weight for a curve of `count` points: the progress bar's on a long run, less on a
    short one, where it would lag the raw curve by most of its length (none below 10 points)."""
    return min(SMOOTHING, max(0.0, 1 - 10 / max(count, 1)))


def smoothed(values, weight=None):
    weight = smoothing_weight(len(values)) if weight is None else weight
    average, out = None, []
    for value in values:
        average = value if average is None else weight * average + (1 - weight) * value
        out.append(average)
    return out


def draw(runs):
    """A matplotlib Figure of [(name, records)]: one panel per metric any run holds. Each run is one color,
    its lines labelled with its name (the raw training loss: "<name> raw")."""
    try:  # imported here: reading metrics (a resumed run trims its metrics.jsonl) needs no matplotlib
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as e:
        raise PionError(f"drawing needs matplotlib ({e}): pip install matplotlib")
    eval_keys = sorted({key for _, records in runs for r in records for key in r if key.startswith("eval/")})
    panels = [(title, key) for title, key in PANELS + [(key, key) for key in eval_keys]
              if any(series(records, key)[0] for _, records in runs)]
    if not panels:
        raise PionError(f"{', '.join(name for name, _ in runs)}: no metric with tokens_seen to plot")
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.5 * columns, 3.2 * rows), layout="constrained")
    for index, (title, key) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_title(title)
        axes.set_xlabel("tokens seen")
        axes.xaxis.set_major_formatter(EngFormatter())
        axes.grid(alpha=0.3)
        for number, (name, records) in enumerate(runs):
            x, y = series(records, key)
            if not x:
                continue
            color = f"C{number % 10}"
            if key == "loss":
                axes.plot(x, y, color=color, alpha=0.3, linewidth=0.8, label=f"{name} raw")
                axes.plot(x, smoothed(y), color=color, label=name)
            else:
                axes.plot(x, y, color=color, marker="o" if len(x) < 20 else None, markersize=3, label=name)
        axes.legend(fontsize="small")
    return figure


def save_plot(runs, out, dpi=80):
    """Draw the run folders `runs` into the PNG `out` (replaced atomically: a reader never sees half a file)."""
    figure = draw(load_runs(runs))
    atomic_write(out, lambda f: figure.savefig(f, format="png", dpi=dpi))
