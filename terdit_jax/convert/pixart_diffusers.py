"""Importer of a diffusers `PixArtTransformer2DModel` state dict (its safetensors layout) into the "pixart"
family (models/pixart.py): a key table, Linear weights transposed to (in, out), the patch Conv2d as a linear on
patchify's (c, py, px) features."""
from __future__ import annotations

import re

import numpy as np
from flax import nnx

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def module_path(key: str) -> tuple:
    """'transformer_blocks.3.attn1.to_out.0.weight' → ('transformer_blocks', 3, 'attn1', 'to_out_0', 'kernel')."""
    if key == "scale_shift_table":
        return ("final_layer", "scale_shift_table")
    if m := re.match(r"^transformer_blocks\.(\d+)\.scale_shift_table$", key):
        return ("transformer_blocks", int(m[1]), "scale_shift_table")
    leaf = {"weight": "kernel", "bias": "bias"}[key.rsplit(".", 1)[1]]
    if m := _BLOCK.match(key):
        mod = m[2]
        head = mod.split(".")[0] if mod.startswith("attn") else None
        name = mod[len(head) + 1:] if head else mod
        return ("transformer_blocks", int(m[1]), *([head] if head else []), name.replace(".", "_"), leaf)
    mod = key.rsplit(".", 1)[0]
    top = ("final_layer", "proj_out") if mod == "proj_out" else (mod.replace(".", "_"),)
    return (*top, leaf)


# Not parameters of the model: the original's learned unconditional caption (120, 4096) that its training swaps in
# for dropped captions (kept as a buffer by older diffusers); sampling's CFG uses the encoded empty prompt instead.
IGNORED = ("caption_projection.y_embedding",)


def to_param(key: str, value) -> np.ndarray:
    """A diffusers tensor → our variable's value: Linear (out, in) → (in, out); the patch Conv2d (D, C, p, p) →
    (C·p·p, D) on patchify's (c, py, px) features."""
    v = np.asarray(value, np.float32)
    if key == "pos_embed.proj.weight":
        return np.ascontiguousarray(v.reshape(v.shape[0], -1).T)
    if key.endswith(".weight") and v.ndim == 2:
        return np.ascontiguousarray(v.T)
    return v


def load_diffusers(model: nnx.Module, state_dict: dict) -> None:
    """Write every tensor of `state_dict` (name → array) into `model` in place; a key the model lacks or a shape
    that differs is a ValueError naming it."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, value in state_dict.items():
        if key in IGNORED:
            continue
        v = to_param(key, value)
        path = module_path(key)
        if path not in params:
            raise ValueError(f"{key}: no parameter {'.'.join(map(str, path))} in this PixArt model")
        if params[path].get_value().shape != v.shape:
            raise ValueError(f"{key}: shape {v.shape} ≠ the model's {params[path].get_value().shape}")
        params[path].set_value(v)
