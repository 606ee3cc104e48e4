"""Tokenizers from GGUF metadata against llama.cpp's test vectors (Hugging Face reference ids)."""
from __future__ import annotations

import functools
import heapq
import time
from pathlib import Path

import pytest

from kvsink_cpp.errors import UnsupportedError
from kvsink_cpp.gguf_file import GGUFFile
from kvsink_cpp.tokenizer import _BYTE_TO_CHAR, _PRE_TOKENIZERS, StreamDecoder, Tokenizer

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data"
VOCAB_DIR = SHARED_DATA / "vocab"
WIKITEXT = SHARED_DATA / "wikitext-2-raw/wiki.test.raw"
SEPARATOR = "\n__ggml_vocab_test__\n"
UNSUPPORTED: dict[str, str] = {}  # vocab name -> why it is skipped (none at the moment)
LOSSY = {"bert-bge": "WordPiece lower-cases, drops accents and whitespace"}


def vocab_path(name: str) -> Path:
    return VOCAB_DIR / f"ggml-vocab-{name}.gguf"


def vocab_names() -> list[str]:
    return sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in VOCAB_DIR.glob("ggml-vocab-*.gguf"))


@functools.lru_cache(maxsize=None)
def read_cases(name: str) -> list[tuple[str, list[int]]]:
    """The (input, expected ids) pairs, read as README.md describes the .inp/.out files."""
    path = vocab_path(name)
    inputs = path.with_name(path.name + ".inp").read_bytes().decode("utf-8").split(SEPARATOR)[:-1]
    lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(lines), f"{name}: {len(inputs)} inputs, {len(lines)} outputs"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


@functools.lru_cache(maxsize=None)
def metadata_of(path: Path) -> dict:
    with GGUFFile(path) as f:
        return f.metadata


@functools.lru_cache(maxsize=None)
def tokenizer_of(path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(metadata_of(path))


def vocab(name: str) -> Tokenizer:
    if not vocab_path(name).is_file():
        pytest.skip(f"{vocab_path(name)} is absent (../shared is not checked out beside the repo)")
    return tokenizer_of(vocab_path(name))


def vector_params() -> list:
    if not VOCAB_DIR.is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(
            reason=f"{VOCAB_DIR} is absent (../shared is not checked out beside the repo)"))]
    params = []
    for name in vocab_names():
        marks = [pytest.mark.skip(reason=UNSUPPORTED[name])] if name in UNSUPPORTED else []
        params += [pytest.param(name, i, id=f"{name}-{i}", marks=marks)
                   for i in range(len(read_cases(name)))]
    return params


@pytest.mark.parametrize("name, index", vector_params())
def test_vocab_vector(name, index):
    text, expected = read_cases(name)[index]
    assert vocab(name).encode(text, add_bos=False, special=False) == expected


@pytest.mark.parametrize("name", [n for n in vocab_names() if n not in UNSUPPORTED]
                         if VOCAB_DIR.is_dir() else [])
def test_round_trip(name):
    if name in LOSSY:
        pytest.skip(f"{name}: {LOSSY[name]}, so text does not survive a round trip")
    tok = vocab(name)
    # only where the reference ids themselves decode to the input again
    lossless = [text for text, ids in read_cases(name) if tok.decode(ids) == text.encode("utf-8")]
    assert len(lossless) >= 40, f"{name}: only {len(lossless)} reference encodings are lossless"
    for text in lossless:
        assert tok.decode(tok.encode(text, add_bos=False)) == text.encode("utf-8"), repr(text)


def test_special_tokens_only_when_asked(smollm2_path):
    tok = tokenizer_of(smollm2_path)
    im_start, im_end = tok.encode("<|im_start|>", special=True), tok.encode("<|im_end|>", special=True)
    assert [tok.token_text(i) for i in im_start + im_end] == ["<|im_start|>", "<|im_end|>"]
    prompt = "<|im_start|>user\nHi there<|im_end|>\n"
    with_special = tok.encode(prompt, special=True)
    assert with_special[0] == im_start[0] and im_end[0] in with_special
    assert with_special == im_start + tok.encode("user\nHi there") + im_end + tok.encode("\n")
    plain = tok.encode(prompt, special=False)
    assert im_start[0] not in plain and im_end[0] not in plain
    assert tok.decode(plain) == prompt.encode()
    assert tok.decode(with_special) == b"user\nHi there\n"             # control tokens are hidden
    assert tok.decode(with_special, special=True) == prompt.encode()


def test_smollm2_flags_and_end_of_generation(smollm2_path):
    tok = tokenizer_of(smollm2_path)
    assert tok.model == "gpt2" and tok.n_vocab == 49152
    assert not tok.add_bos and not tok.add_eos                      # from the GGUF's metadata
    assert tok.eos_id == 2 and tok.eot_id == 2 and tok.is_eog(2)    # <|im_end|>
    assert tok.is_control(1) and not tok.is_eog(1)
    assert tok.encode("Hello") == tok.encode("Hello", add_bos=False)


@pytest.mark.parametrize("name, add_bos, bos, eos, eot", [
    ("llama-spm", True, "<s>", "</s>", None),
    ("phi-3", True, "<s>", "<|endoftext|>", "<|end|>"),
    ("llama-bpe", True, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    ("qwen2", False, "<|endoftext|>", "<|endoftext|>", "<|im_end|>"),
    ("gpt-2", False, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    ("command-r", True, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", None),
    ("deepseek-llm", True, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
])
def test_special_ids_and_defaults(name, add_bos, bos, eos, eot):
    tok = vocab(name)
    assert tok.add_bos is add_bos
    assert tok.token_text(tok.bos_id) == bos and tok.token_text(tok.eos_id) == eos
    assert (tok.eot_id and tok.token_text(tok.eot_id)) == eot
    assert tok.is_eog(tok.eos_id) and (eot is None or tok.is_eog(tok.eot_id))
    assert not tok.is_eog(tok.encode("a", add_bos=False)[0])
    ids = tok.encode("Hello world")
    assert (ids[0] == tok.bos_id) is add_bos and ids[-1] != tok.eos_id


def reference_spm(text: str, tok: Tokenizer) -> list[int]:
    """A literal port of llama.cpp's llm_tokenizer_spm_session::tokenize (text already
    escaped): merge the best-scoring adjacent pair, ties to the left; unknown -> bytes."""
    scores = metadata_of(vocab_path("llama-spm"))["tokenizer.ggml.scores"]
    ids = tok._token_to_id
    symbols, alive = list(text), [True] * len(text)
    prev, nxt = list(range(-1, len(text) - 1)), [*range(1, len(text)), -1]
    queue: list = []

    def try_pair(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (merged := symbols[left] + symbols[right]) in ids:
            heapq.heappush(queue, (-scores[ids[merged]], left, right, merged))

    for i in range(1, len(text)):
        try_pair(i - 1, i)
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        if not (alive[left] and alive[right]) or symbols[left] + symbols[right] != merged:
            continue  # one side changed since this pair was queued
        symbols[left], alive[right] = merged, False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_pair(prev[left], left)
        try_pair(left, nxt[left])
    out = []
    for symbol in (s for s, a in zip(symbols, alive) if a):
        out += [ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()]
    return out


def test_spm_matches_llama_cpp_algorithm_on_wikitext():
    """The HF-backed SPM equals llama.cpp's own merge loop beyond the 46 vectors."""
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is absent")
    tok = vocab("llama-spm")
    text = WIKITEXT.read_text(encoding="utf-8")
    samples = [text[i:i + 3000] for i in range(0, len(text), len(text) // 8)]
    samples += [" " * n + "x" + " " * n for n in range(1, 40)] + ["日本語 🦙 ß ẞ 𝕏 \u200d\t\r\n"]
    for sample in samples:
        escaped = ("\u2581" + sample).replace(" ", "\u2581")
        assert tok.encode(sample, add_bos=False) == reference_spm(escaped, tok), repr(sample[:60])


def test_token_bytes_spm():
    tok = vocab("llama-spm")
    hello, newline = tok.encode("Hello\n", add_bos=False)[0], tok.encode("\n", add_bos=False)[-1]
    assert tok.token_text(hello) == "▁Hello" and tok.token_bytes(hello) == b" Hello"
    assert tok.token_text(newline) == "<0x0A>" and tok.token_bytes(newline) == b"\n"
    assert tok.is_control(tok.bos_id)
    assert tok.token_bytes(tok.bos_id) == b"" and tok.token_bytes(tok.bos_id, special=True) == b"<s>"
    assert tok.decode(tok.encode("Hello world", add_bos=False)) == b"Hello world"  # prefix removed
    assert tok.decode(tok.encode(" Hello", add_bos=False)) == b" Hello"


def test_token_bytes_byte_level_bpe():
    tok = vocab("gpt-2")
    world = tok.encode(" world")
    assert [tok.token_text(i) for i in world] == ["Ġworld"] and tok.token_bytes(world[0]) == b" world"
    assert tok.decode(tok.encode("  x\n\ty", add_bos=False)) == b"  x\n\ty"
    assert tok.decode([tok.eos_id]) == b"" and tok.decode([tok.eos_id], special=True) == b"<|endoftext|>"


def test_phi3_special_tokens_strip_whitespace_after_them():
    tok = vocab("phi-3")
    user = tok._token_to_id["<|user|>"]
    assert tok.encode("<|user|>\n  Hello", add_bos=False, special=True) == \
        [user] + tok.encode("Hello", add_bos=False)


def stream(tok: Tokenizer, ids, **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_holds_back_split_characters():
    tok = vocab("llama-spm")
    text = "Llamas 🦙 and 😶‍🌫️ emoji"
    ids = tok.encode(text, add_bos=False)
    assert sum(tok.token_text(i).startswith("<0x") for i in ids) >= 8  # emoji as byte tokens
    chunks = stream(tok, ids, strip_leading_space=True)
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert "🦙" in chunks[ids.index(tok._token_to_id["<0x99>"])]  # complete at its last byte
    assert "".join(stream(tok, ids)) == " " + text                   # no strip unless told


def test_stream_decoder_byte_level_and_flush():
    tok = vocab("gpt-2")
    text = "naïve 🦙 日本語"
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == text and all("\ufffd" not in c for c in chunks)
    partial = tok.encode("🦙")[:-1]  # the emoji's bytes but its last
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in partial] == [""] * len(partial)
    assert decoder.flush() == "\ufffd"


def test_tiny_llama_tokenizes_like_llama_spm(tiny_llama_path):
    tok = tokenizer_of(tiny_llama_path)
    assert tok.model == "llama" and tok.n_vocab == 32000 and tok.add_bos
    for text, expected in read_cases("llama-spm"):
        assert tok.encode(text, add_bos=False) == expected, repr(text)
    assert tok.encode("Hello world") == [tok.bos_id, 15043, 3186]


def test_unsupported_vocabs_name_themselves():
    metadata = dict(metadata_of(vocab_path("gpt-2")) if vocab_path("gpt-2").is_file() else {})
    with pytest.raises(UnsupportedError, match="rwkv"):
        Tokenizer.from_metadata({**metadata, "tokenizer.ggml.model": "rwkv"})
    if metadata:
        with pytest.raises(UnsupportedError, match="no-such-pre"):
            Tokenizer.from_metadata({**metadata, "tokenizer.ggml.pre": "no-such-pre"})


@pytest.mark.parametrize("pre", sorted(_PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds(pre):
    """A toy byte-level vocab under each known pre-tokenizer: the regexes compile and split."""
    text = "Hello world 123 ñ!\n"
    tokens = sorted({_BYTE_TO_CHAR[b] for b in text.encode("utf-8")}) + ["He", "ll"]
    tok = Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["H e", "l l"], "tokenizer.ggml.token_type": [1] * len(tokens)})
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text.encode("utf-8")
    assert tokens.index("He") in ids and tokens.index("ll") in ids


def test_wikitext_encodes_in_seconds(smollm2_path):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is absent")
    tok = tokenizer_of(smollm2_path)
    text = WIKITEXT.read_text(encoding="utf-8")
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{len(text)} characters took {elapsed:.1f} s"
    assert 250_000 < len(ids) < 350_000 and tok.decode(ids) == text.encode("utf-8")
