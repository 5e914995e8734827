"""Quantizer kinds: the modules a quantization site holds (quant/sites.py builds them by name).

Every kind is constructed as `Kind(path=..., shape=..., **settings)` and called as `q(x, t)`:
x the site's tensor, t (B,) int timesteps of the batch rows (None outside the denoiser), returning a tensor of
x's shape and dtype. `shape` is the site tensor's shape with None for the axes unknown when the model is built
(batch, tokens); the layouts are listed in quant/sites.py. A quantizer keeps its calibrated values in
`QuantState` variables, so they checkpoint with Orbax beside the parameters and a filter tells them apart
from trainable `nnx.Param`s and from calibration statistics (`nnx.Intermediate`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.registry import Registry


class QuantState(nnx.Variable):
    """Quantizer state (step sizes, zero points, rounding variables, split points)."""


# ------------------------------------------------------------------------------------------ uniform affine

GRANULARITIES = ("tensor", "channel", "token", "group", "block")
INITS = ("minmax", "mse")
PERCENTILES = (0.999, 0.9999, 0.99999)  # the percentile-MSE candidates of Q-Diffusion / PTQ4DiT
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch (Nagel et al. 2020; PTQ4DiT's constants)
ROUNDINGS = ("nearest", "soft", "hard")


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) forward, identity backward (the straight-through estimator of Q-Diffusion's `round_ste`)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer levels: symmetric signed [−2^(b−1), 2^(b−1)−1], asymmetric [0, 2^b−1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def clip_ste(v: jax.Array, lo, hi) -> jax.Array:
    """clip(v, lo, hi) whose gradient is 1 on [lo, hi] (boundaries included, as torch.clamp) and 0 outside."""
    return jnp.where((v >= lo) & (v <= hi), v, jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def fake_quant(x, delta, zero, lo: int, hi: int) -> jax.Array:
    """Δ·(clip(⌊x/Δ⌉ + z, lo, hi) − z) with straight-through rounding (gradients reach x inside the range, and Δ)."""
    return (clip_ste(round_ste(x / delta) + zero, lo, hi) - zero) * delta


def rectified_sigmoid(alpha: jax.Array) -> jax.Array:
    """AdaRound's h(α) = clip(σ(α)(ζ − γ) + γ, 0, 1)."""
    return jnp.clip(jax.nn.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def affine_params(lower, upper, bits: int, symmetric: bool, zero_point: bool = True):
    """(Δ, z) that map [lower, upper] onto the integer levels (asymmetric) or ±max(|lower|, |upper|) (symmetric);
    without `zero_point` (unsigned tensors such as softmax probabilities) z = 0 and the range is [0, upper]."""
    if symmetric:
        delta = jnp.maximum(jnp.abs(lower), jnp.abs(upper)) / (2 ** (bits - 1) - 1)
        return jnp.maximum(delta, 1e-8), jnp.zeros_like(delta)
    if not zero_point:
        return jnp.maximum(upper / (2 ** bits - 1), 1e-8), jnp.zeros_like(upper)
    delta = jnp.maximum((upper - lower) / (2 ** bits - 1), 1e-8)
    return delta, jnp.round(-lower / delta)


def select_group(p: jax.Array, table: jax.Array, t, ndim: int) -> jax.Array:
    """TGQ: row b of a batch takes the parameters of time group table[t_b]. p (G, *ps) → (B, ...) broadcastable
    against a rank-`ndim` tensor whose first axis is the batch (ps aligned to its trailing axes)."""
    if t is None:
        raise ValueError("a time-grouped quantizer needs the timesteps of the batch")
    sel = p[table[t]]  # (B, *ps)
    ps = p.shape[1:]
    tail = ps[len(ps) - (ndim - 1):] if ndim - 1 <= len(ps) else (1,) * (ndim - 1 - len(ps)) + ps
    return sel.reshape((sel.shape[0],) + tuple(tail))


@functools.partial(jax.jit, static_argnames=("red", "bits", "symmetric", "zero_point", "init"))
def range_params(x: jax.Array, *, red: tuple[int, ...], bits: int, symmetric: bool, zero_point: bool, init: str):
    """(Δ, z) of tensor x (keepdims over the axes `red`): min-max, or percentile-MSE — the candidate clip range
    [quantile(1 − p), quantile(p)], p ∈ PERCENTILES, with the smallest mean squared error (Q-Diffusion / PTQ4DiT)."""
    lo_level, hi_level = int_range(bits, symmetric)
    if init == "minmax":
        lo, hi = jnp.min(x, axis=red, keepdims=True), jnp.max(x, axis=red, keepdims=True)
        if zero_point:  # the official "max" rule keeps 0 representable
            lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        return affine_params(lo, hi, bits, symmetric, zero_point)
    keep = tuple(1 if i in red else n for i, n in enumerate(x.shape))
    flat = jnp.moveaxis(x, red, tuple(range(len(red)))).reshape(math.prod(x.shape[i] for i in red), -1)
    best = None
    for p in PERCENTILES:
        hi = jnp.quantile(flat, p, axis=0).reshape(keep)
        lo = jnp.quantile(flat, 1.0 - p, axis=0).reshape(keep)
        delta, zero = affine_params(lo, hi, bits, symmetric, zero_point)
        err = jnp.mean(jnp.square(fake_quant(x, delta, zero, lo_level, hi_level) - x), axis=red, keepdims=True)
        if best is None:
            best = (err, delta, zero)
        else:
            better = err < best[0]
            best = (jnp.where(better, err, best[0]), jnp.where(better, delta, best[1]), jnp.where(better, zero, best[2]))
    return best[1], best[2]


class UniformQuantizer(nnx.Module):
    """Uniform affine fake quantization, q(x) = Δ·(clip(⌊x/Δ⌉ + z, lo, hi) − z) (Q-Diffusion's / PTQ4DiT's
    `UniformAffineQuantizer`; symmetric: z = 0 and signed levels).

    granularity: "tensor" (one Δ), "channel" (one per index of `axis`, e.g. -1 = output channel of a weight
    (in, out) or head axis 2 of q (B, T, H, hd)), "token" (one per row of the last axis; dynamic only),
    "group" (one per `group_size` consecutive entries of `axis`, and per every other fixed axis: for a weight
    (in, out) with axis 0, per input group and output channel), "block" (one per `group_size` consecutive
    entries of `axis`, shared by everything else: TQ-DiT's one scale per q/k/v third of a fused qkv). static (calibrated, `QuantState` delta/zero)
    or `dynamic` (computed from each tensor by min-max). `init`: "minmax" or "mse" (percentile-MSE over
    `PERCENTILES`). `smooth`: a per-channel divisor f of the last axis applied first (PTQ4DiT's CSB; the
    weight rows carry ×f). `time_groups` G > 1: Δ, z have a leading G axis, row b of a batch uses group
    `time_group[t_b]` (TQ-DiT's TGQ), so one compiled sampler serves every group. `rounding` of a weight in
    reconstruction: "nearest", "soft" (AdaRound's h(α)) or "hard" (⌊x/Δ⌋ + 1[α ≥ 0]).
    """

    def __init__(self, *, path: str, shape: tuple, bits: int, symmetric: bool = False, zero_point: bool = True,
                 granularity: str = "tensor", axis: int = -1, group_size: int = 128, dynamic: bool = False,
                 init: str = "minmax", smooth: bool = False, time_groups: int = 1, num_timesteps: int = 1000):
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"{path}: bits={bits} is outside 2..16")
        if granularity not in GRANULARITIES or init not in INITS:
            raise ValueError(f"{path}: granularity {granularity!r} / init {init!r} not in {GRANULARITIES} / {INITS}")
        if granularity == "token" and not dynamic:
            raise ValueError(f"{path}: per-token quantization is dynamic (token count differs between calls)")
        self.shape, self.bits, self.symmetric = tuple(shape), int(bits), bool(symmetric)
        self.zero_point = bool(zero_point) and not symmetric
        self.granularity, self.axis, self.group_size = granularity, int(axis) % len(shape), int(group_size)
        self.dynamic, self.init, self.time_groups = bool(dynamic), init, int(time_groups)
        self.lo, self.hi = int_range(self.bits, self.symmetric)
        self.rounding, self.alpha = "nearest", nnx.data(None)  # AdaRound's α while a reconstruction runs
        if granularity in ("group", "block") and (shape[self.axis] is None or shape[self.axis] % self.group_size):
            raise ValueError(f"{path}: axis {axis} of {shape} does not split into groups of {group_size}")
        if not self.dynamic:
            lead = (self.time_groups,) if self.time_groups > 1 else ()
            self.delta = QuantState(jnp.ones(lead + self.param_shape(), jnp.float32))
            self.zero = QuantState(jnp.zeros(lead + self.param_shape(), jnp.float32))
        self.time_group = QuantState(jnp.zeros((num_timesteps,), jnp.int32)) if self.time_groups > 1 else None
        self.smooth = QuantState(jnp.ones((shape[-1],), jnp.float32)) if smooth else None

    # ------------------------------------------------------------------ layout
    def _view_shape(self, shape: tuple) -> tuple:
        """The shape quantized: `shape` with `axis` split into (groups, group_size) for group/block granularity."""
        if self.granularity not in ("group", "block"):
            return tuple(shape)
        a = self.axis - len(self.shape) + len(shape)  # the same axis counted from the end
        return tuple(shape[:a]) + (shape[a] // self.group_size, self.group_size) + tuple(shape[a + 1:])

    def _reduced(self, ndim: int, dynamic: bool) -> tuple[int, ...]:
        """Axes (of a view of rank `ndim`) one parameter covers: those of the granularity, and for static
        parameters also the axes unknown at build time (batch, tokens)."""
        off = ndim - len(self._view_shape(tuple(1 if s is None else s for s in self.shape)))  # extra lead axes
        a = self.axis + off
        if self.granularity == "tensor":
            red = set(range(ndim))
        elif self.granularity == "channel":
            red = set(range(ndim)) - {a}
        elif self.granularity == "token":
            red = {ndim - 1}
        elif self.granularity == "block":
            red = set(range(ndim)) - {a}
        else:
            red = {a + 1}
        if not dynamic:
            red |= set(range(off)) | {i + off for i, s in enumerate(self._view_shape(self.shape)) if s is None}
        return tuple(sorted(red))

    def param_shape(self) -> tuple:
        """Shape of Δ and z (without the time-group axis), broadcastable against the view of the tensor."""
        view = self._view_shape(tuple(1 if s is None else s for s in self.shape))
        red = set(self._reduced(len(view), dynamic=False))
        return tuple(1 if i in red else n for i, n in enumerate(view))

    def _view(self, x):
        return x.reshape(self._view_shape(x.shape))

    def prepare(self, x: jax.Array) -> jax.Array:
        """The tensor the integer grid applies to: float32, divided by the CSB factor when there is one."""
        x = x.astype(jnp.float32)
        return x if self.smooth is None else x / self.smooth[...]

    def _select(self, p: jax.Array, t, ndim: int) -> jax.Array:
        """Per-row parameters of the batch's time groups: (G, *ps) → (B, ...) broadcastable to a rank-ndim view."""
        return p if self.time_groups == 1 else select_group(p, self.time_group[...], t, ndim)

    # ------------------------------------------------------------------ calibration
    def range_params(self, x: jax.Array, *, dynamic: bool = False):
        """(Δ, z) for a prepared tensor x from this quantizer's `init` rule, reduced over the granularity's axes."""
        view = self._view(x)
        return range_params(view, red=self._reduced(view.ndim, dynamic), bits=self.bits, symmetric=self.symmetric,
                            zero_point=self.zero_point, init="minmax" if dynamic else self.init)

    def calibrate(self, x: jax.Array, group: int | None = None) -> None:
        """Set Δ and z from calibration data x (the site's tensor stacked over samples); with time groups, for
        `group` only (None: every group)."""
        delta, zero = self.range_params(self.prepare(x))
        delta, zero = delta.reshape(self.param_shape()), zero.reshape(self.param_shape())
        if self.time_groups > 1:
            index = slice(None) if group is None else group
            delta, zero = self.delta[...].at[index].set(delta), self.zero[...].at[index].set(zero)
        self.delta[...], self.zero[...] = delta, zero

    # ------------------------------------------------------------------ AdaRound
    def start_adaround(self, w: jax.Array) -> None:
        """Soft rounding for reconstruction: α initialised so h(α) = frac(w/Δ), i.e. the soft weight equals w."""
        view = self._view(self.prepare(w))
        scaled = view / self.delta[...]
        frac = scaled - jnp.floor(scaled)
        h = jnp.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
        self.alpha = nnx.data(QuantState(jnp.log(h) - jnp.log1p(-h)))  # logit: σ(α) = h
        self.rounding = "soft"

    def finish_adaround(self, w: jax.Array) -> jax.Array:
        """Hard rounding ⌊w/Δ⌋ + 1[α ≥ 0]: the dequantized weight (store it as the layer's weight; nearest
        rounding then reproduces it) — and back to nearest rounding without α."""
        self.rounding = "hard"
        wq = self(w, None)
        self.rounding, self.alpha = "nearest", nnx.data(None)
        return wq

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        xf = self.prepare(x)
        view = self._view(xf)
        if self.dynamic:
            delta, zero = jax.lax.stop_gradient(self.range_params(xf, dynamic=True))
        else:
            delta, zero = self._select(self.delta[...], t, view.ndim), self._select(self.zero[...], t, view.ndim)
        if self.rounding == "nearest":
            q = fake_quant(view, delta, zero, self.lo, self.hi)
        else:
            up = rectified_sigmoid(self.alpha[...]) if self.rounding == "soft" else (self.alpha[...] >= 0)
            q = (clip_ste(jnp.floor(view / delta) + up + zero, self.lo, self.hi) - zero) * delta
        return q.reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------ TQ-DiT's two regions

GELU_MIN = 0.16997124  # |min GELU(x)|: the negative region of a post-GELU tensor is [−0.17, 0) (TQ-DiT's code)


def two_region_softmax(x: jax.Array, split, bits: int) -> jax.Array:
    """TQ-DiT's post-softmax quantizer (TwoRegionSoftmax) with split s, as a function of its values."""
    n = 2 ** (bits - 1) - 1
    d1, d2 = split / n, 1.0 / n
    q1 = jnp.clip(round_ste(x / d1), 0, n) * d1
    q2 = jnp.clip(round_ste(x / d2), 0, n) * d2
    return jnp.where(x < split, q1, q2)


def gelu_negative_step(bits: int) -> float:
    """TQ-DiT's fixed Δ− of the post-GELU quantizer: GELU's negative range over 2^(b−1) levels."""
    return GELU_MIN / 2 ** (bits - 1)


def two_region_signed(x: jax.Array, delta, delta_neg, bits: int) -> jax.Array:
    """The two-regions-around-0 quantizer (TwoRegionSigned) with steps Δ+ and Δ−, as a function of its values."""
    m = 2 ** (bits - 1)
    neg = jnp.clip(round_ste(x / delta_neg), -m, 0) * delta_neg
    return neg + jnp.clip(round_ste(x / delta), 0, m - 1) * delta


class _TimeGrouped(nnx.Module):
    """Base of quantizers whose parameters may be per time group (TGQ): `time_group` maps a timestep to its group."""

    def _init_groups(self, time_groups: int, num_timesteps: int):
        self.time_groups = int(time_groups)
        self.time_group = QuantState(jnp.zeros((num_timesteps,), jnp.int32)) if self.time_groups > 1 else None

    def _lead(self) -> tuple:
        return (self.time_groups,) if self.time_groups > 1 else ()

    def _pick(self, p, t, ndim):
        return p if self.time_groups == 1 else select_group(p, self.time_group[...], t, ndim)


class TwoRegionSoftmax(_TimeGrouped):
    """TQ-DiT's multi-region quantizer of post-softmax probabilities in [0, 1] (PTQ4ViT's twin uniform): b − 1
    bits for each of R1 = [0, s) with Δ1 = s/(2^(b−1) − 1) and R2 = [s, 1] with Δ2 = 1/(2^(b−1) − 1), the last
    bit picks the region. Recombined as x < s ? q1(x) : q2(x): the official code adds q2(clip(x, s, 1)) and
    q1(clip(x, 0, s)), which shifts every small value by q2(s) ≠ 0 for a large s; selecting keeps both regions
    exact. `split` s is a QuantState, per time group with TGQ."""

    def __init__(self, *, path: str, shape: tuple, bits: int, time_groups: int = 1, num_timesteps: int = 1000):
        self.bits = int(bits)
        self._init_groups(time_groups, num_timesteps)
        self.split = QuantState(jnp.full(self._lead(), 2.0 ** -self.bits, jnp.float32))

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        xf = x.astype(jnp.float32)
        split = self._pick(self.split[...][..., None, None, None] if self.time_groups > 1 else self.split[...], t,
                           xf.ndim)
        return two_region_softmax(xf, split, self.bits).astype(x.dtype)


class TwoRegionSigned(_TimeGrouped):
    """Two regions around 0 with their own steps, b − 1 bits each: negative values on clip(⌊x/Δ−⌉, −2^(b−1), 0)·Δ−,
    positive on clip(⌊x/Δ+⌉, 0, 2^(b−1) − 1)·Δ+ (the sum of the two is the select: each is 0 on the other side).
    TQ-DiT's post-GELU quantizer ("mrq_gelu") fixes Δ− = 0.16997124/2^(b−1) (GELU's negative range) and searches
    Δ+; for a signed SwiGLU product ("mrq_signed", this project's extension) both steps are searched."""
    fixed_negative = False

    def __init__(self, *, path: str, shape: tuple, bits: int, time_groups: int = 1, num_timesteps: int = 1000):
        self.bits = int(bits)
        self._init_groups(time_groups, num_timesteps)
        self.delta = QuantState(jnp.ones(self._lead(), jnp.float32))
        self.delta_neg = None if self.fixed_negative else QuantState(jnp.ones(self._lead(), jnp.float32))

    def negative_step(self):
        return gelu_negative_step(self.bits) if self.fixed_negative else self.delta_neg[...]

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        xf = x.astype(jnp.float32)
        lift = (lambda p: p[:, None, None] if self.time_groups > 1 else p)
        delta = self._pick(lift(self.delta[...]), t, xf.ndim)
        neg = self.negative_step()
        neg = neg if self.fixed_negative else self._pick(lift(neg), t, xf.ndim)
        return two_region_signed(xf, delta, neg, self.bits).astype(x.dtype)


class TwoRegionGELU(TwoRegionSigned):
    fixed_negative = True


class Probe(nnx.Module):
    """Identity whose output gradient can be read (nnx.perturb): HO's Fisher weights are the squared gradients
    of a task loss at each searched layer's output."""

    def __init__(self, *, path: str, shape: tuple):
        pass

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        return self.perturb("grad", x)


# --------------------------------------------------------------------------------------------------- observing

def _channel_absmax(x: jax.Array) -> jax.Array:
    """(B, ..., C) → (B, C): max |x| over every axis but the first and the last (tokens)."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else jnp.abs(x)


REDUCERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "none": lambda x: x,  # the whole tensor
    "channel_absmax": _channel_absmax,  # PTQ4DiT's channel salience per sample
}


class Observer(nnx.Module):
    """Identity that records what flows through its site, for calibration: `sow`s reduce(x) as an
    `nnx.Intermediate` named "observed" (`observe` runs a model and collects them by site path). With `smooth`
    it returns x / f like the CSB quantizer it stands in for (f: QuantState of the last axis), so the layers after
    it see what they will see quantized; it records x itself."""

    def __init__(self, *, path: str, shape: tuple, reduce: str = "none", smooth: bool = False):
        if reduce not in REDUCERS:
            raise ValueError(f"observer reduce={reduce!r} is not one of {sorted(REDUCERS)}")
        self.reduce = reduce
        self.smooth = QuantState(jnp.ones((shape[-1],), jnp.float32)) if smooth else None

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        self.sow(nnx.Intermediate, "observed", REDUCERS[self.reduce](x))
        return x if self.smooth is None else (x.astype(jnp.float32) / self.smooth[...]).astype(x.dtype)


class Smooth(nnx.Module):
    """x / f per channel of the last axis, nothing else: CSB's activation side where activations stay in full
    precision (W·A16 settings, and the equivalence tests)."""

    def __init__(self, *, path: str, shape: tuple):
        self.smooth = QuantState(jnp.ones((shape[-1],), jnp.float32))

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        return (x.astype(jnp.float32) / self.smooth[...]).astype(x.dtype)


QUANTIZERS: Registry[type] = Registry("quantizer kind", {
    "observe": Observer, "smooth": Smooth, "probe": Probe, "uniform": UniformQuantizer,
    "mrq_softmax": TwoRegionSoftmax, "mrq_gelu": TwoRegionGELU, "mrq_signed": TwoRegionSigned})
