"""Deployed PTQ models (ptq/deploy.py, models/integer.py, quant/integer.py): integer weights and int8 matmuls equal
the fake-quantized model they came from, for RTN, PTQ4DiT and TQ-DiT on both families, and bad requests are refused
without touching anything."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax.checkpoint import Checkpoints
from terdit_jax.config import finalize
from terdit_jax.export import ExportError, load_packed, read_manifest
from terdit_jax.model_fn import init_model
from terdit_jax.models.integer import IntDense
from terdit_jax.ptq import checkpoint as qckpt
from terdit_jax.ptq.common import module_at
from terdit_jax.ptq.deploy import export_deployed
from terdit_jax.ptq.run import run_quantize_mode
from terdit_jax.quant.integer import encode
from test_ptq import pixel_config, quick, randomised

pytestmark = pytest.mark.usefixtures("xla_cache")  # the shared compile cache (conftest)
QUIET = dict(log=lambda *_: None)
# Every method on both families and both weight containers (int8 codes, packed int4), six runs in all.
# one case in the default tier; the other five (every method at both widths, both families) are slow
CASES = [pytest.param(*c, marks=pytest.mark.slow) for c in [("large_dit", "rtn", 8), ("dit", "rtn", 4),
                                                            ("large_dit", "ptq4dit", 4), ("dit", "ptq4dit", 8)]]
CASES += [("large_dit", "tqdit", 8), pytest.param("dit", "tqdit", 4, marks=pytest.mark.slow)]


def _fp_workdir(root, family: str, scale: float = 0.2, image_size: int = 8, **model):
    config = pixel_config(**({"family": "dit"} if family == "dit" else {}), **model)
    config.data.image_size = image_size
    config = quick(finalize(config))
    _, params = init_model(config.model, 0)
    workdir = str(root / family)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save_weights(0, randomised(params, scale=scale), config.model, {"kind": "test"})
    ckpt.close()
    return config, workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    return {f: _fp_workdir(root, f) for f in ("large_dit", "dit")}


def _quantize(workdirs, family, method, w_bits, a_bits=8):
    config, workdir = workdirs[family]
    extra = {"time_groups": 2} if method == "tqdit" else {}
    c = quick(config, method=method, w_bits=w_bits, a_bits=a_bits, **extra)
    name = f"{method}_w{w_bits}a{a_bits}"
    if not os.path.exists(qckpt.model_dir(workdir, name)):
        run_quantize_mode(c, workdir, **QUIET)
    c.sample.quantized = name
    return c, workdir, name


def _inputs(n_classes=10):
    """A CFG batch (conditional rows, then the null class) whose timesteps fall in both TQ-DiT time groups."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 1)), jnp.float32)
    t = jnp.array([3, 500, 999])
    x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
    y = jnp.array([1, 7, 4] + [n_classes] * 3)
    return x, t, y


def _fake_linear(qmodel, path: str):
    """The fake-quantized linear at `path` with the input site it reads (its own, or its module's shared one)."""
    qlin = module_at(qmodel, path)
    site = qlin.input_site if qlin.input_site is not None else module_at(qmodel, path.rsplit(".", 1)[0]).input_site
    return qlin, site


@pytest.mark.parametrize("family,method,w_bits", CASES)
def test_deployed_model_equals_the_fake_quantized_model(workdirs, tmp_path, family, method, w_bits):
    """Every integer linear gives the fake-quantized linear's output to float round-off on the same input (CFG
    batch, both TQ-DiT time groups). The whole forward may differ where a value lies within round-off of a rounding
    boundary of a later quantizer (one code apart), so there it is bounded by a small part of the quantization
    error itself."""
    c, workdir, name = _quantize(workdirs, family, method, w_bits)
    manifest = export_deployed(c, workdir, str(tmp_path / "dep"), **QUIET)
    assert manifest["kind"] == "ptq" and manifest["compute"]["integer_linears"] > 0
    assert manifest["compute"]["float_sites"] == []
    qapply, qstate, _, _ = qckpt.load_quantized(qckpt.model_dir(workdir, name))
    dapply, dstate, dcfg, _ = load_packed(manifest["path"])
    codes = [v.get_value() for k, v in nnx.to_flat_state(dstate) if k[-1] == "codes"]
    assert codes and {a.dtype for a in codes} == {np.dtype(np.int8 if w_bits == 8 else np.uint8)}
    qmodel, dmodel = nnx.merge(qapply.graphdef, qstate), nnx.merge(dapply.graphdef, dstate)
    x, t, y = _inputs()
    rng = np.random.default_rng(2)
    for path, lin in ((".".join(map(str, p)), m) for p, m in nnx.iter_modules(dmodel) if isinstance(m, IntDense)):
        h = jnp.asarray(rng.standard_normal((len(t), 3, lin.k)), jnp.float32)
        qlin, site = _fake_linear(qmodel, path)
        want = np.asarray(qlin(site(h, t) if site is not qlin.input_site else h, t))
        got = np.asarray(lin(h, t))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), path
    fake = np.asarray(jax.jit(qapply)(qstate, x, t, y))
    deployed = np.asarray(jax.jit(dapply)(dstate, x, t, y))
    fp_apply, _ = init_model(workdirs[family][0].model, 0)
    from terdit_jax.checkpoint import load_ema
    _, fp_params, _ = load_ema(workdirs[family][0], workdir)
    fp = np.asarray(fp_apply(fp_params, x, t, y))
    assert np.linalg.norm(deployed - fake) <= 0.05 * np.linalg.norm(fake - fp)
    assert np.mean(np.abs(deployed - fake) <= 1e-5 * np.abs(fake).max()) > 0.5


def test_integer_accumulators_are_the_fake_quantizers_integers(workdirs):
    """Codes recovered from the fake-quantized float tensors (x̂/Δ + z, a NumPy int64 matmul) give exactly the int32
    accumulators of the deployed layer, for every integer linear of a deployed PTQ4DiT W4A8 model."""
    c, workdir, name = _quantize(workdirs, "large_dit", "ptq4dit", 4)
    qapply, qstate, _, _ = qckpt.load_quantized(qckpt.model_dir(workdir, name))
    qmodel = nnx.merge(qapply.graphdef, qstate)
    dapply, dstate, _, _ = load_packed(export_deployed(c, workdir, str(workdir) + "/acc", **QUIET)["path"])
    dmodel = nnx.merge(dapply.graphdef, dstate)
    rng = np.random.default_rng(1)
    checked = 0
    for path, lin in ((".".join(map(str, p)), m) for p, m in nnx.iter_modules(dmodel) if isinstance(m, IntDense)):
        x = jnp.asarray(rng.standard_normal((5, lin.k)) * 2, jnp.float32)
        (part,) = encode(lin.input_site, x, None)
        acc = np.asarray(lin.accumulate(part.codes))
        qlin, site = _fake_linear(qmodel, path)
        x_hat = np.asarray(site(x, None), np.float64)
        delta, zero = float(site.delta[...].reshape(())), float(site.zero[...].reshape(()))
        a = np.rint(x_hat / delta + zero).astype(np.int64) - 2 ** (site.bits - 1)  # stored (signed) codes
        w_hat = np.asarray(qlin.weight_site(qlin.kernel[...], None), np.float64)
        wd, wz = np.asarray(qlin.weight_site.delta[...]).reshape(-1), np.asarray(qlin.weight_site.zero[...]).reshape(-1)
        u = np.rint(w_hat / wd + wz).astype(np.int64) - 2 ** (qlin.weight_site.bits - 1)
        np.testing.assert_array_equal(acc, a @ u)
        checked += 1
    assert checked == 21  # t-MLP 2, embedder, 3 per block's attention inputs + wo, w1/w3/w2, adaLN, final


@pytest.mark.slow
def test_a_deployed_model_samples_the_fake_quantized_models_images(tmp_path):
    """End to end on the demo-size model (dim 64, 4 blocks, 49 tokens, small random weights), 4 DDIM steps at CFG 4:
    the deployed RTN W8A8 model's images are the fake-quantized model's up to activations that lie within round-off
    of a rounding boundary (one code apart, then spread by attention and magnified by guidance): their mean
    difference stays below the quantization error (fake-quantized against full precision) and 1.5 grey levels."""
    from terdit_jax.sample import run_sample_mode
    c, workdir = _fp_workdir(tmp_path, "large_dit", scale=0.04, dim=64, n_layers=4, n_heads=4, multiple_of=32,
                             patch_size=4, pos_embed="sincos", prediction="v", image_size=28)
    q = quick(c, method="rtn", w_bits=8, a_bits=8)
    run_quantize_mode(q, workdir, **QUIET)
    q.sample.classes, q.sample.per_class = "0,3,8", 1
    fp = run_sample_mode(q, workdir, **QUIET)["npz"]
    q.sample.quantized = "rtn_w8a8"
    out = export_deployed(q, workdir, **QUIET)["path"]
    fake = run_sample_mode(q, workdir, **QUIET)["npz"]
    d = q.copy_and_resolve_references()
    d.sample.quantized, d.sample.packed_path = "", out
    deployed = run_sample_mode(d, workdir, **QUIET)["npz"]
    images = []
    for path in (fp, fake, deployed):
        with np.load(path) as f:
            images.append(f["arr_0"].astype(np.float64))
    fp, fake, deployed = images
    assert fake.shape == (3, 28, 28, 1)
    # Measured: 0.92 grey levels (max 7) against a quantization error of 1.40: one flipped code in the first step
    # moves every later x_t, so the two trajectories part by about as much as W8A8 moves this small model.
    assert np.abs(deployed - fake).mean() <= min(np.abs(fake - fp).mean(), 1.5)


def test_bad_requests_are_refused_and_nothing_is_overwritten(workdirs, tmp_path):
    c, workdir, name = _quantize(workdirs, "dit", "tqdit", 4)
    out = str(tmp_path / "dep")
    export_deployed(c, workdir, out, **QUIET)
    before = os.path.getmtime(os.path.join(out, "manifest.json"))
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_deployed(c, workdir, out, **QUIET)
    half = tmp_path / "half"
    half.mkdir()
    with pytest.raises(ExportError, match="without a manifest"):
        export_deployed(c, workdir, str(half), **QUIET)
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == before
    from terdit_jax.sample import check_deployed
    manifest = read_manifest(out)
    other = c.copy_and_resolve_references()
    other.sample.num_steps = 8  # TQ-DiT's two time groups were calibrated over 4 steps
    with pytest.raises(ExportError, match="num_steps=4"):
        check_deployed(manifest, other, out)
    wider = c.copy_and_resolve_references()
    wider.model.dim = 64
    with pytest.raises(ExportError, match="another architecture: model.dim=32"):
        check_deployed(manifest, wider, out)
    check_deployed(manifest, c, out)  # its own config samples it


def test_the_deployment_benchmark_counts_bytes_from_the_layer_shapes():
    """benchmarks/deploy_ptq.py --quick: its W8A8 linear bytes are K·N int8 codes plus Δw, zw, Σu (float32, int32,
    int32) and the float32 bias per output column of every linear of the float model; bf16's are 2 bytes per
    weight and bias. Both goals are judged from those numbers."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import deploy_ptq
    report = deploy_ptq.main(["--quick", "--skip", "time"])
    from terdit_jax.models.families import abstract
    from terdit_jax.models.ternary import Dense
    model = abstract(deploy_ptq.variant_config(deploy_ptq.dit_config(32, True), "fp32"))
    shapes = [(m.kernel.shape, m.bias is not None) for _, m in nnx.iter_modules(model) if isinstance(m, Dense)]
    rows = report["memory"]["32px"]["rows"]
    assert rows["W8A8"]["linear_bytes"] == sum(k * n + 12 * n + 4 * n * b for (k, n), b in shapes)
    assert rows["bf16"]["linear_bytes"] == sum(2 * (k * n + n * b) for (k, n), b in shapes)
    assert report["memory"]["32px"]["goals"]["W8A8_linears_le_0.51x_bf16"] == (
        rows["W8A8"]["linear_bytes"] <= 0.51 * rows["bf16"]["linear_bytes"])


def test_integer_attention_products_equal_the_fake_quantized_products_in_float64():
    """q·kᵀ and softmax·V from integer codes (quant/integer.py) against NumPy float64 products of the fake-quantized
    tensors: asymmetric per-tensor q/k/v and unsigned probabilities (RTN/PTQ4DiT), and symmetric per-head, per-row
    (time-grouped) steps with the two-region softmax quantizer (TQ-DiT)."""
    from terdit_jax.quant.integer import probs_values, qk_logits
    from terdit_jax.quant.quantizers import TwoRegionSoftmax, UniformQuantizer
    rng = np.random.default_rng(3)
    b, t, h, d = 2, 6, 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, h, t, t)) * 2, jnp.float32), axis=-1)
    steps = jnp.array([3, 700])

    def uniform(x, **kw):
        site = UniformQuantizer(path="s", shape=(None, None, h, d), bits=8, **kw)
        site.calibrate(x) if site.time_groups == 1 else [site.calibrate(x * (g + 1), g) for g in range(2)]
        if site.time_groups > 1:
            site.time_group[...] = (jnp.arange(1000) >= 500).astype(jnp.int32)
        return site

    cases = {"per tensor": dict(), "per head, time groups": dict(symmetric=True, granularity="channel", axis=2,
                                                                time_groups=2)}
    for name, kw in cases.items():
        sq, sk, sv = uniform(q, **kw), uniform(k, **kw), uniform(v, **kw)
        q_hat, k_hat, v_hat = (np.asarray(s(x, steps), np.float64) for s, x in ((sq, q), (sk, k), (sv, v)))
        got = np.asarray(qk_logits(encode(sq, q, steps, 3), encode(sk, k, steps, 3)))
        want = np.einsum("bqhd,bkhd->bhqk", q_hat, k_hat)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
        if name == "per tensor":
            sp = UniformQuantizer(path="p", shape=(None, h, None, None), bits=8, zero_point=False)
            sp.calibrate(probs)
        else:
            sp = TwoRegionSoftmax(path="p", shape=(None, h, None, None), bits=8, time_groups=2)
            sp.split[...] = jnp.array([0.05, 0.2])
            sp.time_group[...] = (jnp.arange(1000) >= 500).astype(jnp.int32)
        p_parts = encode(sp, probs, steps, 3)
        assert len(p_parts) == (1 if name == "per tensor" else 2)
        got = np.asarray(probs_values(p_parts, encode(sv, v, steps, 1)))
        want = np.einsum("bhqk,bkhd->bqhd", np.asarray(sp(probs, steps), np.float64), v_hat)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


def test_masked_integer_attention_leaves_the_padding_keys_out():
    """A caption's padding keys (mask 0) get no weight in the integer attention (PixArt's cross-attention): with the
    first n keys kept it equals the integer attention over those n keys alone, and the fake-quantized float
    attention with the same mask."""
    from terdit_jax.models.layers import site_attention
    from terdit_jax.quant.integer import integer_attention
    from terdit_jax.quant.quantizers import UniformQuantizer
    rng = np.random.default_rng(4)
    b, tq, tk, h, d, n = 2, 5, 7, 2, 8, 3
    q = jnp.asarray(rng.standard_normal((b, tq, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, tk, h, d)) * 3, jnp.float32) for _ in range(2))
    sites = []
    for name, x in (("q", q / np.sqrt(d)), ("k", k), ("v", v)):
        s = UniformQuantizer(path=name, shape=(None, None, h, d), bits=8)
        s.calibrate(x)
        sites.append(s)
    sp = UniformQuantizer(path="p", shape=(None, h, None, None), bits=8, zero_point=False)
    sp.calibrate(jax.nn.softmax(jnp.asarray(rng.standard_normal((b, h, tq, tk)), jnp.float32), axis=-1))
    sites = (*sites, sp, None)
    mask = jnp.asarray(np.arange(tk)[None] < n, jnp.int32).repeat(b, 0)
    t = jnp.array([3, 700])
    got = np.asarray(integer_attention(sites, q, k, v, t, mask))
    alone = np.asarray(integer_attention(sites, q, k[:, :n], v[:, :n], t))
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)
    unmasked = np.asarray(integer_attention(sites, q, k, v, t))
    assert np.abs(unmasked - got).max() > 1e-2  # the mask matters
    float_path = np.asarray(site_attention(sites, q, k, v, t, mask=mask))
    assert np.abs(float_path - got).max() <= 1e-4 * np.abs(float_path).max()
