"""A plain numpy forward pass of llama-family models: the independent oracle.

Weights come from the `gguf` package (GGUFReader + gguf.quants.dequantize),
activations are float64, the KV cache is exact. Nothing here uses kvsink_cpp.

Gemma 3 as llama.cpp runs it (src/models/gemma3.cpp, llama-model.cpp): token
embeddings times sqrt(n_embd); per-head RMSNorm of q and k before RoPE
(NeoX pairs); queries scaled by 1/sqrt(head_dim) (n_embd/n_head for the 62-layer
27B); a norm on each block's output before its residual; GeGLU with GELU's
tanh form; of every 6 layers the first 5 attend to a sliding window (key p is
masked for query m when m - p >= n_swa) and rotate with base 10000, the 6th is
global with rope.freq_base; tied output, an optional final soft-cap. Norm
weights are used as stored (the converter already added Gemma's +1).

The others, from their definitions (Hugging Face's modeling_*.py, llama.cpp's
src/models/*.cpp): llama rotates adjacent pairs (2i, 2i+1), everything else
NeoX pairs (i, i + n_rot/2). qwen2 adds q/k/v biases. qwen3 has none, but a
per-head RMSNorm of q and k before RoPE, like gemma3; its heads may be wider
than n_embd / n_head (attention.key_length). phi3 fuses q, k and v into one
matrix attn_qkv (rows: q, then k, then v) and gate and up into ffn_up (rows:
gate, then up). llama and phi3 files may declare attention.sliding_window:
every layer then attends to that window, rotating exactly as without it.
Llama 3.1's "llama3" scaling divides each frequency by the factor stored in
rope_freqs.weight and scales no position (its factor built that tensor);
"linear" divides every position by its factor.
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
        self.neox = self.arch in ("qwen2", "qwen3", "phi3", "gemma3")
        gemma3 = self.arch == "gemma3"
        windowed = self.arch in ("gemma3", "llama", "phi3")
        self.n_swa = _field(reader, f"{a}.attention.sliding_window", 0) if windowed else 0
        # gemma3: of every 6 layers the last is global; llama and phi3: every layer is local
        self.swa_period = _field(reader, f"{a}.attention.sliding_window_pattern", 6) if gemma3 else 0
        # only gemma3's local layers rotate differently (their own base, unscaled, no factors)
        self.own_local_rope = gemma3
        self.freq_base_swa = _field(reader, f"{a}.rope.freq_base_swa", 10000.0)
        self.softcap = _field(reader, f"{a}.final_logit_softcapping", 0.0) if gemma3 else 0.0
        self.embd_scale = float(np.sqrt(self.n_embd)) if gemma3 else 1.0
        qpas = self.n_embd // self.n_head if gemma3 and self.n_layer == 62 else self.head_dim
        self.attn_scale = 1.0 / np.sqrt(qpas)
        self.gelu = gemma3
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: outer first
            self.w[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])
        # Llama 3.1's frequency factors: the llama graph's alone
        self.rope_freqs = self.w.get("rope_freqs.weight") if self.arch == "llama" else None

    def is_swa(self, il):
        """Whether layer il attends to a sliding window (the last of each period is global)."""
        if self.n_swa <= 0:
            return False
        if isinstance(self.swa_period, (list, tuple)):  # one bool per layer
            return bool(self.swa_period[il])
        return self.swa_period == 0 or il % self.swa_period < self.swa_period - 1

    def _rmsnorm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x, positions, il=None):
        """x: (n_tokens, n_heads, head_dim); rotates the first n_rot dims, with
        layer il's base (local layers have their own, unscaled, no factors)."""
        half = self.n_rot // 2
        local = il is not None and self.is_swa(il) and self.own_local_rope
        base, scale = (self.freq_base_swa, 1.0) if local else (self.freq_base, self.freq_scale)
        freqs = base ** (-2.0 * np.arange(half) / self.n_rot)
        if self.rope_freqs is not None and not local:
            freqs = freqs / self.rope_freqs.astype(np.float64)
        theta = np.outer(positions * scale, freqs)[:, None, :]  # (n, 1, half)
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
        """Pre-RoPE q, k, v of layer prefix p: (n, heads, head_dim); q and k
        through their per-head norms when the model has them."""
        n = len(x)
        h = self._rmsnorm(x, self.w[p + "attn_norm.weight"])
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        if p + "attn_qkv.weight" in self.w:  # phi3: one product, then its columns q | k | v
            qkv = self._linear(h, p + "attn_qkv.weight")
            assert qkv.shape[1] == q_dim + 2 * kv_dim
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
        else:
            q = self._linear(h, p + "attn_q.weight")
            k = self._linear(h, p + "attn_k.weight")
            v = self._linear(h, p + "attn_v.weight")
        q = q.reshape(n, self.n_head, self.head_dim)
        k = k.reshape(n, self.n_head_kv, self.head_dim)
        v = v.reshape(n, self.n_head_kv, self.head_dim)
        if p + "attn_q_norm.weight" in self.w:
            q = self._rmsnorm(q, self.w[p + "attn_q_norm.weight"])
            k = self._rmsnorm(k, self.w[p + "attn_k_norm.weight"])
        return q, k, v

    def _post(self, y, name):
        """A block's output through its post-norm (gemma3), if the model has one."""
        return self._rmsnorm(y, self.w[name]) if name in self.w else y

    def _mask(self, q_pos, k_pos, il):
        """Additive mask (queries x keys): causal, plus a local layer's window."""
        q_pos, k_pos = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
        hidden = k_pos > q_pos
        if self.is_swa(il):
            hidden = hidden | (q_pos - k_pos >= self.n_swa)
        return np.where(hidden, -np.inf, 0.0)

    def _ffn(self, x, p):
        h = self._rmsnorm(x, self.w[p + "ffn_norm.weight"])
        if p + "ffn_gate.weight" in self.w:
            gate = self._linear(h, p + "ffn_gate.weight")
            up = self._linear(h, p + "ffn_up.weight")
        else:  # phi3: ffn_up holds gate then up (Phi3MLP's gate_up_proj, chunked in two)
            gate, up = np.split(self._linear(h, p + "ffn_up.weight"), 2, axis=-1)
        if self.gelu:  # GELU's tanh form (gelu_pytorch_tanh)
            act = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate ** 3)))
        else:
            with np.errstate(over="ignore"):  # exp(-gate) -> inf gives silu = -0, as it should
                act = gate / (1.0 + np.exp(-gate))
        return self._post(self._linear(act * up, p + "ffn_down.weight"), p + "post_ffw_norm.weight")

    def _embed(self, tokens):
        return self.w["token_embd.weight"][tokens].astype(np.float64) * self.embd_scale

    def _logits(self, x):
        h = self._rmsnorm(x, self.w["output_norm.weight"])
        # by slices of the vocabulary: a float64 copy of a 262k-row output matrix would take GBs
        logits = np.concatenate([h @ self.output[i:i + 16384].astype(np.float64).T
                                 for i in range(0, len(self.output), 16384)], axis=1)
        return self.softcap * np.tanh(logits / self.softcap) if self.softcap > 0 else logits

    def forward(self, tokens, kv_dtype=None, trace=None, n_logits=None):
        """Logits (n_tokens, n_vocab) for a sequence starting at position 0;
        with n_logits, those of the last n_logits tokens only (a 262k vocabulary
        makes all of a long sequence's logits GBs).

        kv_dtype=np.float16 rounds the cached K (before RoPE) and V as an f16 cache does.
        trace (a dict) receives "hidden" (n_layer, n, n_embd), the residual stream
        after each layer, and "attn_mass" (n_layer, n), the attention probability
        each position receives summed over heads and queries.
        """
        tokens = np.asarray(tokens)
        n = len(tokens)
        pos = np.arange(n, dtype=np.float64)
        x = self._embed(tokens)
        group = self.n_head // self.n_head_kv
        for il in range(self.n_layer):
            p = f"blk.{il}."
            q, k, v = self._qkv(x, p)
            if kv_dtype is not None:  # the cache keeps keys before RoPE
                k, v = k.astype(kv_dtype).astype(np.float64), v.astype(kv_dtype).astype(np.float64)
            q, k = self._rope(q, pos, il), self._rope(k, pos, il)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) * self.attn_scale + self._mask(pos, pos, il)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
            if trace is not None:
                trace.setdefault("attn_mass", []).append(scores.sum(axis=(0, 1)))
            x = x + self._post(self._linear(att, p + "attn_output.weight"), p + "post_attention_norm.weight")
            x = x + self._ffn(x, p)
            if trace is not None:
                trace.setdefault("hidden", []).append(x.copy())
        return self._logits(x if n_logits is None else x[len(x) - n_logits:])

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
            x = self._embed(ids)
            for il in range(self.n_layer):
                p = f"blk.{il}."
                q, k, v = self._qkv(x, p)
                keys[il] = np.concatenate([keys[il], k])
                values[il] = np.concatenate([values[il], v])
                if getattr(sim, "rope", None) is not None:  # rotated key blocks: RoPE of this layer
                    sim.rope = lambda x_, pos_, il=il: self._rope(x_, pos_, il)
                k_all, v_all = sim.effective(keys[il], values[il])
                q = self._rope(q, pos, il)
                k_pos = np.arange(u0 + m, dtype=np.float64)
                k_all = self._rope(k_all, k_pos, il)
                k_all, v_all = np.repeat(k_all, group, axis=1), np.repeat(v_all, group, axis=1)
                scores = np.einsum("qhd,khd->hqk", q, k_all) * self.attn_scale + self._mask(pos, k_pos, il)
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                att = np.einsum("hqk,khd->qhd", scores, v_all).reshape(m, -1)
                x = x + self._post(self._linear(att, p + "attn_output.weight"), p + "post_attention_norm.weight")
                x = x + self._ffn(x, p)
                if hasattr(sim, "observe"):
                    sim.observe(il, u0, x)
            logits.append(self._logits(x))
            sim.commit(u0 + m)
        return np.concatenate(logits)
