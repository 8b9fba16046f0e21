"""plot.py and plotting.py: pictures of runs from their metrics.jsonl."""
import json
import os
import sys

import pytest

import plot
import plotting
from conftest import assert_one_line_error, run_in_process


def write_run(folder, scale=1.0, evals=True):
    """A run folder whose metrics.jsonl looks like train.py's: 8 logged steps, evals at 4 and 8."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(1, 9):
            tokens = step * 512
            f.write(json.dumps({"step": step, "loss": scale * (6 - step * 0.3), "lr": 1e-3 * min(1, step / 2),
                                "tokens_seen": tokens, "tokens_per_s": 1000.0 + step, "grad_norm": 1.0}) + "\n")
            if evals and step % 4 == 0:
                f.write(json.dumps({"step": step, "val_loss": scale * (6 - step * 0.25), "val_bpb": 2.0 - step / 10,
                                    "eval/arc_easy/acc": 0.25 + step / 100, "tokens_seen": tokens}) + "\n")
    return str(folder)


def drawn(figure):
    """{panel title: {line label: number of points}} of a drawn figure."""
    return {axes.get_title(): {line.get_label(): len(line.get_xdata()) for line in axes.get_lines()}
            for axes in figure.axes}


def test_each_metric_of_each_run_is_drawn_against_tokens_seen_with_the_runs_name(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", scale=1.1)
    panels = drawn(plotting.draw(plotting.load_runs([a, b])))
    assert panels["training loss"] == {f"{a} raw": 8, a: 8, f"{b} raw": 8, b: 8}
    for title in ("validation loss", "validation bits per byte", "eval/arc_easy/acc"):
        assert panels[title] == {a: 2, b: 2}
    for title in ("learning rate", "tokens/s"):
        assert panels[title] == {a: 8, b: 8}


def test_the_smoothed_loss_of_a_long_run_is_the_progress_bars_moving_average():
    losses = [1.0, 2.0, 3.0] + [3.0] * 997
    assert plotting.smoothed(losses)[:3] == pytest.approx([1.0, 1.1, 1.29])


def test_a_short_run_is_smoothed_less_so_that_its_average_does_not_lag_by_most_of_the_run():
    assert plotting.smoothed([3.0, 2.0, 1.0]) == [3.0, 2.0, 1.0]
    assert plotting.smoothing_weight(20) == pytest.approx(0.5)


def test_a_panel_is_left_out_when_no_run_has_its_metric(tmp_path):
    run = write_run(tmp_path / "run", evals=False)
    titles = set(drawn(plotting.draw(plotting.load_runs([run]))))
    assert titles == {"training loss", "learning rate", "tokens/s"}


def test_non_finite_losses_written_as_null_are_gaps_not_points(tmp_path):
    run = write_run(tmp_path / "run", evals=False)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 9, "loss": None, "lr": 1e-3, "tokens_seen": 9 * 512}) + "\n")
    assert drawn(plotting.draw(plotting.load_runs([run])))["training loss"][run] == 8


def test_plot_py_writes_a_png_of_two_runs(tmp_path):
    out = tmp_path / "both.png"
    result = run_in_process(plot.main, [write_run(tmp_path / "a"), write_run(tmp_path / "b"), "--out", out])
    assert result.returncode == 0, result.stderr
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_py_reads_a_metrics_jsonl_path_as_well_as_its_folder(tmp_path):
    run = write_run(tmp_path / "run")
    result = run_in_process(plot.main, [os.path.join(run, "metrics.jsonl"), "--out", tmp_path / "out.png"])
    assert result.returncode == 0, result.stderr


def test_a_torn_last_line_of_a_crashed_run_is_left_out(tmp_path):
    run = write_run(tmp_path / "run", evals=False)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "lo')
    assert drawn(plotting.draw(plotting.load_runs([run])))["training loss"][run] == 8


def test_plot_py_never_overwrites_an_existing_file_unless_asked(tmp_path):
    run, out = write_run(tmp_path / "run"), tmp_path / "mine.png"
    out.write_bytes(b"my picture")
    assert_one_line_error(run_in_process(plot.main, [run, "--out", out]), "already exists")
    assert out.read_bytes() == b"my picture"
    assert run_in_process(plot.main, [run, "--out", out, "--overwrite"]).returncode == 0
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("contents, message", [(None, "no metrics.jsonl"), ("", "no metrics yet"),
                                               ('not json\n{"step": 1}\n', "metrics.jsonl:1 is not valid JSON"),
                                               ('{"step": 1, "loss": 2.0}\n', "no metric with tokens_seen")])
def test_a_folder_without_usable_metrics_is_one_line(tmp_path, contents, message):
    run = tmp_path / "run"
    run.mkdir()
    if contents is not None:
        (run / "metrics.jsonl").write_text(contents)
    assert_one_line_error(run_in_process(plot.main, [run, "--out", tmp_path / "out.png"]), message)


@pytest.mark.parametrize("name", ["pion_nano_3.pt", "shard_00000.npy"])
def test_a_file_that_is_no_metrics_jsonl_given_as_the_run_is_one_line(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<u2'}" if name.endswith(".npy") else
                                  b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xa4\x8b")
    assert_one_line_error(run_in_process(plot.main, [tmp_path / name, "--out", tmp_path / "out.png"]),
                          f"{tmp_path / name} is not a run folder or a metrics.jsonl")


@pytest.mark.parametrize("line, message", [(b"\x00\xff\xfe\x80 binary block", ":9 is not UTF-8 text"),
                                           (b'{"step": 9, "loss": 1%s}' % (b"0" * 400), ":9 is not a metrics record"),
                                           (b'{"step": 9, "loss": 1%s}' % (b"0" * 5000), ":9 is not valid JSON")])
def test_a_metrics_line_that_is_not_utf8_or_whose_number_no_plot_takes_is_one_line(tmp_path, line, message):
    run = write_run(tmp_path / "run", evals=False)
    with open(os.path.join(run, "metrics.jsonl"), "ab") as f:
        f.write(line + b"\n{\"step\": 10, \"loss\": 1.0, \"tokens_seen\": 5120}\n")
    assert_one_line_error(run_in_process(plot.main, [run, "--out", tmp_path / "out.png"]), message)


def test_a_metrics_jsonl_that_starts_with_a_byte_order_mark_is_read(tmp_path):
    run = write_run(tmp_path / "run")
    text = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    assert drawn(plotting.draw(plotting.load_runs([run])))["training loss"][run] == 8


def test_a_missing_run_is_one_line(tmp_path):
    assert_one_line_error(run_in_process(plot.main, [tmp_path / "nowhere", "--out", tmp_path / "out.png"]),
                          "does not exist")


def test_an_out_that_is_not_a_png_is_one_line(tmp_path):
    assert_one_line_error(run_in_process(plot.main, [write_run(tmp_path / "run"), "--out", tmp_path / "x.jpg"]),
                          "must be a .png")


def test_without_matplotlib_plot_py_says_how_to_get_it_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it -> ImportError
    result = run_in_process(plot.main, [write_run(tmp_path / "run"), "--out", tmp_path / "out.png"])
    assert_one_line_error(result, "pip install matplotlib")
    assert not os.path.exists(tmp_path / "out.png")
