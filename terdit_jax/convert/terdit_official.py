"""Import the released TerDiT checkpoints (github.com/Lucky-Lance/TerDiT, HF lucky-lance/TerDiT) as packed exports.

A released checkpoint directory holds `model_args.pth` (a pickled argparse.Namespace with image_size, model,
num_classes, qk_norm, vae) and `consolidated_ema_ternary.00-of-01.pth` (the state dict of the official 2-bit
inference model, terdit_official.md §5). Keys map to our tree by a table; ternary `*.weight` uint8 buffers
(hqq `pack_2bit_u8`, torch (out, in) packed along out) go through `terdit_kernels.from_hqq`, torch Linear
weights (out, in) are transposed to Flax kernels (in, out), `alphas` (1,) become scalars.

The released models were trained on an ImageFolder with class folders "0".."999", whose labels follow the
string sort of the folder names (§3.1); the export records `label_order = "official_string_sorted"` and
`labels.to_model_labels` maps ImageNet classes to model labels at sampling time.

    python -m terdit_jax.convert.terdit_official CKPT_DIR OUT_DIR [--overwrite] [--config FILE]

torch is needed only here (pip install 'terdit-jax[convert]'); it is imported lazily.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
from flax import nnx

import terdit_kernels
from terdit_jax import trees
from terdit_jax.convert import load_config_file, torch_module
from terdit_jax.config import ConfigError, base_config, finalize
from terdit_jax.export import ExportError, abstract_packed, write_packed
from terdit_jax.models.families import FAMILIES

STATE_FILE = "consolidated_ema_ternary.00-of-01.pth"
ARGS_FILE = "model_args.pth"

# Module renames (ours → official), "{i}" = block index. Modules not listed keep their name.
MODULE_TABLE = {
    "t_embedder.mlp_0": "t_embedder.mlp.0",
    "t_embedder.mlp_2": "t_embedder.mlp.2",
    "final_layer.adaLN_modulation": "final_layer.adaLN_modulation.1",
    "layers.{i}.adaLN_modulation": "layers.{i}.adaLN_modulation.1",  # Sequential(SiLU, TernaryLinear, RMSNorm)
    "layers.{i}.adaLN_norm": "layers.{i}.adaLN_modulation.2",  # TerDiT's RMSNorm(6D) after the adaLN linear
}
# Variable renames (ours → official) and how the tensor is converted.
VARIABLE_TABLE = {
    "packed": ("weight", "hqq"),  # uint8 (out/4, in) hqq → our (padded_k(in)/4, out)
    "kernel": ("weight", "transpose"),  # torch Linear (out, in) → Flax (in, out)
    "alpha": ("alphas", "scalar"),  # (1,) → ()
    "bias": ("bias", "copy"),
    "weight": ("weight", "copy"),  # RMSNorm / LayerNorm weights
    "embedding_table": ("embedding_table.weight", "copy"),
}


class ConversionError(ValueError):
    """A checkpoint that does not match the official TerDiT layout; the message lists what differs."""


def official_key(path: tuple) -> tuple[str, str]:
    """Our variable path (e.g. ('layers', 3, 'adaLN_norm', 'weight')) → (official state-dict key, conversion)."""
    module = ".".join(str(p) for p in path[:-1])
    templ = re.sub(r"^layers\.\d+\.", "layers.{i}.", module)
    if templ in MODULE_TABLE:
        renamed = MODULE_TABLE[templ]
        if "{i}" in renamed:
            renamed = renamed.replace("{i}", module.split(".")[1])
        module = renamed
    if path[-1] not in VARIABLE_TABLE:
        raise ConversionError(f"no official name for variable {'.'.join(map(str, path))}")
    var, how = VARIABLE_TABLE[path[-1]]
    return f"{module}.{var}", how


def load_official(ckpt_dir: str):
    """(model_args dict, state dict of numpy arrays) from an official checkpoint directory.

    Both files are read with torch.load(weights_only=True) (only argparse.Namespace is allowed besides tensors),
    so a tampered pickle cannot run code.
    """
    torch = torch_module("the official TerDiT checkpoints")
    paths = {name: os.path.join(ckpt_dir, name) for name in (ARGS_FILE, STATE_FILE)}
    absent = [p for p in paths.values() if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(f"not an official TerDiT checkpoint directory, missing {absent}; download e.g. "
                                "600M-256 or 4.2B-256 from https://huggingface.co/lucky-lance/TerDiT (the folder "
                                f"with {ARGS_FILE} and {STATE_FILE})")
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(paths[ARGS_FILE], map_location="cpu", weights_only=True)
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    sd = torch.load(paths[STATE_FILE], map_location="cpu", weights_only=True)
    if "model" in sd and isinstance(sd["model"], dict):  # some Large-DiT dumps nest the weights
        sd = sd["model"]

    def to_np(t):
        return t.numpy() if t.dtype == torch.uint8 else t.detach().to(torch.float32).numpy()
    return args, {k: to_np(v) for k, v in sd.items()}


def official_config(args: dict, model_overrides: dict | None = None):
    """Our finalized config for an official model_args (model name from `DiT_models`, qk_norm, classes, size).

    model_overrides (e.g. {'name': 'custom', 'dim': 64, ...}) replace model fields; needed only for a model
    name outside `models.dit.PRESETS`.
    """
    missing = [k for k in ("model", "image_size") if k not in args]
    if missing:
        raise ConversionError(f"{ARGS_FILE} lacks {missing}; it has {sorted(args)}")
    c = base_config()
    m = c.model
    m.name = str(args["model"])
    m.qk_norm = bool(args.get("qk_norm", False))
    m.num_classes = int(args.get("num_classes", 1000))
    m.linear = "packed"
    m.quantized_layers = "attention,feed_forward,adaLN_modulation"  # the TerDiT ternary layers (§1.6)
    m.adaln_norm = True
    c.data.image_size = int(args["image_size"])
    c.data.latent = True
    for k, v in (model_overrides or {}).items():
        setattr(m, k, v)
    presets = FAMILIES.get("large_dit").presets
    if m.name != "custom" and m.name not in presets:
        raise ConversionError(f"model {m.name!r} from {ARGS_FILE} is not one of {sorted(presets)}; describe it "
                              "with --config FILE, a config whose model sets name='custom' and dim, n_layers, "
                              "n_heads (and multiple_of, ffn_dim_multiplier where they differ)")
    try:
        return finalize(c)
    except ConfigError as e:
        raise ConversionError(str(e)) from e


def config_overrides(path: str) -> dict:
    """The model fields a config file sets (those that differ from the defaults): how `--config` describes a
    model that is not a preset."""
    given, default = load_config_file(path, ConversionError).model.to_dict(), base_config().model.to_dict()
    return {k: v for k, v in given.items() if k in default and v != default[k]}


def convert_state(sd: dict, model_cfg) -> nnx.State:
    """Official state dict (numpy) → our packed model state. Unknown/missing keys and wrong shapes raise
    ConversionError listing all of them."""
    used = set()

    def lookup(path, want):
        key, how = official_key(path)
        if key not in sd:
            raise KeyError(key)
        used.add(key)
        t = sd[key]
        if how == "hqq":
            if t.dtype != np.uint8:
                raise ConversionError(f"{key} is {t.dtype}, not the uint8 2-bit buffer of an inference "
                                      f"checkpoint; use {STATE_FILE}, not a training (latent fp) checkpoint")
            return terdit_kernels.from_hqq(t, out_features=want.shape[1])
        if how == "transpose":
            return np.ascontiguousarray(t.T)
        if how == "scalar":
            if t.size != 1:
                raise ConversionError(f"{key} has shape {t.shape}, expected (1,)")
            return t.reshape(())
        return t

    state, missing, bad = trees.fill(abstract_packed(model_cfg)[1], lookup)
    unknown = sorted(set(sd) - used)
    if missing or unknown or bad:
        raise ConversionError(
            f"official checkpoint does not match {model_cfg.name} (dim {model_cfg.dim}, {model_cfg.n_layers} layers, "
            f"qk_norm={model_cfg.qk_norm}): missing keys {missing}; unknown keys {unknown}; bad tensors {bad}")
    return state


def convert_official(ckpt_dir: str, out_dir: str, *, model_overrides: dict | None = None,
                     overwrite: bool = False) -> dict:
    """Official TerDiT checkpoint directory → packed export in `out_dir` (see `export.load_packed`). Returns the manifest."""
    args, sd = load_official(ckpt_dir)
    config = official_config(args, model_overrides)
    state = convert_state(sd, config.model)
    source = {"kind": "terdit-official", "dir": os.path.abspath(ckpt_dir), "file": STATE_FILE,
              "model_args": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                             for k, v in args.items()},
              "image_size": int(config.data.image_size), "vae": str(args.get("vae", ""))}
    return write_packed(out_dir, state, config.model, label_order="official_string_sorted", source=source,
                        overwrite=overwrite)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help=f"folder with {ARGS_FILE} and {STATE_FILE}")
    p.add_argument("out_dir", help="packed export to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--config", default=None, help="config file describing a model that is not a preset (its "
                   "model fields that differ from the defaults replace those of model_args.pth)")
    a = p.parse_args(argv)
    try:
        overrides = config_overrides(a.config) if a.config else None
        manifest = convert_official(a.ckpt_dir, a.out_dir, model_overrides=overrides, overwrite=a.overwrite)
    except (ConversionError, ExportError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out_dir}: {manifest['model']['name']}, {manifest['nbytes'] / 1e9:.3f} GB, "
          f"labels {manifest['label_order']}")


if __name__ == "__main__":
    main()
