"""Samplers: ancestral DDPM (what TerDiT/DiT use), DDIM and DPM-Solver++(2M) (PixArt's), with DiT-style
classifier-free guidance.

The loop is a Python loop around ONE jitted step whose step index is a traced int32 scalar, so it compiles once per
(model_fn, shape, dtype, sampler) and can drive a tqdm bar. A multistep solver's memory (the previous x̂0) is carried between steps. The condition y is
whatever the model takes: (N,) int labels, or a text family's (caption (N, L, C), mask (N, L)) pair. Model functions that are `jax.tree_util.Partial` objects
have their bound arrays passed to the step as arguments (not baked into the program as constants): for a large model
use `Partial(apply_fn, params)` rather than a closure over the params.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from terdit_jax.diffusion.gaussian import GaussianDiffusion, ModelFn
from terdit_jax.registry import Registry


def _as_partial(fn: ModelFn) -> Partial:
    """Wrap a plain callable so it can be a jit argument (its identity then keys the compile cache)."""
    if not callable(fn):
        raise TypeError(f"model_fn must be callable as model_fn(x_t, t, y), got {type(fn).__name__}")
    return fn if isinstance(fn, Partial) else Partial(fn)


def _batch_size(y) -> int | None:
    """The leading size shared by every leaf of the condition y (None if they disagree or y has none)."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree_util.tree_leaves(y)}
    return sizes.pop() if len(sizes) == 1 else None


def _with_null(y, null_y):
    """[y; null_y broadcast to every example]: the conditional and the unconditional halves of a CFG batch."""
    return jax.tree_util.tree_map(
        lambda a, u: jnp.concatenate([a, jnp.broadcast_to(jnp.asarray(u, a.dtype), a.shape)]), y, null_y)


@dataclasses.dataclass(frozen=True)
class _CFGForward:
    """DiT `forward_with_cfg` on the first half only; hashable so equal settings share one compiled step."""
    guidance_channels: int | None

    def __call__(self, model_fn, cfg_scale, null_y, x, t, y):
        n, C = x.shape[0], x.shape[-1]
        k = C if self.guidance_channels is None else self.guidance_channels
        if not 1 <= k <= C:
            raise ValueError(f"guidance_channels must be in [1, {C}] (the ε channels) or None, got {k}")
        # Both halves see the same x (DiT reuses the first half); the second half is the unconditional pass.
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), _with_null(y, null_y))
        cond, uncond = out[:n].astype(jnp.float32), out[n:].astype(jnp.float32)
        guided = uncond[..., :k] + cfg_scale * (cond[..., :k] - uncond[..., :k])
        # DiT quirk kept for parity: only the first k channels (3 in the official code) are guided; the rest (4th ε
        # channel, all v channels) keep the conditional half's own values.
        return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def cfg_model_fn(model_fn: ModelFn, cfg_scale: float, null_y, guidance_channels: int | None = 3) -> Partial:
    """Classifier-free guidance wrapper (DiT `forward_with_cfg`), returning a model_fn(x, t, y) of the same contract.

    null_y: one example's unconditional condition: the null class label (num_classes, e.g. 1000), or a text
    family's (caption (L, C), mask (L,)) of the empty prompt. Runs the model on [x; x] with [y; null_y] and returns the first (conditional) half of DiT's output,
    (N,H,W,2C): channels [:g] = u + s·(c − u), channels [g:] = the conditional values. guidance_channels g = 3 is the
    official behaviour; None guides all C ε channels. DiT's sampler carries a second half that it throws away; here
    the sampler carries only the first half, which gives the same first-half trajectory for half the elementwise work.
    """
    if guidance_channels is not None and guidance_channels < 1:
        raise ValueError(f"guidance_channels must be >= 1 or None, got {guidance_channels}")
    if null_y is None:
        raise ValueError("classifier-free guidance needs null_y, the unconditional condition: the null class label "
                         "(num_classes, e.g. 1000 for ImageNet) or a text family's empty-prompt (caption, mask)")
    return Partial(_CFGForward(guidance_channels), _as_partial(model_fn), jnp.asarray(cfg_scale, jnp.float32),
                   jax.tree_util.tree_map(jnp.asarray, null_y))


# ------------------------------------------------------------------------------------------------------------ steps ---

def _mask_nonzero(t: jax.Array, ndim: int) -> jax.Array:
    return (t != 0).astype(jnp.float32).reshape(t.shape + (1,) * (ndim - 1))


def p_sample(diffusion: GaussianDiffusion, model_out: jax.Array, x: jax.Array, t: jax.Array, noise: jax.Array,
             clip_denoised: bool = False) -> jax.Array:
    """One ancestral DDPM step (IDDPM `p_sample`): x_{t−1} = μ + 1[t>0]·exp(½ log σ²)·noise, cast back to x.dtype.

    model_out: (N,H,W,2C) from the model at x; x, noise: (N,H,W,C); t: (N,) step indices of `diffusion`.
    """
    pm = diffusion.p_mean_variance(model_out, x, t, clip_denoised)
    new = pm.mean + _mask_nonzero(t, x.ndim) * jnp.exp(0.5 * pm.log_variance) * noise
    return new.astype(x.dtype)  # TerDiT's one addition to DiT's p_sample: keep the latent dtype (e.g. bf16)


def ddim_sample(diffusion: GaussianDiffusion, model_out: jax.Array, x: jax.Array, t: jax.Array, noise: jax.Array,
                eta: float | jax.Array = 0.0, clip_denoised: bool = False) -> jax.Array:
    """One DDIM step (Song et al. 2021, eq. 12; IDDPM/DiT `ddim_sample`), cast back to x.dtype.

    σ = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_prev);  x_prev = x̂0·sqrt(ᾱ_prev) + sqrt(1 − ᾱ_prev − σ²)·ε + 1[t>0]·σ·noise.
    """
    pm = diffusion.p_mean_variance(model_out, x, t, clip_denoised)
    at = functools.partial(diffusion.extract, t=t, ndim=x.ndim)
    eps = diffusion.predict_eps_from_xstart(x, t, pm.pred_xstart)
    ab, ab_prev = at(diffusion.alphas_cumprod), at(diffusion.alphas_cumprod_prev)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
    mean = pm.pred_xstart * jnp.sqrt(ab_prev) + jnp.sqrt(1.0 - ab_prev - sigma ** 2) * eps
    return (mean + _mask_nonzero(t, x.ndim) * sigma * noise).astype(x.dtype)


def dpm_solver_pp_2m(diffusion: GaussianDiffusion, model_out: jax.Array, x: jax.Array, t: jax.Array,
                     x0_prev: jax.Array, clip_denoised: bool = False) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Alg. 2: multistep, second order, data prediction;
    the midpoint form and first-order first and last steps of diffusers' DPMSolverMultistepScheduler, PixArt's
    default) from respaced step t to t−1 (to the clean sample at t = 0, final σ = 0).

    With α = sqrt(ᾱ), σ = sqrt(1 − ᾱ), λ = log(α/σ), h = λ_{t−1} − λ_t and x̂0 the data prediction at x:
      x_{t−1} = (σ_{t−1}/σ_t)·x − α_{t−1}(e^{−h} − 1)·x̂0 − ½α_{t−1}(e^{−h} − 1)·(x̂0 − x̂0_prev)/r,
    r = (λ_t − λ_{t+1})/h; the last term is left out at the first step (no x̂0_prev) and the last (h = ∞).
    x0_prev: x̂0 of the step before (t+1). Returns (x_{t−1} in x.dtype, x̂0 float32)."""
    x0 = diffusion.p_mean_variance(model_out, x, t, clip_denoised).pred_xstart
    at = functools.partial(diffusion.extract, t=t, ndim=x.ndim)
    ab, ab_next = at(diffusion.alphas_cumprod), at(diffusion.alphas_cumprod_prev)  # ᾱ at t and at t−1 (1 at t = 0)
    ab_before = diffusion.extract(diffusion.alphas_cumprod, jnp.minimum(t + 1, diffusion.num_timesteps - 1), x.ndim)
    lam = lambda a: 0.5 * (jnp.log(a) - jnp.log1p(-a))  # noqa: E731  (λ = ∞ at ᾱ = 1)
    h = lam(ab_next) - lam(ab)
    phi = jnp.expm1(-h)  # −1 when h = ∞: the last step returns x̂0
    second = ((t > 0) & (t < diffusion.num_timesteps - 1)).reshape(t.shape + (1,) * (x.ndim - 1))
    r = jnp.where(second, (lam(ab) - lam(ab_before)) / jnp.where(second, h, 1.0), 1.0)
    correction = jnp.where(second, (x0 - x0_prev) / r, 0.0)
    new = jnp.sqrt((1.0 - ab_next) / (1.0 - ab)) * x - jnp.sqrt(ab_next) * phi * (x0 + 0.5 * correction)
    return new.astype(x.dtype), x0


@dataclasses.dataclass(frozen=True)
class Sampler:
    """step(diffusion, model_out, x, t, noise, eta, clip_denoised, x0_prev) → (x at t−1, the x̂0 to carry);
    spacing: the respacing rule of its step grid (`schedule.space_timesteps`: "" IDDPM's, "ddim", "linspace")."""
    step: Callable
    spacing: str = ""


SAMPLERS: Registry[Sampler] = Registry("sampler", {
    "ddpm": Sampler(lambda d, out, x, t, noise, eta, clip, x0: (p_sample(d, out, x, t, noise, clip), x0)),
    "ddim": Sampler(lambda d, out, x, t, noise, eta, clip, x0: (ddim_sample(d, out, x, t, noise, eta, clip), x0)),
    "dpm++": Sampler(lambda d, out, x, t, noise, eta, clip, x0: dpm_solver_pp_2m(d, out, x, t, x0, clip),
                     spacing="linspace"),  # DPM-Solver++(2M) on diffusers' step grid, as PixArt samples
})


def respacing(sampler: str, num_steps: int) -> str:
    """The `create_diffusion` respacing of `num_steps` steps on the sampler's grid ("250", "linspace20")."""
    return f"{SAMPLERS.get(sampler).spacing}{int(num_steps)}"


@functools.partial(jax.jit, static_argnames=("sampler", "clip_denoised"))
def _step(model_fn: Partial, diffusion: GaussianDiffusion, x, x0, k, key, y, eta, *, sampler: str,
          clip_denoised: bool):
    """Step index k (traced int32 scalar) -> (x at k−1, x̂0 to carry, next key). One compile serves every k."""
    key, sub = jax.random.split(key)
    t = jnp.full((x.shape[0],), k, dtype=jnp.int32)
    out = model_fn(x, diffusion.timestep_map[t], y)
    noise = jax.random.normal(sub, x.shape, x.dtype)
    return *SAMPLERS.get(sampler).step(diffusion, out, x, t, noise, eta, clip_denoised, x0), key


def sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape: tuple[int, ...], key: jax.Array, y: jax.Array, *,
           sampler: str = "ddpm", cfg_scale: float = 1.0, null_y=None,
           guidance_channels: int | None = 3, eta: float = 0.0, clip_denoised: bool = False,
           x_T: jax.Array | None = None, progress: bool = False, dtype=jnp.float32,
           on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
    """Draw samples by running the reverse process over all steps of `diffusion` (use a respaced one, e.g. "250").

    shape: (N,H,W,C); y: (N,) int labels, or a pytree whose leaves all lead with N (a text family's (caption, mask));
    key: a jax.random key (initial noise, then one split per step).
    sampler: "ddpm" (ancestral, the TerDiT/DiT default), "ddim" (with `eta`, 0 = deterministic) or "dpm++"
    (DPM-Solver++(2M); build `diffusion` with `respacing("dpm++", n)`).
    cfg_scale != 1 wraps the model with `cfg_model_fn(model_fn, cfg_scale, null_y, guidance_channels)`; at 1 the
    conditional model is used alone (the guided channels would equal it anyway). x_T: optional starting noise of
    `shape`. on_step(k, x) is called before step k (K−1 first) with the state the model sees at that step (what
    calibration records). Returns x_0 as (N,H,W,C) in `dtype`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS.names()}")
    shape = tuple(int(s) for s in shape)
    y = jnp.asarray(y, jnp.int32) if not isinstance(y, (tuple, list, dict)) else jax.tree_util.tree_map(jnp.asarray, y)
    if len(shape) < 2 or _batch_size(y) != shape[0] or (isinstance(y, jax.Array) and y.ndim != 1):
        raise ValueError(f"y must have shape (N,) = ({shape[0] if shape else '?'},) for sample shape {shape} (or be "
                         f"a pytree whose leaves all lead with N), got "
                         f"{jax.tree_util.tree_map(lambda a: a.shape, y)}")
    fn = _as_partial(model_fn)
    if cfg_scale != 1.0:
        fn = cfg_model_fn(fn, cfg_scale, null_y, guidance_channels)
    key, init_key = jax.random.split(key)
    if x_T is None:
        x = jax.random.normal(init_key, shape, dtype)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have the sample shape {shape}, got {tuple(x_T.shape)}")
    else:
        x = jnp.asarray(x_T, dtype)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{sampler} sampling", total=diffusion.num_timesteps)
    eta, x0 = jnp.asarray(eta, jnp.float32), jnp.zeros(shape, jnp.float32)
    for k in steps:
        if on_step is not None:
            on_step(int(k), x)
        x, x0, key = _step(fn, diffusion, x, x0, np.int32(k), key, y, eta, sampler=sampler,
                           clip_denoised=clip_denoised)
        if progress:
            x.block_until_ready()  # so the bar tracks finished steps, not dispatched ones
    return x
