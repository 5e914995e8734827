"""Tests for terdit_jax.diffusion against an independent float64 NumPy reference of the IDDPM formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terdit_jax.diffusion import (approx_standard_normal_cdf, cfg_model_fn, create_diffusion,
                                  discretized_gaussian_log_likelihood, linear_betas, normal_kl, respace_betas, sample,
                                  space_timesteps)

T = 1000
REF_BETAS = np.linspace(1e-4, 0.02, T)  # the linear schedule at T = 1000, written out independently
REF_AC = np.cumprod(1.0 - REF_BETAS)


# ------------------------------------------------------------------------------------------- NumPy float64 reference ---

class Ref:
    """IDDPM formulas in float64 for a schedule `betas` (Ho et al. 2020 eq. 6-7; Nichol & Dhariwal 2021 eq. 15)."""

    def __init__(self, betas):
        self.b = np.asarray(betas, np.float64)
        self.ac = np.cumprod(1 - self.b)
        self.ac_prev = np.concatenate([[1.0], self.ac[:-1]])
        self.pv = self.b * (1 - self.ac_prev) / (1 - self.ac)
        self.plv = np.log(np.concatenate([[self.pv[1]], self.pv[1:]]))

    def col(self, a, t):
        return a[t][:, None, None, None]

    def q_sample(self, x0, t, n):
        return np.sqrt(self.col(self.ac, t)) * x0 + np.sqrt(1 - self.col(self.ac, t)) * n

    def posterior(self, x0, xt, t):
        ac, acp, b = self.col(self.ac, t), self.col(self.ac_prev, t), self.col(self.b, t)
        mean = (np.sqrt(acp) * b * x0 + np.sqrt(1 - b) * (1 - acp) * xt) / (1 - ac)
        return mean, self.col(self.pv, t) + 0 * mean, self.col(self.plv, t) + 0 * mean

    def p_mean_var(self, out, xt, t):
        C = xt.shape[-1]
        eps, v = out[..., :C], out[..., C:]
        ac = self.col(self.ac, t)
        x0 = (xt - np.sqrt(1 - ac) * eps) / np.sqrt(ac)
        frac = (v + 1) / 2
        logvar = frac * np.log(self.col(self.b, t)) + (1 - frac) * self.col(self.plv, t)
        return self.posterior(x0, xt, t)[0], np.exp(logvar), logvar, x0


def ref_kl(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1)


def ref_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_disc_ll(x, mean, log_scale):
    lo, hi = ref_cdf((x - mean - 1 / 255) / np.exp(log_scale)), ref_cdf((x - mean + 1 / 255) / np.exp(log_scale))
    p = np.where(x < -0.999, hi, np.where(x > 0.999, 1 - lo, hi - lo))
    return np.log(np.maximum(p, 1e-12))


def rand(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


# -------------------------------------------------------------------------------------------------------- schedule ---

def test_linear_betas_match_reference_and_scale_with_T():
    np.testing.assert_allclose(linear_betas(1000), REF_BETAS, rtol=0, atol=1e-15)
    np.testing.assert_allclose(linear_betas(500)[[0, -1]], [2e-4, 0.04], rtol=1e-12)


def test_space_timesteps_250_of_1000():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12] and kept[-2:] == [995, 999]
    # No cumulative index lands on an exact .5 for this stride, so the closed form equals IDDPM's running sum.
    assert kept == [round(k * 999 / 249) for k in range(250)]
    assert set(np.diff(kept)) == {4, 5}
    assert space_timesteps(1000, [250]) == space_timesteps(1000, 250) == set(kept)


def test_space_timesteps_sections_and_ddim():
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    two = sorted(space_timesteps(1000, "25,25"))
    idx, running = 0.0, []  # IDDPM accumulates the float index; at k = 12 the exact value 249.5 arrives as 249.4999...
    for _ in range(25):
        running.append(round(idx))
        idx += 499 / 24
    assert running[12] == 249 and round(12 * 499 / 24) == 250
    assert two == running + [500 + r for r in running]
    assert space_timesteps(10, "3") == {0, 4, 9}  # stride 4.5: round(4.5) = 4 (half to even), round(9.0) = 9
    for bad in ("ddim999", "1001", "abc", "0"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


@pytest.mark.parametrize("spacing", ["250", "ddim25", "10,5"])
def test_respaced_betas_reproduce_alphas_cumprod(spacing):
    kept = sorted(space_timesteps(T, spacing))
    new_betas, tmap = respace_betas(REF_BETAS, kept)
    assert tmap.tolist() == kept
    np.testing.assert_allclose(np.cumprod(1 - new_betas), REF_AC[kept], rtol=1e-12)
    d = create_diffusion(spacing)
    assert np.asarray(d.timestep_map).tolist() == kept
    np.testing.assert_allclose(np.asarray(d.alphas_cumprod), REF_AC[kept], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- gaussian ---

def test_q_sample_and_posterior_match_reference():
    d, ref = create_diffusion(), Ref(REF_BETAS)
    t = np.array([0, 1, 17, 500, 999])
    x0, n, xt = rand(0, 5, 4, 4, 3), rand(1, 5, 4, 4, 3), rand(2, 5, 4, 4, 3)
    np.testing.assert_allclose(d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(n, jnp.float32)),
                               ref.q_sample(x0, t, n), rtol=1e-5, atol=1e-5)
    got = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
    for g, r in zip(got, ref.posterior(x0, xt, t)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6)
    # The clipped log-variance at t = 0 is log of the step-1 posterior variance, not log 0.
    assert np.isclose(float(got[2][0, 0, 0, 0]), np.log(REF_BETAS[1] * (1 - REF_AC[0]) / (1 - REF_AC[1])), rtol=1e-5)


def test_p_mean_variance_learned_range_matches_reference():
    d, ref = create_diffusion("ddim25"), Ref(respace_betas(REF_BETAS, range(0, T, 40))[0])
    t = np.array([0, 3, 12, 24])
    xt = rand(3, 4, 2, 2, 4)
    out = np.concatenate([rand(4, 4, 2, 2, 4), rand(5, 4, 2, 2, 4, scale=1.5)], -1)  # v beyond [-1, 1]: not clamped
    got = d.p_mean_variance(jnp.asarray(out, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
    for g, r in zip(got, ref.p_mean_var(out, xt, t)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_normal_kl_cdf_and_discretized_likelihood():
    m1, m2, lv1, lv2 = rand(6, 50), rand(7, 50), rand(8, 50), rand(9, 50)
    f = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(normal_kl(f(m1), f(lv1), f(m2), f(lv2)) / math.log(2),
                               ref_kl(m1, lv1, m2, lv2) / np.log(2), rtol=1e-4, atol=1e-6)
    xs = np.linspace(-4, 4, 17)
    np.testing.assert_allclose(approx_standard_normal_cdf(f(xs)), ref_cdf(xs), atol=1e-6)
    # Both edge bins (x = ±1 takes the whole tail), interior values, and a tiny scale where the clamp at 1e-12 bites.
    x = np.array([-1.0, -1.0, -0.9995, -0.5, 0.0, 0.3, 0.9995, 1.0, 1.0, 0.2])
    mean = np.array([-0.9, 0.5, 0.0, -0.49, 0.1, 0.3, 0.9, 0.95, -0.5, 0.9])
    log_scale = np.array([-1.0, -2.0, -0.5, -3.0, -1.0, -6.0, 0.0, -1.0, -2.0, -6.0])
    got = discretized_gaussian_log_likelihood(f(x), f(mean), f(log_scale))
    np.testing.assert_allclose(got, ref_disc_ll(x, mean, log_scale), rtol=1e-4, atol=1e-5)
    assert np.isclose(float(got[-1]), np.log(1e-12), rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(f(x), f(mean[:3]), f(log_scale))


def test_training_losses_values_and_t0_decoder_nll():
    d, ref = create_diffusion(), Ref(REF_BETAS)
    t = np.array([0, 0, 5, 999])
    x0 = np.clip(rand(10, 4, 4, 4, 2, scale=0.7), -1, 1)
    x0[0, 0, 0, 0] = -1.0  # exercise an edge bin in the decoder NLL
    noise, out = rand(11, 4, 4, 4, 2), np.concatenate([rand(12, 4, 4, 4, 2), rand(13, 4, 4, 4, 2, scale=0.5)], -1)
    seen = {}

    def model(x, tt, y):
        seen["t"], seen["y"] = tt, y
        return jnp.asarray(out, jnp.float32)

    got = d.training_losses(model, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32),
                            jnp.array([1, 2, 3, 4]))
    assert np.asarray(seen["t"]).tolist() == t.tolist() and np.asarray(seen["y"]).tolist() == [1, 2, 3, 4]
    xt = ref.q_sample(x0, t, noise)
    mean, _, logvar, _ = ref.p_mean_var(out, xt, t)
    tmean, _, tlogvar = ref.posterior(x0, xt, t)
    kl = ref_kl(tmean, tlogvar, mean, logvar).mean((1, 2, 3)) / np.log(2)
    nll = -ref_disc_ll(x0, mean, 0.5 * logvar).mean((1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    mse = ((noise - out[..., :2]) ** 2).mean((1, 2, 3))
    assert not np.allclose(nll[:2], kl[:2], rtol=1e-2)  # t = 0 must really take the other branch
    np.testing.assert_allclose(got["vb"], vb, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(got["loss"], mse + vb, rtol=2e-4, atol=1e-5)
    # Min-SNR-γ (Hang et al. 2023): the MSE term weighted by min(SNR, γ)/SNR, SNR = ᾱ/(1 − ᾱ); vb unchanged
    weighted = d.training_losses(model, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32),
                                 jnp.array([1, 2, 3, 4]), min_snr_gamma=5.0)
    ac = np.cumprod(1 - REF_BETAS)[t]
    snr = ac / (1 - ac)
    np.testing.assert_allclose(weighted["loss"], mse * np.minimum(snr, 5.0) / snr + vb, rtol=2e-4, atol=1e-5)
    assert np.minimum(snr, 5.0)[-1] / snr[-1] == 1.0 and np.minimum(snr, 5.0)[0] / snr[0] < 0.01


def test_v_prediction_loss_and_sampling_equal_the_eps_model():
    """prediction="v": the MSE regresses u = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 (Salimans & Ho 2022); the mean, vb and samples
    of a v-model equal those of the ε-model that outputs ε = sqrt(ᾱ)·u + sqrt(1−ᾱ)·x_t."""
    dv, de, ref = create_diffusion(prediction="v"), create_diffusion(), Ref(REF_BETAS)
    t = np.array([0, 3, 400, 999])
    x0, noise = np.clip(rand(20, 4, 4, 4, 1, scale=0.7), -1, 1), rand(21, 4, 4, 4, 1)
    u_out, var_out = rand(22, 4, 4, 4, 1), rand(23, 4, 4, 4, 1, scale=0.5)
    xt, ac = ref.q_sample(x0, t, noise), ref.col(ref.ac, t)
    eps_out = np.sqrt(ac) * u_out + np.sqrt(1 - ac) * xt
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    y = jnp.zeros(4, jnp.int32)
    got_v = dv.training_losses(lambda x, tt, yy: f32(np.concatenate([u_out, var_out], -1)), f32(x0), jnp.asarray(t),
                               f32(noise), y)
    got_e = de.training_losses(lambda x, tt, yy: f32(np.concatenate([eps_out, var_out], -1)), f32(x0), jnp.asarray(t),
                               f32(noise), y)
    u = np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0
    np.testing.assert_allclose(got_v["mse"], ((u - u_out) ** 2).mean((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(got_v["vb"], got_e["vb"], rtol=1e-3, atol=1e-5)
    weighted = dv.training_losses(lambda x, tt, yy: f32(np.concatenate([u_out, var_out], -1)), f32(x0), jnp.asarray(t),
                                  f32(noise), y, min_snr_gamma=5.0)
    snr = REF_AC[t] / (1 - REF_AC[t])
    np.testing.assert_allclose(weighted["loss"], got_v["mse"] * np.minimum(snr, 5.0) / (snr + 1) + got_v["vb"],
                               rtol=2e-4, atol=1e-5)
    # the same model in both parameterisations draws the same samples (here: the exact model of a point mass)
    c = jnp.array([0.5, -0.25, 0.8, -1.0])
    eps_model = _true_eps_model(c, 0.0)
    d25e, d25v = create_diffusion("25"), create_diffusion("25", prediction="v")

    def v_model(x, tt, yy):  # u = (ε − sqrt(1−ᾱ)·x_t)/sqrt(ᾱ) for the exact ε
        out = eps_model(x, tt, yy)
        a = jnp.asarray(REF_AC, jnp.float32)[tt][:, None, None, None]
        return jnp.concatenate([(out[..., :4] - jnp.sqrt(1 - a) * x) / jnp.sqrt(a), out[..., 4:]], -1)

    kw = dict(sampler="ddpm")
    a = sample(eps_model, d25e, (4, 3, 3, 4), jax.random.key(5), jnp.zeros(4), **kw)
    b = sample(v_model, d25v, (4, 3, 3, 4), jax.random.key(5), jnp.zeros(4), **kw)
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(b, jnp.broadcast_to(c, b.shape), atol=2e-3)
    with pytest.raises(ValueError, match="unknown prediction"):
        create_diffusion(prediction="x0")


def test_training_losses_gradient_routing():
    d = create_diffusion()
    C, key = 3, jax.random.key(0)
    x0, noise = jax.random.normal(key, (3, 4, 4, C)) * 0.5, jax.random.normal(jax.random.key(1), (3, 4, 4, C))
    t, y = jnp.array([0, 10, 700]), jnp.zeros(3, jnp.int32)
    p = jax.random.normal(jax.random.key(2), (3, 4, 4, 2 * C))
    loss = lambda name: (lambda p: d.training_losses(lambda x, tt, yy: p, x0, t, noise, y)[name].sum())
    g_vb, g_mse, g_loss = jax.jit(lambda p: [jax.grad(loss(n))(p) for n in ("vb", "mse", "loss")])(p)
    assert np.all(np.asarray(g_vb[..., :C]) == 0) and np.abs(g_vb[..., C:]).min() > 0  # vb trains v only
    assert np.all(np.asarray(g_mse[..., C:]) == 0) and np.abs(g_mse[..., :C]).min() > 0  # mse trains ε only
    np.testing.assert_allclose(g_loss, g_vb + g_mse, rtol=1e-6)
    with pytest.raises(ValueError, match="2C channels"):
        d.training_losses(lambda x, tt, yy: x, x0, t, noise, y)


def test_jit_with_batched_t_and_diffusion_as_argument():
    d = create_diffusion("250")
    f = jax.jit(lambda dd, x, t: dd.q_sample(x, t, x))
    x = jnp.ones((3, 2, 2, 1))
    got = f(d, x, jnp.array([0, 100, 249]))
    ac = REF_AC[[0, 401, 999]]  # respaced 100 -> original round(100·999/249) = 401
    np.testing.assert_allclose(got[:, 0, 0, 0], np.sqrt(ac) + np.sqrt(1 - ac), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------ CFG ---

def _label_model(x, t, y):
    """ε channel k = x + (k+1)·y, v channel k = −(k+1)·y / 100: every output channel depends on the label."""
    C = x.shape[-1]
    k = jnp.arange(1, C + 1, dtype=jnp.float32)
    yy = y.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([x + k * yy, jnp.broadcast_to(-k * yy / 100, x.shape)], -1)


def test_cfg_guides_first_three_channels_only():
    x, t, y, null, s = jax.random.normal(jax.random.key(3), (2, 3, 3, 4)), jnp.array([5, 9]), jnp.array([1, 7]), 10, 4.0
    cond, uncond = _label_model(x, t, y), _label_model(x, t, jnp.full((2,), null))
    got = cfg_model_fn(_label_model, s, null)(x, t, y)
    assert got.shape == (2, 3, 3, 8)
    np.testing.assert_allclose(got[..., :3], uncond[..., :3] + s * (cond[..., :3] - uncond[..., :3]), rtol=1e-5)
    np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])  # 4th ε channel and all v untouched (cond half)
    all_eps = cfg_model_fn(_label_model, s, null, guidance_channels=None)(x, t, y)
    np.testing.assert_allclose(all_eps[..., :4], uncond[..., :4] + s * (cond[..., :4] - uncond[..., :4]), rtol=1e-5)
    np.testing.assert_allclose(cfg_model_fn(_label_model, 1.0, null)(x, t, y), cond, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_channels"):
        cfg_model_fn(_label_model, s, null, guidance_channels=5)(x, t, y)


def test_cfg_batches_first_half_with_null_labels():
    seen = {}

    def model(x, t, y):
        seen.update(x=x, t=t, y=y)
        return _label_model(x, t, y)

    x = jax.random.normal(jax.random.key(4), (3, 2, 2, 4))
    cfg_model_fn(model, 2.0, 1000)(x, jnp.array([1, 2, 3]), jnp.array([5, 6, 7]))
    assert np.asarray(seen["y"]).tolist() == [5, 6, 7, 1000, 1000, 1000]
    assert np.asarray(seen["t"]).tolist() == [1, 2, 3, 1, 2, 3]
    np.testing.assert_array_equal(seen["x"][:3], x)
    np.testing.assert_array_equal(seen["x"][3:], x)


# -------------------------------------------------------------------------------------------------------- samplers ---

def _true_eps_model(m, s, v=0.0):
    """Exact E[ε | x_t] for data x0 ~ N(m, s²) iid, under the ORIGINAL 1000-step schedule (so a wrong timestep map
    breaks it). s = 0 is the point mass x0 = m: ε = (x_t − sqrt(ᾱ)·m)/sqrt(1 − ᾱ)."""
    ac = jnp.asarray(REF_AC, jnp.float32)

    def model(x, t, y):
        a = ac[t][:, None, None, None]
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / (a * s ** 2 + 1 - a)
        return jnp.concatenate([eps, jnp.full_like(eps, v)], -1).astype(x.dtype)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_reach_point_mass(sampler):
    c = jnp.array([0.5, -0.25, 0.8, -1.0])
    out = sample(_true_eps_model(c, 0.0), create_diffusion("25"), (4, 3, 3, 4), jax.random.key(5), jnp.zeros(4),
                 sampler=sampler)
    assert out.shape == (4, 3, 3, 4) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.broadcast_to(c, out.shape), atol=2e-3)


def _analytic_moments(spacing, m, s, sampler, v):
    """Mean and std of the sampler's output for N(m, s²) data with the exact ε model, in float64.

    With that model every step is affine in x plus Gaussian noise, x_{k−1} = A·x_k + B + σ·z, so the moments follow
    M ← A·M + B, V ← A²·V + σ² from x_K ~ N(0, 1). Derived from the IDDPM formulas, independent of the package.
    """
    kept = sorted(space_timesteps(T, spacing))
    ref = Ref(respace_betas(REF_BETAS, kept)[0])
    M, V = 0.0, 1.0
    for k in reversed(range(len(kept))):
        a, ap = ref.ac[k], ref.ac_prev[k]
        D = a * s ** 2 + 1 - a
        e1, e0 = np.sqrt(1 - a) / D, -np.sqrt(1 - a) * np.sqrt(a) * m / D  # ε = e1·x + e0
        p1, p0 = 1 / np.sqrt(a) - np.sqrt(1 / a - 1) * e1, -np.sqrt(1 / a - 1) * e0  # x̂0 = p1·x + p0
        if sampler == "ddpm":
            c1, c2 = ref.b[k] * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - ref.b[k]) / (1 - a)
            A, B = c1 * p1 + c2, c1 * p0
            frac = (v + 1) / 2
            var = np.exp(frac * np.log(ref.b[k]) + (1 - frac) * ref.plv[k]) if k > 0 else 0.0
        else:  # DDIM, eta = 0
            A, B, var = p1 * np.sqrt(ap) + np.sqrt(1 - ap) * e1, p0 * np.sqrt(ap) + np.sqrt(1 - ap) * e0, 0.0
        M, V = A * M + B, A * A * V + var
    return M, np.sqrt(V)


@pytest.mark.parametrize("sampler,v", [("ddpm", -1.0), ("ddpm", 1.0), ("ddpm", 0.3), ("ddim", 0.0)])
def test_samplers_match_analytic_gaussian_moments(sampler, v):
    m, s = 0.7, 0.5
    out = np.asarray(sample(_true_eps_model(m, s, v), create_diffusion("50"), (256, 4, 4, 1), jax.random.key(6),
                            jnp.zeros(256), sampler=sampler), np.float64)
    M, S = _analytic_moments("50", m, s, sampler, v)
    # 4096 draws: the standard errors are about S/64 for the mean and S/90 for the std; allow ~3 of them.
    assert abs(out.mean() - M) < 0.025 and abs(out.std() - S) < 0.02, (out.mean(), out.std(), M, S)
    if sampler == "ddim" or v == 1.0:  # these two land close to the data distribution itself at 50 steps
        assert abs(M - m) < 0.02 and abs(S - s) < 0.03, (M, S)


def test_sampler_calls_model_with_original_timesteps():
    seen = []

    def model(x, t, y):
        jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)

    sample(model, create_diffusion("ddim10"), (1, 2, 2, 1), jax.random.key(0), jnp.zeros(1))
    assert seen == list(range(900, -1, -100))


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    d, model = create_diffusion("10"), _true_eps_model(0.3, 0.5)
    x_T = jax.random.normal(jax.random.key(7), (2, 2, 2, 1))
    run = lambda sampler, seed: sample(model, d, x_T.shape, jax.random.key(seed), jnp.zeros(2), sampler=sampler, x_T=x_T)
    np.testing.assert_array_equal(run("ddim", 1), run("ddim", 2))
    assert not np.allclose(run("ddpm", 1), run("ddpm", 2))


def test_step_compiles_once_and_bf16_keeps_dtype():
    traces = []

    def model(x, t, y):
        traces.append(x.dtype)  # runs only while tracing
        return _true_eps_model(0.0, 0.5)(x, t, y)

    d = create_diffusion("20")
    out = sample(model, d, (2, 2, 2, 4), jax.random.key(8), jnp.array([1, 2]), cfg_scale=1.5, null_y=10,
                 dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert len(traces) == 1, f"step traced {len(traces)} times for 20 steps"
    sample(model, d, (2, 2, 2, 4), jax.random.key(9), jnp.array([3, 4]), cfg_scale=3.0, null_y=10, dtype=jnp.bfloat16)
    assert len(traces) == 1, "a new key, labels or cfg scale must not recompile"


def test_sample_rejects_bad_arguments():
    d = create_diffusion("5")
    with pytest.raises(ValueError, match="null_y"):
        sample(_label_model, d, (2, 2, 2, 4), jax.random.key(0), jnp.zeros(2), cfg_scale=2.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(_label_model, d, (2, 2, 2, 4), jax.random.key(0), jnp.zeros(2), sampler="euler")
    with pytest.raises(ValueError, match=r"y must have shape"):
        sample(_label_model, d, (2, 2, 2, 4), jax.random.key(0), jnp.zeros(3))


def test_ddpm_step_matches_diffusers_learned_range():
    """Cross-check one respaced ancestral step against diffusers' DDPMScheduler (an independent implementation)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from terdit_jax.diffusion import p_sample

    kept = sorted(space_timesteps(T, "250"))
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    variance_type="learned_range", clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(timesteps=kept[::-1])
    d = create_diffusion("250")
    x, out = rand(20, 2, 4, 4, 3), np.concatenate([rand(21, 2, 4, 4, 3), rand(22, 2, 4, 4, 3, scale=0.5)], -1)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float()
    for k in (1, 100, 249):  # diffusers clamps the t = 0 posterior variance differently; the noise is off there anyway
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(k))
        want = sched.step(nchw(out), kept[k], nchw(x), generator=torch.Generator().manual_seed(k)).prev_sample
        got = p_sample(d, jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), jnp.full((2,), k),
                       jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
