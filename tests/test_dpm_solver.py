"""DPM-Solver++(2M) (diffusion/dpm_solver.py) equals diffusers' DPMSolverMultistepScheduler step by step on the
same model outputs (a fixed random ε function), 20 steps on the linear β schedule."""
import numpy as np
import torch

from terdit_jax.diffusion import dpm_solver
from terdit_jax.diffusion.schedule import linear_betas


def test_dpm_solver_pp_2m_equals_diffusers_step_by_step():
    from diffusers import DPMSolverMultistepScheduler
    betas = linear_betas(1000)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32) / 2
    eps_fn = lambda x, t: np.tanh(np.asarray(x) @ w + np.asarray(t, np.float32)[:, None, None, None] / 500)  # noqa
    x_T = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=betas, solver_order=2,
                                        algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sched.set_timesteps(20)
    np.testing.assert_array_equal(sched.timesteps.numpy(), dpm_solver.timesteps(20))
    xs, x = [], torch.from_numpy(x_T.astype(np.float64))
    for t in sched.timesteps:
        eps = torch.from_numpy(eps_fn(x.numpy().astype(np.float32), np.full(2, int(t))).astype(np.float64))
        x = sched.step(eps, t, x).prev_sample
        xs.append(x.numpy())
    ac = np.cumprod(1 - betas)
    got = []
    dpm_solver.sample(eps_fn, x_T, ac, 20, on_step=lambda i, x: got.append(np.asarray(x, np.float64)))
    assert len(got) == 20
    for i, (a, b) in enumerate(zip(got, xs)):  # every intermediate state, float32 here vs float64 there
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-5, i
    assert np.abs(xs[-1] - xs[-2]).max() > 1e-3  # the steps move x
