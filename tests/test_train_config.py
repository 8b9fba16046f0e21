"""train_config.default_lr and with_default_lr: the peak learning rate a run gets when it names none."""
import pytest

import model
from train_config import REFERENCE_LR, REFERENCE_TOKENS, REFERENCE_WIDTH, TrainConfig, default_lr, with_default_lr


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


def test_the_train_py_help_names_the_rule(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "train_config.default_lr" in capsys.readouterr().out
