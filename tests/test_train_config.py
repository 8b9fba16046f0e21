"""train_config.py: TrainConfig's flags derived from its fields, the learning-rate schedules (WSD, cosine)
with the warmup fitted to the run, and the peak learning rate a run gets when it names none."""
import argparse
import dataclasses
import types

import pytest

import model
from cli import PionError
from train_config import (REFERENCE_LR, REFERENCE_TOKENS, REFERENCE_WIDTH, TrainConfig, add_train_config_args,
                          cosine_lr, default_lr, fit_schedule, learning_rate, with_default_lr, wsd_lr)

RUN = dict(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)


def parser_with_flags(defaults):
    parser = argparse.ArgumentParser()
    add_train_config_args(parser, defaults)
    return parser


def said():
    """A stand-in Runtime whose print lines are kept: (rt, lines)."""
    lines = []
    return types.SimpleNamespace(print=lines.append), lines


# ---------------------------------------------------------------------------------------------------
# Flags


def test_every_field_with_a_flag_gets_its_help_and_its_default_from_the_trainer():
    parser = parser_with_flags(TrainConfig(**RUN, batch_size=3))
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    flagged = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["flag"] is not False]
    assert sorted(actions) == sorted(flagged)
    assert all(actions[f.name].help == f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name in actions)
    assert parser.parse_args([]).batch_size == 3 and parser.parse_args(["--batch_size", "5"]).batch_size == 5


def test_a_switch_on_by_default_is_turned_off_by_its_named_flag():
    parser = parser_with_flags(TrainConfig(**RUN))
    assert parser.parse_args([]).gradient_checkpointing is True
    assert parser.parse_args(["--no_gradient_checkpointing"]).gradient_checkpointing is False
    assert parser.parse_args(["--compile"]).compile is True


def test_a_flag_value_out_of_range_is_refused():
    parser = parser_with_flags(TrainConfig(**RUN))
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    with pytest.raises(ValueError, match="--batch_size.*positive integer"):
        parser.parse_args(["--batch_size", "0"])


# ---------------------------------------------------------------------------------------------------
# Schedules


def test_wsd_schedule_warms_up_holds_then_decays_over_the_last_fifth():
    lr = [wsd_lr(s, 1.0, 0.1, warmup_steps=10, max_steps=100, decay_frac=0.2) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lr[10:80])
    assert all(a > b for a, b in zip(lr[80:], lr[81:]))
    assert lr[99] == pytest.approx(0.1)


def test_wsd_decay_length_is_rounded_not_truncated():
    lr = [wsd_lr(s, 1.0, 0.0, warmup_steps=0, max_steps=10, decay_frac=0.29) for s in range(10)]
    assert lr[6] == 1.0 and lr[7] < 1.0  # 2.9 decay steps round to 3: the decay starts at step 7


def test_cosine_schedule_warms_up_then_falls_to_min_lr_at_the_last_step():
    lr = [cosine_lr(s, 1.0, 0.1, warmup_steps=10, max_steps=100) for s in range(101)]
    assert lr[9] == pytest.approx(1.0) and lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.55)  # halfway through the cosine: halfway between lr and min_lr
    assert all(a > b for a, b in zip(lr[10:100], lr[11:101])) and lr[100] == pytest.approx(0.1)


def test_the_config_names_the_schedule_its_learning_rate_follows():
    wsd, cosine = TrainConfig(**RUN, schedule="wsd"), TrainConfig(**RUN, schedule="cosine")
    assert learning_rate(wsd, 50) == wsd_lr(50, 1.0, 0.1, 10, 100, 0.2) == 1.0
    assert learning_rate(cosine, 50) == cosine_lr(50, 1.0, 0.1, 10, 100) < 1.0


# ---------------------------------------------------------------------------------------------------
# Fitting the warmup to the run


def test_a_warmup_that_fits_is_kept_and_nothing_is_said():
    rt, lines = said()
    config = TrainConfig(**RUN)
    assert fit_schedule(config, rt) == config and lines == []


def test_a_warmup_longer_than_the_run_shrinks_to_a_tenth_of_it_out_loud():
    rt, lines = said()
    assert fit_schedule(TrainConfig(**{**RUN, "warmup_steps": 500}), rt).warmup_steps == 10
    assert lines == ["warning: warmup of 500 steps does not fit in max_steps 100; using 10 warmup steps instead"]


def test_a_warmup_running_into_the_wsd_decay_is_refused_but_not_under_cosine():
    rt, _ = said()
    with pytest.raises(PionError, match="runs into the decay, which starts at step 50 of 100"):
        fit_schedule(TrainConfig(**{**RUN, "warmup_steps": 60}, decay_frac=0.5), rt)
    assert fit_schedule(TrainConfig(**{**RUN, "warmup_steps": 60}, decay_frac=0.5, schedule="cosine"), rt)


def test_a_decay_too_short_for_one_step_is_said():
    rt, lines = said()
    fit_schedule(TrainConfig(**{**RUN, "warmup_steps": 0}, decay_frac=0.001), rt)
    assert lines == ["warning: decay_frac 0.001 of 100 steps is no step: the lr never decays"]


# ---------------------------------------------------------------------------------------------------
# The default learning rate


class Width:
    def __init__(self, d_model):
        self.d_model = d_model


def test_default_lr_is_the_measured_best_at_the_reference_width_and_batch():
    assert default_lr(Width(REFERENCE_WIDTH), REFERENCE_TOKENS) == pytest.approx(REFERENCE_LR)
    assert REFERENCE_LR == 3e-3 and REFERENCE_WIDTH == 128 and REFERENCE_TOKENS == 4096


def test_default_lr_halves_when_the_width_doubles():
    assert default_lr(Width(512), 4096) == pytest.approx(default_lr(Width(256), 4096) / 2)


def test_a_model_narrower_than_the_reference_gets_the_reference_lr():
    assert default_lr(Width(64), REFERENCE_TOKENS) == default_lr(Width(32), REFERENCE_TOKENS) == REFERENCE_LR


def test_default_lr_doubles_when_the_tokens_per_step_grow_256_fold():
    assert default_lr(Width(384), 256 * 4096) == pytest.approx(2 * default_lr(Width(384), 4096))


def test_default_lr_has_two_significant_digits():
    assert default_lr(Width(640), 64 * 2 * 2048) == 1e-3 and default_lr(Width(384), 1024) == 8.4e-4


def test_default_lr_gives_the_documented_values():
    # train.py's default batch (64 x 2 x 2048) for Pion-small; GPT-2-small's shape at 0.5M tokens; the quickstart.
    assert default_lr(model.get_config("small"), 64 * 2 * 2048) == 1.0e-3
    assert default_lr(Width(768), 2**19) == 9.2e-4
    assert default_lr(model.get_config("nano"), 4 * 256) == 8.4e-4


def test_with_default_lr_fills_lr_and_a_tenth_of_it_and_says_so():
    said = []
    config = TrainConfig(max_steps=10, lr=None, min_lr=None, warmup_steps=0, batch_size=4, grad_accum=2, seq_len=256)
    filled = with_default_lr(config, Width(384), world_size=2, say=said.append)
    assert (filled.lr, filled.min_lr) == (1e-3, 1e-4)  # 3e-3 x 128 / 384 at the reference 4,096 tokens a step
    assert said == ["learning rate 0.001 to 0.0001 (d_model 384, 4,096 tokens a step; --lr and --min_lr set them)"]


def test_with_default_lr_keeps_what_was_given():
    said = []
    config = TrainConfig(max_steps=10, lr=2e-3, min_lr=None, warmup_steps=0)
    assert with_default_lr(config, Width(384), 1, said.append).min_lr == 2e-4
    given = TrainConfig(max_steps=10, lr=2e-3, min_lr=0.0, warmup_steps=0)
    assert with_default_lr(given, Width(384), 1, said.append) is given and len(said) == 1


def test_a_resumed_run_keeps_its_own_learning_rate_when_none_is_given():
    """A run trained before the rule (or under another batch) must not jump to a new lr at resume."""
    said = []
    config = TrainConfig(max_steps=10, lr=None, min_lr=None, warmup_steps=0)
    resumed = with_default_lr(config, Width(384), 1, said.append, resumed={"lr": 3e-4, "min_lr": 3e-5})
    assert (resumed.lr, resumed.min_lr) == (3e-4, 3e-5) and "the resumed run's" in said[0]
    given = TrainConfig(max_steps=10, lr=2e-3, min_lr=None, warmup_steps=0)
    assert with_default_lr(given, Width(384), 1, said.append, resumed={"lr": 3e-4, "min_lr": 3e-5}).min_lr == 2e-4


def test_the_train_py_help_names_the_rule(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "train_config.default_lr" in capsys.readouterr().out
