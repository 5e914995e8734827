"""Ternary weights (TerDiT, arXiv 2405.14854 §3.2): the absmean quantizer, its straight-through estimator,
and the full-precision and ternary QAT linear layers. Which layer gets which kind is decided in `linears.py`.
"""
from __future__ import annotations

import math
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.logical_axes import mesh_axes
from terdit_jax.quant.sites import quantize

EPS = 1e-6  # added to γ before dividing, as in the official fairscale `ternary` layer


def absmean_ternary(w: jax.Array) -> jax.Array:
    """W_t = clip(round(W / (γ + ε)), −1, 1) with γ = mean|W| over the whole matrix (TerDiT eq. 2).

    Computed in float32; `jnp.round` is half-to-even like `torch.round`. Returns float32 in {−1, 0, 1}.
    """
    w = w.astype(jnp.float32)
    gamma = jnp.mean(jnp.abs(w))
    return jnp.clip(jnp.round(w / (gamma + EPS)), -1.0, 1.0)


def absmean_ternary_blocks(w: jax.Array, axis: int, n: int) -> jax.Array:
    """TerDiT eq. 2 with γ taken separately over each of `n` equal blocks of `axis`: the γ each tensor-parallel
    rank computes from its local weight shard in the official fairscale Column/RowParallel ternary layers.
    n = 1 is the global γ (`absmean_ternary`)."""
    if n == 1:
        return absmean_ternary(w)
    w = w.astype(jnp.float32)
    shape = w.shape
    blocks = w.reshape(shape[:axis] + (n, shape[axis] // n) + shape[axis + 1:])
    red = tuple(i for i in range(blocks.ndim) if i != axis)
    gamma = jnp.mean(jnp.abs(blocks), axis=red, keepdims=True)
    return jnp.clip(jnp.round(blocks / (gamma + EPS)), -1.0, 1.0).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def ternary_weight(w: jax.Array, alpha: jax.Array, axis: int = 0, shards: int = 1) -> jax.Array:
    """Effective weight α·W_t of a ternary layer, with the straight-through estimator; γ over `shards` blocks of
    `axis` (1 = the whole matrix, see `absmean_ternary_blocks`).

    Gradients follow the official training layer: ∂L/∂W = α·∂L/∂w (identity STE, no clipping
    mask, nothing through γ) and ∂L/∂α = Σ ∂L/∂w ⊙ W_t.
    """
    return alpha * absmean_ternary_blocks(w, axis, shards)


def _ternary_fwd(w, alpha, axis, shards):
    w_t = absmean_ternary_blocks(w, axis, shards)
    return alpha * w_t, (w_t, alpha)


def _ternary_bwd(axis, shards, res, g):
    w_t, alpha = res
    g = g.astype(jnp.float32)
    return (alpha * g).astype(w_t.dtype), jnp.sum(g * w_t).reshape(alpha.shape).astype(alpha.dtype)


ternary_weight.defvjp(_ternary_fwd, _ternary_bwd)


def xavier_uniform(key, shape, dtype=jnp.float32):
    """Glorot/Xavier uniform for a (fan_in, fan_out) kernel, as torch's xavier_uniform_."""
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def zeros_init(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def normal_init(std: float) -> Callable:
    return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
    """Full-precision linear y = x·W (+ b). kernel (in, out) float32, cast to `dtype` for the matmul.

    `input_site` / `weight_site`: quantizers of the layer's input and weight (quant/sites.py), None = identity.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, kernel_init: Callable,
                 axes: tuple[str | None, str | None], dtype=jnp.float32, rngs: nnx.Rngs,
                 input_site: nnx.Module | None = None, weight_site: nnx.Module | None = None):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=axes[1:]) if use_bias else None
        self.input_site, self.weight_site = input_site, weight_site

    def weight(self) -> jax.Array:
        return self.kernel[...]

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (..., in) → (..., out) in `dtype`. t (B,): timesteps, for time-aware quantizers only."""
        x = quantize(self.input_site, x, t)
        y = jnp.dot(x.astype(self.dtype), quantize(self.weight_site, self.weight(), t).astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


ALPHA_INITS = ("randn", "xavier_absmean", "one")
GAMMA_MODES = ("global", "shard")  # γ over the whole logical matrix, or per tensor-parallel shard (official)


def init_alpha(mode: str, shape: tuple[int, int], key) -> jax.Array:
    """Initial α. 'randn': official `torch.randn(1)` (may start negative, which flips the STE sign);
    'xavier_absmean': E|W| of a Xavier-uniform matrix of this shape (= limit/2), so α·W_t starts at the
    scale of a full-precision layer even when the latent weight is zero-initialised (adaLN)."""
    if mode == "randn":
        return jax.random.normal(key, ())
    if mode == "xavier_absmean":
        return jnp.asarray(0.5 * math.sqrt(6.0 / (shape[0] + shape[1])), jnp.float32)
    if mode == "one":
        return jnp.ones(())
    raise ValueError(f"unknown alpha_init {mode!r}; use one of {ALPHA_INITS}")


class TernaryDense(Dense):
    """Ternary QAT linear: float32 latent `kernel`, learned scalar `alpha`, weight α·W_t (TerDiT eq. 2).

    The quantizer always runs in float32 from the float32 master weights; only the matmul runs in `dtype`.
    """

    def __init__(self, in_features: int, out_features: int, *, alpha_init: str = "xavier_absmean",
                 rngs: nnx.Rngs, **kw):
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        self.alpha = nnx.Param(init_alpha(alpha_init, (in_features, out_features), rngs.params()),
                               logical_axes=())

    def weight(self) -> jax.Array:
        return ternary_weight(self.kernel[...], self.alpha[...])


class ShardGammaTernaryDense(TernaryDense):
    """TernaryDense whose γ is computed per tensor-parallel shard of the kernel (`model.ternary_gamma='shard'`).

    The split axis is the kernel axis whose logical name maps to the 'tensor' mesh axis; a kernel not split over
    'tensor' is whole on every tensor rank, so its γ is global. Parameters (kernel, alpha) are those of
    TernaryDense, so checkpoints move freely between the two kinds.
    """

    def __init__(self, in_features: int, out_features: int, *, axes, tensor_shards: int, **kw):
        super().__init__(in_features, out_features, axes=axes, **kw)
        shape = (in_features, out_features)
        self.shard_axis, self.shards = 0, 1
        for i, name in enumerate(axes):
            if "tensor" in mesh_axes(name) and tensor_shards > 1 and shape[i] % tensor_shards == 0:
                self.shard_axis, self.shards = i, tensor_shards

    def weight(self) -> jax.Array:
        return ternary_weight(self.kernel[...], self.alpha[...], self.shard_axis, self.shards)
