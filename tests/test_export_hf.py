"""export_hf.py: the exported folder loads in transformers and computes what Pion computes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import chat_template
import transformers_format
from tokenizer import EOS_ID, PAD_ID
import model
import export_hf
from conftest import ROOT, run_in_process, save_tiny_checkpoint

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402  (installed with transformers)

from decoding import generate  # noqa: E402

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    """(pion, folder): a tiny Pion without soft-capping and its export."""
    tmp = tmp_path_factory.mktemp("export")
    pion = save_tiny_checkpoint(tmp / "tiny.pt", use_soft_cap=False)
    folder = transformers_format.export(str(tmp / "tiny.pt"), str(tmp / "hf"), tokenizer_path)
    return pion, folder


@pytest.fixture(scope="module")
def hf_model(exported):
    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(exported[1], dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(loading.values()), loading  # every tensor named, none left over, none mis-shaped
    return hf.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[1])


def run_export_cli(*args):
    return run_in_process(export_hf.main, args)


def one_error_line(result):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# The model


def test_folder_is_a_qwen3_model_with_the_embedding_stored_once(exported, hf_model):
    _, folder = exported
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(folder))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["head_dim"], config["max_position_embeddings"], config["tie_word_embeddings"]) == (8, 128, True)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    mode = lambda name: os.stat(os.path.join(folder, name)).st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")  # readable like the rest, not owner-only
    assert isinstance(hf_model, transformers.Qwen3ForCausalLM)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_logits_match_pion(exported, hf_model):
    pion, _ = exported
    input_ids = torch.randint(0, 50000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pion(input_ids)["logits"]
        theirs = hf_model(input_ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_matches_ours_token_for_token(exported, hf_model, tokenizer):
    pion, _ = exported
    for text in ["The quick brown fox", "Once upon a time, in a land far away, there lived"]:
        prompt = tokenizer.encode(text).ids
        ours = generate(pion, prompt, max_new_tokens=20)[0]
        output = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=20)
        theirs = output[0, len(prompt):].tolist()
        if theirs[-1:] == [EOS_ID]:
            theirs = theirs[:-1]  # transformers returns the EOS it stopped at; generate() does not
        assert ours == theirs
        assert len(set(ours)) > 5  # a real continuation, not one token repeated


def test_untied_lm_head_is_exported_as_its_own_tensor(tmp_path, tokenizer_path):
    pion = save_tiny_checkpoint(tmp_path / "untied.pt", use_soft_cap=False, tie_embeddings=False)
    assert pion.lm_head.weight is not pion.embed.weight
    folder = transformers_format.export(str(tmp_path / "untied.pt"), str(tmp_path / "hf"), tokenizer_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not hf.config.tie_word_embeddings
    input_ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (pion(input_ids)["logits"] - hf(input_ids).logits).abs().max().item() <= 1e-4


def test_bfloat16_export_stores_bfloat16_weights(tmp_path, tokenizer_path):
    save_tiny_checkpoint(tmp_path / "tiny.pt", use_soft_cap=False)
    folder = transformers_format.export(str(tmp_path / "tiny.pt"), str(tmp_path / "hf"), tokenizer_path, dtype="bfloat16")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert json.load(open(os.path.join(folder, "config.json")))["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config


def test_auto_tokenizer_encodes_and_decodes_like_ours(hf_tokenizer, tokenizer):
    texts = ["Hello world", " leading space and  double  spaces\n\nnew lines\t", "naïve café 東京 🙂",
             "code: def f(x):\n    return x**2", "<|endoftext|> between <|pad|> specials"]
    # transformers matches special-token text in what it encodes (the exported chat template writes
    # <|endoftext|> as text), where Pion's own paths encode text as text: compare with a matching copy.
    matching = type(tokenizer).from_str(tokenizer.to_str())
    matching.encode_special_tokens = False
    for text in texts:
        assert hf_tokenizer(text).input_ids == matching.encode(text).ids
        ids = tokenizer.encode(text).ids
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id) == (0, 1, 2)
    assert hf_tokenizer.bos_token_id is None  # nothing is prepended: Pion was trained without a BOS


def test_generation_config_stops_at_endoftext_and_pads_with_pad(exported):
    generation = transformers.GenerationConfig.from_pretrained(exported[1])
    assert (generation.eos_token_id, generation.pad_token_id) == (EOS_ID, PAD_ID)


def test_the_tokenizer_carries_the_chat_template(hf_tokenizer):
    assert hf_tokenizer.chat_template == chat_template.CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_soft_capped_checkpoint_is_refused_with_one_line_and_exit_2(tmp_path):
    save_tiny_checkpoint(tmp_path / "capped.pt", use_soft_cap=True, logit_cap=30.0)
    out = tmp_path / "hf"
    line = one_error_line(run_export_cli("--checkpoint", tmp_path / "capped.pt", "--out", out))
    assert "tanh" in line and "--allow_mismatch" in line and "differ" in line
    assert not out.exists()


def test_soft_capped_checkpoint_exports_with_allow_mismatch_and_a_warning(tmp_path, tokenizer_path, capsys):
    save_tiny_checkpoint(tmp_path / "capped.pt", use_soft_cap=True, logit_cap=30.0)
    folder = transformers_format.export(str(tmp_path / "capped.pt"), str(tmp_path / "hf"), tokenizer_path, allow_mismatch=True)
    assert "warning:" in capsys.readouterr().err
    assert json.load(open(os.path.join(folder, "config.json")))["model_type"] == "qwen3"


def test_a_non_empty_out_dir_is_refused_and_left_alone(tmp_path):
    save_tiny_checkpoint(tmp_path / "tiny.pt", use_soft_cap=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(model.PionError, match="not an empty folder"):
        transformers_format.export(str(tmp_path / "tiny.pt"), str(out))
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_pushing_while_offline_is_one_line(exported, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    code = f"import transformers_format, cli; cli.run_cli(lambda: transformers_format.push_to_hub({exported[1]!r}, 'someone/pion'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    line = one_error_line(result)
    assert "someone/pion" in line and "the export in" in line


def test_qwen3_state_dict_refuses_a_tensor_it_does_not_know():
    with pytest.raises(model.PionError, match="no Qwen3 counterpart"):
        transformers_format.qwen3_state_dict({"layers.0.attn.bias": torch.zeros(1)})


def test_a_full_disk_during_the_export_is_one_line_and_leaves_nothing(exported, tmp_path, tokenizer_path):
    """safetensors wraps the OS's error in its own exception type; a file-size limit (ulimit -f) fails the
    write the way a full disk does."""
    checkpoint = str(tmp_path / "tiny.pt")
    save_tiny_checkpoint(checkpoint, use_soft_cap=False)
    result = subprocess.run([sys.executable, "export_hf.py", "--checkpoint", checkpoint, "--out", tmp_path / "hf",
                             "--tokenizer", tokenizer_path], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size(1_000_000))
    assert one_error_line(result).startswith(f"error: cannot write {tmp_path / 'hf'}: ")
    assert sorted(os.listdir(tmp_path)) == ["tiny.pt"]


def limit_file_size(max_bytes):
    """A preexec_fn: files of the process stop at max_bytes, and a write past that fails with EFBIG."""
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_the_same_path_for_out_and_gguf_is_refused_before_loading_anything(tmp_path):
    line = one_error_line(run_export_cli("--checkpoint", tmp_path / "no-such.pt", "--out", tmp_path / "x",
                                         "--gguf", tmp_path / "x"))
    assert "--out and --gguf both name" in line
    assert os.listdir(tmp_path) == []


# The export with its tokenizer files held back for a minute, once the weights are in the staging folder.
SLOW_EXPORT = ("import sys, time, cli, export_hf, transformers_format\n"
               "transformers_format.write_tokenizer = lambda *args: time.sleep(60)\n"
               "cli.run_cli(lambda: export_hf.main(sys.argv[1:]))\n")


@pytest.mark.slow
@pytest.mark.parametrize("stop, code, line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_export_stopped_by_a_signal_ends_in_one_line_and_leaves_nothing(tmp_path, tokenizer_path, stop, code, line):
    save_tiny_checkpoint(tmp_path / "tiny.pt", use_soft_cap=False)
    process = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "--checkpoint", tmp_path / "tiny.pt", "--out",
                                tmp_path / "hf", "--tokenizer", tokenizer_path], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    staging = tmp_path / f".hf.tmp{process.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "model.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (code, line + "\n")
    assert os.listdir(tmp_path) == ["tiny.pt"]
