"""Model families: how a config becomes a module, its presets, its parameter count, which config fields are its
architecture (the checkpoint signature) and which command imports its released weights.

`model.family` names the entry of `FAMILIES`. Everything outside the model files (training, checkpoints, packed
export, sampling, quantization) builds models through `build` / `abstract` here, never through a class name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx

from terdit_jax.models import dit, dit_xl, pixart
from terdit_jax.quant.sites import check_rules, recording
from terdit_jax.registry import Registry

DEFAULT_FAMILY = "large_dit"  # what a config, checkpoint or export that names no family is


@dataclasses.dataclass(frozen=True)
class Family:
    """module: the DiffusionTransformer subclass, built as module(cfg, rngs=...).
    presets: model.name → the config fields it sets (dim, n_layers, n_heads[, patch_size]).
    cond_dim: the conditioning width for a model width D.
    unused_fields: model config fields this family ignores (left out of its checkpoint signature).
    fixed_params: parameters that are not trained but count in the published size (a fixed position table).
    importer: the module whose `python -m` imports the officially released weights.
    check: returns an error message for a config this family cannot build, or None.
    stacked_adaln: each block has its own adaLN linear of silu(c), which a packed deployment stacks into one matmul
    per step (`models.packed.fuse_adaln`); False for adaLN-single, one shared linear that runs once per step anyway.
    """
    module: type
    presets: dict[str, dict]
    cond_dim: Callable[[int], int]
    unused_fields: tuple[str, ...] = ()
    fixed_params: Callable[[object], int] = lambda cfg: 0
    importer: str = ""
    check: Callable[[object], str | None] = lambda cfg: None
    unused_for: Callable[[object], tuple[str, ...]] = lambda cfg: ()
    stacked_adaln: bool = True


def _large_dit_check(cfg) -> str | None:
    if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 2:
        return f"model.dim={cfg.dim} must split into {cfg.n_heads} heads of even size (RoPE rotates pairs)"
    if cfg.pos_embed not in dit.POS_EMBEDS:
        return f"model.pos_embed={cfg.pos_embed!r} is not one of {dit.POS_EMBEDS}"
    return None


FAMILIES: Registry[Family] = Registry("model family", {
    "large_dit": Family(
        module=dit.DiT,
        presets={name: dict(dim=d, n_layers=n, n_heads=h) for name, (d, n, h) in dit.PRESETS.items()},
        cond_dim=lambda d: min(d, 1024),
        unused_fields=("mlp_ratio", *pixart.OWN_FIELDS),
        importer="terdit_jax.convert.terdit_official",
        check=_large_dit_check),
    "dit": Family(
        module=dit_xl.OriginalDiT,
        presets=dit_xl.PRESETS,
        cond_dim=lambda d: d,  # the original DiT conditions on the full width (no 1024 cap)
        unused_fields=(*dit_xl.UNUSED_FIELDS, *pixart.OWN_FIELDS),
        fixed_params=dit_xl.fixed_params,
        importer="terdit_jax.convert.dit_official",
        check=dit_xl.check),
    "pixart": Family(
        module=pixart.PixArt,
        presets=pixart.PRESETS,
        cond_dim=lambda d: 7 * d,  # [embedded t | the shared adaLN-single output]
        unused_fields=pixart.UNUSED_FIELDS,
        fixed_params=lambda cfg: (int(cfg.input_size) // int(cfg.patch_size)) ** 2 * int(cfg.dim),
        importer="terdit_jax.convert.pixart_official",
        check=pixart.check,
        unused_for=lambda cfg: () if pixart.adaln_norm(cfg) else ("adaln_norm", "norm_eps"),
        stacked_adaln=False),
})


def family_of(cfg) -> Family:
    get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
    return FAMILIES.get(get("family", DEFAULT_FAMILY) or DEFAULT_FAMILY)


def build(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The model `cfg` describes, with every quantization site its rules ask for (an unmatched rule is an error)."""
    with recording() as paths:
        model = family_of(cfg).module(cfg, rngs=rngs)
    check_rules(cfg, paths)
    return model


def abstract(cfg) -> nnx.Module:
    """`build` with ShapeDtypeStructs instead of arrays: nothing is allocated."""
    return nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))


def site_paths(cfg) -> list[str]:
    """Every quantization site of the model `cfg` describes, in call order of construction."""
    with recording() as paths:
        nnx.eval_shape(lambda: family_of(cfg).module(cfg, rngs=nnx.Rngs(0)))
    return list(paths)


def count_params(cfg, *, trainable_only: bool = False) -> int:
    """Parameters of the model `cfg` describes, from shapes only; unless `trainable_only`, with the fixed ones
    the family's published size counts (the original DiT's position table)."""
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract(cfg), nnx.Param))
    n = int(sum(leaf.size for leaf in leaves))
    return n if trainable_only else n + int(family_of(cfg).fixed_params(cfg))
