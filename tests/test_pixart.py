"""The PixArt family (models/pixart.py) through its importer (convert/pixart_diffusers.py) equals diffusers'
PixArtTransformer2DModel built from the same tiny config with random weights; presets count the released sizes."""
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import diffusers_pixart
from terdit_jax.config import base_config, finalize
from terdit_jax.convert.pixart_diffusers import load_diffusers
from terdit_jax.models.families import build, count_params


D, L, H, P, CC, N, LATENT = 64, 2, 4, 2, 32, 6, 8


def tiny_cfg():
    c = base_config()
    c.model.update(family="pixart", name="custom", dim=D, n_layers=L, n_heads=H, patch_size=P, caption_channels=CC,
                   caption_len=N, dtype="float32")
    c.data.image_size = 8 * LATENT
    return finalize(c)


@pytest.mark.parametrize("micro", [False, True])
def test_pixart_equals_diffusers_with_random_weights(micro):
    """micro: PixArt-α 1024's resolution and aspect-ratio conditions (square images at the config's size)."""
    d = 48 if micro else D  # the micro-conditions split the width in thirds
    ref = diffusers_pixart(sample_size=LATENT, dim=d, heads=H, layers=L, caption_channels=CC, patch=P, micro=micro)
    cfg = tiny_cfg()
    cfg.model.update(dim=d, micro_conditions=micro)
    model = build(cfg.model, nnx.Rngs(0))
    load_diffusers(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
    t = np.array([3, 700])
    cap = rng.standard_normal((2, N, CC)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    side = float(8 * LATENT)  # pixels, as diffusers' pipeline passes them
    micro_kwargs = ({"resolution": torch.tensor([[side, side]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
                    if micro else {"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(cap),
                   timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                   added_cond_kwargs=micro_kwargs).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(model(x, t, (cap, mask)))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-4, err
    # the mask matters: unmasking the padding changes the first sample
    assert np.abs(np.asarray(model(x, t, (cap, np.ones_like(mask))))[0] - got[0]).max() > 1e-3


@pytest.mark.parametrize("name,table", [("pixart_alpha_512", 1024 * 1152),
                                        pytest.param("pixart_sigma_1024", 4096 * 1152, marks=pytest.mark.slow),
                                        pytest.param("pixart_alpha_1024", 4096 * 1152, marks=pytest.mark.slow)])
def test_pixart_configs_count_the_released_parameters(name, table):
    import importlib
    from diffusers import PixArtTransformer2DModel
    cfg = finalize(importlib.import_module(f"terdit_jax.configs.{name}").get_config())
    with torch.device("meta"):  # diffusers' model of the config, nothing allocated
        ref = PixArtTransformer2DModel(sample_size=cfg.model.input_size, num_layers=28, num_attention_heads=16,
                                       attention_head_dim=72, caption_channels=4096, cross_attention_dim=1152,
                                       use_additional_conditions=bool(cfg.model.micro_conditions))
    theirs = sum(p.numel() for p in ref.parameters())
    # the micro-condition MLPs add 2·(256·384 + 384 + 384·384 + 384)
    assert theirs == 610_856_096 + (493_056 if cfg.model.micro_conditions else 0)
    assert count_params(cfg.model, trainable_only=True) == theirs
    assert count_params(cfg.model) == theirs + table


def test_pixart_training_forward_with_remat_equals_the_model_call():
    from terdit_jax import parallel
    model = build(tiny_cfg().model, nnx.Rngs(1))
    rng = np.random.default_rng(1)
    for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # proj_out starts at 0: make every path count
        p.set_value(0.2 * rng.standard_normal(p.get_value().shape).astype(np.float32))
    x = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
    t, y = np.array([5, 900]), (rng.standard_normal((2, N, CC)).astype(np.float32), np.ones((2, N), np.float32))
    gd, st = nnx.split(model)
    got = parallel.forward(gd, st, x, t, y, remat="full" if "full" in parallel.REMAT_POLICIES else
                           next(iter(parallel.REMAT_POLICIES)), constrain_acts=False)
    want = np.asarray(model(x, t, y))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_pixart_ternary_config_quantizes_the_block_linears_only():
    from terdit_jax.models.linears import layer_kind
    cfg = finalize(__import__("terdit_jax.configs.pixart_alpha_512", fromlist=["x"]).get_config())
    cfg.model.linear = "ternary"
    assert layer_kind("transformer_blocks.27.attn2.to_k", cfg.model) == "ternary"
    assert layer_kind("transformer_blocks.0.ff_net_2", cfg.model) == "ternary"
    assert layer_kind("caption_projection.linear_1", cfg.model) == "fp"
    assert layer_kind("final_layer.proj_out", cfg.model) == "fp"


def test_older_pixart_checkpoints_keep_their_architecture():
    """A PixArt checkpoint written before model.adaln_norm/norm_eps/micro_conditions applied to the family (its
    signature lacks them) still matches a full-precision config (no adaLN norm is built there), and is another
    architecture than a ternary config whose adaLN-single linear carries TerDiT's RMSNorm."""
    from terdit_jax.checkpoint import model_signature
    cfg = tiny_cfg().model
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("adaln_norm", "norm_eps", "micro_conditions")}
    assert model_signature(old) == model_signature(cfg)
    ternary = dict(linear="ternary", quantized_layers="attn1,attn2,ff_net,adaln_single.linear")
    new = cfg.to_dict() | ternary | {"adaln_norm": True}
    assert model_signature(new)["adaln_norm"] is True
    assert model_signature(old | ternary) != model_signature(new)
    assert model_signature(old | ternary) == model_signature(new | {"adaln_norm": False})
