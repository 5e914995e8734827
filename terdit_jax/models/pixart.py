"""PixArt-α / PixArt-Σ (Chen et al. 2023, "PixArt-α: Fast Training of Diffusion Transformer for Photorealistic
Text-to-Image Synthesis"; Chen et al. 2024, PixArt-Σ): the "pixart" model family.

A DiT-XL/2 backbone whose blocks add cross-attention to the projected T5 caption tokens (with their mask), and
adaLN-single: one timestep MLP and one SiLU→Linear(D, 6D) shared by all blocks, plus a learned (6, D)
`scale_shift_table` per block. Module names follow diffusers' `PixArtTransformer2DModel` state dict
(`transformer_blocks.N.attn1.to_q`, `attn2`, `ff.net_0_proj`, `adaln_single`, `caption_projection`, ...), so the
importer (`load_diffusers`) is a table lookup and site rules read like the PyTorch ones.

Conditioning: `y` is the pair (caption (B, N, caption_channels), mask (B, N) 1 = token, 0 = padding), or that
pair `prepare`d once per prompt batch (a `Caption` holding the projected tokens and every block's cross-attention
keys and values, which do not change over the sampling steps). `condition` returns c = [embedded_t (D) |
adaLN-single output (6D)] (B, 7D); the caption travels to the blocks in `Context.caption`.
Shapes: B batch, T image tokens, N caption tokens, D width, H heads, hd = D/H.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.backbone import Context, DiffusionTransformer, modulate, patchify
from terdit_jax.models.layers import (LayerNorm, RMSNorm, attention_sites, gelu_tanh, site_attention,
                                      timestep_features)
from terdit_jax.models.linears import layer_kind, make_linear
from terdit_jax.models.ternary import normal_init, xavier_uniform, zeros_init
from terdit_jax.quant.sites import make_site, quantize, sites_of

# PixArt-XL/2: the DiT-XL/2 backbone (28 blocks, D 1152, 16 heads of 72).
PRESETS = {"PixArt-XL/2": dict(dim=1152, n_layers=28, n_heads=16, patch_size=2)}
# model fields only this family reads (left out of the other families' checkpoint signatures)
OWN_FIELDS = ("caption_channels", "caption_len", "pe_interpolation", "micro_conditions")
UNUSED_FIELDS = ("multiple_of", "ffn_dim_multiplier", "qk_norm", "rope_theta", "pos_embed", "pre_norms",
                 "num_classes", "class_dropout_prob")
NORM_EPS = 1e-6


def check(cfg) -> str | None:
    if cfg.dim % cfg.n_heads or cfg.dim % 4:
        return f"model.dim={cfg.dim} must split into {cfg.n_heads} heads and be a multiple of 4"
    if cfg.get("caption_channels", 0) < 1 or cfg.get("caption_len", 0) < 1:
        return "model.caption_channels and model.caption_len must be positive for the pixart family"
    if cfg.get("micro_conditions", False) and cfg.dim % 3:
        return f"model.dim={cfg.dim} must be a multiple of 3 for the micro-conditions (2 size + 1 aspect-ratio parts)"
    return None


def adaln_norm(cfg) -> bool:
    """Whether adaLN-single's linear is followed by TerDiT's RMSNorm: `model.adaln_norm` and that linear low-bit
    (not "fp"). TerDiT (Lu et al. 2024, §3.2) adds the norm because a ternary adaLN linear's outputs are large;
    the full-precision PixArt (diffusers' model, its released weights) has none, whatever adaln_norm says."""
    return bool(cfg.get("adaln_norm", False)) and layer_kind("adaln_single.linear", cfg) != "fp"


def interpolation_scale(cfg) -> float:
    """diffusers' default `max(sample_size // 64, 1)` (1 at 256/512 px, 2 at 1024 px) unless pe_interpolation."""
    return float(cfg.get("pe_interpolation", 0) or max(int(cfg.input_size) // 64, 1))


def pos_embed(dim: int, gh: int, gw: int, base: int, scale: float) -> jax.Array:
    """PixArt's fixed table: DiT's column-first sin-cos table with positions i / (grid/base) / scale
    (diffusers `get_2d_sincos_pos_embed(..., base_size, interpolation_scale)`) → (gh·gw, dim) f32."""
    def axis(pos, d):
        omega = 1.0 / 10000 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d / 2))
        return jnp.concatenate([jnp.sin(pos[:, None] * omega), jnp.cos(pos[:, None] * omega)], axis=-1)
    rows = jnp.arange(gh, dtype=jnp.float32) / (gh / base) / scale
    cols = jnp.arange(gw, dtype=jnp.float32) / (gw / base) / scale
    r, c = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.concatenate([axis(c.reshape(-1), dim // 2), axis(r.reshape(-1), dim // 2)], axis=-1)


class Caption(NamedTuple):
    """The caption as the blocks take it (`Context.caption`): projected tokens (B, N, D) and mask (B, N); kv is
    None (the blocks project the tokens themselves), or in a `prepare`d caption every block's cross-attention
    (k, v), each (B, N, H, hd), of which `block_context` hands block i its own pair."""
    tokens: jax.Array
    mask: jax.Array
    kv: tuple | None = None


def _lin(cfg, path, i, o, axes, dtype, rngs, init=xavier_uniform):
    return make_linear(path, i, o, model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=init, axes=axes,
                       dtype=dtype)


class Attention(nnx.Module):
    """diffusers `Attention` with separate to_q/to_k/to_v (bias) and to_out_0; `cross` takes k, v from the
    caption tokens with a key mask."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        d, self.n_heads, self.head_dim = cfg.dim, cfg.n_heads, cfg.dim // cfg.n_heads
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, _lin(cfg, f"{path}.{name}", d, d, ("embed", "heads"), dtype, rngs))
        self.to_out_0 = _lin(cfg, f"{path}.to_out_0", d, d, ("heads", "embed"), dtype, rngs)
        self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site = attention_sites(
            path, cfg, self.n_heads, self.head_dim)
        self.integer = bool(cfg.get("deployed", False))

    def heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.n_heads, self.head_dim)

    def kv(self, memory: jax.Array, t) -> tuple[jax.Array, jax.Array]:
        """Keys and values (B, N, H, hd) of `memory` (B, N, D): for cross-attention they depend on the caption
        only, so a sampler may compute them once per prompt batch."""
        return self.heads(self.to_k(memory, t)), self.heads(self.to_v(memory, t))

    def __call__(self, x: jax.Array, t, memory: jax.Array | None = None, mask: jax.Array | None = None,
                 kv: tuple | None = None) -> jax.Array:
        """x (B, T, D); memory (B, N, D) or None (self-attention); mask (B, N) → (B, T, D)."""
        b, n, d = x.shape
        q = self.heads(self.to_q(x, t))
        k, v = kv if kv is not None else self.kv(x if memory is None else memory, t)
        sites = (self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site)
        # padding keys masked out (diffusers adds −10000 to their logits: the same after the softmax)
        out = site_attention(sites, q, k, v, t, integer=self.integer, mask=mask)
        return self.to_out_0(out.reshape(b, n, d), t)


class PixArtBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` with norm_type "ada_norm_single": x += g_a·attn1(mod(norm1 x));
    x += attn2(x, caption) (no norm, no gate); x += g_m·ff(mod(norm2 x)); the six chunks are
    scale_shift_table + the shared adaLN-single output (shift_msa, scale_msa, gate_msa, shift_mlp, ...)."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=NORM_EPS, affine=False)
        self.attn1 = Attention(cfg, path=f"{path}.attn1", dtype=dtype, rngs=rngs)
        self.attn2 = Attention(cfg, path=f"{path}.attn2", dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=NORM_EPS, affine=False)
        self.ff_net_0_proj = _lin(cfg, f"{path}.ff_net_0_proj", d, 4 * d, ("embed", "mlp"), dtype, rngs)
        self.ff_net_2 = _lin(cfg, f"{path}.ff_net_2", 4 * d, d, ("mlp", "embed"), dtype, rngs)
        self.hidden_site = make_site(f"{path}.ff.hidden", cfg, (None, None, 4 * d))
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, d)) / d ** 0.5,
                                           logical_axes=(None, "embed"))

    def modulation(self, c: jax.Array, t=None) -> jax.Array:
        """c (B, 7D) → (B, 6D): this block's table plus the shared adaLN-single output."""
        d = self.scale_shift_table.shape[-1]
        return (self.scale_shift_table[...].reshape(-1) + c[:, d:]).astype(c.dtype)

    def __call__(self, x: jax.Array, c: jax.Array, ctx: Context, mod: jax.Array | None = None) -> jax.Array:
        mod = self.modulation(c) if mod is None else mod
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = jnp.split(mod, 6, axis=-1)
        x = x + g_a[:, None] * self.attn1(modulate(self.norm1(x), sh_a, sc_a), ctx.t)
        cap = Caption(*ctx.caption)  # also a plain (tokens, mask) pair: block-wise calibration builds its Context
        if cap.kv is not None and isinstance(cap.kv[0], tuple):
            raise ValueError("a prepared caption reaches block i through model.block_context(ctx, i)")
        x = x + self.attn2(x, ctx.t, cap.tokens, cap.mask, kv=cap.kv)
        hidden = gelu_tanh(self.ff_net_0_proj(modulate(self.norm2(x), sh_m, sc_m), ctx.t))
        return x + g_m[:, None] * self.ff_net_2(quantize(self.hidden_site, hidden, ctx.t), ctx.t)


class FinalLayer(nnx.Module):
    """norm_out (LayerNorm, no affine) modulated by scale_shift_table (2, D) + embedded_t, then proj_out."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.norm_out = LayerNorm(cfg.dim, eps=NORM_EPS, affine=False, final=True)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, cfg.dim)) / cfg.dim ** 0.5,
                                           logical_axes=(None, "embed"))
        self.proj_out = _lin(cfg, "proj_out", cfg.dim, cfg.patch_size ** 2 * cfg.out_channels, ("embed", None),
                             dtype, rngs, zeros_init)

    def __call__(self, x: jax.Array, c: jax.Array, t=None) -> jax.Array:
        d = x.shape[-1]
        shift, scale = jnp.split(self.scale_shift_table[...].reshape(-1) + jnp.tile(c[:, :d], 2), 2, axis=-1)
        return self.proj_out(modulate(self.norm_out(x), shift, scale), t)


class PixArt(DiffusionTransformer):
    """PixArt-α/Σ denoiser (call contract: `DiffusionTransformer`, y = (caption (B, N, Cc), mask (B, N)))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype, d, p = jnp.dtype(cfg.dtype), cfg.dim, cfg.patch_size
        self.patch_size, self.base = p, int(cfg.input_size) // p
        self.pe_scale = interpolation_scale(cfg)
        self.pos_embed_proj = _lin(cfg, "pos_embed.proj", p * p * cfg.in_channels, d, (None, "embed"), dtype, rngs)
        init = normal_init(0.02)
        self.adaln_single_emb_timestep_embedder_linear_1 = _lin(
            cfg, "adaln_single.emb.timestep_embedder.linear_1", 256, d, (None, "embed"), dtype, rngs, init)
        self.adaln_single_emb_timestep_embedder_linear_2 = _lin(
            cfg, "adaln_single.emb.timestep_embedder.linear_2", d, d, ("embed", None), dtype, rngs, init)
        self.adaln_single_linear = _lin(cfg, "adaln_single.linear", d, 6 * d, ("embed", "adaln"), dtype, rngs, init)
        # PixArt-α 1024's micro-conditions (PixArt-α §2.4's multi-scale training; diffusers
        # PixArtAlphaCombinedTimestepSizeEmbeddings): the image's height and width and its aspect ratio, each through
        # the timestep sinusoid and an MLP to D/3, added to the embedded timestep as [h | w | ratio]. Sampling draws
        # square images at the config's size: h = w = 8·latent size (the VAE's factor), ratio 1.
        self.micro = None
        if cfg.get("micro_conditions", False):
            self.micro = (8.0 * int(cfg.input_size), 1.0)
            for name in ("resolution", "aspect_ratio"):
                for i, (a, b) in enumerate(((256, d // 3), (d // 3, d // 3)), 1):
                    setattr(self, f"adaln_single_emb_{name}_embedder_linear_{i}",
                            _lin(cfg, f"adaln_single.emb.{name}_embedder.linear_{i}", a, b, (None, None), dtype,
                                 rngs, init))
        # TerDiT's RMSNorm over the whole 6D output of the (shared) adaLN linear, before each block adds its table
        self.adaln_single_norm = RMSNorm(6 * d, eps=cfg.norm_eps, axis_name="adaln") if adaln_norm(cfg) else None
        self.caption_projection_linear_1 = _lin(cfg, "caption_projection.linear_1", cfg.caption_channels, d,
                                                (None, "embed"), dtype, rngs, init)
        self.caption_projection_linear_2 = _lin(cfg, "caption_projection.linear_2", d, d, ("embed", None), dtype,
                                                rngs, init)
        self.transformer_blocks = nnx.List([PixArtBlock(cfg, path=f"transformer_blocks.{i}", dtype=dtype, rngs=rngs)
                                            for i in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg, dtype=dtype, rngs=rngs)

    def block_list(self) -> list[nnx.Module]:
        return list(self.transformer_blocks)

    def condition(self, t: jax.Array, y, drop_key=None) -> jax.Array:
        """c = [embedded_t | adaln_single.linear(SiLU(embedded_t))] (B, 7D) float32 (the second part through
        TerDiT's RMSNorm where `adaln_norm(cfg)`)."""
        e = self._embed("timestep", timestep_features(t), t)
        if self.micro is not None:
            b, (size, ratio) = t.shape[0], self.micro
            res = self._embed("resolution", timestep_features(jnp.full((2 * b,), size)), t.repeat(2))
            ar = self._embed("aspect_ratio", timestep_features(jnp.full((b,), ratio)), t)
            e = e + jnp.concatenate([res.reshape(b, -1), ar], -1)
        return jnp.concatenate([e, self.modulation(e, t)], -1).astype(jnp.float32)

    def _embed(self, name: str, features: jax.Array, t) -> jax.Array:
        """adaln_single.emb.<name>_embedder: Linear, SiLU, Linear on sinusoidal features (B, 256)."""
        first, second = (getattr(self, f"adaln_single_emb_{name}_embedder_linear_{i}") for i in (1, 2))
        return second(jax.nn.silu(first(features, t)), t)

    def modulation(self, e: jax.Array, t=None) -> jax.Array:
        """The shared adaLN-single output (B, 6D) from the embedded timestep e (B, D)."""
        mod = self.adaln_single_linear(jax.nn.silu(e), t)
        return mod if self.adaln_single_norm is None else self.adaln_single_norm(mod)

    def caption(self, y, t) -> tuple[jax.Array, jax.Array]:
        """(caption (B, N, Cc), mask (B, N)) → (projected tokens (B, N, D), mask)."""
        caption, mask = y
        h = jax.nn.gelu(self.caption_projection_linear_1(caption, t), approximate=True)
        return self.caption_projection_linear_2(h, t), mask

    def embed(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, Context]:
        p = self.patch_size
        tokens = self.pos_embed_proj(patchify(x, p), t)
        table = pos_embed(tokens.shape[-1], x.shape[1] // p, x.shape[2] // p, self.base, self.pe_scale)
        return tokens + table.astype(tokens.dtype), Context(t, None)

    def caption_is_constant(self) -> bool:
        """Whether the caption path (projection, every attn2 to_k/to_v) is the same at every timestep: no quantizer
        on it is time-grouped (the attn2 k/v sites quantize after this path, at each step)."""
        path = [self.caption_projection_linear_1, self.caption_projection_linear_2,
                *(m for b in self.transformer_blocks for m in (b.attn2.to_k, b.attn2.to_v))]
        return all(getattr(site, "time_groups", 1) == 1 for m in path for site in sites_of(m).values())

    def prepare(self, y) -> Caption:
        """(caption, mask) → `Caption` with the projected tokens and every block's cross-attention K/V, computed
        once (a sampler then skips 2 + 2·n_layers caption matmuls per step). y itself where the caption path
        depends on the timestep (time-grouped quantizers), or y is prepared already."""
        if isinstance(y, Caption) or not self.caption_is_constant():
            return y
        tokens, mask = self.caption(y, None)
        return Caption(tokens, mask, tuple(b.attn2.kv(tokens, None) for b in self.transformer_blocks))

    def attach(self, ctx: Context, y) -> Context:
        return ctx._replace(caption=y if isinstance(y, Caption) else Caption(*self.caption(y, ctx.t)))

    def block_context(self, ctx: Context, i: int) -> Context:
        cap = ctx.caption
        return ctx if cap.kv is None else ctx._replace(caption=cap._replace(kv=cap.kv[i]))
