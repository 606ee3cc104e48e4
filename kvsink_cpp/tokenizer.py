"""Tokenizers built from a GGUF's `tokenizer.ggml.*` metadata, token for token like llama.cpp.

    tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
    ids = tok.encode("Hello world")          # BOS added when the vocab asks for it
    tok.decode(ids)                          # -> b"Hello world"

The vocab types of llama.cpp's src/llama-vocab.cpp that language models use:
- "llama": SentencePiece (SPM) — pieces with scores, '▁' for spaces, byte fallback;
- "gpt2": byte-level BPE — merges, with a pre-tokenizer (a list of split regexes)
  chosen by `tokenizer.ggml.pre`;
- "bert": WordPiece (embedding models).
The merge loops run in the Hugging Face `tokenizers` package (Rust); this module
does what llama.cpp does around them: special-token partitioning, the SPM space
prefix, BOS/EOS, token attributes, end-of-generation tokens and detokenization.
"""
from __future__ import annotations

import codecs
import enum
from typing import Iterable, Optional, Sequence, Union

from .errors import GGUFFormatError, UnsupportedError

__all__ = ["Tokenizer", "StreamDecoder", "TokenAttr"]


class TokenAttr(enum.IntFlag):
    """llama.cpp's llama_token_attr bits."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# tokenizer.ggml.token_type values (llama_token_type) -> attributes
_ATTR_OF_TYPE = {
    0: TokenAttr.UNDEFINED, 1: TokenAttr.NORMAL, 2: TokenAttr.UNKNOWN, 3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED, 5: TokenAttr.UNUSED, 6: TokenAttr.BYTE,
}
# tokens that tokenizer_st_partition cuts out of the raw text
_SPECIAL = TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN
# tokens that render as nothing unless special=True
_HIDDEN = TokenAttr.CONTROL | TokenAttr.UNKNOWN
_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by llama.cpp's lstrip/rstrip

# ---- pre-tokenizer regexes (llm_tokenizer_bpe in llama.cpp) ---------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = [
    r"[\r\n]",
    # \u escapes for the letters that Unicode normalization (NFC) would silently replace
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ\u1f5f-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ\u1fd0-\u1fd3\u1fd6-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-\u212dℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]
_STARCODER = [r"\p{N}", _GPT2]
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"


class _PreTokenizer:
    """What `tokenizer.ggml.pre` selects: split regexes (applied in sequence, each
    splitting the pieces of the previous one) and the vocab flags llama.cpp ties to it."""

    def __init__(self, regexes: Sequence[str], add_bos: bool = False, ignore_merges: bool = False):
        self.regexes = list(regexes)
        self.add_bos = add_bos
        self.ignore_merges = ignore_merges


# tokenizer.ggml.pre -> pre-tokenizer, as llama_vocab::impl::load maps the names
_LLAMA3_PRE = _PreTokenizer([_LLAMA3], add_bos=True, ignore_merges=True)
_PRE_TOKENIZERS = {
    "default": _PreTokenizer(_DEFAULT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"], _LLAMA3_PRE),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _PreTokenizer([_LLAMA3])),
    "deepseek-llm": _PreTokenizer(_DEEPSEEK_LLM),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER),
    "falcon": _PreTokenizer(_FALCON),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], _PreTokenizer(_STARCODER)),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "a.x-4.0", "mellum",
                     "mpt", "olmo", "jais", "exaone4", "trillion"], _PreTokenizer([_GPT2])),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez"],
                    _PreTokenizer([_QWEN2])),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], _PreTokenizer([_BLOOM])),
}


# ---- GPT-2 byte-level alphabet ---------------------------------------------------------

def _byte_to_char() -> list[str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    extra = 256
    for b in range(256):
        if not table[b]:
            table[b] = chr(extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def _byte_level_decode(text: str) -> bytes:
    """Bytes of a byte-level BPE token; a character outside the alphabet stays as its UTF-8."""
    out = bytearray()
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        out += ch.encode("utf-8") if b is None else bytes((b,))
    return bytes(out)


def _hf():
    """The Hugging Face `tokenizers` package, imported on first use."""
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise UnsupportedError("kvsink_cpp's tokenizer needs the `tokenizers` package "
                               "(pip install tokenizers)") from exc
    return tokenizers


# ---- the merge engines -----------------------------------------------------------------

class _HfEncoder:
    """Runs a Hugging Face tokenizer (model, pre-tokenizer, no added tokens) on raw text."""

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer

    def encode(self, fragments: Sequence[str]) -> list[list[int]]:
        # one call per fragment: the batch API would start a thread pool (and warn on fork)
        return [self._hf.encode(f, add_special_tokens=False).ids for f in fragments]


class _SpmEncoder(_HfEncoder):
    """llm_tokenizer_spm: over UTF-8 characters, repeatedly merge the adjacent pair whose
    concatenation is the highest-scoring vocab piece; characters left unknown become
    <0xNN> byte tokens. The loop is HF's BPE with one merge rule per way of splitting each
    piece in two, ranked by the piece's score (the same greedy order)."""

    def __init__(self, tokens: list[str], scores: list[float], token_to_id: dict[str, int],
                 unk_id: Optional[int]):
        hf = _hf()
        # <unk> only where a byte has no <0xNN> token (llama.cpp would fail there)
        unk = tokens[unk_id] if unk_id is not None else None
        model = hf.models.BPE(vocab=token_to_id, merges=self._merges(tokens, scores, token_to_id),
                              byte_fallback=True, unk_token=unk)
        super().__init__(hf.Tokenizer(model))  # no pre-tokenizer: a fragment is one piece

    @staticmethod
    def _merges(tokens, scores, token_to_id) -> list[tuple[str, str]]:
        ranked = []
        for token_id, piece in enumerate(tokens):
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in token_to_id and right in token_to_id:
                    ranked.append((-scores[token_id], token_id, cut))
        ranked.sort()  # highest score first; a tie goes to the lower token id
        return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


class _BpeEncoder(_HfEncoder):
    """llm_tokenizer_bpe: split with the pre-tokenizer's regexes, map bytes to GPT-2's
    alphabet, then merge by rank (HF's BPE; ignore_merges as llama.cpp's flag)."""

    def __init__(self, tokens: list[str], merges: Iterable[str], token_to_id: dict[str, int],
                 pre: _PreTokenizer):
        hf = _hf()
        model = hf.models.BPE(vocab=token_to_id, merges=self._merge_pairs(merges, token_to_id),
                              ignore_merges=pre.ignore_merges)
        tok = hf.Tokenizer(model)
        splits = [hf.pre_tokenizers.Split(hf.Regex(r), behavior="isolated") for r in pre.regexes]
        byte_level = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = hf.pre_tokenizers.Sequence([*splits, byte_level])
        super().__init__(tok)

    @staticmethod
    def _merge_pairs(merges: Iterable[str], token_to_id) -> list[tuple[str, str]]:
        pairs = []
        for merge in merges:
            cut = merge.find(" ", 1)  # llama.cpp: the first space after the first character
            if cut < 0:
                continue
            left, right = merge[:cut], merge[cut + 1:]
            # HF rejects a merge whose parts or result are not tokens; such a merge could
            # only ever produce an unknown piece anyway
            if left in token_to_id and right in token_to_id and left + right in token_to_id:
                pairs.append((left, right))
        return pairs


class _WpmEncoder(_HfEncoder):
    """llm_tokenizer_wpm: BERT's normalizer (lower case, no accents) and punctuation split,
    then the longest vocab piece at each position. The GGUF marks a word's first piece
    with '▁' and leaves continuations bare, where HF writes "##" on continuations."""

    def __init__(self, tokens: list[str], unk_id: Optional[int], lowercase: bool, strip_accents: bool):
        hf = _hf()
        vocab: dict[str, int] = {}
        for token_id, piece in enumerate(tokens):
            vocab.setdefault(self._hf_piece(piece), token_id)
        unk = tokens[unk_id] if unk_id is not None else "[UNK]"
        tok = hf.Tokenizer(hf.models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = hf.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
        tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
        super().__init__(tok)

    @staticmethod
    def _hf_piece(piece: str) -> str:
        if piece.startswith("\u2581"):
            return piece[1:]
        if piece.startswith("[") and piece.endswith("]"):
            return piece  # [CLS], [unused0], ...: never a word piece
        return "##" + piece


# ---- special tokens found by their text, as llama.cpp's load() does --------------------

_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>"]
_EOM_TEXTS = ["<|eom_id|>"]
_FIM_TEXTS = {
    "fim_pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "fim_suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "fim_mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}
_FIM_KEYS = {  # metadata keys, the deprecated ones last
    "fim_pre": ["fim_pre_token_id", "prefix_token_id"],
    "fim_suf": ["fim_suf_token_id", "suffix_token_id"],
    "fim_mid": ["fim_mid_token_id", "middle_token_id"],
    "fim_pad": ["fim_pad_token_id"], "fim_rep": ["fim_rep_token_id"], "fim_sep": ["fim_sep_token_id"],
}
_EOG_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>"]


# llama.cpp's default (bos, eos, unk, sep, pad) ids per vocab type, before the metadata's
_DEFAULT_IDS = {"llama": (1, 2, 0, None, None), "gpt2": (11, 11, None, None, None),
                "bert": (101, None, 100, 102, 0)}


class Tokenizer:
    """A GGUF vocabulary: encode text to ids and ids back to bytes, like llama.cpp."""

    def __init__(self, metadata: dict):
        self.model: str = metadata.get("tokenizer.ggml.model", "")
        if self.model not in ("llama", "gpt2", "bert"):
            raise UnsupportedError(f"unsupported tokenizer.ggml.model {self.model!r} (supported: "
                                   "'llama' (SentencePiece), 'gpt2' (byte-level BPE), 'bert' (WordPiece))")
        if "tokenizer.ggml.tokens" not in metadata:
            raise GGUFFormatError("the GGUF has no vocabulary (tokenizer.ggml.tokens)")
        self._tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        self.n_vocab = len(self._tokens)
        self._token_to_id = self._index(self._tokens)
        self._attrs = self._read_attrs(metadata)
        self._read_flags(metadata)
        self._read_special_ids(metadata)
        self._find_special_tokens(metadata)
        self._set_name_specific_attrs(metadata)
        self._special_ids = sorted((i for i, a in enumerate(self._attrs) if a & _SPECIAL),
                                   key=lambda i: -len(self._tokens[i]))
        self._encoder = self._build_encoder(metadata)
        self._pieces: list[Optional[bytes]] = [None] * self.n_vocab

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build from a GGUF metadata dict (`GGUFFile(path).metadata`)."""
        return cls(metadata)

    # ---- loading --------------------------------------------------------------------

    def _index(self, tokens: list[str]) -> dict[str, int]:
        token_to_id: dict[str, int] = {}
        for i, text in enumerate(tokens):
            if not text:  # llama.cpp renames empty tokens so that they never match
                text = tokens[i] = f"[EMPTY_{i}]"
            if token_to_id.setdefault(text, i) != i:
                raise GGUFFormatError(f"duplicate token in vocabulary: {text!r} has ids "
                                      f"{token_to_id[text]} and {i}")
        return token_to_id

    def _read_attrs(self, metadata: dict) -> list[TokenAttr]:
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            return [TokenAttr.NORMAL] * self.n_vocab
        if len(types) < self.n_vocab:
            raise GGUFFormatError(f"tokenizer.ggml.token_type has {len(types)} entries "
                                  f"for {self.n_vocab} tokens")
        return [_ATTR_OF_TYPE.get(t, TokenAttr.UNDEFINED) for t in types[:self.n_vocab]]

    def _read_flags(self, metadata: dict) -> None:
        """The per-vocab defaults of llama.cpp, then the metadata's overrides."""
        self._pre: Optional[_PreTokenizer] = None
        self.add_sep = self.model == "bert"  # BERT ends a sequence with [SEP]
        if self.model == "llama":
            self.add_bos, self.add_eos, self.add_space_prefix = True, False, True
        elif self.model == "bert":
            self.add_bos, self.add_eos, self.add_space_prefix = True, False, False
        else:
            name = metadata.get("tokenizer.ggml.pre") or "default"
            self._pre = _PRE_TOKENIZERS.get(name)
            if self._pre is None:
                raise UnsupportedError(f"unsupported pre-tokenizer tokenizer.ggml.pre = {name!r}")
            self.add_bos, self.add_eos, self.add_space_prefix = self._pre.add_bos, False, False
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix",
                                                  self.add_space_prefix))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", self.add_eos))
        self.add_sep = bool(metadata.get("tokenizer.ggml.add_sep_token", self.add_sep))

    def _special_id(self, metadata: dict, keys: Sequence[str], default: Optional[int]) -> Optional[int]:
        if default is not None and not 0 <= default < self.n_vocab:
            default = None
        for key in keys:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if isinstance(value, int) and 0 <= value < self.n_vocab:
                default = value
        return default

    def _read_special_ids(self, metadata: dict) -> None:
        bos, eos, unk, sep, pad = _DEFAULT_IDS[self.model]
        self.bos_id = self._special_id(metadata, ["cls_token_id", "bos_token_id"], bos)
        self.eos_id = self._special_id(metadata, ["eos_token_id"], eos)
        self.unk_id = self._special_id(metadata, ["unknown_token_id"], unk)
        self.sep_id = self._special_id(metadata, ["seperator_token_id", "separator_token_id"], sep)
        self.pad_id = self._special_id(metadata, ["padding_token_id"], pad)
        self.eot_id = self._special_id(metadata, ["eot_token_id"], None)
        self.eom_id = self._special_id(metadata, ["eom_token_id"], None)
        self._fim = {kind: self._special_id(metadata, keys, None) for kind, keys in _FIM_KEYS.items()}

    def _mark_control(self, token_id: int) -> None:
        # llama.cpp: a token found by its text is control even when typed otherwise
        self._attrs[token_id] |= TokenAttr.CONTROL

    def _find_by_text(self, texts: Sequence[str]) -> Optional[int]:
        for text in texts:
            token_id = self._token_to_id.get(text)
            if token_id is not None:
                self._mark_control(token_id)
                return token_id
        return None

    def _find_special_tokens(self, metadata: dict) -> None:
        """EOT, EOM and FIM tokens by text, then the end-of-generation set (llama.cpp's rules)."""
        if self.eot_id is None:
            self.eot_id = self._find_by_text(_EOT_TEXTS)
        if self.eom_id is None:
            self.eom_id = self._find_by_text(_EOM_TEXTS)
        for kind, texts in _FIM_TEXTS.items():
            if self._fim[kind] is None:
                self._fim[kind] = self._find_by_text(texts)
        eog = {self._fim[k] for k in ("fim_pad", "fim_rep", "fim_sep")}
        for text in _EOG_TEXTS:
            token_id = self._token_to_id.get(text)
            if token_id is not None:
                eog.add(token_id)
                self._mark_control(token_id)
        eog |= {self.eos_id, self.eot_id, self.eom_id}
        eog.discard(None)
        end = self._token_to_id.get("<|end|>")
        if end in eog and {"<|return|>", "<|call|>"} <= self._token_to_id.keys():
            eog.discard(end)  # gpt-oss: <|end|> ends a message, not the generation
            self._attrs[end] = TokenAttr.USER_DEFINED
        self._eog_ids = frozenset(eog)

    def _set_name_specific_attrs(self, metadata: dict) -> None:
        """llama.cpp's per-model lstrip/rstrip attributes (absent from GGUF)."""
        name = str(metadata.get("general.name", "")).lower()
        if "phi-3" in name or "phi3" in name:
            for i, attr in enumerate(self._attrs):
                if attr & _SPECIAL:
                    self._attrs[i] |= TokenAttr.RSTRIP
            for text, rstrip in (("</s>", True), ("<unk>", False), ("<s>", False),
                                 ("<|endoftext|>", False)):
                i = self._token_to_id.get(text)
                if i is not None:
                    self._attrs[i] = (self._attrs[i] | TokenAttr.RSTRIP if rstrip
                                      else self._attrs[i] & ~TokenAttr.RSTRIP)

    def _build_encoder(self, metadata: dict):
        if self.model == "llama":
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * self.n_vocab
            return _SpmEncoder(self._tokens, [float(s) for s in scores], self._token_to_id,
                               self.unk_id)
        if self.model == "bert":
            lowercase = bool(metadata.get("tokenizer.ggml.normalizer.lowercase", True))
            strip_accents = bool(metadata.get("tokenizer.ggml.normalizer.strip_accents", lowercase))
            return _WpmEncoder(self._tokens, self.unk_id, lowercase, strip_accents)
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None:
            raise GGUFFormatError("BPE vocabulary without tokenizer.ggml.merges")
        return _BpeEncoder(self._tokens, merges, self._token_to_id, self._pre)

    # ---- encoding -------------------------------------------------------------------

    def encode(self, text: Union[str, bytes], add_bos: Optional[bool] = None,
               special: bool = False) -> list[int]:
        """Token ids of text. add_bos: None = the vocab's default (and EOS/SEP when the vocab
        adds them), True = BOS as well, False = none of them. special: also match
        control-token texts in the input (user-defined tokens are always matched, as in
        llama.cpp)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", "replace")
        ids: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is not None:
                ids.append(self.bos_id)
        ids += self._encode_fragments(self._partition(text, special))
        if add_bos is not False:
            ids += [i for i, wanted in ((self.eos_id, self.add_eos), (self.sep_id, self.add_sep))
                    if wanted and i is not None]
        return ids

    def _partition(self, text: str, special: bool) -> list[Union[str, int]]:
        """tokenizer_st_partition: cut special-token texts out of the raw text, longest
        token first; a fragment is a str (raw text) or an int (a token id)."""
        fragments: list[Union[str, int]] = [text] if text else []
        head_found: dict[str, bool] = {}  # many special tokens share a head ("[PAD1...", "<|reserved")
        for token_id in self._special_ids:
            attr = self._attrs[token_id]
            if not special and attr & _HIDDEN:
                continue
            needle = self._tokens[token_id]
            head = needle[:4]
            if head not in head_found:
                head_found[head] = head in text
            if not head_found[head] or needle not in text:
                continue
            fragments = [piece for fragment in fragments
                         for piece in self._split_fragment(fragment, needle, token_id, attr)]
        return fragments

    @staticmethod
    def _split_fragment(fragment, needle: str, token_id: int, attr: TokenAttr):
        if not isinstance(fragment, str) or needle not in fragment:
            return (fragment,)
        out: list[Union[str, int]] = []
        start = 0
        while (hit := fragment.find(needle, start)) >= 0:
            left = fragment[start:hit]
            if attr & TokenAttr.LSTRIP:
                left = left.rstrip(_C_SPACE)
            if left:
                out.append(left)
            out.append(token_id)
            start = hit + len(needle)
            if attr & TokenAttr.RSTRIP:
                while start < len(fragment) and fragment[start] in _C_SPACE:
                    start += 1
        if start < len(fragment):
            out.append(fragment[start:])
        return out

    def _encode_fragments(self, fragments: list[Union[str, int]]) -> list[int]:
        texts = self._raw_texts(fragments)
        encoded = iter(self._encoder.encode(texts)) if texts else iter(())
        ids: list[int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids += next(encoded)
        return ids

    def _raw_texts(self, fragments: list[Union[str, int]]) -> list[str]:
        """The raw fragments as the merge engine takes them (SPM: '▁' for spaces, and a
        leading '▁' at the start and after each special token when add_space_prefix)."""
        if self.model != "llama":
            return [f for f in fragments if isinstance(f, str)]
        texts, after_special = [], True
        for fragment in fragments:
            if isinstance(fragment, int):
                after_special = True
                continue
            prefix = " " if self.add_space_prefix and after_special else ""
            texts.append((prefix + fragment).replace(" ", "\u2581"))
            after_special = False
        return texts

    # ---- decoding -------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocab."""
        return self._tokens[token_id]

    def token_attr(self, token_id: int) -> TokenAttr:
        return self._attrs[token_id]

    def fim_ids(self) -> Optional[tuple]:
        """(prefix, suffix, middle) fill-in-the-middle token ids, or None when the vocabulary lacks one."""
        ids = tuple(self._fim[k] for k in ("fim_pre", "fim_suf", "fim_mid"))
        return None if None in ids else ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[token_id] & TokenAttr.CONTROL)

    def is_eog(self, token_id: int) -> bool:
        """End of generation: EOS, EOT, EOM and the other tokens llama.cpp stops on."""
        return token_id in self._eog_ids

    @property
    def eog_ids(self) -> frozenset:
        return self._eog_ids

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes a token stands for (llama.cpp's token_to_piece): control and unknown
        tokens give b"" unless special=True."""
        attr = self._attrs[token_id]
        if attr & _HIDDEN and not special:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id, attr)
        return piece

    def _piece(self, token_id: int, attr: TokenAttr) -> bytes:
        text = self._tokens[token_id]
        if attr & (_HIDDEN | TokenAttr.USER_DEFINED):
            return text.encode("utf-8")
        if attr & TokenAttr.NORMAL:
            if self.model != "gpt2":  # SPM and WordPiece write spaces as '▁'
                return text.replace("\u2581", " ").encode("utf-8")
            return _byte_level_decode(text)
        if attr & TokenAttr.BYTE:
            return bytes((int(text[3:5], 16),))  # "<0xNN>"
        return b""  # unused / undefined tokens render as nothing, as in llama.cpp

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Bytes of a token sequence; the first token loses one leading space when the vocab
        adds a space prefix (llama_detokenize with its leading-space removal)."""
        pieces = [self.token_bytes(int(i), special) for i in ids]
        if pieces and self.add_space_prefix and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        return b"".join(pieces)


class StreamDecoder:
    """Incremental detokenization: push() token by token and get only complete text;
    a multi-byte character split across tokens is held back until its last byte."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False,
                 strip_leading_space: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._strip = strip_leading_space and tokenizer.add_space_prefix
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text newly completed by this token (possibly "")."""
        piece = self._tokenizer.token_bytes(token_id, self._special)
        if self._first:
            self._first = False
            if self._strip and piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
