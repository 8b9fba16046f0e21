"""Checkpoint I/O: atomic saves, safe loading of any Pion checkpoint (ours, the published ones, `hf:` hub
references, legacy pickled configs). A training run's checkpoints and their rules are runs.py's."""
import dataclasses
import os
import pickle
import pickletools
import socket
import urllib.parse
import zipfile

import torch

from cli import DTYPES, PionError, first_line, pick_device
from files import atomic_write
from model import Pion, PionConfig

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# Saving and loading


def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict (with "model" and "config") atomically and durably: a crash mid-save leaves the
    previous file, never a truncated one. The config is stored as a plain dict; non-finite weights are refused."""
    checkpoint = dict(checkpoint)
    if dataclasses.is_dataclass(checkpoint.get("config")):
        checkpoint["config"] = dataclasses.asdict(checkpoint["config"])
    bad = non_finite_tensor(checkpoint["model"])
    if bad:
        raise PionError(f"refusing to save {path}: non-finite weights in {bad}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(checkpoint, f), durable=True)


def non_finite_tensor(state_dict):
    """The name of the first tensor holding a NaN or an infinity, or None: such weights only ever give NaN
    logits (empty replies, exports full of NaNs), so they are neither saved nor loaded."""
    return next((name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()),
                None)


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP/FSDP wrappers (`module.`) add."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def infer_config(state_dict):
    """Rebuild a PionConfig from tensor shapes alone, for checkpoints saved without a config."""
    try:
        vocab_size, d_model = state_dict["embed.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
        head_dim = state_dict["layers.0.attn.q_norm.weight"].shape[0]
        tied = "lm_head.weight" not in state_dict or torch.equal(state_dict["lm_head.weight"], state_dict["embed.weight"])
        return PionConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
            n_heads=state_dict["layers.0.attn.q_proj.weight"].shape[0] // head_dim,
            n_kv_heads=state_dict["layers.0.attn.k_proj.weight"].shape[0] // head_dim,
            d_ff=state_dict["layers.0.ffn.w1.weight"].shape[0], tie_embeddings=tied)
    except (KeyError, ValueError, IndexError) as e:
        raise PionError(f"cannot infer the model shape from the checkpoint's tensors (missing {e})")


def resolve_checkpoint(path):
    """A local path, or `hf:OWNER/REPO/FILE` (e.g. hf:SuperGoatScriptGuy/Pion/pion_small_final.pt), which is
    downloaded once into the Hugging Face cache (with a progress bar) and returned as a local path."""
    path = str(path)
    if not path.startswith("hf:"):
        return path
    parts = path[3:].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise PionError(f"bad hub reference {path!r}: expected hf:OWNER/REPO/FILE")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2], local_files_only=hub_unreachable())
    except Exception as e:
        raise PionError(f"cannot get {path} from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
                        f"check the name, your network, or download the file and pass its local path")


def hub_unreachable():
    """True when the hub's host name does not resolve and no proxy is set (offline): huggingface_hub would
    retry for ~25 s before failing, so only its local cache is asked."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return False
    except OSError:
        return True


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, plus the legacy pickled PionConfig."""
    path = resolve_checkpoint(path)
    if not os.path.isfile(path):
        raise PionError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([PionConfig]):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only's refusal, of what a pickle asks for or of bytes that are none
        if is_pickle(path):
            raise PionError(f"refusing to load {path}: it asks to run code (to build objects other than tensors "
                            f"and a PionConfig), and Pion does not load such files")
        raise PionError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file)")
    except Exception:
        raise PionError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file)")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model", checkpoint), dict):
        raise PionError(f"{path} is not a Pion checkpoint (expected a dict with a 'model' state dict)")
    return checkpoint


def is_pickle(path):
    """True when path holds a well-formed pickle (a torch archive's data.pkl, or a bare one): when
    weights_only refuses such a file, it refused what the pickle asks to build, not unreadable bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickled = archive.open(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        else:
            pickled = open(path, "rb")
        with pickled:
            for _ in pickletools.genops(pickled):  # raises on bytes that are no pickle
                pass
        return True
    except Exception:
        return False


def load_checkpoint(path, map_location="cpu", **config_overrides):
    """Load any Pion checkpoint (ours, the published ones, compiled/DDP, bf16 or fp32, with or without a
    config) and return (model, checkpoint). The model is fp32 on map_location; the checkpoint dict keeps
    everything but the weights (config as a PionConfig, step, optimizer, ...)."""
    checkpoint = read_checkpoint(path, map_location)
    state = checkpoint.pop("model") if "model" in checkpoint else checkpoint
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PionError(f"{path} is not a Pion checkpoint (its 'model' entry is not a state dict)")
    state = clean_state_dict(state)
    bad = non_finite_tensor(state)
    if bad:
        raise PionError(f"refusing to load {path}: its weights hold NaN or infinite values (in {bad})")
    config = checkpoint.get("config")
    if isinstance(config, PionConfig):
        config = dataclasses.asdict(PionConfig.from_dict(vars(config)))  # legacy pickles may lack new fields
    config = PionConfig.from_dict({**config, **config_overrides}) if isinstance(config, dict) else \
        dataclasses.replace(infer_config(state), **config_overrides)
    with torch.device("meta"):
        model = Pion(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k] is not None and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise PionError(f"{path} does not match its config ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(wrong)} mis-shaped tensors; {detail})")
    model = model.to_empty(device=map_location)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    checkpoint["config"] = config
    return model, checkpoint


def base_model_note(path, checkpoint):
    """The note chat.py and serve.py print for a pretrained base model, which continues text rather than
    answering chat messages; None for any other checkpoint."""
    if checkpoint.get("trainer") == "pretrain":
        return (f"note: {path} is a pretrained base model, not instruction-tuned: it continues text rather than "
                f"answering. Tune it for chat with: python finetune.py --checkpoint {path}")
    return None


def load_model(path, device="auto", dtype=None):
    """A checkpoint ready for inference -> (model in eval mode, its device, the checkpoint dict without
    weights). dtype: a cli.DTYPES name; None is bfloat16 on CUDA, float32 elsewhere. Decoding scripts then
    apply --quantize themselves (quantize.quantize)."""
    device = pick_device(device)
    model, checkpoint = load_checkpoint(path, map_location=device)
    dtype = DTYPES[dtype] if dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(dtype).eval(), device, checkpoint
