"""A Pion checkpoint as a Hugging Face transformers folder (Qwen3ForCausalLM + tokenizer + chat template).

Pion without attention soft-capping is the Qwen3 architecture (GQA, per-head QK RMSNorm before rotate-half
RoPE, SwiGLU, tied embeddings, no biases), so the export is a renaming of tensors, not a conversion: the
folder loads with AutoModelForCausalLM / AutoTokenizer and works with lm-evaluation-harness, vLLM, etc.
export_hf.py is its command line.
"""
import json
import os
import shutil
import sys

import torch

from chat_template import CHAT_TEMPLATE
from checkpoint import clean_state_dict, load_checkpoint
from tokenizer import EOS_ID, PAD_ID, load_tokenizer
from cli import DTYPES, PionError, first_line
from files import check_new_folder, write_folder_atomically


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise PionError("exporting to Hugging Face format needs transformers: pip install transformers")
    return transformers


# ----------------------------------------------------------------------------------------------------
# Config and tensor names: also used by bench/bench_decode.py to build the same model in transformers.


def qwen3_config(config, dtype=torch.float32):
    """The transformers.Qwen3Config computing what a PionConfig computes (without soft-capping)."""
    transformers = require_transformers()
    qwen = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=1e-6, rope_theta=config.rope_theta,
        attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
        tie_word_embeddings=config.tie_embeddings, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        architectures=["Qwen3ForCausalLM"], dtype=dtype)
    # transformers 5 stores theta inside rope_parameters; transformers 4 reads only a top-level rope_theta
    # and would otherwise fall back to Qwen3's default of 1e6, silently changing every position.
    qwen.rope_theta = config.rope_theta
    return qwen


TOP_LEVEL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {  # inside layers.{i}. -> inside model.layers.{i}.
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}


def qwen3_name(name):
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    prefix, layer, rest = (name.split(".", 2) + ["", ""])[:3]
    if prefix == "layers" and layer.isdigit() and rest in LAYER_NAMES:
        return f"model.layers.{layer}.{LAYER_NAMES[rest]}"
    raise PionError(f"cannot export tensor {name!r}: it has no Qwen3 counterpart")


def qwen3_state_dict(state_dict):
    """Pion state dict -> Qwen3ForCausalLM state dict, same tensors under transformers' names. lm_head.weight
    is kept (it is the embedding when tied), so Qwen3ForCausalLM.load_state_dict accepts the result as is."""
    return {qwen3_name(name): tensor for name, tensor in clean_state_dict(state_dict).items()}


# ----------------------------------------------------------------------------------------------------
# Writing the folder


def write_tokenizer(tokenizer, folder, max_len):
    transformers = require_transformers()
    # No BOS: Pion was not trained with one, and tools that want a prefix token (lm-eval) fall back to EOS.
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|unk|>",
        model_max_length=max_len)
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    # The template goes inside tokenizer_config.json (not chat_template.jinja), which every version reads.
    hf_tokenizer.save_pretrained(folder, save_jinja_files=False)
    # transformers 5 names the class TokenizersBackend, which transformers 4 cannot resolve; both read
    # PreTrainedTokenizerFast (a plain tokenizer.json) the same way.
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


def write_folder(pion_model, tokenizer, folder, dtype):
    """config.json, model.safetensors, generation_config.json and the tokenizer files into `folder`."""
    transformers = require_transformers()
    from safetensors.torch import save_file
    config = pion_model.config
    qwen3_config(config, dtype).save_pretrained(folder)
    tensors = qwen3_state_dict(pion_model.state_dict())
    if config.tie_embeddings:
        del tensors["lm_head.weight"]  # stored once: transformers ties lm_head to model.embed_tokens on load
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in tensors.items()}
    weights_path = os.path.join(folder, "model.safetensors")
    save_file(tensors, weights_path, metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); give it the mode every other file here got (umask).
    shutil.copymode(os.path.join(folder, "config.json"), weights_path)
    transformers.GenerationConfig(eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(folder)
    write_tokenizer(tokenizer, folder, config.max_seq_len)


def export(checkpoint, out, tokenizer_path=None, allow_mismatch=False, dtype="float32"):
    """Write the transformers folder for `checkpoint` (a path or hf:OWNER/REPO/FILE) to `out`."""
    check_new_folder(out)
    require_transformers()
    pion_model, _ = load_checkpoint(checkpoint)
    check_soft_cap(pion_model.config, allow_mismatch, checkpoint, "transformers' Qwen3")
    tokenizer = load_tokenizer(tokenizer_path, pion_model.config.vocab_size)
    write_folder_atomically(out, lambda folder: write_folder(pion_model, tokenizer, folder, DTYPES[dtype]))
    return out


def check_soft_cap(config, allow_mismatch, what, target):
    """A soft-capped model has no exact export: refuse it, or with allow_mismatch warn that its outputs change."""
    if config.soft_capped:
        message = (f"{what} soft-caps its attention logits (cap * tanh(score / cap), cap {config.logit_cap:g}), "
                   f"which {target} does not do: the export drops the cap, so its outputs differ from Pion's")
        if not allow_mismatch:
            raise PionError(message + "; pass --allow_mismatch to export anyway")
        print(f"warning: {message}", file=sys.stderr)


def push_to_hub(folder, repo):
    from huggingface_hub import HfApi
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload Pion exported by export_hf.py")
    except Exception as e:
        raise PionError(f"cannot push to the hub repo {repo} ({type(e).__name__}: {first_line(e)}); the export in "
                        f"{folder} is complete: log in (`hf auth login`) and run `hf upload {repo} {folder}`")
    print(f"pushed {folder} to https://huggingface.co/{repo}")
