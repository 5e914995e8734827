"""Deployed PTQ models (integer weights, int8 matmuls) against float: bytes, compiled memory and time. Prints JSON.

Two measurements, each a comparison inside one run:

* `memory` (DiT-XL/2 at 256 and 512 px, random weights, compile only): bytes of the stored model and XLA's
  `Compiled.memory_analysis()` of one CFG model call (batch 2: one image and its null-class twin) for fp32 (the
  float32 DiT-XL/2), bf16 (every float parameter and the compute in bf16), and the deployed W8A8, W6A6, W4A8 models
  (RTN/PTQ4DiT's site layout: weights per output channel, inputs and q/k/v/probs per tensor; their float leftovers
  and compute dtype bf16). `linear_bytes` counts the quantized linears alone (codes, Δw, zw, column sums, bias
  against the bf16 kernels and biases). Goals (issue "Quantized models that deploy"): W8A8 linears ≤ 0.51× bf16,
  W4A8 ≤ 0.27×, and the step's temporaries not larger than bf16's.
* `time` (the demo-size model, dim 64, 4 blocks, 49 tokens, CFG batch 32; and two DiT-XL/2 blocks at full width,
  256 tokens, CFG batch 2; float32): one jitted forward of the deployed W8A8 model, of the fake-quantized W8A8
  model it came from, and of the float32 model; medians of alternating repeats, ratios against fp32 from the same
  run. Quantizer values do not change the time, so the models carry their initial values. Beside it, `gemm`: one
  int8 × int8 → int32 dot at DiT-XL/2's 1152 × 1152 (M = 2048) against float32 and bf16 dots.

  python benchmarks/deploy_ptq.py                 # both (DiT-XL/2 compiles: minutes on 2 cores)
  python benchmarks/deploy_ptq.py --quick         # a tiny DiT for the memory table, few repeats: seconds
  python benchmarks/deploy_ptq.py --step          # the GPU suite's stage: W8A8/W4A8 matmuls at DiT-XL/2 shapes
                                                  # (M 256..8192) and one CFG model call (batch 2), vs bf16
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from terdit_jax.config import base_config, finalize
from terdit_jax.model_fn import ApplyDiT
from terdit_jax.models.families import abstract, build
from terdit_jax.models.integer import IntDense
from terdit_jax.models.ternary import Dense
from terdit_jax.ptq.common import uniform_rules, with_sites
from terdit_jax.ptq.deploy import deployed_config

BITS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8)}
GOALS = {"W8A8": 0.51, "W4A8": 0.27}  # linear bytes against bf16


def dit_config(image_size: int, quick: bool):
    c = base_config()
    m = c.model
    m.update(dict(family="dit", name="custom" if quick else "DiT-XL/2", linear="fp", learn_sigma=True))
    if quick:
        m.update(dict(dim=64, n_layers=2, n_heads=4, patch_size=2))
    c.data.update(kind="imagenet_latents", image_size=image_size, latent=True)
    return finalize(c).model


def variant_config(model_cfg, variant: str):
    """The model config of a variant: fp32, bf16, or a deployed W·A· model (bf16 compute)."""
    if variant == "fp32":
        return with_sites(model_cfg, ())
    cfg = with_sites(model_cfg, ())
    cfg.dtype = "bfloat16"
    if variant == "bf16":
        return cfg
    w, a = BITS[variant]
    return deployed_config(with_sites(cfg, uniform_rules(cfg, w, a, init="minmax")))


def _abstract_state(cfg, variant: str):
    graphdef, state = nnx.split(abstract(cfg))
    if variant == "bf16":  # every float variable stored in bf16
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16 if s.dtype == jnp.float32
                                                            else s.dtype), state)
    return graphdef, state


def _linear_bytes(model, variant: str) -> int:
    """Bytes of the linears a deployed model quantizes (bf16/fp32: the same linears' kernel and bias)."""
    total = 0
    for _, m in nnx.iter_modules(model):
        if isinstance(m, IntDense):  # its own variables (not its input site's Δ, z)
            own = [getattr(m, a) for a in ("codes", "w_scale", "w_zero", "colsum", "bias") if getattr(m, a) is not None]
            total += sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in own)
        elif isinstance(m, Dense) and variant in ("fp32", "bf16"):
            size = 2 if variant == "bf16" else 4
            total += size * (m.kernel.size + (0 if m.bias is None else m.bias.size))
    return total


def step_memory(model_cfg, variant: str) -> dict:
    cfg = variant_config(model_cfg, variant)
    model = abstract(cfg)
    graphdef, state = _abstract_state(cfg, variant)
    n = cfg.input_size
    x = jax.ShapeDtypeStruct((2, n, n, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    t0 = time.perf_counter()
    ma = jax.jit(ApplyDiT(graphdef)).lower(state, x, t, t).compile().memory_analysis()
    return {"model_bytes": int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(state))),
            "linear_bytes": _linear_bytes(model, variant), "compile_s": round(time.perf_counter() - t0, 1),
            "argument_bytes": int(ma.argument_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes)}


def memory_table(image_sizes, quick: bool) -> dict:
    out = {}
    for size in image_sizes:
        model_cfg = dit_config(size, quick)
        rows = {v: step_memory(model_cfg, v) for v in ("fp32", "bf16", *BITS)}
        for v, r in rows.items():
            r["linear_vs_bf16"] = round(r["linear_bytes"] / rows["bf16"]["linear_bytes"], 4)
            r["temp_vs_bf16"] = round(r["temp_bytes"] / rows["bf16"]["temp_bytes"], 4)
        goals = {f"{v}_linears_le_{g}x_bf16": rows[v]["linear_vs_bf16"] <= g for v, g in GOALS.items()}
        goals.update({f"{v}_temp_le_bf16": rows[v]["temp_bytes"] <= rows["bf16"]["temp_bytes"] for v in BITS})
        out[f"{size}px"] = {"rows": rows, "goals": goals}
    return out


def _demo_config():
    c = base_config()
    c.model.update(dict(name="custom", dim=64, n_layers=4, n_heads=4, multiple_of=32, patch_size=4, in_channels=1,
                        num_classes=10, dtype="float32", linear="fp", pos_embed="sincos"))
    c.data.update(kind="digits", image_size=28, latent=False)
    return finalize(c).model


def medians(calls: dict, repeats: int, warm: bool = True) -> dict:
    """{name: median seconds} of zero-argument calls (each runs one jitted call and waits for it), timed in
    alternation so that the drifts of a noisy machine hit every variant alike; `warm`: one untimed call each first."""
    if warm:
        for call in calls.values():
            call()
    times = {n: [] for n in calls}
    for _ in range(repeats):
        for n, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _wide_config():
    """Two DiT-XL/2 blocks at full width (1152, 16 heads) on 256 px latents (256 tokens)."""
    c = base_config()
    c.model.update(dict(family="dit", name="custom", dim=1152, n_layers=2, n_heads=16, patch_size=2, linear="fp",
                        learn_sigma=True, dtype="float32"))
    c.data.update(kind="imagenet_latents", image_size=256, latent=True)
    return finalize(c).model


def time_table(repeats: int, model: str = "demo", batch: int = 32) -> dict:
    """Median seconds of one jitted forward: deployed W8A8, fake-quantized W8A8, float32 (model "demo": the
    demo-size model; "wide": `_wide_config`)."""
    base = _demo_config() if model == "demo" else _wide_config()
    fake = with_sites(base, uniform_rules(base, 8, 8, init="minmax"))
    variants = {"fp32": base, "fake_w8a8": fake, "deployed_w8a8": deployed_config(fake)}
    rng = np.random.default_rng(0)
    n = base.input_size
    x = jnp.asarray(rng.standard_normal((batch, n, n, base.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, base.num_classes + 1, batch), jnp.int32)
    calls = {}
    for name, cfg in variants.items():
        graphdef, state = nnx.split(build(cfg, nnx.Rngs(0)))
        fn = jax.jit(ApplyDiT(graphdef))
        calls[name] = lambda fn=fn, state=state: jax.block_until_ready(fn(state, x, t, y))
    med = medians(calls, repeats)
    return {"model": model, "batch": batch, "repeats": repeats, "median_s": {n: round(v, 5) for n, v in med.items()},
            "vs_fp32": {n: round(v / med["fp32"], 3) for n, v in med.items()},
            "deployed_vs_fake": round(med["deployed_w8a8"] / med["fake_w8a8"], 3)}


def step_time(image_size: int, batch: int, repeats: int, quick: bool) -> dict:
    """Median seconds of one jitted DiT-XL/2 model call (a CFG batch) deployed W8A8 / W4A8 against bf16, the same
    inputs, alternating repeats; the GPU suite's stage (goal on an H100/H200: W8A8 ≥ 1.3× bf16)."""
    model_cfg = dit_config(image_size, quick)
    n = model_cfg.input_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, n, n, model_cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, 1001, batch), jnp.int32)
    calls, first = {}, {}
    for variant in ("bf16", "W8A8", "W4A8"):
        graphdef, state = nnx.split(build(variant_config(model_cfg, variant), nnx.Rngs(0)))
        if variant == "bf16":
            state = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, state)
        fn = jax.jit(ApplyDiT(graphdef))
        calls[variant] = lambda fn=fn, state=state: jax.block_until_ready(fn(state, x, t, y))
        first[variant] = medians({variant: calls[variant]}, 1, warm=False)[variant]  # compile + one call
    med = medians(calls, repeats, warm=False)
    return {"image_size": image_size, "batch": batch, "repeats": repeats,
            "first_call_s": {v: round(f, 2) for v, f in first.items()},
            "median_s": {v: round(m, 6) for v, m in med.items()},
            "speedup_vs_bf16": {v: round(med["bf16"] / m, 3) for v, m in med.items()}}


def gemm_table(repeats: int, m: int = 2048, k: int = 1152, n: int = 1152) -> dict:
    """Median seconds of one int8 × int8 → int32 dot against float32 and bf16 dots of the same shape."""
    rng = np.random.default_rng(0)
    xi = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    wi = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    fns = {"int8": (jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                             preferred_element_type=jnp.int32)), xi, wi),
           "f32": (jax.jit(jnp.dot), xi.astype(jnp.float32), wi.astype(jnp.float32)),
           "bf16": (jax.jit(jnp.dot), xi.astype(jnp.bfloat16), wi.astype(jnp.bfloat16))}
    med = medians({v: lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)) for v, (f, a, b) in fns.items()}, repeats)
    return {"shape": [m, k, n], "repeats": repeats, "median_s": {v: round(t, 6) for v, t in med.items()},
            "int8_speedup_vs": {v: round(t / med["int8"], 2) for v, t in med.items()}}


LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}  # DiT-XL/2 (K, N)


def matmul_sweep(ms, repeats: int, layers=None) -> list[dict]:
    """Per DiT-XL/2 layer and M: one W8A8 and one W4A8 `terdit_kernels.int_matmul` (backend auto: XLA's int8
    GEMM; the Triton W4A8 kernel on a GPU) against a bf16 jnp.dot of the same shape, medians of alternated repeats."""
    import terdit_kernels
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, n) in (layers or LAYERS).items():
        w8 = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
        w4 = terdit_kernels.pack_int4(jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8))
        wb = w8.astype(jnp.bfloat16)
        for m in ms:
            xi = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
            fns = {"bf16": (jax.jit(jnp.dot), xi.astype(jnp.bfloat16), wb),
                   "w8a8": (jax.jit(lambda a, b: terdit_kernels.int_matmul(a, b, k=k, w_bits=8)), xi, w8),
                   "w4a8": (jax.jit(lambda a, b: terdit_kernels.int_matmul(a, b, k=k, w_bits=4)), xi, w4)}
            med = medians({v: lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)) for v, (f, a, b) in fns.items()},
                          repeats)
            rows.append({"layer": name, "K": k, "N": n, "M": m, "ms": {v: round(1e3 * t, 4) for v, t in med.items()},
                         "speedup_vs_bf16": {v: round(med["bf16"] / t, 3) for v, t in med.items() if v != "bf16"}})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny DiT for the memory table, 3 repeats")
    p.add_argument("--skip", choices=("memory", "time"), default=None)
    p.add_argument("--step", action="store_true",
                   help="the GPU stage: W8A8/W4A8 matmuls at DiT-XL/2 shapes and one CFG model call, against bf16")
    a = p.parse_args(argv)
    report = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(), "os": platform.platform(),
              "jax": jax.__version__, "quick": a.quick}
    if a.step:
        small = {"fc1": (64, 128)} if a.quick else None
        report["matmul"] = matmul_sweep((16, 64) if a.quick else (256, 1024, 4096, 8192), 3 if a.quick else 10, small)
        report["step"] = step_time(32 if a.quick else 256, 2, 2 if a.quick else 10, a.quick)
        print(json.dumps(report, indent=1))
        return report
    if a.skip != "memory":
        report["memory"] = memory_table((32,) if a.quick else (256, 512), a.quick)
    if a.skip != "time":
        report["gemm"] = gemm_table(3 if a.quick else 20, *((64, 64, 64) if a.quick else ()))
        report["time"] = [time_table(3 if a.quick else 30)]
        if not a.quick:
            report["time"].append(time_table(10, "wide", batch=2))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
