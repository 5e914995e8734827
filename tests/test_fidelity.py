"""terdit_jax.eval.fidelity against NumPy loops and closed forms of the Fréchet distance."""
import numpy as np
import pytest

from terdit_jax.eval import fidelity


def test_psnr_matches_a_pixel_loop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 5, 4, 1)).astype(np.uint8)
    b = rng.integers(0, 256, (3, 5, 4, 1)).astype(np.uint8)
    total, count = 0.0, 0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):  # Python ints: no uint8 wrap-around
        total, count = total + (x - y) ** 2, count + 1
    assert fidelity.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / (total / count)), rel=1e-12)
    assert fidelity.psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="paired"):
        fidelity.psnr(a, b[:2])


def test_fid_to_reference_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    assert fidelity.fid_to_reference(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=6)  # equal covariances: only the means' distance is left
    assert fidelity.fid_to_reference(x + shift, x) == pytest.approx(float(shift @ shift), rel=1e-6)
    # a·x: covariance a²Σ, sqrt(Σ·a²Σ) = aΣ → (1 − a)²(|μ|² + tr Σ)
    a, mu, sigma = 1.7, x.mean(0), np.cov(x, rowvar=False)
    expected = (1 - a) ** 2 * (mu @ mu + np.trace(sigma))
    assert fidelity.fid_to_reference(a * x, x) == pytest.approx(expected, rel=1e-6)


def test_class_agreement_matches_a_loop():
    rng = np.random.default_rng(2)
    p, q = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    assert fidelity.class_agreement(p, q) == pytest.approx(sum(int(i == j) for i, j in zip(p, q)) / 200)
    assert fidelity.class_agreement(p, p) == 1.0


def test_relative_error_per_step_matches_a_loop():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(5, 3, 4, 4, 2))
    out = ref + rng.normal(size=ref.shape) * np.arange(1, 6)[:, None, None, None, None] * 0.01
    expected = [np.sqrt(np.sum((o - r) ** 2)) / np.sqrt(np.sum(r ** 2)) for o, r in zip(out, ref)]
    np.testing.assert_allclose(fidelity.relative_error(out, ref), expected, rtol=1e-12)
    assert np.all(np.diff(fidelity.relative_error(out, ref)) > 0)  # the error grows with the noise added
    np.testing.assert_array_equal(fidelity.relative_error(ref, ref), 0.0)
