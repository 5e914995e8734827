"""Plain-jnp packed-ternary matmul: the numerical reference for the GPU kernels, and the XLA fallback.

Two arithmetic modes (y = x @ (alpha * W_t) + bias, x (M, K), packed weight (Kp/4, N)):

* W2A16: activations in bf16 (or f32), weights unpacked to the same dtype (exact: {-1,0,1}), f32
  accumulation, then ``alpha * acc + bias``.
* W2A8: per-token absmax int8 activations (BitNet b1.58 style, arXiv:2402.17764):
  ``s = max|x_row| / 127``, ``q = clip(round(x / s), -127, 127)``, int32 accumulation
  ``acc = q @ W_t``, then ``y = acc * (s * alpha) + bias``. The accumulation is exact integer
  arithmetic, so any correct kernel reproduces ``acc`` bit for bit.

As the XLA fallback (CPU, TPU, or a GPU whose kernel fails) this unpacks and multiplies in bounded tiles of
N: a layer whose K x N weight has more than ``TILE_ELEMENTS`` entries runs as a loop over column tiles of
at most that many weights, each unpacked, multiplied by all of x (the whole K, so every output element is
the same single f32/int32 dot as untiled) and written into its columns of the output. The compiled
temporaries are then about one tile (16 MiB as bf16) instead of the whole unpacked matrix (1.2 GB for the
4.2B model's stacked adaLN). Smaller layers take one dot, with no loop; their unpack depends on the
weights alone, so XLA may schedule it long before the layer runs (XLA:CPU hoists all of them to the start),
and a caller that bounds a whole model's memory must order it after the layer input (the packed TerDiT
layers do: ``terdit_jax.models.packed._after_input``). A tiled layer needs no such help: its loop waits
for x.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from terdit_kernels.packing import PACK_BLOCK_K, unpack

ACT_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "int8": jnp.int8}
# Most weights one fallback tile unpacks at once: 2**23 = 16 MiB as bf16. Large enough that each tile's dot
# dwarfs the loop step; small next to the 4.2B model's 1.1 GB of packed weights.
TILE_ELEMENTS = 1 << 23


def quantize_activations(x) -> tuple[jax.Array, jax.Array]:
    """Per-row absmax int8: x (M, K) float -> (q (M, K) int8, s (M, 1) f32) with x ~= q * s.

    An all-zero row gets s = 1 (any s gives q = 0) so the division never makes NaNs.
    """
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    q = jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8)
    return q, s


def _dot_unpacked(xa, packed, k: int) -> jax.Array:
    """xa (M, K) @ unpack(packed (Kp/4, n)) -> (M, n) f32, or int32 for int8 xa; one dot over the whole K."""
    w = unpack(packed, k)
    if xa.dtype == jnp.int8:
        return jnp.dot(xa, w, preferred_element_type=jnp.int32)
    return jnp.dot(xa, w.astype(xa.dtype), preferred_element_type=jnp.float32)


def tile_columns(k: int, n: int, tile_elements: int | None = TILE_ELEMENTS) -> int:
    """Output columns per fallback tile for a (K, N) weight: N (no loop) if K*N <= tile_elements (or None).

    Otherwise the fewest tiles of at most ``tile_elements`` weights (but at least 128 columns), as equal as
    multiples of 128 columns (lane-aligned on TPU) allow; they divide N exactly for the TerDiT shapes
    (3072, 8192, L*6D), so no tile overlaps another (``accumulate``). Only N is tiled: a weight with K*128 entries above
    the budget still gets 128-column tiles (no TerDiT layer comes near: K <= 8192).
    """
    if tile_elements is None or k * n <= tile_elements:
        return n
    cap = max(PACK_BLOCK_K, tile_elements // k // PACK_BLOCK_K * PACK_BLOCK_K)
    tiles = -(-n // cap)
    tn = -(-n // tiles)  # equal split, then rounded up to whole 128-column groups (never past cap)
    return min(n, cap, -(-tn // PACK_BLOCK_K) * PACK_BLOCK_K)


def accumulate(xa, packed, *, k: int, tile_elements: int | None = TILE_ELEMENTS) -> jax.Array:
    """Raw accumulator ``xa @ W_t``: xa (M, K) bf16/f32 -> (M, N) f32, or int8 -> exact int32.

    packed: (Kp/4, N) uint8. Unpacks in column tiles of at most ``tile_elements`` weights (None: all at once);
    the result is the same either way, since each output element is one dot over the whole K.
    """
    m, n = xa.shape[0], packed.shape[1]
    tn = tile_columns(k, n, tile_elements)
    if tn >= n:
        return _dot_unpacked(xa, packed, k)

    def body(j, out):
        # When tn does not divide N the last tile starts at N - tn and recomputes a few columns of the one
        # before: every tile then has the same static shape and nothing is unpacked outside the loop.
        start = jnp.minimum(j * tn, n - tn)
        cols = lax.dynamic_slice_in_dim(packed, start, tn, axis=1)  # (Kp/4, tn): the only codes unpacked now
        return lax.dynamic_update_slice_in_dim(out, _dot_unpacked(xa, cols, k), start, axis=1)

    # Every column of the loop's output buffer is overwritten, so its initial value is arbitrary. It is
    # x[0, 0] broadcast, not zeros: a zeros broadcast depends on nothing, and XLA:CPU then creates every
    # layer's buffer at program start (measured on the 4.2B sampling step: 2.15 GB of temporaries instead
    # of 0.08 GB). For the same reason nothing is unpacked outside the loop, where it would not wait for x.
    acc_dtype = jnp.int32 if xa.dtype == jnp.int8 else jnp.float32
    init = jnp.broadcast_to(xa[0, 0].astype(acc_dtype), (m, n))
    return lax.fori_loop(0, -(-n // tn), body, init)


def ternary_matmul_reference(x, packed, alpha, *, k: int, bias=None, act_dtype: str = "bf16",
                             out_dtype=None, tile_elements: int | None = TILE_ELEMENTS) -> jax.Array:
    """y = x @ (alpha * W_t) (+ bias) from packed weights, in plain jnp.

    Args:
      x: (M, K) activations (any float dtype).
      packed: (padded_k(K) // 4, N) uint8 from ``packing.pack``.
      alpha: per-layer scale, a scalar or shape (1,) array.
      k: the unpadded K (in-features).
      bias: optional (N,) float.
      act_dtype: 'bf16' or 'f32' (W2A16, float accumulation) or 'int8' (W2A8, int32 accumulation).
      out_dtype: output dtype; defaults to x.dtype.
      tile_elements: most weights unpacked at once (``accumulate``); None unpacks the whole matrix.
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
        y = accumulate(q, packed, k=k, tile_elements=tile_elements).astype(jnp.float32) * (s * alpha)
    else:
        y = accumulate(x.astype(ACT_DTYPES[act_dtype]), packed, k=k, tile_elements=tile_elements) * alpha
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
