"""Shared test fixtures: tiny models and checkpoints, the tokenizer, an in-process CLI runner, the
one-line error assertion and a tiny model served by server.py."""
import contextlib
import io
import itertools
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tests never reach the network: hub clients fail at once instead of retrying (read when they are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
SHARED_TOKENIZER = os.path.join(ROOT, "..", "shared", "pile_tokenizer.json")
TOKENIZER = os.path.join(ROOT, "pile_tokenizer.json")

import checkpoint  # noqa: E402  (after the path insert)
from tokenizer import PAD_ID, load_tokenizer  # noqa: E402
import cli  # noqa: E402
import decoding  # noqa: E402
import model  # noqa: E402
from chat_template import CHAT_TURN, render_conversation  # noqa: E402

REAL_VOCAB = dict(vocab_size=50258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (compiles, subprocesses, trains)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one): `pytest -m cuda` on the GPU")


# ---------------------------------------------------------------------------------------------------
# Models


def tiny_config(**overrides):
    base = dict(vocab_size=101, d_model=60, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96, max_seq_len=64,
                logit_cap=3.0)
    return model.PionConfig(**{**base, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return model.Pion(tiny_config(**overrides))


def tiny_pion(seed=0, **overrides):
    """A tiny Pion with the real vocabulary (the tokenizer must fit in it) and weights that exercise every
    path: random norm gains, since the all-ones default would hide a swapped or dropped norm, and weights
    larger than the 0.02 init, so that every layer moves the residual stream and greedy decoding follows
    the prompt instead of repeating one token."""
    pion = tiny_model(seed, **{**REAL_VOCAB, **overrides})
    with torch.no_grad():
        for name, param in pion.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.5 if name == "embed.weight" else 0.3)
    return pion.eval()


def save_tiny_checkpoint(path, **overrides):
    """tiny_pion saved as a checkpoint at path; returns the model."""
    pion = tiny_pion(**overrides)
    checkpoint.save_checkpoint(str(path), {"model": pion.state_dict(), "config": pion.config})
    return pion


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved soft-capped tiny_pion with the real vocabulary: (path, model)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    return str(path), save_tiny_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def published_tokenizer():
    """The path of the published Pion tokenizer if this checkout has it (at the repo root, or in ../shared/
    beside it as on CI), else None. PION_TEST_TOKENIZER=built makes the suite run as on a fresh clone."""
    if os.environ.get("PION_TEST_TOKENIZER") == "built":
        return None
    if not os.path.exists(TOKENIZER) and os.path.exists(SHARED_TOKENIZER):
        shutil.copyfile(SHARED_TOKENIZER, TOKENIZER)
    return TOKENIZER if os.path.exists(TOKENIZER) else None


def build_tokenizer(path, vocab_size=1000):
    """A small byte-level BPE with Pion's special ids (<|endoftext|>=0, <|pad|>=1, <|unk|>=2), trained on this
    repo's own text in well under a second: what tests that need *a* tokenizer use on a fresh, offline clone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = []
    for name in sorted(os.listdir(ROOT)):
        if name.endswith((".py", ".md")):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                texts.append(f.read())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>", "<|unk|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A byte-level BPE tokenizer with Pion's special ids: the published one when this checkout has a copy,
    else one built for the session (tests that need the published one itself ask for real_tokenizer_path)."""
    return published_tokenizer() or build_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def real_tokenizer_path():
    """The published tokenizer, for the tests about it; skipped on a checkout without a copy."""
    path = published_tokenizer()
    if path is None:
        pytest.skip("needs the published pile_tokenizer.json: put a copy at the repo root (python -c "
                    "'import tokenizer; tokenizer.load_tokenizer()' fetches it) or in ../shared/")
    return path


@pytest.fixture(scope="session")
def real_tokenizer(real_tokenizer_path):
    return load_tokenizer(real_tokenizer_path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


# ---------------------------------------------------------------------------------------------------
# Running the scripts


def saved_tensor_sizes(fn):
    """The sizes (numel) of the tensors autograd saves for backward while fn() runs."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


def run_in_process(main, argv):
    """A script's main(argv) through cli.run_cli, as its command line runs it but without a fresh interpreter:
    -> CompletedProcess with the exit code, stdout and stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        formatwarning = warnings.formatwarning  # scripts install one-line warnings: keep them to this run
        try:
            cli.run_cli(lambda: main(list(map(str, argv))))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            warnings.formatwarning = formatwarning
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_script(script, *args, env=None, timeout=300):
    """python SCRIPT ARGS in a fresh process (for what only a real process shows: signals, exit codes, torchrun)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_one_line_error(result, text="", after_progress=False):
    """Exit code 2, no traceback, and one stderr line `error: ...` containing text: the only line, or with
    after_progress, the only error line among a run's progress output."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if after_progress:
        lines = [line for line in lines if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# A tiny model served by server.py (tests/test_server.py, test_batching.py, test_serve.py)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


@contextlib.contextmanager
def serving(model, tokenizer, max_batch=4, api_key=None, limits=None, sample_rows=None):
    """A real server for the model on a free port of 127.0.0.1 (uvicorn in a thread): yields (base url, engine).
    sample_rows replaces the engine's token source (a scripted reply)."""
    from batching import BatchingEngine
    from server import create_app, serving_in_thread
    engine = BatchingEngine(model, tokenizer, max_batch)
    if sample_rows is not None:
        engine.sample_rows = sample_rows
    engine.start()
    try:
        with serving_in_thread(create_app(engine, tokenizer, "tiny", api_key, limits)) as url:
            yield url, engine
    finally:
        engine.close()


def scripted_reply(tokens, seconds_per_step=0.0):
    """A token source for the engine that writes `tokens` (again and again) whatever the model says."""
    def sample_rows(logits, running):
        time.sleep(seconds_per_step)
        return [tokens[run.stream.tokens % len(tokens)] for run in running]
    return sample_rows


def long_context_pion(tokenizer):
    """Room for the chat prompt (longer in a small test tokenizer's tokens) and 100 new tokens."""
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size(), max_seq_len=512)


@pytest.fixture(scope="module")
def pion(tokenizer):
    # No more ids than the tokenizer has: an id past a small test tokenizer's (a fresh clone's) decodes to
    # nothing, and replies would be empty.
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The same weights as `pion` in a second model: references are computed apart from the served one."""
    return tiny_pion(seed=3, vocab_size=tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def server(pion, tokenizer):
    """A module's server for pion: (base url, engine)."""
    from server import Limits
    with serving(pion, tokenizer, max_batch=6, limits=Limits(max_body_bytes=20_000, max_messages=8)) as served:
        yield served


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt(tokenizer, messages=MESSAGES):
    return render_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def expected_reply(model, tokenizer, messages, max_tokens, stop=(), settings=decoding.GREEDY, seed=None):
    """generate_text's reply as chat.py takes it: stopped at <|user|>, without the turn's suffix."""
    generator = decoding.seeded_generator("cpu", seed) if seed is not None else None
    return decoding.generate_text(model, tokenizer, [chat_prompt(tokenizer, messages)], max_tokens, settings, stop,
                                  turn=CHAT_TURN, generator=generator)[0]


def streamed(chunks):
    """(text, finish_reason, usage) of a stream of chat or completion chunks."""
    text, finish, usage = "", None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


# ---------------------------------------------------------------------------------------------------
# Shared by several test files: a tiny train.py run, its data, a chat


TINY_MODEL_FLAGS = ["--model_size", "nano", "--override", "vocab_size=512", "--override", "d_model=32", "--override", "n_layers=2",
        "--override", "n_heads=4", "--override", "n_kv_heads=2", "--override", "d_ff=64"]


def write_shards(path):
    rng = np.random.default_rng(0)
    path.mkdir()
    for i in range(3):
        shard = rng.integers(3, 512, size=(48, 64)).astype(np.uint16)
        shard[:, -4:] = PAD_ID
        np.save(path / f"shard_{i:05d}.npy", shard)
    return path


def train_argv(args, tokenizer_path):
    flags = ["--seq_len", "32", "--batch_size", "4", "--max_steps", "6", "--log_interval", "1",
             "--eval_interval", "3", "--eval_steps", "2", "--save_interval", "3", "--num_workers", "0",
             "--warmup_steps", "2", "--lr", "3e-3", "--tokenizer", tokenizer_path]
    return [*TINY_MODEL_FLAGS, *map(str, flags), *map(str, args)]


def run_train(args, tokenizer_path, launcher=None):
    """train.py with small defaults. In-process by default (the CLI's own run_cli(main) path, without paying
    for a fresh interpreter); a launcher such as torchrun runs it as real processes."""
    import train
    argv = train_argv(args, tokenizer_path)
    if launcher:
        return subprocess.run([*launcher, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return run_in_process(train.main, argv)


CHAT = [{"role": "system", "content": "You are Pion."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Count to 3."}]


def trained_spans(tokenizer, input_ids, labels):
    """The decoded text of each run of consecutive trained positions (labels other than -100)."""
    runs = itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != -100)
    return [tokenizer.decode([t for t, _ in run], skip_special_tokens=False) for trained, run in runs if trained]
