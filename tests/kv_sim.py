"""A numpy model of the KVSink cache's arithmetic: which tokens are quantized
when, with which scale and zero point, and which stay fp16. Used to build the
independent reference that the C cache's attention is compared against."""
from __future__ import annotations

import numpy as np

BITS = {"q8": 8, "q4": 4, "q3": 3, "q2": 2}


def quantize_group(x: np.ndarray, bits: int, skip=None) -> np.ndarray:
    """Asymmetric min/max round trip of one group, as kv_quant.c computes it in float32."""
    x = np.asarray(x, dtype=np.float32)
    keep = np.ones(len(x), bool) if skip is None else ~skip
    lo, hi = (x[keep].min(), x[keep].max()) if keep.any() else (np.float32(0), np.float32(0))
    levels = (1 << bits) - 1
    zero = np.float32(np.float16(lo))
    scale = np.float32(np.float16(np.float32(hi - lo) / np.float32(levels)))
    inv = np.float32(1.0) / scale if scale > 0 else np.float32(0)
    q = np.floor((x - zero) * inv + np.float32(0.5))  # roundf: values are >= 0 here, up to rounding
    q = np.clip(q, 0, levels)
    q[~keep] = 0
    return (q.astype(np.float32) * scale + zero).astype(np.float32)


class KVSinkSim:
    """Cache state over time: tokens before win_start are committed (quantized
    blocks, or exact fp16 sink rows), the rest are fp16 window rows."""

    def __init__(self, type_k: str, type_v: str, block: int, recent: int, group: int, sinks: set):
        self.kbits, self.vbits = BITS.get(type_k, 0), BITS.get(type_v, 0)
        self.f16 = {"k": type_k == "f16", "v": type_v == "f16"}
        self.block, self.recent, self.group, self.sinks = block, recent, group, set(sinks)
        self.win_start = 0

    def commit(self, n_past: int) -> None:
        while n_past - self.win_start >= self.recent + self.block:
            self.win_start += self.block

    def effective(self, k: np.ndarray, v: np.ndarray):
        """Cached K, V (n, n_kv, head_dim) as attention reads them now."""
        # rows land in the fp16 window first, and blocks are quantized from there
        k32 = k.astype(np.float16).astype(np.float32)
        v32 = v.astype(np.float16).astype(np.float32)
        k_eff, v_eff = k32.copy(), v32.copy()
        for b0 in range(0, self.win_start, self.block):
            rows = np.arange(b0, b0 + self.block)
            skip = np.array([r in self.sinks for r in rows])
            self._block(k32, k_eff, rows, skip, self.kbits, per_channel=True, f16=self.f16["k"])
            self._block(v32, v_eff, rows, skip, self.vbits, per_channel=False, f16=self.f16["v"])
        return k_eff.astype(np.float64), v_eff.astype(np.float64)

    def _block(self, raw, eff, rows, skip, bits, per_channel, f16):
        if bits == 0:
            return  # f16 blocks hold the same fp16 rows as the window
        n_kv, hd = raw.shape[1], raw.shape[2]
        for h in range(n_kv):
            tile = raw[rows, h, :]
            out = np.empty_like(tile)
            if per_channel:
                for d in range(hd):
                    out[:, d] = quantize_group(tile[:, d], bits, skip)
            else:
                g = self.group if hd % self.group == 0 else hd
                for t in range(len(rows)):
                    for c0 in range(0, hd, g):
                        out[t, c0:c0 + g] = quantize_group(tile[t, c0:c0 + g], bits)
            keep = ~skip
            eff[rows[keep], h, :] = out[keep]
