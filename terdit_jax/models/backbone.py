"""What every model family shares: the denoiser's call protocol, the adaLN final layer, patchify/unpatchify.

A family's model subclasses `DiffusionTransformer` and provides `embed`, `condition`, `blocks` and `unembed`;
the forward pass is always

    tokens, ctx = embed(x, t);  c = condition(t, y);  tokens = block(tokens, c, ctx[, mod]) for each block;
    out = unembed(tokens, c, ctx, H, W)

so the training forward (rematerialisation, sharding constraints; `parallel.forward`), block-by-block
calibration and the fused packed adaLN work for every family without knowing its internals.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.layers import LayerNorm
from terdit_jax.models.linears import make_linear
from terdit_jax.models.ternary import zeros_init


class Context(NamedTuple):
    """Per-call values every block sees besides the tokens and the conditioning (a pytree).

    t: (B,) int timesteps (the time-aware quantizers of quant/ select their parameters from it);
    angles: (T, head_dim/2) RoPE angles, or None for a family without RoPE.
    """
    t: jax.Array
    angles: jax.Array | None
    caption: tuple | None = None  # a text-conditioned family's caption as its blocks take it, set by `attach`


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x·(1 + scale) + shift, broadcast over tokens. x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) → (B, T, C·p·p), tokens in raster order, per-token features ordered (c, py, px)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """(B, T, p·p·C) with per-token order (py, px, c) → (B, H, W, C) (DiT's and Large-DiT's `unpatchify`)."""
    b, _, f = x.shape
    c = f // (p * p)
    x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class FinalLayer(nnx.Module):
    """adaLN (shift first) + LayerNorm (no affine, eps 1e-6) + linear to p²·out_channels; the same in DiT and
    Large-DiT. Weights zero-initialised (adaLN-Zero), so a fresh model outputs 0."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=zeros_init, dtype=dtype)
        self.norm_final = LayerNorm(cfg.dim, eps=1e-6, affine=False, final=True)
        self.adaLN_modulation = make_linear("final_layer.adaLN_modulation", cfg.cond_dim, 2 * cfg.dim,
                                            axes=("cond", "embed"), **lin)
        self.linear = make_linear("final_layer.linear", cfg.dim, cfg.patch_size ** 2 * cfg.out_channels,
                                  axes=("embed", None), **lin)

    def __call__(self, x: jax.Array, c: jax.Array, t: jax.Array | None = None) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c), t), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale), t)


class DiffusionTransformer(nnx.Module):
    """Base of every family's denoiser: __call__(x (B, H, W, C_in), t (B,) int DDPM steps, y (B,) int labels)
    → (B, H, W, out_channels); channels [:C_in] are ε (or v), [C_in:] the learned-range variance values.

    A subclass sets `self.patch_size` and `self.final_layer` and defines
      embed(x (B, H, W, C), t (B,)) → (tokens (B, T, D), Context),
      condition(t (B,), y (B,), drop_key=None) → c (B, C) float32,
      block_list() → the transformer blocks in order, each called block(tokens, c, ctx, mod=None) → tokens.
    """

    def prepare(self, y):
        """y with what depends only on y computed once, for a sampler to pass at every step instead of y (a text
        family's projected caption and cross-attention keys and values). Identity unless a family has such work;
        `__call__` takes y prepared or not (training passes it raw)."""
        return y

    def attach(self, ctx: Context, y) -> Context:
        """ctx with what the blocks need from y (raw or `prepare`d) besides `condition` (a text family's caption
        tokens)."""
        return ctx

    def block_context(self, ctx: Context, i: int) -> Context:
        """The ctx block i sees (a prepared caption hands each block its own keys and values); ctx by default."""
        return ctx

    def unembed(self, tokens: jax.Array, c: jax.Array, ctx: Context, h: int, w: int) -> jax.Array:
        """Final layer and unpatchify: tokens (B, T, D) → (B, H, W, out_channels) float32."""
        return unpatchify(self.final_layer(tokens, c, ctx.t), self.patch_size, h, w).astype(jnp.float32)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, drop_key: jax.Array | None = None,
                 modulations: jax.Array | None = None) -> jax.Array:
        """`modulations` (L, B, 6D): precomputed adaLN outputs of every block (they depend only on t and y), so a
        deployment can compute them for all blocks in one batched matmul."""
        tokens, ctx = self.embed(x, t)
        ctx = self.attach(ctx, y)
        c = self.condition(t, y, drop_key)
        for i, block in enumerate(self.block_list()):
            tokens = block(tokens, c, self.block_context(ctx, i), None if modulations is None else modulations[i])
        return self.unembed(tokens, c, ctx, x.shape[1], x.shape[2])
