"""bench/bench_recipe.py's pieces: the held-out split, the batches every run shares, the matched models, the
tokens a curve needs to reach a loss; and its --dry_run end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_recipe  # noqa: E402  (bench/ on the path)


def test_the_held_out_split_keeps_documents_whole_and_ignores_their_order():
    documents = [(f"doc{i}.py", f"text of document {i}") for i in range(400)]
    train, val = bench_recipe.split_documents(documents)
    assert sorted(train + val) == sorted(documents) and not set(train) & set(val)
    assert 0.02 < len(val) / len(documents) < 0.1
    assert bench_recipe.split_documents(documents[::-1])[1] == val[::-1]


def test_a_text_file_is_cut_into_documents_of_whole_paragraphs(tmp_path):
    paragraphs = [f"paragraph {i} " * 50 for i in range(40)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs))
    documents = bench_recipe.text_documents([str(path)])
    assert len(documents) > 1
    assert "\n\n".join(text for _, text in documents).split("\n\n") == paragraphs


def test_every_run_gets_the_same_batches():
    stream = np.arange(10_000)
    first = bench_recipe.training_batches(stream, steps=5, batch_size=3, seq_len=16)
    assert first.shape == (5, 3, 16)
    assert torch.equal(first, bench_recipe.training_batches(stream, steps=5, batch_size=3, seq_len=16))
    assert torch.equal(first[..., 1:] - first[..., :-1], torch.ones(5, 3, 15, dtype=first.dtype))  # contiguous text


def test_pion_is_matched_to_the_peer_in_width_depth_and_parameters():
    args = bench_recipe.parse_args(["--width", "96", "--depth", "3", "--seq_len", "64"])
    peer = bench_recipe.peer_model(args, vocab=1000).num_parameters()
    config = bench_recipe.pion_config(args, 1000, peer)
    assert (config.d_model, config.n_layers) == (96, 3)
    with torch.device("meta"):
        assert abs(bench_recipe.pion.Pion(config).count_parameters() - peer) / peer < 0.01


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert bench_recipe.tokens_to_reach(curve, 3.5) == pytest.approx(250)
    assert bench_recipe.tokens_to_reach(curve, 5.5) == 100
    assert bench_recipe.tokens_to_reach(curve, 3.0) == 300
    assert bench_recipe.tokens_to_reach(curve, 2.9) is None


@pytest.mark.slow
def test_the_dry_run_trains_every_recipe_and_draws_the_curves(tmp_path):
    plot = tmp_path / "curves.png"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_recipe.py"), "--dry_run", "--plot",
                          str(plot)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("GPT-2, nanoGPT recipe", "Pion, Muon", "soft-cap off", "peer's best", "Pion with Muon"):
        assert line in out.stdout
    assert plot.stat().st_size > 0
