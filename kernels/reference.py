"""Plain-jnp packed-ternary matmul: the numerical reference for the Pallas kernel and the XLA fallback.

Two arithmetic modes (y = x @ (alpha * W_t) + bias, x (M, K), packed weight (Kp/4, N)):

* W2A16: activations in bf16 (or f32), weights unpacked to the same dtype (exact: {-1,0,1}), f32
  accumulation, then ``alpha * acc + bias``.
* W2A8: per-token absmax int8 activations (BitNet b1.58 style, arXiv:2402.17764):
  ``s = max|x_row| / 127``, ``q = clip(round(x / s), -127, 127)``, int32 accumulation
  ``acc = q @ W_t``, then ``y = acc * (s * alpha) + bias``. The accumulation is exact integer
  arithmetic, so any correct kernel reproduces ``acc`` bit for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from terdit_kernels.packing import unpack

ACT_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "int8": jnp.int8}


def quantize_activations(x) -> tuple[jax.Array, jax.Array]:
    """Per-row absmax int8: x (M, K) float -> (q (M, K) int8, s (M, 1) f32) with x ~= q * s.

    An all-zero row gets s = 1 (any s gives q = 0) so the division never makes NaNs.
    """
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    q = jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8)
    return q, s


def accumulate(xa, packed, *, k: int) -> jax.Array:
    """Raw accumulator ``xa @ W_t``: xa (M, K) bf16/f32 -> f32, or int8 -> exact int32."""
    w = unpack(packed, k)
    if xa.dtype == jnp.int8:
        return jnp.dot(xa, w, preferred_element_type=jnp.int32)
    return jnp.dot(xa, w.astype(xa.dtype), preferred_element_type=jnp.float32)


def ternary_matmul_reference(x, packed, alpha, *, k: int, bias=None, act_dtype: str = "bf16",
                             out_dtype=None) -> jax.Array:
    """y = x @ (alpha * W_t) (+ bias) from packed weights, in plain jnp.

    Args:
      x: (M, K) activations (any float dtype).
      packed: (padded_k(K) // 4, N) uint8 from ``packing.pack``.
      alpha: per-layer scale, a scalar or shape (1,) array.
      k: the unpadded K (in-features).
      bias: optional (N,) float.
      act_dtype: 'bf16' or 'f32' (W2A16, float accumulation) or 'int8' (W2A8, int32 accumulation).
      out_dtype: output dtype; defaults to x.dtype.
    Returns:
      (M, N) in out_dtype.
    """
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be one of {sorted(ACT_DTYPES)}, got {act_dtype!r}.")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K={k}), got {x.shape}.")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    alpha = jnp.asarray(alpha, jnp.float32).reshape(())
    if act_dtype == "int8":
        q, s = quantize_activations(x)
        y = accumulate(q, packed, k=k).astype(jnp.float32) * (s * alpha)
    else:
        y = accumulate(x.astype(ACT_DTYPES[act_dtype]), packed, k=k) * alpha
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
