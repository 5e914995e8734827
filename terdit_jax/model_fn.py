"""The model as a pure function of its parameters: what the train step and the samplers call."""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.tree_util import Partial

from terdit_jax.models.dit import DiT


@dataclasses.dataclass(frozen=True)
class ApplyDiT:
    """Hashable (graphdef-keyed) apply: ApplyDiT(graphdef)(params, x, t, y) → model output."""
    graphdef: nnx.GraphDef

    def __call__(self, params, x, t, y, drop_key=None):
        return nnx.merge(self.graphdef, params)(x, t, y, drop_key=drop_key)


def init_model(model_cfg, seed: int) -> tuple[ApplyDiT, nnx.State]:
    """Build the model and split it into (apply, params). params is an nnx.State of float32 Params."""
    graphdef, params = nnx.split(DiT(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    return ApplyDiT(graphdef), params


def abstract_model(model_cfg) -> tuple[ApplyDiT, nnx.State]:
    """Like `init_model` but with ShapeDtypeStructs: nothing is allocated (used to restore checkpoints)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return ApplyDiT(graphdef), params


def bind(apply: ApplyDiT, params) -> Partial:
    """model_fn(x, t, y) for the samplers; params travel as a pytree so jitted steps are not re-traced."""
    return Partial(apply, params)


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
