"""Tiny random GGUF models written with the `gguf` package, covering what no
small real model here has: qwen2 (biases, NeoX RoPE), every weight format,
linear RoPE scaling and Llama-3 frequency factors, and gemma3 (QK-norm,
sandwich norms, GeGLU, sliding-window layers) at a size where the window
matters within a short test."""
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


def _matrix(rng, qtype: T, n_out: int, n_in: int):
    """(array, raw_dtype) for a weight of n_out rows of n_in elements."""
    if qtype in _SCALE_OFFSETS:
        return random_blocks(qtype, n_out, n_in, rng), qtype
    w = rng.normal(0.0, 0.05, size=(n_out, n_in)).astype(np.float32)
    if qtype == T.F32:
        return w, None
    if qtype == T.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype  # BF16


def write_model(path, arch: str, types: dict, *, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                n_layer=2, n_vocab=320, tied=False, rope_scale=None, rope_freqs=False,
                biases=False, seed=0, extra=None):
    """Write a random llama-family model; `types` maps a weight role to its type;
    `extra(writer)`, when given, adds metadata (or an alignment) before the tensors."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    if extra:
        extra(w)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    if rope_scale:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scale)

    def add(name, qtype, n_out, n_in):
        arr, raw = _matrix(rng, qtype, n_out, n_in)
        w.add_tensor(name, arr, raw_dtype=raw)

    def add_vec(name, n, center=1.0):
        w.add_tensor(name, (center + rng.normal(0.0, 0.1, size=n)).astype(np.float32))

    add("token_embd.weight", types["embd"], n_vocab, n_embd)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", rng.uniform(1.0, 8.0, size=head_dim // 2).astype(np.float32))
    for il in range(n_layer):
        p = f"blk.{il}."
        add_vec(p + "attn_norm.weight", n_embd)
        add(p + "attn_q.weight", types["q"], n_head * head_dim, n_embd)
        add(p + "attn_k.weight", types["k"], n_head_kv * head_dim, n_embd)
        add(p + "attn_v.weight", types["v"], n_head_kv * head_dim, n_embd)
        if biases:
            add_vec(p + "attn_q.bias", n_head * head_dim, 0.0)
            add_vec(p + "attn_k.bias", n_head_kv * head_dim, 0.0)
            add_vec(p + "attn_v.bias", n_head_kv * head_dim, 0.0)
        add(p + "attn_output.weight", types["o"], n_embd, n_head * head_dim)
        add_vec(p + "ffn_norm.weight", n_embd)
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
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
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
