"""Export a Pion model as one GGUF file: llama.cpp (llama-cli, llama-server, llama-cpp-python and the apps
built on it) loads it as its `qwen3` architecture, with the tokenizer and the chat template inside.

Pion without attention soft-capping is Qwen3 (see transformers_format.py), so the export renames tensors into
transformers' Qwen3 names and from there into llama.cpp's (the `gguf` package's own name map). Qwen3's Q and
K weights are stored as they are: llama.cpp applies rotate-half (NeoX) RoPE to qwen3, which is what Pion does,
so they need none of the permutation llama.cpp's `llama` architecture wants.

    from gguf_format import write_gguf
    write_gguf(pion_model, load_tokenizer(), "pion-small.gguf", gguf_type="q8_0")   # or f32, f16, q4_0
"""
import json
import os

from chat_template import CHAT_TEMPLATE
from checkpoint import load_checkpoint
from tokenizer import EOS_ID, PAD_ID, UNK_ID, load_tokenizer
from cli import PionError
from files import replaced_atomically
from transformers_format import check_soft_cap, qwen3_state_dict

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "qwen3"


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise PionError("exporting to GGUF needs the gguf package: pip install gguf")
    if not hasattr(gguf.MODEL_ARCH, "QWEN3"):  # added in gguf 0.16.3
        raise PionError("the installed gguf package predates llama.cpp's qwen3 architecture: "
                        "pip install -U 'gguf>=0.16.3'")
    return gguf


# ----------------------------------------------------------------------------------------------------
# Tensors


def gguf_tensor_names(state_dict, n_layers):
    """Pion state dict -> {gguf name: tensor}, through the Qwen3 names (which refuse unknown tensors)."""
    gguf = require_gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n_layers)
    out = {}
    for qwen3_name, tensor in qwen3_state_dict(state_dict).items():
        name = name_map.get_name(qwen3_name, try_suffixes=(".weight",))
        if name is None:
            raise PionError(f"cannot export tensor {qwen3_name!r}: llama.cpp's qwen3 has no counterpart")
        out[name] = tensor
    return out


def encode_tensor(array, gguf_type):
    """(data, ggml type) for one float32 numpy array. Norm gains (1-D) stay f32, as llama.cpp's converter
    keeps them: its kernels expect f32 there. A matrix whose rows do not split into q8_0's or q4_0's 32-value
    blocks falls back to f16, again as the converter does. q4_0 quantizes by the rule `--quantize int4` uses
    (quantize.py), so llama.cpp reads the weights Pion's int4 decodes with."""
    gguf = require_gguf()
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or gguf_type == "f32":
        return array, types.F32
    if gguf_type == "f16":
        return array.astype("float16"), types.F16
    block_type = {"q8_0": types.Q8_0, "q4_0": types.Q4_0}[gguf_type]
    try:
        return gguf.quants.quantize(array, block_type), block_type
    except gguf.QuantError:
        return array.astype("float16"), types.F16


def add_tensors(writer, pion_model, gguf_type):
    config = pion_model.config
    tensors = gguf_tensor_names(pion_model.state_dict(), config.n_layers)
    if config.tie_embeddings:
        del tensors["output.weight"]  # llama.cpp reuses token_embd when output is missing
    for name, tensor in tensors.items():
        data, ggml_type = encode_tensor(tensor.detach().float().cpu().numpy(), gguf_type)
        writer.add_tensor(name, data, raw_dtype=ggml_type)


# ----------------------------------------------------------------------------------------------------
# Hyperparameters: the `qwen3.*` keys llama.cpp reads to build the graph


def add_hyperparameters(writer, pion_model, gguf_type):
    gguf = require_gguf()
    config = pion_model.config
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_name("Pion")
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.max_seq_len >= 2**32:
        raise PionError(f"max_seq_len {config.max_seq_len} does not fit GGUF's context length (32 bits)")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(pion_model.norm.eps)


# ----------------------------------------------------------------------------------------------------
# Tokenizer: llama.cpp's "gpt2" (byte-level BPE) tokenizer, fed the same tokens and merges


def byte_level_bpe(tokenizer):
    """The tokenizers JSON of `tokenizer`, after checking that llama.cpp's gpt-2 pre-tokenizer splits text
    as it does: byte-level BPE, GPT-2's regex, no normalizer. Anything else would tokenize differently."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if (spec["model"].get("type") != "BPE" or spec.get("normalizer") is not None
            or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space")):
        raise PionError("the tokenizer is not a plain byte-level BPE (GPT-2 style) tokenizer, the only kind "
                        "this export maps onto llama.cpp's; llama.cpp would tokenize differently")
    return spec


def token_list(tokenizer, spec, vocab_size):
    """(tokens, token types) for ids 0..vocab_size-1. Ids the tokenizer does not use (the model's padded
    embedding rows) get placeholders marked unused, as llama.cpp's converter writes them: llama.cpp wants
    one token per embedding row, and never produces or matches an unused token."""
    gguf = require_gguf()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: token for token, i in vocab.items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise PionError(f"the tokenizer has {len(by_id)} tokens (largest id {max(by_id)}) but the model only "
                        f"{vocab_size} embeddings: wrong tokenizer?")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            placeholder = f"[PAD{i}]"
            if placeholder in vocab:
                raise PionError(f"the tokenizer has a real token {placeholder!r}, which the export needs as a "
                                f"placeholder for unused id {i}")
            tokens.append(placeholder)
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def merge_list(spec):
    """Merges as "left right" strings, whichever of the two tokenizers JSON layouts the file uses."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if any(m.count(" ") != 1 for m in merges):
        raise PionError("the tokenizer has a merge with a space inside a token, which GGUF's "
                        "\"left right\" merge strings cannot hold; is it really byte-level BPE?")
    return merges


def add_tokenizer(writer, tokenizer, vocab_size):
    spec = byte_level_bpe(tokenizer)
    tokens, types = token_list(tokenizer, spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which Pion's ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merge_list(spec))
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_unk_token_id(UNK_ID)
    # Pion has no BOS and never prepends one (add_bos_token false). The id is still written, as <|endoftext|>
    # like GPT-2's: without it llama.cpp assumes id 11 (a plain token) and Ollama id 0, and tools that want a
    # document separator (llama-perplexity, chat front ends) use this one.
    writer.add_bos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------------
# The file


def check_output(path, gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise PionError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if os.path.exists(path):
        raise PionError(f"{path} already exists; choose a new path (nothing is ever overwritten)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise PionError(f"cannot write {path}: its folder does not exist")


def write_gguf(pion_model, tokenizer, path, gguf_type="f32", allow_mismatch=False):
    """Write `pion_model` (a model.Pion) and `tokenizer` (tokenizers.Tokenizer) as one GGUF file at `path`,
    which must not exist yet. gguf_type: f32, f16, q8_0 (8-bit blocks, about a quarter of f32's size) or
    q4_0 (4-bit blocks, about an eighth).
    Returns the path."""
    require_gguf()
    check_output(path, gguf_type)
    check_soft_cap(pion_model.config, allow_mismatch, "this model", "llama.cpp's qwen3")
    return write_checked(pion_model, tokenizer, path, gguf_type)


def export_gguf(checkpoint, path, tokenizer_path=None, gguf_type="f32", allow_mismatch=False):
    """Write the .gguf for `checkpoint` (a path or hf:OWNER/REPO/FILE) and the tokenizer (default:
    pile_tokenizer.json): what `export_hf.py --gguf PATH` runs. Returns the path."""
    require_gguf()
    check_output(path, gguf_type)  # before loading what may be a large checkpoint
    pion_model, _ = load_checkpoint(checkpoint)
    check_soft_cap(pion_model.config, allow_mismatch, checkpoint, "llama.cpp's qwen3")
    return write_checked(pion_model, load_tokenizer(tokenizer_path), path, gguf_type)


def write_checked(pion_model, tokenizer, path, gguf_type):
    """write_gguf's work, once the path, the type and the soft-cap have been checked."""
    gguf = require_gguf()
    path = os.path.abspath(path)
    with replaced_atomically(path) as tmp:  # a failed export leaves no half-written .gguf
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            add_hyperparameters(writer, pion_model, gguf_type)
            add_tokenizer(writer, tokenizer, pion_model.config.vocab_size)
            add_tensors(writer, pion_model, gguf_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if os.path.exists(path):  # appeared while we wrote
            raise PionError(f"{path} already exists; choose a new path (nothing is ever overwritten)")
    return path

