"""Validation: the mean loss per trained token over validation batches, and bits per byte, its unit that does
not depend on the tokenizer; and the sample a run prints at each eval. Bits per byte:

    bpb = (summed loss in nats) / ln 2 / (UTF-8 bytes of the predicted tokens)

Loss per token favours tokenizers with long tokens; per byte, models with different vocabularies (or a
Pion and a GPT-2) compare directly. Special tokens (<|endoftext|>, ...) stand for no text: zero bytes.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import PionError
from decoding import generate_text
from loss import trained_targets
from process import fsdp_param_dtype


def byte_level_alphabet():
    """GPT-2's byte-level BPE alphabet, {character: byte}: bytes that print stand for themselves and the
    rest are shifted to code points 256 and up, so every token string is one character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_byte_lengths(tokenizer, vocab_size=None):
    """A LongTensor (vocab_size,) of each id's UTF-8 length in bytes: its token string's bytes for vocabulary
    tokens, 0 for special tokens and for ids beyond the tokenizer (a model's padded embedding rows)."""
    alphabet = byte_level_alphabet()
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    n = tokenizer.get_vocab_size()
    lengths = torch.zeros(max(vocab_size or n, n), dtype=torch.long)
    for i in range(n):
        token = tokenizer.id_to_token(i)
        if token is None or i in special:
            continue
        if all(c in alphabet for c in token):
            lengths[i] = len(token)
        else:  # an added plain-text token, stored as its text
            lengths[i] = len(token.encode("utf-8"))
    return lengths[:vocab_size] if vocab_size else lengths


def bits_per_byte(loss_nats_sum, n_bytes):
    return loss_nats_sum / math.log(2) / max(n_bytes, 1)


@torch.no_grad()
def evaluate(model, batches, rt, steps, token_bytes=None):
    """{"val_loss": mean loss per trained token, "val_bpb": bits per UTF-8 byte of those tokens} over up to
    `steps` validation batches on every rank; val_bpb needs token_bytes (token_byte_lengths). Ranks stop
    together when any runs out (an FSDP forward is a collective: a rank running one batch more would hang)."""
    was_training = model.training
    model.eval()
    batches = iter(batches)
    if token_bytes is not None:
        token_bytes = token_bytes.to(rt.device)  # once, not per batch
    # The sums stay on the device until the end: reading one back each batch would make the host wait for
    # every forward instead of queueing the next.
    loss_sum = torch.zeros((), device=rt.device)
    tokens = torch.zeros((), dtype=torch.long, device=rt.device)
    n_bytes = torch.zeros((), dtype=torch.long, device=rt.device)
    for _ in range(steps):
        batch = next(batches, None)
        if not rt.all_reduce(float(batch is not None), dist.ReduceOp.MIN):
            break
        labels = batch["labels"].to(rt.device)
        trained = trained_targets(labels)
        count = trained.sum()
        with rt.autocast():
            loss_sum += model(batch["input_ids"].to(rt.device), labels=labels)["loss"].float() * count
        tokens += count
        if token_bytes is not None:  # masked, not indexed by the mask: a boolean index would wait for its size
            n_bytes += (token_bytes[labels[:, 1:].clamp(min=0)] * trained).sum()
    model.train(was_training)
    loss_sum = rt.all_reduce(loss_sum.item())
    metrics = {"val_loss": loss_sum / max(rt.all_reduce(tokens.item()), 1)}
    if token_bytes is not None:
        metrics["val_bpb"] = bits_per_byte(loss_sum, rt.all_reduce(n_bytes.item()))
    return metrics


@dataclass
class EvalSample:
    """The greedy continuation of a fixed prompt printed at each eval: greedy and seedless, so it draws nothing
    from the RNG that a resumed run must reproduce. Shown as `shown_prompt` -> the reply, which stops at
    `max_tokens`, a stop token or one of `stop_strings` (a chat reply at its turn's end, with turn
    chat_template.CHAT_TURN; and with strip, loses its surrounding whitespace)."""
    tokenizer: object
    prompt: list  # token ids
    max_tokens: int
    shown_prompt: str  # what the prompt stands for (a chat prompt's question, not its template)
    stop_strings: tuple = ()
    strip: bool = False
    turn: object = None

    def __call__(self, model, cache_dtype=None):
        """"'prompt' -> 'reply'": both quoted, so a reply's whitespace and where the prompt ends both show."""
        reply = generate_text(model, self.tokenizer, self.prompt, self.max_tokens, stop_strings=self.stop_strings,
                              turn=self.turn, cache_dtype=cache_dtype)[0]
        return f"{self.shown_prompt!r} -> {(reply.strip() if self.strip else reply)!r}"


def check_sample_tokens(sample_tokens, max_seq_len):
    """The trainers' --sample_tokens must leave the sample's prompt room in the model's context: refused before
    step 1 and by its own name (decoding's own refusal names generate.py's --max_tokens), not at the first eval."""
    if sample_tokens >= max_seq_len:
        raise PionError(f"--sample_tokens {sample_tokens} leaves no room for a prompt in the model's max_seq_len "
                        f"{max_seq_len}: lower --sample_tokens (0: no sample)")


def sample_text(sample, model, wrapped, config, rt):
    """sample(model, cache_dtype) (an EvalSample) on the unwrapped model, on every rank (FSDP2 shards in place).
    Decoding calls hidden_states, not forward, so FSDP2's hooks gather the blocks' weights but not the root's
    (embedding, final norm): gather those here, in the compute dtype, which the KV cache must share."""
    if not (config.fsdp and rt.distributed):
        return sample(model, None)
    wrapped.unshard()
    try:
        return sample(model, fsdp_param_dtype(config, rt))
    finally:
        wrapped.reshard()
