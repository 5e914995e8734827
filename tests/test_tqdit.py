"""TQ-DiT: its two-region quantizers against NumPy, the searches return the minimisers, HO with unit weights is
the MSE search, the time groups of real schedules, group g's parameters act only on group g's steps, and
quantize → sample end to end with the step-count check."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.quant import checkpoint as qckpt, tqdit
from terdit_jax.quant.quantizers import TwoRegionGELU, TwoRegionSigned, TwoRegionSoftmax, UniformQuantizer
from terdit_jax.quant.run import run_quantize_mode
from test_ptq import fp_run, quick  # noqa: F401,F811  (the tiny FP workdir fixture)

RNG = np.random.default_rng(0)


def test_two_region_softmax_matches_numpy():
    x = RNG.uniform(size=(2, 2, 5, 5)).astype(np.float32) ** 4  # mostly small, some near 1
    q = TwoRegionSoftmax(path="p", shape=(None, 2, None, None), bits=4)
    q.split[...] = jnp.asarray(0.125)
    n, s = 7, 0.125
    want = np.where(x < s, np.clip(np.round(x / (s / n)), 0, n) * (s / n), np.clip(np.round(x * n), 0, n) / n)
    np.testing.assert_allclose(q(jnp.asarray(x), None), want, rtol=1e-6, atol=1e-7)


def test_two_region_gelu_and_signed_match_numpy():
    x = RNG.normal(size=(2, 6, 8)).astype(np.float32)
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))
    q = TwoRegionGELU(path="h", shape=(None, None, 8), bits=6)
    q.delta[...] = jnp.asarray(0.1)
    dn = 0.16997124 / 32
    want = np.clip(np.round(gelu / dn), -32, 0) * dn + np.clip(np.round(gelu / 0.1), 0, 31) * 0.1
    np.testing.assert_allclose(q(jnp.asarray(gelu), None), want, rtol=1e-6, atol=1e-7)
    s = TwoRegionSigned(path="h", shape=(None, None, 8), bits=6)
    s.delta[...], s.delta_neg[...] = jnp.asarray(0.1), jnp.asarray(0.05)
    want = np.clip(np.round(x / 0.05), -32, 0) * 0.05 + np.clip(np.round(x / 0.1), 0, 31) * 0.1
    np.testing.assert_allclose(s(jnp.asarray(x), None), want, rtol=1e-6, atol=1e-7)


def _pv_layer(bits=4):
    """A softmax·V layer on constructed operands: probabilities that are mostly tiny with a few large ones."""
    logits = RNG.normal(size=(4, 2, 6, 6)).astype(np.float32) * 3
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    v = RNG.normal(size=(4, 6, 2, 8)).astype(np.float32)
    a_q = TwoRegionSoftmax(path="p", shape=(None, 2, None, None), bits=bits)
    b_q = UniformQuantizer(path="v", shape=(None, None, 2, 8), bits=bits, symmetric=True, granularity="channel", axis=2)
    return probs, v, a_q, b_q


def test_split_and_alpha_searches_return_the_minimisers():
    probs, v, a_q, b_q = _pv_layer()
    grid = np.linspace(0.01, 1.2, 21)
    a, b = tqdit.Operand(a_q, probs, grid), tqdit.Operand(b_q, v, grid)
    tqdit.search_layer("pv", [tqdit.Part(a, jnp.asarray(probs), jnp.asarray(v), None)], b, rounds=2)
    target = tqdit.layer_output("pv", jnp.asarray(probs), jnp.asarray(v))

    def err(split, delta):
        out = tqdit.layer_output("pv", a.apply(jnp.asarray(probs), {"split": split}),
                                 b.apply(jnp.asarray(v), {"delta": delta}))
        return float(jnp.mean(jnp.square(target - out)))
    chosen = err(a.values["split"], b.values["delta"])
    # the last search was B's: its α is the grid minimiser given A, and A's split the minimiser given that B
    assert chosen <= min(err(a.values["split"], c) for c in b.candidates["delta"]) + 1e-12
    assert chosen <= min(err(s, b.values["delta"]) for s in a.candidates["split"]) * (1 + 1e-6) + 1e-12
    assert float(a.values["split"]) < 1.0  # two regions beat one on this skewed tensor
    one_region = err(jnp.asarray(1.0), b.values["delta"])
    assert chosen < one_region


def test_ho_with_unit_weights_is_the_mse_search():
    probs, v, a_q, b_q = _pv_layer()
    grid = np.linspace(0.01, 1.2, 21)
    chosen = []
    for weight in (None, np.ones((4, 6, 16), np.float32)):
        a, b = tqdit.Operand(a_q, probs, grid), tqdit.Operand(b_q, v, grid)
        tqdit.search_layer("pv", [tqdit.Part(a, jnp.asarray(probs), jnp.asarray(v), weight)], b, rounds=2)
        chosen.append((float(a.values["split"]), np.asarray(b.values["delta"])))
    assert chosen[0][0] == chosen[1][0]
    np.testing.assert_array_equal(chosen[0][1], chosen[1][1])


@pytest.mark.parametrize("steps", [250, 50])
def test_time_group_of_every_step(steps):
    d = create_diffusion(str(steps), 1000)
    table = tqdit.group_table(steps, 10, 1000, d.timestep_map)
    tmap = np.asarray(d.timestep_map)
    for i in range(steps):  # i-th sampling step, the noisiest first (respaced index k = T−1−i)
        assert table[tmap[steps - 1 - i]] == min(i // (steps // 10), 9)
    assert np.bincount(table[tmap]).tolist() == [steps // 10] * 10


def test_a_groups_parameters_act_only_on_its_steps():
    q = TwoRegionSoftmax(path="p", shape=(None, 2, None, None), bits=4, time_groups=3)
    q.time_group[...] = jnp.asarray(tqdit.group_table(6, 3, 1000, np.array([0, 200, 400, 600, 800, 999])))
    q.split[...] = jnp.asarray([0.5, 0.25, 0.125])
    x = jnp.asarray(RNG.uniform(size=(6, 2, 4, 4)).astype(np.float32))
    t = jnp.array([999, 800, 600, 400, 200, 0])  # two steps per group: groups 0, 0, 1, 1, 2, 2
    before = np.asarray(q(x, t))
    q.split[...] = q.split[...].at[1].set(0.0625)
    after = np.asarray(q(x, t))
    changed = [not np.array_equal(before[b], after[b]) for b in range(6)]
    assert changed == [False, False, True, True, False, False]


def test_quantize_then_sample_and_the_step_count_check(fp_run):  # noqa: F811
    from terdit_jax.sample import load_for_sampling

    config, workdir, params = fp_run
    c = quick(config, method="tqdit", w_bits=6, a_bits=6, time_groups=2, alpha_grid=11, search_rounds=1)
    manifest = run_quantize_mode(c, workdir, log=lambda *_: None)
    assert manifest["info"]["time_groups"] == 2 and set(manifest["stages"]) >= {"HO weights", "scale search"}
    assert all(np.isfinite(layer["error"]) for layer in manifest["info"]["layers"])
    s = c.copy_and_resolve_references()
    s.sample.quantized = "tqdit_w6a6"
    cfg, apply, qparams, _, _ = load_for_sampling(s, workdir)
    probs = [r for r in cfg.model.sites if r["path"].endswith("probs")]
    assert probs and probs[0]["kind"] == "mrq_softmax" and probs[0]["time_groups"] == 2
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    assert np.isfinite(np.asarray(apply(qparams, x, jnp.array([5, 900]), jnp.array([3, 10])))).all()
    other = s.copy_and_resolve_references()
    other.sample.num_steps = 8
    with pytest.raises(qckpt.QuantizedModelError, match="sample it with --config.sample.num_steps=4"):
        load_for_sampling(other, workdir)
    too_many = quick(config, method="tqdit", name="tq_bad", time_groups=5)  # 5 groups of 4 steps
    with pytest.raises(ValueError, match="more than the 4 sampling steps"):
        run_quantize_mode(too_many, workdir, log=lambda *_: None)
    assert not os.path.exists(qckpt.model_dir(workdir, "tq_bad"))
