"""Sink profiles: find a model's attention sinks offline and store how to predict them.

A sink profile tells the runtime which tokens are attention sinks (DESIGN.md §4):
after decoder layer `layer` (the residual stream *after* that layer), token t is
a sink iff max over c in `channels` of |hidden[layer, t, c]| > `threshold`.

`calibrate(model)` finds the profile by running calibration text through the
model; `write_profile(src, dst, profile)` copies a GGUF with the profile in its
metadata; `read_profile(metadata)` reads it back. From the command line:

    python -m kvsink_cpp profile IN.gguf OUT.gguf [--text FILE] [--tokens N] [-t THREADS]
    python convert/kvsink_profile.py IN.gguf OUT.gguf [--text FILE]

GGUF metadata keys (all written together; other keys and all tensors are copied
byte for byte):

| key | type | meaning |
|---|---|---|
| `kvsink.version` | uint32 | profile format version, 1 |
| `kvsink.layer` | uint32 | 0-based decoder layer whose output residual stream is tested |
| `kvsink.channels` | array of uint32 | hidden channels (0-based, < n_embd) holding the massive activations |
| `kvsink.threshold` | float32 | a token is a sink iff max over those channels of abs(hidden) exceeds this |
| `kvsink.calibration.tokens` | uint32 | tokens of calibration text the profile was fitted on |
| `kvsink.calibration.text` | string | file name of the calibration text, or "builtin" (the package's own text) |
| `kvsink.calibration.precision` | float32 | fraction of the predicted sinks that were sinks by attention |
| `kvsink.calibration.recall` | float32 | fraction of the sinks by attention that were predicted |
| `kvsink.calibration.sinks` | uint32 | number of sinks by attention in the calibration text |

A model without massive activations that separate its sinks (for example one
with random weights) gets no profile: `calibrate` raises `NoSinkProfileError`
and the command writes nothing; the runtime then falls back to keeping the
first tokens exact (PFN).
"""
from __future__ import annotations

import argparse
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PROFILE_VERSION = 1
KEY_PREFIX = "kvsink."
BUILTIN_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"

DEFAULT_TOKENS = 2048    # the builtin text is ~1600 SmolLM2 tokens
DEFAULT_SEGMENT = 512    # several independent segments: each one's first token is a sink

# Ground truth, per layer. A position's attention share in a layer is the
# probability it receives per (query, head) that can see it (causal attention
# lets n - j queries see position j). A token is a sink in that layer when its
# share is at least SINK_RATIO times its segment's median share there: on
# SmolLM2 the sinks of layers 3-10 take 40-200x, the strongest other tokens
# about 12x. Positions seen by fewer than MIN_QUERIES queries stay unlabelled:
# their share is dominated by the attention every query pays to its recent
# tokens, not by sinkness.
SINK_RATIO = 20.0
MIN_QUERIES = 32
# The sinks a profile must predict, when tested after layer L: tokens that are
# sinks in at least MIN_SINK_LAYERS of the layers after L (one layer's outlier
# near a segment's end is noise, not a sink the cache must keep).
MIN_SINK_LAYERS = 3

# Massive activations: |h| at least MASSIVE_RATIO times the layer's median |h|.
# A channel is an outlier channel when it is massive on at least half of the
# sinks. The profile's layer is the earliest whose outlier channels predict
# the sinks of the following layers with recall >= MIN_RECALL (and F1 >=
# MIN_F1): KVSink's emergence stage (DESIGN.md section 4).
MASSIVE_RATIO = 100.0
MIN_RECALL = 0.9
MIN_F1 = 0.8


class NoSinkProfileError(ValueError):
    """The model has no sinks predictable from massive activations."""


@dataclass
class SinkProfile:
    layer: int
    channels: list
    threshold: float
    version: int = PROFILE_VERSION
    n_tokens: int = 0
    text: str = "builtin"
    precision: float = float("nan")
    recall: float = float("nan")
    n_sinks: int = 0
    source: str = "GGUF metadata"   # where the runtime found it (not stored in the file)

    def is_sink(self, hidden_after_layer: np.ndarray) -> np.ndarray:
        """The runtime's rule on (n_tokens, n_embd) hidden states after `layer`."""
        return np.abs(hidden_after_layer[:, self.channels]).max(axis=1) > self.threshold


@dataclass
class Candidate:
    """One layer examined by the emergence search."""
    layer: int
    n_targets: int                 # sinks of the following layers
    channels: list
    threshold: float = float("nan")
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0

    @property
    def accepted(self) -> bool:
        return bool(self.channels) and self.recall >= MIN_RECALL and self.f1 >= MIN_F1


@dataclass
class Calibration:
    """A profile plus what the command line reports about how it was found."""
    profile: SinkProfile
    sinks: list = field(default_factory=list)       # dicts: segment, position, token, score, layers, predicted
    predicted: list = field(default_factory=list)   # (segment, position) the profile calls sinks
    by_layer: list = field(default_factory=list)    # dicts: layer, sinks, hits, precision, recall, tokens
    candidates: list = field(default_factory=list)  # Candidate per layer examined, up to the chosen one
    sink_scores: np.ndarray = None                   # predictor score of each target sink
    best_other_score: float = 0.0                    # highest predictor score of a labelled non-target
    n_segments: int = 0
    n_unlabelled: int = 0                            # late positions left out of the ground truth
    n_unlabelled_predicted: int = 0                  # ... of which the profile calls sinks


# ---- calibration -----------------------------------------------------------

def _segments(tokens: Sequence[int], length: int) -> list:
    """Near-equal segments of at most `length` tokens, so that their median
    attention shares are comparable."""
    n_seg = max(1, math.ceil(len(tokens) / length))
    size = math.ceil(len(tokens) / n_seg)
    return [list(tokens[i:i + size]) for i in range(0, len(tokens), size)]


def _layer_shares(mass: np.ndarray) -> np.ndarray:
    """(n_layer, n) summed attention mass -> (n_layer, n) mean share per visible (query, head)."""
    n = mass.shape[1]
    n_head = mass[0].sum() / n   # each layer's row sums to n_head * n
    return mass / (n_head * (n - np.arange(n)))


def _label_sinks(mass: np.ndarray):
    """(is_sink (n_layer, n), labelled (n,), ratio (n_layer, n)) for one segment:
    ratio is each position's share over the segment's median share in that layer."""
    n_layer, n = mass.shape
    share = _layer_shares(mass)
    labelled = (n - np.arange(n)) >= MIN_QUERIES
    if not labelled.any():
        return np.zeros((n_layer, n), bool), labelled, np.zeros((n_layer, n))
    typical = np.median(share[:, labelled], axis=1, keepdims=True)
    ratio = share / np.maximum(typical, 1e-30)
    return (ratio >= SINK_RATIO) & labelled, labelled, ratio


def _trace_segments(llm, segments, progress):
    """Per-layer |hidden| (n_layer, N, n_embd), per-layer ground truth and share
    ratios (n_layer, N), and the labelled mask (N,) over all segments."""
    from tqdm import tqdm
    hidden, sinks, labelled, ratios = [], [], [], []
    for seg in tqdm(segments, desc="calibrating", unit="segment", disable=not progress):
        h, mass = llm.trace(seg)
        is_sink, ok, ratio = _label_sinks(mass)
        hidden.append(np.abs(h))
        sinks.append(is_sink), labelled.append(ok), ratios.append(ratio)
    return (np.concatenate(hidden, axis=1), np.concatenate(sinks, axis=1),
            np.concatenate(labelled), np.concatenate(ratios, axis=1))


def _targets(sink_by_layer: np.ndarray, layer: int) -> np.ndarray:
    """Tokens that are sinks in at least MIN_SINK_LAYERS layers after `layer`."""
    later = sink_by_layer[layer + 1:]
    return later.sum(axis=0) >= min(MIN_SINK_LAYERS, len(later))


def _candidate(habs: np.ndarray, sink_by_layer: np.ndarray, labelled: np.ndarray, layer: int):
    """(Candidate, scores): the outlier channels at `layer` and how well their
    best threshold predicts the sinks of the following layers."""
    target = _targets(sink_by_layer, layer) & labelled
    cand = Candidate(layer=layer, n_targets=int(target.sum()), channels=[])
    if not target.any():
        return cand, None
    floor = MASSIVE_RATIO * np.median(habs[layer])
    massive = habs[layer] >= floor
    cand.channels = [int(c) for c in np.flatnonzero(massive[target].mean(axis=0) >= 0.5)]
    if not cand.channels:
        return cand, None
    scores = habs[layer][:, cand.channels].max(axis=1)
    # the rule tests for massive activations: a cut among ordinary magnitudes is no valley
    cand.threshold = _valley_threshold(scores[labelled], target[labelled], floor)
    if math.isnan(cand.threshold):
        cand.recall = float((scores[target] >= floor).mean())   # the most a massive-activation rule can catch
        return cand, scores
    predicted = (scores > cand.threshold) & labelled
    hits = int((predicted & target).sum())
    cand.precision = hits / max(1, int(predicted.sum()))
    cand.recall = hits / cand.n_targets
    cand.f1 = 2 * hits / (int(predicted.sum()) + cand.n_targets)
    return cand, scores


def _emergence(habs: np.ndarray, sink_by_layer: np.ndarray, labelled: np.ndarray):
    """(candidates examined, chosen candidate or None, its scores): the earliest
    layer whose outlier channels predict the sinks of the layers after it."""
    examined = []
    for layer in range(habs.shape[0] - 1):
        cand, scores = _candidate(habs, sink_by_layer, labelled, layer)
        examined.append(cand)
        if cand.accepted:
            return examined, cand, scores
    return examined, None, None


def _valley_threshold(scores: np.ndarray, labels: np.ndarray, floor: float = 0.0,
                      min_recall: float = MIN_RECALL) -> float:
    """The cut in the widest valley of the scores' histogram (log scale) that
    keeps at least min_recall of the labelled sinks above it, no lower than
    `floor`; placed in the log-space middle of the gap. NaN when none exists.

    The widest gap rather than the best F1: on new text a sink may score a
    little lower than the calibration's weakest, and a cut pressed against
    the sinks (as the best F1 often is) would miss it; an extra exact row
    costs a few kilobytes, a missed sink the quality the rows are for."""
    x = np.sort(scores)[::-1]
    need = math.ceil(min_recall * labels.sum() - 1e-9)
    k = np.flatnonzero(x[:-1] > x[1:]) + 1            # cuts between distinct scores
    lo = np.maximum(x[k], 1e-30)
    cut = np.sqrt(x[k - 1] * lo)
    hits = np.array([(scores[labels] > c).sum() for c in cut])
    ok = (cut >= floor) & (hits >= need)
    if not ok.any():
        return float("nan")
    gap = np.where(ok, np.log(x[k - 1]) - np.log(lo), -np.inf)
    return float(cut[int(np.argmax(gap))])


def _read_text(text) -> tuple:
    """(bytes, name) of the calibration text: a path, or None for the builtin one."""
    if text is None:
        return BUILTIN_TEXT.read_bytes(), "builtin"
    return Path(text).read_bytes(), Path(text).name


def _calibration_tokens(llm, text, n_tokens, tokens) -> tuple:
    """(token ids, text name): the given ids, or the text's first n_tokens tokens."""
    if tokens is not None:
        return list(tokens)[:n_tokens], "tokens"
    data, name = _read_text(text)
    return llm.tokenize(data, add_bos=True)[:n_tokens], name


def _layer_ranges(layers) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(str(start) if start == l else f"{start}-{l}")
            start = None
    return ", ".join(out)


def _shown(llm, token: int, name: str):
    return token if name == "tokens" else llm.detokenize([token]).decode("utf-8", "replace")


def _flat(segments) -> list:
    """(segment, position, token) of every calibration token, in text order."""
    return [(i, j, t) for i, seg in enumerate(segments) for j, t in enumerate(seg)]


def _sink_table(llm, segments, sink_by_layer, target, scores, predicted, name) -> list:
    """One dict per target sink or predicted token, in text order."""
    flat = _flat(segments)
    rows = []
    for k in np.flatnonzero(target | predicted):
        i, j, t = flat[k]
        rows.append({"segment": i, "position": j, "token": _shown(llm, t, name), "score": float(scores[k]),
                     "layers": [int(l) for l in np.flatnonzero(sink_by_layer[:, k])],
                     "sink": bool(target[k]), "predicted": bool(predicted[k])})
    return rows


def _by_layer(llm, segments, sink_by_layer, predicted, name) -> list:
    """Per layer: the sinks by attention, how many the profile predicts, precision and recall."""
    flat = _flat(segments)
    out = []
    for layer, sinks in enumerate(sink_by_layer):
        hits = int((sinks & predicted).sum())
        tokens = [(flat[k][0], flat[k][1], _shown(llm, flat[k][2], name), bool(predicted[k]))
                  for k in np.flatnonzero(sinks)]
        out.append({"layer": layer, "sinks": int(sinks.sum()), "hits": hits,
                    "precision": hits / max(1, int(predicted.sum())),
                    "recall": hits / sinks.sum() if sinks.any() else float("nan"), "tokens": tokens})
    return out


def run_calibration(model_path, text=None, n_tokens: int = DEFAULT_TOKENS, progress: bool = True,
                    n_threads: Optional[int] = None, segment: int = DEFAULT_SEGMENT,
                    tokens: Optional[Sequence[int]] = None) -> Calibration:
    """`calibrate`, returning also the ground truth per layer, the layers the
    emergence search examined and the predictor's margin."""
    from .llama import Llama
    if segment < 2 * MIN_QUERIES:
        raise ValueError(f"segments need at least {2 * MIN_QUERIES} tokens, got {segment}")
    # exact products, an exact (f32) cache and no sink policy: calibration measures the model itself
    with Llama(str(model_path), n_ctx=segment, n_batch=segment, n_threads=n_threads, verbose=False,
               type_k="f32", type_v="f32", sinks="none", matmul="f32") as llm:
        ids, name = _calibration_tokens(llm, text, n_tokens, tokens)
        if len(ids) < 2 * MIN_QUERIES:
            raise ValueError(f"calibration needs at least {2 * MIN_QUERIES} tokens, got {len(ids)}")
        segments = _segments(ids, segment)
        habs, sink_by_layer, labelled, ratios = _trace_segments(llm, segments, progress)
        examined, chosen, scores = _emergence(habs, sink_by_layer, labelled)
        profile = _fit(examined, chosen, sink_by_layer, ratios, labelled, len(ids), name)
        target = _targets(sink_by_layer, profile.layer) & labelled
        predicted = scores > profile.threshold
        table = _sink_table(llm, segments, sink_by_layer, target, scores, predicted, name)
        by_layer = _by_layer(llm, segments, sink_by_layer, predicted & labelled, name)
    where = [(i, j) for i, j, _ in _flat(segments)]
    return Calibration(profile=profile, sinks=table, by_layer=by_layer, candidates=examined,
                       predicted=[where[k] for k in np.flatnonzero(predicted)],
                       sink_scores=scores[target],
                       best_other_score=float(scores[labelled & ~target].max(initial=0.0)),
                       n_segments=len(segments), n_unlabelled=int((~labelled).sum()),
                       n_unlabelled_predicted=int((predicted & ~labelled).sum()))


def _f32(x) -> float:
    """x rounded to float32, as stored, so that a profile read back from the GGUF compares equal."""
    return float(np.float32(x))


def _fit(examined, chosen, sink_by_layer, ratios, labelled, n_tokens, name) -> SinkProfile:
    """The profile of the chosen emergence layer, or NoSinkProfileError saying why there is none."""
    if not sink_by_layer.any():
        raise NoSinkProfileError(
            f"no attention sinks: no position took {SINK_RATIO:g}x its segment's median attention share in any "
            f"layer (the most was {ratios[:, labelled].max():.1f}x); this model gets no sink profile")
    if chosen is None:
        best = max(examined, key=lambda c: (c.f1, c.recall))
        raise NoSinkProfileError(
            f"no layer's massive activations (>= {MASSIVE_RATIO:g}x the median |hidden|) predict the sinks of the "
            f"layers after it (best: layer {best.layer}, channels {best.channels}, recall {best.recall:.2f}, "
            f"F1 {best.f1:.2f}; needed recall {MIN_RECALL} and F1 {MIN_F1}); this model gets no sink profile")
    return SinkProfile(layer=chosen.layer, channels=chosen.channels, threshold=_f32(chosen.threshold),
                       n_tokens=n_tokens, text=name, precision=_f32(chosen.precision),
                       recall=_f32(chosen.recall), n_sinks=chosen.n_targets)


def calibrate(model_path, text=None, n_tokens: int = DEFAULT_TOKENS, progress: bool = True, *,
              n_threads: Optional[int] = None, segment: int = DEFAULT_SEGMENT,
              tokens: Optional[Sequence[int]] = None) -> SinkProfile:
    """Find the sink profile of a GGUF model.

    text: path of a calibration text file (default: the package's builtin text);
    n_tokens: at most this many of its tokens are used, in independent segments
    of at most `segment` tokens; tokens: token ids to use instead of a text (for
    models without a tokenizer). Memory: n_layer x n_tokens x n_embd floats.
    Raises NoSinkProfileError when the model has no predictable sinks.
    """
    return run_calibration(model_path, text, n_tokens, progress, n_threads, segment, tokens).profile


# ---- GGUF metadata ---------------------------------------------------------

_U32, _F32, _STR, _ARR = 4, 6, 8, 9   # GGUF value types


def _profile_kvs(profile: SinkProfile) -> list:
    """(key, type, value) of the profile's metadata, in writing order."""
    return [
        ("kvsink.version", _U32, int(profile.version)),
        ("kvsink.layer", _U32, int(profile.layer)),
        ("kvsink.channels", _ARR, [int(c) for c in profile.channels]),
        ("kvsink.threshold", _F32, float(profile.threshold)),
        ("kvsink.calibration.tokens", _U32, int(profile.n_tokens)),
        ("kvsink.calibration.text", _STR, str(profile.text)),
        ("kvsink.calibration.precision", _F32, float(profile.precision)),
        ("kvsink.calibration.recall", _F32, float(profile.recall)),
        ("kvsink.calibration.sinks", _U32, int(profile.n_sinks)),
    ]


def _gguf_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _encode_kv(key: str, vtype: int, value) -> bytes:
    out = _gguf_string(key) + struct.pack("<I", vtype)
    if vtype == _U32:
        return out + struct.pack("<I", value)
    if vtype == _F32:
        return out + struct.pack("<f", value)
    if vtype == _STR:
        return out + _gguf_string(value)
    return out + struct.pack("<IQ", _U32, len(value)) + struct.pack(f"<{len(value)}I", *value)


def read_profile(metadata: dict) -> Optional[SinkProfile]:
    """The profile in GGUF metadata (typed values, as GGUFFile.metadata gives),
    or None when there is none. Raises ValueError for an unsupported version or a
    profile with missing or out-of-range keys."""
    if "kvsink.version" not in metadata:
        return None
    version = int(metadata["kvsink.version"])
    if version != PROFILE_VERSION:
        raise ValueError(f"unsupported sink profile version {version} (this runtime reads {PROFILE_VERSION})")
    missing = [k for k in ("kvsink.layer", "kvsink.channels", "kvsink.threshold") if k not in metadata]
    if missing:
        raise ValueError(f"sink profile lacks {', '.join(missing)}")
    channels = [int(c) for c in metadata["kvsink.channels"]]
    threshold = float(metadata["kvsink.threshold"])
    if not channels or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"invalid sink profile: channels {channels}, threshold {threshold}")
    return SinkProfile(
        layer=int(metadata["kvsink.layer"]), channels=channels, threshold=threshold, version=version,
        n_tokens=int(metadata.get("kvsink.calibration.tokens", 0)),
        text=str(metadata.get("kvsink.calibration.text", "")),
        precision=float(metadata.get("kvsink.calibration.precision", float("nan"))),
        recall=float(metadata.get("kvsink.calibration.recall", float("nan"))),
        n_sinks=int(metadata.get("kvsink.calibration.sinks", 0)))


def _same_file(a, b) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(b) and os.path.samefile(a, b)


def _raw(field) -> bytes:
    """A reader field's bytes exactly as stored in the file."""
    return b"".join(part.tobytes() for part in field.parts)


def _kept_fields(reader) -> list:
    """The source's key/value fields, minus the reader's virtual GGUF.* ones and old kvsink.* keys."""
    return [f for f in reader.fields.values()
            if not f.name.startswith("GGUF.") and not f.name.startswith(KEY_PREFIX)]


def _write_header(out, reader, profile) -> None:
    """Header, key/values and tensor infos, padded to the data alignment.

    The source's key/values and tensor infos are copied as raw bytes rather than
    re-encoded with gguf.GGUFWriter: that keeps every value and type exact
    (including invalid UTF-8 and empty arrays, which GGUFWriter rejects), and
    tensor offsets are relative to the data section, which is copied whole.
    """
    kept, new = _kept_fields(reader), _profile_kvs(profile)
    version = int(reader.fields["GGUF.version"].parts[0][0])
    out.write(b"GGUF" + struct.pack("<IQQ", version, len(reader.tensors), len(kept) + len(new)))
    for f in kept:
        out.write(_raw(f))
    for key, vtype, value in new:
        out.write(_encode_kv(key, vtype, value))
    for t in reader.tensors:
        out.write(_raw(t.field))
    out.write(b"\0" * (-out.tell() % reader.alignment))


def _copy_data(out, src, start: int, progress: bool) -> None:
    from tqdm import tqdm
    size = os.path.getsize(src) - start
    with open(src, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="writing tensors",
                                     disable=not progress) as bar:
        f.seek(start)
        while chunk := f.read(1 << 24):
            out.write(chunk)
            bar.update(len(chunk))


def _verify(src_reader, dst, profile) -> None:
    """Re-read dst and check it against the source; raise ValueError on any difference."""
    import gguf
    dst_reader = gguf.GGUFReader(dst)
    for f in _kept_fields(src_reader):
        g = dst_reader.fields.get(f.name)
        if g is None or g.types != f.types or _raw(g) != _raw(f):
            raise ValueError(f"written file differs from the source in key {f.name}")
    got = read_profile({k: dst_reader.fields[k].contents() for k, _, _ in _profile_kvs(profile)
                        if k in dst_reader.fields})
    if got is None or got.layer != profile.layer or got.channels != list(profile.channels):
        raise ValueError("written file does not hold the sink profile")
    if len(dst_reader.tensors) != len(src_reader.tensors):
        raise ValueError("written file has a different number of tensors")
    for a, b in zip(src_reader.tensors, dst_reader.tensors):
        same = (a.name == b.name and a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
                and np.array_equal(a.data.reshape(-1).view(np.uint8), b.data.reshape(-1).view(np.uint8)))
        if not same:
            raise ValueError(f"written file differs from the source in tensor {a.name}")


def write_profile(src, dst, profile: SinkProfile, progress: bool = True) -> None:
    """Copy the GGUF `src` to `dst` with `profile` as its kvsink.* metadata
    (replacing old kvsink.* keys). The copy is written beside dst, checked key by
    key and tensor by tensor against src, and only then renamed to dst."""
    import gguf
    src, dst = os.fspath(src), os.fspath(dst)
    if _same_file(src, dst):
        raise ValueError(f"refusing to overwrite the source model {src}; give another output path")
    reader = gguf.GGUFReader(src)
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError(f"{src} is a big-endian GGUF; only little-endian files are supported")
    tmp = dst + ".partial"
    try:
        with open(tmp, "wb") as out:
            _write_header(out, reader, profile)
            _copy_data(out, src, reader.data_offset, progress)
        _verify(reader, tmp, profile)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- command line ----------------------------------------------------------

def _report_candidates(cal: Calibration) -> None:
    print("emergence search (the earliest layer whose outlier channels predict the sinks of the layers after it):")
    for c in cal.candidates:
        head = f"  after layer {c.layer:2d}: {c.n_targets:3d} sinks in >= {MIN_SINK_LAYERS} later layers; "
        if not c.channels:
            print(head + f"no channel >= {MASSIVE_RATIO:g}x the median |h| on half of them")
            continue
        chans = f"channels {', '.join(map(str, c.channels))}: "
        if math.isnan(c.threshold):
            print(head + chans + f"no cut above the massive floor keeps recall >= {MIN_RECALL} "
                  f"(at most {c.recall:.3f}) -> rejected")
            continue
        verdict = "chosen" if c.accepted else f"rejected (needs recall >= {MIN_RECALL}, F1 >= {MIN_F1})"
        print(head + chans + f"threshold {c.threshold:.4g}, recall {c.recall:.3f}, precision {c.precision:.3f} "
              f"-> {verdict}")


def _report_layers(cal: Calibration, verbose: bool) -> None:
    print(f"sinks by attention per layer (>= {SINK_RATIO:g}x the segment's median share) and the predictor's hits:")
    print("  layer  sinks  predicted  precision  recall")
    for row in cal.by_layer:
        recall = "     -" if math.isnan(row["recall"]) else f"{row['recall']:6.3f}"
        print(f"  {row['layer']:5d}  {row['sinks']:5d}  {row['hits']:9d}  {row['precision']:9.3f}  {recall}")
        if verbose and row["tokens"]:
            shown = " ".join(f"{seg}:{pos}{tok!r}{'' if hit else '(missed)'}" for seg, pos, tok, hit in row["tokens"])
            print(f"         {shown}")


def _report_sinks(cal: Calibration, n_show: int) -> None:
    p = cal.profile
    rows = cal.sinks if n_show < 0 else cal.sinks[:n_show]
    print(f"sinks of the layers after {p.layer} (>= {MIN_SINK_LAYERS} layers) and predicted tokens, with the score "
          f"max |h[c]| after layer {p.layer}:")
    print("  segment  position  token             score  sink  predicted  sink in layers")
    for r in rows:
        print(f"  {r['segment']:7d}  {r['position']:8d}  {r['token']!r:<16} {r['score']:6.4g}  "
              f"{'yes' if r['sink'] else 'no':>4}  {'yes' if r['predicted'] else 'no':>9}  "
              f"{_layer_ranges(r['layers']) or '-'}")
    if len(rows) < len(cal.sinks):
        print(f"  ... and {len(cal.sinks) - len(rows)} more (--verbose lists them all)")


def _report(cal: Calibration, n_show: int = 16, verbose: bool = False) -> None:
    p = cal.profile
    print(f"calibration text:  {p.text}, {p.n_tokens} tokens in {cal.n_segments} segments")
    _report_layers(cal, verbose)
    _report_candidates(cal)
    _report_sinks(cal, -1 if verbose else n_show)
    print(f"emergence layer:   {p.layer}")
    print(f"outlier channels:  {', '.join(map(str, p.channels))}")
    print(f"threshold:         {p.threshold:.6g} (sinks score {cal.sink_scores.min():.6g} and up, "
          f"the highest other labelled token {cal.best_other_score:.6g})")
    print(f"predictor:         precision {p.precision:.3f}, recall {p.recall:.3f} against the {p.n_sinks} sinks "
          f"of the later layers; {len(cal.predicted)} predicted in {p.n_tokens} tokens "
          f"({100 * len(cal.predicted) / max(1, p.n_tokens):.1f}%)")
    print(f"unlabelled:        {cal.n_unlabelled} positions seen by fewer than {MIN_QUERIES} queries; "
          f"{cal.n_unlabelled_predicted} of them predicted sinks")


def _check_writable(path: str) -> None:
    """An output path whose folder exists and can be written, or a clear error."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {path}: the folder {folder} is not writable")


def _cmd_profile(args) -> int:
    if args.output is None and args.json is None:
        raise ValueError("give an output GGUF, --json PATH, or both")
    if args.output is not None and _same_file(args.model, args.output):
        raise ValueError(f"refusing to overwrite the source model {args.model}; give another output path")
    for out in (args.output, args.json):  # before a minute of calibration, not after
        if out is not None:
            _check_writable(out)
    try:
        cal = run_calibration(args.model, args.text, args.tokens, progress=not args.quiet,
                              n_threads=args.threads, segment=args.segment)
    except NoSinkProfileError as exc:
        print(f"no sink profile: {exc}; nothing written", file=sys.stderr)
        return 2
    _report(cal, verbose=args.verbose)
    if args.json is not None:
        from .gguf_file import GGUFFile
        from .sink_profiles import write_shipped_profile
        with GGUFFile(args.model) as f:
            name = str(f.metadata.get("general.name", Path(args.model).stem))
            write_shipped_profile(args.json, cal.profile, f.handle, f"{name} ({Path(args.model).name})")
        print(f"wrote {args.json}")
    if args.output is not None:
        write_profile(args.model, args.output, cal.profile, progress=not args.quiet)
        print(f"wrote {args.output}")
    return 0


_DESCRIPTION = ("Find the model's attention sinks and write a copy of the GGUF with its sink profile "
                "(kvsink.* metadata); tensors are copied unchanged.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input GGUF file")
    p.add_argument("output", nargs="?", default=None, help="output GGUF file (must differ from the input)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also (or only) write the profile as JSON keyed by the weights' fingerprint, as "
                        "shipped in kvsink_cpp/data/profiles/")
    p.add_argument("--text", default=None, help="calibration text file (default: the builtin English text)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"most calibration tokens to use (default {DEFAULT_TOKENS})")
    p.add_argument("--segment", type=int, default=DEFAULT_SEGMENT,
                   help=f"tokens per independent segment (default {DEFAULT_SEGMENT})")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: the physical cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="list every sink, per layer and per token")
    p.set_defaults(func=_cmd_profile)


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `profile` command on an argparse subparsers object."""
    p = subparsers.add_parser("profile", help="calibrate a model's sink profile and write it into a GGUF copy",
                              description=_DESCRIPTION)
    _add_arguments(p)
    return p


def main(argv=None) -> int:
    """`profile IN OUT [...]` on its own (argv without the command name); the exit
    status is 0 when written, 2 when the model has no sink profile, 1 on errors."""
    from .errors import KvsinkError
    parser = argparse.ArgumentParser(prog="kvsink_profile", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KvsinkError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
