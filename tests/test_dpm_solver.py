"""The "dpm++" sampler (DPM-Solver++(2M), diffusion/samplers.py) equals diffusers' DPMSolverMultistepScheduler, as
PixArt configures it, step by step on the same model outputs: the step grid, every intermediate state, and
classifier-free guidance with a pytree condition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from terdit_jax.diffusion import create_diffusion
from terdit_jax.diffusion.samplers import respacing, sample
from terdit_jax.diffusion.schedule import linear_betas, space_timesteps

W = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32) / 2


def eps_of(x, t, scale):
    """A fixed ε function of the state and the original timestep; `scale` (N,) stands in for a condition."""
    return np.tanh(np.asarray(x, np.float32) @ W * np.asarray(scale, np.float32)[:, None, None, None]
                   + np.asarray(t, np.float32)[:, None, None, None] / 500)


def model(x, t, y):
    """(x, t, y = (scale (N,), unused (N, 2))) → (N, H, W, 8): ε then learned-range values the solver must ignore."""
    scale, _ = y
    eps = jnp.tanh(x @ W * scale[:, None, None, None] + t.astype(jnp.float32)[:, None, None, None] / 500)
    return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], -1)


@pytest.mark.parametrize("steps", [20, 7])
def test_dpm_solver_pp_2m_equals_diffusers_step_by_step(steps):
    from diffusers import DPMSolverMultistepScheduler
    betas = linear_betas(1000)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=betas, solver_order=2,
                                        algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sched.set_timesteps(steps)
    d = create_diffusion(respacing("dpm++", steps))
    np.testing.assert_array_equal(np.asarray(d.timestep_map)[::-1], sched.timesteps.numpy())

    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    cond, null, guidance = np.array([1.0, 0.5, 2.0], np.float32), 0.25, 3.0
    want, x = [], torch.from_numpy(x_T.astype(np.float64))
    for t in sched.timesteps:  # PixArt's pipeline: guide ε, then step
        xn, tt = x.numpy(), np.full(3, int(t))
        e_c, e_u = eps_of(xn, tt, cond), eps_of(xn, tt, np.full(3, null))
        x = sched.step(torch.from_numpy((e_u + guidance * (e_c - e_u)).astype(np.float64)), t, x).prev_sample
        want.append(x.numpy())

    got = []
    y = (jnp.asarray(cond), jnp.zeros((3, 2)))
    final = sample(model, d, x_T.shape, jax.random.key(0), y, sampler="dpm++", cfg_scale=guidance,
                   null_y=(jnp.float32(null), jnp.zeros(2)), guidance_channels=None, x_T=jnp.asarray(x_T),
                   on_step=lambda k, x: got.append(np.asarray(x, np.float64)))
    got = got[1:] + [np.asarray(final, np.float64)]  # on_step sees the state before each step
    assert len(got) == steps
    for i, (a, b) in enumerate(zip(got, want)):  # float32 here vs float64 there
        assert np.abs(a - b).max() / np.abs(b).max() < 2e-5, i
    assert np.abs(want[-1] - want[-2]).max() > 1e-3  # the steps move x


def test_linspace_respacing_is_diffusers_grid_and_rejects_bad_counts():
    assert sorted(space_timesteps(1000, "linspace4")) == [250, 500, 749, 999]  # round(749.25), 0 left out
    with pytest.raises(ValueError, match="linspaceN"):
        space_timesteps(1000, "linspacex")
    with pytest.raises(ValueError, match="distinct"):
        space_timesteps(10, "linspace20")
