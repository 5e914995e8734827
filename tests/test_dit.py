import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config as tiny
from terdit_jax.config import ConfigError, base_config, finalize
from terdit_jax.models.backbone import patchify, unpatchify
from terdit_jax.models.dit import DiT
from terdit_jax.models.families import count_params
from terdit_jax.models.layers import apply_rope, ffn_hidden_dim, rope_angles, timestep_features


@pytest.mark.parametrize("name,qk,expected", [
    ("DiT_Llama_600M_patch2", False, 609_885_856), ("DiT_Llama_3B_patch2", False, 4_238_020_896),
    ("DiT_Llama_600M_patch2", True, 609_984_160)])
def test_parameter_counts_match_the_official_models(name, qk, expected):
    c = base_config()
    c.model.name, c.model.qk_norm = name, qk
    assert count_params(finalize(c).model) == expected


def test_ffn_hidden_rounding():
    assert [ffn_hidden_dim(d, 256, None) for d in (1536, 3072, 4096)] == [4096, 8192, 11008]


def test_patchify_matches_the_official_nchw_order():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)  # NHWC
    p, nchw = 2, x.transpose(0, 3, 1, 2)
    n, c, h, w = nchw.shape
    ref = nchw.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
    np.testing.assert_array_equal(patchify(jnp.asarray(x), p), ref)


def test_unpatchify_matches_the_official_einsum():
    p, h, w, c = 2, 8, 12, 5
    tokens = np.random.default_rng(1).normal(size=(2, (h // p) * (w // p), p * p * c)).astype(np.float32)
    ref = np.einsum("nhwpqc->nchpwq", tokens.reshape(2, h // p, w // p, p, p, c)).reshape(2, c, h, w)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tokens), p, h, w)).transpose(0, 3, 1, 2), ref)


def test_rope_is_interleaved_1d_llama_rope():
    t, hd = 7, 8
    x = np.random.default_rng(2).normal(size=(1, t, 2, hd)).astype(np.float32)
    freqs = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    cis = np.exp(1j * np.outer(np.arange(t), freqs))  # torch.polar(1, outer(t, freqs))
    xc = x.reshape(1, t, 2, hd // 2, 2)
    ref = (xc[..., 0] + 1j * xc[..., 1]) * cis[None, :, None, :]
    ref = np.stack([ref.real, ref.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), rope_angles(t, hd)), ref, atol=1e-5)


def test_timestep_features_put_cos_first():
    f = np.asarray(timestep_features(jnp.array([3]), dim=8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(f[0], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]), rtol=1e-6)


def test_model_shapes_and_adaln_zero_at_init():
    cfg = tiny().model
    model = DiT(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
    out = model(x, jnp.array([0, 500, 999]), jnp.array([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8)
    np.testing.assert_array_equal(out, 0.0)  # zero final layer
    for layer in model.layers:  # zero latent adaLN weight → W_t = 0 → gates exactly 0, also after the RMSNorm
        np.testing.assert_array_equal(layer.modulation(jnp.ones((3, cfg.cond_dim))), 0.0)


def test_which_layers_are_ternary():
    model = DiT(tiny().model, rngs=nnx.Rngs(0))
    block = model.layers[0]
    for lin in (block.attention.wq, block.attention.wo, block.feed_forward.w2, block.adaLN_modulation):
        assert hasattr(lin, "alpha")
    for lin in (model.x_embedder, model.t_embedder.mlp_0, model.final_layer.linear,
                model.final_layer.adaLN_modulation):
        assert not hasattr(lin, "alpha")
    fp = DiT(tiny(linear="fp").model, rngs=nnx.Rngs(0))
    assert not hasattr(fp.layers[0].attention.wq, "alpha")
    no_norm = DiT(tiny(adaln_norm=False).model, rngs=nnx.Rngs(0))
    assert no_norm.layers[0].adaLN_norm is None


def test_trained_model_depends_on_label_and_time():
    cfg = tiny().model
    model = DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    model = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    a = model(x, jnp.array([10]), jnp.array([1]))
    assert not np.allclose(a, model(x, jnp.array([10]), jnp.array([2])))
    assert not np.allclose(a, model(x, jnp.array([900]), jnp.array([1])))


def test_config_errors_name_the_field():
    c = base_config()
    c.model.name = "DiT_Llama_1B"
    with pytest.raises(ConfigError, match="model.name.*DiT_Llama_600M_patch2"):
        finalize(c)
    c = base_config()
    c.data.image_size = 100
    with pytest.raises(ConfigError, match="data.image_size"):
        finalize(c)


def test_sincos_position_table():
    """A DiT-style 2-D table: first half the row, second half the column, each [sin, cos] of pos·1/10000^(k/(d/4))."""
    from terdit_jax.models.layers import sincos_pos_embed_2d
    d, h, w = 16, 3, 4
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    enc = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)  # noqa: E731
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ref = np.concatenate([enc(rows.reshape(-1)), enc(cols.reshape(-1))], 1)
    np.testing.assert_allclose(sincos_pos_embed_2d(d, h, w), ref, atol=1e-6)
    cfg = tiny(pos_embed="sincos").model
    model = DiT(cfg, rngs=nnx.Rngs(0))
    assert count_params(cfg) == count_params(tiny().model)  # a fixed table: no parameters
    tokens, _ = model.embed(jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32))
    np.testing.assert_allclose(tokens[0] - model.x_embedder.bias[...], sincos_pos_embed_2d(32, 4, 4), atol=1e-6)
