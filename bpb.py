"""Bits per byte: validation loss in units that do not depend on the tokenizer.

    bpb = (summed loss in nats) / ln 2 / (UTF-8 bytes of the predicted tokens)

Loss per token favours tokenizers with long tokens; per byte, models with different vocabularies (or a
Pion and a GPT-2) compare directly. Special tokens (<|endoftext|>, ...) stand for no text: zero bytes.
"""
import math

import torch


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
