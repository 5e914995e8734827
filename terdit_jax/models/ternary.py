"""Ternary weights (TerDiT, arXiv 2405.14854 §3.2): the absmean quantizer, its straight-through estimator,
and the full-precision and ternary QAT linear layers. Which layer gets which kind is decided in `linears.py`.

With `act_bits=8` a ternary layer also quantizes its input to per-token int8 (W1.58A8) and computes exactly what
the packed W2A8 deployment computes (`int8_ternary_matmul`): the activation quantizer is the kernels' own
`terdit_kernels.reference.quantize_activations`, the product is an int8 × int8 → int32 dot, and the epilogue is
the kernels' `acc · (s · α) + b` in float32, so QAT and deployment share one definition of the arithmetic.
"""
from __future__ import annotations

import math
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.logical_axes import mesh_axes
from terdit_jax.quant.sites import SiteError, quantize
from terdit_kernels.reference import quantize_activations

EPS = 1e-6  # added to γ before dividing, as in the official fairscale `ternary` layer
# Activation bits of the ternary-weight kinds: 16 keeps the input in the compute dtype (TerDiT), 8 quantizes it to
# per-token int8 as the packed kernel's W2A8 path does (W1.58A8).
ACT_BITS = (8, 16)


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


def int8_accumulate(x: jax.Array, w_t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The W2A8 integer product: x (M, K) float, w_t (K, N) float in {−1, 0, 1} → (acc (M, N) int32, q (M, K) int8,
    s (M, 1) float32) with acc = q·W_t exactly and x ≈ q·s (per-token absmax, `quantize_activations`)."""
    q, s = quantize_activations(x)
    return jnp.dot(q, w_t.astype(jnp.int8), preferred_element_type=jnp.int32), q, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def int8_ternary_matmul(x: jax.Array, w: jax.Array, w_t: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """y = acc · (s · scale), (M, N) float32, with acc, s from `int8_accumulate(x, w_t)`: the W2A8 kernel's
    arithmetic (terdit_kernels.reference.ternary_matmul_reference, act_dtype='int8') with the same rounding order.

    x (M, K) in the compute `dtype`; w (K, N) float32 = scale·w_t, the effective weight as the layer's weight
    straight-through estimator returns it (`ternary_weight` or `bitnet.bitnet_weight`); w_t (K, N) and scale ()
    are its ternary codes and scale, taken as constants. The forward reads only x, w_t and scale; the backward is
    the straight-through estimator of the activation quantizer (BitNet b1.58, arXiv 2402.17764: forward the
    quantized x̃ = q·s, backward identity), so with G = ∂L/∂y: ∂L/∂x = G·wᵀ and ∂L/∂w = x̃ᵀ·G, which w's own
    estimator turns into the gradients of the latent weight (and α). w_t and scale get no gradient.
    """
    acc, _, s = int8_accumulate(x, w_t)
    return acc.astype(jnp.float32) * (s * scale)


def _int8_fwd(x, w, w_t, scale, dtype):
    acc, q, s = int8_accumulate(x, w_t)
    return acc.astype(jnp.float32) * (s * scale), (q, s, w, w_t, scale)


def _int8_bwd(dtype, res, g):
    q, s, w, w_t, scale = res
    g = g.astype(dtype)  # backward matmuls in the compute dtype with float32 accumulation, as Dense's
    x_hat = (q.astype(jnp.float32) * s).astype(dtype)
    dx = jnp.dot(g, w.astype(dtype).T, preferred_element_type=jnp.float32).astype(dtype)
    dw = jnp.dot(x_hat.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw, jnp.zeros_like(w_t), jnp.zeros_like(scale)


int8_ternary_matmul.defvjp(_int8_fwd, _int8_bwd)


def int8_linear(x: jax.Array, w: jax.Array, w_t: jax.Array, scale: jax.Array, bias: jax.Array | None,
                dtype) -> jax.Array:
    """The W1.58A8 linear: x (..., K) → (..., N) in `dtype`, what `models.packed.PackedTernaryDense` computes with
    act_dtype='int8': x rounded to `dtype`, `int8_ternary_matmul`, + bias in float32, one rounding to `dtype`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = int8_ternary_matmul(x2, w, jax.lax.stop_gradient(w_t), jax.lax.stop_gradient(scale), jnp.dtype(dtype))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype).reshape(*lead, y.shape[-1])


def token_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) · w (K, N) → (..., N) as one 2-D matmul over the flattened tokens. With x's leading axes kept, the
    weight gradient contracts two axes (batch and tokens), and XLA's CPU pipeline then writes each cotangent
    transposed, fused with its producer, a slow strided pass per linear in the training step on the CPU
    (benchmarks/vs_diffusers.py's train row). The reshapes are free on the CPU and GPU (row-major bitcasts)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


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

    `input_site` / `weight_site` / `output_site`: quantization sites of the layer's input, weight and output
    (quant/sites.py), None = identity. Subclasses change `forward`; the output site wraps every kind alike.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, kernel_init: Callable,
                 axes: tuple[str | None, str | None], dtype=jnp.float32, rngs: nnx.Rngs,
                 input_site: nnx.Module | None = None, weight_site: nnx.Module | None = None,
                 output_site: nnx.Module | None = None):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=axes[1:]) if use_bias else None
        self.input_site, self.weight_site, self.output_site = input_site, weight_site, output_site

    def weight(self) -> jax.Array:
        return self.kernel[...]

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (..., in) → (..., out) in `dtype`. t (B,): timesteps, for time-aware quantizers only."""
        return quantize(self.output_site, self.forward(x, t), t)

    def forward(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        x = quantize(self.input_site, x, t)
        y = token_matmul(x.astype(self.dtype), quantize(self.weight_site, self.weight(), t).astype(self.dtype))
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
    act_bits 16: x·(α·W_t) in `dtype` (TerDiT). act_bits 8 (W1.58A8): `int8_linear`, the packed W2A8 arithmetic,
    so the exported model computes bit for bit what was trained; a weight site cannot act on it then.
    """

    def __init__(self, in_features: int, out_features: int, *, alpha_init: str = "xavier_absmean",
                 act_bits: int = 16, rngs: nnx.Rngs, **kw):
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be one of {ACT_BITS}, got {act_bits!r}")
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        self.alpha = nnx.Param(init_alpha(alpha_init, (in_features, out_features), rngs.params()),
                               logical_axes=())
        self.act_bits = int(act_bits)
        if self.act_bits == 8 and self.weight_site is not None:
            raise SiteError("a ternary layer with act_bits=8 multiplies its ternary codes as integers; no site rule "
                            "may quantize its weight (quantize its input instead)")

    def weight(self) -> jax.Array:
        return ternary_weight(self.kernel[...], self.alpha[...])

    def codes(self) -> jax.Array:
        """W_t (K, N) float32 in {−1, 0, 1}: what the packed export stores for this layer."""
        return absmean_ternary(self.kernel[...])

    def forward(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        if self.act_bits == 16:
            return super().forward(x, t)
        return int8_linear(quantize(self.input_site, x, t), self.weight(), self.codes(), self.alpha[...],
                           None if self.bias is None else self.bias[...], self.dtype)

    def accumulator(self, x: jax.Array) -> jax.Array:
        """act_bits=8: the int32 accumulators (M, N) of this layer for its input x (..., K) (after the input site)."""
        return int8_accumulate(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.codes())[0]


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

    def codes(self) -> jax.Array:
        return absmean_ternary_blocks(self.kernel[...], self.shard_axis, self.shards)
