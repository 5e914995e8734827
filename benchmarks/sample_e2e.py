"""End-to-end CFG sampling of one image: packed 2-bit TerDiT vs its bf16 full-precision twin. Prints JSON.

For each model size, the same architecture is sampled twice in the same run (250 ancestral DDPM steps,
cfg 4.0 on 3 channels, one 256 px image = a 32×32×4 latent, so the model sees batch 2):

* packed: `model.linear='packed'` (2-bit codes, `terdit_kernels.ternary_matmul`, bf16 activations), adaLN of
  all blocks fused into one matmul per step (`model_fn.PackedApply`);
* bf16:   `model.linear='fp'` with every parameter stored in bf16 (Large-DiT at bf16).

Weights are random (timing and memory do not depend on their values) and are generated leaf by leaf in
their final dtype, so no float32 copy of the model ever exists on the device: on the host with numpy (the
default), or with `--init device` by jax.random on the device itself (same distributions; the GPU suite uses
it: numpy took 1.1 s per 25 million normal draws on the 2-core VM, minutes for the 4.2B model's 4.2e9).
Reported per variant: weight bytes (exact, from the arrays), wall time of the timed runs (compile excluded;
the first call is reported separately), and peak device memory from `device.memory_stats()` when the platform
has it (GPU) — each variant then runs in its own process so the peak is its own. On CPU, device memory is
"not measured".
The VAE decode is not included (it is the same for both).

  python benchmarks/sample_e2e.py                    # 600M and 4.2B at 256 px, 250 steps (GPU)
  python benchmarks/sample_e2e.py --tiny             # small config, 4 steps, runs on a CPU in seconds
  python benchmarks/sample_e2e.py --compile_only     # full sizes without weights: compiled step memory only
  python benchmarks/sample_e2e.py --models 4.2B --init device --skip_compiled_memory   # the GPU suite's stage
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from terdit_jax.config import base_config, finalize
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.diffusion.samplers import sample
from terdit_jax.models import packed as packed_lib
from terdit_jax.model_fn import ApplyDiT, PackedApply, split_packed
from terdit_jax.models.families import abstract, build as build_family
from terdit_kernels import resolve_backend

MODELS = {"600M": "DiT_Llama_600M_patch2", "4.2B": "DiT_Llama_3B_patch2"}
VARIANTS = ("packed", "bf16")
NOT_MEASURED = "not measured"


def model_config(model: str, tiny: bool, linear: str):
    c = base_config()
    m = c.model
    if tiny:
        m.update(dict(name="custom", dim=64, n_layers=2, n_heads=4, multiple_of=16))
        c.data.image_size = 64  # latent 8×8×4
    else:
        m.name = MODELS[model]
        c.data.image_size = 256  # latent 32×32×4
    m.linear, m.dtype = linear, "bfloat16"
    return finalize(c).model


# byte value for each of the 81 combinations of four 2-bit codes in {0, 1, 2} (code 3 is never written)
_CODE_BYTES = np.array([(a << 6) | (b << 4) | (c << 2) | d for a in range(3) for b in range(3) for c in range(3)
                        for d in range(3)], np.uint8)


def _random_leaf(rng: np.random.Generator, leaf, name: str) -> jax.Array:
    """A random value of the leaf's shape and dtype, made on the host one leaf at a time (name: variable name)."""
    shape, dtype = leaf.shape, leaf.dtype
    if dtype == jnp.uint8:  # packed codes
        value = _CODE_BYTES[rng.integers(0, 81, size=shape)]
    elif name == "weight" or len(shape) == 0:  # norm weights 1; ternary α 0.02 (≈ 1/sqrt(2/3·K) at K ≈ 2–3k)
        value = np.full(shape, 0.02 if len(shape) == 0 else 1.0, np.float32)
    else:
        std = 0.02 if len(shape) == 1 else 1.0 / np.sqrt(shape[0])
        value = std * rng.standard_normal(shape, dtype=np.float32)
    return jax.device_put(np.asarray(value).astype(dtype))


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind"))
def _device_leaf(key, std, *, shape, dtype, kind: str) -> jax.Array:
    """`_random_leaf`'s distribution drawn on the device, straight into `dtype` (kind: codes, const or normal).

    std is traced, so leaves of one shape share a compile whatever their scale (compiles dominate this init).
    """
    if kind == "codes":
        return jnp.asarray(_CODE_BYTES)[jax.random.randint(key, shape, 0, 81)]
    if kind == "const":
        return jnp.full(shape, std, dtype)
    return (std * jax.random.normal(key, shape, dtype)).astype(dtype)


def _random_leaf_on_device(key, leaf, name: str) -> jax.Array:
    shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
    if dtype == jnp.uint8:
        return _device_leaf(key, 0.0, shape=shape, dtype=dtype, kind="codes")
    if name == "weight" or len(shape) == 0:
        return _device_leaf(key, 0.02 if len(shape) == 0 else 1.0, shape=shape, dtype=dtype, kind="const")
    std = 0.02 if len(shape) == 1 else float(1.0 / np.sqrt(shape[0]))
    return _device_leaf(key, std, shape=shape, dtype=dtype, kind="normal")


def abstract_build(model_cfg, variant: str):
    """(apply, params as ShapeDtypeStructs) of a variant, nothing allocated (for --compile_only)."""
    if variant == "packed":
        model = nnx.eval_shape(lambda: packed_lib.fuse_adaln(packed_lib.configure_packed(
            build_family(model_cfg, nnx.Rngs(0)), *packed_lib.packed_settings(model_cfg))))
        graphdef, params = nnx.split(model)
        return PackedApply(graphdef), params
    graphdef, params = nnx.split(abstract(model_cfg), nnx.Param)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16 if s.dtype == jnp.float32 else s.dtype),
                          params)
    return ApplyDiT(graphdef), params


def compiled_step_memory(apply, params, model_cfg) -> dict:
    """Buffer sizes XLA assigns to one CFG model call (batch 2) on this backend: `Compiled.memory_analysis()`.

    argument = the weights (+ inputs), temp = the largest set of intermediates live at once in XLA's schedule.
    A measurement of the compiled program, not of a run; on CPU it is the only memory number available.
    """
    n = model_cfg.input_size
    x = jax.ShapeDtypeStruct((2, n, n, model_cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    ma = jax.jit(apply).lower(abstract, x, t, t).compile().memory_analysis()
    if ma is None:
        return {"argument_bytes": NOT_MEASURED, "temp_bytes": NOT_MEASURED}
    return {"argument_bytes": int(ma.argument_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes)}


def build(model_cfg, variant: str, seed: int = 0, init: str = "host"):
    """(apply, params) with random weights, allocated leaf by leaf in their final dtype (init: host or device)."""
    graphdef, shapes = nnx.split(abstract(model_cfg))
    leaves, rng, key = [], np.random.default_rng(seed), jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(shapes)):
        leaf = var.get_value()
        if variant == "bf16" and leaf.dtype == jnp.float32:
            leaf = jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16)
        value = (_random_leaf_on_device(jax.random.fold_in(key, i), leaf, str(path[-1])) if init == "device"
                 else _random_leaf(rng, leaf, str(path[-1])))
        leaves.append((path, var.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    if variant == "packed":
        packed_lib.configure_packed(model, *packed_lib.packed_settings(model_cfg))
        return split_packed(model, fuse=True)
    graphdef, params = nnx.split(model, nnx.Param)
    return ApplyDiT(graphdef), params


def _peak_memory():
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return NOT_MEASURED
    return int(stats["peak_bytes_in_use"])


def run_variant(model: str, variant: str, *, tiny: bool, steps: int, cfg_scale: float, repeats: int,
                act_dtype: str, backend: str, isolated: bool, compile_only: bool = False, init: str = "host",
                skip_compiled_memory: bool = False) -> dict:
    """Build one variant, sample once to compile, then time `repeats` full samplings."""
    cfg = model_config(model, tiny, "packed" if variant == "packed" else "fp")
    with cfg.unlocked():
        cfg.packed_act_dtype, cfg.packed_backend = act_dtype, backend
    if compile_only:
        apply, params = abstract_build(cfg, variant)
        return {"weight_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))),
                "compiled_step_memory": compiled_step_memory(apply, params, cfg)}
    t0 = time.perf_counter()
    apply, params = build(cfg, variant, init=init)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    weight_bytes = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
    diffusion = create_diffusion(str(steps))
    shape = (1, cfg.input_size, cfg.input_size, cfg.in_channels)
    y = jnp.array([207], jnp.int32)  # golden retriever; the class does not matter for speed

    def once(seed):
        from terdit_jax.model_fn import bind
        x = sample(bind(apply, params), diffusion, shape, jax.random.key(seed), y, sampler="ddpm",
                   cfg_scale=cfg_scale, null_y=cfg.num_classes, guidance_channels=3)
        return jax.block_until_ready(x)

    t0 = time.perf_counter()
    x = once(0)
    first_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        x = once(r + 1)
        times.append(time.perf_counter() - t0)
    # --skip_compiled_memory saves a second compile of the model (tens of seconds at 4.2B on a GPU), where the
    # measured peak is the number that matters
    compiled = ({"argument_bytes": NOT_MEASURED, "temp_bytes": NOT_MEASURED} if skip_compiled_memory
                else compiled_step_memory(apply, params, cfg))
    return {"weight_bytes": weight_bytes, "compiled_step_memory": compiled,
            "build_s": round(build_s, 3), "first_call_s": round(first_s, 3),
            "time_s": round(float(np.median(times)), 4), "times_s": [round(t, 4) for t in times],
            "peak_device_memory_bytes": _peak_memory() if isolated else NOT_MEASURED,
            "output_finite": bool(np.isfinite(np.asarray(x)).all())}


def _run_isolated(model: str, variant: str, a) -> dict:
    """The variant in a fresh process, so `peak_bytes_in_use` belongs to it alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", f"{model}:{variant}", "--steps", str(a.steps),
           "--cfg_scale", str(a.cfg_scale), "--repeats", str(a.repeats), "--act_dtype", a.act_dtype,
           "--backend", a.backend, "--init", a.init] + (["--tiny"] if a.tiny else []) + \
        (["--compile_only"] if a.compile_only else []) + (["--skip_compiled_memory"] if a.skip_compiled_memory else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 4)
    return NOT_MEASURED


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="600M,4.2B", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="small custom model (dim 64, 2 layers, 8×8 latent)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 250; 4 with --tiny)")
    p.add_argument("--cfg_scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=1, help="timed samplings after the compiling one")
    p.add_argument("--act_dtype", default="bf16", choices=packed_lib.ACT_DTYPES)
    p.add_argument("--backend", default="auto", choices=packed_lib.BACKENDS)
    p.add_argument("--isolate", default="auto", choices=("auto", "yes", "no"),
                   help="one process per variant (auto: when the device reports memory stats)")
    p.add_argument("--compile_only", action="store_true",
                   help="no weights, no sampling: only weight bytes and the compiled step's memory (any size on CPU)")
    p.add_argument("--init", default="host", choices=("host", "device"),
                   help="where the random weights are drawn: numpy on the host, or jax.random on the device (fast)")
    p.add_argument("--skip_compiled_memory", action="store_true",
                   help="do not compile the model a second time for its memory analysis (saves compile time)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (4 if a.tiny else 250)
    opts = dict(tiny=a.tiny, steps=a.steps, cfg_scale=a.cfg_scale, repeats=a.repeats, act_dtype=a.act_dtype,
                backend=a.backend, compile_only=a.compile_only, init=a.init,
                skip_compiled_memory=a.skip_compiled_memory)
    if a._worker:
        model, variant = a._worker.split(":")
        print(json.dumps(run_variant(model, variant, isolated=True, **opts)))
        return {}
    has_stats = _peak_memory() != NOT_MEASURED
    isolate = a.isolate == "yes" or (a.isolate == "auto" and has_stats and not a.compile_only)
    models = ["tiny"] if a.tiny else [m.strip() for m in a.models.split(",") if m.strip()]
    result = {
        "benchmark": "sample_e2e", "platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "host": platform.node(), "jax": jax.__version__, "steps": a.steps, "cfg_scale": a.cfg_scale,
        "images": 1, "model_batch": 2, "compile_only": a.compile_only, "act_dtype": a.act_dtype,
        "packed_backend": resolve_backend(a.backend), "isolated": isolate, "init": a.init,
        "gpu": "measured" if jax.default_backend() == "gpu" else NOT_MEASURED, "models": {},
    }
    for model in models:
        r = {}
        for variant in VARIANTS:
            r[variant] = (_run_isolated(model, variant, a) if isolate
                          else run_variant(model, variant, isolated=False, **opts))
        pk, fp = r["packed"], r["bf16"]
        r["time_ratio_packed_over_bf16"] = _ratio(pk.get("time_s"), fp.get("time_s"))
        r["weight_bytes_ratio_packed_over_bf16"] = _ratio(pk.get("weight_bytes"), fp.get("weight_bytes"))
        r["peak_memory_ratio_packed_over_bf16"] = _ratio(pk.get("peak_device_memory_bytes"),
                                                         fp.get("peak_device_memory_bytes"))
        cm_pk, cm_fp = pk.get("compiled_step_memory", {}), fp.get("compiled_step_memory", {})
        r["compiled_temp_ratio_packed_over_bf16"] = _ratio(cm_pk.get("temp_bytes"), cm_fp.get("temp_bytes"))
        result["models"][model] = r
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
