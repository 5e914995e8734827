"""The original DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", facebookresearch/DiT
`models.py`) and its twelve presets DiT-{S,B,L,XL}/{2,4,8}: the "dit" model family.

Differences from the Large-DiT family (models/dit.py), all as the official code has them: a fixed column-first
2-D sin-cos position table and no RoPE, one fused qkv linear with biases, a tanh-GELU MLP of width mlp_ratio·D,
LayerNorms (eps 1e-6, no affine) instead of RMSNorms, no qk-norm, no norm after the adaLN linear, and a
conditioning width equal to D. Module names follow the official state dict (`x_embedder`, `blocks.N.attn.qkv`,
`blocks.N.mlp.fc1`, `blocks.N.adaLN_modulation`, ...) so that quantized_layers prefixes and site rules written
for the PyTorch PTQ baselines (PTQ4DiT, Q-DiT, TQ-DiT) select the same layers, and the importer
(convert/dit_official.py) is a table lookup.

Shapes: B batch, T tokens, D width, H heads, hd = D/H. Images are NHWC; patchify gives per-token features
(c, py, px) like the official Conv2d patch embedding, unpatchify reads (py, px, c) like the official one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.backbone import Context, DiffusionTransformer, FinalLayer, modulate, patchify
from terdit_jax.models.layers import (LabelEmbedder, LayerNorm, TimestepEmbedder, attention_sites, gelu_tanh,
                                      sincos_pos_embed_2d, site_attention)
from terdit_jax.models.linears import make_linear
from terdit_jax.models.ternary import xavier_uniform, zeros_init
from terdit_jax.quant.sites import make_site, quantize

# size: (depth, width, heads) of the official `DiT_models` factories (models.py, bottom).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
# "DiT-XL/2" → the model fields the preset sets.
PRESETS = {f"DiT-{size}/{p}": dict(dim=d, n_layers=n, n_heads=h, patch_size=p)
           for size, (n, d, h) in SIZES.items() for p in PATCHES}
# Model config fields only the Large-DiT family reads: they are not part of a DiT checkpoint's signature
# (config.finalize refuses pre_norms=False for a family that lists it here).
UNUSED_FIELDS = ("multiple_of", "ffn_dim_multiplier", "norm_eps", "qk_norm", "rope_theta", "pos_embed",
                 "adaln_norm", "pre_norms")
NORM_EPS = 1e-6  # every LayerNorm of the official DiT


def mlp_hidden_dim(cfg) -> int:
    """int(D · mlp_ratio), the official `mlp_hidden_dim` (4608 for XL)."""
    return int(cfg.dim * cfg.mlp_ratio)


def num_tokens(cfg) -> int:
    """T = (input_size / patch_size)² (256 for XL/2 at 256 px)."""
    return (int(cfg.input_size) // int(cfg.patch_size)) ** 2


def fixed_params(cfg) -> int:
    """Size of the official fixed `pos_embed` (1, T, D): an nn.Parameter with requires_grad=False, so the
    published "675M" of DiT-XL/2 at 256 px counts it; here it is computed on the fly and holds no parameter."""
    return num_tokens(cfg) * int(cfg.dim)


def pos_embed(dim: int, grid_h: int, grid_w: int) -> jax.Array:
    """DiT's fixed table (MAE's `get_2d_sincos_pos_embed`, whose "xy" meshgrid puts the column in the first D/2
    channels) → (grid_h·grid_w, dim) float32, tokens in raster order. The official one is computed in float64;
    float32 differs from it by ≤ 1.3e-6."""
    return sincos_pos_embed_2d(dim, grid_h, grid_w, column_first=True)


def check(cfg) -> str | None:
    """Why the "dit" family cannot build `cfg` (a model config after its preset is applied), or None."""
    if cfg.dim % cfg.n_heads:
        return f"model.dim={cfg.dim} does not split into {cfg.n_heads} heads"
    if cfg.dim % 4:
        return f"model.dim={cfg.dim} must be a multiple of 4 (the position table holds sin and cos of rows and columns)"
    if mlp_hidden_dim(cfg) < 1:
        return f"model.mlp_ratio={cfg.mlp_ratio} gives no MLP width for dim {cfg.dim}"
    if cfg.get("qk_norm", False):  # silently dropping an asked-for architecture change would mislead
        return "model.qk_norm=True: the original DiT has no qk-norm (it is a large_dit option)"
    return None


@jax.custom_vjp
def residual_buffer(x: jax.Array) -> jax.Array:
    """The identity on a block's output; under differentiation the residual stream and its cotangent each leave
    the block as a buffer. Without it XLA's CPU fusion re-adds every later block's cotangent inside each block's
    weight-gradient fusions, work that grows with the depth: the DiT-B/2 training step took 1.5× diffusers'
    (benchmarks/vs_diffusers.py). The plain call (sampling) is untouched."""
    return x


def _materialize(x: jax.Array) -> jax.Array:
    # XLA's CPU pipeline drops optimization barriers before fusing, but never fuses through a dot: x times a small
    # identity (2·x.size·k FLOPs) is the cheapest op that makes x a buffer. The re-adding was measured on the CPU
    # only, so other backends keep x as it is; HIGHEST keeps the product exact should it ever run through TF32.
    if jax.default_backend() != "cpu":
        return x
    k = math.gcd(x.shape[-1], 64)
    eye = jnp.eye(k, dtype=x.dtype)
    return jnp.matmul(x.reshape(-1, k), eye, precision=jax.lax.Precision.HIGHEST).reshape(x.shape)


def _residual_fwd(x):
    return _materialize(x), None


def _residual_bwd(_, g):
    return (_materialize(g),)


residual_buffer.defvjp(_residual_fwd, _residual_bwd)


class Attention(nnx.Module):
    """timm `Attention` as DiT uses it: one fused qkv linear D → 3D with bias (output feature s·D + h·hd + d,
    s ∈ {q, k, v}), softmax(q·kᵀ/√hd)·v, then `proj` D → D. No qk-norm, no RoPE, no dropout."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        d, self.n_heads = cfg.dim, cfg.n_heads
        self.head_dim = d // cfg.n_heads
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=xavier_uniform, dtype=dtype)
        # One Xavier over the fused (D, 3D) matrix, as the official initialize_weights does for nn.Linear(D, 3D).
        # Its 3D output axis is split like the heads: GSPMD keeps the q/k/v reshape exact on any tensor split.
        self.qkv = make_linear(f"{path}.qkv", d, 3 * d, axes=("embed", "heads"), **lin)
        self.proj = make_linear(f"{path}.proj", d, d, axes=("heads", "embed"), **lin)
        sites = attention_sites(path, cfg, self.n_heads, self.head_dim)
        self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site = sites
        self.integer = bool(cfg.get("deployed", False))

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (B, T, D) → (B, T, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x, t).reshape(b, n, 3, self.n_heads, self.head_dim)
        sites = (self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site)
        out = site_attention(sites, *(qkv[:, :, i] for i in range(3)), t, integer=self.integer)
        return self.proj(out.reshape(b, n, d), t)


class Mlp(nnx.Module):
    """timm `Mlp`: fc1 D → mlp_ratio·D, GELU with the tanh approximation, fc2 back to D, both with bias. The
    post-GELU tensor is the `hidden` site (PTQ4DiT's post-activation quantizer)."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        f = mlp_hidden_dim(cfg)
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=xavier_uniform, dtype=dtype)
        self.fc1 = make_linear(f"{path}.fc1", cfg.dim, f, axes=("embed", "mlp"), **lin)
        self.fc2 = make_linear(f"{path}.fc2", f, cfg.dim, axes=("mlp", "embed"), **lin)
        self.hidden_site = make_site(f"{path}.hidden", cfg, (None, None, f))

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (B, T, D) → (B, T, D)."""
        hidden = quantize(self.hidden_site, gelu_tanh(self.fc1(x, t)), t)
        return self.fc2(hidden, t)


class DiTBlock(nnx.Module):
    """The official `DiTBlock`: adaLN-Zero modulation of both pre-norm branches.

    x += gate_msa·attn(modulate(norm1 x)), then x += gate_mlp·mlp(modulate(norm2 x)), with the six chunks of
    adaLN_modulation(SiLU(c)) in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    """

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.dim, eps=NORM_EPS, affine=False)
        self.attn = Attention(cfg, path=f"{path}.attn", dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=NORM_EPS, affine=False)
        self.mlp = Mlp(cfg, path=f"{path}.mlp", dtype=dtype, rngs=rngs)
        # adaLN-Zero: weight and bias 0, so every block starts as the identity.
        self.adaLN_modulation = make_linear(f"{path}.adaLN_modulation", cfg.cond_dim, 6 * cfg.dim, model_cfg=cfg,
                                            rngs=rngs, use_bias=True, kernel_init=zeros_init,
                                            axes=("cond", "adaln"), dtype=dtype)

    def modulation(self, c: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """c (B, D) → (B, 6D)."""
        return self.adaLN_modulation(jax.nn.silu(c), t)

    def __call__(self, x: jax.Array, c: jax.Array, ctx: Context, mod: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), c (B, D) → (B, T, D). `mod` (B, 6D) replaces `modulation(c)` when given (the fused
        adaLN of a packed model)."""
        mod = self.modulation(c, ctx.t) if mod is None else mod
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = jnp.split(mod, 6, axis=-1)
        x = x + g_a[:, None] * self.attn(modulate(self.norm1(x), sh_a, sc_a), ctx.t)
        return residual_buffer(x + g_m[:, None] * self.mlp(modulate(self.norm2(x), sh_m, sc_m), ctx.t))


class OriginalDiT(DiffusionTransformer):
    """The original class-conditional DiT with pluggable linears (call contract: `DiffusionTransformer`).

    With learn_sigma the output has 2·C channels: ε, then the learned-range variance values v
    (log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1)/2; IDDPM).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.patch_size = cfg.patch_size
        # The official patch Conv2d, as a linear on patchify's (c, py, px) features; Xavier over its
        # (D, C·p²) view is Xavier over this kernel.
        self.x_embedder = make_linear("x_embedder", cfg.patch_size ** 2 * cfg.in_channels, cfg.dim,
                                      model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=xavier_uniform,
                                      axes=(None, "embed"), dtype=dtype)
        self.t_embedder = TimestepEmbedder(cfg, dtype=dtype, rngs=rngs)
        self.y_embedder = LabelEmbedder(cfg, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(cfg, path=f"blocks.{i}", dtype=dtype, rngs=rngs)
                                for i in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg, dtype=dtype, rngs=rngs)

    def block_list(self) -> list[nnx.Module]:
        return list(self.blocks)

    def condition(self, t: jax.Array, y: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        """c = t_embedder(t) + y_embedder(y), (B, D) in float32."""
        return self.t_embedder(t).astype(jnp.float32) + self.y_embedder(y, drop_key)

    def embed(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, Context]:
        """x (B, H, W, C) → tokens (B, T, D) with the fixed position table added, and a Context without RoPE."""
        p = self.patch_size
        tokens = self.x_embedder(patchify(x, p), t)
        table = pos_embed(tokens.shape[-1], x.shape[1] // p, x.shape[2] // p)
        return tokens + table.astype(tokens.dtype), Context(t, None)
