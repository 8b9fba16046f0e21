"""finetune.py: SFT of a tiny Pion on a tiny chat file through the CLI; masking, checkpoints, resume, errors."""
import json
import math
import os
import types

import pytest
import torch

from tokenizer import PAD_ID
import finetune as finetune_script
from conftest import assert_one_line_error, run_in_process
from checkpoint import load_checkpoint
from model import Pion, PionConfig

# Nine conversations: load_sft_splits holds one out for validation (seed 42: the bees), eight are trained.
CONVERSATIONS = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Red is one."),
    ("How many legs does a spider have?", "Eight legs."),
    ("What do bees make?", "They make honey."),
    ("Which planet is closest to the sun?", "Mercury."),
    ("What is frozen water called?", "Ice."),
    ("Say hello in Spanish.", "Hola!"),
    ("What is two plus three?", "Five."),
    ("Which animal says moo?", "A cow."),
]
QUESTION, ANSWER = CONVERSATIONS[0]  # a trained conversation: the eval sample must answer it from memory
MAX_STEPS, MID_STEP = 40, 20
TRAINING_FLAGS = ["--seq_len", "64", "--batch_size", "4", "--grad_accum", "2", "--lr", "2e-2", "--min_lr", "1e-3",
                  "--warmup_steps", "3", "--max_steps", str(MAX_STEPS), "--eval_interval", str(MID_STEP),
                  "--save_interval", str(MID_STEP), "--log_interval", "1", "--tokenize_workers", "0",
                  "--sample_question", QUESTION]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The chats as ShareGPT JSONL and OpenAI-style JSON, and a tiny soft-capped Pion saved as the published
    checkpoints are (bf16 weights, a pickled PionConfig) with the real vocabulary: real text is tokenized."""
    d = tmp_path_factory.mktemp("finetune")
    sharegpt = d / "chats.jsonl"
    sharegpt.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": q},
                                                              {"from": "gpt", "value": a}]}) + "\n"
                                for q, a in CONVERSATIONS))
    openai = d / "chats.json"
    openai.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                  for q, a in CONVERSATIONS]))
    torch.manual_seed(0)
    config = PionConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    torch.save({"model": {k: v.bfloat16() for k, v in Pion(config).state_dict().items()}, "config": config},
               d / "base.pt")
    return types.SimpleNamespace(dir=d, sharegpt=str(sharegpt), openai=str(openai), base=str(d / "base.pt"))


def finetune(files, tokenizer_path, save_dir, *flags, data=None, checkpoint=None):
    """Run the CLI in this process; data: the flags that choose the data (default: the ShareGPT file)."""
    import datasets
    data = ["--data_file", files.sharegpt] if data is None else data
    argv = ["--checkpoint", checkpoint or files.base, *data, "--tokenizer", tokenizer_path, "--save_dir", save_dir,
            *flags]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(files.dir / "hf_datasets"))
        return run_in_process(finetune_script.main, argv)


def metrics(save_dir):
    with open(os.path.join(save_dir, "sft", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records, key="loss"):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def trained(files, tokenizer_path):
    """One full run, shared by the tests that inspect its results."""
    save_dir = files.dir / "run"
    result = finetune(files, tokenizer_path, save_dir, *TRAINING_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return types.SimpleNamespace(save_dir=save_dir, sft=save_dir / "sft", stdout=result.stdout)


def one_error_line(result):
    return assert_one_line_error(result, after_progress=True)


# ----------------------------------------------------------------------------------------------------
# What training learns


def test_assistant_tokens_are_learned_and_the_masked_tokens_are_not(files, trained, tokenizer, monkeypatch,
                                                                    real_tokenizer_path):
    # How fast a 2-layer model learns these answers depends on how the tokenizer splits them: the
    # thresholds below are for the published tokenizer (real_tokenizer_path skips without it).
    import datasets
    from sft_data import collate, load_sft_splits
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(files.dir / "hf_datasets_test"))
    train_rows, _ = load_sft_splits(tokenizer, 64, files.sharegpt, seed=42)  # exactly what the run trained on
    batch = collate(list(train_rows))
    ids, labels = batch["input_ids"], batch["labels"]
    masked = torch.where((labels == -100) & (ids != PAD_ID), ids, -100)  # user turns and template prefixes

    def loss_on(path, targets):
        model, _ = load_checkpoint(path)
        with torch.no_grad():
            return model(ids, labels=targets)["loss"].item()

    final = trained.sft / "pion_sft_final.pt"
    assert loss_on(files.base, labels) > 10 and loss_on(final, labels) < 0.5
    # Had the mask leaked, these tokens would be memorized like the replies; untrained, they stay unlikely.
    assert loss_on(final, masked) > 0.9 * loss_on(files.base, masked)


def test_the_finetuned_checkpoint_is_saved_under_save_dir_sft_and_loads(files, trained):
    assert sorted(os.listdir(trained.sft)) == ["metrics.jsonl", "metrics.png", f"pion_sft_{MID_STEP}.pt",
                                           "pion_sft_final.pt"]
    model, checkpoint = load_checkpoint(trained.sft / "pion_sft_final.pt")
    base, _ = load_checkpoint(files.base)
    assert checkpoint["config"] == base.config and checkpoint["step"] == MAX_STEPS
    assert not torch.equal(model.layers[0].ffn.w1.weight, base.layers[0].ffn.w1.weight)


def test_logger_sends_each_finetuning_step_to_the_tracker(files, tokenizer_path, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, "--max_steps", "4", "--eval_interval", "2",
                      "--save_interval", "2", "--sample_tokens", "0", "--logger", "tensorboard")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_each_eval_prints_the_val_loss_and_the_greedy_answer_to_the_fixed_question(trained, real_tokenizer_path):
    val = losses(metrics(trained.save_dir), "val_loss")
    assert sorted(val) == [MID_STEP, MAX_STEPS]
    assert f"step {MAX_STEPS}: val loss {val[MAX_STEPS]:.4f}" in trained.stdout
    # Greedy decoding stops at <|endoftext|>: the memorized reply, without its newline or anything after.
    assert f"sample: {QUESTION!r} -> {ANSWER!r}" in trained.stdout


def test_the_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr(trained):
    from train_config import cosine_lr
    lrs = losses(metrics(trained.save_dir), "lr")
    assert lrs[1] == pytest.approx(2e-2 / 3) and lrs[3] == pytest.approx(2e-2)
    mid = 1e-3 + 0.5 * (2e-2 - 1e-3) * (1 + math.cos(math.pi * (MID_STEP - 1 - 3) / (MAX_STEPS - 3)))
    assert lrs[MID_STEP] == pytest.approx(mid)
    assert all(lrs[s + 1] < lrs[s] for s in range(4, MAX_STEPS))
    assert cosine_lr(MAX_STEPS, 2e-2, 1e-3, 3, MAX_STEPS) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------
# Resume, data formats, ranks


def test_resuming_from_a_mid_run_checkpoint_reproduces_the_rest_of_the_run(files, tokenizer_path, trained, tmp_path):
    result = finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS,
                      "--resume", str(trained.sft / f"pion_sft_{MID_STEP}.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    original, resumed = metrics(trained.save_dir), metrics(tmp_path)
    assert sorted(losses(resumed)) == list(range(MID_STEP + 1, MAX_STEPS + 1))
    for key in ("loss", "val_loss"):
        for step, value in losses(resumed, key).items():
            assert value == pytest.approx(losses(original, key)[step], abs=1e-6), (key, step)


def test_muon_finetunes_and_its_checkpoints_refuse_to_resume_with_adamw(files, tokenizer_path, tmp_path):
    short = [*TRAINING_FLAGS, "--max_steps", "4", "--eval_interval", "2", "--save_interval", "2",
             "--sample_tokens", "0"]
    result = finetune(files, tokenizer_path, tmp_path, *short, "--optimizer", "muon")
    assert result.returncode == 0, result.stderr[-3000:]
    mid = tmp_path / "sft" / "pion_sft_2.pt"
    assert load_checkpoint(mid)[1]["train_config"]["optimizer"] == "muon"
    os.remove(tmp_path / "sft" / "pion_sft_final.pt")
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, *short, "--resume", "auto"))
    assert "trained with --optimizer muon, not adamw" in line and "--allow_optimizer_change" in line


def test_openai_json_trains_exactly_like_sharegpt_jsonl(files, tokenizer_path, trained, tmp_path):
    # Warmup lrs do not depend on max_steps, so the first steps must match the ShareGPT run's (4 steps: the
    # 3 warmup steps must fit in the run, or the warmup is shortened).
    flags = TRAINING_FLAGS[:TRAINING_FLAGS.index("--max_steps")] + ["--max_steps", "4"] + \
        TRAINING_FLAGS[TRAINING_FLAGS.index("--max_steps") + 2:]
    result = finetune(files, tokenizer_path, tmp_path, *flags, data=["--data_file", files.openai])
    assert result.returncode == 0, result.stderr[-3000:]
    first = {step: loss for step, loss in losses(metrics(tmp_path)).items() if step <= 2}
    assert first == {step: losses(metrics(trained.save_dir))[step] for step in (1, 2)}


def test_each_rank_trains_on_its_own_rows_of_every_global_batch():
    from finetune import rank_slices, val_batches
    from sft_data import sft_batches
    rows = [{"input_ids": [i] * (1 + i % 3), "labels": [i] * (1 + i % 3)} for i in range(13)]
    world = [types.SimpleNamespace(rank=r, world_size=3) for r in range(3)]
    whole = next(sft_batches(rows, 6, seed=1))
    parts = [next(rank_slices(sft_batches(rows, 6, seed=1), rt)) for rt in world]
    assert all(len(part["input_ids"]) == 2 for part in parts)
    first_tokens = torch.cat([part["input_ids"][:, 0] for part in parts])  # each row's id
    assert sorted(first_tokens.tolist()) == sorted(whole["input_ids"][:, 0].tolist())
    # Validation: the same number of batches on every rank (FSDP ranks must step together), no row twice.
    val = [list(val_batches(rows, 2, rt, None)) for rt in world]
    assert len({len(batches) for batches in val}) == 1
    seen = [int(i) for batches in val for b in batches for i in b["input_ids"][:, 0]]
    assert len(seen) == len(set(seen)) == 12


# ----------------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2


def test_refuse_soft_cap_on_a_soft_capped_checkpoint_is_refused(files, tokenizer_path, tmp_path):
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, "--refuse_soft_cap"))
    assert line.startswith(f"error: {files.base} was trained with soft-capped attention") and "--refuse_soft_cap" in line


def test_refuse_soft_cap_lets_a_cap_of_0_through_as_the_plain_attention_it_is(files, tokenizer_path, tmp_path):
    """use_soft_cap with logit_cap 0 caps nothing: the model's attention is plain SDPA, which it says."""
    config = PionConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128, logit_cap=0.0)
    torch.save({"model": Pion(config).state_dict(), "config": config}, tmp_path / "uncapped.pt")
    result = finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, "--max_steps", "1", "--refuse_soft_cap",
                      checkpoint=str(tmp_path / "uncapped.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SDPA attention" in result.stdout


def test_a_missing_data_file_is_one_line(files, tokenizer_path, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, data=["--data_file", missing]))
    assert line == f"error: data file not found: {missing}"


def test_an_unknown_dataset_is_one_line(files, tokenizer_path, tmp_path):
    result = finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, data=["--dataset", "nobody/no-such-dataset"])
    assert one_error_line(result).startswith("error: cannot load nobody/no-such-dataset: ")


def test_a_missing_checkpoint_is_one_line(files, tokenizer_path, tmp_path):
    missing = str(tmp_path / "nope.pt")
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, checkpoint=missing))
    assert line == f"error: checkpoint not found: {missing}"


def test_a_bad_flag_is_one_line(files, tokenizer_path, tmp_path):
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, "--batch_size", "0"))
    assert line.startswith("error: argument --batch_size: must be a positive integer")


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(files, tokenizer_path, trained):
    before = (trained.sft / "pion_sft_final.pt").read_bytes()
    line = one_error_line(finetune(files, tokenizer_path, trained.save_dir, *TRAINING_FLAGS))
    assert "already holds pion_sft checkpoints" in line and "--resume auto" in line
    assert (trained.sft / "pion_sft_final.pt").read_bytes() == before


def test_resuming_from_a_checkpoint_finetune_did_not_write_is_refused(files, tokenizer_path, tmp_path):
    line = one_error_line(finetune(files, tokenizer_path, tmp_path, *TRAINING_FLAGS, "--resume", files.base))
    assert line == f"error: {files.base} is not a finetune.py checkpoint; to finetune it, pass it as --checkpoint"


def test_a_checkpoint_that_cannot_be_loaded_leaves_no_empty_run_folder(files, tokenizer_path, tmp_path):
    result = finetune(files, tokenizer_path, tmp_path / "ck", *TRAINING_FLAGS, checkpoint=str(tmp_path / "nowhere.pt"))
    assert result.returncode == 2 and not os.path.exists(tmp_path / "ck" / "sft")


def test_a_short_run_says_its_warmup_does_not_fit(files, tokenizer_path, tmp_path):
    result = finetune(files, tokenizer_path, tmp_path, "--max_steps", "3", "--seq_len", "64", "--batch_size", "4",
                      "--tokenize_workers", "0", "--sample_tokens", "0")
    assert result.returncode == 0, result.stderr
    assert "warmup of 100 steps does not fit in max_steps 3; using 0 warmup steps" in result.stdout + result.stderr
