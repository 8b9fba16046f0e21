"""gguf_format.py: llama.cpp loads the .gguf as qwen3, tokenizes like Pion and decodes what Pion decodes.

The file checks need only the gguf package; the llama.cpp ones skip without llama-cpp-python."""
import copy
import os
from contextlib import closing, contextmanager

import numpy as np
import pytest
import torch

from tokenizer import EOS_ID, PAD_ID, UNK_ID
from cli import PionError
from conftest import save_tiny_checkpoint, tiny_pion
from gguf_format import export_gguf, write_gguf
from quantize import quantize
from chat_template import CHAT_TEMPLATE
from conftest import CHAT

gguf = pytest.importorskip("gguf")

N_CTX = 128  # the tiny model's max_seq_len
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived"]
TEXTS = ["Hello world", " leading space and  double  spaces\n\nnew lines\t", "trailing spaces   ",
         "naïve café 東京 🙂", "code: def f(x):\n    return x**2 + 12345",
         "<|endoftext|> between <|pad|> specials", "<|user|>\nHi!\n<|assistant|>\n"]


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer):
    """Pion's published tokenizer: what these tests check is that llama.cpp gets *it* right (its metadata, its
    pre-tokenizer, greedy decoding of text it encodes)."""
    return real_tokenizer


@pytest.fixture(scope="module")
def pion():
    return tiny_pion(use_soft_cap=False)


@pytest.fixture(scope="module")
def exported(pion, tokenizer, tmp_path_factory):
    """gguf_type -> path of the tiny Pion exported as that type (each written once, on first use)."""
    folder = tmp_path_factory.mktemp("gguf")
    paths = {}

    def export(gguf_type):
        if gguf_type not in paths:
            paths[gguf_type] = write_gguf(pion, tokenizer, str(folder / f"tiny-{gguf_type}.gguf"), gguf_type)
        return paths[gguf_type]
    return export


@pytest.fixture(scope="module")
def load_llama(exported):
    """gguf_type -> llama_cpp.Llama over that file, with logits kept for every position."""
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = {}

    def load(gguf_type):
        if gguf_type not in loaded:
            loaded[gguf_type] = llama_cpp.Llama(exported(gguf_type), n_ctx=N_CTX, n_threads=1, n_batch=N_CTX,
                                                logits_all=True, verbose=False)
        return loaded[gguf_type]
    yield load
    for llm in loaded.values():
        llm.close()  # now, not in __del__ at interpreter exit, when llama.cpp's library may be gone


def read_fields(path):
    """(reader, {key: value}). GGUFReader parses all 100k token and merge strings: seconds, so read once."""
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


@pytest.fixture(scope="module")
def read_exported(exported):
    """gguf_type -> read_fields of that exported file, read once."""
    read = {}

    def reader(gguf_type):
        if gguf_type not in read:
            read[gguf_type] = read_fields(exported(gguf_type))
        return read[gguf_type]
    return reader


def one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# Greedy decoding: ours with a plain loop, llama.cpp's with argmax over its logits


@contextmanager
def one_torch_thread():
    """A tiny model needs no thread pool, and on a busy 2-core machine the pool's spin-waiting made Pion's
    32 greedy steps take 3-8 s instead of 0.1 s (llama.cpp's pool likewise: hence n_threads=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pion_greedy(pion, prompt, n_new):
    ids = torch.tensor([prompt])
    with torch.no_grad(), one_torch_thread():
        for _ in range(n_new):
            next_id = pion(ids)["logits"][:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt):].tolist()


def llama_greedy(llm, prompt, n_new):
    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(new[-1:])
    return new


def llama_next_token_predictions(llm, ids):
    """llama.cpp's argmax after each prefix of ids (teacher forcing): row i predicts ids[i + 1]."""
    llm.reset()
    llm.eval(ids)
    return np.argmax(llm.scores[:len(ids)], axis=-1).tolist()


# ---------------------------------------------------------------------------------------------------
# The model in llama.cpp


def test_llama_cpp_greedy_decoding_matches_pion_token_for_token(pion, tokenizer, load_llama):
    llm = load_llama("f32")
    for text in PROMPTS:
        prompt = tokenizer.encode(text).ids
        ours = pion_greedy(pion, prompt, 32)
        assert llama_greedy(llm, prompt, 32) == ours
        assert len(set(ours)) > 5  # a real continuation, not one token repeated


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_smaller_types_predict_pion_next_token_almost_always(gguf_type, pion, tokenizer, load_llama):
    # Teacher-forced along Pion's own greedy path, so one near-tie flipped by rounding costs one token, not
    # the rest of the sequence. This random tiny model has near-ties (top-2 gaps under 0.1 logit) that q8_0's
    # rounding flips, hence 32 tokens after each of two prompts rather than one: about 1 in 16 disagree.
    agree = 0
    for text in PROMPTS:
        prompt = tokenizer.encode(text).ids
        ids = prompt + pion_greedy(pion, prompt, 32)
        predicted = llama_next_token_predictions(load_llama(gguf_type), ids[:-1])[len(prompt) - 1:]
        agree += sum(p == t for p, t in zip(predicted, ids[len(prompt):]))
    assert agree >= 0.9 * 64, f"{gguf_type}: {agree}/64 next tokens agree"


def test_llama_cpp_q4_0_predicts_pion_int4s_greedy_tokens(pion, tokenizer, load_llama):
    # The q4_0 file holds exactly the weights of --quantize int4 (checked below); llama.cpp also rounds its
    # activations to 8 bits and the embedding rows it looks up to 4 (Pion's int4 looks them up in fp32),
    # so teacher-forced along Pion int4's own greedy path, as q8_0 above.
    int4 = quantize(copy.deepcopy(pion), "int4")
    agree = 0
    for text in PROMPTS:
        prompt = tokenizer.encode(text).ids
        ids = prompt + pion_greedy(int4, prompt, 32)
        assert len(set(ids[len(prompt):])) > 5  # a real continuation, not one token repeated
        predicted = llama_next_token_predictions(load_llama("q4_0"), ids[:-1])[len(prompt) - 1:]
        agree += sum(p == t for p, t in zip(predicted, ids[len(prompt):]))
    assert agree >= 0.9 * 64, f"q4_0: {agree}/64 next tokens agree"


def test_untied_lm_head_is_written_as_output_and_used(tokenizer, tmp_path):
    pion = tiny_pion(use_soft_cap=False, tie_embeddings=False)
    path = write_gguf(pion, tokenizer, str(tmp_path / "untied.gguf"))
    reader, _ = read_fields(path)
    assert "output.weight" in {t.name for t in reader.tensors}
    llama_cpp = pytest.importorskip("llama_cpp")
    with closing(llama_cpp.Llama(path, n_ctx=N_CTX, n_threads=1, logits_all=True, verbose=False)) as llm:
        prompt = tokenizer.encode(PROMPTS[0]).ids
        assert llama_greedy(llm, prompt, 16) == pion_greedy(pion, prompt, 16)


# ---------------------------------------------------------------------------------------------------
# What the file holds


def test_file_is_qwen3_with_llama_cpp_tensor_names_and_the_embedding_stored_once(read_exported):
    reader, fields = read_exported("f32")
    assert fields["general.architecture"] == "qwen3"
    assert (fields["qwen3.block_count"], fields["qwen3.embedding_length"], fields["qwen3.context_length"],
            fields["qwen3.attention.head_count"], fields["qwen3.attention.head_count_kv"],
            fields["qwen3.attention.key_length"], fields["qwen3.feed_forward_length"]) == (2, 32, 128, 4, 2, 8, 64)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert {t.name for t in reader.tensors} == expected  # tied: no output.weight, llama.cpp reuses token_embd
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}


def test_q8_0_quantizes_matrices_and_keeps_norms_f32(exported, read_exported):
    reader, fields = read_exported("q8_0")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_q_norm.weight"] == types["output_norm.weight"] == "F32"
    assert os.path.getsize(exported("q8_0")) < 0.5 * os.path.getsize(exported("f32"))


def test_q4_0_holds_the_weights_pion_int4_decodes_with(pion, read_exported):
    reader, fields = read_exported("q4_0")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    int4 = quantize(copy.deepcopy(pion), "int4")
    for name, layer in [("blk.0.ffn_down.weight", int4.layers[0].ffn.w2), ("token_embd.weight", int4.lm_head)]:
        tensor = tensors[name]
        assert tensor.tensor_type.name == "Q4_0"
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(layer.weight.shape)
        assert np.array_equal(stored, layer.weight.numpy())
        assert tensor.n_bytes == layer.weight.numel() // 32 * 18  # 4.5 bits a weight: 32 nibbles and an fp16 scale


def test_tokenizer_metadata_is_pion_byte_level_bpe_padded_to_the_embedding_rows(read_exported, tokenizer):
    _, fields = read_exported("f32")
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50258  # one per embedding row, as llama.cpp requires
    assert tokens[:50000] == [tokenizer.id_to_token(i) for i in range(50000)]
    assert tokens[50000] == "[PAD50000]" and set(types[50000:]) == {gguf.TokenType.UNUSED}
    assert types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
    assert fields["tokenizer.ggml.merges"][0] == "Ġ Ġ" and len(fields["tokenizer.ggml.merges"]) == 49741
    ids = [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "padding", "unknown", "bos")]
    assert ids == [EOS_ID, PAD_ID, UNK_ID, EOS_ID]
    assert fields["tokenizer.ggml.add_bos_token"] is False  # Pion was trained without a BOS


def test_chat_template_is_export_hf_template(read_exported):
    _, fields = read_exported("q8_0")
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------
# Tokenizer and chat template in llama.cpp


def test_llama_cpp_tokenizes_like_the_tokenizers_library(load_llama, tokenizer):
    """Typed special-token text is plain text in Pion (llama.cpp's special=False); the chat template writes
    <|endoftext|> as text for llama.cpp to match (special=True), as a tokenizer matching specials does."""
    from tokenizers import Tokenizer
    matching = Tokenizer.from_str(tokenizer.to_str())
    matching.encode_special_tokens = False
    llm = load_llama("f32")
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids, text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == matching.encode(text).ids, text


def test_llama_cpp_decodes_ids_back_to_the_text(load_llama, tokenizer):
    llm = load_llama("f32")
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert llm.detokenize(ids, special=True).decode() == text


def test_llama_cpp_python_chats_with_the_embedded_template(load_llama):
    llm = load_llama("f32")
    assert llm.chat_format == "chat_template.default"  # picked up from the file, not guessed
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>")
    assert formatter(messages=CHAT).prompt == (
        "<|system|>\nYou are Pion.\n<|user|>\nHi!\n<|assistant|>\nHello. How can I help?\n"
        "<|endoftext|><|user|>\nCount to 3.\n<|assistant|>\n")


# ---------------------------------------------------------------------------------------------------
# From a checkpoint (what export_hf.py --gguf runs)


def test_export_gguf_writes_a_checkpoint_with_the_given_tokenizer(tmp_path, tokenizer_path):
    save_tiny_checkpoint(tmp_path / "tiny.pt", use_soft_cap=False)
    path = export_gguf(str(tmp_path / "tiny.pt"), str(tmp_path / "tiny.gguf"), tokenizer_path, gguf_type="q8_0")
    reader, fields = read_fields(path)
    assert fields["general.architecture"] == "qwen3" and len(fields["tokenizer.ggml.tokens"]) == 50258
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q8_0"}


def test_the_export_command_writes_the_gguf_file_alone(tmp_path, tokenizer_path):
    import export_hf
    from conftest import run_in_process
    save_tiny_checkpoint(tmp_path / "tiny.pt", use_soft_cap=False)
    result = run_in_process(export_hf.main, ["--checkpoint", tmp_path / "tiny.pt", "--gguf", tmp_path / "tiny.gguf",
                                             "--gguf_type", "f16", "--tokenizer", tokenizer_path])
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf", "tiny.pt"] and "llama-cli -m" in result.stdout


def test_export_gguf_names_the_soft_capped_checkpoint_it_refuses(tmp_path, tokenizer_path):
    save_tiny_checkpoint(tmp_path / "capped.pt", use_soft_cap=True, logit_cap=30.0)
    with pytest.raises(PionError) as excinfo:
        export_gguf(str(tmp_path / "capped.pt"), str(tmp_path / "capped.gguf"), tokenizer_path)
    assert "capped.pt soft-caps" in one_line(excinfo)
    assert not (tmp_path / "capped.gguf").exists()


def test_a_context_length_gguf_cannot_hold_is_one_line_and_leaves_no_file(tmp_path, tokenizer_path):
    save_tiny_checkpoint(tmp_path / "huge.pt", use_soft_cap=False, max_seq_len=10**12)
    with pytest.raises(PionError) as excinfo:
        export_gguf(str(tmp_path / "huge.pt"), str(tmp_path / "huge.gguf"), tokenizer_path)
    assert "max_seq_len 1000000000000" in one_line(excinfo)
    assert os.listdir(tmp_path) == ["huge.pt"]


def test_export_gguf_refuses_an_existing_path_before_loading_anything(tmp_path):
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(PionError, match="already exists"):
        export_gguf(str(tmp_path / "no-such.pt"), str(tmp_path / "taken.gguf"))


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each, nothing written


def test_soft_capped_model_is_refused(tokenizer, tmp_path):
    path = tmp_path / "capped.gguf"
    with pytest.raises(PionError) as excinfo:
        write_gguf(tiny_pion(use_soft_cap=True, logit_cap=30.0), tokenizer, str(path))
    assert "tanh" in one_line(excinfo) and "--allow_mismatch" in str(excinfo.value)
    assert os.listdir(tmp_path) == []


def test_soft_capped_model_exports_with_allow_mismatch_and_a_warning(tokenizer, tmp_path, capsys):
    pion = tiny_pion(use_soft_cap=True, logit_cap=30.0)
    path = write_gguf(pion, tokenizer, str(tmp_path / "capped.gguf"), allow_mismatch=True)
    assert "warning:" in capsys.readouterr().err and os.path.isfile(path)


def test_an_existing_output_path_is_refused_and_left_alone(pion, tokenizer, tmp_path):
    path = tmp_path / "mine.gguf"
    path.write_text("mine")
    with pytest.raises(PionError) as excinfo:
        write_gguf(pion, tokenizer, str(path))
    assert "already exists" in one_line(excinfo)
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["mine.gguf"]


def test_an_unknown_gguf_type_is_refused(pion, tokenizer, tmp_path):
    with pytest.raises(PionError) as excinfo:
        write_gguf(pion, tokenizer, str(tmp_path / "x.gguf"), gguf_type="q4_k")
    assert "f32, f16, q8_0, q4_0" in one_line(excinfo)


def test_a_missing_folder_is_refused(pion, tokenizer, tmp_path):
    with pytest.raises(PionError) as excinfo:
        write_gguf(pion, tokenizer, str(tmp_path / "nowhere" / "x.gguf"))
    assert "does not exist" in one_line(excinfo)


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(pion, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    whitespace_bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    whitespace_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(PionError) as excinfo:
        write_gguf(pion, whitespace_bpe, str(tmp_path / "x.gguf"))
    assert "byte-level BPE" in one_line(excinfo)
    assert os.listdir(tmp_path) == []


def test_a_tokenizer_larger_than_the_model_is_refused_and_leaves_no_file(tokenizer, tmp_path):
    small = tiny_pion(use_soft_cap=False, vocab_size=1000)
    with pytest.raises(PionError) as excinfo:
        write_gguf(small, tokenizer, str(tmp_path / "small.gguf"))
    assert "wrong tokenizer" in one_line(excinfo)
    assert os.listdir(tmp_path) == []


def test_a_gguf_write_that_fails_midway_leaves_no_file(pion, tokenizer, tmp_path, monkeypatch):
    import errno
    import gguf_format

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf_format, "add_tensors", full_disk)
    with pytest.raises(PionError, match="cannot write .*No space left on device"):
        write_gguf(pion, tokenizer, str(tmp_path / "out.gguf"))
    assert os.listdir(tmp_path) == []
