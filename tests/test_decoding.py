"""decoding.py's host side: reading generated tokens from the device in blocks, and timing them."""
import torch

import decoding
from conftest import tiny_model


def test_host_columns_reads_blocks_of_columns_in_order():
    columns = [torch.tensor([i, 10 + i]) for i in range(7)]
    assert list(decoding.host_columns(iter(columns), per_sync=3)) == [[i, 10 + i] for i in range(7)]


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
