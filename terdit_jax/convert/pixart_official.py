"""Import released PixArt-α / PixArt-Σ transformer weights into a workdir, as a weights-only checkpoint that
`--mode sample|eval|quantize|export` and `train.init_from` read like a trained run's.

    python -m terdit_jax.convert.pixart_official SRC OUT [--config PATH]

SRC is one of
  * a diffusers transformer folder: `config.json` and `diffusion_pytorch_model.safetensors` (or the sharded
    `*-0000N-of-0000M.safetensors`), e.g. the `transformer/` folder of PixArt-alpha/PixArt-XL-2-512x512;
  * one `.safetensors` file in that layout;
  * an original `.pth` of the PixArt repositories (PixArt-XL-2-512x512.pth, PixArt-Sigma-XL-2-1024-MS.pth): its fused
    self-attention q·k·v and cross-attention k·v weights are split in that order (PixArt's
    scripts/convert_pixart_alpha_to_diffusers.py), the other modules renamed.
The learned unconditional caption (`y_embedding`) is not imported: CFG here uses the encoded empty prompt, as
diffusers' pipelines do. The fixed position table is not stored; where the file has one it is checked against ours.

Without --config: configs/pixart_alpha_1024.py for weights with micro-conditions (PixArt-α 1024-MS),
configs/pixart_sigma_1024.py for other 1024 px weights, configs/pixart_alpha_512.py otherwise (at the file's
resolution when it tells it). PixArt-Σ at 512 px has the same tensors as PixArt-α: import it with a --config
whose model.caption_len is 300 (Σ's token limit). torch and safetensors are needed here only (pip install
'terdit-jax[convert]').
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys

import numpy as np

from terdit_jax import convert
from terdit_jax.checkpoint import CheckpointError
from terdit_jax.config import ConfigError, finalize
from terdit_jax.convert.pixart_diffusers import IGNORED, module_path, to_param
from terdit_jax.models import pixart
from terdit_jax.models.families import count_params

SHIPPED = {512: "pixart_alpha_512.py", 1024: "pixart_sigma_1024.py"}
MICRO_CONFIG = "pixart_alpha_1024.py"  # weights with micro-conditions (PixArt-α 1024-MS)
POS_EMBED_TOL = 1e-4

# original module prefix → diffusers module prefix (block modules with {i})
RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "y_embedder.y_embedding": "caption_projection.y_embedding",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.scale_shift_table": "scale_shift_table",
    "blocks.{i}.scale_shift_table": "transformer_blocks.{i}.scale_shift_table",
    "blocks.{i}.attn.proj": "transformer_blocks.{i}.attn1.to_out.0",
    "blocks.{i}.cross_attn.q_linear": "transformer_blocks.{i}.attn2.to_q",
    "blocks.{i}.cross_attn.proj": "transformer_blocks.{i}.attn2.to_out.0",
    "blocks.{i}.mlp.fc1": "transformer_blocks.{i}.ff.net.0.proj",
    "blocks.{i}.mlp.fc2": "transformer_blocks.{i}.ff.net.2",
}
# fused original linears → the diffusers linears their output rows split into, in order
SPLITS = {
    "blocks.{i}.attn.qkv": ("transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k",
                            "transformer_blocks.{i}.attn1.to_v"),
    "blocks.{i}.cross_attn.kv_linear": ("transformer_blocks.{i}.attn2.to_k", "transformer_blocks.{i}.attn2.to_v"),
}
MICRO_CONDITIONS = ("adaln_single.emb.resolution_embedder", "adaln_single.emb.aspect_ratio_embedder")


class ConversionError(ValueError):
    """Weights that are not the PixArt the config describes; the message says what the file is and what to do."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _template(module: str) -> tuple[str, str]:
    """'blocks.7.attn.qkv' → ('blocks.{i}.attn.qkv', '7')."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    return (f"blocks.{{i}}.{m[2]}", m[1]) if m else (module, "")


def from_original(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """An original PixArt state dict → (the diffusers-layout state dict, the stored position table or None).
    Unknown keys are kept as they are (the import then names them)."""
    out, table = {}, sd.get("pos_embed")
    for key, value in sd.items():
        if key == "pos_embed":
            continue
        module, leaf = key.rsplit(".", 1) if "." in key else (key, "")
        if _template(key)[0] in RENAMES:  # a bare parameter (y_embedding, scale_shift_table)
            module, leaf = key, ""
        templ, i = _template(module)
        if templ in SPLITS:
            parts = SPLITS[templ]
            if value.shape[0] % len(parts):
                raise ConversionError(f"{key} has {value.shape[0]} output rows, not {len(parts)} equal parts")
            for name, part in zip(parts, np.split(value, len(parts), axis=0)):
                out[f"{name.replace('{i}', i)}.{leaf}"] = part
        elif templ in RENAMES:
            out[RENAMES[templ].replace("{i}", i) + (f".{leaf}" if leaf else "")] = value
        else:
            out[key] = value
    return out, table


# ------------------------------------------------------------------------------------------------------ reading

def _torch(what: str):
    return convert.torch_module(what)


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    torch = _torch("PixArt safetensors (they may hold bfloat16)")
    from safetensors.torch import load_file
    sd = {}
    for f in files:
        sd.update({k: v.to(torch.float32).numpy() for k, v in load_file(f).items()})
    return sd


def read_weights(src: str) -> tuple[dict[str, np.ndarray], dict, np.ndarray | None, str]:
    """SRC (see the module docstring) → (diffusers-layout state dict, its config.json or {}, the original position
    table or None, 'diffusers'|'original')."""
    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{src} holds no .safetensors: pass a diffusers transformer folder (config.json + "
                                    f"diffusion_pytorch_model.safetensors) or a .pth/.safetensors file")
        cfg_path = os.path.join(src, "config.json")
        config = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
        return _read_safetensors(files), config, None, "diffusers"
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file or folder; pass the released PixArt transformer (a diffusers "
                                f"`transformer/` folder, a .safetensors or the original .pth)")
    if src.endswith(".safetensors"):
        return _read_safetensors([src]), {}, None, "diffusers"
    torch = _torch("the original PixArt .pth files")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises pickle, zip and runtime errors for foreign files
        raise ConversionError(f"{src} is not a readable torch checkpoint ({type(e).__name__}: {_one_line(e)})") from e
    if isinstance(obj, dict):  # released files nest the weights under "state_dict"; PixArt's training also keeps an EMA
        obj = next((obj[k] for k in ("state_dict_ema", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{src} is not a PixArt state dict (a dict of tensors, or one under 'state_dict')")
    sd, table = from_original({k: v.to(torch.float32).numpy() for k, v in obj.items()})
    return sd, {}, table, "original"


# ------------------------------------------------------------------------------------------------------ checking

def file_resolution(config_json: dict, table: np.ndarray | None, patch: int = 2) -> int | None:
    """Pixels the weights were trained at: diffusers' sample_size × 8, or the original table's tokens."""
    if config_json.get("sample_size"):
        return int(config_json["sample_size"]) * 8
    if table is not None:
        return int(round(math.sqrt(table.reshape(-1, table.shape[-1]).shape[0]))) * patch * 8
    return None


def has_micro_conditions(sd: dict, config_json: dict) -> bool:
    return bool(config_json.get("use_additional_conditions")) or any(k.startswith(MICRO_CONDITIONS) for k in sd)


def default_config_file(resolution: int | None, micro: bool) -> str:
    return convert.shipped_config(MICRO_CONFIG if micro else SHIPPED.get(resolution or 512, SHIPPED[512]))


def default_config(resolution: int | None, micro: bool, config_json: dict):
    c = convert.load_config_file(default_config_file(resolution, micro), ConversionError)
    c.data.image_size = resolution or c.data.image_size
    if config_json.get("interpolation_scale"):
        c.model.pe_interpolation = float(config_json["interpolation_scale"])
    return c


def check(config, sd: dict, config_json: dict, table, resolution: int | None, source: str, config_name: str):
    m = config.model
    if m.family != "pixart":
        raise ConversionError(f"{config_name} builds a model.family={m.family!r} model; {source} is PixArt: use "
                              f"configs/pixart_alpha_512.py or configs/pixart_sigma_1024.py")
    if m.linear != "fp" or m.sites:
        raise ConversionError(f"{config_name} has model.linear={m.linear!r} and {len(m.sites)} site rules; the "
                              f"released weights are full precision: import with model.linear='fp' and quantize the "
                              f"workdir afterwards")
    if has_micro_conditions(sd, config_json) != bool(m.micro_conditions):
        have = "has" if has_micro_conditions(sd, config_json) else "has no"
        raise ConversionError(f"{source} {have} resolution and aspect-ratio micro-conditions but {config_name} has "
                              f"model.micro_conditions={bool(m.micro_conditions)}; use "
                              f"{'configs/' + MICRO_CONFIG if have == 'has' else 'a config without them'}")
    if resolution is not None and resolution != int(config.data.image_size):
        raise ConversionError(f"{source} holds {resolution} px weights but {config_name} is for "
                              f"{config.data.image_size} px; use a config for {resolution} px "
                              f"(--config with data.image_size={resolution})")
    if config_json.get("interpolation_scale") and float(config_json["interpolation_scale"]) != \
            pixart.interpolation_scale(m):
        raise ConversionError(f"{source} was trained with position interpolation {config_json['interpolation_scale']}"
                              f" but {config_name} uses {pixart.interpolation_scale(m)}; set model.pe_interpolation")
    if table is not None:
        g = int(m.input_size) // int(m.patch_size)
        want = np.asarray(pixart.pos_embed(int(m.dim), g, g, g, pixart.interpolation_scale(m)))
        got = table.reshape(-1, table.shape[-1])
        if got.shape != want.shape or not float(np.max(np.abs(got - want))) <= POS_EMBED_TOL:
            raise ConversionError(f"{source}: its position table {got.shape} is not the one {config_name} computes "
                                  f"{want.shape}; this port cannot hold a trained or modified table")


def convert_state(sd: dict[str, np.ndarray], model_cfg, source: str):
    """Diffusers-layout state dict → our params (nnx.State); missing, unknown and misshapen tensors raise one
    ConversionError listing them."""
    by_path = {module_path(k): k for k in sd if k not in IGNORED}
    used = set(IGNORED)

    def lookup(path, want):
        key = by_path.get(tuple(path))
        if key is None:
            raise KeyError(".".join(map(str, path)))
        used.add(key)
        return to_param(key, sd[key])

    return convert.fill_state(sd, model_cfg, lookup, used, f"{source} does not match {model_cfg.name} "
                              f"(D={model_cfg.dim}, {model_cfg.n_layers} blocks, caption width "
                              f"{model_cfg.caption_channels})", ConversionError)


def import_pixart(src: str, out_dir: str, *, config=None) -> dict:
    """Released PixArt weights → out_dir/checkpoints/0 (weights only). `config`: None (from the file), a config
    file path or a ConfigDict. Returns {'config', 'source', 'checkpoint', 'config_file'}."""
    ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
    if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise ConversionError(f"{ckpt_dir} holds a checkpoint already; import into a new OUT folder")
    source = os.path.basename(os.path.normpath(src))
    sd, config_json, table, layout = read_weights(src)
    resolution = file_resolution(config_json, table)
    if config is None:
        micro = has_micro_conditions(sd, config_json)
        config_name, raw = "the default config", default_config(resolution, micro, config_json)
        config_file = default_config_file(resolution, micro)
    elif isinstance(config, str):
        config_name, raw, config_file = config, convert.load_config_file(config, ConversionError), config
    else:
        config_name, raw, config_file = "the config", config, None
    try:
        config = finalize(raw)
    except ConfigError as e:
        raise ConversionError(f"{config_name}: {e}") from e
    check(config, sd, config_json, table, resolution, source, config_name)
    params = convert_state(sd, config.model, source)
    del sd
    meta = {"kind": "pixart", "layout": layout, "file": os.path.abspath(src),
            "image_size": int(config.data.image_size)}
    checkpoint = convert.save_imported(ckpt_dir, params, config.model, meta)
    return {"config": config, "source": meta, "checkpoint": checkpoint, "config_file": config_file}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a diffusers transformer folder, a .safetensors file or an original PixArt .pth")
    p.add_argument("out", help="workdir to write (its checkpoints/ must hold no step yet)")
    p.add_argument("--config", default=None, help="config file of the model (default: by the file's resolution)")
    a = p.parse_args(argv)
    try:
        result = import_pixart(a.src, a.out, config=a.config)
    except (ConversionError, FileNotFoundError, ImportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    c = result["config"]
    print(f"wrote {result['checkpoint']}: PixArt {c.model.name} at {c.data.image_size} px, "
          f"{count_params(c.model, trainable_only=True):,} trained parameters, from the {result['source']['layout']} "
          f"layout of {a.src}")
    if result["config_file"]:
        print(f"use it with: python -m terdit_jax.main --config {shlex.quote(os.path.abspath(result['config_file']))} "
              f"--workdir {shlex.quote(os.path.abspath(a.out))} --mode sample"
              + (f" --config.data.image_size={c.data.image_size}" if c.data.image_size not in SHIPPED else ""))


if __name__ == "__main__":
    main()
