"""The train state: {step, params, ema, opt_state, rng}, the optimiser, and building it unsharded, sharded or
abstract (shapes only, what checkpoints restore onto). Below `train` and `checkpoint`, which both need it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from terdit_jax import parallel
from terdit_jax.model_fn import abstract_model, init_model


def learning_rate(t):
    """TerDiT recipe: constant `lr` (5e-4), optional linear warmup, then `lr_reduced` from `lr_reduce_step` on."""
    def schedule(step):
        lr = jnp.asarray(t.lr, jnp.float32)
        if t.lr_reduce_step >= 0:
            lr = jnp.where(step >= t.lr_reduce_step, t.lr_reduced, lr)
        if t.warmup_steps > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / t.warmup_steps)
        return lr
    return schedule


def make_optimizer(t) -> optax.GradientTransformation:
    """AdamW (torch defaults β=(0.9, 0.999), eps 1e-8) after global-norm clipping (Large-DiT train.py)."""
    return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                       optax.adamw(learning_rate(t), b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay))


def _tensor_shards(config, mesh) -> int:
    """Tensor-parallel shard count: the mesh's, else the configured one (for γ='shard' outside training)."""
    if mesh is not None:
        return int(mesh.shape["tensor"])
    p = config.parallel
    return int(p.ici_tensor) * int(p.dcn_tensor) if p.ici_tensor > 0 and p.dcn_tensor > 0 else 1


def _state_from_params(params, config):
    """{step, params, ema, opt_state, rng}; the EMA starts as a copy of the parameters (official)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params),
            "opt_state": make_optimizer(config.train).init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed + 1))}


def abstract_state(config, mesh=None):
    """→ (apply, state as ShapeDtypeStructs), built without allocating; with a mesh each leaf carries the
    sharding the rules give it (what `Checkpoints.restore` restores onto)."""
    model_cfg = parallel.build_model_config(config.model, _tensor_shards(config, mesh))
    apply, _ = abstract_model(model_cfg)
    shapes = jax.eval_shape(lambda: _state_from_params(init_model(model_cfg, config.seed)[1], config))
    if mesh is None:
        return apply, shapes
    shardings = parallel.state_shardings(shapes, mesh)
    return apply, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def init_state(config, mesh=None):
    """→ (apply, state). With a mesh the state is created directly sharded (jit with out_shardings, as maxtext
    does), so no device ever holds the whole model."""
    model_cfg = parallel.build_model_config(config.model, _tensor_shards(config, mesh))
    make = lambda: _state_from_params(init_model(model_cfg, config.seed)[1], config)  # noqa: E731
    if mesh is None:  # jitted as well, so that the values equal the sharded init bit for bit (XLA fuses to FMA)
        apply, _ = abstract_model(model_cfg)
        return apply, jax.jit(make)()
    apply, abstract = abstract_state(config, mesh)
    return apply, jax.jit(make, out_shardings=parallel.state_shardings(abstract, mesh))()
