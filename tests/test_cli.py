"""What every script's command line shares: a help line and a shown default for every flag, one-line errors."""
import argparse
import glob
import os
import signal
import sys
import tomllib

import pytest

import chat
import cli
import data_prep
import export_hf
import finetune
import generate
import sft_data
import train
from conftest import assert_one_line_error, run_in_process

SCRIPTS = {"train.py": train.main, "finetune.py": finetune.main, "generate.py": generate.main, "chat.py": chat.main,
           "export_hf.py": export_hf.main, "data_prep.py prepare": data_prep.main,
           "data_prep.py download": data_prep.main, "sft_data.py": sft_data.main}
SUBCOMMAND = {"data_prep.py prepare": ["prepare"], "data_prep.py download": ["download"]}


def parser_of(script, monkeypatch):
    """The parser a script builds, caught as it parses (its flags are then inspected, nothing runs)."""
    caught = []

    def catch(parser, args=None, namespace=None):
        caught.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        SCRIPTS[script]([])
    parser = caught[0]
    for action in parser._actions:  # data_prep.py: the subcommand's own parser
        if isinstance(action, argparse._SubParsersAction):
            parser = action.choices[SUBCOMMAND[script][0]]
    return parser


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_help_line(script, monkeypatch):
    flags = [a for a in parser_of(script, monkeypatch)._actions if a.option_strings and a.dest != "help"]
    assert flags and [a.option_strings[0] for a in flags if not a.help] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    help_lines = {a.option_strings[0]: " ".join(cli.HelpFormatter("x")._get_help_string(a).split())
                  for a in parser._actions if a.option_strings and a.dest != "help" and not a.required}
    assert [flag for flag, text in help_lines.items() if "default" not in text] == []
    assert "(default: " in " ".join(parser.format_help().split())


REQUIRED = {"train.py": ["--data_dir", "d"], "finetune.py": ["--checkpoint", "c.pt"],
            "generate.py": ["--checkpoint", "c.pt"], "export_hf.py": ["--checkpoint", "c.pt"],
            "data_prep.py prepare": ["prepare", "--input", "x.txt", "--out", "o"], "chat.py": [], "sft_data.py": []}


@pytest.mark.parametrize("script", REQUIRED)
def test_an_unknown_flag_is_one_line_and_exit_2(script):
    result = run_in_process(SCRIPTS[script], [*REQUIRED[script], "--no_such_flag"])
    assert_one_line_error(result, "unrecognized arguments: --no_such_flag")


def test_token_counts_read_well_at_every_scale():
    assert [cli.human_count(n) for n in (512, 12_345, 4_500_000, 2_100_000_000)] == ["512", "12.3k", "4.5M", "2.1B"]


# ---------------------------------------------------------------------------------------------------
# Run recipes: --config FILE.toml


def recipe_parser():
    parser = cli.ArgumentParser()
    parser.add_argument("--steps", type=cli.positive_int, default=10, help="steps")
    parser.add_argument("--name", required=True, help="name")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device")
    parser.add_argument("--no_checkpointing", dest="checkpointing", action="store_false", help="off")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE")
    return parser


def recipe(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_a_recipes_keys_are_the_flags_without_dashes(tmp_path):
    path = recipe(tmp_path, 'steps = 40\nname = "nano"\nno_checkpointing = true\noverride = ["n_layers=2"]\n')
    args = recipe_parser().parse_args(["--config", path])
    assert (args.steps, args.name, args.checkpointing, args.override) == (40, "nano", False, ["n_layers=2"])


def test_flags_on_the_command_line_win_over_the_recipe(tmp_path):
    path = recipe(tmp_path, 'steps = 40\nname = "nano"\ndevice = "cuda"\n')
    args = recipe_parser().parse_args(["--steps", "7", f"--config={path}", "--device", "cpu"])
    assert (args.steps, args.name, args.device) == (7, "nano", "cpu")


@pytest.mark.parametrize("text, problem", [
    ('name = "a"\nstpes = 4\n', "'stpes' is not a flag of"),
    ('name = "a"\nsteps = -4\n', "steps must be a positive integer"),
    ('name = "a"\ndevice = "tpu"\n', "device must be one of cpu, cuda"),
    ('name = "a"\nno_checkpointing = "yes"\n', "no_checkpointing is a switch: true or false"),
    ('name = "a"\nsteps = [4]\n', "steps must be a number or string"),
    ('name = "a\n', "is not TOML"),
])
def test_a_bad_recipe_is_refused_in_one_line_naming_the_key(tmp_path, text, problem):
    with pytest.raises(cli.PionError, match=problem):
        recipe_parser().parse_args(["--config", recipe(tmp_path, text)])


def test_a_missing_recipe_is_one_line(tmp_path):
    with pytest.raises(cli.PionError, match="cannot read --config"):
        recipe_parser().parse_args(["--config", str(tmp_path / "none.toml")])


RECIPE_SCRIPTS = {"train": train.parse_args, "finetune": finetune.parse_args}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                                 "configs", "*.toml"))))
def test_every_recipe_in_configs_is_read_by_its_script(path):
    """configs/<script>_<run>.toml: each file's keys are flags of the script its name starts with, and the
    recipe parses as the same flags written out on the command line."""
    script = os.path.basename(path).split("_")[0]
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    flags = []
    for key, value in recipe.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        else:
            flags += [item for one in (value if isinstance(value, list) else [value]) for item in (f"--{key}", str(one))]
    from_file = vars(RECIPE_SCRIPTS[script](["--config", path]))
    from_flags = vars(RECIPE_SCRIPTS[script](flags))
    assert {**from_file, "config": None} == from_flags


def test_ctrl_c_is_one_line_and_the_shells_exit_code_130():
    def interrupted(argv):
        raise KeyboardInterrupt
    result = run_in_process(interrupted, [])
    assert (result.returncode, result.stderr) == (130, "interrupted\n")

@pytest.mark.parametrize("first, second, code, line", [(signal.SIGTERM, signal.SIGINT, 143, "terminated"),
                                                      (signal.SIGINT, signal.SIGTERM, 130, "interrupted")])
def test_a_signal_within_stop_signals_raise_ends_in_one_line_after_a_cleanup_that_a_second_cannot_cut(
        first, second, code, line):
    cleaned = []

    def stopped(argv):
        with cli.stop_signals_raise():
            try:
                os.kill(os.getpid(), first)
            finally:
                os.kill(os.getpid(), second)  # ignored: the cleanup runs to its end
                cleaned.append(True)
    result = run_in_process(stopped, [])
    assert (result.returncode, result.stderr, cleaned) == (code, line + "\n", [True])


def test_stop_signals_raise_gives_the_previous_handlers_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with cli.stop_signals_raise():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_a_missing_optional_package_is_one_line_naming_what_needs_it(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it, or a part imported before -> ImportError
    monkeypatch.delitem(sys.modules, "harness", raising=False)
    with pytest.raises(cli.PionError, match=r"^--eval_tasks needs lm-eval \(.*\): pip install lm-eval$"):
        cli.import_optional("harness", "--eval_tasks", "lm-eval")
