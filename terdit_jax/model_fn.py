"""Model functions for the samplers and the train step: `apply(params, x, t, y) → output` for every model form.

`params` is the nnx.State of everything the model holds: trainable `nnx.Param`s and, in a quantized model, the
quantizers' `QuantState` (a training state never has the latter, so for training it is the Params alone).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.tree_util import Partial

from terdit_jax.models.families import abstract, build
from terdit_jax.models.packed import fuse_adaln
from terdit_jax.quant.quantizers import QuantState

MODEL_STATE = (nnx.Param, QuantState)  # what `params` holds; anything else (calibration intermediates) is not kept


@dataclasses.dataclass(frozen=True)
class ApplyDiT:
    """Hashable (graphdef-keyed) apply: ApplyDiT(graphdef)(params, x, t, y) → model output."""
    graphdef: nnx.GraphDef

    def __call__(self, params, x, t, y, drop_key=None):
        return nnx.merge(self.graphdef, params)(x, t, y, drop_key=drop_key)


@dataclasses.dataclass(frozen=True)
class PackedApply:
    """Apply for a fused packed model (`models.packed.fuse_adaln`): one stacked adaLN matmul per step, then the
    blocks with those modulations. Same call contract as `ApplyDiT`; params: the full nnx.State (codes included)."""
    graphdef: nnx.GraphDef

    def __call__(self, params, x, t, y, drop_key=None):
        model = nnx.merge(self.graphdef, params)
        mods = model.adaln_stack(model.condition(t, y, drop_key))
        return model(x, t, y, drop_key=drop_key, modulations=mods)


def init_model(model_cfg, seed: int) -> tuple[ApplyDiT, nnx.State]:
    """Build the model and split it into (apply, params). params: float32 Params (+ QuantState if any)."""
    graphdef, params = nnx.split(build(model_cfg, nnx.Rngs(seed)), MODEL_STATE)
    return ApplyDiT(graphdef), params


def abstract_model(model_cfg) -> tuple[ApplyDiT, nnx.State]:
    """Like `init_model` but with ShapeDtypeStructs: nothing is allocated (used to restore checkpoints)."""
    graphdef, params = nnx.split(abstract(model_cfg), MODEL_STATE)
    return ApplyDiT(graphdef), params


def split_packed(model: nnx.Module, *, fuse: bool = True):
    """A packed model → (apply, params) for the samplers; with `fuse` the adaLN of all blocks runs batched.

    Unlike `init_model` this splits every Variable (the packed codes are not Params)."""
    if fuse:
        graphdef, params = nnx.split(fuse_adaln(model))
        return PackedApply(graphdef), params
    graphdef, params = nnx.split(model)
    return ApplyDiT(graphdef), params


def bind(apply, params) -> Partial:
    """model_fn(x, t, y) for the samplers; params travel as a pytree so jitted steps are not re-traced."""
    return Partial(apply, params)


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
