"""A PyTorch eager forward pass over the same dequantized weights: the GPU
speed anchor of bench/speed.py --device cuda where no CUDA build of
llama.cpp runs (issue 18), and a check that its numbers are a real model's.

Weights come from tests/numpy_llama.py's loader (the `gguf` package's
dequantizers), cast to `dtype` on `device`; the forward is NumpyLlama's
(llama, qwen2/3, gemma3: norms, QK-norm, sandwich norms, GeGLU, sliding
windows, soft-cap) with a preallocated KV cache of post-RoPE keys in
`dtype`. eval() takes token ids at position n_tokens.. as llama-cpp-python's
does and keeps the last token's logits on the host, so speed_worker.py times
it with the same code as the other engines.

    python bench/torch_anchor.py MODEL [--device cpu] [-n 32]   # logits vs NumpyLlama
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from numpy_llama import NumpyLlama  # noqa: E402


class TorchLlama:
    def __init__(self, model_path: str, n_ctx: int, device: str = "cuda", dtype: str = "float16"):
        ref = NumpyLlama(model_path)
        if ref.arch == "phi3":
            raise ValueError("torch_anchor: phi3's fused weights are not wired here")
        self.hp = ref
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.w = {name: torch.from_numpy(np.array(a)).to(self.device, self.dtype)  # a writable copy
                  for name, a in ref.w.items()}
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])
        self.n_ctx, self.n_tokens = n_ctx, 0
        shape = (ref.n_layer, n_ctx, ref.n_head_kv, ref.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.rope = {local: self._rope_table(local) for local in (False, True)}
        self.last_logits = None

    def _rope_table(self, local: bool):
        hp = self.hp
        base, scale = (hp.freq_base_swa, 1.0) if local and hp.own_local_rope else (hp.freq_base, hp.freq_scale)
        freqs = base ** (-2.0 * np.arange(hp.n_rot // 2) / hp.n_rot)
        if hp.rope_freqs is not None and not (local and hp.own_local_rope):
            freqs = freqs / hp.rope_freqs.astype(np.float64)
        theta = np.outer(np.arange(self.n_ctx) * scale, freqs)
        as_t = lambda a: torch.from_numpy(a).to(self.device, torch.float32)  # noqa: E731
        return as_t(np.cos(theta)), as_t(np.sin(theta))

    def reset(self) -> None:
        self.n_tokens = 0

    def close(self) -> None:
        self.w = self.k_cache = self.v_cache = None

    def _norm(self, x, name):
        w = self.w[name]
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.hp.eps)).to(self.dtype) * w

    def _linear(self, x, name):
        y = x @ self.w[name].T
        bias = name.replace(".weight", ".bias")
        return y + self.w[bias] if bias in self.w else y

    def _rotate(self, x, pos, il):
        hp = self.hp
        cos, sin = self.rope[hp.is_swa(il)]
        cos, sin = cos[pos][:, None, :], sin[pos][:, None, :]
        x = x.float()
        half = hp.n_rot // 2
        if hp.neox:
            a, b = x[..., :half], x[..., half:hp.n_rot]
        else:
            a, b = x[..., 0:hp.n_rot:2], x[..., 1:hp.n_rot:2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        out = x.clone()
        if hp.neox:
            out[..., :half], out[..., half:hp.n_rot] = ra, rb
        else:
            out[..., 0:hp.n_rot:2], out[..., 1:hp.n_rot:2] = ra, rb
        return out.to(self.dtype)

    def _attention(self, x, il, pos):
        hp, p, n = self.hp, f"blk.{il}.", x.shape[0]
        h = self._norm(x, p + "attn_norm.weight")
        q = self._linear(h, p + "attn_q.weight").view(n, hp.n_head, hp.head_dim)
        k = self._linear(h, p + "attn_k.weight").view(n, hp.n_head_kv, hp.head_dim)
        v = self._linear(h, p + "attn_v.weight").view(n, hp.n_head_kv, hp.head_dim)
        if p + "attn_q_norm.weight" in self.w:
            q, k = self._norm(q, p + "attn_q_norm.weight"), self._norm(k, p + "attn_k_norm.weight")
        q, k = self._rotate(q, pos, il), self._rotate(k, pos, il)
        end = self.n_tokens + n
        self.k_cache[il, self.n_tokens:end], self.v_cache[il, self.n_tokens:end] = k, v
        keys, values = self.k_cache[il, :end], self.v_cache[il, :end]
        group = hp.n_head // hp.n_head_kv
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        k_pos = torch.arange(end, device=self.device)
        hidden = k_pos[None, :] > pos[:, None]
        if hp.is_swa(il):
            hidden = hidden | (pos[:, None] - k_pos[None, :] >= hp.n_swa)
        mask = torch.zeros(hidden.shape, device=self.device, dtype=self.dtype).masked_fill(hidden, float("-inf"))
        att = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=hp.attn_scale)
        y = self._linear(att.transpose(0, 1).reshape(n, -1), p + "attn_output.weight")
        return self._post(y, p + "post_attention_norm.weight")

    def _post(self, y, name):
        return self._norm(y, name) if name in self.w else y

    def _ffn(self, x, il):
        p = f"blk.{il}."
        h = self._norm(x, p + "ffn_norm.weight")
        gate, up = self._linear(h, p + "ffn_gate.weight"), self._linear(h, p + "ffn_up.weight")
        act = torch.nn.functional.gelu(gate, approximate="tanh") if self.hp.gelu else torch.nn.functional.silu(gate)
        return self._post(self._linear(act * up, p + "ffn_down.weight"), p + "post_ffw_norm.weight")

    @torch.inference_mode()
    def eval(self, tokens) -> None:
        """Append tokens at positions n_tokens..; the last token's logits land
        on the host (last_logits), as the other engines' eval leaves them."""
        n = len(tokens)
        if self.n_tokens + n > self.n_ctx:
            raise ValueError(f"{self.n_tokens + n} tokens exceed n_ctx {self.n_ctx}")
        ids = torch.tensor(tokens, device=self.device, dtype=torch.long)
        pos = torch.arange(self.n_tokens, self.n_tokens + n, device=self.device)
        x = self.w["token_embd.weight"][ids] * self.hp.embd_scale
        for il in range(self.hp.n_layer):
            x = x + self._attention(x, il, pos)
            x = x + self._ffn(x, il)
        h = self._norm(x[-1:], "output_norm.weight")
        logits = (h @ self.output.T).float()
        if self.hp.softcap > 0:
            logits = self.hp.softcap * torch.tanh(logits / self.hp.softcap)
        self.last_logits = logits[0].cpu().numpy()  # waits for the GPU, as a host copy must
        self.n_tokens += n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-n", "--n-tokens", type=int, default=32)
    args = ap.parse_args()
    ids = list(range(1, args.n_tokens + 1))
    want = NumpyLlama(args.model).forward(np.array(ids))
    llm = TorchLlama(args.model, n_ctx=args.n_tokens, device=args.device, dtype="float32")
    llm.eval(ids[: args.n_tokens // 2])  # a batch first, then token by token through the cache
    worst = float(np.abs(llm.last_logits - want[args.n_tokens // 2 - 1]).max() / np.abs(want).max())
    for t in range(args.n_tokens // 2, args.n_tokens):
        llm.eval([ids[t]])
        worst = max(worst, float(np.abs(llm.last_logits - want[t]).max() / np.abs(want[t]).max()))
    print(f"max |logit diff| / max |logit|, batch's last and {args.n_tokens - args.n_tokens // 2} decoded "
          f"tokens: {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
