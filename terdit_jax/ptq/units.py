"""A model as a chain of units for streaming calibration: embed, condition, [caption,] block 0 … block L−1, unembed.

PTQ4DiT calibrates unit by unit (layer reconstruction for the embedders, block reconstruction for each block and
the final layer); TQ-DiT searches layer by layer with the earlier layers quantized. Both need each unit's inputs
for every calibration entry, from the quantized model so far, and the full-precision targets. Those activations
live on the host (numpy) and only the unit being calibrated is moved to the device, so the device holds one
unit, never the whole model's activations (the official PTQ4DiT runs out of memory at 512 px on 24 GB cards).

Units use the family protocol (`models.backbone.DiffusionTransformer`): a block unit is the block module; the
other units run the model's own embed / condition / attach / unembed on the model with its blocks detached (`head`).

A text family (PixArt) adds the caption unit (`attach`: the caption projection). Its conditions are a table of the
distinct captions (P prompts and the empty one) that each entry's `y` indexes, so the projected caption tokens,
which depend on the prompt only, are computed and stored once per prompt, not once per entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from terdit_jax.models.backbone import Context
from terdit_jax.models.layers import timestep_features
from terdit_jax.quant.sites import observe

# The head modules each head unit owns, by attribute name (DiT/Large-DiT's, then PixArt's).
HEAD_MODULES = {"embed": ("x_embedder", "pos_embed_proj"),
                "condition": ("t_embedder", "y_embedder", "adaln_single_emb_timestep_embedder_linear_1",
                              "adaln_single_emb_timestep_embedder_linear_2", "adaln_single_linear", "adaln_single_norm"),
                "caption": ("caption_projection_linear_1", "caption_projection_linear_2"),
                "unembed": ("final_layer",)}
# Linears of a head unit calibrated one at a time (PTQ4DiT's layer reconstruction of the t-MLP): the output the
# part is judged by, from the unit's inputs; None = the unit's own output (c = t_emb + y_emb differs from the
# second linear's output by the full-precision label embedding only).
PARTS = {"t_embedder.mlp_0": lambda m, t, y: m.t_embedder.mlp_0(timestep_features(t), t),
         "t_embedder.mlp_2": None}


@dataclasses.dataclass(frozen=True)
class Unit:
    """kind: "embed" | "condition" | "caption" | "block" | "unembed"; index: the block index (blocks only); part: one linear
    of a head unit (a key of PARTS) that owns only that linear's quantizers, "" for the whole unit."""
    kind: str
    index: int = -1
    part: str = ""

    @property
    def name(self) -> str:
        name = f"block {self.index}" if self.kind == "block" else self.kind
        return f"{name} {self.part}" if self.part else name

    def parts(self, model=None) -> list["Unit"]:
        """The unit as its linears one at a time (PTQ4DiT's t-MLP), or itself (also where `model` lacks them:
        PixArt's conditioning unit is reconstructed whole)."""
        mine = [p for p in PARTS if p.split(".")[0] in HEAD_MODULES.get(self.kind, ())
                and (model is None or hasattr(model, p.split(".")[0]))]
        return [dataclasses.replace(self, part=p) for p in mine] or [self]


def unit_list(model) -> list[Unit]:
    caption = [Unit("caption")] if any(hasattr(model, m) for m in HEAD_MODULES["caption"]) else []
    return [Unit("embed"), Unit("condition"), *caption, *[Unit("block", i) for i in range(len(model.block_list()))],
            Unit("unembed")]


def blocks_attr(model) -> str:
    """The name of the attribute holding the model's blocks ('layers' for Large-DiT, 'blocks' for DiT)."""
    for name, value in vars(model).items():
        if isinstance(value, nnx.List) and list(value) and list(value) == model.block_list():
            return name
    raise ValueError(f"{type(model).__name__}: cannot find the attribute holding block_list()")


@contextlib.contextmanager
def head(model):
    """The model without its blocks (embedders, conditioning, final layer): small enough to move as a whole."""
    name = blocks_attr(model)
    blocks = getattr(model, name)
    setattr(model, name, nnx.List([]))
    try:
        yield model
    finally:
        setattr(model, name, blocks)


@contextlib.contextmanager
def unit_module(model, unit: Unit):
    """The module holding `unit`'s variables (a block, or the head); changes to it are changes to `model`."""
    if unit.kind == "block":
        yield model.block_list()[unit.index]
    else:
        with head(model) as h:
            yield h


def in_unit(unit: Unit) -> Callable[[tuple], bool]:
    """Whether a variable path inside `unit_module(model, unit)` belongs to the unit (a head unit owns only its
    submodules: the embed unit x_embedder, ...)."""
    if unit.kind == "block":
        return lambda path: True
    if unit.part:
        part = tuple(unit.part.split("."))
        return lambda path: tuple(map(str, path[:len(part)])) == part
    return lambda path: bool(path) and str(path[0]) in HEAD_MODULES[unit.kind]


@dataclasses.dataclass
class Carry:
    """Per calibration entry, on the host: the model inputs and what the units computed so far.
    x (E, H, W, C), t (E,), y (E,) labels, or rows of `table`; tokens (E, T, D) after embed and each block; c (E, C)
    after condition; angles (T, hd/2) or None; out (E, H, W, C_out) after unembed. A text family's `table` is the
    conditions (caption (P+1, N, Cc), mask (P+1, N)) that y indexes, `caption` (P+1, N, D) their projected tokens
    after the caption unit."""
    x: np.ndarray
    t: np.ndarray
    y: np.ndarray
    tokens: np.ndarray | None = None
    c: np.ndarray | None = None
    angles: np.ndarray | None = None
    out: np.ndarray | None = None
    table: tuple | None = None
    caption: np.ndarray | None = None

    def copy(self) -> "Carry":
        return dataclasses.replace(self)

    def cond(self, idx):
        """The model's y for entries `idx`: labels, or (caption (n, N, Cc), mask (n, N)) from the table."""
        return self.y[idx] if self.table is None else tuple(a[self.y[idx]] for a in self.table)

    def rows(self) -> "Carry":
        """A carry whose entries are the table's rows (the caption unit runs once per distinct caption)."""
        n = len(self.table[0])
        return dataclasses.replace(self, t=np.zeros(n, np.int32), y=np.arange(n))


def unit_inputs(unit: Unit, carry: Carry, idx) -> tuple:
    """The arrays unit `unit` reads for entries `idx` (host)."""
    if unit.kind == "embed":
        return carry.x[idx], carry.t[idx]
    if unit.kind in ("condition", "caption"):
        return carry.t[idx], carry.cond(idx)
    caption = () if carry.caption is None else (carry.caption[carry.y[idx]], carry.table[1][carry.y[idx]])
    return (carry.tokens[idx], carry.c[idx], carry.t[idx], *caption)


@dataclasses.dataclass(frozen=True)
class UnitFn:
    """fn(module, *unit_inputs, angles=...) → the unit's output, for `unit_module(model, unit)`. Hashable, so
    jitted programs are keyed by (graph, UnitFn): blocks of one model share one graph and so one compile."""
    kind: str
    hw: tuple[int, int]
    part: str = ""

    def __call__(self, m, *inputs, angles=None):
        if PARTS.get(self.part) is not None:
            return PARTS[self.part](m, *inputs)
        if self.kind == "embed":
            return m.embed(*inputs)[0]
        if self.kind == "condition":
            return m.condition(*inputs)
        if self.kind == "caption":
            t, y = inputs
            return m.attach(Context(t, None), y).caption[0]
        tokens, c, t, *caption = inputs
        ctx = Context(t, angles, tuple(caption) if caption else None)
        if self.kind == "block":
            return m(tokens, c, ctx)
        return m.unembed(tokens, c, ctx, *self.hw)


def unit_fn(unit: Unit, carry: Carry) -> UnitFn:
    return UnitFn(unit.kind, tuple(carry.x.shape[1:3]), unit.part)


def angles_of(carry: Carry):
    return None if carry.angles is None else jnp.asarray(carry.angles)


def to_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def batches(n: int, batch_size: int):
    """(index array of exactly `batch_size` entries, number of real ones): the last batch repeats its last entry,
    so one compiled program serves every batch."""
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        yield np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])]), len(idx)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn"))
def _run(state, inputs, angles, *, graphdef, fn):
    return fn(nnx.merge(graphdef, state), *inputs, angles=angles)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn"))
def _observe(state, inputs, angles, *, graphdef, fn):
    return observe(nnx.merge(graphdef, state), *inputs, fn=lambda m, *a: fn(m, *a, angles=angles))[1]


def run_unit(model, unit: Unit, carry: Carry, *, batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """The unit's output for every entry of `carry` (host), computed `batch_size` entries at a time."""
    fn, angles = unit_fn(unit, carry), angles_of(carry)
    with unit_module(model, unit) as module:
        graphdef, state = nnx.split(module)
        state = to_device(state)
        outs = []
        parts = batches(len(carry.t), batch_size)
        for idx, n in tqdm(parts, desc=desc, leave=False) if desc else parts:
            out = _run(state, to_device(unit_inputs(unit, carry, idx)), angles, graphdef=graphdef, fn=fn)
            outs.append(np.asarray(jax.device_get(out))[:n])
    return np.concatenate(outs)


def advance(model, unit: Unit, carry: Carry, *, batch_size: int = 64) -> Carry:
    """`carry` after `unit`: its output stored where the next unit reads it (the caption unit's per table row)."""
    out = None if unit.kind == "caption" else run_unit(model, unit, carry, batch_size=batch_size)
    new = carry.copy()
    if unit.kind == "embed":
        new.tokens = out
        with head(model) as h:  # the RoPE angles (or None) the blocks get, from one entry
            ctx = h.embed(jnp.asarray(carry.x[:1]), jnp.asarray(carry.t[:1]))[1]
        new.angles = None if ctx.angles is None else np.asarray(ctx.angles)
    elif unit.kind == "condition":
        new.c = out
    elif unit.kind == "caption":
        new.caption = run_unit(model, unit, carry.rows(), batch_size=batch_size)
    elif unit.kind == "block":
        new.tokens = out
    else:
        new.out = out
    return new


def target_of(unit: Unit, carry_after: Carry) -> np.ndarray:
    """What `unit` produced in a carry that has run it (the reconstruction target from the FP carry), per entry."""
    if unit.kind == "caption":
        return carry_after.caption[carry_after.y]
    return {"embed": carry_after.tokens, "condition": carry_after.c, "block": carry_after.tokens,
            "unembed": carry_after.out}[unit.kind]


def unit_prefix(model, unit: Unit) -> str:
    """What site paths inside `unit_module(model, unit)` lack: 'layers.3.' for a block, '' for the head."""
    return f"{blocks_attr(model)}.{unit.index}." if unit.kind == "block" else ""


def observe_unit(model, unit: Unit, carry: Carry, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """What the Observers inside `unit` record for every entry of `carry`: {site path: (E, ...) host array}."""
    fn, angles, prefix = unit_fn(unit, carry), angles_of(carry), unit_prefix(model, unit)
    seen: dict[str, list] = {}
    with unit_module(model, unit) as module:
        graphdef, state = nnx.split(module)
        state = to_device(state)
        for idx, n in batches(len(carry.t), batch_size):
            got = _observe(state, to_device(unit_inputs(unit, carry, idx)), angles, graphdef=graphdef, fn=fn)
            for site, values in jax.device_get(got).items():
                seen.setdefault(prefix + site, []).extend(np.asarray(v)[:n] for v in values)
    return {site: np.concatenate(v) for site, v in seen.items()}
