"""Scale-out: multi-host start, the device mesh, the logical-axis rules, sharded state and batches, and the
training forward pass (per-block rematerialisation and activation sharding constraints).

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical axis names (`logical_axes` metadata on every
nnx.Param, e.g. ('embed', 'heads')); `RULES` maps each logical name to mesh axes, as maxtext's
`logical_axis_rules` do. The mesh uses `AxisType.Auto` on purpose: the model is written with plain jnp ops and no
`out_sharding` annotations, so GSPMD propagation (Auto) is what it needs; JAX ≥0.9 `jax.make_mesh` would default to
Explicit axes, which demand a sharding for every ambiguous op.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from terdit_jax.models import ternary

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name → mesh axes (the one table). The batch is split over data×fsdp (ZeRO-3/FSDP: every replica group
# of the fsdp axis holds a slice of each weight and its own slice of the batch); model width over fsdp; attention
# heads, the SwiGLU hidden width and the 6·D adaLN output over tensor (Megatron column/row split). The
# conditioning width and token axes stay unsplit.
RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "tensor"),
    ("cond", None),
    ("tokens", None),
)


# ----------------------------------------------------------------------------------------------- multi-host start

def initialize_distributed(config=None) -> bool:
    """Start jax.distributed when this is one process of several; call before anything touches a JAX device.

    Explicit settings win: `parallel.coordinator_address` (+ num_processes, process_id) or the env variables
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/local.py sets them). Otherwise JAX's own
    cluster auto-detection runs when a SLURM job step with several tasks or a multi-worker TPU VM is detected.
    Returns True if jax.distributed was initialised.
    """
    p = config.get("parallel", {}) if config is not None else {}
    addr = p.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = int(p.get("num_processes", -1)) if int(p.get("num_processes", -1)) > 0 else int(
        os.environ.get("JAX_NUM_PROCESSES", "-1"))
    pid = int(p.get("process_id", -1)) if int(p.get("process_id", -1)) >= 0 else int(
        os.environ.get("JAX_PROCESS_ID", "-1"))
    if addr:
        if nproc < 1 or pid < 0:
            raise ValueError(f"coordinator {addr} given without num_processes/process_id (got {nproc}, {pid}); set "
                             "parallel.num_processes and parallel.process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID")
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
        return True
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    tpu = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu:
        jax.distributed.initialize()  # SlurmCluster / GceTpuCluster detection inside JAX
        return True
    return False


def is_main_process() -> bool:
    """Process 0 writes logs, images, metrics and checkpoint metadata."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------- mesh

def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Replace the single -1 in `sizes` by total / product(others); check the product equals `total`."""
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"parallel.{what}_*: at most one axis may be -1, got {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if total % known:
            raise ValueError(f"parallel.{what}_*: {total} devices do not split into {sizes}")
        sizes = {**sizes, free[0]: total // known}
    if math.prod(sizes.values()) != total:
        raise ValueError(f"parallel.{what}_* = {sizes} uses {math.prod(sizes.values())} devices; {total} are there")
    return sizes


def create_mesh(config=None, devices=None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') sized from `config.parallel` (as maxtext's create_device_mesh).

    Within a slice (ICI) sizes come from parallel.ici_*, across slices (DCN) from parallel.dcn_*. A slice is a TPU
    slice (`device.slice_index`) or, on GPU/CPU, one process (node); with a single slice the DCN sizes must be 1
    (a -1 there becomes 1).
    """
    from jax.experimental import mesh_utils
    from terdit_jax.config import base_config
    p = (config if config is not None else base_config()).parallel
    devices = list(jax.devices() if devices is None else devices)
    has_slices = hasattr(devices[0], "slice_index") and devices[0].slice_index is not None
    n_slices = len({d.slice_index for d in devices}) if has_slices else len({d.process_index for d in devices})
    dcn = _fill({a: int(p[f"dcn_{a}"]) for a in MESH_AXES}, n_slices, "dcn")
    ici = _fill({a: int(p[f"ici_{a}"]) for a in MESH_AXES}, len(devices) // n_slices, "ici")
    if n_slices > 1 and math.prod(dcn.values()) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(tuple(ici.values()), tuple(dcn.values()), devices,
                                                   process_is_granule=not has_slices,
                                                   allow_split_physical_axes=True)
    else:
        shape = tuple(ici[a] * dcn[a] for a in MESH_AXES)
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ------------------------------------------------------------------------------------------------------ shardings

def _rule(name):
    for k, v in RULES:
        if k == name:
            return v
    raise KeyError(f"logical axis {name!r} has no rule in terdit_jax.parallel.RULES")


def logical_to_spec(axes, shape, mesh: Mesh) -> P:
    """PartitionSpec of an array with these logical axes. A mesh axis is used once per array; a dimension that
    does not divide by its mesh axes stays unsplit (e.g. a 6-row table on a 4-way axis)."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        target = () if name is None else _rule(name)
        target = (target,) if isinstance(target, str) else tuple(target or ())
        target = tuple(a for a in target if a not in used and mesh.shape[a] > 1)
        if target and size % math.prod(mesh.shape[a] for a in target):
            target = ()
        used.update(target)
        spec.append(None if not target else target[0] if len(target) == 1 else target)
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedSharding tree of a train state: every nnx.Variable (params, EMA and the optimizer moments, which
    optax builds by mapping over the Param tree and so keep its metadata) by its `logical_axes`; every other leaf
    (step, counts, rng) replicated."""
    def one(x):
        if _is_var(x):
            axes = x.get_metadata().get("logical_axes", (None,) * len(x.shape))
            return x.replace(value=NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, abstract_state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data×fsdp, the rest unsplit."""
    return NamedSharding(mesh, P(_rule("batch"), *([None] * (ndim - 1))))


def batch_spec_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in _rule("batch"))


def global_batch(local: dict, mesh: Mesh, global_size: int) -> dict:
    """Assemble the global batch from this process's rows (numpy), sharded over data×fsdp.

    Each process passes rows [i·B/P, (i+1)·B/P) of the global batch; jax.make_array_from_process_local_data
    places them on this process's devices (no cross-host transfer)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, (global_size,) + v.shape[1:])
    return out


def constrain(x: jax.Array, mesh: Mesh | None, axes) -> jax.Array:
    """with_sharding_constraint by logical names (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------------ per-shard γ

def absmean_ternary_blocks(w: jax.Array, axis: int, n: int) -> jax.Array:
    """TerDiT eq. 2 with γ taken separately over each of `n` equal blocks of `axis`: the γ each tensor-parallel
    rank computes from its local weight shard in the official fairscale Column/RowParallel ternary layers.
    n = 1 is the global γ (`ternary.absmean_ternary`)."""
    w = w.astype(jnp.float32)
    shape = w.shape
    blocks = w.reshape(shape[:axis] + (n, shape[axis] // n) + shape[axis + 1:])
    red = tuple(i for i in range(blocks.ndim) if i != axis)
    gamma = jnp.mean(jnp.abs(blocks), axis=red, keepdims=True)
    return jnp.clip(jnp.round(blocks / (gamma + ternary.EPS)), -1.0, 1.0).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def ternary_weight_blocks(w, alpha, axis: int, n: int):
    """α·W_t with per-block γ; straight-through gradients exactly as `ternary.ternary_weight` (∂L/∂W = α·g,
    ∂L/∂α = Σ g ⊙ W_t)."""
    return alpha * absmean_ternary_blocks(w, axis, n)


def _blocks_fwd(w, alpha, axis, n):
    w_t = absmean_ternary_blocks(w, axis, n)
    return alpha * w_t, (w_t, alpha)


def _blocks_bwd(axis, n, res, g):
    w_t, alpha = res
    g = g.astype(jnp.float32)
    return (alpha * g).astype(w_t.dtype), jnp.sum(g * w_t).reshape(alpha.shape).astype(alpha.dtype)


ternary_weight_blocks.defvjp(_blocks_fwd, _blocks_bwd)


class ShardGammaTernaryDense(ternary.TernaryDense):
    """TernaryDense whose γ is computed per tensor-parallel shard of the kernel (`model.ternary_gamma='shard'`).

    The split axis is the kernel axis whose logical name maps to the 'tensor' mesh axis; a kernel not split over
    'tensor' is whole on every tensor rank, so its γ is global. Parameters (kernel, alpha) are those of
    TernaryDense, so checkpoints move freely between the two kinds.
    """

    def __init__(self, in_features: int, out_features: int, *, axes, tensor_shards: int, **kw):
        super().__init__(in_features, out_features, axes=axes, **kw)
        shape = (in_features, out_features)
        self.shard_axis, self.shards = 0, 1
        for i, name in enumerate(axes):
            target = None if name is None else _rule(name)
            target = (target,) if isinstance(target, str) else tuple(target or ())
            if "tensor" in target and tensor_shards > 1 and shape[i] % tensor_shards == 0:
                self.shard_axis, self.shards = i, tensor_shards

    def weight(self) -> jax.Array:
        return ternary_weight_blocks(self.kernel[...], self.alpha[...], self.shard_axis, self.shards)


def build_model_config(model_cfg, tensor_shards: int):
    """The model config to build the network from. With ternary_gamma='shard' it names a linear kind
    'ternary_shard_<n>' registered here in `ternary.LINEAR_KINDS`; the checkpoint signature keeps the original."""
    gamma = model_cfg.get("ternary_gamma", "global")
    if gamma not in ("global", "shard"):
        raise ValueError(f"config.model.ternary_gamma={gamma!r} is not 'global' or 'shard'")
    if gamma == "global" or model_cfg.linear != "ternary":
        return model_cfg
    kind = f"ternary_shard_{tensor_shards}"
    ternary.LINEAR_KINDS[kind] = functools.partial(ShardGammaTernaryDense, alpha_init=model_cfg.alpha_init,
                                                   tensor_shards=tensor_shards)
    out = ml_collections.ConfigDict(model_cfg.to_dict())
    out.linear = kind
    return out


# --------------------------------------------------------------------------------------------- training forward

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute the whole block in the backward pass
    # save the outputs of weight matmuls (no batch dims), recompute attention scores/softmax and elementwise ops
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def forward(graphdef, params, x, t, y, *, remat: str = "none", mesh: Mesh | None = None, constrain_acts=True):
    """DiT.__call__ (terdit_jax/models/dit.py) rewritten for training: the same modules in the same order, plus
    jax.checkpoint around each transformer block and sharding constraints on the token activations.
    tests/test_parallel.py checks that it equals the model's own __call__."""
    model = nnx.merge(graphdef, params)
    acts = ("batch", "tokens", None)
    cons = (lambda a: constrain(a, mesh, acts)) if constrain_acts else (lambda a: a)
    tokens, angles = model.embed(x)
    tokens = cons(tokens)
    c = model.condition(t, y, None)
    for layer in model.layers:
        if remat == "none":
            tokens = layer(tokens, c, angles)
        else:
            if remat not in REMAT_POLICIES:
                raise ValueError(f"config.parallel.remat={remat!r}; use 'none', 'full' or 'dots'")
            gd, st = nnx.split(layer)
            block = jax.checkpoint(lambda s, a, cc, ang, gd=gd: nnx.merge(gd, s)(a, cc, ang),
                                   policy=REMAT_POLICIES[remat], prevent_cse=True)
            tokens = block(st, tokens, c, angles)
        tokens = cons(tokens)
    return model.unembed(tokens, c, x.shape[1], x.shape[2])


def memory_report(compiled) -> dict | None:
    """Bytes per device of a compiled step (XLA's CompiledMemoryStats); None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise NotImplementedError
        return None
    if m is None:
        return None
    stats = {k: int(getattr(m, k + "_in_bytes", 0)) for k in
             ("argument_size", "output_size", "temp_size", "alias_size", "generated_code_size")}
    # Donated arguments alias outputs; live at once ≈ arguments + outputs − aliased + temporaries (maxtext's sum).
    stats["total"] = stats["argument_size"] + stats["output_size"] - stats["alias_size"] + stats["temp_size"]
    return stats
