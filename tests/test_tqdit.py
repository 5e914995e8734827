"""TQ-DiT: its two-region quantizers against NumPy, the searches return the minimisers, HO with unit weights is
the MSE search, the time groups of real schedules, group g's parameters act only on group g's steps, and
quantize → sample end to end with the step-count check."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax import trees
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.ptq import checkpoint as qckpt, common as ptq, tqdit
from terdit_jax.quant.quantizers import TwoRegionGELU, TwoRegionSigned, TwoRegionSoftmax, UniformQuantizer
from terdit_jax.ptq.run import run_quantize_mode
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


def _search(kind, a_q, a_x, b_q, b_x, *, weight=None, rounds=2, shared=False, steps=None):
    """One layer's LayerSearch on given operands (B an activation); returns (A's operand, B's operand)."""
    grid = np.linspace(0.01, 1.2, 21)
    a, b = tqdit.Operand(a_q, a_x, grid), tqdit.Operand(b_q, b_x, grid)
    target = np.asarray(tqdit.layer_output(kind, jnp.asarray(a_x), jnp.asarray(b_x)))
    search = tqdit.LayerSearch(kind, [tqdit.Part(a, [b], a_x, [b_x], [target], [weight])], [None], shared=shared)
    if steps is None:
        search.run(rounds)
    else:
        for operand in steps:
            search.step(a if operand < 0 else b, operand)
    return a, b


def np_fake_quant(x, delta, bits):
    """Symmetric uniform fake quantization in NumPy (round half to even, as jnp.round)."""
    m = 2 ** (bits - 1)
    return np.clip(np.round(x / delta), -m, m - 1) * delta


def np_two_region_softmax(x, split, bits):
    n = 2 ** (bits - 1) - 1
    return np.where(x < split, np.clip(np.round(x / (split / n)), 0, n) * (split / n), np.clip(np.round(x * n), 0, n) / n)


def test_the_split_is_the_brute_force_minimiser_against_quantized_v():
    """After A's step (the split, searched first for a matmul), the split is the minimiser over all 20 candidates
    of the NumPy objective with V quantized at its current Δ (our choice; the official scores it against FP V)."""
    probs, v, a_q, b_q = _pv_layer()
    a, b = _search("pv", a_q, probs, b_q, v, steps=[-1])
    d0 = np.abs(v).max(axis=(0, 1, 3), keepdims=True) / (2 ** 3 - 0.5)  # per head, α = 1 before B's step
    np.testing.assert_allclose(np.asarray(b.values["delta"]).reshape(d0.shape), d0, rtol=1e-6)
    target = np.einsum("bhqk,bkhd->bqhd", probs.astype(np.float64), v)
    v_q = np_fake_quant(v, d0, 4)
    errs = [np.sum((target - np.einsum("bhqk,bkhd->bqhd", np_two_region_softmax(probs, s, 4), v_q)) ** 2)
            for s in tqdit.SPLITS]
    assert float(a.values["split"]) == tqdit.SPLITS[int(np.argmin(errs))]
    assert float(a.values["split"]) < 1.0  # two regions beat one on this skewed tensor


def test_ho_with_unit_weights_is_the_mse_search():
    probs, v, a_q, b_q = _pv_layer()
    chosen = []
    for weight in (None, np.ones((4, 6, 16), np.float32)):
        a, b = _search("pv", a_q, probs, b_q, v, weight=weight)
        chosen.append((float(a.values["split"]), np.asarray(b.values["delta"])))
    assert chosen[0][0] == chosen[1][0]
    np.testing.assert_array_equal(chosen[0][1], chosen[1][1])


def test_each_head_gets_its_own_brute_force_minimiser_and_shared_is_worse():
    """q·kᵀ with heads of very different ranges: with the default search q's per-head Δ is each head's minimiser
    over the α grid (a NumPy loop per head), at least as good as the shared α (`quant.shared_alpha`), which
    is the minimiser of the sum."""
    bits, grid = 6, np.linspace(0.01, 1.2, 21)
    scale = np.array([0.05, 1.0, 8.0, 30.0], np.float32)[None, None, :, None]
    q = (RNG.standard_normal((3, 5, 4, 8)) * scale).astype(np.float32)
    k = RNG.standard_normal((3, 5, 4, 8)).astype(np.float32)
    mk = lambda p: UniformQuantizer(path=p, shape=(None, None, 4, 8), bits=bits, symmetric=True,  # noqa: E731
                                    granularity="channel", axis=2)
    a, _ = _search("qk", mk("q"), q, mk("k"), k, steps=[-1])
    a_shared, _ = _search("qk", mk("q"), q, mk("k"), k, steps=[-1], shared=True)
    half = 2 ** (bits - 1) - 0.5
    d0_q = np.abs(q).max(axis=(0, 1, 3)) / half
    k_q = np_fake_quant(k, np.abs(k).max(axis=(0, 1, 3), keepdims=True) / half, bits)
    s_fp = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k)
    err = np.array([[np.sum((s_fp[:, h] - np.einsum("bqd,bkd->bqk", np_fake_quant(q[:, :, h], f * d0_q[h], bits),
                                                     k_q[:, :, h])) ** 2) for h in range(4)] for f in grid])
    np.testing.assert_allclose(np.asarray(a.values["delta"]).ravel(), grid[err.argmin(axis=0)] * d0_q, rtol=1e-5)
    f_shared = grid[err.sum(axis=1).argmin()]
    np.testing.assert_allclose(np.asarray(a_shared.values["delta"]).ravel(), f_shared * d0_q, rtol=1e-5)
    assert err.min(axis=0).sum() < err.sum(axis=1).min()  # heterogeneous heads: independent is strictly better


def test_an_objective_that_is_zero_everywhere_is_an_error():
    """HO weights that are zero over a group's entries leave no scale to choose: an error, not argmin's first."""
    probs, v, a_q, b_q = _pv_layer()
    with pytest.raises(ptq.QuantizeError, match="is zero for every candidate"):
        _search("pv", a_q, probs, b_q, v, weight=np.zeros((4, 6, 16), np.float32))


def test_a_time_group_without_calibration_entries_is_an_error():
    with pytest.raises(ptq.QuantizeError, match=r"time group\(s\) 1 \(sampling steps 3–5\) have no calibration"):
        tqdit.check_groups(np.array([0, 0, 2, 2]), 3, 9)
    tqdit.check_groups(np.array([0, 1, 2]), 3, 9)


class Shift(nnx.Module):
    """A test site: adds a (tokens, channels) parameter δ to one entry's tensor, so jax.grad at δ = 0 is that
    entry's gradient at the site, computed without nnx.capture (the reference for HO's weights)."""

    def __init__(self, *, path: str, shape: tuple, tokens: int):
        self.delta = Delta(jnp.zeros((tokens, shape[-1]), jnp.float32))

    def __call__(self, x, t):
        return x + self.delta[...]


class Delta(nnx.Variable):
    pass


def test_fisher_weights_are_every_entrys_own_squared_gradient(fp_run):  # noqa: F811
    """Every entry e gets g_e² with g_e = ∂ mean((ε̂_e − ε*_e)²)/∂(site output of e): against a per-entry jax.grad
    through a shift site. (The old loss read the model's first batch row only: g² was non-zero for entries 0, 4.)"""
    from terdit_jax.quant.quantizers import QUANTIZERS
    from terdit_jax.ptq.units import Carry
    config, _, params = fp_run
    fp_cfg, values = config.model, {k: np.asarray(v) for k, v in trees.flat(params).items()}
    sites = ["layers.1.attention.wq.output", "layers.0.feed_forward.w2.output"]
    e = 6  # two batches of 4, the second padded
    rng = np.random.default_rng(1)
    x = rng.standard_normal((e, 8, 8, 1)).astype(np.float32)
    t, y = rng.integers(0, 1000, e), rng.integers(0, 10, e)
    target = rng.standard_normal((e, 8, 8, 1)).astype(np.float32)
    ho = tqdit.HOWeights(fp_cfg, values, [sites], Carry(x, t, y), target, batch_size=4)
    got = ho.of_unit(0)
    QUANTIZERS.add("shift", Shift)
    try:
        for site in sites:
            model = ptq.host_model(ptq.with_sites(fp_cfg, ({"path": re.escape(site), "kind": "shift", "tokens": 16},)),
                                   values)
            graphdef, delta, rest = nnx.split(model, Delta, ...)

            def loss(d, i):
                out = nnx.merge(graphdef, d, rest)(x[i:i + 1], t[i:i + 1], y[i:i + 1])
                return jnp.mean(jnp.square(out[..., :1] - target[i:i + 1]))
            for i in range(e):
                g = [v.get_value() for _, v in nnx.to_flat_state(jax.grad(loss)(delta, i))][0]
                assert np.abs(g).max() > 0
                np.testing.assert_allclose(got[site][i].reshape(g.shape), np.square(g), rtol=2e-4,
                                           atol=1e-6 * np.square(g).max())
    finally:
        QUANTIZERS.remove("shift")


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


@pytest.mark.slow
def test_quantize_then_sample_and_the_step_count_check(fp_run):  # noqa: F811
    from terdit_jax.sample import load_for_sampling

    config, workdir, params = fp_run
    c = quick(config, method="tqdit", w_bits=6, a_bits=6, time_groups=2, alpha_grid=11, search_rounds=1)
    manifest = run_quantize_mode(c, workdir, log=lambda *_: None)
    assert manifest["info"]["time_groups"] == 2 and set(manifest["stages"]) >= {"HO weights", "scale search"}
    assert [layer["layer"].split()[0] for layer in manifest["info"]["layers"][:7]] == [
        "linear", "linear", "qk", "pv", "linear", "linear", "linear"]  # embed, then block 0's six layers
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


def test_tgq_all_searches_every_group_and_resumes_layer_by_layer(fp_run, monkeypatch):  # noqa: F811
    """tgq_scope="all": each time group's k, v (and inputs) get their own search, so their G slots differ (they
    were one value stored into all); a run stopped after a few layers resumes at the next layer and ends with
    exactly the quantizer state of an uninterrupted run."""
    config, workdir, _ = fp_run
    settings = dict(method="tqdit", w_bits=6, a_bits=6, time_groups=2, tgq_scope="all", alpha_grid=11,
                    search_rounds=1, ho="mse")
    whole = run_quantize_mode(quick(config, name="tq_whole", **settings), workdir, log=lambda *_: None)
    saves, real = [0], qckpt.save_progress

    def flaky(*args):
        real(*args)
        saves[0] += 1
        if saves[0] == 4:
            raise KeyboardInterrupt  # stopped after the embedding and 3 of block 0's layers
    monkeypatch.setattr(qckpt, "save_progress", flaky)
    c = quick(config, name="tq_resumed", **settings)
    with pytest.raises(KeyboardInterrupt):
        run_quantize_mode(c, workdir, log=lambda *_: None)
    monkeypatch.setattr(qckpt, "save_progress", real)
    logs = []
    resumed = run_quantize_mode(c, workdir, log=logs.append)
    assert any("resuming TQ-DiT at unit 3 of 5, layer 4" in str(m) for m in logs), logs
    untimed = (lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["info"]["layers"]])  # noqa: E731
    assert untimed(resumed) == untimed(whole)
    a, b = ({k: np.asarray(v) for k, v in trees.flat(qckpt.load_quantized(qckpt.model_dir(workdir, n))[1]).items()}
            for n in ("tq_whole", "tq_resumed"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    grouped = [k for k in a if re.search(r"attention\.(k|v|input)_site\.delta$", k)]
    assert len(grouped) == 6
    for k in grouped:
        assert a[k].shape[0] == 2 and not np.array_equal(a[k][0], a[k][1]), k
