import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def smollm2_path():
    from kvsink_cpp.models import default_model_path
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"SmolLM2 not in the cache ({path}); run `python -m kvsink_cpp pull`")
    return path


@pytest.fixture(scope="session")
def tiny_llama_path():
    path = SHARED / "data" / "models" / "llama-2-tiny-random.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared is not checked out beside the repo)")
    return path
