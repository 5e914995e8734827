"""BitNet b1.58 DiT (`model.linear=bitnet`) and ternary weights with 8-bit activations (`model.act_bits=8`):
BitLinear against a NumPy reference, both straight-through estimators against their analytic gradients, the
baseline's parameter count and norm placement, QAT ↔ packed W2A8 equality (model outputs, and every layer's int32
accumulators in the forward pass), the activation precision in the manifest and what sampling does with it, bad
input, and the benchmark's --tiny mode (whose training steps must lower the loss of every kind)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from test_export import randomise  # every variable random, α of either sign
from terdit_jax import export
from terdit_jax.config import ConfigError
from terdit_jax.model_fn import abstract_model
from terdit_jax.models import packed as packed_lib
from terdit_jax.models.bitnet import BitLinear, bitnet_weight, rms_norm
from terdit_jax.models.families import abstract, count_params
from terdit_jax.models.ternary import Dense, TernaryDense, absmean_ternary, xavier_uniform
from terdit_jax.quant.sites import SiteError, observe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BITNET = dict(linear="bitnet", act_bits=8, pre_norms=False, adaln_norm=False)  # the TerDiT paper's baseline
KINDS = {"ternary_act8": dict(act_bits=8), "bitnet": BITNET}


def inputs():
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 4))
    return x, jnp.array([0, 500, 999]), jnp.array([1, 9, 10])  # label 10 = null class


def np_bitlinear(x, w, b, *, norm: str, act_bits: int, eps=1e-5):
    """BitNet b1.58 from its formulas, float64: γ = mean|W|, W_t = RoundClip(W/(γ+ε), −1, 1); norm inside the layer;
    per-token s = max|x|/127, q = clip(round(x/s), ±127); y = (q·W_t)·s·γ + b. Returns (y, q·W_t or None)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    gamma = np.abs(w).mean()
    w_t = np.clip(np.round(w / (gamma + 1e-6)), -1, 1)
    if norm == "rms":
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    else:
        h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    if act_bits == 16:
        return h @ (gamma * w_t) + b, None
    s = np.abs(h).max(-1, keepdims=True) / 127
    q = np.clip(np.round(h / s), -127, 127)
    return (q @ w_t) * s * gamma + b, q @ w_t


@pytest.mark.parametrize("norm,act_bits", [("rms", 8), ("layer", 8), ("rms", 16)])
def test_bitlinear_matches_a_numpy_reference_of_the_b158_formulas(norm, act_bits):
    layer = BitLinear(48, 24, norm=norm, act_bits=act_bits, use_bias=True, kernel_init=xavier_uniform,
                      axes=(None, None), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    layer.bias[...] = jnp.asarray(0.1 * rng.standard_normal(24), jnp.float32)
    x = (rng.standard_normal((2, 5, 48)) * rng.uniform(0.1, 10, (2, 5, 1)) + 0.5).astype(np.float32)
    y_ref, acc_ref = np_bitlinear(x, np.asarray(layer.kernel[...]), np.asarray(layer.bias[...]), norm=norm,
                                  act_bits=act_bits)
    y = np.asarray(layer(jnp.asarray(x)))
    assert y.shape == (2, 5, 24)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    if act_bits == 8:  # the integer part exactly: the activations were quantized as the formula says
        np.testing.assert_array_equal(np.asarray(layer.accumulator(jnp.asarray(x))), acc_ref.reshape(10, 24))
    # per-tensor γ, not a learned α: BitLinear has no α, and its weight is γ·W_t
    assert "alpha" not in nnx.state(layer, nnx.Param)
    w = np.asarray(layer.weight())
    np.testing.assert_allclose(w, np.abs(np.asarray(layer.kernel[...])).mean() * np.asarray(absmean_ternary(
        layer.kernel[...])), rtol=1e-6)


def test_straight_through_estimators_give_the_analytic_gradients():
    """L = Σ G ⊙ layer(x). Activation STE: ∂L/∂x̃ passes to x unchanged, x̃ = q·s. TerDiT weights (act_bits 8):
    ∂L/∂W = α·x̃ᵀG, ∂L/∂α = Σ (x̃ᵀG) ⊙ W_t. BitNet weights: ∂L/∂W = x̃ᵀG (identity, nothing through γ); its
    ∂L/∂x is the RMSNorm's Jacobian applied to G·(γW_t)ᵀ."""
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((6, 32))).astype(np.float32)
    g = rng.standard_normal((6, 16)).astype(np.float32)
    kw = dict(use_bias=True, kernel_init=xavier_uniform, axes=(None, None), rngs=nnx.Rngs(1))

    def grads(layer):
        graphdef, params = nnx.split(layer, nnx.Param)
        loss = lambda p, x: jnp.sum(g * nnx.merge(graphdef, p)(x))  # noqa: E731
        dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(dp)), np.asarray(dx)

    def quantized(h):  # x̃ = q·s, per-token absmax int8 (terdit_kernels' definition)
        s = np.abs(h).max(-1, keepdims=True) / np.float32(127)
        return np.clip(np.round(h / s), -127, 127) * s

    tern = TernaryDense(32, 16, act_bits=8, alpha_init="randn", **kw)
    tern.alpha[...] = jnp.asarray(-0.4)  # a negative α flips the latent gradient, as in the official code
    dp, dx = grads(tern)
    w_t, alpha = np.asarray(absmean_ternary(tern.kernel[...])), np.float32(-0.4)
    x_hat = quantized(x)
    np.testing.assert_allclose(dx, g @ (alpha * w_t).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["kernel"], alpha * (x_hat.T @ g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["alpha"], np.sum((x_hat.T @ g) * w_t), rtol=1e-5)
    np.testing.assert_allclose(dp["bias"], g.sum(0), rtol=1e-5)

    bit = BitLinear(32, 16, act_bits=8, **kw)
    dp, dx = grads(bit)
    h = np.asarray(rms_norm(jnp.asarray(x), 1e-5))
    latent = np.asarray(bit.kernel[...])
    w = np.abs(latent).mean() * np.asarray(absmean_ternary(bit.kernel[...]))
    np.testing.assert_allclose(dp["kernel"], quantized(h).T @ g, rtol=1e-5, atol=1e-5)
    _, norm_vjp = jax.vjp(lambda v: rms_norm(v, 1e-5), jnp.asarray(x))
    np.testing.assert_allclose(dx, np.asarray(norm_vjp(jnp.asarray(g @ w.T))[0]), rtol=1e-5, atol=1e-5)

    # the weight estimator alone: identity from γ·W_t to W
    g_w = rng.standard_normal(latent.shape).astype(np.float32)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(g_w * bitnet_weight(v)))(latent), g_w)


def test_bitnet_baseline_parameter_count_and_norm_placement():
    """BitLinear in every layer TerDiT quantizes, with a parameter-free RMSNorm inside, and no RMSNorm before attention
    or SwiGLU (nor TerDiT's adaLN RMSNorm): TerDiT's count less one α per ternary layer and those norms' weights."""
    cfg = tiny_config(**BITNET).model
    m = abstract(cfg)
    d, n = cfg.dim, cfg.n_layers
    quantized = [mod for p, mod in nnx.iter_modules(m) if isinstance(mod, Dense) and p[0] == "layers"
                 and ("attention" in p or "feed_forward" in p or p[-1] == "adaLN_modulation")]
    assert len(quantized) == 8 * n and all(isinstance(mod, BitLinear) and mod.norm == "rms" for mod in quantized)
    for block in m.layers:
        assert block.attention_norm is None and block.ffn_norm is None and block.adaLN_norm is None
    for fp in (m.x_embedder, m.t_embedder.mlp_0, m.final_layer.linear, m.final_layer.adaLN_modulation):
        assert type(fp) is Dense  # embedders and the final layer stay full precision, as in TerDiT
    assert count_params(cfg) == count_params(tiny_config().model) - 8 * n - 2 * n * d - n * 6 * d
    assert count_params(tiny_config(linear="bitnet", act_bits=8).model) == count_params(tiny_config().model) - 8 * n
    # the norm sits inside the layer, before activation quantization: a layer ignores the scale of its input
    wq = BitLinear(d, d, use_bias=False, kernel_init=xavier_uniform, axes=(None, None), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (2, 16, d))
    np.testing.assert_allclose(wq(37.0 * h), wq(h), rtol=1e-4, atol=1e-6)


def _export(kind_kw, tmp_path, name="export"):
    config = tiny_config(**kind_kw)
    apply, abstract = abstract_model(config.model)
    params = randomise(abstract, 1)
    out = str(tmp_path / name)
    return config, apply, params, out, export.export_packed(config, params, out)


@pytest.mark.parametrize("kind", KINDS)
def test_qat_forward_equals_the_packed_w2a8_forward_and_its_int32_accumulators(kind, tmp_path):
    # Observers on the inputs of every quantized layer (identity sites) give each model's own layer inputs.
    rules = ({"path": r"layers\.\d+\.(attention\.w.|feed_forward\.w.|adaLN_modulation)\.input", "kind": "observe"},)
    config, apply, params, out, manifest = _export(KINDS[kind], tmp_path)
    assert manifest["act_bits"] == 8 and manifest["model"]["act_bits"] == 8 and "int8" in manifest["activations"]
    assert manifest["model"]["packed_from"] == ("bitnet" if kind == "bitnet" else "ternary")
    apply_p, params_p, cfg, _ = export.load_packed(out)  # nothing says int8: the manifest does
    assert cfg["packed_act_dtype"] == "int8"
    deployed = np.asarray(jax.jit(apply_p)(params_p, *inputs()))  # fused adaLN, as sampling runs it

    observed = tiny_config(**KINDS[kind], sites=rules).model
    qat = nnx.merge(abstract_model(observed)[0].graphdef, params)
    graphdef, _ = export.abstract_packed(observed)
    packed = packed_lib.configure_packed(nnx.merge(graphdef, export.pack_state(params, observed)), "int8", "xla")

    def forward_and_accumulators(model):
        y, seen = observe(model, *inputs())
        layers = {".".join(map(str, p)): mod for p, mod in nnx.iter_modules(model)}
        return y, {site: layers[site[:-len(".input")]].accumulator(x) for site, (x,) in seen.items()}

    (ref, acc_q), (y_p, acc_p) = [jax.jit(forward_and_accumulators)(m) for m in (qat, packed)]
    ref, scale = np.asarray(ref), float(jnp.abs(ref).max())
    assert scale > 1.0
    for got in (deployed, y_p):  # float32 round-off (measured on XLA:CPU: bit-identical)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * scale)
    assert len(acc_q) == 16 and sorted(acc_q) == sorted(acc_p)
    for site, a in acc_q.items():
        assert a.dtype == jnp.int32 and int(jnp.abs(a).max()) > 0
        np.testing.assert_array_equal(np.asarray(a), np.asarray(acc_p[site]), err_msg=site)


def test_sampling_follows_the_exports_activation_precision_and_refuses_a_mismatch(tmp_path):
    from terdit_jax.sample import load_for_sampling

    def user(out, **model):
        c = tiny_config(**model)
        c.sample.packed_path = out
        return c

    _, apply8, params8, a8, _ = _export(KINDS["ternary_act8"], tmp_path, "a8")
    _, apply16, params16, a16, m16 = _export({}, tmp_path, "a16")
    assert m16["act_bits"] == 16 and m16["model"]["packed_act_dtype"] == "bf16"
    cfg, apply_p, params_p, _, _ = load_for_sampling(user(a8), str(tmp_path))  # nothing asked: the export's int8
    assert cfg.model.packed_act_dtype == "int8" and cfg.model.act_bits == 8
    int8_out = np.asarray(jax.jit(apply_p)(params_p, *inputs()))
    for asked in ("f32", "bf16"):  # an explicit bf16 is asked for as much as f32 is
        with pytest.raises(export.ExportError, match="trained with per-token absmax int8.*packed_act_force"):
            load_for_sampling(user(a8, packed_act_dtype=asked), str(tmp_path))
    with pytest.raises(export.ExportError, match=r"trained with compute dtype \(W1.58A16\).*'int8'"):
        load_for_sampling(user(a16, packed_act_dtype="int8"), str(tmp_path))
    # on purpose, with the flag: both directions run, and the arithmetic is the one asked for
    cfg, apply_p, params_p, _, _ = load_for_sampling(user(a8, packed_act_dtype="f32", packed_act_force=True),
                                                     str(tmp_path))
    assert cfg.model.packed_act_dtype == "f32"
    f32_out = np.asarray(jax.jit(apply_p)(params_p, *inputs()))
    assert np.abs(f32_out - int8_out).max() > 1e-4 * np.abs(int8_out).max()
    cfg, _, _, _, _ = load_for_sampling(user(a16, packed_act_dtype="int8", packed_act_force=True), str(tmp_path))
    assert cfg.model.packed_act_dtype == "int8"
    # an activation precision this code cannot run
    path = os.path.join(a8, export.MANIFEST)
    manifest = json.load(open(path))
    manifest["act_bits"] = manifest["model"]["act_bits"] = 4
    json.dump(manifest, open(path, "w"))
    with pytest.raises(export.ExportError, match="act_bits=4.*8 or 16 bits"):
        load_for_sampling(user(a8), str(tmp_path))


def test_bad_input_fails_with_one_clear_message(tmp_path):
    for field, kw in [("act_bits", dict(act_bits=4)), ("act_bits", dict(linear="fp", act_bits=8)),
                      ("bitnet_norm", dict(linear="bitnet", bitnet_norm="group")),
                      ("ternary_gamma", dict(linear="bitnet", ternary_gamma="shard")),
                      ("packed_from", dict(packed_from="fp"))]:
        with pytest.raises(ConfigError, match=f"config.model.{field}"):
            tiny_config(**kw)
    with pytest.raises(SiteError, match="weight is ternary"):
        abstract(tiny_config(linear="bitnet", sites=({"path": r".*wq\.weight", "kind": "observe"},)).model)
    with pytest.raises(SiteError, match="act_bits=8"):
        abstract(tiny_config(act_bits=8, sites=({"path": r".*wq\.weight", "kind": "observe"},)).model)
    with pytest.raises(export.ExportError, match="ternary-weight QAT model"):
        c = tiny_config(linear="fp")
        export.export_packed(c, randomise(abstract_model(c.model)[1]), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    # the command line: one error line, exit 2, no workdir made
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "terdit_jax.main", "--workdir", str(workdir),
                        "--config.model.linear=fp", "--config.model.act_bits=8"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: config.model.act_bits"), r.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_lowbit_benchmark_tiny_mode_runs_and_every_kind_learns(capsys, xla_cache):
    """The benchmark's --tiny mode: its training steps on the demo config (1 block, fixed batch) lower the loss of
    TerDiT, BitNet b1.58 DiT and TerDiT W1.58A8 alike."""
    spec = importlib.util.spec_from_file_location("lowbit_qat", os.path.join(ROOT, "benchmarks", "lowbit_qat.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny"])
    assert json.loads(capsys.readouterr().out) == result
    train = result["train"]
    assert set(train["kinds"]) == {"ternary", "bitnet", "ternary_act8"}
    for kind, r in train["kinds"].items():
        loss = np.asarray(r["loss"])
        assert len(loss) == 1 + 3 * 10 and np.isfinite(loss).all()
        assert loss[-5:].mean() < 0.8 * loss[:5].mean(), (kind, loss)
        assert r["step_s"] > 0
    for kind in ("bitnet", "ternary_act8"):
        step_s = train["kinds"][kind]["step_s"]
        assert train["ratio_over_ternary"][kind] == round(step_s / train["kinds"]["ternary"]["step_s"], 4)
    xla = result["packed_sampling"]["xla"]
    assert xla["w158a8_int8"]["output_finite"] and xla["w158a16_bf16"]["output_finite"]
    if jax.default_backend() == "cpu":
        assert result["packed_sampling"]["kernel"] == "not measured"
