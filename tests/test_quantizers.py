"""Fake quantizers (quant/quantizers.py) against NumPy references: every granularity, straight-through gradients,
16-bit near-identity, the percentile-MSE choice, AdaRound's soft start and hard end, and time groups."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terdit_jax.quant.quantizers import PERCENTILES, UniformQuantizer

RNG = np.random.default_rng(0)


def np_quant(x, delta, zero, lo, hi):
    return (np.clip(np.round(x / delta) + zero, lo, hi) - zero) * delta


def np_asym(x, bits, axis):
    lo, hi = np.minimum(x.min(axis=axis, keepdims=True), 0), np.maximum(x.max(axis=axis, keepdims=True), 0)
    delta = np.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
    zero = np.round(-lo / delta)
    return np_quant(x, delta, zero, 0, 2 ** bits - 1)


def test_per_tensor_asymmetric_activation_matches_numpy():
    x = RNG.normal(size=(4, 10, 16)).astype(np.float32) * 3 + 1
    q = UniformQuantizer(path="a.input", shape=(None, 16), bits=4)
    q.calibrate(jnp.asarray(x))
    np.testing.assert_allclose(q(jnp.asarray(x), None), np_asym(x, 4, None), rtol=1e-5, atol=1e-5)
    assert q.delta[...].shape == (1, 1)


def test_per_channel_weight_and_per_group_weight_match_numpy():
    w = RNG.normal(size=(64, 12)).astype(np.float32) * np.linspace(0.1, 3, 12)
    q = UniformQuantizer(path="a.weight", shape=(64, 12), bits=3, granularity="channel", axis=-1)
    q.calibrate(jnp.asarray(w))
    np.testing.assert_allclose(q(jnp.asarray(w), None), np_asym(w, 3, 0), rtol=1e-5, atol=1e-6)
    g = UniformQuantizer(path="a.weight", shape=(64, 12), bits=3, granularity="group", axis=0, group_size=16)
    g.calibrate(jnp.asarray(w))
    ref = np_asym(w.reshape(4, 16, 12), 3, 1).reshape(64, 12)
    np.testing.assert_allclose(g(jnp.asarray(w), None), ref, rtol=1e-5, atol=1e-6)
    assert g.delta[...].shape == (4, 1, 12)


def test_per_token_dynamic_and_symmetric_match_numpy():
    x = RNG.normal(size=(2, 7, 32)).astype(np.float32)
    q = UniformQuantizer(path="a.input", shape=(None, 32), bits=8, granularity="token", dynamic=True)
    np.testing.assert_allclose(q(jnp.asarray(x), None), np_asym(x, 8, -1), rtol=1e-5, atol=1e-6)
    s = UniformQuantizer(path="a.q", shape=(None, None, 4, 8), bits=6, symmetric=True, granularity="channel", axis=2)
    xs = RNG.normal(size=(3, 5, 4, 8)).astype(np.float32) * np.array([1, 2, 4, 8])[:, None]
    s.calibrate(jnp.asarray(xs))
    delta = np.abs(xs).max(axis=(0, 1, 3), keepdims=True) / 31
    np.testing.assert_allclose(s(jnp.asarray(xs), None), np_quant(xs, delta, 0, -32, 31), rtol=1e-5, atol=1e-6)


def test_straight_through_gradients():
    x = jnp.linspace(-3.01, 3.01, 61)  # no point exactly on a clipping boundary
    q = UniformQuantizer(path="a.input", shape=(None,), bits=4)
    q.delta[...], q.zero[...] = jnp.full((1,), 0.2), jnp.full((1,), 8.0)  # range [-1.6, 1.4]
    gx = jax.grad(lambda v: jnp.sum(q(v, None)))(x)
    level = np.round(np.asarray(x) / 0.2) + 8
    inside = (level >= 0) & (level <= 15)  # on the rounded level, as torch.clamp after round_ste
    np.testing.assert_array_equal(gx, inside.astype(np.float32))  # identity inside the range, 0 where clipped
    assert 0 < inside.mean() < 1
    from terdit_jax.quant.quantizers import fake_quant
    gd = jax.grad(lambda d: jnp.sum(fake_quant(x, d, 8.0, 0, 15)))(jnp.asarray(0.2))
    # d/dΔ of Δ·(clip(⌊x/Δ⌉+z) − z) with the STE: (⌊x/Δ⌉ − x/Δ) inside, (level − z) where clipped
    want = np.where(inside, np.round(np.asarray(x) / 0.2) - np.asarray(x) / 0.2, np.clip(level, 0, 15) - 8).sum()
    np.testing.assert_allclose(float(gd), want, rtol=1e-4, atol=1e-3)


def test_sixteen_bits_are_near_identity():
    x = jnp.asarray(RNG.normal(size=(8, 64)).astype(np.float32))
    q = UniformQuantizer(path="a.input", shape=(None, 64), bits=16)
    q.calibrate(x)
    assert float(jnp.max(jnp.abs(q(x, None) - x)) / jnp.max(jnp.abs(x))) < 2e-5


def test_percentile_mse_picks_the_candidate_with_the_smallest_error():
    x = np.concatenate([RNG.normal(size=20000), [40.0, -35.0]]).astype(np.float32)  # two outliers
    q = UniformQuantizer(path="a.input", shape=(None,), bits=4, init="mse")
    q.calibrate(jnp.asarray(x))
    errs = []
    for p in PERCENTILES:
        hi, lo = np.quantile(x, p), np.quantile(x, 1 - p)
        delta = (hi - lo) / 15
        errs.append((np.mean((np_quant(x, delta, np.round(-lo / delta), 0, 15) - x) ** 2), delta))
    best = min(errs)[1]
    np.testing.assert_allclose(float(q.delta[...].reshape(())), best, rtol=1e-4)
    minmax = UniformQuantizer(path="a.input", shape=(None,), bits=4)
    minmax.calibrate(jnp.asarray(x))
    assert float(minmax.delta[...].reshape(())) > 2 * best  # the outliers stretch the min-max range


def test_adaround_starts_at_the_weight_and_ends_on_floor_plus_zero_or_one():
    w = jnp.asarray(RNG.normal(size=(32, 8)).astype(np.float32) * 0.1)
    q = UniformQuantizer(path="a.weight", shape=(32, 8), bits=4, granularity="channel")
    q.calibrate(w)
    q.start_adaround(w)
    level = np.floor(np.asarray(w) / np.asarray(q.delta[...])) + np.asarray(q.zero[...])
    inside = (level >= 0) & (level <= 14)  # where the grid covers w (min-max with a rounded zero point may clip)
    assert inside.mean() > 0.95
    np.testing.assert_allclose(np.asarray(q(w, None))[inside], np.asarray(w)[inside], rtol=1e-5, atol=1e-6)
    q.alpha[...] = jnp.asarray(RNG.normal(size=(32, 8)).astype(np.float32))
    delta, zero = np.asarray(q.delta[...]), np.asarray(q.zero[...])
    hard = q.finish_adaround(w)
    level = np.asarray(hard) / delta + zero
    floor = np.clip(np.floor(np.asarray(w) / delta) + zero, 0, 15)
    np.testing.assert_allclose(level, np.round(level), atol=1e-3)
    assert set(np.unique(np.round(level - floor)[inside]).tolist()) == {0.0, 1.0}  # floor + {0, 1}, both used
    assert q.rounding == "nearest" and q.alpha is None
    np.testing.assert_allclose(q(hard, None), hard, rtol=1e-6, atol=1e-7)  # the baked weight is on the grid


def test_time_groups_select_parameters_per_batch_row():
    q = UniformQuantizer(path="a.probs", shape=(None, 2, None, None), bits=4, zero_point=False, time_groups=3,
                         granularity="channel", axis=1)
    q.time_group[...] = jnp.asarray(np.arange(1000) // 400, jnp.int32)  # t 0..399 → 0, 400..799 → 1, 800.. → 2
    x = jnp.asarray(RNG.uniform(size=(3, 2, 5, 5)).astype(np.float32))
    for g, scale in enumerate((0.25, 0.5, 1.0)):
        q.calibrate(x * scale, group=g)
    out = q(x * jnp.asarray([0.25, 0.5, 1.0])[:, None, None, None], jnp.array([10, 500, 900]))
    for b, scale in enumerate((0.25, 0.5, 1.0)):
        one = UniformQuantizer(path="a.probs", shape=(None, 2, None, None), bits=4, zero_point=False,
                               granularity="channel", axis=1)
        one.calibrate(x * scale)
        np.testing.assert_allclose(out[b], one(x[b:b + 1] * scale, None)[0], rtol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="outside 2..16"):
        UniformQuantizer(path="a", shape=(None, 4), bits=1)
    with pytest.raises(ValueError, match="dynamic"):
        UniformQuantizer(path="a", shape=(None, 4), bits=8, granularity="token")
