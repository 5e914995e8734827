"""Importing the released TerDiT checkpoints: a synthetic official checkpoint (official key names, hqq 2-bit
layout, pickled model_args) is converted and our packed model must reproduce a direct torch implementation
of the official forward pass (terdit_official.md §1) run on the unpacked official weights."""
import argparse
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from terdit_jax.convert.terdit_official import ConversionError, convert_official
from terdit_jax.export import load_packed
from terdit_jax.labels import official_label, official_label_table, to_model_labels

torch = pytest.importorskip("torch")
F = torch.nn.functional

D, L, H, C_IN, P, NCLS, IMG = 32, 2, 4, 4, 2, 10, 64  # latent 8×8 → 16 tokens; FFN hidden 96 (multiple_of 16)
FFN = 96
OVERRIDES = dict(name="custom", dim=D, n_layers=L, n_heads=H, multiple_of=16)


def hqq_pack(w_t):
    """Official packing (hqq BitPack.pack_2bit_u8, §5): u = W_t + 1, P[i] = u[i]<<6 | u[i+s]<<4 | u[i+2s]<<2 | u[i+3s]."""
    u = (w_t + 1).to(torch.uint8)
    s = u.shape[0] // 4
    return (u[:s] << 6) | (u[s:2 * s] << 4) | (u[2 * s:3 * s] << 2) | u[3 * s:]


def hqq_unpack(p):
    """Official CUDA `unpack_2bit_u8` (§2.3/§5): row quarter q from bits 7-6 .. 1-0, then code − 1."""
    return torch.cat([(p & 0xC0) >> 6, (p & 0x30) >> 4, (p & 0x0C) >> 2, p & 0x03], 0).to(torch.float32) - 1.0


def synthetic_state_dict(qk_norm: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.3: torch.randn(*s, generator=g) * std
    sd = {}

    def ternary(name, out_f, in_f, bias=False):
        sd[name + ".weight"] = hqq_pack(torch.randint(-1, 2, (out_f, in_f), generator=g))
        sd[name + ".alphas"] = rnd(1, std=0.2)  # official init randn(1): can be negative
        if bias:
            sd[name + ".bias"] = rnd(out_f, std=0.1)

    def dense(name, out_f, in_f):
        sd[name + ".weight"] = rnd(out_f, in_f, std=1 / math.sqrt(in_f))
        sd[name + ".bias"] = rnd(out_f, std=0.1)

    dense("x_embedder", D, P * P * C_IN)
    dense("t_embedder.mlp.0", D, 256)
    dense("t_embedder.mlp.2", D, D)
    sd["y_embedder.embedding_table.weight"] = rnd(NCLS + 1, D, std=1.0)
    for i in range(L):
        pre = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            ternary(pre + "attention." + w, D, D)
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                sd[pre + f"attention.{n}.weight"] = 1 + rnd(D, std=0.1)
                sd[pre + f"attention.{n}.bias"] = rnd(D, std=0.1)
        ternary(pre + "feed_forward.w1", FFN, D)
        ternary(pre + "feed_forward.w3", FFN, D)
        ternary(pre + "feed_forward.w2", D, FFN)
        sd[pre + "attention_norm.weight"] = 1 + rnd(D, std=0.1)
        sd[pre + "ffn_norm.weight"] = 1 + rnd(D, std=0.1)
        ternary(pre + "adaLN_modulation.1", 6 * D, D, bias=True)
        sd[pre + "adaLN_modulation.2.weight"] = 1 + rnd(6 * D, std=0.1)
        # scale down so 2 blocks of O(1) gates do not blow the residual stream up
        sd[pre + "adaLN_modulation.2.weight"] *= 0.3
    dense("final_layer.linear", P * P * 2 * C_IN, D)
    dense("final_layer.adaLN_modulation.1", 2 * D, D)
    return sd


def write_official(tmp_path, sd, qk_norm: bool):
    d = tmp_path / "official"
    d.mkdir(exist_ok=True)
    args = argparse.Namespace(image_size=IMG, model="TinyTest_patch2", num_classes=NCLS, qk_norm=qk_norm,
                              vae="ema", global_seed=0)
    torch.save(args, d / "model_args.pth")
    torch.save(sd, d / "consolidated_ema_ternary.00-of-01.pth")
    return str(d)


def official_forward(sd, x, t, y, qk_norm: bool):
    """Official DiT_Llama forward (models.py, §1.2–1.5) in torch float32 from the official state dict."""
    def lin(name, h):
        w = sd[name + ".weight"]
        if w.dtype == torch.uint8:  # layer_inference.py: alphas · (unpack − 1), then F.linear
            w = sd[name + ".alphas"] * hqq_unpack(w)
        return F.linear(h, w, sd.get(name + ".bias"))

    def rms(h, w, eps=1e-5):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w

    n, c, hh, ww = x.shape
    tokens = x.view(n, c, hh // P, P, ww // P, P).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
    h = lin("x_embedder", tokens)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0", torch.cat([torch.cos(args), torch.sin(args)], -1))))
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    T, hd = h.shape[1], D // H
    rope = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(),
                                                          1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)))

    def rot(q):
        qc = torch.view_as_complex(q.reshape(n, T, H, hd // 2, 2)) * rope[None, :, None, :]
        return torch.view_as_real(qc).flatten(3)

    for i in range(L):
        pre = f"layers.{i}."
        mod = rms(lin(pre + "adaLN_modulation.1", F.silu(cond)), sd[pre + "adaLN_modulation.2.weight"])
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = mod.chunk(6, dim=1)
        a = rms(h, sd[pre + "attention_norm.weight"]) * (1 + sc_a[:, None]) + sh_a[:, None]
        q, k, v = (lin(pre + f"attention.{w}", a) for w in ("wq", "wk", "wv"))
        if qk_norm:
            q = F.layer_norm(q, (D,), sd[pre + "attention.q_norm.weight"], sd[pre + "attention.q_norm.bias"], 1e-5)
            k = F.layer_norm(k, (D,), sd[pre + "attention.k_norm.weight"], sd[pre + "attention.k_norm.bias"], 1e-5)
        q, k, v = rot(q.view(n, T, H, hd)), rot(k.view(n, T, H, hd)), v.view(n, T, H, hd)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + g_a[:, None] * lin(pre + "attention.wo", att.transpose(1, 2).reshape(n, T, D))
        f = rms(h, sd[pre + "ffn_norm.weight"]) * (1 + sc_f[:, None]) + sh_f[:, None]
        ffn = lin(pre + "feed_forward.w2", F.silu(lin(pre + "feed_forward.w1", f)) * lin(pre + "feed_forward.w3", f))
        h = h + g_f[:, None] * ffn
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(cond)).chunk(2, dim=1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = lin("final_layer.linear", h).reshape(n, hh // P, ww // P, P, P, 2 * C_IN)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, 2 * C_IN, hh, ww)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_converted_official_checkpoint_matches_the_official_forward(tmp_path, qk_norm):
    sd = synthetic_state_dict(qk_norm)
    ckpt = write_official(tmp_path, sd, qk_norm)
    manifest = convert_official(ckpt, str(tmp_path / "packed"), model_overrides=OVERRIDES)
    assert manifest["label_order"] == "official_string_sorted" and manifest["source"]["kind"] == "terdit-official"
    apply, params, cfg, manifest2 = load_packed(str(tmp_path / "packed"), {"packed_act_dtype": "f32", "dtype": "float32"})
    assert manifest2 == manifest and cfg["qk_norm"] == qk_norm

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, C_IN, IMG // 8, IMG // 8)).astype(np.float32)
    t, y = np.array([0, 421, 999]), np.array([3, 7, NCLS])  # includes the null class
    with torch.no_grad():
        ref = official_forward(sd, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y), qk_norm).numpy()
    out = np.asarray(apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)))
    out = out.transpose(0, 3, 1, 2)
    assert np.abs(ref).max() > 0.1  # a non-trivial output (gates and weights are all non-zero)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_unknown_and_missing_official_keys_are_listed(tmp_path):
    sd = synthetic_state_dict(False)
    sd["layers.0.attention.extra.weight"] = torch.zeros(2)
    del sd["layers.1.feed_forward.w2.alphas"]
    ckpt = write_official(tmp_path, sd, False)
    with pytest.raises(ConversionError, match=r"missing keys \['layers.1.feed_forward.w2.alphas'\].*"
                                              r"unknown keys \['layers.0.attention.extra.weight'\]"):
        convert_official(ckpt, str(tmp_path / "packed"), model_overrides=OVERRIDES)
    assert not os.path.exists(tmp_path / "packed")


def test_a_training_checkpoint_is_refused_with_a_clear_message(tmp_path):
    sd = synthetic_state_dict(False)
    sd["layers.0.attention.wq.weight"] = torch.randn(D, D)  # latent fp weight instead of the uint8 buffer
    ckpt = write_official(tmp_path, sd, False)
    with pytest.raises(ConversionError, match="not the uint8 2-bit buffer"):
        convert_official(ckpt, str(tmp_path / "packed"), model_overrides=OVERRIDES)


def test_official_label_is_the_string_sorted_class_order():
    assert [official_label(k) for k in (0, 1, 10, 100, 207, 89)] == [0, 1, 2, 3, 121, 878]
    table = official_label_table(1000)
    assert sorted(table.tolist()) == list(range(1000))  # a permutation
    names = sorted(str(i) for i in range(1000))  # class_to_idx.json of the official repo
    assert all(names[table[k]] == str(k) for k in range(1000))
    manifest = {"label_order": "official_string_sorted", "num_classes": 1000}
    np.testing.assert_array_equal(to_model_labels([207, 10, 1000], manifest), [121, 2, 1000])
    np.testing.assert_array_equal(to_model_labels([207, 10], {"label_order": "imagenet", "num_classes": 1000}),
                                  [207, 10])
    with pytest.raises(ValueError):
        to_model_labels([1001], manifest)


def test_manifest_is_valid_json_with_the_pack_format(tmp_path):
    ckpt = write_official(tmp_path, synthetic_state_dict(False), False)
    convert_official(ckpt, str(tmp_path / "packed"), model_overrides=OVERRIDES)
    with open(tmp_path / "packed" / "manifest.json") as f:
        m = json.load(f)
    assert m["pack_format"] == "terdit-k4-v1" and m["model"]["linear"] == "packed"
    assert len(m["ternary_layers"]) == L * 8  # wq wk wv wo w1 w2 w3 adaLN per block


def test_cli_describes_a_model_that_is_not_a_preset_with_a_config_file(tmp_path, capsys):
    """Without --config: one error line that says how (the command line cannot pass model_overrides); with a
    config file that sets the model's fields: the export is written."""
    from terdit_jax.convert.terdit_official import main

    ckpt = write_official(tmp_path, synthetic_state_dict(False), False)
    out = str(tmp_path / "packed")
    with pytest.raises(SystemExit) as e:
        main([ckpt, out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "'TinyTest_patch2'" in err and "--config FILE" in err and not os.path.exists(out)
    cfg = tmp_path / "tiny.py"
    cfg.write_text("from terdit_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                   f"    c.model.update(name='custom', dim={D}, n_layers={L}, n_heads={H}, multiple_of=16)\n"
                   "    return c\n")
    main([ckpt, out, "--config", str(cfg)])
    assert "wrote " + out in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "manifest.json")))["model"]["dim"] == D
