"""The original DiT family (models/dit_xl.py) and its importer (convert/dit_official.py), per
shared/reference/dit_xl.md: random weights in the original checkpoint layout go through the converter and must
give the output of diffusers' DiTTransformer2DModel loaded with the same weights (§4); the converter's key table
covers the 292 keys of DiT-XL/2 (§3); the preset parameter counts (§2); wrong files are refused in one line; a tiny
DiT trains and samples through the normal machinery, and the training forward equals the model call."""
import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax import parallel
from terdit_jax.checkpoint import Checkpoints, load_ema
from terdit_jax.config import ConfigError, base_config, finalize
from terdit_jax.configs import dit_xl2_256, dit_xl2_512
from terdit_jax.convert import dit_official as conv
from terdit_jax.convert.dit_official import ConversionError, diffusers_layout
from terdit_jax.logical_axes import RULES
from terdit_jax.model_fn import abstract_model, init_model
from terdit_jax.models import dit_xl
from terdit_jax.models.families import abstract, count_params, site_paths
from terdit_jax.quant.sites import observe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

D, L, H, P, C, NCLS, LATENT = 64, 2, 4, 2, 4, 10, 8  # 16 tokens of width 64, head dim 16


pytestmark = pytest.mark.usefixtures("xla_cache")


def tiny_dit(**model):
    """configs/dit_xl2_256.py shrunk to a 2-block D=64 model on 8×8×4 latents, 10 classes."""
    c = dit_xl2_256.get_config()
    c.model.update({**dict(name="custom", dim=D, n_layers=L, n_heads=H, patch_size=P, num_classes=NCLS), **model})
    c.data.image_size = 8 * LATENT
    return finalize(c)


def mae_pos_embed(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed as DiT uses it (dit_xl.md §1), in float64: meshgrid(grid_w, grid_h) ("xy"),
    so the first dim/2 channels encode the column; each half [sin(pos·ω), cos(pos·ω)], ω_k = 10000^(−k/(dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    enc = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)  # noqa: E731
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # "xy": grid[0] = column
    return np.concatenate([enc(grid[0].reshape(-1)), enc(grid[1].reshape(-1))], 1)


def original_state_dict(torch, table, *, seed=0, blocks=L):
    """Random weights with the keys and shapes of an official DiT state dict (dit_xl.md §3), scaled so every
    gate is O(1) and the output is O(1); `table` (1, T, D) is the fixed pos_embed."""
    g = torch.Generator().manual_seed(seed)
    sd = {"pos_embed": torch.as_tensor(np.asarray(table, np.float32)).reshape(1, -1, D)}

    def linear(name, out_f, in_f, std=None):
        sd[name + ".weight"] = torch.randn(out_f, in_f, generator=g) * (std or 1 / math.sqrt(in_f))
        sd[name + ".bias"] = torch.randn(out_f, generator=g) * 0.1

    sd["x_embedder.proj.weight"] = torch.randn(D, C, P, P, generator=g) / math.sqrt(C * P * P)
    sd["x_embedder.proj.bias"] = torch.randn(D, generator=g) * 0.1
    linear("t_embedder.mlp.0", D, 256, std=0.1)
    linear("t_embedder.mlp.2", D, D)
    sd["y_embedder.embedding_table.weight"] = torch.randn(NCLS + 1, D, generator=g)
    for i in range(blocks):
        linear(f"blocks.{i}.attn.qkv", 3 * D, D)
        linear(f"blocks.{i}.attn.proj", D, D)
        linear(f"blocks.{i}.mlp.fc1", 4 * D, D)
        linear(f"blocks.{i}.mlp.fc2", D, 4 * D)
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * D, D, std=0.3 / math.sqrt(D))
    linear("final_layer.adaLN_modulation.1", 2 * D, D, std=0.3 / math.sqrt(D))
    linear("final_layer.linear", P * P * 2 * C, D)
    return sd


def xl2_shapes(tokens: int) -> dict[str, tuple]:
    """Key → shape of DiT-XL-2-{256,512}.pt, from the table of dit_xl.md §3."""
    d = 1152
    s = {"pos_embed": (1, tokens, d), "x_embedder.proj.weight": (d, 4, 2, 2), "x_embedder.proj.bias": (d,),
         "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
         "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (1001, d),
         "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
         "final_layer.linear.weight": (32, d), "final_layer.linear.bias": (32,)}
    for i in range(28):
        for name, (o, k) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d),
                             "mlp.fc2": (d, 4 * d), "adaLN_modulation.1": (6 * d, d)}.items():
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = (o, k), (o,)
    assert len(s) == 292
    return s


def perturbed(params, seed=5, scale=0.05):
    """Every parameter moved off its init (a fresh model's zero adaLN and final layer would output 0); numpy
    draws, because one compiled jax.random draw per leaf shape costs seconds on this CPU."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape).astype(np.float32), params)


# ------------------------------------------------------------------------------------------------ parity

def test_converted_random_checkpoint_equals_diffusers_dit(tmp_path):
    """dit_xl.md §4 recipe: norm_eps=1e-6, eval(), the same embedders in every block, the timestep
    downscale shift set to 0 on every block; our output after NHWC→NCHW within 1e-4 of diffusers' (float32)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    ref_model = DiTTransformer2DModel(num_attention_heads=H, attention_head_dim=D // H, in_channels=C,
                                      out_channels=2 * C, num_layers=L, sample_size=LATENT, patch_size=P,
                                      attention_bias=True, activation_fn="gelu-approximate",
                                      num_embeds_ada_norm=NCLS, norm_type="ada_norm_zero",
                                      norm_elementwise_affine=False, norm_eps=1e-6).eval()
    table = ref_model.pos_embed.pos_embed  # diffusers' buffer, bit-identical to the original table (§4)
    np.testing.assert_allclose(table[0].numpy(), mae_pos_embed(D, LATENT // P, LATENT // P), atol=1e-6)
    sd = original_state_dict(torch, table.numpy())
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    result = conv.convert_official(str(tmp_path / "DiT-tiny.pt"), str(tmp_path / "run"), config=tiny_dit())
    assert result["source"]["kind"] == "dit-official" and result["source"]["nested"] is None

    ref_model.load_state_dict(diffusers_layout(sd, L), strict=True)
    for block in ref_model.transformer_blocks:  # /128 as the original instead of diffusers' /127 (§4 item 1)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, C, LATENT, LATENT)).astype(np.float32)
    t, y = np.array([0, 421, 999]), np.array([3, 7, NCLS])  # includes the null class
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    ref = ref.numpy()

    apply, params, step = load_ema(result["config"], str(tmp_path / "run"))  # what --mode sample|eval read
    assert step == 0
    out = np.asarray(jax.jit(apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)))
    out = out.transpose(0, 3, 1, 2)
    scale = float(np.abs(ref).max())
    rel = float(np.abs(out - ref).max()) / scale
    print(f"max relative error vs diffusers: {rel:.2e} (max |out| {scale:.3f})")
    assert scale > 0.3 and rel <= 1e-4, rel


def test_converter_table_covers_every_key_of_dit_xl2():
    """Every variable of our DiT-XL/2 has one official key of §3 whose converted shape is ours, and the model's
    keys plus pos_embed are exactly the 292 keys of the released file."""
    shapes = xl2_shapes(256)
    _, params = abstract_model(finalize(dit_xl2_256.get_config()).model)
    seen = {"pos_embed"}
    for path, var in nnx.to_flat_state(params):
        key, how = conv.official_key(path)
        s = shapes[key]
        converted = {"conv": (int(np.prod(s[1:])), s[0]), "transpose": s[::-1], "copy": s}[how]
        assert converted == var.get_value().shape, (path, key)
        seen.add(key)
    assert seen == set(shapes)


def test_checkpoint_shapes_tell_the_preset_and_the_resolution():
    info = conv.describe(xl2_shapes(256))
    assert (info["name"], info["image_size"], info["num_classes"], info["learn_sigma"]) == ("DiT-XL/2", 256, 1000,
                                                                                            True)
    assert conv.describe(xl2_shapes(1024))["image_size"] == 512
    config_256 = finalize(dit_xl2_256.get_config())
    # Without --config the workdir gets exactly the model of the shipped configs, so they sample it directly.
    for tokens, shipped in ((256, config_256), (1024, finalize(dit_xl2_512.get_config()))):
        inferred = finalize(conv.default_config(conv.describe(xl2_shapes(tokens)), "x.pt"))
        assert inferred.model.to_dict() == shipped.model.to_dict()
    conv.check_config(config_256, info, "DiT-XL-2-256x256.pt", "configs/dit_xl2_256.py")  # the right file passes
    with pytest.raises(ConversionError, match=r"is a 512 px model \(1024 tokens.*is for 256 px .*use "
                                              r"configs/dit_xl2_512.py"):
        conv.check_config(config_256, conv.describe(xl2_shapes(1024)), "DiT-XL-2-512x512.pt", "configs/dit_xl2_256.py")
    xl4 = {**xl2_shapes(64), "x_embedder.proj.weight": (1152, 4, 4, 4), "final_layer.linear.weight": (128, 1152)}
    assert conv.describe(xl4)["name"] == "DiT-XL/4"
    with pytest.raises(ConversionError, match=r"is DiT-XL/4 .* builds DiT-XL/2 .*model.name='DiT-XL/4'"):
        conv.check_config(config_256, conv.describe(xl4), "DiT-XL-4.pt", "configs/dit_xl2_256.py")


# --------------------------------------------------------------------------------------------- refusals

def test_nested_train_checkpoint_reads_its_ema_weights(tmp_path):
    torch = pytest.importorskip("torch")
    table = mae_pos_embed(D, LATENT // P, LATENT // P)
    ema, model = original_state_dict(torch, table, seed=0), original_state_dict(torch, table, seed=1)
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, tmp_path / "0400000.pt")
    sd, nested = conv.load_state_dict(str(tmp_path / "0400000.pt"))
    assert nested == "ema" and sorted(sd) == sorted(ema)
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], ema["blocks.1.attn.qkv.weight"].numpy())
    params = conv.convert_state(sd, tiny_dit().model)
    np.testing.assert_array_equal(params["blocks"][1]["attn"]["qkv"]["kernel"][...], sd["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["x_embedder"]["kernel"][...], sd["x_embedder.proj.weight"].reshape(D, -1).T)


def test_wrong_shapes_resolution_and_table_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    table = mae_pos_embed(D, LATENT // P, LATENT // P)
    sd = {k: v.numpy() for k, v in original_state_dict(torch, table).items()}
    bad = {**sd, "blocks.1.mlp.fc1.weight": np.zeros((3 * D, D), np.float32), "blocks.0.attn.extra": np.zeros(2)}
    del bad["final_layer.linear.bias"]
    with pytest.raises(ConversionError, match=r"missing keys \['final_layer.linear.bias'\]; unknown keys "
                                              r"\['blocks.0.attn.extra'\]; bad tensors \['blocks.1.mlp.fc1.kernel: "
                                              r"shape \(64, 192\), expected \(64, 256\)'\]"):
        conv.convert_state(bad, tiny_dit().model)
    big = {k: v.numpy() for k, v in original_state_dict(torch, mae_pos_embed(D, 16, 16)).items()}
    torch.save({k: torch.from_numpy(v) for k, v in big.items()}, tmp_path / "big.pt")
    with pytest.raises(ConversionError, match=r"big.pt is a 256 px model \(256 tokens, a 32×32 latent\) but the "
                                              r"config is for 64 px \(16 tokens\)"):
        conv.convert_official(str(tmp_path / "big.pt"), str(tmp_path / "run"), config=tiny_dit())
    row_first = np.concatenate([table[:, D // 2:], table[:, :D // 2]], 1)  # Large-DiT's orientation
    with pytest.raises(ConversionError, match=r"pos_embed differs from DiT's fixed sin-cos table by 1\.9\d"):
        conv.check_pos_embed(row_first, tiny_dit().model, "x.pt")
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        conv.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    tiny_file = tmp_path / "DiT-tiny.pt"
    torch.save(original_state_dict(torch, mae_pos_embed(D, LATENT // P, LATENT // P)), tiny_file)
    out = str(tmp_path / "run")
    assert "no such checkpoint file" in _cli_error(capsys, [str(tmp_path / "absent.pt"), out])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert "is not a readable torch checkpoint" in _cli_error(capsys, [str(tmp_path / "junk.pt"), out])
    assert "fit no DiT preset" in _cli_error(capsys, [str(tiny_file), out])  # D=64, 2 blocks: no preset
    cfg_file = tmp_path / "tiny_128px.py"  # the tiny model's config at another resolution
    cfg_file.write_text("from terdit_jax.configs.dit_xl2_256 import get_config as base\n\n"
                        "def get_config():\n    c = base()\n"
                        f"    c.model.update(name='custom', dim={D}, n_layers={L}, n_heads={H}, num_classes={NCLS})\n"
                        "    c.data.image_size = 128\n    return c\n")
    assert "is a 64 px model" in _cli_error(capsys, [str(tiny_file), out, "--config", str(cfg_file)])
    os.makedirs(os.path.join(out, "checkpoints", "0"))
    assert "holds step(s) ['0'] already" in _cli_error(capsys, [str(tiny_file), out])
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as without the convert extra
    assert "needs PyTorch (CPU is enough): pip install 'terdit-jax[convert]'" in _cli_error(
        capsys, [str(tiny_file), str(tmp_path / "other")])


@pytest.mark.parametrize("preset", ["DiT-XL/2", "DiT-S/2"])
def test_the_printed_sample_command_can_be_pasted(preset, tmp_path, monkeypatch):
    """Absolute paths (any working folder), no placeholder to edit, and it parses as the main flags."""
    import shlex

    c = dit_xl2_256.get_config()
    c.model.name = preset
    sample_config = conv.SHIPPED_CONFIGS[256] if preset == "DiT-XL/2" else None
    monkeypatch.chdir(tmp_path)  # printed from another folder than the checkout
    words = shlex.split(conv.sample_command({"config": finalize(c), "sample_config": sample_config}, "my run"))
    assert "<" not in " ".join(words) and words[:3] == ["python", "-m", "terdit_jax.main"]
    config_file, workdir = words[words.index("--config") + 1], words[words.index("--workdir") + 1]
    assert os.path.isabs(config_file) and os.path.isfile(config_file)
    assert workdir == str(tmp_path / "my run") and "--config.data.vae_path=vae/" in words
    assert (f"--config.model.name={preset}" in words) == (preset != "DiT-XL/2")


def test_unknown_family_and_dit_config_errors_name_the_field():
    c = base_config()
    c.model.family = "nope"
    with pytest.raises(ConfigError, match=r"config.model.family: 'nope' is not one of 'large_dit', 'dit'"):
        finalize(c)
    c = dit_xl2_256.get_config()
    c.model.name = "DiT-XXL/2"
    with pytest.raises(ConfigError, match=r"unknown model 'DiT-XXL/2' for family 'dit'.*DiT-XL/2"):
        finalize(c)
    c = dit_xl2_256.get_config()
    c.model.qk_norm = True
    with pytest.raises(ConfigError, match="the original DiT has no qk-norm"):
        finalize(c)


# ------------------------------------------------------------------------------------------ architecture

@pytest.mark.parametrize("name,image_size,total,trainable", [
    ("DiT-XL/2", 256, 675_129_632, 674_834_720), ("DiT-XL/2", 512, 676_014_368, 674_834_720),
    ("DiT-B/4", 256, None, 130_426_496), ("DiT-S/8", 256, None, 33_142_016)])
def test_preset_parameter_counts_match_the_official_models(name, image_size, total, trainable):
    c = (dit_xl2_512 if image_size == 512 else dit_xl2_256).get_config()
    c.model.name = name
    m = finalize(c).model
    assert count_params(m, trainable_only=True) == trainable
    if total is not None:
        assert count_params(m) == total


def test_position_table_is_column_first():
    """DiT's table on a non-square grid, so that rows and columns cannot be confused (Large-DiT's is row-first);
    the parity test above checks the model adds it."""
    np.testing.assert_allclose(np.asarray(dit_xl.pos_embed(16, 3, 5)), mae_pos_embed(16, 3, 5), atol=2e-6)


def test_every_parameter_has_logical_axes():
    names = {k for k, _ in RULES}
    model = abstract(tiny_dit().model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert all(a is None or a in names for a in axes), (path, axes)
    blk = model.block_list()[0]
    assert blk.attn.qkv.kernel.get_metadata()["logical_axes"] == ("embed", "heads")
    assert blk.mlp.fc2.kernel.get_metadata()["logical_axes"] == ("mlp", "embed")
    assert blk.adaLN_modulation.kernel.get_metadata()["logical_axes"] == ("cond", "adaln")


def test_original_names_select_linears_and_sites():
    paths = site_paths(tiny_dit().model)
    for want in ("x_embedder.input", "t_embedder.mlp_0.weight", "blocks.1.attn.qkv.input", "blocks.1.attn.q",
                 "blocks.1.attn.probs", "blocks.0.mlp.hidden", "blocks.0.adaLN_modulation.weight",
                 "final_layer.adaLN_modulation.input", "final_layer.linear.weight"):
        assert want in paths
    assert len(paths) == len(set(paths))
    ternary = abstract(tiny_dit(linear="ternary").model)  # quantized_layers = "attn,mlp,adaLN_modulation"
    blk = ternary.blocks[1]
    assert all(hasattr(m, "alpha") for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2,
                                             blk.adaLN_modulation))
    assert not any(hasattr(m, "alpha") for m in (ternary.x_embedder, ternary.t_embedder.mlp_0,
                                                 ternary.final_layer.adaLN_modulation, ternary.final_layer.linear))


# ------------------------------------------------------------------------------------------ machinery

@pytest.fixture(scope="module")
def tiny_model():
    """(apply, fresh params, perturbed params, inputs) of the tiny latent DiT."""
    cfg = tiny_dit().model
    apply, _ = abstract_model(cfg)
    fresh = jax.jit(lambda: init_model(cfg, 0)[1])()  # one compiled init instead of one dispatch per initialiser
    x = jax.random.normal(jax.random.key(1), (2, LATENT, LATENT, C))
    return apply, fresh, perturbed(fresh), (x, jnp.array([3, 700]), jnp.array([1, NCLS]))


def test_fresh_model_outputs_zero_and_training_forward_equals_the_model_call(tiny_model):
    """adaLN-Zero: a fresh model outputs exactly 0. parallel.forward (remat, sharding constraints) runs the DiT
    family's blocks like its own __call__."""
    apply, fresh, params, (x, t, y) = tiny_model
    call = jax.jit(apply)
    np.testing.assert_array_equal(call(fresh, x, t, y), 0.0)
    want = call(params, x, t, y)
    assert want.shape == (2, LATENT, LATENT, 2 * C) and float(jnp.std(want)) > 1e-3
    got = jax.jit(lambda p: parallel.forward(apply.graphdef, p, x, t, y, remat="full"))(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_sites_see_the_official_tensors_and_unfused_attention_equals_fused(tiny_model):
    apply, _, params, (x, t, y) = tiny_model
    rules = tuple({"path": p, "kind": "observe"} for p in (r"blocks\.0\.attn\.probs", r"blocks\.1\.attn\.q",
                                                             r"blocks\.1\.mlp\.hidden"))
    observed, _ = init_model(tiny_dit(sites=rules).model, 0)  # observers hold no state: the same params
    got, seen = jax.jit(lambda p: observe(nnx.merge(observed.graphdef, p), x, t, y))(params)
    tokens = (LATENT // P) ** 2
    assert seen["blocks.0.attn.probs"][0].shape == (2, H, tokens, tokens)
    np.testing.assert_allclose(np.sum(seen["blocks.0.attn.probs"][0], -1), 1.0, rtol=1e-5)
    assert seen["blocks.1.attn.q"][0].shape == (2, tokens, H, D // H)
    hidden = seen["blocks.1.mlp.hidden"][0]
    assert hidden.shape == (2, tokens, 4 * D) and float(hidden.min()) >= -0.18  # tanh-GELU's minimum ≈ −0.17
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(apply)(params, x, t, y)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tiny_dit_trains_checkpoints_and_samples_end_to_end(tmp_path):
    """train.train on the digits (28×28×1, patch 4 → 49 tokens), then --mode sample from its checkpoint."""
    from terdit_jax import train as T
    from terdit_jax.sample import run_sample_mode

    c = dit_xl2_256.get_config()
    c.model.update(name="custom", dim=32, n_layers=2, n_heads=2, patch_size=4, in_channels=1, num_classes=10)
    c.data.kind, c.data.image_size, c.data.latent = "digits", 28, False
    c.train.update(steps=2, batch_size=8, lr=1e-3, log_every=1, ckpt_every=2, sample_every=10**9,
                   async_checkpoint=False, aot_memory_report=False)
    c.sample.update(classes="1,7", num_steps=2, cfg_channels=None, batch_size=4)
    config = finalize(c)
    out = T.train(config, str(tmp_path), log=lambda *_: None)
    assert out["step"] == 2
    ck = Checkpoints(out["checkpoints"])
    assert ck.steps() == [2] and ck.meta(2)["model"]["family"] == "dit" and "qk_norm" not in ck.meta(2)["model"]
    ck.close()
    with open(out["metrics"]) as f:
        assert len(f.readlines()) == 2
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), out["state"]["params"],
                                         init_model(config.model, config.seed)[1]))
    assert max(moved) > 0  # the optimizer changed the (zero-initialised) adaLN and final layers
    paths = run_sample_mode(config, str(tmp_path), log=lambda *_: None)
    with np.load(paths["npz"]) as z:
        assert z["arr_0"].shape == (2, 28, 28, 1) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["arr_1"], [1, 7])
    assert os.path.getsize(paths["grid"]) > 0
