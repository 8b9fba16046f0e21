"""decoding.py: the KV-cached engine against a naive loop, sampling, batching, streaming text, compiled
decoding, and the host side (reading tokens in blocks, timing them)."""
import os
import random
import re

import pytest
import torch

from chat_template import CHAT_TURN
from conftest import ROOT, run_script, tiny_model
from decoding import SamplingSettings
from tokenizer import EOS_ID, PAD_ID
import decoding


def naive_greedy(m, prompt, max_new_tokens):
    """The definition: run the whole sequence through the model every step, take the argmax, stop at EOS."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = m(torch.tensor([ids]))["logits"][0, -1].argmax().item()
            if token == EOS_ID:
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

    monkeypatch.setattr(decoding, "sample_next_token", next_tokens)
    return calls


@pytest.mark.parametrize("soft_cap", [True, False])
def test_greedy_generation_equals_a_naive_argmax_loop(soft_cap):
    m = tiny_model(use_soft_cap=soft_cap)
    prompt = [5, 17, 42, 8, 99, 23]
    assert decoding.generate(m, prompt, 25) == [naive_greedy(m, prompt, 25)]


def test_a_tensor_prompt_and_a_list_prompt_give_the_same_tokens():
    m = tiny_model()
    assert decoding.generate(m, torch.tensor([5, 6, 7]), 8) == decoding.generate(m, [[5, 6, 7]], 8)


def test_generation_stops_at_endoftext_and_finished_rows_wait_for_the_others(monkeypatch):
    calls = scripted_sampling(monkeypatch, [[5, EOS_ID, 9, 9, 9], [6, 7, 8, EOS_ID, 9]])
    assert decoding.generate(tiny_model(), [[3, 4], [3, 4]], 10) == [[5], [6, 7, 8]]
    assert len(calls) == 4  # stopped as soon as the last row finished, not at max_new_tokens


def test_max_new_tokens_is_exact():
    assert [len(row) for row in decoding.generate(tiny_model(), [[5, 6], [7, 8, 9]], 7, stop_ids=())] == [7, 7]


def test_the_token_generator_yields_one_column_per_step():
    columns = list(decoding.generate_tokens(tiny_model(), [[5, 6], [7, 8, 9]], 7))
    assert len(columns) == 7 and all(column.shape == (2,) for column in columns)


def test_the_decode_timer_counts_steps_rows_and_prompt_tokens():
    timer = decoding.DecodeTimer(decoding.generate_tokens(tiny_model(), [[5, 6], [7, 8, 9]], 7), prompt_tokens=5)
    assert len(list(timer)) == 7 and (timer.steps, timer.rows) == (7, 2)
    assert re.fullmatch(r"7 tokens x 2 row\(s\); prefill of 5 tokens [\d.]+ tokens/s, decode [\d.]+ tokens/s",
                        timer.report())


def test_batched_prompts_of_different_lengths_equal_each_alone():
    m = tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33]]
    batched = decoding.generate(m, prompts, 15)
    for prompt, row in zip(prompts, batched):
        assert row == decoding.generate(m, prompt, 15)[0] == naive_greedy(m, prompt, 15)


def test_a_too_long_prompt_keeps_its_last_tokens_with_a_warning():
    m = tiny_model()  # max_seq_len 64
    prompt = [3 + i % 90 for i in range(80)]
    with pytest.warns(decoding.PromptTruncatedWarning, match="keeping its last 54"):
        out = decoding.generate(m, prompt, 10)
    assert out == [naive_greedy(m, prompt[-54:], 10)]


def test_a_model_in_train_mode_is_sampled_in_eval_mode_and_put_back():
    m = tiny_model(dropout=0.5).train()
    out = decoding.generate(m, [5, 6, 7], 10)
    assert m.training
    assert out == [naive_greedy(m.eval(), [5, 6, 7], 10)]  # dropout was off while generating


def test_generation_records_no_autograd_history():
    """Decoding runs in inference mode: with autograd on, every step would chain the in-place cache writes of
    all earlier steps into one growing graph, and a compiled step would be traced for training."""
    m = tiny_model()
    modes = []
    m.layers[0].register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    decoding.generate(m, [5, 6, 7], 4)
    assert modes and all(modes)  # the prefill and every decode step


def test_an_empty_prompt_starts_from_endoftext():
    m = tiny_model()
    assert decoding.generate(m, [], 5) == [naive_greedy(m, [EOS_ID], 5)]


# ---------------------------------------------------------------------------------------------------
# Sampling


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    m = tiny_model()

    def sample(seed):
        return decoding.generate(m, [[5, 6, 7], [8]], 20, SamplingSettings(temperature=1.0, top_p=0.95),
                          generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_1_is_greedy():
    m = tiny_model()
    sampled = decoding.generate(m, [5, 6, 7], 20, SamplingSettings(temperature=1.5, top_k=1),
                         generator=torch.Generator().manual_seed(0))
    assert sampled == decoding.generate(m, [5, 6, 7], 20)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-324])
def test_a_tiny_temperature_samples_greedily_not_from_nan(temperature):
    m = tiny_model()
    sampled = decoding.generate(m, [5, 6, 7], 20, SamplingSettings(temperature=temperature),
                         generator=torch.Generator().manual_seed(0))
    assert sampled == decoding.generate(m, [5, 6, 7], 20)


def draws(logits, n=400, seen=None, **settings):
    config = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0), **settings}
    generator = torch.Generator().manual_seed(0)
    batch = torch.tensor(logits).repeat(n, 1)
    seen = None if seen is None else torch.tensor(seen).repeat(n, 1)
    return set(decoding.sample_next_token(batch, seen, SamplingSettings(**config), generator).tolist())


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
    batched = decoding.generate(m, prompts, 10, SamplingSettings(temperature=0, repetition_penalty=1.3))
    penalized = SamplingSettings(temperature=0, repetition_penalty=1.3)
    assert batched == [decoding.generate(m, p, 10, penalized)[0] for p in prompts]
    assert batched != decoding.generate(m, prompts, 10)


# ---------------------------------------------------------------------------------------------------
# Streaming text


def stream_pieces(tokenizer, ids):
    detokenizer = decoding.StreamingDetokenizer(tokenizer)
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
        ids = [random.choice(text_ids + byte_ids + [PAD_ID]) for _ in range(random.randrange(1, 60))]
        detokenizer = decoding.StreamingDetokenizer(tokenizer)
        pieces = []
        for i in ids:
            pieces.append(detokenizer.push(i))
            assert len(detokenizer.ids) - detokenizer.start <= 16  # decoding restarts near the end
        assert "".join(pieces + [detokenizer.flush()]) == tokenizer.decode(ids)


def test_a_stop_string_ends_the_row_and_no_part_of_it_is_shown(monkeypatch, tokenizer):
    ids = tokenizer.encode("Sure, here it is.\n<|user|>\nmore text").ids
    calls = scripted_sampling(monkeypatch, [ids])
    stream = decoding.TextStream(tokenizer, stop_strings=["<|user|>"])
    columns = decoding.generate_tokens(tiny_model(vocab_size=50258), [5, 6], 50)
    shown = [piece for _, piece in decoding.stream_text(columns, [stream])]
    assert stream.text == "Sure, here it is.\n" and "".join(shown) == stream.text
    assert not any("<" in piece for piece in shown)  # the partial match was held back, then dropped
    stop_ends = next(i for i in range(len(ids)) if "<|user|>" in tokenizer.decode(ids[:i + 1]))
    assert len(calls) == stop_ends + 1  # stopped at the stop string's last token


class CharacterTokenizer:
    """Each id is one character: streams can be fed text exactly, split anywhere."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def streamed_reply(text, end=EOS_ID, stop_strings=(), max_tokens=None, turn=CHAT_TURN):
    """(pieces the stream released, the stream) after feeding `text` then `end` (a stop id, or None: no more)."""
    stream = decoding.TextStream(CharacterTokenizer(), stop_strings, max_tokens=max_tokens, turn=turn)
    pieces = [stream.add(ord(c)) for c in text if not stream.finished]
    pieces.append(stream.add(end) if end is not None and not stream.finished else stream.finish())
    return pieces, stream


@pytest.mark.parametrize("ending", ["", "<|user|>\nmore"])
def test_a_chat_reply_that_ends_its_turn_loses_the_turn_suffix_only(ending):
    assert streamed_reply("Blue.\n" + ending)[1].text == "Blue."
    assert streamed_reply("Blue.\n\n" + ending)[1].text == "Blue.\n"  # only the template's one newline


def test_a_chat_reply_cut_by_its_budget_or_a_caller_s_stop_string_keeps_its_newline():
    assert streamed_reply("Blue.\n", end=None, max_tokens=6)[1].text == "Blue.\n"
    _, stream = streamed_reply("Blue.\nEND", stop_strings=["END"])
    assert (stream.text, stream.finish_reason, stream.stop_reason) == ("Blue.\n", "stop", "END")


@pytest.mark.parametrize("end", [EOS_ID, None])
@pytest.mark.parametrize("text", ["Blue.\n", "Blue.\n\n", "One\ntwo\n", "\n", "no newline", "a\n<|us", "x\n<|user|>"])
def test_a_chat_reply_streamed_piece_by_piece_is_its_whole_content(text, end):
    pieces, stream = streamed_reply(text, end)
    assert "".join(pieces) == stream.text and stream.finished
    assert not any("<|user|>".startswith(piece) and piece.startswith("<") for piece in pieces if piece)


def test_the_stream_holds_back_only_what_may_be_the_turn_suffix():
    stream = decoding.TextStream(CharacterTokenizer(), turn=CHAT_TURN)
    assert "".join(stream.add(ord(c)) for c in "Blue.\n") == "Blue."
    assert "".join(stream.add(ord(c)) for c in "Green") == "\nGreen"


def test_a_row_ends_at_its_token_budget_with_the_stop_id_counted():
    pieces, stream = streamed_reply("abcdef", end=None, max_tokens=3, turn=None)
    assert (stream.text, stream.finish_reason, stream.tokens) == ("abc", "length", 3)
    _, stream = streamed_reply("ab", turn=None)
    assert (stream.text, stream.finish_reason, stream.stop_reason, stream.tokens) == ("ab", "stop", EOS_ID, 3)


def test_text_that_only_looks_like_a_stop_string_is_released(monkeypatch, tokenizer):
    ids = tokenizer.encode("a <|use it <|").ids
    scripted_sampling(monkeypatch, [ids])
    texts = decoding.generate_text(tiny_model(vocab_size=50258), tokenizer, [5], len(ids), stop_strings=["<|user|>"])
    assert texts == ["a <|use it <|"]


# ---------------------------------------------------------------------------------------------------
# Command line

# The report line each answer ends with. Its token count is not asserted where the text is sampled: a random
# model can sample <|endoftext|> (most likely right after an empty prompt's), which ends the answer early.


# The compile tests share one model shape and config (tiny_checkpoint's), so torch.compile's graphs are
# built once for the whole session and reused, in-process, by the CLI and chat tests.


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_as_eager(tiny_checkpoint):
    m = tiny_checkpoint[1]
    # Rows at different positions, then one row at one position: the compiled step must serve both.
    for prompts, n in (([[5, 6, 7], [8, 9]], 12), ([[10, 11, 12, 13]], 12)):
        eager = decoding.generate(m, prompts, n, stop_ids=())
        assert decoding.generate(m, prompts, n, stop_ids=(), compile=True) == eager


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



def test_host_columns_reads_blocks_of_columns_in_order(monkeypatch):
    monkeypatch.setattr(decoding, "tokens_per_sync", lambda device: 3)
    columns = [torch.tensor([i, 10 + i]) for i in range(7)]
    assert list(decoding.host_columns(iter(columns))) == [[i, 10 + i] for i in range(7)]


def test_host_columns_reads_each_cpu_column_as_it_comes():
    """On the CPU a step past a row's end would be computed for nothing: no column is asked for early."""
    asked = []

    def columns():
        for i in range(3):
            asked.append(i)
            yield torch.tensor([i])
    reader = decoding.host_columns(columns())
    assert next(reader) == [0] and asked == [0]


def test_reading_tokens_in_blocks_changes_no_output(monkeypatch):
    """What CUDA does (a sync per CUDA_TOKENS_PER_SYNC steps), here on the CPU: the rows, their stops and
    their lengths are those of a read per step, with extra steps past the end left unread."""
    m = tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    per_step = decoding.generate(m, prompts, 20, stop_ids=(45,))
    assert 0 < len(per_step[0]) < 20 == len(per_step[1])  # one row stops mid-block, the other runs out
    monkeypatch.setattr(decoding, "tokens_per_sync", lambda device: 8)
    assert decoding.generate(m, prompts, 20, stop_ids=(45,)) == per_step


def test_the_decode_timer_times_the_steps_after_the_second_as_a_whole():
    timer = decoding.DecodeTimer(iter([torch.zeros(1)] * 6), prompt_tokens=4)
    assert len(list(timer)) == 6
    assert timer.steps == 6 and timer.decode_seconds > 0
    assert timer.report().startswith("6 tokens x 1 row(s)") and "decode" in timer.report()
