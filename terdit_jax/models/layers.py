"""Building blocks of Large-DiT / TerDiT (LLaMA-style DiT), as in the official `models.py`.

Shapes: B batch, T tokens, D model width, C conditioning width (= min(D, 1024)), H heads. `path` arguments are
the module's place in the parameter tree (e.g. "layers.3.attention"); linears and quantization sites are named
from it (models/linears.py, quant/sites.py). `t` arguments are the (B,) timesteps, used only by time-aware
quantizers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.linears import make_linear
from terdit_jax.models.ternary import normal_init, xavier_uniform
from terdit_jax.quant.integer import integer_attention
from terdit_jax.quant.sites import make_site, quantize


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x²) + eps) · w, computed in float32 (LLaMA; apex FusedRMSNorm in the official code)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis_name: str | None = None):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,)), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (Hendrycks & Gimpel 2016; timm's and DiT's `approximate="tanh"`): the
    values of `jax.nn.gelu(x, approximate=True)`, with a backward of its own for training memory. Autodiff of the
    formula keeps x and a tanh product for the backward; this keeps x alone and recomputes the rest there: one
    (B, T, 4D) array less per block (24 MB at DiT-B/2, batch 8)."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    # ½(1 + tanh u) = σ(2u), so gelu(x) = x·σ(v), v = 2u = x(a + b·x²), and gelu'(x) = σ(v) + x·σ(v)(1 − σ(v))·v'.
    # Written with σ, not with the forward's tanh: XLA would otherwise merge the two tanh as one expression (CSE)
    # and keep the forward's for the backward, the array this rule exists not to keep.
    a = 2 * math.sqrt(2 / math.pi)
    b = a * 0.044715
    s = jax.nn.sigmoid(x * (a + b * x * x))
    return (g * (s + x * s * (1 - s) * (a + 3 * b * x * x)),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def _moments(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and (biased) variance over the last axis, (..., D) → two (..., 1)."""
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    return mean, jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)


def _matvec_moments(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_moments` as products with the averaging vector (1/D, …, 1/D): the same statistics without a reduce op."""
    avg = jnp.full((x32.shape[-1],), 1.0 / x32.shape[-1], jnp.float32)
    mean = jnp.dot(x32, avg, precision=jax.lax.Precision.HIGHEST)[..., None]
    return mean, jnp.dot(jnp.square(x32 - mean), avg, precision=jax.lax.Precision.HIGHEST)[..., None]


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32; affine (qk-norm, eps 1e-5) or not (final layer, eps 1e-6).

    `final=True` is for the network's last norm, on the CPU: XLA's YNNPACK fusion grows from a reduction back
    through every single-use producer, and the last block's output has no other user, so the final norm's
    reduction pulls the whole last block (proj, MLP, both residuals) into one fusion that takes GELU's scalar
    constants as materialised (B, T, 4D) arrays: 288 MB of temporaries at DiT-XL/2, batch 16. There the statistics
    are matrix-vector products instead (`_matvec_moments`: the same values, no reduce to grow from); other
    platforms keep the reduction (`lax.platform_dependent`)."""

    def __init__(self, dim: int, *, eps: float, affine: bool, axis_name: str | None = None, final: bool = False):
        self.eps, self.final = eps, final
        self.weight = nnx.Param(jnp.ones((dim,)), logical_axes=(axis_name,)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,)), logical_axes=(axis_name,)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.final:
            mean, var = jax.lax.platform_dependent(x32, cpu=_matvec_moments, default=_moments)
        else:
            mean, var = _moments(x32)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)


def sincos_pos_embed_2d(dim: int, h: int, w: int, *, column_first: bool = False) -> jax.Array:
    """Fixed 2-D sin-cos position table in the manner of MAE's `get_2d_sincos_pos_embed`: one half of the
    channels encodes the row, the other the column, each as [sin, cos] of pos·10000^(−k/(dim/4)). The original
    DiT puts the column first (`column_first=True`; MAE's meshgrid is "xy"); the demo's Large-DiT option puts
    the row first. → (h·w, dim) f32, raster order."""
    def axis(pos, d):  # (n,) → (n, d)
        omega = 1.0 / 10000 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d / 2))
        angles = pos[:, None] * omega[None]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    halves = [axis(rows.reshape(-1), dim // 2), axis(cols.reshape(-1), dim // 2)]
    return jnp.concatenate(halves[::-1] if column_first else halves, axis=-1)


def rope_angles(num_tokens: int, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """pos·θ_i with θ_i = theta^(−2i/head_dim), positions 0..T−1 (1-D LLaMA RoPE). → (T, head_dim/2) f32."""
    inv = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return jnp.arange(num_tokens, dtype=jnp.float32)[:, None] * inv[None, :]


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angles (LLaMA `apply_rotary_emb`, not rotate-half).

    x (B, T, H, hd), angles (T, hd/2). Computed in float32, returned in x.dtype.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def quantize_qkv(sites: tuple, q: jax.Array, k: jax.Array, v: jax.Array, t: jax.Array | None) -> tuple:
    """(q, k, v, scale) through the q, k, v sites, q (B, T, H, hd) and the rest alike. A q site sees q already
    multiplied by 1/sqrt(hd), as in the official PTQ4DiT (its learned step size is then relative to that scale),
    and the attention then runs with scale 1; without a q site nothing changes."""
    q_site, k_site, v_site = sites
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q_site is not None:
        q, scale = quantize(q_site, q * jnp.asarray(scale, q.dtype), t), 1.0
    return q, quantize(k_site, k, t), quantize(v_site, v, t), scale


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                         mask: jax.Array | None = None) -> jax.Array:
    """softmax(q·kᵀ·scale)·v as XLA's CPU backend runs it fastest, q (B, Tq, H, hd), k, v (B, Tk, H, hd) →
    (B, Tq, H, hd). The products run head-major, (B, H, T, hd), and the softmax's division is applied to the
    (Tq, hd) output instead of the (Tq, Tk) probabilities, as flash attention does: one pass fewer over the
    largest tensor. XLA's CPU backend has no fused attention, and jax.nn.dot_product_attention's token-major
    products and normalized probabilities cost it extra copies and passes (benchmarks/vs_diffusers.py's rows).
    """
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    s = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if mask is not None:  # the lowest finite value, not −inf: a row with every key masked averages v, as in jax.nn
        s = jnp.where(mask[:, None, None, :] > 0, s, jnp.finfo(s.dtype).min)
    # the row max only keeps exp in range; it cancels in the ratio, so it needs no gradient
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out / e.sum(-1, keepdims=True), 1, 2).astype(v.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, probs_site, t: jax.Array | None,
              scores_site=None, scale: float | None = None, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q·kᵀ·scale)·v for q (B, Tq, H, hd), k, v (B, Tk, H, hd) → (B, Tq, H, hd); scale 1/sqrt(hd) unless
    given; keys where mask (B, Tk) is 0 left out. Without sites: jax.nn.dot_product_attention, or on the CPU
    `head_major_attention`; a site on the (B, H, Tq, Tk) scores or probabilities needs them formed, in float32
    (as XLA's fused attention does)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if probs_site is None and scores_site is None:
        if jax.default_backend() == "cpu":
            return head_major_attention(q, k, v, scale, mask)
        return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                            mask=None if mask is None else mask[:, None, None, :] > 0)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits if scale == 1.0 else logits * scale
    logits = quantize(scores_site, logits, t)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
    probs = quantize(probs_site, jax.nn.softmax(logits, axis=-1), t)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def site_attention(sites: tuple, q: jax.Array, k: jax.Array, v: jax.Array, t: jax.Array | None, *,
                   integer: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Attention (B, Tq, H, hd) → (B, Tq, H, hd) through its q, k, v, probs, scores `sites` (`attention_sites`), with
    an optional key mask (B, Tk). In a deployed model (`integer`) the quantized products run as integer matmuls
    (`quant.integer.integer_attention`), else, and where the sites have no integer codes, as fake-quantized float."""
    if integer:
        out = integer_attention(sites, q, k, v, t, mask)
        if out is not None:
            return out
    q, k, v, scale = quantize_qkv(sites[:3], q, k, v, t)
    return attention(q, k, v, sites[3], t, sites[4], scale, mask)


def attention_sites(path: str, cfg, n_heads: int, head_dim: int) -> tuple:
    """The q, k, v (B, T, H, hd), probs and scores (B, H, T, T) sites of the attention at `path`."""
    qkv = tuple(make_site(f"{path}.{r}", cfg, (None, None, n_heads, head_dim)) for r in "qkv")
    return (*qkv, *(make_site(f"{path}.{r}", cfg, (None, n_heads, None, None)) for r in ("probs", "scores")))


class Attention(nnx.Module):
    """Multi-head self-attention with ternary wq/wk/wv/wo, optional full-width qk-LayerNorm and RoPE."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        d, self.n_heads = cfg.dim, cfg.n_heads
        self.head_dim = d // cfg.n_heads
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=False, kernel_init=xavier_uniform, dtype=dtype)
        self.wq = make_linear(f"{path}.wq", d, d, axes=("embed", "heads"), **lin)
        self.wk = make_linear(f"{path}.wk", d, d, axes=("embed", "heads"), **lin)
        self.wv = make_linear(f"{path}.wv", d, d, axes=("embed", "heads"), **lin)
        self.wo = make_linear(f"{path}.wo", d, d, axes=("heads", "embed"), **lin)
        self.q_norm = LayerNorm(d, eps=1e-5, affine=True, axis_name="heads") if cfg.qk_norm else None
        self.k_norm = LayerNorm(d, eps=1e-5, affine=True, axis_name="heads") if cfg.qk_norm else None
        sites = attention_sites(path, cfg, self.n_heads, self.head_dim)
        self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site = sites
        self.integer = bool(cfg.get("deployed", False))
        # The one input wq, wk and wv share: a deployed kernel quantizes it once (PTQ quantizes it here, not at
        # each linear's own input site).
        self.input_site = make_site(f"{path}.input", cfg, (None, d))

    def __call__(self, x: jax.Array, angles: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), angles (T, hd/2) → (B, T, D)."""
        b, n, _ = x.shape
        x = quantize(self.input_site, x, t)
        q, k, v = self.wq(x, t), self.wk(x, t), self.wv(x, t)
        if self.q_norm is not None:  # over the whole projection, before the head split (official)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (a.reshape(b, n, self.n_heads, self.head_dim) for a in (q, k, v))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        sites = (self.q_site, self.k_site, self.v_site, self.probs_site, self.scores_site)
        return self.wo(site_attention(sites, q, k, v, t, integer=self.integer).reshape(b, n, -1), t)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA rule: int(2·4D/3), times the multiplier if any, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nnx.Module):
    """SwiGLU: w2(SiLU(w1 x) ⊙ w3 x), all three ternary in TerDiT; the gated product is the `hidden` site."""

    def __init__(self, cfg, *, path: str, dtype, rngs: nnx.Rngs):
        f = ffn_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=False, kernel_init=xavier_uniform, dtype=dtype)
        self.w1 = make_linear(f"{path}.w1", cfg.dim, f, axes=("embed", "mlp"), **lin)
        self.w3 = make_linear(f"{path}.w3", cfg.dim, f, axes=("embed", "mlp"), **lin)
        self.w2 = make_linear(f"{path}.w2", f, cfg.dim, axes=("mlp", "embed"), **lin)
        self.hidden_site = make_site(f"{path}.hidden", cfg, (None, None, f))
        self.input_site = make_site(f"{path}.input", cfg, (None, cfg.dim))  # the input w1 and w3 share

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        x = quantize(self.input_site, x, t)
        hidden = quantize(self.hidden_site, jax.nn.silu(self.w1(x, t)) * self.w3(x, t), t)
        return self.w2(hidden, t)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [cos(t·f), sin(t·f)] (cos first, as Large-DiT), f_i = max_period^(−i/half). → (B, dim) f32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """t → MLP(256 → C, SiLU, C → C), full precision, weights N(0, 0.02)."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        c = cfg.cond_dim
        lin = dict(model_cfg=cfg, rngs=rngs, use_bias=True, kernel_init=normal_init(0.02), dtype=dtype)
        self.mlp_0 = make_linear("t_embedder.mlp_0", 256, c, axes=(None, "cond"), **lin)
        self.mlp_2 = make_linear("t_embedder.mlp_2", c, c, axes=("cond", None), **lin)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_features(t), t)), t)


class LabelEmbedder(nnx.Module):
    """Class table of shape (num_classes + 1, C); row `num_classes` is the null class used by CFG."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.num_classes, self.dropout = cfg.num_classes, cfg.class_dropout_prob
        self.embedding_table = nnx.Param(normal_init(0.02)(rngs.params(), (cfg.num_classes + 1, cfg.cond_dim)),
                                         logical_axes=(None, "cond"))

    def __call__(self, y: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        """y (B,) int labels; with `drop_key` each label becomes the null class with prob `dropout`."""
        if drop_key is not None and self.dropout > 0:
            y = jnp.where(jax.random.uniform(drop_key, y.shape) < self.dropout, self.num_classes, y)
        return jnp.take(self.embedding_table[...], y, axis=0)
