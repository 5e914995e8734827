"""Packed 2-bit deployment: the packed linear kind, the fused adaLN, export/load of packed checkpoints,
their sizes, and the end-to-end sampling benchmark in its CPU mode."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax import export
from terdit_jax.checkpoint import Checkpoints
from conftest import tiny_config as tiny
from terdit_jax.config import base_config, finalize
from terdit_jax.model_fn import abstract_model, split_packed
from terdit_jax.models import packed as packed_lib
from terdit_jax.models.dit import DiT
from terdit_jax.models.linears import LINEAR_KINDS
from terdit_jax.models.ternary import absmean_ternary
from terdit_kernels import unpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomise(params, seed=0):
    """Every variable random (the init has zero adaLN/final weights, which would make the output trivial)."""
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(params):
        v = var.get_value()
        if path[-1] == "alpha":
            new = rng.choice([-1, 1]) * rng.uniform(0.1, 0.3)  # α may be negative (official randn init)
        elif path[-1] == "weight":  # norm weights
            new = 1 + 0.2 * rng.standard_normal(v.shape)
        else:
            new = 0.3 * rng.standard_normal(v.shape)
        leaves.append((path, var.replace(jnp.asarray(new, v.dtype))))
    return nnx.from_flat_state(leaves)


@pytest.fixture(scope="module")
def qat():
    config = tiny()
    apply, abstract = abstract_model(config.model)  # shapes only; randomise fills every value
    return config, apply, randomise(abstract)


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 4))
    return x, jnp.array([0, 500, 999]), jnp.array([1, 9, 10])  # label 10 = null class


def packed_model(config, params, dtype, act_dtype):
    cfg = config.model.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.dtype = dtype
    graphdef, _ = export.abstract_packed(cfg)
    model = nnx.merge(graphdef, export.pack_state(params, cfg))
    return packed_lib.configure_packed(model, act_dtype, "auto")


def test_packed_kind_is_registered_and_its_codes_are_not_params(qat):
    config = qat[0]
    assert "packed" in LINEAR_KINDS
    model = nnx.eval_shape(lambda: DiT(export.packed_model_config(config.model), rngs=nnx.Rngs(0)))
    assert isinstance(model.layers[0].attention.wq, packed_lib.PackedTernaryDense)
    assert isinstance(model.layers[0].adaLN_modulation, packed_lib.PackedTernaryDense)
    assert not isinstance(model.x_embedder, packed_lib.PackedTernaryDense)  # embedders stay full precision
    param_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    code_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, packed_lib.PackedCodes))}
    assert len(code_paths) == 2 * 8 and not code_paths & param_paths  # optimisers take nnx.Param only
    # Same module tree as the QAT model: only each ternary layer's `kernel` became `packed`.
    _, qat_params = abstract_model(config.model)
    qat_paths = {p for p, _ in nnx.to_flat_state(qat_params)}
    assert {p[:-1] + ("kernel",) for p in code_paths} | param_paths == qat_paths


def test_pack_state_stores_exactly_the_training_quantizer(qat):
    config, _, params = qat
    state = export.pack_state(params, config.model)
    latent = params["layers"][1]["feed_forward"]["w2"]["kernel"][...]
    codes = state["layers"][1]["feed_forward"]["w2"]["packed"][...]
    assert codes.dtype == jnp.uint8 and codes.shape == (96 // 4 + 8, 32)  # K = 96 pads to 128
    np.testing.assert_array_equal(unpack(codes, 96), absmean_ternary(latent).astype(jnp.int8))
    assert float(state["layers"][1]["feed_forward"]["w2"]["alpha"][...]) == float(
        params["layers"][1]["feed_forward"]["w2"]["alpha"][...])


def test_packed_model_equals_the_ternary_model_in_float32_and_fused_adaln_changes_nothing(qat, inputs):
    config, apply, params = qat
    ref = apply(params, *inputs)
    model = packed_model(config, params, "float32", "f32")
    out = model(*inputs)
    assert float(jnp.abs(ref).max()) > 0.5
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    fused_apply, fused_params = split_packed(model, fuse=True)
    assert fused_params["adaln_stack"]["packed"][...].shape == (128 // 4, 2 * 6 * 32)  # (Kp/4, L·6D)
    assert "adaLN_modulation" not in fused_params["layers"][0]  # the stacked copy is the only one
    # one (B, C)·(C, L·6D) matmul instead of L: only the float32 summation order differs
    np.testing.assert_allclose(fused_apply(fused_params, *inputs), out, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_packed_bf16_model_matches_the_ternary_bf16_model_within_bf16_tolerance(qat, inputs):
    config, _, params = qat
    apply16, _ = abstract_model(tiny(dtype="bfloat16").model)
    ref16 = apply16(params, *inputs)
    apply_p, params_p = split_packed(packed_model(config, params, "bfloat16", "bf16"), fuse=True)
    out16 = apply_p(params_p, *inputs)
    scale = float(jnp.abs(ref16).max())
    # both round activations/weights to bf16 in different places (α·W_t in bf16 vs W_t exact, α in f32)
    np.testing.assert_allclose(out16, ref16, atol=3e-2 * scale, rtol=0)
    assert float(jnp.abs(out16 - ref16).mean()) < 5e-3 * scale


def test_export_from_a_training_workdir_roundtrips_and_never_overwrites(qat, inputs, tmp_path):
    from terdit_jax.train import abstract_state

    config, apply, ema = qat
    _, abstract = abstract_state(config)  # the real train-state structure; values filled without an init
    state = {**jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract), "params": ema, "ema": ema}
    ckpt = Checkpoints(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ckpt.save(7, state, config.model)
    ckpt.close()
    out = str(tmp_path / "export")
    manifest = export.export_packed(config, str(tmp_path / "run"), out)
    assert manifest["source"]["step"] == 7 and manifest["format"] == export.FORMAT_NAME
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]  # the temp dir was renamed, nothing left over
    apply_p, params_p, cfg, manifest2 = export.load_packed(out, {"packed_act_dtype": "f32"})
    assert cfg["linear"] == "packed" and manifest2 == manifest
    np.testing.assert_allclose(apply_p(params_p, *inputs), apply(ema, *inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(export.ExportError, match="exists"):
        export.export_packed(config, ema, out)
    m3 = export.export_packed(config, randomise(ema, seed=5), out, overwrite=True)
    assert m3["source"] == {"kind": "terdit-jax-ema"}
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]


def test_sampling_an_export_computes_in_the_dtype_the_user_asks_for(qat, inputs, tmp_path):
    """The manifest supplies the architecture only: an export made from a bfloat16 config samples in float32 when
    the user's config says float32 (and the reverse), through `--mode sample`'s loader."""
    from terdit_jax.sample import load_for_sampling

    config, apply, ema = qat
    bf16 = config.copy_and_resolve_references()
    bf16.model.dtype = "bfloat16"
    out = str(tmp_path / "export")
    assert export.export_packed(bf16, ema, out)["model"]["dtype"] == "bfloat16"
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        user = config.copy_and_resolve_references()
        user.model.dtype, user.model.packed_act_dtype, user.sample.packed_path = dtype, "f32", out
        cfg, apply_p, params_p, _, _ = load_for_sampling(user, str(tmp_path))
        assert cfg.model.dtype == dtype
        outputs[dtype] = np.asarray(apply_p(params_p, *inputs), np.float32)
    ref = np.asarray(apply(ema, *inputs))  # the float32 QAT model
    scale = np.abs(ref).max()
    np.testing.assert_allclose(outputs["float32"], ref, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(outputs["bfloat16"] - ref).max() > 1e-3 * scale  # bf16 rounding shows
    np.testing.assert_allclose(outputs["bfloat16"], ref, atol=5e-2 * scale)


def test_incomplete_or_foreign_exports_are_refused(qat, tmp_path):
    config, _, params = qat
    (tmp_path / "half").mkdir()  # e.g. a crash before the manifest was written
    with pytest.raises(export.ExportError, match="not a complete packed export"):
        export.load_packed(str(tmp_path / "half"))
    out = str(tmp_path / "ok")
    export.export_packed(config, params, out)
    with open(os.path.join(out, export.MANIFEST)) as f:
        m = json.load(f)
    m["version"] = 99
    with open(os.path.join(out, export.MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(export.ExportError, match="version 99"):
        export.load_packed(out)
    with pytest.raises(export.ExportError, match="missing"):
        export.pack_state({k: v for k, v in nnx.to_pure_dict(params).items() if k != "final_layer"}, config.model)


@pytest.mark.parametrize("name,limit,fp32_bytes", [("DiT_Llama_600M_patch2", 0.18e9, 609_885_856 * 4),
                                                   ("DiT_Llama_3B_patch2", 1.10e9, 4_238_020_896 * 4)])
def test_packed_checkpoint_sizes_of_the_paper_models(name, limit, fp32_bytes):
    c = base_config()
    c.model.name = name
    nbytes = export.packed_nbytes(finalize(c).model)
    assert nbytes <= limit  # paper Table 2: 1.1 GB for TerDiT-4.2B
    assert nbytes < fp32_bytes / 13  # ≥ 13× smaller than the float32 checkpoint (16 GB → 1.1 GB)


def test_sample_e2e_benchmark_runs_in_tiny_mode(capsys):
    spec = importlib.util.spec_from_file_location("sample_e2e", os.path.join(ROOT, "benchmarks", "sample_e2e.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--steps", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    r = result["models"]["tiny"]
    assert r["packed"]["output_finite"] and r["bf16"]["output_finite"]
    assert r["time_ratio_packed_over_bf16"] == round(r["packed"]["time_s"] / r["bf16"]["time_s"], 4)
    assert r["packed"]["weight_bytes"] < r["bf16"]["weight_bytes"]
    if jax.default_backend() == "cpu":
        assert r["peak_memory_ratio_packed_over_bf16"] == "not measured" and result["gpu"] == "not measured"


def test_xla_fallback_unpacks_one_layer_at_a_time():
    """The compiled packed forward must not hold every layer's unpacked matrix at once (models.packed._after_input)."""
    c = tiny(dim=256, n_layers=6, n_heads=4, dtype="bfloat16")
    model = nnx.eval_shape(lambda: DiT(export.packed_model_config(c.model), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(packed_lib.configure_packed(model, "bf16", "xla"))
    dense_bf16 = sum(2 * 4 * v.get_value().size for p, v in nnx.to_flat_state(params) if p[-1] == "packed")
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    from terdit_jax.model_fn import ApplyDiT
    temp = jax.jit(ApplyDiT(graphdef)).lower(params, x, t, t).compile().memory_analysis().temp_size_in_bytes
    assert temp < dense_bf16 / 2, (temp, dense_bf16)  # measured: 0.37× with the dependency, 1.06× without
