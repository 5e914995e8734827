"""Gaussian diffusion with ε-prediction and learned-range variance (IDDPM, Nichol & Dhariwal 2021; as used by DiT/TerDiT).

Arrays are NHWC. The model contract is `model_fn(x_t, t, y) -> out` with x_t (N,H,W,C), t int32 (N,) ORIGINAL timesteps,
y int32 (N,), out (N,H,W,2C): out[..., :C] = ε̂ and out[..., C:] = v, the learned-range variance value. With
`prediction="v"` (not in DiT/TerDiT) out[..., :C] is the velocity u = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 instead.

Everything a diffusion needs is a float32 table indexed by the (possibly respaced) step index k; `timestep_map[k]` is the
original timestep the model sees. `GaussianDiffusion` is a pytree, so it can be passed into `jax.jit` as an argument.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from terdit_jax.diffusion.schedule import linear_betas, respace_betas, space_timesteps

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
PREDICTIONS = ("eps", "v")


# ----------------------------------------------------------------------------------------------------------- losses ---

def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis: (N, ...) -> (N,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (IDDPM `normal_kl`). Broadcasts."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Tanh approximation of the standard normal CDF used by IDDPM/DiT (kept for loss parity instead of erf)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] discretized into 256 bins of width 2/255 (IDDPM/DiT).

    The bin around x is [x − 1/255, x + 1/255]; values below −0.999 / above 0.999 take the whole lower / upper tail,
    exactly like the reference. All three inputs must have the same shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means and log_scales must have one shape, got {x.shape}, {means.shape}, {log_scales.shape}")
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamping at 1e-12 (as the reference) also keeps the unselected branches finite, so gradients stay NaN-free.
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# -------------------------------------------------------------------------------------------------------- diffusion ---

class MeanVar(NamedTuple):
    """Output of `p_mean_variance`; every field (N,H,W,C) float32."""
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def _f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, dtype=np.float64), dtype=jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Per-step tables of one (possibly respaced) diffusion; every field is a (K,) array, float32 unless noted.

    Build it with `create_diffusion` or `GaussianDiffusion.from_betas`; the tables are computed in float64 first.
    """
    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array  # int32: step index k -> original timestep given to the model
    prediction: str = "eps"  # what out[..., :C] is: "eps" (DiT/TerDiT) or "v" (velocity); static under jit

    @classmethod
    def from_betas(cls, betas, timestep_map=None, prediction: str = "eps") -> "GaussianDiffusion":
        """Tables from a (K,) β schedule (IDDPM GaussianDiffusion.__init__); timestep_map defaults to 0..K−1."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b <= 1)):
            raise ValueError(f"betas must be a 1-D array of at least 2 values in (0, 1], got shape {b.shape}")
        tmap = np.arange(len(b)) if timestep_map is None else np.asarray(timestep_map)
        if tmap.shape != b.shape:
            raise ValueError(f"timestep_map must have one entry per beta ({b.shape}), got {tmap.shape}")
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            betas=_f32(b), log_betas=_f32(np.log(b)),
            alphas_cumprod=_f32(ac), alphas_cumprod_prev=_f32(ac_prev),
            sqrt_alphas_cumprod=_f32(np.sqrt(ac)), sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - ac)),
            sqrt_recip_alphas_cumprod=_f32(np.sqrt(1.0 / ac)), sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(1.0 / ac - 1.0)),
            posterior_variance=_f32(post_var),
            # The posterior variance is 0 at step 0; IDDPM replaces it by the step-1 value before taking the log.
            posterior_log_variance_clipped=_f32(np.log(np.append(post_var[1], post_var[1:]))),
            posterior_mean_coef1=_f32(b * np.sqrt(ac_prev) / (1.0 - ac)),
            posterior_mean_coef2=_f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
            timestep_map=jnp.asarray(tmap, dtype=jnp.int32), prediction=prediction,
        )

    @property
    def num_timesteps(self) -> int:
        """K, the number of (respaced) steps."""
        return self.betas.shape[0]

    # -- helpers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
        """table[t] shaped (N, 1, ..., 1) to broadcast against an (N, ...) array of rank `ndim`."""
        t = jnp.asarray(t)
        if t.ndim != 1:
            raise ValueError(f"t must be a 1-D int array of shape (N,), got shape {t.shape}")
        return table[t].reshape(t.shape + (1,) * (ndim - 1))

    def _split(self, model_out: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        C = x_t.shape[-1]
        if model_out.shape != x_t.shape[:-1] + (2 * C,):
            raise ValueError(f"model output must be x_t's shape with 2C channels (ε then v), i.e. "
                             f"{x_t.shape[:-1] + (2 * C,)}, got {model_out.shape}")
        return model_out[..., :C], model_out[..., C:]

    # -- forward process --------------------------------------------------------------------------------------------
    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise.  x0, noise (N,H,W,C); t (N,) step indices."""
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x0); each (N,H,W,C) (variances broadcast)."""
        mean = self.extract(self.posterior_mean_coef1, t, x_t.ndim) * x0 + self.extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        var = jnp.broadcast_to(self.extract(self.posterior_variance, t, x_t.ndim), mean.shape)
        log_var = jnp.broadcast_to(self.extract(self.posterior_log_variance_clipped, t, x_t.ndim), mean.shape)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t, t, eps) -> jax.Array:
        """x̂0 = sqrt(1/ᾱ_t)·x_t − sqrt(1/ᾱ_t − 1)·ε."""
        return self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart) -> jax.Array:
        """Inverse of `predict_xstart_from_eps` (used by DDIM)."""
        return ((self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def velocity(self, x0, t, noise) -> jax.Array:
        """u = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0, the v-prediction target (Salimans & Ho 2022, §4)."""
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def eps_from_output(self, x_t, t, pred) -> jax.Array:
        """ε̂ from the first C output channels: themselves, or sqrt(ᾱ_t)·û + sqrt(1 − ᾱ_t)·x_t for v-prediction."""
        if self.prediction == "eps":
            return pred
        return (self.extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * pred
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)

    # -- reverse process -------------------------------------------------------------------------------------------
    def p_mean_variance(self, model_out: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: bool = False) -> MeanVar:
        """p(x_{t−1} | x_t) from a model output (N,H,W,2C) = [ε̂, v] (EPSILON mean, LEARNED_RANGE variance).

        log σ² = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2, v not clamped (IDDPM / TerDiT spec §3.4).
        """
        pred, v = self._split(model_out, x_t)
        v = v.astype(jnp.float32)
        eps = self.eps_from_output(x_t.astype(jnp.float32), t, pred.astype(jnp.float32))
        min_log = self.extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        max_log = self.extract(self.log_betas, t, x_t.ndim)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return MeanVar(mean, jnp.exp(log_var), log_var, pred_xstart)

    # -- training ----------------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_out, x0, x_t, t) -> jax.Array:
        """Variational-bound term in bits per dim, (N,): KL(q‖p) for t > 0, decoder NLL at t == 0 (IDDPM `_vb_terms_bpd`)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.astype(jnp.float32), out.mean, 0.5 * out.log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(jnp.asarray(t) == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                        y: jax.Array, min_snr_gamma: float | None = None) -> dict[str, jax.Array]:
        """DiT's training loss (LossType.MSE with a learned-range variance): per-sample 'loss' = 'mse' + 'vb', each (N,).

        x0, noise: (N,H,W,C); t: (N,) int step indices; y: (N,) int labels. The model is called with the original
        timesteps `timestep_map[t]`; 'mse' regresses ε (or u with prediction "v"). 'vb' sees ε̂ through stop_gradient
        so only the v channels learn from it, and it is not rescaled by T/1000 (that would be RESCALED_MSE). Losses
        are computed in float32 whatever the model dtype. min_snr_gamma: not in DiT/TerDiT; weights the MSE term by
        min(SNR, γ)/SNR (min(SNR, γ)/(SNR + 1) for v), which stops the easy low-noise steps from dominating the
        gradient ('mse' is still reported unweighted).
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have one shape, got {x0.shape} and {noise.shape}")
        t = jnp.asarray(t, dtype=jnp.int32)
        x_t = self.q_sample(x0, t, noise).astype(x0.dtype)
        out = model_fn(x_t, self.timestep_map[t], y)
        pred, v = self._split(out, x_t)
        pred, v = pred.astype(jnp.float32), v.astype(jnp.float32)
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1)
        vb = self.vb_terms_bpd(frozen, x0.astype(jnp.float32), x_t.astype(jnp.float32), t)
        target = noise if self.prediction == "eps" else self.velocity(x0, t, noise)
        mse = mean_flat(jnp.square(target.astype(jnp.float32) - pred))
        loss = mse
        if min_snr_gamma:  # Min-SNR-γ weighting (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
            ac = self.alphas_cumprod[t]
            snr = ac / (1.0 - ac)
            loss = mse * jnp.minimum(snr, min_snr_gamma) / (snr + (self.prediction == "v"))
        return {"loss": loss + vb, "mse": mse, "vb": vb}


jax.tree_util.register_dataclass(
    GaussianDiffusion, data_fields=[f.name for f in dataclasses.fields(GaussianDiffusion) if f.name != "prediction"],
    meta_fields=["prediction"])


def create_diffusion(timestep_respacing: str | int | list[int] = "", num_timesteps: int = 1000,
                     prediction: str = "eps") -> GaussianDiffusion:
    """DiT's `create_diffusion` for the TerDiT setting: linear β, ε-prediction, learned-range σ, MSE + vb loss.

    timestep_respacing: "" (all `num_timesteps` steps, used for training), "250", "25,25", "ddim50", an int or a list.
    prediction: "eps" (the paper) or "v".
    """
    betas = linear_betas(num_timesteps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [num_timesteps]
    new_betas, tmap = respace_betas(betas, space_timesteps(num_timesteps, timestep_respacing))
    return GaussianDiffusion.from_betas(new_betas, tmap, prediction)
