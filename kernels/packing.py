"""Packed 2-bit ternary weights: our kernel layout and conversion from the official hqq format.

A ternary linear computes ``y = x @ (alpha * W_t)`` with ``W_t`` int8 in {-1, 0, 1} of shape (K, N)
(Flax kernel layout: in, out). We store the code ``u = W_t + 1`` in {0, 1, 2} (3 is never written),
four codes per uint8, packed along K.

Layout ``PACK_FORMAT = "terdit-k4-v1"``:

* K is zero-padded to ``Kp = padded_k(K)``, a multiple of ``PACK_BLOCK_K`` (128). Padding rows hold code 1,
  i.e. weight 0, so they add nothing whatever the padded activations are. K itself is not stored in the
  array; the caller keeps it next to the packed weight (the checkpoint stores it as metadata).
* K is cut into blocks of ``PACK_BLOCK_K`` rows. Block ``b`` owns packed rows ``[b*32, (b+1)*32)``; inside
  it, the four 2-bit fields of byte ``P[b*32 + r, n]`` hold the four contiguous quarters of the block::

      bits 7-6 : u[b*128 +  0 + r, n]
      bits 5-4 : u[b*128 + 32 + r, n]
      bits 3-2 : u[b*128 + 64 + r, n]
      bits 1-0 : u[b*128 + 96 + r, n]

  (the hqq quarter scheme, MSB first, applied per K-block). A kernel that loads a (32, BN) byte tile
  gets four (32, BN) weight slices with one shift and one mask each; slice q multiplies the contiguous
  activation columns ``[b*128 + 32*q, b*128 + 32*(q+1))``. No interleave shuffles are needed, and a
  K-shard that starts on a block boundary is a contiguous range of packed rows (row-parallel sharding).
* Packed shape: ``(Kp // 4, N)`` uint8; N is not padded.

The official TerDiT checkpoints (hqq ``pack_2bit_u8``, see terdit_official.md section 5) store the torch
``(out, in)`` weight packed along *out* in four global quarters; ``from_hqq`` / ``to_hqq`` convert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PACK_FORMAT = "terdit-k4-v1"
PACK_BLOCK_K = 128  # K rows per layout block; 4 fields x 32 packed rows
_Q = PACK_BLOCK_K // 4  # rows per quarter = packed rows per block
_SHIFTS = (6, 4, 2, 0)  # quarter q lives in bits [SHIFTS[q]+1 : SHIFTS[q]]


def padded_k(k: int) -> int:
    """K rounded up to a whole number of layout blocks."""
    if k <= 0:
        raise ValueError(f"K must be positive, got {k}.")
    return -(-k // PACK_BLOCK_K) * PACK_BLOCK_K


def _check_ternary(w) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D ternary weight (K, N), got shape {w.shape}.")
    if not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"ternary weight must be an integer array with values in {{-1,0,1}}, got {w.dtype}; "
                        "quantize it first (W_t = clip(round(W / (mean|W| + 1e-6)), -1, 1)).")
    if not isinstance(w, jax.core.Tracer):  # values can only be checked on concrete arrays
        lo, hi = int(np.min(w)), int(np.max(w))
        if lo < -1 or hi > 1:
            raise ValueError(f"ternary weight has values in [{lo}, {hi}]; expected only -1, 0, 1.")


def pack(w_t) -> jax.Array:
    """Pack a ternary (K, N) int matrix into ``(padded_k(K) // 4, N)`` uint8 (layout in module docstring)."""
    if not isinstance(w_t, (np.ndarray, jax.Array)):
        w_t = np.asarray(w_t)
    _check_ternary(w_t)
    k, n = w_t.shape
    kp = padded_k(k)
    u = (jnp.asarray(w_t, jnp.int32) + 1).astype(jnp.uint8)
    u = jnp.pad(u, ((0, kp - k), (0, 0)), constant_values=1)  # code 1 == weight 0
    u = u.reshape(kp // PACK_BLOCK_K, 4, _Q, n)
    p = (u[:, 0] << 6) | (u[:, 1] << 4) | (u[:, 2] << 2) | u[:, 3]
    return p.reshape(kp // 4, n).astype(jnp.uint8)


def unpack_codes(packed) -> jax.Array:
    """Inverse of the bit packing: (Kp/4, N) uint8 -> (Kp, N) uint8 codes in {0,1,2} (padding included)."""
    packed = jnp.asarray(packed)
    if packed.ndim != 2 or packed.dtype != jnp.uint8 or packed.shape[0] % _Q:
        raise ValueError(f"packed weight must be uint8 of shape (Kp/4, N) with Kp/4 a multiple of {_Q}, "
                         f"got {packed.dtype}{tuple(packed.shape)}; was it made by terdit_kernels.packing.pack?")
    rows, n = packed.shape
    p = packed.reshape(rows // _Q, 1, _Q, n)
    shifts = jnp.asarray(_SHIFTS, jnp.uint8).reshape(1, 4, 1, 1)
    return ((p >> shifts) & 3).reshape(rows * 4, n)


def check_k(packed_rows: int, k: int) -> None:
    """Raise if ``k`` does not belong to a packed array with ``packed_rows`` rows."""
    if padded_k(k) != 4 * packed_rows:
        raise ValueError(f"K={k} does not match the packed weight: {packed_rows} packed rows hold "
                         f"Kp={4 * packed_rows}, but K={k} pads to {padded_k(k)}. Pass the K used at pack time.")


def unpack(packed, k: int) -> jax.Array:
    """(Kp/4, N) uint8 -> ternary (K, N) int8 in {-1, 0, 1}; ``k`` is the unpadded in-features."""
    check_k(jnp.shape(packed)[0], k)
    return unpack_codes(packed)[:k].astype(jnp.int8) - jnp.int8(1)


def _hqq_unpack_codes(p) -> jax.Array:
    """Official hqq ``unpack_2bit_u8``: (R/4, C) -> (R, C) codes, quarter q of the rows from bits 7-6 .. 1-0."""
    return jnp.concatenate([(p >> s) & 3 for s in _SHIFTS], axis=0)


def from_hqq(p_official, out_features: int) -> jax.Array:
    """Official TerDiT packed weight -> our packed weight for the Flax (in=C, out=R) kernel.

    Args:
      p_official: (R/4, C) uint8, the torch Linear weight (R=out, C=in) packed by hqq ``pack_2bit_u8``
        (terdit_official.md section 5: P[i, j] = u[i]<<6 | u[i+s]<<4 | u[i+2s]<<2 | u[i+3s], s = R/4).
      out_features: R, checked against the array so a wrong key or transposed tensor fails loudly.
    Returns:
      (padded_k(C) // 4, R) uint8 in ``PACK_FORMAT``; use ``k=C`` with it.
    """
    p = jnp.asarray(p_official)
    if p.ndim != 2 or p.dtype != jnp.uint8:
        raise ValueError(f"official packed weight must be 2-D uint8, got {p.dtype}{tuple(p.shape)}.")
    if 4 * p.shape[0] != out_features:
        raise ValueError(f"official packed weight has {p.shape[0]} rows, i.e. {4 * p.shape[0]} out features, "
                         f"but out_features={out_features}; pass the layer's out features (torch weight dim 0).")
    codes = _hqq_unpack_codes(p)
    if not isinstance(codes, jax.core.Tracer) and int(jnp.max(codes)) > 2:
        raise ValueError("official packed weight contains code 3, which is not a ternary value; "
                         "is this really a TerDiT `*.weight` uint8 buffer?")
    w_t = codes.astype(jnp.int8) - jnp.int8(1)  # (R, C) torch layout
    return pack(w_t.T)


def to_hqq(packed, k: int) -> jax.Array:
    """Our packed (Kp/4, N) weight -> official hqq (N/4, K) uint8 (torch (out=N, in=K) layout); N % 4 == 0."""
    w_t = unpack(packed, k)  # (K, N)
    n = w_t.shape[1]
    if n % 4:
        raise ValueError(f"the hqq format packs out features in quarters and needs N % 4 == 0, got N={n}.")
    u = (w_t.T.astype(jnp.int32) + 1).astype(jnp.uint8).reshape(4, n // 4, k)
    return ((u[0] << 6) | (u[1] << 4) | (u[2] << 2) | u[3]).astype(jnp.uint8)
