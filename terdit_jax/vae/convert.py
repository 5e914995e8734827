"""Load diffusers ``AutoencoderKL`` weights (safetensors or torch .bin) into the Flax port. No network access.

Accepted layouts: a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), a
Stable Diffusion pipeline folder with a ``vae/`` subfolder, or a single weights file. Both attention spellings are
accepted: current diffusers (``to_q/to_k/to_v/to_out.0``) and the old one (``query/key/value/proj_attn``), whose
weights may be stored as 1x1 convs (out, in, 1, 1); diffusers renames the latter in
``ModelMixin._convert_deprecated_attention_blocks``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers key fragment -> Flax attribute path fragment (see the module docstring of autoencoder_kl.py).
_RENAMES = [
    (r"\.downsamplers\.0\.conv\.", ".downsample."),
    (r"\.upsamplers\.0\.conv\.", ".upsample."),
    (r"\.attentions\.0\.", ".attention."),
    (r"\.(to_out\.0|proj_attn)\.", ".to_out."),
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
]


def _find_files(path: Path) -> tuple[Path, Path | None]:
    """Returns (weights file, config.json or None) for a file, a VAE folder or a pipeline folder."""
    if path.is_file():
        cfg = path.parent / "config.json"
        return path, cfg if cfg.is_file() else None
    for folder in (path, path / "vae"):
        for name in WEIGHT_NAMES:
            if (folder / name).is_file():
                cfg = folder / "config.json"
                return folder / name, cfg if cfg.is_file() else None
    raise FileNotFoundError(
        f"no VAE weights under {path}: expected one of {WEIGHT_NAMES} there or in its vae/ subfolder. Download a "
        "diffusers VAE (e.g. stabilityai/sd-vae-ft-ema) once, e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
        "--local-dir DIR`, and pass DIR.")


def read_state_dict(file: str | Path) -> dict[str, np.ndarray]:
    """Reads a diffusers state dict as float32 numpy arrays (torch tensor layout, e.g. conv OIHW)."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            sd = load_file(str(file))
        except TypeError as e:  # numpy has no bfloat16
            raise ValueError(f"cannot read {file} with safetensors.numpy ({e}); re-save it in float32 or float16.") from e
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading the torch pickle {file} needs torch; install the CPU wheel "
                              "(`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`) "
                              "or convert the file to .safetensors.") from e
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
        if "state_dict" in sd and not any(k.startswith("encoder.") for k in sd):
            sd = sd["state_dict"]
        sd = {k: v.float().numpy() for k, v in sd.items()}
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _target_key(key: str, targets: Mapping[tuple, tuple]) -> tuple | None:
    """Maps a diffusers key such as 'encoder.down_blocks.0.resnets.1.conv1.weight' to a Flax state path."""
    s = "." + key
    for pat, rep in _RENAMES:
        s = re.sub(pat, rep, s)
    parts = tuple(int(p) if p.isdigit() else p for p in s[1:].split("."))
    if parts[-1] == "weight":  # conv/linear weight -> kernel, norm weight -> scale
        for leaf in ("kernel", "scale"):
            if parts[:-1] + (leaf,) in targets:
                return parts[:-1] + (leaf,)
        return None
    return parts if parts in targets else None


def _to_flax(w: np.ndarray, shape: tuple) -> np.ndarray:
    """Torch layout -> Flax layout for a target of the given shape; returns w unchanged when nothing fits."""
    if len(shape) == 4 and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
    if len(shape) == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]  # old attention stored as a 1x1 conv
    if len(shape) == 2 and w.ndim == 2:
        return w.T  # linear (out, in) -> (in, out)
    return w


def convert_state_dict(sd: Mapping[str, np.ndarray], config: VAEConfig, dtype=jnp.float32) -> AutoencoderKL:
    """Builds an ``AutoencoderKL`` for ``config`` holding the weights of the diffusers state dict ``sd``.

    Raises ValueError listing unknown keys, missing weights and shape mismatches.
    """
    if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in sd):
        raise ValueError("this looks like an original LDM/CompVis checkpoint (encoder.down.N.block...); convert it "
                         "to the diffusers layout first (diffusers' scripts/convert_vae_pt_to_diffusers.py).")
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(state))
    shapes = {p: tuple(v.get_value().shape) for p, v in targets.items()}

    values, unknown, bad_shape, source = {}, [], [], {}
    for key, w in sd.items():
        path = _target_key(key, shapes)
        if path is None:
            unknown.append(key)
            continue
        if path in source:
            raise ValueError(f"weights {source[path]!r} and {key!r} both map to {'.'.join(map(str, path))}; "
                             "the file mixes old and new attention names.")
        source[path] = key
        w = _to_flax(w, shapes[path])
        if w.shape != shapes[path]:
            bad_shape.append(f"{key}: {w.shape} after conversion, model expects {shapes[path]}")
        values[path] = w
    missing = [".".join(map(str, p)) for p in shapes if p not in values]
    if unknown or missing or bad_shape:
        raise ValueError(
            f"VAE weights do not fit the model built from {config}:\n"
            f"  unknown keys ({len(unknown)}): {sorted(unknown)}\n"
            f"  missing Flax params ({len(missing)}): {missing}\n"
            f"  shape mismatches ({len(bad_shape)}): {bad_shape}\n"
            "Check that config.json matches the weights (or pass config=...).")
    new = {p: v.replace(jnp.asarray(values[p], jnp.float32)) for p, v in targets.items()}
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def load_vae(path: str | Path, dtype=jnp.float32, config: VAEConfig | None = None) -> AutoencoderKL:
    """Loads a diffusers AutoencoderKL from a local folder or weights file into Flax (params float32).

    ``config``: overrides ``config.json``; without either, the sd-vae-ft-ema defaults (``VAEConfig()``) are used.
    ``dtype``: compute dtype, e.g. ``jnp.bfloat16``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE path {path} does not exist; pass a local diffusers VAE folder or weights file.")
    weights, cfg_file = _find_files(path)
    if config is None:
        config = VAEConfig.from_diffusers(json.loads(cfg_file.read_text())) if cfg_file else VAEConfig()
    return convert_state_dict(read_state_dict(weights), config, dtype)
