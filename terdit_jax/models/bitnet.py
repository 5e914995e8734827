"""BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764) adapted to DiT: the QAT baseline of the TerDiT paper (§3.3
remark, §4.2), the linear kind "bitnet" (`models.linears.LINEAR_KINDS`).

BitLinear, as the b1.58 paper and its training-tips code define it, differs from TerDiT's ternary layer in three
places:

* weights: W_t = RoundClip(W / (γ + ε), −1, 1) with γ = mean|W| (b1.58 eq. 1–3; the same `absmean_ternary` as
  TerDiT, so both export to the same codes), scaled by γ itself instead of a learned α; the straight-through
  estimator is the identity from the effective weight γ·W_t to W (the code's `w + (quant(w) − w).detach()`),
  with nothing through γ;
* activations: per-token absmax 8-bit (act_bits=8; b1.58 §2: scaled to [−Q_b, Q_b], Q_b = 127, per token,
  symmetric, rounded as its code rounds), identity STE. The quantizer and the integer arithmetic are the packed
  kernel's W2A8 path (`ternary.int8_linear`: s = max|x|/127, q = clip(round(x/s), ±127); the code's
  round(x·127/max|x|) differs from it only where x·127/max|x| lies within a rounding error of a half-integer),
  so a BitNet model trains with exactly what its packed deployment computes;
* a norm inside the layer, on its input, before activation quantization (`norm`):
  - "rms" (the default): a parameter-free RMSNorm, as the b1.58 training-tips code writes it (a fresh
    `RMSNorm(x)` inside `BitLinear.forward`, whose weight is never trained); RMSNorm is also the norm of the
    LLaMA-style backbone (Large-DiT) whose pre-norms it replaces;
  - "layer": BitNet v1's LayerNorm (Wang et al. 2023, arXiv 2310.11453: (x − E[x]) / sqrt(Var[x] + ε), no
    affine), its "SubLN" before the absmax quantization.
  Both are parameter-free, so every block's adaLN BitLinear sees the same normalised silu(c) and the packed
  deployment still computes all blocks' adaLN in one matmul (`packed.StackedAdaLN`).

The TerDiT paper's baseline also removes the norms before attention and SwiGLU (`model.pre_norms=False`, in
`models/dit.py`). The norm then sits where the paper puts it: inside every BitLinear, on the input the layer
receives, i.e. after the adaLN modulation x·(1 + scale) + shift. Keeping the pre-norms as well
(`pre_norms=True`) is the other placement the paper leaves open. act_bits=16 gives a BitLinear without activation
quantization (W1.58A16, an ablation: γ instead of α, plus the norms).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from terdit_jax.models.ternary import ACT_BITS, Dense, absmean_ternary, int8_accumulate, int8_linear, token_matmul
from terdit_jax.quant.sites import SiteError, quantize


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) over the last axis, in float32, back to x.dtype (no weight)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """(x − mean) / sqrt(var + eps) over the last axis, in float32, back to x.dtype (no affine; BitNet v1)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


INPUT_NORMS = {"rms": rms_norm, "layer": layer_norm}
BITNET_NORMS = tuple(INPUT_NORMS)  # the values of model.bitnet_norm


def input_norm(kind: str | None, x: jax.Array, eps: float) -> jax.Array:
    """BitLinear's norm `kind` ('rms', 'layer') of x (..., K); None = identity (a TerDiT layer)."""
    return x if kind is None else INPUT_NORMS[kind](x, eps)


def bitnet_gamma(w: jax.Array) -> jax.Array:
    """γ = mean|W| over the whole matrix, float32 (): the scale of a BitLinear weight and of its packed export."""
    return jnp.mean(jnp.abs(w.astype(jnp.float32)))


@jax.custom_vjp
def bitnet_weight(w: jax.Array) -> jax.Array:
    """Effective BitLinear weight γ·W_t (K, N) float32, with the identity straight-through estimator ∂L/∂W = ∂L/∂w
    (b1.58 code: w + (weight_quant(w) − w).detach(); γ is detached, so no gradient flows through it)."""
    return bitnet_gamma(w) * absmean_ternary(w)


def _bitnet_weight_fwd(w):
    return bitnet_weight(w), None


def _bitnet_weight_bwd(_, g):
    return (g,)


bitnet_weight.defvjp(_bitnet_weight_fwd, _bitnet_weight_bwd)


class BitLinear(Dense):
    """BitNet b1.58 linear: norm(x) → [per-token int8] → ·(γ·W_t) (+ b). kernel (K, N) float32 latent, bias (N,).

    No α: γ is computed from the kernel. Same constructor as `Dense` plus `norm` ('rms' | 'layer'), `eps` (the
    norm's) and `act_bits` (8: BitNet b1.58, the int8 arithmetic of `ternary.int8_linear`; 16: the input stays in
    `dtype`). The input site acts on the raw input, before the norm; a weight site is refused (the weight is
    ternary by construction).
    """

    def __init__(self, in_features: int, out_features: int, *, norm: str = "rms", eps: float = 1e-5,
                 act_bits: int = 8, **kw):
        if norm not in INPUT_NORMS:
            raise ValueError(f"BitLinear norm must be one of {BITNET_NORMS}, got {norm!r}")
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be one of {ACT_BITS}, got {act_bits!r}")
        super().__init__(in_features, out_features, **kw)
        if self.weight_site is not None:
            raise SiteError("a BitLinear weight is ternary by construction; no site rule may quantize it "
                            "(quantize its input instead)")
        self.norm, self.eps, self.act_bits = norm, float(eps), int(act_bits)

    def weight(self) -> jax.Array:
        return bitnet_weight(self.kernel[...])

    def codes(self) -> jax.Array:
        """W_t (K, N) float32 in {−1, 0, 1}: what the packed export stores (its α is `scale()`)."""
        return absmean_ternary(self.kernel[...])

    def scale(self) -> jax.Array:
        return bitnet_gamma(self.kernel[...])

    def normed(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """The tensor the layer quantizes and multiplies: norm(input_site(x)), (..., K) in x.dtype."""
        return input_norm(self.norm, quantize(self.input_site, x, t), self.eps)

    def forward(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (..., K) → (..., N) in `dtype`. t (B,): timesteps, for time-aware input quantizers only."""
        h = self.normed(x, t)
        if self.act_bits == 8:
            return int8_linear(h, self.weight(), self.codes(), self.scale(),
                               None if self.bias is None else self.bias[...], self.dtype)
        y = token_matmul(h.astype(self.dtype), self.weight().astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def accumulator(self, x: jax.Array) -> jax.Array:
        """act_bits=8: the int32 accumulators (M, N) for the layer input x (..., K) (after the input site)."""
        h = input_norm(self.norm, x, self.eps)
        return int8_accumulate(h.reshape(-1, h.shape[-1]).astype(self.dtype), self.codes())[0]
