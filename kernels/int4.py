"""Integer weights of deployed post-training-quantized models: 4-bit codes packed two per byte, and the XLA path
of the exact integer matmul (int8 activations × int8 or packed int4 weights → int32 accumulators).

Layout ``INT4_PACK_FORMAT = "terdit-int4-k2-v1"`` for a signed code matrix s (K, N) with values in [-8, 7] (the
Flax kernel layout: in, out):

* K is padded to ``Kp = int4_padded_k(K)``, a multiple of ``INT4_BLOCK_K`` (64), with code 0 (weight 0, so the
  padding adds nothing whatever the activations there).
* Block b of 64 rows owns packed rows [b*32, (b+1)*32): byte ``P[b*32 + r, n]`` holds s[b*64 + r, n] + 8 in its high
  nibble and s[b*64 + 32 + r, n] + 8 in its low one. A kernel that loads a (32, BN) byte tile gets two (32, BN)
  slices with one shift and one mask each, multiplying the contiguous activation columns [b*64, b*64 + 32) and
  [b*64 + 32, b*64 + 64), as the ternary layout (`packing.py`) does with its four quarters.
* Packed shape ``(Kp // 2, N)`` uint8; N is not padded.

``int_matmul_xla`` (the XLA path of ``ops.int_matmul``): int8 weights multiply in one ``dot_general`` with an int32 result (XLA:CPU's integer
GEMM, cuBLASLt's int8 tensor-core GEMM on a GPU); packed int4 weights are unpacked to int8 in column tiles of at
most ``TILE_ELEMENTS`` weights inside the matmul (as the ternary fallback does), so the unpacked matrix never
exists whole. Every output element is one integer dot over the whole K: exact, whatever the tiling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from terdit_kernels.reference import TILE_ELEMENTS, tile_columns

INT4_PACK_FORMAT = "terdit-int4-k2-v1"
INT4_BLOCK_K = 64  # K rows per layout block: two nibble fields × 32 packed rows
_HALF = INT4_BLOCK_K // 2


def int4_padded_k(k: int) -> int:
    """K rounded up to whole layout blocks."""
    if k <= 0:
        raise ValueError(f"K must be positive, got {k}.")
    return -(-k // INT4_BLOCK_K) * INT4_BLOCK_K


def pack_int4(codes) -> jax.Array:
    """Signed 4-bit codes (K, N) int8 in [-8, 7] → (int4_padded_k(K) // 2, N) uint8 in INT4_PACK_FORMAT."""
    if codes.ndim != 2 or codes.dtype != jnp.int8:
        raise ValueError(f"pack_int4 takes a 2-D int8 code matrix (K, N), got {codes.dtype}{codes.shape}")
    if not isinstance(codes, jax.core.Tracer):
        lo, hi = int(np.min(codes)), int(np.max(codes))
        if lo < -8 or hi > 7:
            raise ValueError(f"4-bit codes lie in [-8, 7]; these lie in [{lo}, {hi}]")
    k, n = codes.shape
    u = jnp.pad(codes.astype(jnp.int32) + 8, ((0, int4_padded_k(k) - k), (0, 0)), constant_values=8)
    u = u.reshape(-1, 2, _HALF, n)  # (blocks, half, row, N)
    return ((u[:, 0] << 4) | u[:, 1]).reshape(-1, n).astype(jnp.uint8)


def unpack_int4(packed, k: int) -> jax.Array:
    """(Kp // 2, N) uint8 → the signed codes (K, N) int8."""
    rows, n = packed.shape
    if packed.dtype != jnp.uint8 or rows * 2 != int4_padded_k(k):
        raise ValueError(f"a packed int4 matrix for K={k} has {int4_padded_k(k) // 2} uint8 rows, got "
                         f"{packed.dtype}{packed.shape}")
    p = packed.astype(jnp.int32).reshape(-1, 1, _HALF, n)
    halves = jnp.concatenate([(p >> 4) & 15, p & 15], axis=1)  # (blocks, 2, 32, N)
    return (halves.reshape(-1, n)[:k] - 8).astype(jnp.int8)


def _dot(x, w):
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _int4_accumulate(x, packed, k: int, tile_elements: int | None) -> jax.Array:
    m, n = x.shape[0], packed.shape[1]
    tn = tile_columns(k, n, tile_elements)
    if tn >= n:
        return _dot(x, unpack_int4(packed, k))

    def body(j, out):  # as reference.accumulate: equal static tiles, the last one shifted back to end at N
        start = jnp.minimum(j * tn, n - tn)
        cols = lax.dynamic_slice_in_dim(packed, start, tn, axis=1)
        return lax.dynamic_update_slice_in_dim(out, _dot(x, unpack_int4(cols, k)), start, axis=1)

    init = jnp.broadcast_to(x[0, 0].astype(jnp.int32), (m, n))  # depends on x: see reference.accumulate
    return lax.fori_loop(0, -(-n // tn), body, init)


def int_matmul_xla(x2, w, *, k: int, w_bits: int, tile_elements: int | None = TILE_ELEMENTS) -> jax.Array:
    """The XLA path of `ops.int_matmul` for x2 (M, K) int8: one integer dot (w_bits 8), or the int4 codes unpacked
    in column tiles (w_bits 4). → (M, N) int32, exact."""
    if w_bits == 8:
        if w.dtype != jnp.int8 or w.shape[0] != k:
            raise ValueError(f"8-bit weights are int8 (K={k}, N), got {w.dtype}{w.shape}")
        return _dot(x2, w)
    if w_bits == 4:
        return _int4_accumulate(x2, w, k, tile_elements)
    raise ValueError(f"w_bits is 8 (int8 codes) or 4 (packed int4 codes), got {w_bits}")
