"""harness.py / eval.py: Pion as an lm-evaluation-harness model, offline, on tasks the tests write.

The harness's own `hf` backend on the exported (capless) model is the reference: same requests, same
log-likelihoods, same accuracies."""
import os
import tempfile

# The datasets library reads these when it is imported: nothing here may reach the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="pion_eval_datasets_"))

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

import chat_template  # noqa: E402
import harness  # noqa: E402
import transformers_format  # noqa: E402
from tokenizer import EOS_ID  # noqa: E402
from conftest import ROOT, assert_one_line_error, run_in_process, save_tiny_checkpoint, tiny_pion  # noqa: E402

MC_TASK, GEN_TASK = "pion_test_mc", "pion_test_gen"
WORDS = "red green blue yellow river mountain forest city bread apple stone window music winter summer".split()


def mc_rows(n, seed=0):
    """Multiple-choice questions of varied lengths; one context is longer than the tiny model's 128 tokens
    (left truncation) and one question has one-token answers that share their input."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())  # noqa: E731
    rows = []
    for i in range(n):
        length = 150 if i == 0 else int(torch.randint(3, 30, (1,), generator=g))
        choices = [pick(int(torch.randint(1, 6, (1,), generator=g))) for _ in range(4)]
        rows.append({"question": pick(length), "choices": choices, "answer": i % 4})
    rows.append({"question": "The sky is", "choices": [" blue", " red", " green", " dark"], "answer": 0})
    return rows


def write_tasks(folder, rows, gen_rows=None):
    """A multiple-choice task and a generate_until task over local JSONL files, as harness YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    gen_rows = gen_rows or [{"question": f"what comes after {w}?", "answer": w} for w in WORDS[:6]]
    with open(folder / "gen.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in gen_rows)
    (folder / "mc.yaml").write_text(f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (folder / "gen.yaml").write_text(f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return str(folder)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"), mc_rows(12))


@pytest.fixture(scope="module")
def manager(tasks):
    return harness.task_manager([MC_TASK, GEN_TASK], tasks)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path, tokenizer):
    """(capless tiny Pion, its checkpoint, its transformers folder). Its vocabulary is the tokenizer's: an id past
    a small test tokenizer's (a fresh clone's) decodes to nothing, and generations would be empty."""
    tmp = tmp_path_factory.mktemp("export")
    pion = save_tiny_checkpoint(tmp / "tiny.pt", use_soft_cap=False, vocab_size=tokenizer.get_vocab_size())
    return pion, str(tmp / "tiny.pt"), transformers_format.export(str(tmp / "tiny.pt"), str(tmp / "hf"), tokenizer_path)


def evaluate(lm, manager, tasks=(MC_TASK, GEN_TASK)):
    return harness.run_tasks(lm, list(tasks), manager, log_samples=True)


def responses(results, task):
    """Per document, in document order: the filtered responses (log-likelihoods, or the generated text)."""
    return [sample["filtered_resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def accuracy(results, task, metric="acc"):
    return results["results"][task][f"{metric},none"]


# ---------------------------------------------------------------------------------------------------
# The harness's hf backend is the reference


@pytest.fixture(scope="module")
def hf_lm(exported):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=exported[2], device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="module")
def hf_results(hf_lm, manager):
    return evaluate(hf_lm, manager)


@pytest.fixture(scope="module")
def pion_results(exported, manager, tokenizer_path):
    return evaluate(harness.PionLM(exported[0], tokenizer_path, batch_size=4), manager)


def test_log_likelihoods_match_the_hf_backend_on_the_exported_model(pion_results, hf_results):
    ours, theirs = responses(pion_results, MC_TASK), responses(hf_results, MC_TASK)
    assert len(ours) == len(theirs) == 13
    for doc_ours, doc_theirs in zip(ours, theirs):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(doc_ours, doc_theirs):
            assert abs(ll - ll_ref) <= 1e-4 and greedy == greedy_ref


def test_accuracies_match_the_hf_backend(pion_results, hf_results):
    for metric in ("acc", "acc_norm"):
        assert accuracy(pion_results, MC_TASK, metric) == accuracy(hf_results, MC_TASK, metric)


def test_generations_match_the_hf_backend(pion_results, hf_results):
    ours, theirs = responses(pion_results, GEN_TASK), responses(hf_results, GEN_TASK)
    assert ours == theirs
    assert any(text.strip() for (text,) in ours)  # the tiny model writes something before stopping
    assert accuracy(pion_results, GEN_TASK, "exact_match") == accuracy(hf_results, GEN_TASK, "exact_match")


# ---------------------------------------------------------------------------------------------------
# Soft-capped models are scored with their cap


def reference_log_likelihood(model, context_ids, continuation_ids):
    """log p(continuation | context) from the model's full forward, with no harness in between."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids)["logits"][0, :-1].float(), dim=-1)
    n = len(continuation_ids)
    return float(log_probs[-n:].gather(1, torch.tensor(continuation_ids)[:, None]).sum())


def test_a_soft_capped_model_is_scored_with_its_cap(tokenizer):
    capped, capless = tiny_pion(use_soft_cap=True), tiny_pion(use_soft_cap=False)  # same weights
    pairs = [("Question: which colour is the sky?\nAnswer:", " blue"), ("", "Hello world"),
             ("The river runs past the", " old stone mill and the forest")]
    requests = [lm_eval.api.instance.Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = harness.PionLM(capped, tokenizer).loglikelihood(requests, disable_tqdm=True)
    capless_scores = harness.PionLM(capless, tokenizer).loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (ll, _), (ll_capless, _) in zip(pairs, scores, capless_scores):
        if context:
            context_ids = tokenizer.encode(context).ids
            continuation_ids = tokenizer.encode(context + continuation).ids[len(context_ids):]
        else:  # an empty context is EOS, as every document follows one in training
            context_ids, continuation_ids = [EOS_ID], tokenizer.encode(continuation).ids
        assert abs(ll - reference_log_likelihood(capped, context_ids, continuation_ids)) <= 1e-4
        assert abs(ll - ll_capless) > 1e-3


def test_long_soft_capped_contexts_run_in_smaller_batches_with_the_same_scores(tokenizer, monkeypatch):
    lm = harness.PionLM(tiny_pion(), tokenizer, batch_size=8, progress=False)
    rows = mc_rows(4, seed=3)[1:]  # without the over-long question, whose truncation differs per choice
    requests = [lm_eval.api.instance.Instance("loglikelihood", {}, (f"Question: {row['question']}\nAnswer:", " " + c),
                                              i) for i, row in enumerate(rows) for c in row["choices"]]
    batched = lm.loglikelihood(requests, disable_tqdm=True)
    batch_sizes = []
    score_batch = lm._score_batch
    lm._score_batch = lambda prefixes, scored: (batch_sizes.append(len(prefixes)), score_batch(prefixes, scored))[1]
    monkeypatch.setattr(harness, "SCORE_BYTES", 1)  # every batch over budget: one question at a time
    one_by_one = lm.loglikelihood(requests, disable_tqdm=True)
    assert set(batch_sizes) == {1} and len(batch_sizes) == len(rows)  # one prefix per question
    for (ll, greedy), (ll_one, greedy_one) in zip(batched, one_by_one):
        assert abs(ll - ll_one) <= 1e-4 and greedy == greedy_one


def test_only_the_scored_positions_reach_the_vocabulary_projection(exported, tokenizer):
    pion = exported[0]
    projected_rows = []
    logits = pion.logits
    pion.logits = lambda hidden: (projected_rows.append(hidden.shape[0]), logits(hidden))[1]
    try:
        pairs = [("one two three four five six", " seven eight"), ("a b c d", " e")]
        requests = [lm_eval.api.instance.Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        harness.PionLM(pion, tokenizer).loglikelihood(requests, disable_tqdm=True)
    finally:
        del pion.logits
    assert sum(projected_rows) == len(tokenizer.encode(" seven eight").ids) + len(tokenizer.encode(" e").ids)


def test_rolling_log_likelihood_sums_every_token_once_after_eos(tokenizer):
    pion = tiny_pion(max_seq_len=16)
    text = " ".join(WORDS * 2)  # longer than 16 tokens: several windows
    request = lm_eval.api.instance.Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = harness.PionLM(pion, tokenizer).loglikelihood_rolling([request], disable_tqdm=True)
    ids = tokenizer.encode(text).ids
    assert len(ids) > 16
    # The harness's windows: the first predicts 16 tokens after EOS; each later one the next (up to) 16
    # tokens, from an input of the 16 tokens before its last one.
    expected, start = reference_log_likelihood(pion, [EOS_ID], ids[:16]), 16
    while start < len(ids):
        end = min(start + 16, len(ids))
        window = ids[end - 17:end]
        expected += reference_log_likelihood(pion, window[:-(end - start)], window[-(end - start):])
        start = end
    assert total == pytest.approx(expected, abs=1e-3)


def test_the_harness_gets_the_template_of_chat_template_py(tokenizer):
    lm = harness.PionLM(tiny_pion(), tokenizer)
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to 3."}]
    assert lm.apply_chat_template(chat) == chat_template.render_text(chat, add_generation_prompt=True)
    assert lm.chat_template(True) == chat_template.CHAT_TEMPLATE and lm.tokenizer_name.startswith("pion")


def test_chat_template_trims_each_turn_as_the_hf_backend_does(hf_lm, tokenizer):
    """The harness's system prompt (a task's description) ends in "\\n\\n" and its turns in their delimiters;
    SFT training and the exported template strip them, so no blank line comes before the next turn."""
    lm = harness.PionLM(tiny_pion(), tokenizer)
    chat = [{"role": "system", "content": "Answer with one word.\n\n"}, {"role": "user", "content": " Sky? "},
            {"role": "assistant", "content": "Blue.\n\n"}, {"role": "user", "content": "Grass?\n"}]
    assert lm.apply_chat_template(chat) == hf_lm.apply_chat_template(chat)


def test_chat_template_ends_at_a_gen_prefix_as_the_hf_backend_does(hf_lm, tokenizer):
    """With a task's gen_prefix the harness asks for no generation prompt and puts the prefix in a last
    assistant turn; the hf backend continues that turn, so the choices follow the prefix, not an end of text."""
    lm = harness.PionLM(tiny_pion(), tokenizer)
    chat = [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Answer: blue"},
            {"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Answer:"}]
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == \
        hf_lm.apply_chat_template(chat, add_generation_prompt=False)


def test_scoring_runs_in_inference_mode_and_puts_a_training_model_back_in_train_mode(tokenizer):
    """The trainers call the harness mid-run, on the model they train."""
    model = tiny_pion().train()
    seen = []
    model.layers[0].register_forward_hook(
        lambda block, args, out: seen.append((block.training, torch.is_inference_mode_enabled())))
    lm = harness.PionLM(model, tokenizer, progress=False)
    lm._loglikelihood_tokens([(None, [5, 6, 7], [8, 9])])
    assert model.training and seen and all(mode == (False, True) for mode in seen)


def test_the_harness_builds_pion_from_its_registered_name(exported, tokenizer_path):
    from lm_eval.api.registry import get_model
    lm = get_model("pion").create_from_arg_string(f"checkpoint={exported[1]},tokenizer={tokenizer_path}",
                                                  {"batch_size": 4, "device": "cpu", "max_batch_size": None})
    assert isinstance(lm, harness.PionLM) and lm.batch_size == 4 and lm.max_length == 128
    assert str(lm.device) == "cpu" and not lm.model.training


def test_apply_chat_template_prompts_with_the_sft_turns(manager, tokenizer):
    lm = harness.PionLM(tiny_pion(), tokenizer, progress=False)
    results = harness.run_tasks(lm, [MC_TASK], manager, limit=2, apply_chat_template=True, log_samples=True)
    context = results["samples"][MC_TASK][0]["arguments"][0][0]
    assert context.startswith("<|user|>\nQuestion:") and context.endswith("\n<|assistant|>\n")


# ---------------------------------------------------------------------------------------------------
# eval.py


def run_eval(*args):
    import eval as eval_script
    return run_in_process(eval_script.main, list(args))


def test_eval_prints_the_table_and_writes_the_json(exported, tasks, tmp_path, tokenizer_path):
    result = run_eval("--checkpoint", exported[1], "--tasks", f"{MC_TASK},{GEN_TASK}", "--include_path", tasks,
                      "--tokenizer", tokenizer_path, "--device", "cpu", "--batch_size", "8", "--limit", "10",
                      "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert MC_TASK in result.stdout and "acc" in result.stdout and "|" in result.stdout
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert set(saved["results"]) == {MC_TASK, GEN_TASK}


@pytest.mark.slow
def test_unknown_task_is_one_line(exported, tasks, tokenizer_path):
    result = run_eval("--checkpoint", exported[1], "--tasks", "no_such_task", "--include_path", tasks,
                      "--tokenizer", tokenizer_path)
    assert_one_line_error(result, "no_such_task")


def test_missing_checkpoint_is_one_line(tasks, tmp_path, tokenizer_path):
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", MC_TASK, "--include_path", tasks,
                      "--tokenizer", tokenizer_path)
    assert_one_line_error(result, "nope.pt")


def test_an_existing_results_file_is_never_overwritten(tasks, tmp_path, tokenizer_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"earlier": "results"}')
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", MC_TASK, "--include_path", tasks,
                      "--tokenizer", tokenizer_path, "--output_path", tmp_path / "out")
    assert_one_line_error(result, f"{tmp_path / 'out' / 'results.json'} already exists")
    assert (tmp_path / "out" / "results.json").read_text() == '{"earlier": "results"}'


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_path_that_cannot_be_a_folder_is_refused_before_evaluating(tasks, tmp_path, tokenizer_path, below):
    (tmp_path / "file").write_text("mine")
    output_path = tmp_path / "file" / below if below else tmp_path / "file"
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", MC_TASK, "--include_path", tasks,
                      "--tokenizer", tokenizer_path, "--output_path", output_path)
    assert_one_line_error(result, f"{tmp_path / 'file'} is a file")  # not the missing checkpoint: it comes first
    assert (tmp_path / "file").read_text() == "mine"


def own_task(folder, yaml_text):
    """A folder holding one task YAML file of the user's own, over one multiple-choice row."""
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    (folder / "task.yaml").write_text(yaml_text.replace("ROWS", str(folder / "rows.jsonl")))
    return folder


OWN_TASK = """task: own_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: ROWS
test_split: test
output_type: multiple_choice
doc_to_target: answer
"""


@pytest.mark.slow
def test_a_task_yaml_that_does_not_parse_is_named_with_its_error(tmp_path, tokenizer_path):
    folder = own_task(tmp_path / "tasks", OWN_TASK + "doc_to_text: [unclosed\n")
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", "own_task", "--include_path", folder,
                      "--tokenizer", tokenizer_path)
    assert_one_line_error(result, f"{folder / 'task.yaml'} is not valid YAML (")


def test_a_task_without_doc_to_text_or_doc_to_choice_is_one_line(tmp_path, tokenizer_path):
    folder = own_task(tmp_path / "tasks", OWN_TASK + 'doc_to_text: "{{question}}"\n')
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", "own_task", "--include_path", folder,
                      "--tokenizer", tokenizer_path)
    assert_one_line_error(result, f"{folder / 'task.yaml'}: task own_task has no doc_to_choice")


def test_a_task_with_a_bad_jinja_template_is_one_line(tmp_path, tokenizer_path):
    folder = own_task(tmp_path / "tasks", OWN_TASK + 'doc_to_text: "Q: {{question"\ndoc_to_choice: "{{choices}}"\n')
    result = run_eval("--checkpoint", tmp_path / "nope.pt", "--tasks", "own_task", "--include_path", folder,
                      "--tokenizer", tokenizer_path)
    assert_one_line_error(result, "cannot build task(s) own_task from their configuration (TemplateSyntaxError",
                          after_progress=True)  # after datasets' progress bar


@pytest.mark.slow
def test_a_task_whose_data_is_on_the_unreachable_hub_is_one_line(exported, tokenizer_path):
    result = run_eval("--checkpoint", exported[1], "--tasks", "hellaswag", "--tokenizer", tokenizer_path)
    assert_one_line_error(result, "hellaswag")


# ---------------------------------------------------------------------------------------------------
# Benchmarks during training (train.py --eval_tasks)

REAL_VOCAB_TINY = ["--override", "vocab_size=50258", "--sample_tokens", "0"]  # test_train's tiny model, real vocabulary


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import numpy as np
    path = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(path / f"shard_{i:05d}.npy", rng.integers(3, 50000, size=(48, 64)).astype(np.uint16))
    return path


def train_records(save_dir):
    with open(os.path.join(save_dir, "nano", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_training_logs_benchmark_scores_at_each_eval(shards, tasks, tmp_path, tokenizer_path):
    from conftest import run_train
    result = run_train([*REAL_VOCAB_TINY, "--data_dir", shards, "--save_dir", tmp_path, "--eval_tasks", MC_TASK,
                        "--eval_limit", 8, "--eval_include_path", tasks], tokenizer_path)
    assert result.returncode == 0, result.stderr
    evals = [r for r in train_records(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for record in evals:
        assert {"val_bpb", f"eval/{MC_TASK}/acc", f"eval/{MC_TASK}/acc_norm"} <= set(record)
        assert record[f"eval/{MC_TASK}/acc"] in {k / 8 for k in range(9)}  # 8 questions scored
    assert f"eval/{MC_TASK}/acc" in result.stdout


@pytest.mark.slow
def test_benchmarks_leave_the_training_run_unchanged(shards, tasks, tmp_path, tokenizer_path):
    """The harness seeds the global RNGs; with dropout on, a changed RNG stream would change the losses."""
    from conftest import run_train
    common = [*REAL_VOCAB_TINY, "--override", "dropout=0.1", "--data_dir", shards]
    plain = run_train([*common, "--save_dir", tmp_path / "a"], tokenizer_path)
    scored = run_train([*common, "--save_dir", tmp_path / "b", "--eval_tasks", MC_TASK, "--eval_limit", 4,
                        "--eval_include_path", tasks], tokenizer_path)
    assert plain.returncode == 0 and scored.returncode == 0, plain.stderr + scored.stderr
    losses = lambda path: [r["loss"] for r in train_records(path) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.slow
def test_training_without_eval_tasks_never_imports_lm_eval(shards, tmp_path, tokenizer_path):
    code = ("import sys, train, cli; from conftest import TINY_MODEL_FLAGS as TINY; "
            f"cli.run_cli(lambda: train.main(TINY + ['--override', 'vocab_size=50258', '--data_dir', {str(shards)!r}, '--save_dir', {str(tmp_path)!r}, "
            f"'--max_steps', '2', '--eval_interval', '1', '--sample_tokens', '0', '--seq_len', '32', '--batch_size', '2', '--num_workers', "
            f"'0', '--tokenizer', {tokenizer_path!r}])); "
            "assert not [m for m in sys.modules if m.startswith('lm_eval')], 'lm_eval imported'")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_processes_split_the_requests_and_report_the_same_scores(shards, tasks, tmp_path, tokenizer_path,
                                                                      sharding):
    """An eval at step 2, then one more step: the scores and the training after them match one process."""
    from conftest import run_train
    flags = [*REAL_VOCAB_TINY, "--data_dir", shards, "--eval_tasks", f"{MC_TASK},{GEN_TASK}", "--eval_limit", 9,
             "--eval_include_path", tasks, "--max_steps", 3, "--eval_interval", 2]
    single = run_train([*flags, "--save_dir", tmp_path / "one", "--batch_size", 4], tokenizer_path)
    assert single.returncode == 0, single.stderr
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    double = run_train([*flags, "--save_dir", tmp_path / "two", "--batch_size", 2, *sharding], tokenizer_path,
                       launcher=torchrun)
    assert double.returncode == 0, double.stderr
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    evals_one, evals_two = [r for r in one if "val_loss" in r], [r for r in two if "val_loss" in r]
    assert [r["step"] for r in evals_one] == [r["step"] for r in evals_two] == [2, 3]
    for a, b in zip(evals_one, evals_two):
        scores = [key for key in a if key.startswith("eval/")]
        assert {f"eval/{MC_TASK}/acc", f"eval/{GEN_TASK}/exact_match"} <= set(scores)
        for key in scores:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    losses = lambda records: [r["loss"] for r in records if "loss" in r]  # noqa: E731
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)


@pytest.mark.slow
def test_finetuning_logs_val_bpb_and_benchmark_scores(tasks, tmp_path, tokenizer_path):
    import finetune
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                      {"role": "assistant", "content": f"{w.title()}."}]}) + "\n"
                             for w in WORDS))
    save_tiny_checkpoint(tmp_path / "base.pt")
    result = run_in_process(finetune.main, [
        "--checkpoint", tmp_path / "base.pt", "--data_file", chats, "--tokenizer", tokenizer_path,
        "--save_dir", tmp_path / "ck", "--seq_len", 64, "--batch_size", 4, "--max_steps", 2, "--eval_interval", 2,
        "--tokenize_workers", 0, "--sample_tokens", 0, "--eval_tasks", MC_TASK, "--eval_limit", 4,
        "--eval_include_path", tasks])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "ck" / "sft" / "metrics.jsonl") as f:
        (record,) = [r for r in map(json.loads, f) if "val_loss" in r]
    assert record["step"] == 2 and record["val_bpb"] > 0 and f"eval/{MC_TASK}/acc" in record


def test_the_harness_during_training_gets_eval_batch_size_not_the_training_batch(shards, tmp_path, tokenizer_path,
                                                                                  monkeypatch):
    import harness
    from conftest import run_train
    asked = []
    monkeypatch.setattr(harness, "benchmark_scorer", lambda *args: asked.append(args[-1]))
    result = run_train([*REAL_VOCAB_TINY, "--data_dir", shards, "--save_dir", tmp_path, "--max_steps", 1,
                        "--eval_tasks", MC_TASK, "--eval_batch_size", 3], tokenizer_path)
    assert result.returncode == 0, result.stderr
    assert asked == [3]
