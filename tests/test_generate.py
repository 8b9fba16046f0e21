"""decoding.py and generate.py: the KV-cached engine against a naive loop, sampling, batching, streaming
text, and the command line."""
import io
import os
import random
import re
import sys

import pytest
import torch

import checkpoint as C
import decoding as D
import generate as G
from cli import PionError
from conftest import ROOT, assert_one_line_error, run_in_process, run_script, tiny_model
from decoding import SamplingSettings


def naive_greedy(m, prompt, max_new_tokens):
    """The definition: run the whole sequence through the model every step, take the argmax, stop at EOS."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = m(torch.tensor([ids]))["logits"][0, -1].argmax().item()
            if token == C.EOS_ID:
                break
            ids.append(token)
            new.append(token)
    return new


def scripted_sampling(monkeypatch, script):
    """Make the sampler return script[row][step]: tests of the loop's bookkeeping, not of the model."""
    steps = iter(torch.tensor(script).T)
    calls = []

    def next_tokens(*args):
        calls.append(1)
        return next(steps)

    monkeypatch.setattr(D, "sample_next_token", next_tokens)
    return calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with the real vocabulary, so any text prompt works."""
    m = tiny_model(vocab_size=50258, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=256)
    path = str(tmp_path_factory.mktemp("generate") / "tiny.pt")
    C.save_checkpoint(path, {"model": m.state_dict(), "config": m.config})
    return path


def run_main(argv):
    """Run generate.py's CLI in this process (no torch import per call): -> (stdout, stderr)."""
    result = run_in_process(G.main, argv)
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------------------------------------------
# The decoding loop


@pytest.mark.parametrize("soft_cap", [True, False])
def test_greedy_generation_equals_a_naive_argmax_loop(soft_cap):
    m = tiny_model(use_soft_cap=soft_cap)
    prompt = [5, 17, 42, 8, 99, 23]
    assert D.generate(m, prompt, 25) == [naive_greedy(m, prompt, 25)]


def test_a_tensor_prompt_and_a_list_prompt_give_the_same_tokens():
    m = tiny_model()
    assert D.generate(m, torch.tensor([5, 6, 7]), 8) == D.generate(m, [[5, 6, 7]], 8)


def test_generation_stops_at_endoftext_and_finished_rows_wait_for_the_others(monkeypatch):
    calls = scripted_sampling(monkeypatch, [[5, C.EOS_ID, 9, 9, 9], [6, 7, 8, C.EOS_ID, 9]])
    assert D.generate(tiny_model(), [[3, 4], [3, 4]], 10) == [[5], [6, 7, 8]]
    assert len(calls) == 4  # stopped as soon as the last row finished, not at max_new_tokens


def test_max_new_tokens_is_exact():
    assert [len(row) for row in D.generate(tiny_model(), [[5, 6], [7, 8, 9]], 7, stop_ids=())] == [7, 7]


def test_the_token_generator_yields_one_column_per_step():
    columns = list(D.generate_tokens(tiny_model(), [[5, 6], [7, 8, 9]], 7))
    assert len(columns) == 7 and all(column.shape == (2,) for column in columns)


def test_the_decode_timer_counts_steps_rows_and_prompt_tokens():
    timer = D.DecodeTimer(D.generate_tokens(tiny_model(), [[5, 6], [7, 8, 9]], 7), prompt_tokens=5)
    assert len(list(timer)) == 7 and (timer.steps, timer.rows) == (7, 2)
    assert re.fullmatch(r"7 tokens x 2 row\(s\); prefill of 5 tokens [\d.]+ tokens/s, decode [\d.]+ tokens/s",
                        timer.report())


def test_batched_prompts_of_different_lengths_equal_each_alone():
    m = tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33]]
    batched = D.generate(m, prompts, 15)
    for prompt, row in zip(prompts, batched):
        assert row == D.generate(m, prompt, 15)[0] == naive_greedy(m, prompt, 15)


def test_a_too_long_prompt_keeps_its_last_tokens_with_a_warning():
    m = tiny_model()  # max_seq_len 64
    prompt = [3 + i % 90 for i in range(80)]
    with pytest.warns(D.PromptTruncatedWarning, match="keeping its last 54"):
        out = D.generate(m, prompt, 10)
    assert out == [naive_greedy(m, prompt[-54:], 10)]


def test_a_model_in_train_mode_is_sampled_in_eval_mode_and_put_back():
    m = tiny_model(dropout=0.5).train()
    out = D.generate(m, [5, 6, 7], 10)
    assert m.training
    assert out == [naive_greedy(m.eval(), [5, 6, 7], 10)]  # dropout was off while generating


def test_generation_records_no_autograd_history():
    """Decoding runs in inference mode: with autograd on, every step would chain the in-place cache writes of
    all earlier steps into one growing graph, and a compiled step would be traced for training."""
    m = tiny_model()
    modes = []
    m.layers[0].register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    D.generate(m, [5, 6, 7], 4)
    assert modes and all(modes)  # the prefill and every decode step


def test_an_empty_prompt_starts_from_endoftext():
    m = tiny_model()
    assert D.generate(m, [], 5) == [naive_greedy(m, [C.EOS_ID], 5)]


# ---------------------------------------------------------------------------------------------------
# Sampling


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    m = tiny_model()

    def sample(seed):
        return D.generate(m, [[5, 6, 7], [8]], 20, SamplingSettings(temperature=1.0, top_p=0.95),
                          generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_1_is_greedy():
    m = tiny_model()
    sampled = D.generate(m, [5, 6, 7], 20, SamplingSettings(temperature=1.5, top_k=1),
                         generator=torch.Generator().manual_seed(0))
    assert sampled == D.generate(m, [5, 6, 7], 20)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-324])
def test_a_tiny_temperature_samples_greedily_not_from_nan(temperature):
    m = tiny_model()
    sampled = D.generate(m, [5, 6, 7], 20, SamplingSettings(temperature=temperature),
                         generator=torch.Generator().manual_seed(0))
    assert sampled == D.generate(m, [5, 6, 7], 20)


def draws(logits, n=400, seen=None, **settings):
    config = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0), **settings}
    generator = torch.Generator().manual_seed(0)
    batch = torch.tensor(logits).repeat(n, 1)
    seen = None if seen is None else torch.tensor(seen).repeat(n, 1)
    return set(D.sample_next_token(batch, seen, SamplingSettings(**config), generator).tolist())


def test_sampling_filters_keep_only_the_tokens_they_should():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().tolist()
    assert draws(logits) == {0, 1, 2, 3}
    assert draws(logits, top_k=2) == {2, 3}
    assert draws(logits, top_p=0.5) == {2, 3}  # 0.4 alone does not reach 0.5; 0.4 + 0.3 does
    assert draws(logits, top_p=0.35) == {3}
    assert draws(logits, min_p=0.6) == {2, 3}  # kept: p >= 0.6 * 0.4
    assert draws(logits, temperature=0) == {3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = [2.0, 1.5, -1.0, -1.2]
    seen = [True, False, True, False]
    assert draws(logits, seen=seen, temperature=0, repetition_penalty=1.5) == {1}  # 2 / 1.5 < 1.5
    assert draws([-1.0, -1.2], seen=[True, False], temperature=0, repetition_penalty=1.5) == {1}  # -1.5 < -1.2


def test_repetition_penalty_counts_prompt_tokens_but_not_padding():
    m = tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    batched = D.generate(m, prompts, 10, SamplingSettings(temperature=0, repetition_penalty=1.3))
    assert batched == [D.generate(m, p, 10, SamplingSettings(temperature=0, repetition_penalty=1.3))[0] for p in prompts]
    assert batched != D.generate(m, prompts, 10)


# ---------------------------------------------------------------------------------------------------
# Streaming text


def stream_pieces(tokenizer, ids):
    detokenizer = D.StreamingDetokenizer(tokenizer)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_streaming_never_breaks_a_character_and_adds_up_to_decode(tokenizer):
    ids = tokenizer.encode("héllo wörld 👋🏽 日本語 ✓ naïve café 😀🎉 中文").ids
    pieces = stream_pieces(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "👋" in pieces  # streamed as soon as complete, not at the end


def test_streaming_of_invalid_bytes_still_adds_up_to_decode_in_bounded_work(tokenizer):
    # An undertrained model writes stray UTF-8 bytes: the text then really contains U+FFFD.
    random.seed(0)
    text_ids = tokenizer.encode("héllo 👋🏽 日本語 ✓").ids
    byte_ids = [tokenizer.token_to_id(c) for c in "ĳĭŀðŁæĹ"]  # continuation and lead bytes on their own
    for _ in range(200):
        ids = [random.choice(text_ids + byte_ids + [C.PAD_ID]) for _ in range(random.randrange(1, 60))]
        detokenizer = D.StreamingDetokenizer(tokenizer)
        pieces = []
        for i in ids:
            pieces.append(detokenizer.push(i))
            assert len(detokenizer.ids) - detokenizer.start <= 16  # decoding restarts near the end
        assert "".join(pieces + [detokenizer.flush()]) == tokenizer.decode(ids)


def test_a_stop_string_ends_the_row_and_no_part_of_it_is_shown(monkeypatch, tokenizer):
    ids = tokenizer.encode("Sure, here it is.\n<|user|>\nmore text").ids
    calls = scripted_sampling(monkeypatch, [ids])
    stream = D.TextStream(tokenizer, stop_strings=["<|user|>"])
    shown = [piece for _, piece in D.stream_text(D.generate_tokens(tiny_model(vocab_size=50258), [5, 6], 50), [stream])]
    assert stream.text == "Sure, here it is.\n" and "".join(shown) == stream.text
    assert not any("<" in piece for piece in shown)  # the partial match was held back, then dropped
    assert len(calls) == ids.index(tokenizer.token_to_id("|>")) + 1  # stopped at the stop string's last token


def test_text_that_only_looks_like_a_stop_string_is_released(monkeypatch, tokenizer):
    ids = tokenizer.encode("a <|use it <|").ids
    scripted_sampling(monkeypatch, [ids])
    texts = D.generate_text(tiny_model(vocab_size=50258), tokenizer, [5], len(ids), stop_strings=["<|user|>"])
    assert texts == ["a <|use it <|"]


# ---------------------------------------------------------------------------------------------------
# Command line

# The report line each answer ends with. Its token count is not asserted where the text is sampled: a random
# model can sample <|endoftext|> (most likely right after an empty prompt's), which ends the answer early.
ANSWER_REPORT = re.compile(r"^\d+ tokens x 1 row\(s\); prefill", re.M)


def test_cli_prints_the_continuation_the_speed_and_the_bandwidth_utilization(checkpoint):
    result = run_main(["--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max_tokens", "12",
                         "--temperature", "0"])
    out, err = result.stdout, result.stderr
    assert out.startswith("Once upon a time")
    assert re.search(r"^12 tokens x 1 row\(s\); prefill of 4 tokens [\d.]+ tokens/s, decode [\d.]+ tokens/s, "
                     r"MBU \d+% \([\d,]+ MB a step of [\d,]+ GB/s\)$", err, re.M)


def test_cli_reports_only_the_kept_tokens_of_a_truncated_prompt_as_prefilled(checkpoint):
    # max_seq_len 256 and 6 new tokens keep the last 250 tokens of this far longer prompt.
    result = run_main(["--checkpoint", checkpoint, "--prompt", "a b c " * 400, "--max_tokens", "6",
                       "--temperature", "0"])
    assert re.search(r"^\d+ tokens x 1 row\(s\); prefill of 250 tokens ", result.stderr, re.M), result.stderr


def test_cli_same_seed_same_text_and_streaming_equals_no_stream(checkpoint):
    argv = ["--checkpoint", checkpoint, "--prompt", "Hello", "--max_tokens", "20", "--top_k", "0", "--seed"]
    first, second = run_main(argv + ["7"]).stdout, run_main(argv + ["7"]).stdout
    assert first == second == run_main(argv + ["7", "--no_stream"]).stdout
    assert first != run_main(argv + ["8"]).stdout


def test_cli_stop_string_is_not_printed(checkpoint):
    argv = ["--checkpoint", checkpoint, "--prompt", "Hi", "--max_tokens", "20", "--temperature", "0"]
    generated = run_main(argv).stdout[len("Hi"):]
    stop = generated[5:8]
    assert run_main(argv + ["--stop", stop]).stdout == "Hi" + generated[:generated.index(stop)] + "\n"


def test_cli_batches_prompts_and_samples(checkpoint):
    result = run_main(["--checkpoint", checkpoint, "--prompt", "Hello", "--prompt", "A longer prompt here",
                         "--num_samples", "2", "--max_tokens", "6", "--temperature", "0"])
    out, err = result.stdout, result.stderr
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 4 and samples[0] == samples[1].replace("2 of 4", "1 of 4")
    assert "6 tokens x 4 row(s)" in err


def test_a_prompt_with_bytes_that_are_not_utf8_is_answered_not_a_crash(checkpoint):
    # As Python hands a shell's $'\xff' or a lone surrogate to the script: lone surrogates in argv.
    for prompt in ["caf\udce9 \udcff", "half \ud800 a pair"]:
        result = run_main(["--checkpoint", checkpoint, "--prompt", prompt, "--max_tokens", "3"])
        assert "\ufffd" in result.stdout


def test_an_interactive_line_that_is_not_utf8_is_answered_and_the_session_goes_on(checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\nHello\n"), encoding="utf-8"))
    result = run_main(["--checkpoint", checkpoint, "--max_tokens", "3"])
    assert len(ANSWER_REPORT.findall(result.stderr)) == 2


def test_more_new_tokens_than_the_context_is_one_line(checkpoint):
    result = run_in_process(G.main, ["--checkpoint", checkpoint, "--prompt", "Hi", "--max_tokens", "256"])
    assert_one_line_error(result, "leave no room for a prompt")


def test_cli_interactive_mode_answers_until_quit(checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nquit\nnever read\n"))
    result = run_main(["--checkpoint", checkpoint, "--max_tokens", "5"])
    out, err = result.stdout, result.stderr
    assert out.count(">>> ") == 3 and len(ANSWER_REPORT.findall(err)) == 2


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature: must be a number >= 0"),
    (["--top_p", "0"], "--top_p: must be a number in (0, 1]"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_k", "-3"], "--top_k: must be an integer >= 0"),
    (["--top_k", "2.5"], "--top_k"),
    (["--min_p", "nan"], "--min_p"),
    (["--repetition_penalty", "0"], "--repetition_penalty: must be a number > 0"),
    (["--max_tokens", "0"], "--max_tokens: must be an integer >= 1"),
    (["--num_samples", "0"], "--num_samples"),
    (["--stop", ""], "--stop: must not be empty"),
    (["--dtype", "int8"], "--dtype"),
])
def test_bad_flag_values_are_rejected_with_one_line(flags, message):
    with pytest.raises(PionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        G.parse_args(["--checkpoint", "x.pt"] + flags)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt", "--prompt", "x"], "checkpoint not found: nowhere.pt"),
    (["--checkpoint", "x.pt", "--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--checkpoint", "x.pt", "--seed", "-1"], "argument --seed"),
    (["--checkpoint", "x.pt", "--seed", "1e23"], "argument --seed"),
])
def test_cli_errors_are_one_line_and_exit_code_2(args, message):
    assert_one_line_error(run_in_process(G.main, args), message)


@pytest.mark.slow
def test_cli_runs_end_to_end_in_a_subprocess(checkpoint):
    result = run_script("generate.py", "--checkpoint", checkpoint, "--prompt", "héllo 👋", "--max_tokens", "10",
                        "--device", "cpu", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("héllo 👋") and "10 tokens x 1 row(s); prefill" in result.stderr


# The compile tests share one model shape and config (tiny_checkpoint's), so torch.compile's graphs are
# built once for the whole session and reused, in-process, by the CLI and chat tests.


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_as_eager(tiny_checkpoint):
    m = tiny_checkpoint[1]
    # Rows at different positions, then one row at one position: the compiled step must serve both.
    for prompts, n in (([[5, 6, 7], [8, 9]], 12), ([[10, 11, 12, 13]], 12)):
        eager = D.generate(m, prompts, n, stop_ids=())
        assert D.generate(m, prompts, n, stop_ids=(), compile=True) == eager


COMPILES_OF_THREE_LENGTHS = """
import torch, decoding
from conftest import tiny_model
from torch._dynamo.utils import counters
m = tiny_model()
for prompt, n in (([5, 6, 7], 8), ([5] * 20, 9), ([7] * 40, 5)):
    assert decoding.generate(m, prompt, n, stop_ids=(), compile=True) == decoding.generate(m, prompt, n, stop_ids=())
print(counters["stats"]["unique_graphs"])
"""


@pytest.mark.slow
def test_compiled_decoding_compiles_once_for_calls_of_any_length():
    """Each call's cache fits its prompt: chat's turns would each bring a new length (a fresh process, so that no
    graph of the other tests counts)."""
    result = run_script("-c", COMPILES_OF_THREE_LENGTHS, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"]


@pytest.mark.slow
def test_the_compile_flag_gives_the_same_text(tiny_checkpoint):
    argv = ["--checkpoint", tiny_checkpoint[0], "--prompt", "Once upon a time", "--max_tokens", "12",
            "--temperature", "0"]
    compiled = run_main(argv + ["--compile"])
    assert compiled.stdout == run_main(argv).stdout and "--compile: the first answer waits" in compiled.stderr
