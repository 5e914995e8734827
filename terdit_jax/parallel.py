"""Scale-out: multi-host start, the device mesh, the logical-axis rules, sharded state and batches, and the
training forward pass (per-block rematerialisation and activation sharding constraints).

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical axis names (`logical_axes` metadata on every
nnx.Param, e.g. ('embed', 'heads')); `logical_axes.RULES` maps each logical name to mesh axes, as maxtext's
`logical_axis_rules` do. The mesh uses `AxisType.Auto` on purpose: the model is written with plain jnp ops and no
`out_sharding` annotations, so GSPMD propagation (Auto) is what it needs; JAX ≥0.9 `jax.make_mesh` would default to
Explicit axes, which demand a sharding for every ambiguous op.
"""
from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from terdit_jax.logical_axes import MESH_AXES, mesh_axes
from terdit_jax.models.ternary import GAMMA_MODES


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


def create_mesh(config, devices=None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') sized from `config.parallel` (as maxtext's create_device_mesh).

    Within a slice (ICI) sizes come from parallel.ici_*, across slices (DCN) from parallel.dcn_*. A slice is a TPU
    slice (`device.slice_index`) or, on GPU/CPU, one process (node); with a single slice the DCN sizes must be 1
    (a -1 there becomes 1).
    """
    from jax.experimental import mesh_utils
    p = config.parallel
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

def logical_to_spec(axes, shape, mesh: Mesh) -> P:
    """PartitionSpec of an array with these logical axes. A mesh axis is used once per array; a dimension that
    does not divide by its mesh axes stays unsplit (e.g. a 6-row table on a 4-way axis)."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        target = tuple(a for a in mesh_axes(name) if a not in used and mesh.shape[a] > 1)
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
    return NamedSharding(mesh, P(mesh_axes("batch"), *([None] * (ndim - 1))))


def batch_spec_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes("batch"))


def global_batch(local, mesh: Mesh, global_size: int):
    """Assemble the global batch from this process's rows (a pytree of numpy arrays, e.g. {'x', 'y': (caption,
    mask)}), each leaf sharded over data×fsdp.

    Each process passes rows [i·B/P, (i+1)·B/P) of the global batch; jax.make_array_from_process_local_data
    places them on this process's devices (no cross-host transfer)."""
    def one(v):
        v = np.asarray(v)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, (global_size,) + v.shape[1:])
    return jax.tree.map(one, local)


def constrain(x: jax.Array, mesh: Mesh | None, axes) -> jax.Array:
    """with_sharding_constraint by logical names (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------------ per-shard γ

def build_model_config(model_cfg, tensor_shards: int):
    """The model config to build the network from: with ternary_gamma='shard' it records the tensor-parallel shard
    count (`tensor_shards`, read by the ternary linear kind); the checkpoint signature keeps the original."""
    gamma = model_cfg.get("ternary_gamma", "global")
    if gamma not in GAMMA_MODES:
        raise ValueError(f"config.model.ternary_gamma={gamma!r} is not one of {GAMMA_MODES}")
    if gamma == "global" or model_cfg.linear != "ternary":
        return model_cfg
    out = ml_collections.ConfigDict(model_cfg.to_dict())
    out.tensor_shards = int(tensor_shards)
    return out


# --------------------------------------------------------------------------------------------- training forward

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute the whole block in the backward pass
    # save the outputs of weight matmuls (no batch dims), recompute attention scores/softmax and elementwise ops
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def forward(graphdef, params, x, t, y, *, remat: str = "none", mesh: Mesh | None = None, constrain_acts=True):
    """The model's own forward (`models.backbone.DiffusionTransformer.__call__`) for training: the same calls in
    the same order, plus jax.checkpoint around each transformer block and sharding constraints on the token
    activations. tests/test_parallel.py checks that it equals the model's own __call__."""
    if remat not in ("none", *REMAT_POLICIES):
        raise ValueError(f"config.parallel.remat={remat!r}; use one of {('none', *REMAT_POLICIES)}")
    model = nnx.merge(graphdef, params)
    acts = ("batch", "tokens", None)
    cons = (lambda a: constrain(a, mesh, acts)) if constrain_acts else (lambda a: a)
    tokens, ctx = model.embed(x, t)
    ctx = model.attach(ctx, y)
    tokens = cons(tokens)
    c = model.condition(t, y, None)
    for i, block in enumerate(model.block_list()):
        bctx = model.block_context(ctx, i)
        if remat == "none":
            tokens = block(tokens, c, bctx)
        else:
            gd, st = nnx.split(block)
            run = jax.checkpoint(lambda s, a, cc, cx, gd=gd: nnx.merge(gd, s)(a, cc, cx),
                                 policy=REMAT_POLICIES[remat], prevent_cse=True)
            tokens = run(st, tokens, c, bctx)
        tokens = cons(tokens)
    return model.unembed(tokens, c, ctx, x.shape[1], x.shape[2])


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
