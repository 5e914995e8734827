"""Pallas packed-ternary matmul (W2A16 and W2A8), written for the Pallas Triton GPU backend.

The kernel computes one (BM, BN) output tile per program over a grid (M/BM, N/BN, S). Each program walks
its share of K (all of it, or 1/S of it with split-K) one layout block (``PACK_BLOCK_K`` = 128 rows) at a
time: it loads a (32, BN) uint8 tile, turns each of its four 2-bit fields into a (32, BN) weight slice
in registers (shift, mask, minus 1; see ``packing``), and feeds each slice to ``jnp.dot`` against the
matching (BM, 32) activation slice, which is loaded straight from its own columns (Triton cannot slice a
loaded value, so the layout puts each quarter's activations contiguously instead).

* W2A16: bf16 (or f32) activations, weights converted to the same dtype, f32 accumulation.
* W2A8: int8 activations (per-token absmax, done by XLA before the call), int8 x int8 -> int32.

With S == 1 the epilogue ``acc * row_scale + bias`` runs in the kernel and the output is written in its
final dtype; with S > 1 (used for small M so enough programs exist to fill the GPU) each split writes a
raw f32/int32 partial, and XLA sums them and applies the same epilogue.

Triton constraints honoured: every loaded/stored tile is a power-of-two size; ``jnp.dot`` operands are
>= 16 in each dim (BM >= 16, BN >= 16, 32 rows of K); ragged M / N are padded by the wrapper and sliced
back, so no masked loads are needed; dot operands are signed (uint8 codes are converted before the dot).
Pallas >= 0.9 routes GPU kernels to Mosaic GPU by default, so we select Triton explicitly with
``jax.experimental.pallas.triton.CompilerParams`` (jax_practice.md section 4). On CPU the same kernel runs
with ``interpret=True``. Block configs are first guesses, not tuned on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from terdit_kernels.blocks import BlockConfig, check_config, choose_config
from terdit_kernels.packing import PACK_BLOCK_K, check_k
from terdit_kernels.reference import ACT_DTYPES, quantize_activations

_Q = PACK_BLOCK_K // 4  # packed rows per layout block == activation columns per quarter
_SHIFTS = (6, 4, 2, 0)


def _kernel(x_ref, p_ref, *rest, nkb: int, int8: bool, fused: bool, has_bias: bool):
    """One (BM, BN) tile. x_ref (BM, Kc); p_ref (Kc/4, BN) uint8; then [rs_ref (BM,1), [b_ref (1,BN)]], o_ref."""
    o_ref = rest[-1]
    bm, bn = x_ref.shape[0], p_ref.shape[1]
    acc_dtype = jnp.int32 if int8 else jnp.float32

    def body(b, acc):
        p = p_ref[pl.ds(pl.multiple_of(b * _Q, _Q), _Q), :]  # (32, BN) uint8, 4 codes per byte
        for q, shift in enumerate(_SHIFTS):
            w = ((p >> shift) & 3).astype(jnp.int8) - jnp.int8(1)  # (32, BN) in {-1,0,1}
            col = pl.multiple_of(b * PACK_BLOCK_K + q * _Q, _Q)
            xs = x_ref[:, pl.ds(col, _Q)]  # (BM, 32), the activations of quarter q
            if not int8:
                w = w.astype(xs.dtype)
            acc = acc + jnp.dot(xs, w, preferred_element_type=acc_dtype)
        return acc

    acc = jax.lax.fori_loop(0, nkb, body, jnp.zeros((bm, bn), acc_dtype))
    if fused:
        y = acc.astype(jnp.float32) * rest[0][...]  # (BM, 1) row scale: alpha, or s_row * alpha for W2A8
        if has_bias:
            y = y + rest[1][...]
        o_ref[...] = y.astype(o_ref.dtype)
    else:
        o_ref[...] = acc


def _call(xa, packed, row_scale, bias, *, cfg: BlockConfig, out_dtype, raw: bool, interpret: bool):
    """Run the kernel on padded operands: xa (Mp, Kp), packed (Kp/4, Np), row_scale (Mp, 1), bias (1, Np)."""
    mp, kp = xa.shape
    np_ = packed.shape[1]
    s = cfg.split_k
    kc = kp // s
    int8 = xa.dtype == jnp.int8
    fused = not raw and s == 1
    grid = (mp // cfg.bm, np_ // cfg.bn, s)
    in_specs = [pl.BlockSpec((cfg.bm, kc), lambda i, j, t: (i, t)),
                pl.BlockSpec((kc // 4, cfg.bn), lambda i, j, t: (t, j))]
    args = [xa, packed]
    if fused:
        in_specs.append(pl.BlockSpec((cfg.bm, 1), lambda i, j, t: (i, 0)))
        args.append(row_scale)
        if bias is not None:
            in_specs.append(pl.BlockSpec((1, cfg.bn), lambda i, j, t: (0, j)))
            args.append(bias)
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
        out_spec = pl.BlockSpec((cfg.bm, cfg.bn), lambda i, j, t: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((s, mp, np_), jnp.int32 if int8 else jnp.float32)
        out_spec = pl.BlockSpec((None, cfg.bm, cfg.bn), lambda i, j, t: (t, i, j))
    kernel = functools.partial(_kernel, nkb=kc // PACK_BLOCK_K, int8=int8, fused=fused,
                               has_bias=fused and bias is not None)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="ternary_matmul_w2a8" if int8 else "ternary_matmul_w2a16",
    )(*args)


def pallas_ternary_matmul(x, packed, alpha, *, k: int, bias=None, act_dtype: str = "bf16",
                          out_dtype=None, config: BlockConfig | None = None, interpret: bool = False,
                          return_accumulator: bool = False) -> jax.Array:
    """y = x @ (alpha * W_t) (+ bias) with the Pallas kernel; same arithmetic as ``reference``.

    Args:
      x: (M, K) float activations.
      packed: (padded_k(K) // 4, N) uint8 (``packing.pack``).
      alpha: scalar or (1,) per-layer scale.
      k: unpadded K.
      bias: optional (N,).
      act_dtype: 'bf16' / 'f32' (W2A16) or 'int8' (W2A8, per-token absmax).
      out_dtype: defaults to x.dtype.
      config: block config; ``choose_config`` when None.
      interpret: run through the Pallas interpreter (CPU tests).
      return_accumulator: return the raw (M, N) accumulator (int32 for W2A8, f32 otherwise) instead of y,
        to compare the integer path exactly.
    Returns:
      (M, N) array.
    """
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be one of {sorted(ACT_DTYPES)}, got {act_dtype!r}.")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K={k}), got {x.shape}.")
    check_k(packed.shape[0], k)
    m, n = x.shape[0], packed.shape[1]
    kp = 4 * packed.shape[0]
    cfg = config or choose_config(m, n, kp)
    check_config(cfg, kp)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    alpha = jnp.asarray(alpha, jnp.float32).reshape(())

    if act_dtype == "int8":
        xa, s = quantize_activations(x)
        row_scale = s * alpha  # same f32 product as the reference epilogue
    else:
        xa = x.astype(ACT_DTYPES[act_dtype])
        row_scale = jnp.broadcast_to(alpha, (m, 1))
    mp = -(-m // cfg.bm) * cfg.bm
    np_ = -(-n // cfg.bn) * cfg.bn
    # Zero rows/columns of activations and code-1 (weight 0, byte 0x55) weight columns are inert.
    xa = jnp.pad(xa, ((0, mp - m), (0, kp - k)))
    row_scale = jnp.pad(row_scale, ((0, mp - m), (0, 0)))
    packed = jnp.pad(packed, ((0, 0), (0, np_ - n)), constant_values=0x55)
    b = None if bias is None else jnp.pad(bias.astype(jnp.float32), (0, np_ - n)).reshape(1, np_)

    raw = return_accumulator or cfg.split_k > 1
    out = _call(xa, packed, row_scale, b, cfg=cfg, out_dtype=out_dtype, raw=raw, interpret=interpret)
    if not raw:
        return out[:m, :n]
    acc = out.sum(axis=0)[:m, :n]
    if return_accumulator:
        return acc
    y = acc.astype(jnp.float32) * row_scale[:m]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
