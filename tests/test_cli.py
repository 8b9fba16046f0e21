"""What every script's command line shares: a help line and a shown default for every flag, one-line errors."""
import argparse
import sys

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



def test_a_missing_optional_package_is_one_line_naming_what_needs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # importing it -> ImportError
    monkeypatch.delitem(sys.modules, "evaluation", raising=False)
    with pytest.raises(cli.PionError, match=r"^--eval_tasks needs lm-eval \(.*\): pip install lm-eval$"):
        cli.import_optional("evaluation", "--eval_tasks", "lm-eval")
