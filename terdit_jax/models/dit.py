"""TerDiT / Large-DiT (`DiT_Llama` in the official code) and its size presets: the "large_dit" model family.

Images are NHWC. Patchify and unpatchify keep the official within-patch orders ((c, py, px) in,
(py, px, c) out), which differ from each other, so released weights load as table lookups.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.backbone import Context, DiffusionTransformer, FinalLayer, modulate, patchify
from terdit_jax.models.layers import (Attention, FeedForward, LabelEmbedder, RMSNorm, TimestepEmbedder, rope_angles,
                                      sincos_pos_embed_2d)
from terdit_jax.models.linears import make_linear
from terdit_jax.models.ternary import xavier_uniform, zeros_init

# name: (dim, n_layers, n_heads) of the official factories; "3B" is the 4.2B model (paper footnote 3).
PRESETS = {
    "DiT_Llama_600M_patch2": (1536, 16, 32),
    "DiT_Llama_3B_patch2": (3072, 32, 32),
    "DiT_Llama_7B_patch2": (4096, 32, 32),
}
POS_EMBEDS = ("none", "sincos")


class TransformerBlock(nnx.Module):
    """Pre-norm block with adaLN modulation; TerDiT adds an RMSNorm over the whole 6·D modulation vector.

    `model.pre_norms=False` drops the RMSNorms before attention and SwiGLU, as the TerDiT paper's BitNet baseline
    does (§4.2: BitLinear normalises its own input instead; models/bitnet.py); the block then modulates x itself.
    """

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, path=f"{path}.attention", dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, path=f"{path}.feed_forward", dtype=dtype, rngs=rngs)
        pre_norms = cfg.get("pre_norms", True)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, axis_name="embed") if pre_norms else None
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, axis_name="embed") if pre_norms else None
        # adaLN-Zero: latent weight zero-initialised, so gates are exactly 0 at step 0 (also after the RMSNorm).
        self.adaLN_modulation = make_linear(f"{path}.adaLN_modulation", cfg.cond_dim, 6 * cfg.dim, model_cfg=cfg,
                                            rngs=rngs, use_bias=True, kernel_init=zeros_init,
                                            axes=("cond", "adaln"), dtype=dtype)
        self.adaLN_norm = RMSNorm(6 * cfg.dim, eps=cfg.norm_eps, axis_name="adaln") if cfg.adaln_norm else None

    def modulation(self, c: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """c (B, C) → (B, 6D): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        mod = self.adaLN_modulation(jax.nn.silu(c), t)
        return mod if self.adaLN_norm is None else self.adaLN_norm(mod)

    def __call__(self, x: jax.Array, c: jax.Array, ctx: Context, mod: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), c (B, C) → (B, T, D). `mod` (B, 6D) replaces `modulation(c)` when given."""
        mod = self.modulation(c, ctx.t) if mod is None else mod
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = jnp.split(mod, 6, axis=-1)
        h = x if self.attention_norm is None else self.attention_norm(x)
        x = x + g_a[:, None] * self.attention(modulate(h, sh_a, sc_a), ctx.angles, ctx.t)
        h = x if self.ffn_norm is None else self.ffn_norm(x)
        return x + g_f[:, None] * self.feed_forward(modulate(h, sh_f, sc_f), ctx.t)


class DiT(DiffusionTransformer):
    """DiT_Llama with pluggable (ternary or full-precision) linears (call contract: `DiffusionTransformer`)."""

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
        self.layers = nnx.List([TransformerBlock(cfg, path=f"layers.{i}", dtype=dtype, rngs=rngs)
                                for i in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg, dtype=dtype, rngs=rngs)

    def block_list(self) -> list[nnx.Module]:
        return list(self.layers)

    def condition(self, t: jax.Array, y: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        """c = t_emb + y_emb, (B, C) in float32."""
        return self.t_embedder(t).astype(jnp.float32) + self.y_embedder(y, drop_key)

    def embed(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, Context]:
        """x (B, H, W, C) → tokens (B, T, D) and the Context with the RoPE angles (T, head_dim/2)."""
        p = self.patch_size
        tokens = self.x_embedder(patchify(x, p), t)
        if self.pos_embed == "sincos":  # not in Large-DiT/TerDiT (RoPE only); see config.model.pos_embed
            table = sincos_pos_embed_2d(tokens.shape[-1], x.shape[1] // p, x.shape[2] // p)
            tokens = tokens + table.astype(tokens.dtype)
        return tokens, Context(t, rope_angles(tokens.shape[1], self.head_dim, self.rope_theta))
