"""A plain numpy forward pass of llama-family models: the independent oracle.

Weights come from the `gguf` package (GGUFReader + gguf.quants.dequantize),
activations are float64, the KV cache is exact. Nothing here uses kvsink_cpp.
"""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class NumpyLlama:
    def __init__(self, path):
        reader = GGUFReader(path)
        self.arch = _field(reader, "general.architecture")
        a = self.arch
        self.n_embd = _field(reader, f"{a}.embedding_length")
        self.n_layer = _field(reader, f"{a}.block_count")
        self.n_head = _field(reader, f"{a}.attention.head_count")
        self.n_head_kv = _field(reader, f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = _field(reader, f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.n_rot = _field(reader, f"{a}.rope.dimension_count", self.head_dim)
        self.eps = _field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        self.freq_base = _field(reader, f"{a}.rope.freq_base", 10000.0)
        scaling = _field(reader, f"{a}.rope.scaling.type", "none")
        factor = _field(reader, f"{a}.rope.scaling.factor", 1.0)
        self.freq_scale = 1.0 / factor if scaling == "linear" else 1.0
        self.neox = self.arch == "qwen2"
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: outer first
            self.w[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])

    def _rmsnorm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x, positions):
        """x: (n_tokens, n_heads, head_dim); rotates the first n_rot dims."""
        half = self.n_rot // 2
        freqs = self.freq_base ** (-2.0 * np.arange(half) / self.n_rot)
        if "rope_freqs.weight" in self.w:
            freqs = freqs / self.w["rope_freqs.weight"].astype(np.float64)
        theta = np.outer(positions * self.freq_scale, freqs)[:, None, :]  # (n, 1, half)
        cos, sin = np.cos(theta), np.sin(theta)
        x = x.copy()
        if self.neox:
            a, b = x[..., :half].copy(), x[..., half:self.n_rot].copy()
            x[..., :half], x[..., half:self.n_rot] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = x[..., 0:self.n_rot:2].copy(), x[..., 1:self.n_rot:2].copy()
            x[..., 0:self.n_rot:2], x[..., 1:self.n_rot:2] = a * cos - b * sin, a * sin + b * cos
        return x

    def _linear(self, x, name):
        y = x @ self.w[name].astype(np.float64).T
        bias = name.replace(".weight", ".bias")
        return y + self.w[bias] if bias in self.w else y

    def _qkv(self, x, p):
        """Pre-RoPE q, k, v of layer prefix p: (n, heads, head_dim)."""
        n = len(x)
        h = self._rmsnorm(x, self.w[p + "attn_norm.weight"])
        q = self._linear(h, p + "attn_q.weight").reshape(n, self.n_head, self.head_dim)
        k = self._linear(h, p + "attn_k.weight").reshape(n, self.n_head_kv, self.head_dim)
        v = self._linear(h, p + "attn_v.weight").reshape(n, self.n_head_kv, self.head_dim)
        return q, k, v

    def _ffn(self, x, p):
        h = self._rmsnorm(x, self.w[p + "ffn_norm.weight"])
        gate = self._linear(h, p + "ffn_gate.weight")
        up = self._linear(h, p + "ffn_up.weight")
        with np.errstate(over="ignore"):  # exp(-gate) -> inf gives silu = -0, as it should
            silu = gate / (1.0 + np.exp(-gate))
        return self._linear(silu * up, p + "ffn_down.weight")

    def forward(self, tokens, kv_dtype=None, trace=None):
        """Logits (n_tokens, n_vocab) for a sequence starting at position 0.

        kv_dtype=np.float16 rounds the cached K (before RoPE) and V as an f16 cache does.
        trace (a dict) receives "hidden" (n_layer, n, n_embd), the residual stream
        after each layer, and "attn_mass" (n_layer, n), the attention probability
        each position receives summed over heads and queries.
        """
        tokens = np.asarray(tokens)
        n = len(tokens)
        pos = np.arange(n, dtype=np.float64)
        x = self.w["token_embd.weight"][tokens].astype(np.float64)
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        group = self.n_head // self.n_head_kv
        for il in range(self.n_layer):
            p = f"blk.{il}."
            q, k, v = self._qkv(x, p)
            if kv_dtype is not None:  # the cache keeps keys before RoPE
                k, v = k.astype(kv_dtype).astype(np.float64), v.astype(kv_dtype).astype(np.float64)
            q, k = self._rope(q, pos), self._rope(k, pos)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.head_dim) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
            if trace is not None:
                trace.setdefault("attn_mass", []).append(scores.sum(axis=(0, 1)))
            x = x + self._linear(att, p + "attn_output.weight")
            x = x + self._ffn(x, p)
            if trace is not None:
                trace.setdefault("hidden", []).append(x.copy())
        x = self._rmsnorm(x, self.w["output_norm.weight"])
        return x @ self.output.astype(np.float64).T

    def forward_cached(self, tokens, sim, ubatch):
        """Logits of tokens evaluated ubatch at a time against a cache whose
        arithmetic `sim` models (tests/kv_sim.py): the KVSink cache's reference."""
        tokens = np.asarray(tokens)
        n = len(tokens)
        group = self.n_head // self.n_head_kv
        keys = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]
        values = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]
        logits = []
        for u0 in range(0, n, ubatch):
            ids = tokens[u0:u0 + ubatch]
            m = len(ids)
            pos = np.arange(u0, u0 + m, dtype=np.float64)
            x = self.w["token_embd.weight"][ids].astype(np.float64)
            for il in range(self.n_layer):
                p = f"blk.{il}."
                q, k, v = self._qkv(x, p)
                keys[il] = np.concatenate([keys[il], k])
                values[il] = np.concatenate([values[il], v])
                k_all, v_all = sim.effective(keys[il], values[il])
                q = self._rope(q, pos)
                k_all = self._rope(k_all, np.arange(u0 + m, dtype=np.float64))
                k_all, v_all = np.repeat(k_all, group, axis=1), np.repeat(v_all, group, axis=1)
                scores = np.einsum("qhd,khd->hqk", q, k_all) / np.sqrt(self.head_dim)
                scores = scores + np.where(np.arange(u0 + m)[None, :] > pos[:, None], -np.inf, 0.0)
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                att = np.einsum("hqk,khd->qhd", scores, v_all).reshape(m, -1)
                x = x + self._linear(att, p + "attn_output.weight")
                x = x + self._ffn(x, p)
                if hasattr(sim, "observe"):
                    sim.observe(il, u0, x)
            logits.append(self._rmsnorm(x, self.w["output_norm.weight"]) @ self.output.astype(np.float64).T)
            sim.commit(u0 + m)
        return np.concatenate(logits)
