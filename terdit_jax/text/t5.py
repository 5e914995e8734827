"""A Flax T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU FFN, no bias anywhere, untied embeddings) as
PixArt uses it (T5-XXL: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240), and an importer of the Hugging Face
`T5EncoderModel` state dict (its safetensors layout). Runs once per prompt batch, float32.

Shapes: B batch, N tokens, D d_model, H heads, dk head width.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


def rms_norm(x, w, eps):
    """T5's LayerNorm: no mean subtraction, no bias, float32 variance."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps) * w


def relative_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional relative-position buckets (T5 §2.1): half the buckets per direction, exact below
    num_buckets/4, log-spaced up to max_distance → (n, n) int (query i, key j)."""
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    large = exact + (np.log(np.maximum(rel, 1) / exact) / math.log(max_distance / exact) * (half - exact))
    large = np.minimum(large.astype(np.int64), half - 1)
    return out + np.where(rel < exact, rel, large)


def encode(params: dict, cfg: T5Config, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids (B, N) int, mask (B, N) 1 = token → last hidden states (B, N, D) float32."""
    x = jnp.take(params["shared"], ids, axis=0)
    b, n = ids.shape
    h, dk = cfg.num_heads, cfg.d_kv
    bias = params["relative_attention_bias"][relative_buckets(n, cfg.num_buckets, cfg.max_distance)]  # (N, N, H)
    bias = bias.transpose(2, 0, 1)[None] + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for layer in params["blocks"]:
        y = rms_norm(x, layer["ln0"], cfg.eps)
        q, k, v = (jnp.reshape(y @ layer[w], (b, n, h, dk)) for w in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias  # T5 does not scale by 1/sqrt(dk)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, n, h * dk)
        x = x + att @ layer["o"]
        y = rms_norm(x, layer["ln1"], cfg.eps)
        x = x + (jax.nn.gelu(y @ layer["wi_0"], approximate=True) * (y @ layer["wi_1"])) @ layer["wo"]
    return rms_norm(x, params["final_layer_norm"], cfg.eps)


def from_hf(state_dict: dict, cfg: T5Config) -> dict:
    """HF `T5EncoderModel` state dict (name → array; Linear weights (out, in)) → the params `encode` reads."""
    g = lambda k: jnp.asarray(np.asarray(state_dict[k], np.float32))  # noqa: E731
    blocks = []
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        blocks.append({**{w: g(f"{p}0.SelfAttention.{w}.weight").T for w in ("q", "k", "v", "o")},
                       "ln0": g(f"{p}0.layer_norm.weight"), "ln1": g(f"{p}1.layer_norm.weight"),
                       **{w: g(f"{p}1.DenseReluDense.{w}.weight").T for w in ("wi_0", "wi_1", "wo")}})
    return {"shared": g("shared.weight"), "blocks": blocks, "final_layer_norm": g("encoder.final_layer_norm.weight"),
            "relative_attention_bias": g("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}
