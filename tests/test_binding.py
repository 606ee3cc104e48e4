"""The cffi cdef in kvsink_cpp/_native.py must declare exactly what kvsink.h does."""
import re
from pathlib import Path

import pytest

from kvsink_cpp import _native

HEADER = Path(__file__).resolve().parent.parent / "native" / "include" / "kvsink.h"


def normalize(text: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)       # comments
    text = re.sub(r"#ifdef __cplusplus.*?#endif", " ", text, flags=re.S)  # extern "C" guards
    text = re.sub(r"^\s*#.*$", " ", text, flags=re.M)         # preprocessor lines
    text = text.replace("KVS_API", " ")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*([;{}(),*=])\s*", r"\1", text)
    return [d.strip() for d in text.split(";") if d.strip()]


def test_cdef_matches_header():
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} not found (tests run outside the source tree)")
    assert normalize(_native.CDEF) == normalize(HEADER.read_text())


def test_abi_version_matches():
    assert _native.lib.kvs_abi_version() == _native.ABI_VERSION
