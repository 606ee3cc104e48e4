"""The C GGUF reader agrees with the reference reader (the `gguf` package's
GGUFReader) on real files: every metadata value, every tensor's name, type,
shape, data offset, size and bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gguf  # the reference reader; a dependency of kvsink_cpp itself (pyproject): never a reason to skip

from kvsink_cpp.gguf_file import GGUFFile, read_metadata  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
VOCAB_DIR = SHARED / "vocab"
TINY_MODEL = SHARED / "models" / "llama-2-tiny-random.gguf"
SMOLLM2 = Path.home() / ".cache" / "kvsink_cpp" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

ARRAY = gguf.GGUFValueType.ARRAY


def _cases():
    vocab = sorted(VOCAB_DIR.glob("*.gguf")) if VOCAB_DIR.is_dir() else []
    if not vocab:
        yield pytest.param(None, marks=pytest.mark.skip(
            reason=f"no vocab GGUF files in {VOCAB_DIR} (../shared is not checked out)"),
            id="vocab")
    # GGUFReader (the oracle) takes 1-16 s on these 100k-token vocabularies
    for path in vocab:
        yield pytest.param(path, marks=pytest.mark.slow, id=path.name)
    yield pytest.param(TINY_MODEL, marks=pytest.mark.skipif(
        not TINY_MODEL.is_file(), reason=f"{TINY_MODEL} not present"), id=TINY_MODEL.name)
    yield pytest.param(SMOLLM2, marks=[pytest.mark.model, pytest.mark.skipif(
        not SMOLLM2.is_file(), reason="SmolLM2 not pulled; run python -m kvsink_cpp pull")],
        id=SMOLLM2.name)


CASES = list(_cases())


def _expected_types(field) -> tuple[int, int]:
    types = [int(t) for t in field.types]
    if types[0] != ARRAY:
        return types[0], types[0]
    # an empty array records no element type in GGUFReader
    return types[0], types[1] if len(types) > 1 else -1


@pytest.fixture(scope="module", params=CASES)
def pair(request):
    """(path, reference reader, our reader), opened once per file for all the checks."""
    path = request.param
    ours = GGUFFile(path)
    yield path, gguf.GGUFReader(path), ours
    ours.close()


def test_header(pair):
    path, ref, ours = pair
    assert ours.version == int(ref.fields["GGUF.version"].contents())
    assert ours.alignment == ref.alignment
    assert ours.data_offset == ref.data_offset
    assert ours.file_size == path.stat().st_size


def test_metadata(pair):
    _, ref, ours = pair
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    meta, types = ours.metadata, ours.metadata_types
    assert list(meta) == list(fields)  # same keys in file order
    for key, field in fields.items():
        expected = field.contents()
        got = meta[key]
        ty, elem = _expected_types(field)
        assert types[key][0] == ty, key
        if elem >= 0:
            assert types[key][1] == elem, key
        assert type(got) is type(expected) or isinstance(expected, (bool, np.bool_)), key
        if ty == gguf.GGUFValueType.FLOAT32 or elem == gguf.GGUFValueType.FLOAT32:
            # compare as float32 bit patterns: exact, and NaN-safe
            assert np.array_equal(np.asarray(got, np.float32).view(np.uint32),
                                  np.asarray(expected, np.float32).view(np.uint32)), key
        else:
            assert got == expected, key


def test_tensors(pair):
    _, ref, ours = pair
    tensors = ours.tensors
    assert len(tensors) == len(ref.tensors)
    for i, (mine, theirs) in enumerate(zip(tensors, ref.tensors)):
        assert mine.name == theirs.name
        assert mine.type == int(theirs.tensor_type), mine.name
        assert mine.type_name == theirs.tensor_type.name, mine.name
        assert mine.shape == tuple(int(d) for d in theirs.shape), mine.name
        assert ours.data_offset + mine.offset == theirs.data_offset, mine.name
        assert mine.n_bytes == theirs.n_bytes, mine.name
        assert ours.tensor_bytes(i) == theirs.data.tobytes(), mine.name


def test_read_metadata_from_handle(pair):
    _, _, ours = pair
    assert read_metadata(ours.handle) == ours.metadata


def test_close_is_idempotent():
    if not TINY_MODEL.is_file():
        pytest.skip(f"{TINY_MODEL} not present")
    f = GGUFFile(TINY_MODEL)
    with f:
        assert f.metadata["general.architecture"] == "llama"
    assert f.closed
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.version
