"""Ternary weights (TerDiT, arXiv 2405.14854 §3.2) and the pluggable linear-layer factory.

Every linear in the model is built by `make_linear(role, ...)`. The role (e.g. "attention.wq",
"adaLN_modulation") and the model config decide the kind: full precision ("fp"), ternary QAT
("ternary"), or any kind registered later in `LINEAR_KINDS` (packed inference, PTQ baselines).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

EPS = 1e-6  # added to γ before dividing, as in the official fairscale `ternary` layer


def absmean_ternary(w: jax.Array) -> jax.Array:
    """W_t = clip(round(W / (γ + ε)), −1, 1) with γ = mean|W| over the whole matrix (TerDiT eq. 2).

    Computed in float32; `jnp.round` is half-to-even like `torch.round`. Returns float32 in {−1, 0, 1}.
    """
    w = w.astype(jnp.float32)
    gamma = jnp.mean(jnp.abs(w))
    return jnp.clip(jnp.round(w / (gamma + EPS)), -1.0, 1.0)


@jax.custom_vjp
def ternary_weight(w: jax.Array, alpha: jax.Array) -> jax.Array:
    """Effective weight α·W_t of a ternary layer, with the straight-through estimator.

    Gradients follow the official training layer: ∂L/∂W = α·∂L/∂w (identity STE, no clipping
    mask, nothing through γ) and ∂L/∂α = Σ ∂L/∂w ⊙ W_t.
    """
    return alpha * absmean_ternary(w)


def _ternary_fwd(w, alpha):
    w_t = absmean_ternary(w)
    return alpha * w_t, (w_t, alpha)


def _ternary_bwd(res, g):
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
    """Full-precision linear y = x·W (+ b). kernel (in, out) float32, cast to `dtype` for the matmul."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, kernel_init: Callable,
                 axes: tuple[str | None, str | None], dtype=jnp.float32, rngs: nnx.Rngs, **unused):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=axes[1:]) if use_bias else None

    def weight(self) -> jax.Array:
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in) → (..., out) in `dtype`."""
        y = jnp.dot(x.astype(self.dtype), self.weight().astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


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
    raise ValueError(f"unknown alpha_init {mode!r}; use 'randn', 'xavier_absmean' or 'one'")


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


# Registry of linear kinds; other modules add theirs (packed inference, PTQ fake-quant) here.
LINEAR_KINDS: dict[str, type] = {"fp": Dense, "ternary": TernaryDense}


def layer_kind(role: str, model_cfg) -> str:
    """Kind of the linear with this role: `model.linear` if the role starts with one of
    `model.quantized_layers`, else full precision (TerDiT keeps embedders and the final layer fp)."""
    prefixes = tuple(p for p in str(model_cfg.quantized_layers).split(",") if p)
    return model_cfg.linear if role.startswith(prefixes) else "fp"


def make_linear(role: str, in_features: int, out_features: int, *, model_cfg, rngs: nnx.Rngs,
                use_bias: bool, kernel_init: Callable, axes, dtype) -> nnx.Module:
    """Build the linear layer for `role` (e.g. 'attention.wq') with the kind the config picks."""
    kind = layer_kind(role, model_cfg)
    if kind not in LINEAR_KINDS:
        raise ValueError(f"unknown linear kind {kind!r} for {role}; known: {sorted(LINEAR_KINDS)}")
    extra = {"alpha_init": model_cfg.alpha_init} if kind == "ternary" else {}
    if kind == "packed":
        extra = {"act_dtype": model_cfg.packed_act_dtype, "backend": model_cfg.packed_backend}
    return LINEAR_KINDS[kind](in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                              axes=tuple(axes), dtype=dtype, rngs=rngs, **extra)
