import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_TOKENIZER = os.path.join(ROOT, "..", "shared", "pile_tokenizer.json")
TOKENIZER = os.path.join(ROOT, "pile_tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer_path():
    """The real Pion tokenizer; tests are offline, so copy it from ../shared when it is missing."""
    if not os.path.exists(TOKENIZER):
        if not os.path.exists(SHARED_TOKENIZER):
            pytest.skip("pile_tokenizer.json is not available offline")
        shutil.copyfile(SHARED_TOKENIZER, TOKENIZER)
    return TOKENIZER


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    import model
    return model.load_tokenizer(tokenizer_path)
