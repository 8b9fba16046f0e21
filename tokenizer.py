"""The Pion tokenizer: its special ids, and the published file, fetched once from a pinned commit and checked
by sha256 (never committed to the repo).

Byte-level BPE, 50,000 entries; the model's vocabulary (50,258) is padded past it."""
import hashlib
import os
import sys
import urllib.request

from cli import PionError, first_line
from files import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))

TOKENIZER_PATH = os.path.join(ROOT, "pile_tokenizer.json")
TOKENIZER_URL = ("https://raw.githubusercontent.com/Supergoatscriptguy/Pion/"
                 "d84c8d501ae7aed36d11b477808ce6b8faf03b92/pile_tokenizer.json")
TOKENIZER_SHA256 = "1e1d10c83bbac16a87b5796eeec281b4a0cd245e03f842f9dd76af629c7f88d8"
EOS_ID, PAD_ID, UNK_ID = 0, 1, 2  # <|endoftext|>, <|pad|>, <|unk|>


def download_tokenizer(path=TOKENIZER_PATH, url=TOKENIZER_URL):
    """Fetch the pinned tokenizer once, check its sha256, and save it atomically."""
    print(f"downloading the Pion tokenizer to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise PionError(f"cannot download the tokenizer ({getattr(e, 'reason', e)}); fetch {url} by hand "
                        f"and save it as {path}, or pass --tokenizer PATH")
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise PionError(f"downloaded tokenizer has sha256 {digest}, expected {TOKENIZER_SHA256}; not saved")
    atomic_write(path, lambda f: f.write(data))


def load_tokenizer(path=None, vocab_size=None):
    """The Pion tokenizer (tokenizers.Tokenizer): `path`, or pile_tokenizer.json at the repo root,
    downloaded on first use. vocab_size: the model's, which must have an embedding for every id."""
    from tokenizers import Tokenizer
    if path is None:
        path = TOKENIZER_PATH
        if not os.path.exists(path):
            download_tokenizer(path)
    if not os.path.isfile(path):
        raise PionError(f"tokenizer not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:
        raise PionError(f"{path} is not a tokenizers JSON file ({first_line(e)})")
    # Text is text: "<|endoftext|>" typed in a document, a chat message or a prompt is encoded as those
    # characters, never as the control id (which only the data and chat formats themselves insert, by id).
    tokenizer.encode_special_tokens = True
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise PionError(f"the tokenizer {path} has {tokenizer.get_vocab_size()} ids but the model only "
                        f"{vocab_size} embeddings: pass the tokenizer it was trained with (--tokenizer)")
    return tokenizer
