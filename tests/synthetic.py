"""Tiny random GGUF models written with the `gguf` package, covering what no
small real model here has: qwen2 (biases, NeoX RoPE), qwen3 (QK-norm, heads
wider than n_embd / n_head), phi3 (fused q|k|v and gate|up weights, a window on
every layer), every weight format, linear RoPE scaling and Llama-3 frequency
factors, and gemma3 (QK-norm, sandwich norms, GeGLU, sliding-window layers) at
a size where the window matters within a short test."""
from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

# byte offsets of the fp16 scale fields, which random bytes could make inf/nan
_SCALE_OFFSETS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}


def random_blocks(qtype: T, n_rows: int, n_cols: int, rng: np.random.Generator,
                  scale: float = 0.05) -> np.ndarray:
    """Random quantized rows (uint8, n_rows x bytes per row) with finite scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_cols // block_elems
    data = rng.integers(0, 256, size=(n_rows, n_blocks, block_bytes), dtype=np.uint8)
    for off in _SCALE_OFFSETS[qtype]:
        scales = (rng.uniform(0.2, 1.0, size=(n_rows, n_blocks)) * scale).astype(np.float16)
        data[:, :, off:off + 2] = scales.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return data.reshape(n_rows, n_blocks * block_bytes)


def _matrix(rng, qtype: T, n_out: int, n_in: int, scale: float = 0.05):
    """(array, raw_dtype) for a weight of n_out rows of n_in elements."""
    if qtype in _SCALE_OFFSETS:
        return random_blocks(qtype, n_out, n_in, rng, scale), qtype
    w = rng.normal(0.0, scale, size=(n_out, n_in)).astype(np.float32)
    if qtype == T.F32:
        return w, None
    if qtype == T.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype  # BF16


def _add_shape(w, n_embd, n_layer, n_ff, n_head, n_head_kv):
    """The size keys every writer below starts with."""
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)


def write_model(path, arch: str, types: dict, *, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                n_layer=2, n_vocab=320, tied=False, rope_scale=None, rope_scaling_type="linear",
                rope_freqs=False, biases=False, head_dim=None, qk_norm=False, fused=False,
                sliding_window=None, freq_base=10000.0, eps=1e-5, weight_scale=0.05, omit=(), seed=0,
                extra=None):
    """Write a random llama-family model; `types` maps a weight role to its type;
    `extra(writer)`, when given, adds metadata (or an alignment) before the tensors.

    rope_scale writes rope.scaling.type `rope_scaling_type` with that factor;
    head_dim (default n_embd / n_head) writes attention.key_length when given;
    qk_norm adds per-head q/k norm weights (qwen3); fused writes phi3's layout:
    attn_qkv (q, k, v rows; type of "q") and ffn_up holding gate then up (type
    of "up"), no ffn_gate (True: both, or a tuple of "qkv", "gate_up"); sliding_window writes attention.sliding_window;
    weight_scale sets the size of the layer matrices' random scales (tamer
    models, whose logits 8-bit activations move less, take smaller ones);
    tensors named in `omit` are left out (their random draws still happen)."""
    rng = np.random.default_rng(seed)
    fused = ("qkv", "gate_up") if fused is True else tuple(fused or ())
    key_length = head_dim
    head_dim = head_dim or n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    if extra:
        extra(w)
    _add_shape(w, n_embd, n_layer, n_ff, n_head, n_head_kv)
    if key_length:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(freq_base)
    w.add_rope_dimension_count(head_dim)
    if rope_scale:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling_type)
        w.add_rope_scaling_factor(rope_scale)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)

    def put(name, arr, raw=None):
        if name not in omit:
            w.add_tensor(name, arr, raw_dtype=raw)

    def add(name, qtype, n_out, n_in):
        put(name, *_matrix(rng, qtype, n_out, n_in, weight_scale if name.startswith("blk.") else 0.05))

    def add_vec(name, n, center=1.0):
        put(name, (center + rng.normal(0.0, 0.1, size=n)).astype(np.float32))

    def add_fused(name, qtype, parts, n_in):
        """One matrix made of random parts (n_out each), rows stacked in order."""
        drawn = [_matrix(rng, qtype, n_out, n_in, weight_scale) for n_out in parts]
        put(name, np.concatenate([arr for arr, _ in drawn]), drawn[0][1])

    add("token_embd.weight", types["embd"], n_vocab, n_embd)
    if rope_freqs:
        put("rope_freqs.weight", rng.uniform(1.0, 8.0, size=head_dim // 2).astype(np.float32))
    for il in range(n_layer):
        p = f"blk.{il}."
        add_vec(p + "attn_norm.weight", n_embd)
        if "qkv" in fused:
            add_fused(p + "attn_qkv.weight", types["q"], (n_head * head_dim, n_head_kv * head_dim,
                                                          n_head_kv * head_dim), n_embd)
        else:
            add(p + "attn_q.weight", types["q"], n_head * head_dim, n_embd)
            add(p + "attn_k.weight", types["k"], n_head_kv * head_dim, n_embd)
            add(p + "attn_v.weight", types["v"], n_head_kv * head_dim, n_embd)
        if biases:
            add_vec(p + "attn_q.bias", n_head * head_dim, 0.0)
            add_vec(p + "attn_k.bias", n_head_kv * head_dim, 0.0)
            add_vec(p + "attn_v.bias", n_head_kv * head_dim, 0.0)
        if qk_norm:
            add_vec(p + "attn_q_norm.weight", head_dim)
            add_vec(p + "attn_k_norm.weight", head_dim)
        add(p + "attn_output.weight", types["o"], n_embd, n_head * head_dim)
        add_vec(p + "ffn_norm.weight", n_embd)
        if "gate_up" in fused:
            add_fused(p + "ffn_up.weight", types["up"], (n_ff, n_ff), n_embd)
        else:
            add(p + "ffn_gate.weight", types["gate"], n_ff, n_embd)
            add(p + "ffn_up.weight", types["up"], n_ff, n_embd)
        add(p + "ffn_down.weight", types["down"], n_embd, n_ff)
    add_vec("output_norm.weight", n_embd)
    if not tied:
        add("output.weight", types["out"], n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_llama_kquants(path):
    """llama with every k-quant, linear RoPE scaling and frequency factors."""
    types = {"embd": T.Q4_K, "q": T.Q2_K, "k": T.Q3_K, "v": T.Q4_K, "o": T.Q5_K,
             "gate": T.Q6_K, "up": T.Q4_K, "down": T.Q5_K, "out": T.Q6_K}
    return write_model(path, "llama", types, rope_scale=2.0, rope_freqs=True)


def write_qwen2_legacy(path):
    """qwen2 (biases, NeoX RoPE, tied output) with the legacy formats and floats."""
    types = {"embd": T.Q8_0, "q": T.Q4_0, "k": T.Q4_1, "v": T.Q5_0, "o": T.Q5_1,
             "gate": T.BF16, "up": T.F16, "down": T.F32}
    return write_model(path, "qwen2", types, tied=True, biases=True)


# formats the fast path multiplies with 8-bit activations (Q4_0, Q5_0, Q5_1, Q8_0),
# and a small weight scale: random models this tame keep 8-bit activations and
# quantized caches within a few percent of exact, as real ones do
QWEN3_TYPES = {"embd": T.Q8_0, "q": T.Q4_0, "k": T.Q4_0, "v": T.Q5_0, "o": T.Q4_0,
               "gate": T.Q4_0, "up": T.Q5_1, "down": T.Q4_0, "out": T.F16}
# Qwen3-0.6B Q4_K_M's formats (random k-quant scales make a wilder model: exact path only)
QWEN3_KQUANT_TYPES = {"embd": T.Q8_0, "q": T.Q4_K, "k": T.Q4_K, "v": T.Q6_K, "o": T.Q4_K,
                      "gate": T.Q4_K, "up": T.Q4_K, "down": T.Q6_K, "out": T.Q6_K}


def write_qwen3(path, types: dict | None = None, *, head_dim=128, n_head=4, n_head_kv=2, tied=True,
                weight_scale=0.01, omit=(), seed=0):
    """A random qwen3 model: no biases, per-head q/k norms, NeoX RoPE with base
    1e6, heads of 128 (q is n_head * 128 = 512 wide with n_embd 256)."""
    return write_model(path, "qwen3", types or QWEN3_TYPES, n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, qk_norm=True, tied=tied, eps=1e-6, freq_base=1e6,
                       weight_scale=weight_scale, omit=omit, seed=seed)


# formats with packed fast-path kernels (Q4_0, Q4_1, Q8_0) on the fused weights,
# so that the fast path packs each part of a fused matrix apart
PHI3_TYPES = {"embd": T.Q8_0, "q": T.Q4_0, "o": T.Q5_0, "up": T.Q4_1, "down": T.Q8_0, "out": T.Q8_0}


def write_phi3(path, types: dict | None = None, *, n_embd=384, n_head=4, n_head_kv=4, n_ff=512,
               n_swa=16, fused=True, rope_scale=None, rope_scaling_type="linear", long_rope=False,
               weight_scale=0.01, omit=(), seed=0):
    """A random phi3 model: fused attn_qkv and ffn_up (gate | up), untied
    output, heads of 96 as in Phi-3-mini (n_embd 384 / 4 heads), a window of
    n_swa on every layer (None: no window key). fused=("gate_up",) keeps
    attn_q/k/v apart (types "k" and "v" then needed). long_rope adds Phi-3
    128k's rope_factors_long/short tensors."""
    def factors(w):
        if long_rope:
            rng = np.random.default_rng(seed + 1)
            for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
                w.add_tensor(name, rng.uniform(1.0, 4.0, size=(n_embd // n_head) // 2).astype(np.float32))
    return write_model(path, "phi3", types or PHI3_TYPES, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                       n_ff=n_ff, fused=fused, sliding_window=n_swa, rope_scale=rope_scale,
                       rope_scaling_type=rope_scaling_type, weight_scale=weight_scale, omit=omit, seed=seed,
                       extra=factors)


GEMMA3_TYPES = {"embd": T.Q8_0, "q": T.Q5_0, "k": T.Q5_0, "v": T.Q8_0, "o": T.Q4_K,
                "gate": T.Q5_0, "up": T.Q5_0, "down": T.Q6_K}  # the formats of Gemma 3 270M Q4_K_M


def write_gemma3(path, types: dict | None = None, *, n_embd=256, n_ff=512, n_head=4, n_head_kv=1,
                 head_dim=128, n_layer=7, n_vocab=320, n_swa=16, swa_pattern=None, softcap=None,
                 freq_base=1e6, omit=(), seed=0):
    """A random gemma3 model: tied embeddings, per-head q/k norms, post-attention
    and post-FFN norms; of every 6 layers the first 5 are local (window n_swa),
    so 7 layers give both kinds and a local layer after the global one.
    `swa_pattern` writes the period (int) or one bool per layer; `softcap` the
    final logit soft-cap; tensors named in `omit` are left out. Norm weights
    sit around 1, as converted files store them (Gemma's +1 added)."""
    types = types or GEMMA3_TYPES
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "gemma3")
    _add_shape(w, n_embd, n_layer, n_ff, n_head, n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(freq_base)
    w.add_sliding_window(n_swa)
    if swa_pattern is not None:
        w.add_sliding_window_pattern(swa_pattern)
    if softcap:
        w.add_final_logit_softcapping(softcap)

    def add(name, qtype, n_out, n_in):
        arr, raw = _matrix(rng, qtype, n_out, n_in)
        if name not in omit:
            w.add_tensor(name, arr, raw_dtype=raw)

    def add_vec(name, n):
        vec = (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)
        if name not in omit:
            w.add_tensor(name, vec)

    add("token_embd.weight", types["embd"], n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        add_vec(p + "attn_norm.weight", n_embd)
        add(p + "attn_q.weight", types["q"], n_head * head_dim, n_embd)
        add(p + "attn_k.weight", types["k"], n_head_kv * head_dim, n_embd)
        add(p + "attn_v.weight", types["v"], n_head_kv * head_dim, n_embd)
        add_vec(p + "attn_q_norm.weight", head_dim)
        add_vec(p + "attn_k_norm.weight", head_dim)
        add(p + "attn_output.weight", types["o"], n_embd, n_head * head_dim)
        add_vec(p + "post_attention_norm.weight", n_embd)
        add_vec(p + "ffn_norm.weight", n_embd)
        add(p + "ffn_gate.weight", types["gate"], n_ff, n_embd)
        add(p + "ffn_up.weight", types["up"], n_ff, n_embd)
        add(p + "ffn_down.weight", types["down"], n_embd, n_ff)
        add_vec(p + "post_ffw_norm.weight", n_embd)
    add_vec("output_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
