import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax.models.layers import RMSNorm
from terdit_jax.models.ternary import (Dense, TernaryDense, absmean_ternary, init_alpha, ternary_weight,
                                       xavier_uniform)


def test_quantizer_matches_absmean_formula():
    w = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    gamma = np.abs(w).mean()
    expected = np.clip(np.round(w / (gamma + 1e-6)), -1, 1)
    got = np.asarray(absmean_ternary(jnp.asarray(w)))
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) <= {-1.0, 0.0, 1.0}


def test_quantizer_rounds_half_to_even_and_handles_zero_matrix():
    # |W| mean is 1 here, so W/γ ≈ W: 0.5 → 0 and 1.5 → 2 → clipped to 1, as torch.round does.
    w = jnp.array([[0.5, -0.5, 1.5, -1.5, 1.0, 1.0]])
    np.testing.assert_array_equal(absmean_ternary(w), [[0, 0, 1, -1, 1, 1]])
    np.testing.assert_array_equal(absmean_ternary(jnp.zeros((3, 3))), np.zeros((3, 3)))


def test_quantizer_runs_in_float32_for_bf16_weights():
    w = jax.random.normal(jax.random.key(1), (32, 32)).astype(jnp.bfloat16)
    assert absmean_ternary(w).dtype == jnp.float32


def test_ste_gradients_match_the_analytic_form():
    """∂L/∂W = α·∂L/∂w (identity STE) and ∂L/∂α = Σ ∂L/∂w ⊙ W_t, for L = Σ G ⊙ (α W_t)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (16, 24))
    g = jax.random.normal(k2, (16, 24))
    alpha = jnp.asarray(-0.7)  # negative α flips the latent-weight gradient, as in the official code
    dw, dalpha = jax.grad(lambda w, a: jnp.sum(g * ternary_weight(w, a)), argnums=(0, 1))(w, alpha)
    np.testing.assert_allclose(dw, alpha * g, rtol=1e-6)
    np.testing.assert_allclose(dalpha, jnp.sum(g * absmean_ternary(w)), rtol=1e-5)


def test_ternary_dense_forward_and_bf16_compute():
    layer = TernaryDense(8, 5, use_bias=True, kernel_init=xavier_uniform, axes=("a", "b"), rngs=nnx.Rngs(0),
                         dtype=jnp.bfloat16, alpha_init="randn")
    x = jax.random.normal(jax.random.key(3), (4, 8))
    w = layer.alpha[...] * absmean_ternary(layer.kernel[...])
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and layer.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(x @ w), rtol=2e-2, atol=2e-2)


def test_alpha_init_modes():
    assert float(init_alpha("xavier_absmean", (1024, 9216), jax.random.key(0))) == pytest.approx(
        0.5 * np.sqrt(6 / (1024 + 9216)))
    with pytest.raises(ValueError, match="alpha_init"):
        init_alpha("bogus", (2, 2), jax.random.key(0))


def test_fig3_ternary_activations_blow_up_and_rmsnorm_restores_scale():
    """TerDiT Fig. 3: a 1024→9216 (adaLN-sized) layer on a 512×1024 matrix of ones, same seed."""
    x = jnp.ones((512, 1024))
    kw = dict(use_bias=False, kernel_init=xavier_uniform, axes=(None, None))
    fp = Dense(1024, 9216, rngs=nnx.Rngs(0), **kw)
    tern = TernaryDense(1024, 9216, rngs=nnx.Rngs(0), alpha_init="one", **kw)  # α = 1: the raw ternary scale
    np.testing.assert_array_equal(fp.kernel[...], tern.kernel[...])  # same latent weights
    a_fp, a_t = np.abs(np.asarray(fp(x))), np.abs(np.asarray(tern(x)))
    assert a_t.max() > 20 * a_fp.max() and np.median(a_t) > 20 * np.median(a_fp)
    normed = np.asarray(RMSNorm(9216)(tern(x)))
    np.testing.assert_allclose(np.sqrt(np.mean(normed ** 2, axis=-1)), 1.0, rtol=1e-3)
    assert np.abs(normed).max() < 10 * a_fp.max() + 5
