"""generate.py, the command line: prompts, streaming, sampling flags, interactive mode, errors."""
import io
import re
import sys

import pytest

from cli import PionError
from conftest import assert_one_line_error, run_in_process, run_script, tiny_model
from checkpoint import save_checkpoint
import generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random model with the tokenizer's vocabulary, so any text prompt works and every id it samples
    is text."""
    m = tiny_model(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                   max_seq_len=256)
    path = str(tmp_path_factory.mktemp("generate") / "tiny.pt")
    save_checkpoint(path, {"model": m.state_dict(), "config": m.config})
    return path


TOKENIZER_FLAGS = []  # set by offline_tokenizer


@pytest.fixture(autouse=True, scope="module")
def offline_tokenizer(tokenizer_path):
    """Every generate.py run gets the tests' tokenizer first: a fresh clone has no pile_tokenizer.json and the
    tests no network to fetch it (a test's own --tokenizer, later in its argv, still wins)."""
    TOKENIZER_FLAGS[:] = ["--tokenizer", tokenizer_path]


def run_generate(argv):
    """Run generate.py's CLI in this process (no torch import per call): -> (stdout, stderr)."""
    return run_in_process(generate.main, [*TOKENIZER_FLAGS, *map(str, argv)])


def run_main(argv):
    result = run_generate(argv)
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------------------------------------------
# The decoding loop


ANSWER_REPORT = re.compile(r"^\d+ tokens x 1 row\(s\); prefill", re.M)


def test_cli_prints_the_continuation_the_speed_and_the_bandwidth_utilization(checkpoint, tokenizer):
    result = run_main(["--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max_tokens", "12",
                         "--temperature", "0"])
    out, err = result.stdout, result.stderr
    prompt_tokens = len(tokenizer.encode("Once upon a time").ids)
    assert out.startswith("Once upon a time")
    assert re.search(rf"^12 tokens x 1 row\(s\); prefill of {prompt_tokens} tokens [\d.]+ tokens/s, decode [\d.]+ tokens/s, "
                     r"MBU \d+% \([\d,]+ MB a step of [\d,]+ GB/s\)$", err, re.M)


def test_cli_reports_only_the_kept_tokens_of_a_truncated_prompt_as_prefilled(checkpoint):
    # max_seq_len 256 and 6 new tokens keep the last 250 tokens of this far longer prompt.
    result = run_main(["--checkpoint", checkpoint, "--prompt", "a b c " * 400, "--max_tokens", "6",
                       "--temperature", "0"])
    assert re.search(r"^\d+ tokens x 1 row\(s\); prefill of 250 tokens ", result.stderr, re.M), result.stderr


def test_cli_counts_the_end_of_text_token_an_empty_prompt_starts_from_as_prefilled(checkpoint):
    result = run_main(["--checkpoint", checkpoint, "--prompt", "", "--max_tokens", "6", "--temperature", "0"])
    assert re.search(r"^\d+ tokens x 1 row\(s\); prefill of 1 tokens ", result.stderr, re.M), result.stderr


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
    result = run_generate(["--checkpoint", checkpoint, "--prompt", "Hi", "--max_tokens", "256"])
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
        generate.parse_args(["--checkpoint", "x.pt"] + flags)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt", "--prompt", "x"], "checkpoint not found: nowhere.pt"),
    (["--checkpoint", "x.pt", "--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--checkpoint", "x.pt", "--seed", "-1"], "argument --seed"),
    (["--checkpoint", "x.pt", "--seed", "1e23"], "argument --seed"),
])
def test_cli_errors_are_one_line_and_exit_code_2(args, message):
    assert_one_line_error(run_generate(args), message)


@pytest.mark.slow
def test_cli_runs_end_to_end_in_a_subprocess(checkpoint):
    result = run_script("generate.py", *TOKENIZER_FLAGS, "--checkpoint", checkpoint, "--prompt", "héllo 👋",
                        "--max_tokens", "10", "--device", "cpu", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("héllo 👋") and "10 tokens x 1 row(s); prefill" in result.stderr


def test_the_compile_flag_compiles_the_decode_step_and_says_the_first_answer_waits(tiny_checkpoint, monkeypatch):
    """That compiled decoding gives the eager tokens is tests/test_decoding.py's; here, that the flag reaches it."""
    asked, eager = [], generate.generate_tokens
    monkeypatch.setattr(generate, "generate_tokens",
                        lambda *args, compile=False, **kwargs: asked.append(compile) or eager(*args, **kwargs))
    result = run_main(["--checkpoint", tiny_checkpoint[0], "--prompt", "Once", "--max_tokens", "4", "--compile"])
    assert asked == [True] and "--compile: the first answer waits" in result.stderr
