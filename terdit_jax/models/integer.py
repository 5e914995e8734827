"""Integer linear layers of deployed post-training-quantized models (the linear kind "int").

A PTQ model (RTN, PTQ4DiT, TQ-DiT) computes with fake-quantized weights ŵ = Δw·(u − zw) and inputs
x̂ = Σ_parts Δa·(a − za) (quant/integer.py). Deployed (`model.deployed`), each linear whose weight a site rule
quantizes is an `IntDense` that holds the integer codes u (int8 for 5–8 bits; two 4-bit codes per byte in
`terdit_kernels.INT4_PACK_FORMAT` for 2–4 bits) with per-output-channel Δw, zw and Σ_k u, and multiplies the
input's int8 codes with them: an int32 accumulator from `terdit_kernels.int_matmul` (XLA's int8 dot, the
Triton W4A8 kernel on a GPU), then the zero-point terms and one float scaling (`quant.integer.epilogue`). Where
the input has no integer codes (activations in full precision, W·A16; or an input site whose steps vary along
K) the layer multiplies x̂ with its dequantized weight in the compute dtype, as the fake-quantized layer did.

The stored codes are shifted to signed: asymmetric b-bit codes [0, 2^b − 1] by 2^(b−1) (zw alike), symmetric
ones are signed already (`quant.integer.code_offset`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import terdit_kernels
from terdit_jax.models.packed import wait_for
from terdit_jax.quant.integer import code_offset, encode, epilogue
from terdit_jax.quant.quantizers import QuantState, UniformQuantizer
from terdit_jax.quant.sites import quantize


class IntCodes(nnx.Variable):
    """Integer weight codes and their column sums (not `nnx.Param`: nothing trains them)."""


def container_bits(w_bits: int) -> int:
    """Bits per stored code: 4 (two codes per byte) for 2–4-bit weights, 8 (int8) for 5–8 bits."""
    if not 2 <= w_bits <= 8:
        raise ValueError(f"integer weights have 2 to 8 bits, not {w_bits}")
    return 4 if w_bits <= 4 else 8


def stored_shape(k: int, n: int, w_bits: int) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of the stored codes of a (K, N) weight."""
    if container_bits(w_bits) == 8:
        return (k, n), np.dtype(np.int8)
    s = jax.eval_shape(terdit_kernels.pack_int4, jax.ShapeDtypeStruct((k, n), jnp.int8))
    return tuple(s.shape), np.dtype(s.dtype)


def weight_codes(q: UniformQuantizer, w) -> dict | None:
    """The integer form of weight quantizer `q` applied to w (K, N): {"codes" stored, "w_scale" (N,) float32,
    "w_zero" (N,) int32, "colsum" (N,) int32}, computed with the fake quantizer's own operations (nearest rounding:
    AdaRound's choice is already in w). None where the steps vary along K (per-input-group steps)."""
    k, n = w.shape
    view = q._view(q.prepare(jnp.asarray(w)))
    delta, zero = jnp.broadcast_to(q.delta[...], view.shape), jnp.broadcast_to(q.zero[...], view.shape)
    delta, zero = np.asarray(delta.reshape(k, n)), np.asarray(zero.reshape(k, n))
    if not ((delta == delta[:1]).all() and (zero == zero[:1]).all()):
        return None
    codes = np.asarray(jnp.clip(jnp.round(view / q.delta[...]) + q.zero[...], q.lo, q.hi)).reshape(k, n)
    off = code_offset(q.bits, q.symmetric)
    signed = (codes - off).astype(np.int8)
    stored = signed if container_bits(q.bits) == 8 else np.asarray(terdit_kernels.pack_int4(jnp.asarray(signed)))
    return {"codes": stored, "w_scale": delta[0].astype(np.float32), "w_zero": (zero[0] - off).astype(np.int32),
            "colsum": signed.astype(np.int32).sum(0)}


class IntDense(nnx.Module):
    """Deployed integer linear y = x̂·ŵ (+ b). Built like `Dense` from the site rules (the weight site says the
    bits; its quantizer is not kept), values from an export (`ptq.deploy`).

    Variables: codes (`stored_shape`), w_scale (N,) float32, w_zero (N,) int32, colsum (N,) int32 (Σ_k of the
    signed codes), bias (N,) or None; input_site / output_site as in `Dense`.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, input_site=None, weight_site=None, output_site=None,
                 backend: str = "auto"):
        if not isinstance(weight_site, UniformQuantizer):
            raise ValueError("an integer linear needs a uniform weight quantizer (its bits and zero point)")
        self.k, self.n, self.w_bits, self.dtype, self.backend = in_features, out_features, weight_site.bits, dtype, backend
        shape, dt = stored_shape(in_features, out_features, self.w_bits)
        self.codes = IntCodes(jnp.zeros(shape, dt))
        self.w_scale = QuantState(jnp.ones((out_features,), jnp.float32))
        self.w_zero = IntCodes(jnp.zeros((out_features,), jnp.int32))
        self.colsum = IntCodes(jnp.zeros((out_features,), jnp.int32))
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=axes[1:]) if use_bias else None
        self.input_site, self.output_site = input_site, output_site

    def signed_codes(self, codes=None) -> jax.Array:
        """(K, N) int8 codes (unpacked)."""
        c = self.codes[...] if codes is None else codes
        return c if container_bits(self.w_bits) == 8 else terdit_kernels.unpack_int4(c, self.k)

    def weight(self, codes=None) -> jax.Array:
        """The dequantized weight Δw·(u − zw) (K, N) float32, what the fake-quantized layer multiplied with."""
        return (self.signed_codes(codes).astype(jnp.float32) - self.w_zero[...]) * self.w_scale[...]

    def accumulate(self, a: jax.Array, codes=None) -> jax.Array:
        """int32 Σ_k a[m, k]·u[k, n] for int8 codes a (M, K)."""
        return terdit_kernels.int_matmul(a, self.codes[...] if codes is None else codes, k=self.k,
                                         w_bits=container_bits(self.w_bits), backend=self.backend)

    def _codes_after(self, x: jax.Array, unpacked: bool) -> jax.Array:
        """The codes, made to wait for the layer input x where XLA would otherwise expand them (unpack, dequantize)
        for every layer at program start, as XLA:CPU does (`models.packed._after_input`): the weight-only path, and
        int4 codes the XLA matmul unpacks in one piece (not the GPU's Triton kernel, which never unpacks them)."""
        c = self.codes[...]
        one_piece = terdit_kernels.tile_columns(self.k, self.n) >= self.n
        on_xla = self.backend == "xla" or jax.default_backend() != "gpu"
        if unpacked or (container_bits(self.w_bits) == 4 and one_piece and on_xla):
            return wait_for(c, x)
        return c

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        return quantize(self.output_site, self.forward(x, t), t)

    def forward(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        parts = encode(self.input_site, x, t, axis=-1)
        if parts is None:  # full-precision input: weight-only quantization
            w = self.weight(self._codes_after(x, unpacked=True))
            y = jnp.dot(quantize(self.input_site, x, t).astype(self.dtype), w.astype(self.dtype))
        else:
            lead, y, codes = x.shape[:-1], 0.0, self._codes_after(x, unpacked=False)
            for p in parts:
                a = p.codes.reshape(-1, self.k)
                sa, za = (jnp.broadcast_to(v, lead + (1,)).reshape(-1, 1) for v in (p.scale, p.zero))
                y = y + epilogue(self.accumulate(a, codes), sa, za, self.w_scale[...], self.w_zero[...],
                                 a.sum(-1, keepdims=True, dtype=jnp.int32), self.colsum[...], self.k)
            y = y.reshape(*lead, self.n).astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)
