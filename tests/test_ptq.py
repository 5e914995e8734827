"""Post-training quantization: the calibration set, CSB/SSC and the re-parameterization, the quantized-model
format, `--mode quantize` → `--mode sample` end to end on a tiny model, resume, and bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from terdit_jax import trees
from terdit_jax.checkpoint import Checkpoints
from terdit_jax.config import base_config, finalize
from terdit_jax.model_fn import init_model
from terdit_jax.ptq import checkpoint as qckpt, common as ptq, ptq4dit
from terdit_jax.ptq.calibration import CalibrationError, calibration_set, selected_steps
from terdit_jax.ptq.run import run_quantize_mode


def pixel_config(**model):
    """A 2-block full-precision Large-DiT on 8×8×1 pixels (16 tokens of width 32), float32."""
    c = base_config()
    c.model.update({**dict(name="custom", dim=32, n_layers=2, n_heads=4, multiple_of=16, patch_size=2, in_channels=1,
                           num_classes=10, dtype="float32", linear="fp"), **model})
    c.data.update(kind="digits", image_size=8, latent=False)
    return finalize(c)


def quick(config, **quant):
    """Seconds-scale settings: 4 sampling steps, 2 calibration steps × 4 latents, 5 reconstruction iterations."""
    c = config.copy_and_resolve_references()
    c.sample.num_steps, c.sample.sampler, c.sample.batch_size = 4, "ddim", 8
    c.quant.update(dict(calib_steps=2, calib_latents=4, recon_iters=5, recon_batch_size=8, **quant))
    return c


def randomised(params, seed=0, scale=0.2):
    rng, leaves = np.random.default_rng(seed), []
    for path, var in nnx.to_flat_state(params):
        v = var.get_value()
        new = 1 + 0.1 * rng.standard_normal(v.shape) if path[-1] == "weight" else scale * rng.standard_normal(v.shape)
        leaves.append((path, var.replace(jnp.asarray(new, v.dtype))))
    return nnx.from_flat_state(leaves)


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    """A workdir holding random full-precision weights of the tiny model (a weights-only checkpoint)."""
    config = quick(pixel_config())
    _, params = init_model(config.model, 0)
    params = randomised(params)
    workdir = str(tmp_path_factory.mktemp("fp_run"))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save_weights(0, params, config.model, {"kind": "test"})
    ckpt.close()
    return config, workdir, params


def test_ssc_weights_are_softmax_of_minus_spearman():
    s_w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    s_x = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [2, 1, 4, 3, 5]], np.float64)  # ρ = 1, −1, 0.8
    rho = np.array([1.0, -1.0, 0.8])
    np.testing.assert_allclose([stats.spearmanr(r, s_w).statistic for r in s_x], rho)
    np.testing.assert_allclose(ptq4dit.ssc_weights(s_x, s_w), np.exp(-rho) / np.exp(-rho).sum(), rtol=1e-12)
    # per time step: the rows of one t are merged by their max before the weights are taken
    t = np.array([7, 7, 3])
    f = ptq4dit.balance_factor(s_x, t, s_w, "timestep")
    merged = np.stack([s_x[2], s_x[:2].max(0)])  # t = 3, t = 7
    eta = ptq4dit.ssc_weights(merged, s_w)
    np.testing.assert_allclose(f, np.sqrt((eta @ merged) / (s_w + 1e-8)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["embed", "condition", "block", "unembed"])
def test_reconstruction_loss_is_the_official_lp_loss_in_the_official_layout(kind):
    """Q-Diffusion's lp_loss sums axis 1 of the official unit output: the conv embedder's (B, D, h, w), the t-MLP's
    (B, D), a block's (B, T, D), the final linear's (B, T, p²C) before unpatchify; ours has other layouts."""
    from terdit_jax.ptq.reconstruct import recon_loss, summed_size
    from terdit_jax.ptq.units import Carry, Unit
    rng, b, h, p, c, d = np.random.default_rng(0), 3, 8, 2, 4, 6
    tokens = rng.standard_normal((b, (h // p) ** 2, d)).astype(np.float32)
    ours = {"embed": (b, (h // p) ** 2, d), "condition": (b, d), "block": (b, (h // p) ** 2, d), "unembed": (b, h, h, c)}
    out, y = (rng.standard_normal(ours[kind]).astype(np.float32) for _ in range(2))
    diff = (out - y).astype(np.float64) ** 2
    official = {"embed": lambda e: e.transpose(0, 2, 1).reshape(b, d, h // p, h // p),
                "condition": lambda e: e, "block": lambda e: e,
                "unembed": lambda e: e.reshape(b, h // p, p, h // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
                    b, (h // p) ** 2, p * p * c)}[kind](diff)
    want = official.sum(axis=1).mean()
    carry = Carry(np.zeros((b, h, h, c)), np.zeros(b), np.zeros(b), tokens=None if kind == "embed" else tokens)
    got = recon_loss(jnp.asarray(out), jnp.asarray(y), summed_size(Unit(kind), carry, y))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_t_mlp_layers_are_reconstructed_at_their_own_outputs(fp_run):
    """PTQ4DiT's layer reconstruction of the t-MLP (the official code): what t_embedder.mlp_0 learns is judged at
    its own output, so it cannot depend on mlp_2's weights (the joint unit's does: the check can fail), and the
    mlp_2 step leaves mlp_0 as it was."""
    from terdit_jax.ptq.reconstruct import ReconSettings, reconstruct
    from terdit_jax.ptq.units import Carry, Unit, run_unit

    config, _, params = fp_run
    values = trees.flat(params)
    other = {**values, "t_embedder.mlp_2.kernel": -3.0 * np.asarray(values["t_embedder.mlp_2.kernel"])[::-1]}
    q_cfg = ptq.with_sites(config.model, ptq.uniform_rules(config.model, 3, 16, init="minmax"))
    rng = np.random.default_rng(0)
    e = 16
    carry = Carry(x=np.zeros((e, 8, 8, 1), np.float32), t=rng.integers(0, 1000, e).astype(np.int32),
                  y=rng.integers(0, 11, e).astype(np.int32))
    settings = ReconSettings(iters=40, batch_size=8, lr_alpha=0.05, warmup=0.0)
    groups = np.arange(e).reshape(-1, 4)
    condition = Unit("condition")
    first, second = condition.parts()
    assert (first.part, second.part) == ("t_embedder.mlp_0", "t_embedder.mlp_2")

    def mlp_0_after(vals, unit):
        fp, model = ptq.host_model(config.model, vals), ptq.host_model(q_cfg, vals)
        ptq.init_weights(model)
        reconstruct(model, unit, carry, run_unit(fp, unit, carry), groups, settings)
        return model, np.asarray(model.t_embedder.mlp_0.kernel[...])

    model, ours = mlp_0_after(values, first)
    nearest = np.asarray(model.t_embedder.mlp_0.weight_site(jnp.asarray(values["t_embedder.mlp_0.kernel"]), None))
    assert not np.allclose(ours, nearest, rtol=0, atol=1e-6)  # the reconstruction moved some roundings
    np.testing.assert_array_equal(mlp_0_after(other, first)[1], ours)
    assert np.any(mlp_0_after(values, condition)[1] != mlp_0_after(other, condition)[1])
    fp = ptq.host_model(config.model, values)
    reconstruct(model, second, carry, run_unit(fp, condition, carry), groups, settings)
    np.testing.assert_array_equal(np.asarray(model.t_embedder.mlp_0.kernel[...]), ours)


def test_calibration_set_layout(fp_run, tmp_path):
    config, workdir, params = fp_run
    apply, _ = init_model(config.model, 0)
    calib = calibration_set(apply, params, config, {"workdir": workdir, "step": 0}, str(tmp_path))
    assert len(calib) == 2 * 4 * 2  # steps × latents × {class, null}
    assert selected_steps(4, 2) == [0, 2]  # every (N // count)-th step, noisiest first
    np.testing.assert_array_equal(np.unique(calib.k), [1, 3])  # respaced indices of trajectory positions 2 and 0
    for g in calib.groups():  # [c, c, null, null]: two latents of one class, then the same two unconditioned
        y = calib.y[g]
        assert y[0] == y[1] != 10 and (y[2:] == 10).all()
        np.testing.assert_array_equal(calib.x[g[:2]], calib.x[g[2:]])
        assert len(set(calib.t[g])) == 1
    assert len(calib.init) == 2 * 4  # one group per selected step
    again = calibration_set(apply, params, config, {"workdir": workdir, "step": 0}, str(tmp_path))
    np.testing.assert_array_equal(again.x, calib.x)  # read back, not recorded again
    other = config.copy_and_resolve_references()
    other.quant.calib_path = [os.path.join(str(tmp_path), f) for f in os.listdir(tmp_path) if f.endswith(".npz")][0]
    with pytest.raises(CalibrationError, match="another model or other settings"):
        calibration_set(apply, params, other, {"workdir": workdir, "step": 99}, str(tmp_path))


@pytest.mark.parametrize("family,reparam", [("large_dit", False), ("large_dit", True), ("dit", True)])
def test_csb_and_its_reparameterization_leave_the_fp_output_unchanged(fp_run, family, reparam):
    """Large-DiT folds into its pre-norm weights and the TerDiT adaLN RMSNorm, the DiT into its adaLN rows."""
    fp_cfg = fp_run[0].model if family == "large_dit" else pixel_config(family="dit").model
    apply, params = init_model(fp_cfg, 0)
    params = randomised(params, seed=4)
    roles = ptq.roles(fp_cfg)
    rules = ptq.uniform_rules(fp_cfg, 16, 16, init="minmax", smooth_inputs=ptq.csb_inputs(roles))
    rules = tuple(r for r in rules if r["kind"] == "smooth")  # CSB's division alone, nothing quantized
    model = ptq.host_model(ptq.with_sites(fp_cfg, rules), {k: np.asarray(v) for k, v in trees.flat(params).items()})
    groups = ptq4dit.csb_groups(model, roles)
    rng = np.random.default_rng(3)
    factors = {site: rng.uniform(0.2, 5.0, ptq.module_at(model, lins[0]).kernel.shape[0]).astype(np.float32)
               for site, lins in groups}
    ptq4dit.apply_csb(model, groups, factors)
    first = groups[0][1][0]
    assert not np.allclose(ptq.module_at(model, first).kernel[...], trees.flat(params)[first + ".kernel"])
    if reparam:
        ptq4dit.fold(model, roles, fp_cfg.family)
        for site, _ in groups:  # the divisions moved out of the sites
            np.testing.assert_array_equal(ptq.site_at(model, site).smooth[...], 1.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    t, y = jnp.array([5, 900]), jnp.array([3, 10])
    want = np.asarray(apply(params, x, t, y))
    got = np.asarray(model(x, t, y))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_quantize_resume_and_sample_end_to_end(fp_run, monkeypatch):
    """PTQ4DiT W4A8 on the tiny model, stopped inside block 1, resumed there, then sampled like any model."""
    from terdit_jax.sample import load_for_sampling, run_sample_mode

    config, workdir, params = fp_run
    c = quick(config, method="ptq4dit", w_bits=4, a_bits=8)
    calls, real = [], ptq4dit.reconstruct

    def flaky(model, unit, *a, **k):
        calls.append(unit.name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stopped inside block 1 (the t-MLP's two linears are two calls)
        return real(model, unit, *a, **k)
    monkeypatch.setattr(ptq4dit, "reconstruct", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_quantize_mode(c, workdir, log=lambda *_: None)
    out = qckpt.model_dir(workdir, "ptq4dit_w4a8")
    with open(os.path.join(out + ".partial", "progress.json")) as f:
        assert json.load(f)["done_units"] == 3
    with pytest.raises(qckpt.QuantizedModelError, match="interrupted: rerun"):
        qckpt.read_manifest(out)
    calls.clear()
    manifest = run_quantize_mode(c, workdir, log=lambda *_: None)
    assert calls == ["block 1", "unembed"]  # resumed at the unit it was in
    assert os.path.exists(os.path.join(out, qckpt.MANIFEST)) and not os.path.exists(out + ".partial")
    assert set(manifest["stages"]) == {"calibration set", "csb", "weight quantizers", "activation quantizers",
                                       "reconstruction"}  # the earlier stages' report came with the resume point
    # every unit's losses, the interrupted run's included
    assert [u["unit"] for u in manifest["info"]["units"]] == ["embed", "condition t_embedder.mlp_0",
                                                              "condition t_embedder.mlp_2", "block 0", "block 1",
                                                              "unembed"]
    assert manifest["deployed_bytes"] < sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    s = c.copy_and_resolve_references()
    s.sample.quantized = "ptq4dit_w4a8"
    s.sample.classes, s.sample.per_class = "1,2", 1
    cfg, apply, qparams, step, _ = load_for_sampling(s, workdir)
    assert any(r["path"].endswith(r"\.weight") and r["bits"] == 4 for r in cfg.model.sites)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    t, y = jnp.array([5, 900]), jnp.array([3, 10])
    qout = np.asarray(apply(qparams, x, t, y))
    fout = np.asarray(init_model(c.model, 0)[0](params, x, t, y))
    assert 0 < np.abs(qout - fout).max() < np.abs(fout).max()  # quantized: close to, not equal to, the FP model
    paths = run_sample_mode(s, workdir, log=lambda *_: None)
    assert os.path.basename(paths["grid"]) == "sample_ptq4dit_w4a8_0000000_ddim4_cfg4.png"  # model, step, sampler
    with np.load(paths["npz"]) as f:
        assert f["arr_0"].shape == (2, 8, 8, 1) and f["arr_0"].dtype == np.uint8


def test_bad_requests_are_refused_and_nothing_is_overwritten(fp_run):
    config, workdir, _ = fp_run
    c = quick(config, method="rtn", w_bits=8, a_bits=8)
    run_quantize_mode(c, workdir, log=lambda *_: None)
    path = os.path.join(qckpt.model_dir(workdir, "rtn_w8a8"), qckpt.MANIFEST)
    before = os.path.getmtime(path)
    with pytest.raises(qckpt.QuantizedModelError, match="holds a quantized model already"):
        run_quantize_mode(c, workdir, log=lambda *_: None)
    assert os.path.getmtime(path) == before
    other = quick(pixel_config(n_layers=3))
    other.sample.quantized = "rtn_w8a8"
    from terdit_jax.sample import load_for_sampling
    said = []
    cfg, *_ = load_for_sampling(other, workdir, log=said.append)  # the manifest's architecture wins, and says so
    assert cfg.model.n_layers == 2 and len(said) == 1 and "model.n_layers=2 (config: 3)" in said[0]
    wrong = c.copy_and_resolve_references()
    wrong.sample.quantized, wrong.quant.method = "rtn_w8a8", "ptq4dit"
    with pytest.raises(qckpt.QuantizedModelError, match="made by 'rtn'"):
        load_for_sampling(wrong, workdir)
