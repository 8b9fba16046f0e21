"""hf:OWNER/REPO/FILE checkpoints, resolved offline from a Hugging Face cache that the test builds itself.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so every check runs
in a subprocess with its own environment instead of monkeypatching this process."""
import os
import subprocess
import sys

import pytest

import model
from conftest import ROOT
from decoding import generate_text
from conftest import tiny_model
from checkpoint import load_checkpoint, save_checkpoint

REPO, FILE = "SuperGoatScriptGuy/Pion", "pion_nano_final.pt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40 hex digits: refs/main only has to name a snapshot


@pytest.fixture
def hub_cache(tmp_path):
    """(env, model): an environment whose offline hub cache holds REPO/FILE, a tiny checkpoint of `model`.

    The layout is the one huggingface_hub writes: refs/main holds the commit, snapshots/<commit>/<file> the
    file (a plain file here; the hub makes it a symlink into blobs/, which lookups do not need)."""
    cache = tmp_path / "hf_home" / "hub"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    # The real vocabulary, so that a script can encode a prompt with the real tokenizer.
    pion = tiny_model(vocab_size=50258, d_model=32, n_heads=4, n_kv_heads=2)
    save_checkpoint(str(snapshot / FILE), {"model": pion.state_dict(), "config": pion.config})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache)}
    return env, pion


def run(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_generate_cli_runs_an_hf_checkpoint_from_the_offline_cache(hub_cache, tokenizer_path, tokenizer):
    env, pion = hub_cache
    result = run(["generate.py", "--checkpoint", f"hf:{REPO}/{FILE}", "--prompt", "hi", "--max_tokens", "4",
                  "--temperature", "0", "--device", "cpu", "--tokenizer", tokenizer_path], env)
    assert result.returncode == 0, result.stderr
    # The same greedy text as the cached model gives here: the script loaded that file, not something else.
    expected = generate_text(pion, tokenizer, tokenizer.encode("hi").ids, 4)[0]
    assert result.stdout.rstrip("\n") == "hi" + expected.rstrip("\n")


@pytest.mark.parametrize("reference", [f"hf:{REPO}/pion_missing.pt",
                                       pytest.param("hf:SomeoneElse/NotCached/model.pt", marks=pytest.mark.slow)])
def test_a_file_missing_from_the_offline_cache_is_one_line_and_exit_2(hub_cache, reference, tmp_path):
    env, _ = hub_cache
    out = tmp_path / "never_written"
    result = run(["export_hf.py", "--checkpoint", reference, "--out", str(out)], env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot get {reference} from the Hugging Face hub")
    assert not out.exists()


@pytest.mark.parametrize("reference", ["hf:", "hf:owner/repo", "hf:owner//file.pt"])
def test_a_malformed_hub_reference_is_refused_before_any_download(reference):
    with pytest.raises(model.PionError, match="expected hf:OWNER/REPO/FILE"):
        load_checkpoint(reference)


def test_without_a_network_a_download_fails_at_once_instead_of_retrying(hub_cache, tmp_path):
    """Not offline mode: a machine whose DNS cannot resolve the hub. huggingface_hub alone retries ~25 s."""
    env, _ = hub_cache
    env = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}  # .invalid never resolves
    result = run(["-c", "import checkpoint, cli; "
                        f"cli.run_cli(lambda: checkpoint.resolve_checkpoint('hf:{REPO}/pion_missing.pt'))"], env)
    assert result.returncode == 2 and "cannot get" in result.stderr and "Retrying" not in result.stderr
    result = run(["-c", "import time, checkpoint; t = time.time(); "
                        f"checkpoint.resolve_checkpoint('hf:{REPO}/{FILE}'); print(time.time() - t)"], env)
    assert result.returncode == 0, result.stderr  # the cached file is still found, without a network
    assert float(result.stdout) < 5
