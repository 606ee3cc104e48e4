"""A numpy model of the KVSink cache's arithmetic: which tokens are quantized
when, with which scale and zero point, and which stay fp16. Used to build the
independent reference that the C cache's attention is compared against."""
from __future__ import annotations

import math

import numpy as np

BITS = {"q8": 8, "q4": 4, "q3": 3, "q2": 2}


def hadamard(n: int) -> np.ndarray:
    """The normalized Walsh-Hadamard matrix of order n (Sylvester's construction)."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def quantize_group(x: np.ndarray, bits: int, skip=None) -> np.ndarray:
    """Asymmetric min/max round trip of one group, as kv_quant.c computes it in float32."""
    return quantize_columns(np.asarray(x, dtype=np.float32)[:, None], bits, skip)[:, 0]


def quantize_columns(x: np.ndarray, bits: int, skip=None) -> np.ndarray:
    """quantize_group on every column of x (n, m) at once, each column a group
    (the same float32 operations, element by element); skip (n,) marks rows
    left out of the statistics (and zeroed)."""
    x = np.asarray(x, dtype=np.float32)
    keep = np.ones(x.shape[0], bool) if skip is None else ~np.asarray(skip, bool)
    if keep.any():
        lo, hi = x[keep].min(axis=0), x[keep].max(axis=0)
    else:
        lo = hi = np.zeros(x.shape[1], np.float32)
    levels = (1 << bits) - 1
    zero = lo.astype(np.float16).astype(np.float32)
    scale = ((hi - lo).astype(np.float32) / np.float32(levels)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0)).astype(np.float32)
    q = np.floor((x - zero) * inv + np.float32(0.5))  # roundf: values are >= 0 here, up to rounding
    q = np.clip(q, 0, levels)
    q[~keep] = 0
    return (q.astype(np.float32) * scale + zero).astype(np.float32)


class KVSinkSim:
    """Cache state over time: tokens before win_start are committed (quantized
    blocks, or exact fp16 sink rows), the rest are fp16 window rows.

    `sinks` are pinned positions (pfn:N, or position 0 under kvsink); with a
    `profile` (layer, channels, threshold) the sim also predicts sinks from
    the hidden states the reference forward pass shows it (observe), with the
    runtime's score max|h[c]| / threshold, and a table of `capacity` rows in
    which a stronger sink displaces the weakest (its block's keys are then
    quantized again with it, from their dequantized values).

    key_per_token (kv_key_per_token): keys quantized like values, per token in
    groups of `group` channels (rotated blocks: after RoPE by the offset in the
    block and H), so a sink's key row never enters another token's
    statistics and a demoted sink simply reads its block's quantized row."""

    def __init__(self, type_k: str, type_v: str, block: int, recent: int, group: int, sinks: set,
                 capacity: int | None = None, profile=None, rotate: str = "none", rope=None,
                 key_per_token: bool = False):
        self.kbits, self.vbits = BITS.get(type_k, 0), BITS.get(type_v, 0)
        self.f16 = {"k": type_k == "f16", "v": type_v == "f16"}
        self.block, self.recent, self.group = block, recent, group
        self.capacity, self.profile = capacity, profile
        self.key_per_token = key_per_token
        # kv_rotate: quantized keys are stored as H (RoPE by the offset in the block) k,
        # values as H v; rope(x (n, heads, hd), positions) is the model's RoPE
        self.rot_k = "k" in rotate and self.kbits > 0
        self.rot_v = "v" in rotate and self.vbits > 0
        self.rope = rope
        self.scores = {p: math.inf for p in sinks}
        self.table: list = []      # positions with a sink row, increasing
        self.masks: dict = {}      # block start -> the block's sink sets over time
        self.dropped = 0
        self.win_start = 0

    @property
    def sinks(self) -> set:
        return set(self.table)

    def observe(self, layer: int, start: int, hidden: np.ndarray) -> None:
        """Hidden states (n, n_embd) after `layer` of tokens start.. (the predictor)."""
        if self.profile is None or layer != self.profile[0]:
            return
        _, channels, threshold = self.profile
        for t, s in enumerate(np.abs(hidden[:, channels]).max(axis=1) / threshold):
            if s > 1:
                self.scores[start + t] = max(self.scores.get(start + t, 0.0), float(s))

    def commit(self, n_past: int) -> None:
        while n_past - self.win_start >= self.recent + self.block:
            self._commit_block(self.win_start)
            self.win_start += self.block

    def _weakest(self):
        finite = [p for p in self.table if self.scores[p] < math.inf]
        return min(reversed(finite), key=lambda p: self.scores[p]) if finite else None

    def _commit_block(self, o0: int) -> None:
        mask = set()
        for p in range(o0, o0 + self.block):
            score = self.scores.get(p, 0.0)
            if score <= 0:
                continue
            if self.capacity is not None and len(self.table) == self.capacity:
                weak = self._weakest()
                if weak is None or self.scores[weak] >= score:
                    self.dropped += 1
                    continue
                if weak >= o0:
                    mask.discard(weak)
                else:
                    b0 = weak - weak % self.block
                    self.masks[b0].append(self.masks[b0][-1] - {weak})
                self.table.remove(weak)
                self.dropped += 1
            self.table.append(p)
            mask.add(p)
        self.masks[o0] = [mask]

    def effective(self, k: np.ndarray, v: np.ndarray):
        """Cached K, V (n, n_kv, head_dim) as attention reads them now."""
        # rows land in the fp16 window first, and blocks are quantized from there
        k32 = k.astype(np.float16).astype(np.float32)
        v32 = v.astype(np.float16).astype(np.float32)
        k_eff, v_eff = k32.copy(), v32.copy()
        for b0 in range(0, self.win_start, self.block):
            rows = np.arange(b0, b0 + self.block)
            masks = [np.array([r in m for r in rows]) for m in self.masks[b0]]
            self._block(k32, k_eff, rows, masks, self.kbits, per_channel=not self.key_per_token, f16=self.f16["k"],
                        is_key=True)
            self._block(v32, v_eff, rows, masks, self.vbits, per_channel=False, f16=self.f16["v"])
        return k_eff.astype(np.float64), v_eff.astype(np.float64)

    def _to_block_space(self, tile, is_key, inverse=False):
        """Rows (B, hd) of keys or values into (or back from) the space a rotated block is quantized in."""
        rotated = self.rot_k if is_key else self.rot_v
        if not rotated:
            return tile
        h = hadamard(tile.shape[1])
        offsets = np.arange(len(tile), dtype=np.float64)
        if not is_key:
            return (tile.astype(np.float64) @ h).astype(np.float32)
        if inverse:
            x = tile.astype(np.float64) @ h
            return self.rope(x[:, None, :], -offsets)[:, 0, :].astype(np.float32)
        return (self.rope(tile.astype(np.float64)[:, None, :], offsets)[:, 0, :] @ h).astype(np.float32)

    def _block(self, raw, eff, rows, masks, bits, per_channel, f16, is_key=None):
        if bits == 0:
            return  # f16 blocks hold the same fp16 rows as the window
        is_key = per_channel if is_key is None else is_key  # keys: RoPE by offset + H when rotated
        n_kv, hd = raw.shape[1], raw.shape[2]
        for h in range(n_kv):
            tile = self._to_block_space(raw[rows, h, :], is_key)
            if per_channel:  # one group per channel across the block's tokens
                out = quantize_columns(tile, bits, masks[0])
                for before, after in zip(masks, masks[1:]):  # a sink demoted: quantized again with it
                    out[before & ~after] = tile[before & ~after]
                    out = quantize_columns(out, bits, after)
            else:  # per token, groups of g channels
                g = self.group if hd % self.group == 0 else hd
                out = quantize_columns(tile.reshape(-1, g).T, bits).T.reshape(tile.shape)
            keep = ~masks[-1]
            eff[rows[keep], h, :] = self._to_block_space(out, is_key, inverse=True)[keep]
