"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Alg. 2, multistep second order, data prediction), with the step times, the first-order first and last
steps and the final σ = 0 that PixArt's default scheduler uses (diffusers DPMSolverMultistepScheduler:
timestep_spacing "linspace", solver_order 2, midpoint, final_sigmas_type "zero").

Not yet wired into `samplers.sample` (its steps are stateless; this solver carries the previous x̂0).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np


def timesteps(num_steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """The model's DDPM steps, descending: linspace(0, T−1, n+1) rounded, reversed, last dropped → (n,) int."""
    return np.linspace(0, num_train_steps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def sigmas(alphas_cumprod: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """σ_k = sqrt((1 − ᾱ)/ᾱ) at each step, then a final 0 → (n+1,) float64."""
    ac = np.asarray(alphas_cumprod, np.float64)[steps]
    return np.append(np.sqrt((1 - ac) / ac), 0.0)


def step(x, x0, prev_x0, sigma_s, sigma_t, sigma_prev, first_order: bool):
    """x at σ_s → x at σ_t from the data prediction x0 (and prev_x0 at σ_prev for the second order).

    With α = 1/sqrt(1+σ²), s = σα, λ = log α − log s, h = λ_t − λ_s:
      1st: x_t = (s_t/s_s)·x − α_t(e^{−h} − 1)·x0
      2nd: + the midpoint correction −½α_t(e^{−h} − 1)·(x0 − prev_x0)/r, r = (λ_s − λ_prev)/h.
    At σ_t = 0 this is x_t = x0 (exp(−h) → 0)."""
    a = lambda sg: 1.0 / np.sqrt(1.0 + sg ** 2)  # noqa: E731
    lam = lambda sg: np.log(a(sg)) - np.log(sg * a(sg))  # noqa: E731
    a_t = a(sigma_t)
    if sigma_t == 0:
        return x0.astype(x.dtype)
    h = lam(sigma_t) - lam(sigma_s)
    out = (sigma_t * a_t / (sigma_s * a(sigma_s))) * x - a_t * np.expm1(-h) * x0
    if not first_order:
        r = (lam(sigma_s) - lam(sigma_prev)) / h
        out = out - 0.5 * a_t * np.expm1(-h) * (x0 - prev_x0) / r
    return out.astype(x.dtype)


def sample(eps_fn: Callable, x_T, alphas_cumprod: np.ndarray, num_steps: int = 20, on_step: Callable | None = None):
    """x_T (N, H, W, C) ~ N(0, I) → x_0 with `num_steps` steps; eps_fn(x, t (N,) int) → ε (N, H, W, C);
    on_step(i, x) after step i."""
    ts = timesteps(num_steps, len(alphas_cumprod))
    sg = sigmas(alphas_cumprod, ts)
    x, prev = jnp.asarray(x_T), None
    for i, t in enumerate(ts):
        a_s = 1.0 / np.sqrt(1.0 + sg[i] ** 2)
        eps = eps_fn(x, jnp.full((x.shape[0],), int(t), jnp.int32))
        x0 = (x - sg[i] * a_s * eps) / a_s
        first = i == 0 or i == len(ts) - 1  # first step; final σ = 0 makes diffusers' last step first order
        x = step(x, x0, prev, sg[i], sg[i + 1], sg[i - 1] if i else None, first)
        prev = x0
        if on_step is not None:
            on_step(i, x)
    return x
