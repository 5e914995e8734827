"""Flax AutoencoderKL vs diffusers' torch AutoencoderKL (random weights, tiny config, CPU, no network)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig, sample_latent
from terdit_jax.vae.convert import load_vae, read_state_dict

TINY = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=32)
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    """A tiny diffusers VAE with every tensor randomised, saved in the new (safetensors) and old (.bin) layouts."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong layout or a skipped op shows up
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
    new_dir = tmp_path_factory.mktemp("vae_new")
    model.save_pretrained(new_dir, safe_serialization=True)

    old_dir = tmp_path_factory.mktemp("vae_old")
    old = {}
    for k, v in model.state_dict().items():
        for new, o in OLD_NAMES.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        if k.startswith("encoder.mid_block.attentions.0.") and v.ndim == 2:
            v = v[:, :, None, None]  # the LDM-era 1x1-conv shape
        old[k] = v.clone()
    assert any(".query." in k for k in old) and any(v.ndim == 4 and "query" in k for k, v in old.items())
    torch.save(old, old_dir / "diffusion_pytorch_model.bin")
    (old_dir / "config.json").write_text((new_dir / "config.json").read_text())
    return torch, model, new_dir, old_dir


def _reference(torch, model):
    """Torch moments and decodes for a non-square batch, returned NHWC with the NHWC inputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 32, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 6, 10, generator=gen)
    with torch.no_grad():
        moments = model.encode(x).latent_dist.parameters
        image = model.decode(z).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return nhwc(x), nhwc(moments), nhwc(z), nhwc(image)


@pytest.mark.parametrize("layout", ["new_safetensors", "old_bin"])
def test_converted_vae_matches_diffusers(torch_vae, layout):
    torch, model, new_dir, old_dir = torch_vae
    vae = load_vae(new_dir if layout == "new_safetensors" else old_dir)
    assert vae.config.block_out_channels == (32, 64) and vae.config.norm_num_groups == 8
    x, moments, z, image = _reference(torch, model)
    ours_m = np.asarray(vae.encode(jnp.asarray(x)))
    ours_i = np.asarray(vae.decode(jnp.asarray(z)))
    assert ours_m.shape == moments.shape == (2, 12, 16, 8)
    assert ours_i.shape == image.shape == (2, 12, 20, 3)
    assert np.abs(moments).max() > 0.5 and np.abs(image).max() > 0.5  # the comparison is not between near-zeros
    np.testing.assert_allclose(ours_m, moments, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_i, image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("slice_size", [1, 2, 3, None])
def test_sliced_decode_equals_diffusers_whole_batch_and_keeps_fewer_activations(torch_vae, slice_size):
    """decode's default runs one latent at a time (3 does not divide 4: one at a time too; None: the whole batch);
    each equals diffusers decoding the whole batch, and the one-at-a-time program's temporaries are smaller."""
    torch, model, new_dir, _ = torch_vae
    vae = load_vae(new_dir)
    z = torch.randn(4, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    zj = jnp.asarray(z.numpy().transpose(0, 2, 3, 1))
    got = np.asarray(vae.decode(zj, slice_size))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    graphdef, state = nnx.split(vae)
    temp = {s: jax.jit(lambda st, z, s=s: nnx.merge(graphdef, st).decode(z, s)).lower(state, zj).compile()
            .memory_analysis().temp_size_in_bytes for s in (slice_size, None)}
    assert temp[slice_size] < temp[None] if slice_size else temp[None] > 0, temp


def test_bf16_compute_keeps_float32_params_and_stays_close(torch_vae):
    _, _, new_dir, _ = torch_vae
    x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
    encode = nnx.jit(lambda m, x: m.encode(x))  # one compile instead of many eager bf16 kernels
    ref = encode(load_vae(new_dir), x)
    vae = load_vae(new_dir, dtype=jnp.bfloat16)
    params = nnx.to_flat_state(nnx.state(vae, nnx.Param))
    assert {v.get_value().dtype for _, v in params} == {jnp.dtype(jnp.float32)}
    out = encode(vae, x)
    assert out.dtype == jnp.float32
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05, err  # > 0: bf16 really was used


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_bad_keys_raise_a_clear_error(torch_vae, tmp_path, change):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    _, _, new_dir, _ = torch_vae
    sd = read_state_dict(new_dir / "diffusion_pytorch_model.safetensors")
    if change == "missing":
        del sd["decoder.mid_block.attentions.0.to_k.weight"]
        expected = "decoder.mid_block.attention.to_k.kernel"
    else:
        sd["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
        expected = "decoder.extra_layer.weight"
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((new_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=f"{change}.*{expected}"):
        load_vae(tmp_path)


def test_param_count_equals_diffusers_sd_vae_ft_ema():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # no allocation
        ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4,
                                      up_block_types=["UpDecoderBlock2D"] * 4,
                                      block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                      latent_channels=4, norm_num_groups=32, sample_size=256)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)))
    ours = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert ours == sum(p.numel() for p in ref.parameters()) == 83_653_863


def test_shapes_and_input_checks_without_torch():
    cfg = VAEConfig(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
    # Shape inference only (jax.eval_shape): random init and compilation would dominate a CPU test.
    run = lambda method, x: jax.eval_shape(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x), state, x)
    moments = run("encode", jnp.zeros((1, 16, 8, 3)))
    assert (moments.shape, moments.dtype) == ((1, 4, 2, 8), jnp.float32)
    assert run("decode", jnp.zeros((1, 4, 2, 4))).shape == (1, 16, 8, 3)
    with pytest.raises(ValueError, match="NHWC"):
        run("encode", jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="divisible by 4"):
        run("encode", jnp.zeros((1, 18, 16, 3)))
    with pytest.raises(ValueError, match="not supported"):
        VAEConfig.from_diffusers({"block_out_channels": [32], "down_block_types": ["CrossAttnDownBlock2D"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae("/nonexistent/vae")


def test_sample_latent_clips_logvar_and_has_the_right_spread():
    key = jax.random.key(3)
    sample = lambda mean, logvar: sample_latent(jnp.concatenate([jnp.full((4000, 2), mean),
                                                                 jnp.full((4000, 2), logvar)], -1), key)
    z = sample(1.5, jnp.log(4.0))
    assert z.shape == (4000, 2)
    np.testing.assert_allclose(float(z.std()), 2.0, rtol=0.05)
    np.testing.assert_allclose(float(z.mean()), 1.5, atol=0.1)
    np.testing.assert_array_equal(sample(0.0, 50.0), sample(0.0, 20.0))  # clipped at 20
    # clipped at -30: the noise is e^-15 times the unit-variance noise
    np.testing.assert_allclose(sample(0.0, -100.0), sample(0.0, 0.0) * np.exp(-15.0), rtol=1e-5)
