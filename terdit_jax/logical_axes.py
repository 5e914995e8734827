"""The one table from logical parameter-axis names to mesh axes (as maxtext's `logical_axis_rules`).

It lives below the models because one model option needs it (the per-shard γ of a tensor-parallel ternary
layer must know which kernel axis the 'tensor' mesh axis splits); `parallel.py` builds the shardings from it.
"""
from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name → mesh axes. The batch is split over data×fsdp (ZeRO-3/FSDP: every replica group of the fsdp axis
# holds a slice of each weight and its own slice of the batch); model width over fsdp; attention heads, the MLP
# hidden width and the 6·D adaLN output over tensor (Megatron column/row split). The conditioning width and token
# axes stay unsplit.
RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "tensor"),
    ("cond", None),
    ("tokens", None),
)


def mesh_axes(name: str | None) -> tuple[str, ...]:
    """Mesh axes of one logical axis name (() for None or an unsplit name)."""
    if name is None:
        return ()
    for k, v in RULES:
        if k == name:
            return (v,) if isinstance(v, str) else tuple(v or ())
    raise KeyError(f"logical axis {name!r} has no rule in terdit_jax.logical_axes.RULES")
