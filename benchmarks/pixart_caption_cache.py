"""What caching the caption path once per prompt batch saves in a PixArt sampling step (`PixArt.prepare`).

For the guided (CFG) step of `--mode sample` it counts the matmul FLOPs (2 · output size · contraction size of every
dot_general in the step's jaxpr; shapes only, nothing is allocated) and the parameter bytes the step reads, with the
raw caption and with the prepared one, at the sizes of the configs; with --time it also times both steps on this machine at a reduced depth and
resolution and reports the ratio (medians, the same run). Prints one JSON line.

    python benchmarks/pixart_caption_cache.py [--config pixart_alpha_512] [--layers 0] [--time]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # last: see vs_diffusers.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from terdit_jax.config import finalize  # noqa: E402
from terdit_jax.diffusion.samplers import cfg_model_fn  # noqa: E402
from terdit_jax.model_fn import abstract_model, bind, init_model  # noqa: E402


def matmul_flops(jaxpr) -> int:
    """2 · |output| · |contraction| summed over the dot_generals of a jaxpr and the jaxprs inside it."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                total += matmul_flops(inner)
    return total


def steps(model_cfg, params, apply, batch: int):
    """(raw step fn, its inputs, prepared step fn, its inputs) of the CFG model call at `batch` prompts."""
    m = model_cfg
    x = jax.ShapeDtypeStruct((batch, m.input_size, m.input_size, m.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    y = (jax.ShapeDtypeStruct((batch, m.caption_len, m.caption_channels), jnp.float32),
         jax.ShapeDtypeStruct((batch, m.caption_len), jnp.int32))
    null = tuple(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in y)
    prepare = lambda p, y: nnx.merge(apply.graphdef, p).prepare(y)  # noqa: E731
    prepared = jax.eval_shape(prepare, params, y)
    null_prepared = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                 jax.eval_shape(prepare, params, tuple(jax.ShapeDtypeStruct((1, *a.shape), a.dtype)
                                                                       for a in null)))
    step = lambda p, null, x, t, y: cfg_model_fn(bind(apply, p), 4.5, null, None)(x, t, y)  # noqa: E731
    return step, (params, null, x, t, y), (params, null_prepared, x, t, prepared)


def count(model_cfg, batch: int = 1) -> dict:
    """Matmul FLOPs of the step, and the parameter bytes it reads (what a small-batch step on an accelerator is
    bound by): all of them raw, all but the caption projection and the attn2 to_k/to_v prepared."""
    apply, params = abstract_model(model_cfg)
    step, raw, prep = steps(model_cfg, params, apply, batch)
    f_raw = matmul_flops(jax.make_jaxpr(step)(*raw).jaxpr)
    f_prep = matmul_flops(jax.make_jaxpr(step)(*prep).jaxpr)
    sizes = {".".join(map(str, k)): v.size * v.dtype.itemsize for k, v in nnx.to_flat_state(params)}
    cached = sum(b for k, b in sizes.items() if k.startswith("caption_projection") or ".attn2.to_k" in k
                 or ".attn2.to_v" in k)
    return {"step_matmul_gflop_raw": f_raw / 1e9, "step_matmul_gflop_prepared": f_prep / 1e9,
            "flops_prepared_over_raw": f_prep / f_raw, "param_bytes_raw": sum(sizes.values()),
            "param_bytes_prepared_over_raw": 1 - cached / sum(sizes.values())}


def timed(model_cfg, batch: int, repeats: int) -> dict:
    apply, params = init_model(model_cfg, 0)
    rng = np.random.default_rng(0)
    step, raw, prep = steps(model_cfg, params, apply, batch)
    def real(s):  # random float inputs, an all-ones mask, timestep 1
        return jnp.asarray(rng.standard_normal(s.shape), s.dtype) if s.dtype == jnp.float32 else jnp.ones(s.shape,
                                                                                                           s.dtype)
    null, x, t, y = jax.tree.map(real, raw[1:])
    model = nnx.merge(apply.graphdef, params)
    null_prepared = jax.tree.map(lambda a: a[0], model.prepare(tuple(a[None] for a in null)))
    raw, prep = (null, x, t, y), (null_prepared, x, t, model.prepare(y))
    fn = jax.jit(step)
    out = {}
    for name, args in (("raw", raw), ("prepared", prep)):
        fn(params, *args).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(params, *args).block_until_ready()
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times))
    return {"time_prepared_over_raw": out["prepared"] / out["raw"], "repeats": repeats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="pixart_alpha_512")
    ap.add_argument("--layers", type=int, default=0, help="blocks (0 = the config's)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per step (CFG doubles it)")
    ap.add_argument("--time", action="store_true", help="also time both steps at --time_layers, --time_size px")
    ap.add_argument("--time_layers", type=int, default=2)
    ap.add_argument("--time_size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    c = importlib.import_module(f"terdit_jax.configs.{a.config}").get_config()
    if a.layers:
        c.model.update(name="custom", dim=1152, n_layers=a.layers, n_heads=16)
    cfg = finalize(c)
    out = {"config": a.config, "n_layers": cfg.model.n_layers, "image_size": cfg.data.image_size,
           "caption_len": cfg.model.caption_len, "batch": a.batch, **count(cfg.model, a.batch),
           "backend": jax.default_backend()}
    if a.time:
        c.model.update(name="custom", dim=1152, n_layers=a.time_layers, n_heads=16)
        c.data.image_size = a.time_size
        out.update(time_layers=a.time_layers, time_size=a.time_size, **timed(finalize(c).model, a.batch, a.repeats))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
