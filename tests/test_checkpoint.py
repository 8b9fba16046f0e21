"""checkpoint.py: atomic saves, safe loads of every checkpoint form."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from conftest import tiny_config, tiny_model
from checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from cli import PionError


def our_checkpoint(m, **extra):
    return {"model": m.state_dict(), "config": m.config, "step": 7, **extra}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_save_then_load_round_trips_model_and_entries(tmp_path):
    m = tiny_model()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, our_checkpoint(m, tokens_seen=123))
    loaded, ckpt = load_checkpoint(path)
    assert_same_weights(m, loaded)
    assert ckpt["step"] == 7 and ckpt["tokens_seen"] == 123 and ckpt["config"] == m.config
    assert loaded.lm_head.weight is loaded.embed.weight


def test_config_is_stored_as_a_plain_dict(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, our_checkpoint(tiny_model()))
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["config"], dict) and raw["config"]["d_model"] == 60


def test_a_crash_mid_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, our_checkpoint(tiny_model(seed=1)))
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, our_checkpoint(tiny_model(seed=2)))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_non_finite_weights_are_never_saved(tmp_path):
    m = tiny_model()
    with torch.no_grad():
        m.norm.weight[0] = float("nan")
    with pytest.raises(PionError, match="non-finite"):
        save_checkpoint(tmp_path / "ckpt.pt", our_checkpoint(m))
    assert not (tmp_path / "ckpt.pt").exists()


def legacy_state(m):
    return {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}


def test_legacy_pretraining_checkpoint_with_pickled_config_loads(tmp_path):
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    path = tmp_path / "pion_small_1000.pt"
    torch.save({"step": 1000, "model": legacy_state(m), "optimizer": opt.state_dict(),
                "config": tiny_config(), "tokens_seen": 10**6}, path)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1000 and ckpt["tokens_seen"] == 10**6 and "optimizer" in ckpt
    assert loaded.config == tiny_config()
    ref = legacy_state(m)
    assert all(torch.equal(v.to(torch.bfloat16), ref[k]) for k, v in loaded.state_dict().items())
    assert next(loaded.parameters()).dtype == torch.float32


def test_legacy_sft_checkpoint_without_optimizer_loads(tmp_path):
    m = tiny_model()
    path = tmp_path / "pion_sft_final.pt"
    torch.save({"step": 3000, "model": legacy_state(m), "config": tiny_config()}, path)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3000 and "optimizer" not in ckpt


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_compiled_and_ddp_prefixed_keys_load(tmp_path, prefix):
    m = tiny_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {prefix + k: v for k, v in m.state_dict().items()}, "config": tiny_config()}, path)
    assert_same_weights(m, load_checkpoint(path)[0])


def test_checkpoint_without_config_gets_its_shape_from_the_tensors(tmp_path):
    m = tiny_model(d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80, vocab_size=77)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict()}, path)
    loaded, _ = load_checkpoint(path)
    c = loaded.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (77, 48, 3, 6, 3, 80)
    assert_same_weights(m, loaded)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PionError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(PionError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, our_checkpoint(tiny_model()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PionError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_mismatched_shapes_are_one_clear_line(tmp_path):
    m = tiny_model()
    state = m.state_dict()
    state["layers.0.ffn.w1.weight"] = torch.zeros(5, 60)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "config": tiny_config()}, path)
    with pytest.raises(PionError, match="layers.0.ffn.w1.weight is \\(5, 60\\)") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


class Exploit:
    """A pickle that calls `call` on the path in $PION_EXPLOIT_MARK when it is loaded."""
    call = pathlib.Path.touch

    def __reduce__(self):
        return (type(self).call, (pathlib.Path(os.environ["PION_EXPLOIT_MARK"]),))


class BlockedModuleExploit(Exploit):
    call = os.makedirs  # a module torch's weights_only unpickler blocks outright (words its refusal otherwise)


@pytest.mark.parametrize("exploit", [Exploit, BlockedModuleExploit])
def test_a_pickle_that_runs_code_is_refused_as_asking_to_run_code(tmp_path, monkeypatch, exploit):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PION_EXPLOIT_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_model().state_dict(), "config": exploit()}, path)
    with pytest.raises(PionError, match="refusing to load .* it asks to run code"):
        load_checkpoint(path)
    assert not mark.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_at_load_naming_the_tensor(tmp_path, value):
    m = tiny_model()
    state = m.state_dict()
    state["layers.1.attn.v_proj.weight"][3, 4] = value
    path = tmp_path / "poisoned.pt"
    torch.save({"model": state, "config": m.config}, path)  # not save_checkpoint, which refuses to write it
    with pytest.raises(PionError, match="NaN or infinite values \\(in layers.1.attn.v_proj.weight\\)") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_random_bytes_are_called_unreadable_not_a_pickle_of_code(tmp_path):
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    with pytest.raises(PionError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "noise.pt")


@pytest.mark.parametrize("config", [{"n_heads": 0}, {"d_model": "abc"}, {"max_seq_len": -5}, {"dropout": 2.0},
                                    {"n_layers": 1.5}, {"n_layers": 0}])
def test_a_checkpoint_with_a_bad_config_is_one_line(tmp_path, config):
    m = tiny_model()
    save_checkpoint(tmp_path / "bad.pt", {"model": m.state_dict(), "config": {**vars(m.config), **config}})
    with pytest.raises(PionError, match="bad model config") as error:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(error.value)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno
    m = tiny_model()
    save_checkpoint(tmp_path / "ck.pt", our_checkpoint(m))
    before = (tmp_path / "ck.pt").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(PionError, match="cannot write .*ck.pt: No space left on device"):
        save_checkpoint(tmp_path / "ck.pt", our_checkpoint(m))
    assert (tmp_path / "ck.pt").read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]


def test_a_write_error_that_torch_wraps_in_its_own_exception_is_one_line(tmp_path):
    """torch.save reports a failed write as a RuntimeError; a file-size limit (ulimit -f) fails it the way
    a full disk does."""
    save_checkpoint(tmp_path / "tiny.pt", our_checkpoint(tiny_model()))
    code = ("import resource, signal, sys, torch, checkpoint, cli\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "model, _ = checkpoint.load_checkpoint(sys.argv[1])\n"
            "cli.run_cli(lambda: checkpoint.save_checkpoint(sys.argv[2], {'model': model.state_dict()}))\n")
    result = subprocess.run([sys.executable, "-c", code, tmp_path / "tiny.pt", tmp_path / "again.pt"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: cannot write {tmp_path / 'again.pt'}: File too large\n"
    assert sorted(os.listdir(tmp_path)) == ["tiny.pt"]
