"""Gaussian diffusion for TerDiT: linear schedule and respacing, ε/learned-range losses, DDPM/DDIM samplers with CFG."""
from terdit_jax.diffusion.gaussian import (GaussianDiffusion, MeanVar, approx_standard_normal_cdf, create_diffusion,
                                           discretized_gaussian_log_likelihood, mean_flat, normal_kl)
from terdit_jax.diffusion.samplers import SAMPLERS, cfg_model_fn, ddim_sample, p_sample, sample
from terdit_jax.diffusion.schedule import linear_betas, respace_betas, space_timesteps

__all__ = [
    "GaussianDiffusion", "MeanVar", "approx_standard_normal_cdf", "create_diffusion", "discretized_gaussian_log_likelihood",
    "mean_flat", "normal_kl", "SAMPLERS", "cfg_model_fn", "ddim_sample", "p_sample", "sample", "linear_betas",
    "respace_betas", "space_timesteps",
]
