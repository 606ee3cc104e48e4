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
DEFAULT_SEGMENT = 256    # several independent segments: each one's first token is a sink

# Ground truth. A position j's attention share is the attention probability it
# receives per (query, head) that can see it: causal attention lets n - j
# queries see it, each with n_head heads. It is averaged over layers from the
# third on, since the first layers attend mostly by position. A sink takes a
# fixed part of the attention however long the context, so the rule is
# absolute: share >= SINK_SHARE (on average a fifth of every query's
# attention), and also >= SINK_SHARE_RATIO times the median share of its
# segment, which keeps short segments (where even uniform attention gives the
# first positions a large share) from producing sinks. On SmolLM2 and the
# builtin text the sinks take 0.36-0.42 (84-112x the median) and the strongest
# non-sink 0.10 (27x, an early " the"). Positions seen by fewer than
# MIN_QUERIES queries stay unlabelled: their share is dominated by the
# attention every query pays to its own recent tokens, not by sinkness.
SKIP_LAYERS = 2
SINK_SHARE = 0.2
SINK_SHARE_RATIO = 8.0
MIN_QUERIES = 32

# Massive activations: |h| at least MASSIVE_RATIO times the layer's median |h|.
# They must persist for the same token and channel through the following half
# of the remaining layers: SmolLM2 has short-lived spikes on " the" at layers
# 1-8 that vanish at layer 10, and those tokens are not sinks.
MASSIVE_RATIO = 100.0
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

    def is_sink(self, hidden_after_layer: np.ndarray) -> np.ndarray:
        """The runtime's rule on (n_tokens, n_embd) hidden states after `layer`."""
        return np.abs(hidden_after_layer[:, self.channels]).max(axis=1) > self.threshold


@dataclass
class Calibration:
    """A profile plus what the command line reports about how it was found."""
    profile: SinkProfile
    sinks: list = field(default_factory=list)       # (segment, position, token text, attention share)
    predicted: list = field(default_factory=list)   # (segment, position) the profile calls sinks
    sink_scores: np.ndarray = None                   # predictor score of each ground-truth sink
    best_other_score: float = 0.0                    # highest predictor score of a labelled non-sink
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


def _attention_share(mass: np.ndarray) -> np.ndarray:
    """(n_layer, n) summed attention mass -> (n,) mean share per visible (query, head)."""
    n_layer, n = mass.shape
    n_head = mass[0].sum() / n   # each layer's row sums to n_head * n
    queries = n - np.arange(n)
    skip = min(SKIP_LAYERS, n_layer - 1)
    return (mass[skip:] / (n_head * queries)).mean(axis=0)


def _label_sinks(mass: np.ndarray):
    """(is_sink, labelled, share) for one segment's positions."""
    n = mass.shape[1]
    share = _attention_share(mass)
    labelled = (n - np.arange(n)) >= MIN_QUERIES
    if not labelled.any():
        return np.zeros(n, bool), labelled, share
    typical = np.median(share[labelled])
    is_sink = (share >= SINK_SHARE) & (share >= SINK_SHARE_RATIO * typical) & labelled
    return is_sink, labelled, share


def _trace_segments(llm, segments, progress):
    """Per-layer |hidden| (n_layer, N, n_embd) and ground-truth labels over all segments."""
    from tqdm import tqdm
    hidden, sinks, labelled, shares = [], [], [], []
    for seg in tqdm(segments, desc="calibrating", unit="segment", disable=not progress):
        h, mass = llm.trace(seg)
        is_sink, ok, share = _label_sinks(mass)
        hidden.append(np.abs(h))
        sinks.append(is_sink), labelled.append(ok), shares.append(share)
    return (np.concatenate(hidden, axis=1), np.concatenate(sinks),
            np.concatenate(labelled), np.concatenate(shares))


def _massive(habs: np.ndarray) -> np.ndarray:
    """(n_layer, N, n_embd) mask of activations >= MASSIVE_RATIO x their layer's median."""
    medians = np.median(habs.reshape(habs.shape[0], -1), axis=1)
    return habs >= MASSIVE_RATIO * medians[:, None, None]


def _persistent(massive: np.ndarray, layer: int) -> np.ndarray:
    """(N, n_embd) mask of activations massive at `layer` and through the next
    half of the remaining layers."""
    last = layer + max(1, (massive.shape[0] - 1 - layer) // 2)
    return massive[layer:last + 1].all(axis=0)


def _emergence(habs: np.ndarray, is_sink: np.ndarray):
    """(layer, channels): the first layer whose persistent massive activations hit
    ground-truth sinks, and the channels massive on at least half of the sinks."""
    massive = _massive(habs)
    for layer in range(habs.shape[0] - 1):
        on_sinks = _persistent(massive, layer)[is_sink]
        if not on_sinks.any():
            continue
        channels = np.flatnonzero(on_sinks.mean(axis=0) >= 0.5)
        if len(channels):
            return layer, [int(c) for c in channels]
    return None, []


def _best_threshold(scores: np.ndarray, labels: np.ndarray):
    """(threshold, F1): the cut maximizing F1 of `scores > cut`, widest gap on
    ties, placed in the log-space middle of the gap."""
    order = np.argsort(-scores, kind="stable")
    x, y = scores[order], labels[order]
    k = np.flatnonzero(x[:-1] > x[1:]) + 1            # cuts between distinct scores
    if len(k) == 0:
        return float(x[0]), 0.0
    tp = np.cumsum(y)[k - 1]
    f1 = 2 * tp / (k + y.sum())
    lo = np.maximum(x[k], 1e-30)
    gap = np.log(x[k - 1]) - np.log(lo)
    best = np.lexsort((-gap, -f1))[0]
    return float(np.sqrt(x[k[best] - 1] * lo[best])), float(f1[best])


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


def _sink_list(llm, segments, is_sink, shares, name) -> list:
    """(segment, position, token text or id, attention share) of each ground-truth sink."""
    flat = [(i, j, t) for i, seg in enumerate(segments) for j, t in enumerate(seg)]
    found = []
    for k in np.flatnonzero(is_sink):
        i, j, t = flat[k]
        shown = t if name == "tokens" else llm.detokenize([t]).decode("utf-8", "replace")
        found.append((i, j, shown, float(shares[k])))
    return found


def run_calibration(model_path, text=None, n_tokens: int = DEFAULT_TOKENS, progress: bool = True,
                    n_threads: Optional[int] = None, segment: int = DEFAULT_SEGMENT,
                    tokens: Optional[Sequence[int]] = None) -> Calibration:
    """`calibrate`, returning also the sinks found and the predictor's margin."""
    from .llama import Llama
    if segment < 2 * MIN_QUERIES:
        raise ValueError(f"segments need at least {2 * MIN_QUERIES} tokens, got {segment}")
    # an exact (f32) cache and no sink policy: calibration measures the model itself
    with Llama(str(model_path), n_ctx=segment, n_batch=segment, n_threads=n_threads, verbose=False,
               type_k="f32", type_v="f32", sinks="none") as llm:
        ids, name = _calibration_tokens(llm, text, n_tokens, tokens)
        if len(ids) < 2 * MIN_QUERIES:
            raise ValueError(f"calibration needs at least {2 * MIN_QUERIES} tokens, got {len(ids)}")
        segments = _segments(ids, segment)
        habs, is_sink, labelled, shares = _trace_segments(llm, segments, progress)
        profile, scores = _fit(habs, is_sink, labelled, shares, len(ids), name)
        sinks = _sink_list(llm, segments, is_sink, shares, name)
    where = [(i, j) for i, seg in enumerate(segments) for j in range(len(seg))]
    return Calibration(profile=profile, sinks=sinks,
                       predicted=[where[k] for k in np.flatnonzero(scores > profile.threshold)],
                       sink_scores=scores[is_sink],
                       best_other_score=float(scores[labelled & ~is_sink].max(initial=0.0)),
                       n_segments=len(segments), n_unlabelled=int((~labelled).sum()),
                       n_unlabelled_predicted=int(((scores > profile.threshold) & ~labelled).sum()))


def _f32(x) -> float:
    """x rounded to float32, as stored, so that a profile read back from the GGUF compares equal."""
    return float(np.float32(x))


def _fit(habs, is_sink, labelled, shares, n_tokens, name):
    """(profile, predictor score of every token) from the traced calibration text."""
    n_sinks = int(is_sink.sum())
    if n_sinks == 0:
        raise NoSinkProfileError(
            f"no attention sinks: no position took {SINK_SHARE:g} of the attention and "
            f"{SINK_SHARE_RATIO:g}x the median share (the most was {shares[labelled].max():.3f}); "
            "this model gets no sink profile")
    layer, channels = _emergence(habs, is_sink)
    if layer is None:
        raise NoSinkProfileError(
            f"{n_sinks} attention sinks but no persistent massive activations (>= {MASSIVE_RATIO:g}x the "
            "median |hidden|) on them; this model gets no sink profile")
    scores = habs[layer][:, channels].max(axis=1)
    threshold, f1 = _best_threshold(scores[labelled], is_sink[labelled])
    if f1 < MIN_F1:
        raise NoSinkProfileError(
            f"massive activations at layer {layer} (channels {channels}) do not separate the sinks: "
            f"best F1 {f1:.2f} < {MIN_F1}; this model gets no sink profile")
    predicted = (scores > threshold) & labelled
    tp = int((predicted & is_sink).sum())
    profile = SinkProfile(layer=layer, channels=channels, threshold=_f32(threshold), n_tokens=n_tokens,
                          text=name, precision=_f32(tp / max(1, int(predicted.sum()))),
                          recall=_f32(tp / n_sinks), n_sinks=n_sinks)
    return profile, scores


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

def _report(cal: Calibration, n_show: int = 12) -> None:
    p = cal.profile
    print(f"calibration text:  {p.text}, {p.n_tokens} tokens in {cal.n_segments} segments")
    print(f"sinks by attention: {p.n_sinks}")
    for seg, pos, tok, share in cal.sinks[:n_show]:
        print(f"  segment {seg} position {pos:4d}  {tok!r:<16} attention share {share:.3f}")
    if len(cal.sinks) > n_show:
        print(f"  ... and {len(cal.sinks) - n_show} more")
    print(f"emergence layer:   {p.layer}")
    print(f"outlier channels:  {', '.join(map(str, p.channels))}")
    print(f"threshold:         {p.threshold:.6g} (sinks score {cal.sink_scores.min():.6g} and up, "
          f"the highest non-sink {cal.best_other_score:.6g})")
    print(f"predictor:         precision {p.precision:.3f}, recall {p.recall:.3f} "
          f"on {p.n_tokens - cal.n_unlabelled} labelled positions")
    print(f"unlabelled:        {cal.n_unlabelled} positions seen by fewer than {MIN_QUERIES} queries; "
          f"{cal.n_unlabelled_predicted} of them predicted sinks")


def _cmd_profile(args) -> int:
    if _same_file(args.model, args.output):
        raise ValueError(f"refusing to overwrite the source model {args.model}; give another output path")
    try:
        cal = run_calibration(args.model, args.text, args.tokens, progress=not args.quiet,
                              n_threads=args.threads, segment=args.segment)
    except NoSinkProfileError as exc:
        print(f"no sink profile: {exc}; nothing written", file=sys.stderr)
        return 2
    _report(cal)
    write_profile(args.model, args.output, cal.profile, progress=not args.quiet)
    print(f"wrote {args.output}")
    return 0


_DESCRIPTION = ("Find the model's attention sinks and write a copy of the GGUF with its sink profile "
                "(kvsink.* metadata); tensors are copied unchanged.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input GGUF file")
    p.add_argument("output", help="output GGUF file (must differ from the input)")
    p.add_argument("--text", default=None, help="calibration text file (default: the builtin English text)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"most calibration tokens to use (default {DEFAULT_TOKENS})")
    p.add_argument("--segment", type=int, default=DEFAULT_SEGMENT,
                   help=f"tokens per independent segment (default {DEFAULT_SEGMENT})")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: half the CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
