"""Import the released DiT checkpoints (facebookresearch/DiT: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) or a
checkpoint of the official train.py into a workdir, as a weights-only checkpoint that `--mode sample`, `--mode
eval` and `train.init_from` read like a trained run's.

    python -m terdit_jax.convert.dit_official CKPT OUT [--config PATH]

A released file is a plain float32 state dict (292 keys for XL/2, shared/reference/dit_xl.md §3); a train.py
checkpoint nests it under "ema" (taken, as the official `find_model` does) or "model". Keys map to our tree by a
table: torch Linear weights (out, in) become Flax kernels (in, out), the patch Conv2d weight (D, C, p, p) becomes
the kernel W.reshape(D, C·p²).T of a linear on patchify's (c, py, px) features, and the `Sequential(SiLU,
Linear)` adaLN modules drop their ".1". The fixed `pos_embed` is not stored (the model computes it); it is
checked against ours and its token count tells the file's resolution.

Without --config the preset and resolution are read from the shapes and the model is configured as
configs/dit_xl2_256.py does; with --config the file must be the model that config builds. OUT/checkpoints must
not hold a step yet. torch is needed only here (pip install 'terdit-jax[convert]'); it is imported lazily.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys

import numpy as np

from terdit_jax import trees
from terdit_jax import convert
from terdit_jax.convert import torch_module
from terdit_jax.checkpoint import CheckpointError
from terdit_jax.config import ConfigError, finalize
from terdit_jax.models import dit_xl
from terdit_jax.models.families import count_params

# The shipped configs of the released models, by resolution (what the sampling hint names).
SHIPPED_CONFIGS = {256: "configs/dit_xl2_256.py", 512: "configs/dit_xl2_512.py"}
DOWNLOAD = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt (or -512x512.pt)"
POS_EMBED_TOL = 1e-5  # the official table is float64 rounded to float32; ours is float32 (≤ 1.3e-6 apart)

# Module renames (ours → official), "{i}" = block index. Modules not listed keep their name.
MODULE_TABLE = {
    "x_embedder": "x_embedder.proj",  # timm PatchEmbed's Conv2d
    "t_embedder.mlp_0": "t_embedder.mlp.0",
    "t_embedder.mlp_2": "t_embedder.mlp.2",
    "blocks.{i}.adaLN_modulation": "blocks.{i}.adaLN_modulation.1",  # Sequential(SiLU, Linear)
    "final_layer.adaLN_modulation": "final_layer.adaLN_modulation.1",
}
# Variable renames (ours → official) and how the tensor is converted.
VARIABLE_TABLE = {
    "kernel": ("weight", "transpose"),  # torch Linear (out, in) → Flax (in, out); the patch conv: "conv"
    "bias": ("bias", "copy"),
    "embedding_table": ("embedding_table.weight", "copy"),
}


class ConversionError(ValueError):
    """A checkpoint that is not the DiT the config describes; the message says what the file is and what to do."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def official_key(path: tuple) -> tuple[str, str]:
    """Our variable path (e.g. ('blocks', 3, 'adaLN_modulation', 'kernel')) → (official key, conversion)."""
    module = ".".join(str(p) for p in path[:-1])
    templ = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", module)
    if templ in MODULE_TABLE:
        index = module.split(".")[1] if templ.startswith("blocks.") else ""
        module = MODULE_TABLE[templ].replace("{i}", index)
    if path[-1] not in VARIABLE_TABLE:
        raise ConversionError(f"no official name for variable {trees.key(path)} (is model.linear 'fp'?)")
    var, how = VARIABLE_TABLE[path[-1]]
    if module == "x_embedder.proj" and var == "weight":
        how = "conv"
    return f"{module}.{var}", how


def load_state_dict(path: str) -> tuple[dict[str, np.ndarray], str | None]:
    """(state dict as float32 numpy arrays, the key it was nested under or None) of a DiT checkpoint file.

    Read with torch.load(weights_only=True), allowing only argparse.Namespace besides tensors (train.py stores its
    args), so a tampered pickle cannot run code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file; download a released DiT, e.g. {DOWNLOAD}")
    torch = torch_module("the released DiT checkpoints")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises pickle, zip and runtime errors for foreign files
        raise ConversionError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {_one_line(e)[:160]}); "
                              f"pass a DiT .pt file such as {DOWNLOAD}") from e
    nested = None
    if isinstance(obj, dict):
        for key in ("ema", "model"):  # train.py: {"model", "ema", "opt", "args"}; the EMA is what samples well
            if isinstance(obj.get(key), dict):
                obj, nested = obj[key], key
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a DiT state dict (a dict of tensors, or "
                              "one under 'ema' or 'model')")
    odd = sorted(k for k, v in obj.items() if not (torch.is_tensor(v) and v.is_floating_point()))
    if odd:
        raise ConversionError(f"{path}: {len(odd)} entries are not floating-point tensors ({odd[:8]}); a DiT state "
                              "dict holds float tensors only")
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}, nested


def diffusers_layout(sd: dict, n_layers: int) -> dict:
    """An official-layout DiT state dict → diffusers' DiTTransformer2DModel keys (dit_xl.md §4), for arrays or torch
    tensors alike: every block holds its own copy of the t and y embedders, qkv splits into to_q/to_k/to_v, and
    pos_embed (a buffer there) is left out. The comparisons with diffusers load our weights through it."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for v in ("weight", "bias"):
        out[f"proj_out_1.{v}"] = sd[f"final_layer.adaLN_modulation.1.{v}"]
        out[f"proj_out_2.{v}"] = sd[f"final_layer.linear.{v}"]
    for i in range(n_layers):
        tb, ob = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[tb + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for v in ("weight", "bias"):
            out[tb + f"norm1.emb.timestep_embedder.linear_1.{v}"] = sd[f"t_embedder.mlp.0.{v}"]
            out[tb + f"norm1.emb.timestep_embedder.linear_2.{v}"] = sd[f"t_embedder.mlp.2.{v}"]
            out[tb + f"norm1.linear.{v}"] = sd[ob + f"adaLN_modulation.1.{v}"]
            qkv = sd[ob + f"attn.qkv.{v}"]
            d = qkv.shape[0] // 3
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                out[tb + f"attn1.{name}.{v}"] = qkv[j * d:(j + 1) * d]
            out[tb + f"attn1.to_out.0.{v}"] = sd[ob + f"attn.proj.{v}"]
            out[tb + f"ff.net.0.proj.{v}"] = sd[ob + f"mlp.fc1.{v}"]
            out[tb + f"ff.net.2.{v}"] = sd[ob + f"mlp.fc2.{v}"]
    return out


def describe(shapes: dict[str, tuple], source: str = "the checkpoint") -> dict:
    """What a DiT state dict is, from its shapes alone: dim, n_layers, patch_size, in_channels, out_channels,
    num_classes, tokens, input_size (latent side), image_size (pixels, /8 latent), learn_sigma, and `name`, the
    preset with this width, depth and patch (None when there is none)."""
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ConversionError(f"{source} is not a DiT checkpoint: it lacks {absent} (its {len(shapes)} keys begin "
                              f"{sorted(shapes)[:4]}); pass a DiT .pt file such as {DOWNLOAD}")
    w, pe = tuple(shapes["x_embedder.proj.weight"]), tuple(shapes["pos_embed"])
    if len(w) != 4 or w[2] != w[3]:
        raise ConversionError(f"{source}: x_embedder.proj.weight has shape {w}, not the (D, C, p, p) of a square "
                              "patch Conv2d")
    dim, in_channels, p = w[0], w[1], w[2]
    grid = math.isqrt(pe[1]) if len(pe) == 3 else 0
    if len(pe) != 3 or pe[0] != 1 or pe[2] != dim or grid * grid != pe[1]:
        raise ConversionError(f"{source}: pos_embed has shape {pe}, not (1, T, {dim}) with T a square token grid")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layers = max(blocks) + 1 if blocks else 0
    fl = tuple(shapes["final_layer.linear.weight"])
    out_channels = fl[0] // (p * p)
    if out_channels * p * p != fl[0] or out_channels not in (in_channels, 2 * in_channels):
        raise ConversionError(f"{source}: final_layer.linear.weight has shape {fl}; a DiT with {in_channels} input "
                              f"channels and {p}×{p} patches has {p * p * in_channels} or {2 * p * p * in_channels} "
                              "output rows")
    name = next((n for n, f in dit_xl.PRESETS.items()
                 if (f["dim"], f["n_layers"], f["patch_size"]) == (dim, n_layers, p)), None)
    return dict(name=name, dim=dim, n_layers=n_layers, patch_size=p, in_channels=in_channels,
                out_channels=out_channels, learn_sigma=out_channels == 2 * in_channels,
                num_classes=int(shapes["y_embedder.embedding_table.weight"][0]) - 1, tokens=pe[1],
                input_size=grid * p, image_size=grid * p * 8)


def _what(info: dict) -> str:
    """'DiT-XL/2 (D=1152, 28 blocks, patch 2) at 256 px' for the messages."""
    return (f"{info['name'] or 'a DiT of no preset'} (D={info['dim']}, {info['n_layers']} blocks, patch "
            f"{info['patch_size']}) at {info['image_size']} px")


def load_config_file(path: str):
    """get_config() of a config file (as `python -m terdit_jax.main --config PATH` loads it)."""
    return convert.load_config_file(path, ConversionError)


def default_config(info: dict, source: str):
    """The config for a file given without --config: configs/dit_xl2_256.py with the file's preset, resolution,
    classes and output channels."""
    from terdit_jax.configs.dit_xl2_256 import get_config
    if info["name"] is None:
        raise ConversionError(f"{source} is {_what(info)}, whose width, depth and patch fit no DiT preset "
                              f"({', '.join(dit_xl.PRESETS)}); pass --config with model.family='dit', "
                              "model.name='custom' and the model's dim, n_layers, n_heads and patch_size")
    c = get_config()
    c.model.name, c.model.num_classes = info["name"], info["num_classes"]
    c.model.in_channels, c.model.learn_sigma = info["in_channels"], info["learn_sigma"]
    c.data.image_size = info["image_size"]
    return c


def check_config(config, info: dict, source: str, config_name: str):
    """Refuse a config that cannot hold the file: another family, a quantized build, another resolution or
    another size (the exact per-tensor shapes are checked when the weights are filled in)."""
    m = config.model
    if m.family != "dit":
        raise ConversionError(f"{config_name} builds a model.family={m.family!r} model; {source} is the original "
                              f"DiT: use a config with model.family='dit', e.g. {SHIPPED_CONFIGS[256]}")
    if m.linear != "fp" or m.sites:
        raise ConversionError(f"{config_name} has model.linear={m.linear!r} and {len(m.sites)} site rules; the "
                              "released DiT weights are full precision: import them with model.linear='fp' and no "
                              "model.sites (quantize the imported workdir afterwards)")
    ours = dict(dim=m.dim, n_layers=m.n_layers, patch_size=m.patch_size, in_channels=m.in_channels)
    theirs = {k: info[k] for k in ours}
    if ours != theirs:
        raise ConversionError(f"{source} is {_what(info)} but {config_name} builds {m.name} (D={m.dim}, "
                              f"{m.n_layers} blocks, patch {m.patch_size}); use a config with "
                              f"model.name={info['name'] or 'custom'!r}")
    if dit_xl.num_tokens(m) != info["tokens"]:
        fix = (f"use {SHIPPED_CONFIGS[info['image_size']]}" if info["name"] == "DiT-XL/2"
               and info["image_size"] in SHIPPED_CONFIGS else f"set data.image_size={info['image_size']}")
        raise ConversionError(f"{source} is a {info['image_size']} px model ({info['tokens']} tokens, a "
                              f"{info['input_size']}×{info['input_size']} latent) but {config_name} is for "
                              f"{config.data.image_size} px ({dit_xl.num_tokens(m)} tokens); {fix}")


def check_pos_embed(table: np.ndarray, model_cfg, source: str):
    """The file's fixed table must be DiT's (the model recomputes it and holds no copy)."""
    g = int(model_cfg.input_size) // int(model_cfg.patch_size)
    want = np.asarray(dit_xl.pos_embed(int(model_cfg.dim), g, g))
    err = float(np.max(np.abs(table.reshape(want.shape) - want)))
    if not err <= POS_EMBED_TOL:
        raise ConversionError(f"{source}: pos_embed differs from DiT's fixed sin-cos table by {err:.3g} (max |Δ|); "
                              "this port computes that table and cannot hold a trained or modified one")


def convert_state(sd: dict[str, np.ndarray], model_cfg, source: str = "the checkpoint"):
    """Official state dict (numpy) → our params (nnx.State of the model `model_cfg` builds). Missing and
    unknown keys and tensors of the wrong shape raise one ConversionError listing them."""
    used = {"pos_embed"}  # checked by check_pos_embed, not stored

    def lookup(path, want):
        key, how = official_key(path)
        if key not in sd:
            raise KeyError(key)
        used.add(key)
        t = sd[key]
        if how == "conv":
            if t.ndim != 4:
                raise ValueError(f"{key} has shape {t.shape}, not a (D, C, p, p) Conv2d weight")
            return np.ascontiguousarray(t.reshape(t.shape[0], -1).T)
        if how == "transpose":
            if t.ndim != 2:
                raise ValueError(f"{key} has shape {t.shape}, not an (out, in) Linear weight")
            return np.ascontiguousarray(t.T)
        return t

    return convert.fill_state(sd, model_cfg, lookup, used, f"{source} does not match {model_cfg.name} "
                              f"(D={model_cfg.dim}, {model_cfg.n_layers} blocks, {model_cfg.n_heads} heads, "
                              f"{model_cfg.num_classes} classes)", ConversionError)


def _has_steps(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def convert_official(ckpt_path: str, out_dir: str, *, config=None) -> dict:
    """DiT checkpoint file → out_dir/checkpoints/0 (weights only). `config`: None (from the shapes), a config
    file path or a ConfigDict. Returns {'config', 'source', 'checkpoint', 'sample_config'}; 'sample_config' is
    the config file to sample with (None when only the given ConfigDict describes the model)."""
    ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
    if _has_steps(ckpt_dir):  # before reading gigabytes
        raise ConversionError(f"{ckpt_dir} holds step(s) {_has_steps(ckpt_dir)} already; import into a new OUT folder")
    source = os.path.basename(ckpt_path)
    sd, nested = load_state_dict(ckpt_path)
    info = describe({k: v.shape for k, v in sd.items()}, source)
    if config is None:
        config_name = "the inferred config"
        raw = default_config(info, source)
        sample_config = (SHIPPED_CONFIGS.get(info["image_size"]) if info["name"] == "DiT-XL/2"
                         and info["num_classes"] == 1000 and info["learn_sigma"] else None)
    elif isinstance(config, str):
        config_name, raw, sample_config = config, load_config_file(config), config
    else:
        config_name, raw, sample_config = "the config", config, None
    try:
        config = finalize(raw)
    except ConfigError as e:
        raise ConversionError(f"{config_name}: {e}") from e
    check_config(config, info, source, config_name)
    check_pos_embed(sd["pos_embed"], config.model, source)
    params = convert_state(sd, config.model, source)
    del sd
    meta = {"kind": "dit-official", "file": os.path.abspath(ckpt_path), "nested": nested, "preset": info["name"],
            "image_size": int(config.data.image_size)}
    checkpoint = convert.save_imported(ckpt_dir, params, config.model, meta)
    return {"config": config, "source": meta, "checkpoint": checkpoint, "sample_config": sample_config}


def sample_command(result: dict, out_dir: str) -> str:
    """The `--mode sample` command for a converted workdir, ready to paste: absolute paths, quoted, and the VAE
    folder as `vae/` (where the README's download command puts it)."""
    m, d = result["config"].model, result["config"].data
    cfg = result["sample_config"]
    extra = ""
    if cfg is None:  # a preset other than XL/2: the 256 px config with this model's fields
        cfg = SHIPPED_CONFIGS[256]
        extra = f" --config.model.name={m.name} --config.data.image_size={d.image_size}" + (
            f" --config.model.num_classes={m.num_classes}" if m.num_classes != 1000 else "") + (
            "" if m.learn_sigma else " --config.model.learn_sigma=False")
    if cfg in SHIPPED_CONFIGS.values():
        cfg = convert.shipped_config(os.path.basename(cfg))
    return (f"python -m terdit_jax.main --config {shlex.quote(os.path.abspath(cfg))} --workdir "
            f"{shlex.quote(os.path.abspath(out_dir))} --mode sample{extra} --config.data.vae_path=vae/")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a DiT .pt file (released state dict, or a train.py checkpoint)")
    p.add_argument("out", help="workdir to write (its checkpoints/ must hold no step yet)")
    p.add_argument("--config", default=None, help="config file of the model (default: read from the shapes, "
                   f"configured as {SHIPPED_CONFIGS[256]})")
    a = p.parse_args(argv)
    try:
        result = convert_official(a.checkpoint, a.out, config=a.config)
    except (ConversionError, FileNotFoundError, ImportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m, nested = result["config"].model, result["source"]["nested"]
    print(f"wrote {result['checkpoint']}: {m.name} at {result['config'].data.image_size} px, "
          f"{count_params(m):,} parameters ({count_params(m, trainable_only=True):,} trained + the fixed position "
          f"table), from {f'the {nested!r} weights of ' if nested else ''}{a.checkpoint}")
    print("sample with: " + sample_command(result, a.out))
    print("  (vae/: the SD-VAE, `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir vae/`)")


if __name__ == "__main__":
    main()
