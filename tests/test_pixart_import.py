"""Importing released PixArt weights (convert/pixart_official.py) into a workdir: a diffusers transformer folder and
an original-layout .pth, both made from one diffusers PixArtTransformer2DModel with random weights, sample like
diffusers' model after `load_ema`; bad files give one error line and write nothing."""
import os

import numpy as np
import pytest
import torch

from conftest import diffusers_pixart
from terdit_jax.checkpoint import load_ema
from terdit_jax.config import finalize
from terdit_jax.convert import pixart_official as po

D, L, H, P, CC, N, LATENT = 32, 2, 2, 2, 16, 5, 8

CONFIG = f'''
from terdit_jax.configs.pixart_alpha_512 import get_config as base

def get_config():
    c = base()
    c.model.update(name="custom", dim={D}, n_layers={L}, n_heads={H}, patch_size={P}, caption_channels={CC},
                   caption_len={N})
    c.data.image_size = {8 * LATENT}
    return c
'''


@pytest.fixture(scope="module")
def ref():
    return diffusers_pixart(sample_size=LATENT, dim=D, heads=H, layers=L, caption_channels=CC, patch=P)


def original_layout(ref) -> dict:
    """The diffusers weights in the original repository's names, fused the way PixArt's own conversion script
    splits them (torch.chunk of attn.qkv into q, k, v and of cross_attn.kv_linear into k, v), plus diffusers' table."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    out = {"pos_embed": ref.pos_embed.pos_embed.clone()}
    for i in range(L):
        b = f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd.pop(f"{b}attn1.to_{n}.{w}") for n in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{w}"] = torch.cat([sd.pop(f"{b}attn2.to_{n}.{w}") for n in "kv"])
            for theirs, ours in (("attn.proj", "attn1.to_out.0"), ("cross_attn.q_linear", "attn2.to_q"),
                                 ("cross_attn.proj", "attn2.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                                 ("mlp.fc2", "ff.net.2")):
                out[f"blocks.{i}.{theirs}.{w}"] = sd.pop(f"{b}{ours}.{w}")
        out[f"blocks.{i}.scale_shift_table"] = sd.pop(f"{b}scale_shift_table")
    for theirs, ours in (("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
                         ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
                         ("t_block.1", "adaln_single.linear"), ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
                         ("y_embedder.y_proj.fc2", "caption_projection.linear_2"), ("final_layer.linear", "proj_out")):
        for w in ("weight", "bias"):
            out[f"{theirs}.{w}"] = sd.pop(f"{ours}.{w}")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    out["y_embedder.y_embedding"] = torch.randn(N, CC)  # the learned null caption: not imported
    assert not sd, sorted(sd)
    return {"state_dict": out}


def _outputs(ref, workdir, config_path):
    from terdit_jax.convert import load_config_file
    config = finalize(load_config_file(config_path, ValueError))
    apply, params, _ = load_ema(config, workdir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
    t, cap = np.array([5, 800]), rng.standard_normal((2, N, CC)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(cap),
                   timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(apply(params, x, t, (cap, mask)))
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_import_samples_like_diffusers(ref, tmp_path, capsys, layout):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    if layout == "diffusers":
        src = tmp_path / "transformer"
        ref.save_pretrained(str(src), safe_serialization=True)
    else:
        src = tmp_path / "PixArt-tiny.pth"
        torch.save(original_layout(ref), str(src))
    po.main([str(src), str(tmp_path / "work"), "--config", str(config)])
    assert f"from the {layout} layout" in capsys.readouterr().out
    assert _outputs(ref, str(tmp_path / "work"), str(config)) <= 1e-4


def test_bad_weights_say_what_is_wrong(ref, tmp_path, capsys):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    orig = original_layout(ref)
    cases = {"another resolution": (dict(orig, state_dict={**orig["state_dict"], "pos_embed": torch.zeros(1, 64, D)}),
                                    "holds 128 px weights"),
             "micro-conditions": (dict(orig, state_dict={**orig["state_dict"], "csize_embedder.mlp.0.weight":
                                                         torch.zeros(D, 256)}), "micro-conditions"),
             "missing": (dict(orig, state_dict={k: v for k, v in orig["state_dict"].items() if "mlp.fc2" not in k}),
                         "missing")}
    for name, (obj, message) in cases.items():
        src = tmp_path / f"{name}.pth"
        torch.save(obj, str(src))
        with pytest.raises(SystemExit) as e:
            po.main([str(src), str(tmp_path / name), "--config", str(config)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / name / "checkpoints" / "0")
    good = tmp_path / "good.pth"
    torch.save(orig, str(good))
    po.main([str(good), str(tmp_path / "w"), "--config", str(config)])
    with pytest.raises(SystemExit):  # a second import into the same workdir keeps the first
        po.main([str(good), str(tmp_path / "w"), "--config", str(config)])
    assert "holds a checkpoint already" in capsys.readouterr().err
