"""Integer arithmetic of quantized sites: a site's tensor as integer codes, and products of two quantized operands
as integer matmuls with int32 accumulators and a float epilogue (the deployed PTQ models, `models/integer.py`).

A fake quantizer computes x̂ = Δ·(c − z) with integer codes c. `encode(site, x, t, axis)` returns those codes as
int8 `Part`s — x̂ = Σ_parts scale·(codes − zero) — with scale and zero broadcastable against x: one part for the
uniform quantizer, two for TQ-DiT's two-region quantizers (one per region, zero 0). Asymmetric b-bit codes
[0, 2^b − 1] are stored shifted by 2^(b−1) (zero shifted alike) so that 8-bit codes fit int8.

For operands a, b whose scale and zero are constant along the contracted axis k (per tensor, per row, per head,
per output channel), Σ_k (a − za)(b − zb) = Σ_k a·b − zb·Σ_k a − za·Σ_k b + K·za·zb: the first term is the integer
matmul, the others come from row/column sums, so the result is exact in int32 before one float multiply by
sa·sb. A site whose scale varies along k (per-input-channel steps) cannot be factored so: `encode` returns None and
the caller multiplies in float (and says so at export).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from terdit_jax.quant.quantizers import TwoRegionSigned, TwoRegionSoftmax, UniformQuantizer
from terdit_jax.quant.sites import quantize


class Part(NamedTuple):
    """One integer term of a quantized tensor (x̂ = Σ over its parts of scale·(codes − zero)): codes int8 of x's
    shape; scale (float32) and zero (int32) broadcastable against it."""
    codes: jax.Array
    scale: jax.Array
    zero: jax.Array


def code_offset(bits: int, symmetric: bool) -> int:
    """What stored codes are shifted by: 2^(b−1) for unsigned (asymmetric) levels, so they are signed."""
    return 0 if symmetric else 2 ** (bits - 1)


def _uniform(q: UniformQuantizer, x, t) -> tuple[Part, ...] | None:
    if q.bits > 8 or q.granularity in ("group", "block"):  # int8 containers; grouped steps vary along k
        return None
    xf = q.prepare(x)
    if q.dynamic:
        delta, zero = jax.lax.stop_gradient(q.range_params(xf, dynamic=True))
    else:
        delta, zero = q._select(q.delta[...], t, xf.ndim), q._select(q.zero[...], t, xf.ndim)
    # The fake quantizer's own operations in its order, so the codes are the very integers it used.
    codes = jnp.clip(jnp.round(xf / delta) + zero, q.lo, q.hi)
    off = code_offset(q.bits, q.symmetric)
    return (Part((codes - off).astype(jnp.int8), delta, (zero - off).astype(jnp.int32)),)


def _softmax_regions(q: TwoRegionSoftmax, x, t) -> tuple[Part, ...] | None:
    if q.bits > 8:
        return None
    xf = x.astype(jnp.float32)
    split = q._pick(q.split[...][..., None, None, None] if q.time_groups > 1 else q.split[...], t, xf.ndim)
    n = 2 ** (q.bits - 1) - 1
    d1, d2 = split / n, jnp.float32(1.0 / n)  # the steps of quantizers.two_region_softmax
    low = xf < split
    c1 = jnp.where(low, jnp.clip(jnp.round(xf / d1), 0, n), 0).astype(jnp.int8)
    c2 = jnp.where(low, 0, jnp.clip(jnp.round(xf / d2), 0, n)).astype(jnp.int8)
    zero = jnp.zeros((), jnp.int32)
    return Part(c1, jnp.asarray(d1, jnp.float32), zero), Part(c2, d2, zero)


def _signed_regions(q: TwoRegionSigned, x, t) -> tuple[Part, ...] | None:
    if q.bits > 8:
        return None
    xf = x.astype(jnp.float32)
    lift = (lambda p: p[:, None, None] if q.time_groups > 1 else p)
    delta = q._pick(lift(q.delta[...]), t, xf.ndim)
    neg = q.negative_step()
    neg = neg if q.fixed_negative else q._pick(lift(neg), t, xf.ndim)
    m = 2 ** (q.bits - 1)  # quantizers.two_region_signed: negative codes [−m, 0], positive [0, m − 1]
    zero = jnp.zeros((), jnp.int32)
    return (Part(jnp.clip(jnp.round(xf / neg), -m, 0).astype(jnp.int8), jnp.asarray(neg, jnp.float32), zero),
            Part(jnp.clip(jnp.round(xf / delta), 0, m - 1).astype(jnp.int8), jnp.asarray(delta, jnp.float32), zero))


ENCODERS = ((UniformQuantizer, _uniform), (TwoRegionSoftmax, _softmax_regions), (TwoRegionSigned, _signed_regions))


def _constant_along(p: Part, axis: int, ndim: int) -> bool:
    """Whether p's scale and zero (right-aligned against a rank-ndim tensor) have one value along `axis`."""
    axis %= ndim
    return all(axis < ndim - jnp.ndim(a) or jnp.shape(a)[axis - ndim + jnp.ndim(a)] == 1 for a in (p.scale, p.zero))


def encode(site, x: jax.Array, t, axis: int = -1) -> tuple[Part, ...] | None:
    """The integer parts of `site`(x), or None where they are not an integer operand of a product contracting
    `axis` (no site, a site kind without codes, more than 8 bits, or steps that vary along `axis`)."""
    fn = next((f for kind, f in ENCODERS if isinstance(site, kind)), None)
    parts = None if fn is None else fn(site, x, t)
    if parts is None or not all(_constant_along(p, axis, x.ndim) for p in parts):
        return None
    return parts


def integer_operand(site, shape: tuple, axis: int = -1, t_shape: tuple | None = None) -> bool:
    """Whether `site` gives integer codes for a product contracting `axis` of a tensor of `shape` (traced only)."""
    t = None if t_shape is None else jax.ShapeDtypeStruct(t_shape, jnp.int32)
    return jax.eval_shape(lambda x, tt: encode(site, x, tt, axis), jax.ShapeDtypeStruct(shape, jnp.float32),
                          t) is not None


def epilogue(acc, sa, za, sb, zb, sum_a, sum_b, k: int) -> jax.Array:
    """sa·sb·(acc − za·Σb − zb·Σa + K·za·zb): the product of two affine-coded operands from the int32 accumulator
    of their codes; the zero-point terms are integers and are added in int32 (exact), then one float scaling.
    Every argument is already broadcast-aligned to the output layout."""
    za, zb = za.astype(jnp.int32), zb.astype(jnp.int32)
    exact = acc - za * sum_b - zb * sum_a + k * za * zb
    return exact.astype(jnp.float32) * (sa * sb)


def _rank4(a) -> jax.Array:
    a = jnp.asarray(a)
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def qk_logits(q_parts, k_parts) -> jax.Array:
    """q·kᵀ (B, H, Tq, Tk) float32 from integer q, k (B, T, H, hd) whose steps are constant along hd."""
    out = 0.0
    for pq in q_parts:
        sq, zq = (jnp.transpose(_rank4(a), (0, 2, 1, 3)) for a in (pq.scale, pq.zero))  # → (B, H, Tq, 1)
        sum_q = jnp.transpose(pq.codes.sum(-1, dtype=jnp.int32), (0, 2, 1))[..., None]
        for pk in k_parts:
            sk, zk = (jnp.transpose(_rank4(a), (0, 2, 3, 1)) for a in (pk.scale, pk.zero))  # → (B, H, 1, Tk)
            sum_k = jnp.transpose(pk.codes.sum(-1, dtype=jnp.int32), (0, 2, 1))[..., None, :]
            acc = jnp.einsum("bqhd,bkhd->bhqk", pq.codes, pk.codes, preferred_element_type=jnp.int32)
            out = out + epilogue(acc, sq, zq, sk, zk, sum_q, sum_k, pq.codes.shape[-1])
    return out


def probs_values(p_parts, v_parts) -> jax.Array:
    """P·V (B, Tq, H, hd) float32 from integer probabilities (B, H, Tq, Tk), steps constant along Tk, and values
    (B, Tk, H, hd), steps constant along the tokens."""
    out = 0.0
    for pp in p_parts:
        sp, zp = (jnp.transpose(_rank4(a), (0, 2, 1, 3)) for a in (pp.scale, pp.zero))  # → (B, Tq, H, 1)
        sum_p = jnp.transpose(pp.codes.sum(-1, dtype=jnp.int32), (0, 2, 1))[..., None]
        for pv in v_parts:
            acc = jnp.einsum("bhqk,bkhd->bqhd", pp.codes, pv.codes, preferred_element_type=jnp.int32)
            sum_v = pv.codes.sum(1, keepdims=True, dtype=jnp.int32)  # (B, 1, H, hd)
            out = out + epilogue(acc, sp, zp, _rank4(pv.scale), _rank4(pv.zero), sum_p, sum_v, pp.codes.shape[-1])
    return out


def integer_attention(sites: tuple, q, k, v, t, mask=None) -> jax.Array | None:
    """softmax(q·kᵀ/√hd)·v (B, Tq, H, hd) with the quantized products as integer matmuls, or None where q and k are
    not integer operands (the caller then runs the float attention). q is scaled by 1/√hd before its site, as the
    fake-quantized model does (`models.layers.quantize_qkv`); the softmax runs in float32, over the keys where
    mask (B, Tk) is not 0."""
    q_site, k_site, v_site, probs_site, scores_site = sites
    if scores_site is not None:
        return None
    qs = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    q_parts, k_parts = encode(q_site, qs, t, axis=3), encode(k_site, k, t, axis=3)
    if q_parts is None or k_parts is None:
        return None
    logits = qk_logits(q_parts, k_parts)
    if mask is not None:  # a caption's padding keys (see models.layers.key_mask)
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    p_parts, v_parts = encode(probs_site, probs, t, axis=3), encode(v_site, v, t, axis=1)
    if p_parts is None or v_parts is None:
        p_hat, v_hat = quantize(probs_site, probs, t), quantize(v_site, v, t)
        return jnp.einsum("bhqk,bkhd->bqhd", p_hat.astype(v.dtype), v_hat)
    return probs_values(p_parts, v_parts).astype(v.dtype)
