"""Training-step throughput of full-precision vs ternary (QAT) training of the same model, on the devices present.

    python benchmarks/train_step.py                       # small CPU-sized model (the default)
    python benchmarks/train_step.py --preset DiT_Llama_3B_patch2 --image_size 256 --batch 256 --dtype bfloat16

Prints one JSON object: per linear kind the median step time, images/s, model TFLOP/s per device and MFU, and
ratio_ternary_over_fp (step time; target ≤ 1.10). Both kinds are measured in the same run, one after the other.

    python benchmarks/train_step.py --preset DiT_Llama_600M_patch2 --image_size 256 --dtype bfloat16 --batch 32 \
        --fit_batch 0.85                                  # the largest per-device batch that fits, then measure
    python benchmarks/train_step.py --preset DiT_Llama_3B_patch2 --image_size 512 --dtype bfloat16 --remat dots \
        --batch 1 --kinds ternary --compile_only          # compiled memory only: nothing is allocated or run

--fit_batch F compiles the step (of the last of --kinds) at --batch and at twice it, fits the compiled memory
per device as fixed + per-image · batch (XLA's buffer sizes grow linearly with the batch), and measures at the
largest multiple of --batch whose predicted memory is at most F × the memory limit (the device allocator's
bytes_limit, or --memory_limit_gb), capped by --max_batch. --compile_only builds the state and the batch as
shapes only, so a model far larger than the device can be sized on any machine.

FLOP count (analytic, model FLOPs as in PaLM's MFU, so remat recomputation and the quantizer's elementwise work
are not counted; 1 MAC = 2 FLOPs, training = forward + backward ≈ 3 × forward, i.e. the usual 6·N·tokens):
  per image, per transformer block (T tokens, width D, SwiGLU hidden F, conditioning width C):
    token linears   T · (4·D² + 3·D·F)      MACs  (wq, wk, wv, wo; w1, w3, w2)
    attention       2 · T² · D              MACs  (Q·Kᵀ and P·V over all heads)
    adaLN           C · 6D                  MACs  (acts on the conditioning vector, once per image)
  plus, per image: patch embedding T·p²·C_in·D, final layer T·D·p²·C_out + C·2D, timestep MLP 256·C + C².
  step FLOPs = 6 · batch · Σ MACs.
MFU = achieved FLOP/s per device / the device's dense bf16 peak (datasheet values below, not measured here);
CPUs have no entry, so their MFU is reported as null.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v4": 275e12}  # datasheets


def train_macs_per_image(m) -> dict:
    """Forward MACs of one image, split as in the module docstring. m: a finalized model config."""
    from terdit_jax.models.layers import ffn_hidden_dim
    t = (m.input_size // m.patch_size) ** 2
    d, c, p = m.dim, m.cond_dim, m.patch_size
    f = ffn_hidden_dim(d, m.multiple_of, m.ffn_dim_multiplier)
    return {"linears": m.n_layers * t * (4 * d * d + 3 * d * f), "attention": m.n_layers * 2 * t * t * d,
            "adaln": m.n_layers * c * 6 * d,
            "other": t * p * p * m.in_channels * d + t * d * p * p * m.out_channels + c * 2 * d + 256 * c + c * c}


def peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for k, v in PEAK_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


def build_config(args, linear, batch=None):
    from terdit_jax.config import base_config, finalize
    c = base_config()
    m = c.model
    if args.preset:
        m.name = args.preset
    else:
        m.name, m.dim, m.n_layers, m.n_heads, m.multiple_of = "custom", args.dim, args.layers, args.heads, 32
    m.linear, m.dtype, m.num_classes = linear, args.dtype, 1000
    c.data.kind, c.data.image_size, c.data.latent = "imagenet", args.image_size, True
    c.train.batch_size = args.batch if batch is None else batch
    c.parallel.remat = args.remat
    return finalize(c)


def compiled_memory(args, linear, batch: int) -> dict:
    """Compile the train step for `batch` images from shapes alone (no state or batch is allocated) → memory.

    Returns parallel.memory_report's fields (bytes per device; None where the backend reports none) and the
    compile time in seconds. On a GPU this compile skips XLA's autotuning (xla_gpu_autotune_level=0): that
    search picks the fastest of several kernels for each matmul, which decides speed, not buffer sizes,
    and compiles every candidate, so it is a large share of a GPU compile that only memory is wanted from.
    """
    from terdit_jax import parallel, train as T
    c = build_config(args, linear, batch)
    mesh = parallel.create_mesh(c)
    apply, abstract = T.abstract_state(c, mesh)
    m = c.model
    xb = {"x": jax.ShapeDtypeStruct((batch, m.input_size, m.input_size, m.in_channels), np.float32),
          "y": jax.ShapeDtypeStruct((batch,), np.int32)}
    t0 = time.perf_counter()
    options = {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
    compiled = T.make_train_step(apply, c, mesh).lower(abstract, xb).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    return {"memory": parallel.memory_report(compiled), "compile_s": compile_s}


def memory_limit(args) -> float | None:
    """Bytes a step may use per device: --memory_limit_gb, else the device allocator's limit, else None."""
    if args.memory_limit_gb:
        return args.memory_limit_gb * 1e9
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def fit_batch(args, linear) -> dict:
    """The largest multiple of args.batch whose compiled step memory is ≤ args.fit_batch × memory_limit(args)."""
    limit = memory_limit(args)
    if limit is None:
        raise SystemExit("--fit_batch needs a memory limit: this device reports none; pass --memory_limit_gb")
    b0 = args.batch
    probes = [compiled_memory(args, linear, b) for b in (b0, 2 * b0)]
    if any(p["memory"] is None for p in probes):
        raise SystemExit("--fit_batch: this backend reports no compiled memory (Compiled.memory_analysis())")
    m0, m1 = (p["memory"]["total"] for p in probes)
    per_image = max((m1 - m0) / b0, 1.0)
    fixed = m0 - per_image * b0
    budget = args.fit_batch * limit
    fits = int((budget - fixed) // per_image) // b0 * b0
    batch = min(fits, args.max_batch // b0 * b0) if args.max_batch else fits
    if batch < b0:
        raise SystemExit(f"--fit_batch: even batch {b0} needs {m0 / 1e9:.2f} GB > {budget / 1e9:.2f} GB")
    return {"kind": linear, "probe_batches": [b0, 2 * b0], "probe_bytes": [m0, m1],
            "probe_compile_s": [round(p["compile_s"], 2) for p in probes], "fixed_bytes": fixed,
            "bytes_per_image": per_image, "limit_bytes": limit, "fraction": args.fit_batch, "batch": batch,
            "predicted_bytes": fixed + per_image * batch, "capped": batch < fits}


def measure(args, linear) -> dict:
    from terdit_jax import parallel, train as T
    c = build_config(args, linear)
    mesh = parallel.create_mesh(c)
    apply, state = T.init_state(c, mesh)
    m = c.model
    rng = np.random.default_rng(0)
    local = {"x": rng.normal(size=(args.batch // jax.process_count(), m.input_size, m.input_size,
                                   m.in_channels)).astype(np.float32),
             "y": rng.integers(0, 1000, args.batch // jax.process_count()).astype(np.int32)}
    batch = parallel.global_batch(local, mesh, args.batch)
    step, mem = T.compile_step(T.make_train_step(apply, c, mesh), state, batch, log=lambda *_: None)
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    macs = train_macs_per_image(m)
    flops = 6 * args.batch * sum(macs.values())
    per_dev = flops / sec / jax.device_count()
    pk = peak(jax.devices()[0])
    return {"step_time_s": sec, "step_time_min_s": float(np.min(times)), "images_per_s": args.batch / sec,
            "train_flops_per_step": flops, "tflops_per_device": per_dev / 1e12,
            "mfu": None if pk is None else per_dev / pk, "memory_per_device_bytes": None if mem is None else mem["total"],
            "loss": float(metrics["loss"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="", help="a PRESETS name; empty = custom --dim/--layers/--heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--image_size", type=int, default=128, help="pixels; the model sees the /8 latent")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kinds", default="fp,ternary", help="comma list of linear kinds to measure")
    ap.add_argument("--compile_only", action="store_true",
                    help="only compile each kind's step from shapes and report its memory per device")
    ap.add_argument("--fit_batch", type=float, default=0.0,
                    help="fraction F of the memory limit: measure at the largest batch predicted to fit in it")
    ap.add_argument("--memory_limit_gb", type=float, default=0.0,
                    help="memory per device for --fit_batch (default: the device allocator's bytes_limit)")
    ap.add_argument("--max_batch", type=int, default=0, help="cap on the batch --fit_batch picks (0: none)")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    res = {"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
           "config": vars(args)}
    if args.compile_only:
        limit = memory_limit(args)
        res["memory_limit_bytes"] = limit
        for kind in kinds:
            out = compiled_memory(args, kind, args.batch)
            res[kind] = {"batch": args.batch, "compile_s": round(out["compile_s"], 2),
                         "memory_per_device": out["memory"]}
        print(json.dumps(res, indent=1))
        return
    if args.fit_batch:
        res["fit"] = fit_batch(args, kinds[-1])  # the last kind is the one to size for (ternary by default)
        args.batch = res["fit"]["batch"]  # res["config"] is vars(args): it shows the measured batch
    for kind in kinds:
        res[kind] = measure(args, kind)
    if "fp" in res and "ternary" in res:
        res["ratio_ternary_over_fp"] = res["ternary"]["step_time_s"] / res["fp"]["step_time_s"]
        res["ratio_ternary_over_fp_min"] = res["ternary"]["step_time_min_s"] / res["fp"]["step_time_min_s"]
    res["target_ratio"] = 1.10
    if jax.devices()[0].platform == "cpu":
        res["gpu"] = "not measured (no GPU on this machine)"
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
