"""TerDiT / Large-DiT (`DiT_Llama` in the official code) and its size presets.

Images are NHWC. Patchify and unpatchify keep the official within-patch orders ((c, py, px) in,
(py, px, c) out), which differ from each other, so released weights load as table lookups.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.layers import (Attention, FeedForward, LabelEmbedder, LayerNorm, RMSNorm,
                                      TimestepEmbedder, rope_angles, sincos_pos_embed_2d)
from terdit_jax.models import packed as _packed  # noqa: F401  (registers the "packed" linear kind)
from terdit_jax.models.ternary import make_linear, xavier_uniform, zeros_init

# name: (dim, n_layers, n_heads) of the official factories; "3B" is the 4.2B model (paper footnote 3).
PRESETS = {
    "DiT_Llama_600M_patch2": (1536, 16, 32),
    "DiT_Llama_3B_patch2": (3072, 32, 32),
    "DiT_Llama_7B_patch2": (4096, 32, 32),
}


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x·(1 + scale) + shift, broadcast over tokens. x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TransformerBlock(nnx.Module):
    """Pre-norm block with adaLN modulation; TerDiT adds an RMSNorm over the whole 6·D modulation vector."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, axis_name="embed")
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, axis_name="embed")
        # adaLN-Zero: latent weight zero-initialised, so gates are exactly 0 at step 0 (also after the RMSNorm).
        self.adaLN_modulation = make_linear("adaLN_modulation", cfg.cond_dim, 6 * cfg.dim, model_cfg=cfg,
                                            rngs=rngs, use_bias=True, kernel_init=zeros_init,
                                            axes=("cond", "adaln"), dtype=dtype)
        self.adaLN_norm = RMSNorm(6 * cfg.dim, eps=cfg.norm_eps, axis_name="adaln") if cfg.adaln_norm else None

    def modulation(self, c: jax.Array) -> jax.Array:
        """c (B, C) → (B, 6D): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        mod = self.adaLN_modulation(jax.nn.silu(c))
        return mod if self.adaLN_norm is None else self.adaLN_norm(mod)

    def __call__(self, x: jax.Array, c: jax.Array, angles: jax.Array, mod: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), c (B, C), angles (T, hd/2) → (B, T, D). `mod` (B, 6D) replaces `modulation(c)` when given."""
        mod = self.modulation(c) if mod is None else mod
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = jnp.split(mod, 6, axis=-1)
        x = x + g_a[:, None] * self.attention(modulate(self.attention_norm(x), sh_a, sc_a), angles)
        return x + g_f[:, None] * self.feed_forward(modulate(self.ffn_norm(x), sh_f, sc_f))


class FinalLayer(nnx.Module):
    """Full-precision adaLN (shift first) + LayerNorm (no affine, eps 1e-6) + linear to p²·out_channels."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=zeros_init, dtype=dtype)
        self.norm_final = LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.adaLN_modulation = make_linear("final_layer.adaLN_modulation", cfg.cond_dim, 2 * cfg.dim,
                                            axes=("cond", "embed"), **lin)
        self.linear = make_linear("final_layer.linear", cfg.dim, cfg.patch_size ** 2 * cfg.out_channels,
                                  axes=("embed", None), **lin)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) → (B, T, C·p·p), tokens in raster order, per-token features ordered (c, py, px)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """(B, T, p·p·C) with per-token order (py, px, c) → (B, H, W, C) (official `unpatchify`)."""
    b, _, f = x.shape
    c = f // (p * p)
    x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class DiT(nnx.Module):
    """DiT_Llama with pluggable (ternary or full-precision) linears.

    __call__(x (B, H, W, C_in), t (B,) int DDPM steps, y (B,) int labels) → (B, H, W, out_channels):
    channels [:C_in] are ε, [C_in:] the learned-range variance values.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.patch_size = cfg.patch_size
        self.head_dim = cfg.dim // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.pos_embed = cfg.pos_embed
        self.x_embedder = make_linear("x_embedder", cfg.patch_size ** 2 * cfg.in_channels, cfg.dim,
                                      model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=xavier_uniform,
                                      axes=(None, "embed"), dtype=dtype)
        self.t_embedder = TimestepEmbedder(cfg, dtype=dtype, rngs=rngs)
        self.y_embedder = LabelEmbedder(cfg, rngs=rngs)
        self.layers = nnx.List([TransformerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg, dtype=dtype, rngs=rngs)

    def condition(self, t: jax.Array, y: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        """c = t_emb + y_emb, (B, C) in float32."""
        return self.t_embedder(t).astype(jnp.float32) + self.y_embedder(y, drop_key)

    def embed(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, C) → tokens (B, T, D) and the RoPE angles (T, head_dim/2)."""
        p = self.patch_size
        tokens = self.x_embedder(patchify(x, p))
        if self.pos_embed == "sincos":  # not in Large-DiT/TerDiT (RoPE only); see config.model.pos_embed
            table = sincos_pos_embed_2d(tokens.shape[-1], x.shape[1] // p, x.shape[2] // p)
            tokens = tokens + table.astype(tokens.dtype)
        return tokens, rope_angles(tokens.shape[1], self.head_dim, self.rope_theta)

    def unembed(self, tokens: jax.Array, c: jax.Array, h: int, w: int) -> jax.Array:
        """Final layer and unpatchify: tokens (B, T, D) → (B, H, W, out_channels) float32."""
        return unpatchify(self.final_layer(tokens, c), self.patch_size, h, w).astype(jnp.float32)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, drop_key: jax.Array | None = None,
                 modulations: jax.Array | None = None) -> jax.Array:
        """`modulations` (L, B, 6D): precomputed adaLN outputs of every block (they depend only on t and y), so a
        deployment can compute them for all blocks in one batched matmul."""
        tokens, angles = self.embed(x)
        c = self.condition(t, y, drop_key)
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, c, angles, None if modulations is None else modulations[i])
        return self.unembed(tokens, c, x.shape[1], x.shape[2])


def count_params(cfg) -> int:
    """Number of parameters of the model `cfg` describes, without allocating them."""
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
    return int(sum(leaf.size for leaf in leaves))
