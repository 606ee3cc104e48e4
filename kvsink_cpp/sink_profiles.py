"""Sink profiles shipped with kvsink_cpp, so that known models run KVSink
without a rewritten GGUF.

Each profile is a JSON file in kvsink_cpp/data/profiles/ holding the profile
(layer, channels, threshold, calibration notes) and the *fingerprint* of the
GGUF it was calibrated on: a sha256 over the architecture and, for every
tensor, its name, type, shape and first 4 KiB of data. That identifies the
weights (another quantization or fine-tune of the same model has other bytes)
while reading about a megabyte, not the whole file, at every load. kvsink.*
keys in the GGUF win over a shipped profile.

    python -m kvsink_cpp profile MODEL.gguf --json kvsink_cpp/data/profiles/NAME.json
"""
from __future__ import annotations

import hashlib
import json
import struct
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ._native import check, ffi, lib
from .gguf_file import read_value

PROFILE_DIR = Path(__file__).resolve().parent / "data" / "profiles"
SAMPLE_BYTES = 4096
FORMAT = "kvsink-profile"


def fingerprint(handle) -> str:
    """The weights' fingerprint of an open GGUF (`kvs_gguf *`)."""
    arch = str(read_value(handle, "general.architecture", "")).encode()
    h = hashlib.sha256(b"kvsink-fingerprint-1\0" + arch + b"\0")
    info = ffi.new("kvs_gguf_tensor_info *")
    for i in range(lib.kvs_gguf_n_tensors(handle)):
        check(lib.kvs_gguf_tensor(handle, i, info))
        h.update(bytes(ffi.buffer(info.name, info.name_len)) + b"\0")
        h.update(struct.pack("<ii4q", info.type, info.n_dims, *[info.ne[d] for d in range(4)]))
        h.update(ffi.buffer(info.data, min(int(info.n_bytes), SAMPLE_BYTES)))
    return h.hexdigest()


@lru_cache(maxsize=None)
def _load_all(directory: str) -> tuple:
    """(fingerprint, file name, parsed JSON) of every shipped profile."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvsink profile (format {data.get('format')!r})")
        out.append((data["fingerprint"], path.name, data))
    return tuple(out)


def _profile_of(data: dict, name: str):
    from .profile import SinkProfile
    cal = data.get("calibration", {})
    return SinkProfile(layer=int(data["layer"]), channels=[int(c) for c in data["channels"]],
                       threshold=float(data["threshold"]), version=int(data.get("version", 1)),
                       n_tokens=int(cal.get("tokens", 0)), text=str(cal.get("text", "")),
                       precision=float(cal.get("precision", float("nan"))),
                       recall=float(cal.get("recall", float("nan"))), n_sinks=int(cal.get("sinks", 0)),
                       source=f"shipped with kvsink_cpp ({name})")


def find_shipped_profile(handle, directory: Optional[Path] = None):
    """The shipped SinkProfile for an open GGUF, or None (directory: PROFILE_DIR)."""
    entries = _load_all(str(PROFILE_DIR if directory is None else directory))
    if not entries:
        return None
    key = fingerprint(handle)
    for fp, name, data in entries:
        if fp == key:
            return _profile_of(data, name)
    return None


def write_shipped_profile(path, profile, handle, model: str) -> None:
    """Write `profile` as a shipped-profile JSON for the GGUF open as `handle`."""
    data = {
        "format": FORMAT, "version": int(profile.version), "model": model, "fingerprint": fingerprint(handle),
        "layer": int(profile.layer), "channels": [int(c) for c in profile.channels],
        "threshold": float(profile.threshold),
        "calibration": {"tokens": int(profile.n_tokens), "text": profile.text, "precision": float(profile.precision),
                        "recall": float(profile.recall), "sinks": int(profile.n_sinks)},
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _load_all.cache_clear()


def resolve_profile(model_handle, metadata: dict) -> Optional[object]:
    """The profile a loaded model (`kvs_model *`) runs with: its GGUF's kvsink.*
    keys, else a shipped one (installed into the model), else None."""
    from .profile import read_profile
    if lib.kvs_model_has_sink_profile(model_handle):
        return read_profile(metadata)
    found = find_shipped_profile(lib.kvs_model_gguf(model_handle))
    if found is not None:
        channels = ffi.new("int32_t[]", found.channels)
        check(lib.kvs_model_set_sink_profile(model_handle, found.layer, channels, len(found.channels),
                                             found.threshold))
    return found
