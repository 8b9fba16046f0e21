"""tokenizer.py: the special ids, loading, and the pinned, checked download."""
import hashlib
import os
import pathlib

import pytest

from conftest import SHARED_TOKENIZER
from cli import PionError
from model import PionConfig
from tokenizer import EOS_ID, PAD_ID, TOKENIZER_SHA256, UNK_ID, download_tokenizer, load_tokenizer


def test_tokenizer_has_the_pion_special_tokens(tokenizer):
    assert tokenizer.token_to_id("<|endoftext|>") == EOS_ID
    assert tokenizer.token_to_id("<|pad|>") == PAD_ID
    assert tokenizer.token_to_id("<|unk|>") == UNK_ID
    assert tokenizer.get_vocab_size() <= PionConfig().vocab_size


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(PionError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "tok.json"))


def test_tokenizer_download_checks_sha256_and_saves_atomically(tmp_path):
    if not os.path.exists(SHARED_TOKENIZER):
        pytest.skip("no offline copy of the tokenizer")
    target = tmp_path / "pile_tokenizer.json"
    download_tokenizer(str(target), url=pathlib.Path(SHARED_TOKENIZER).resolve().as_uri())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == TOKENIZER_SHA256
    assert os.listdir(tmp_path) == ["pile_tokenizer.json"]


def test_tokenizer_download_with_a_wrong_hash_saves_nothing(tmp_path):
    source = tmp_path / "other.json"
    source.write_text("{}")
    target = tmp_path / "pile_tokenizer.json"
    with pytest.raises(PionError, match="sha256"):
        download_tokenizer(str(target), url=source.as_uri())
    assert not target.exists()


def test_offline_tokenizer_download_says_how_to_get_it(tmp_path):
    with pytest.raises(PionError, match="--tokenizer PATH") as e:
        download_tokenizer(str(tmp_path / "t.json"), url=(tmp_path / "unreachable.json").as_uri())
    assert "\n" not in str(e.value)
