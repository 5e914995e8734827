"""Packed-ternary matmul vs a dense XLA bf16 dot of the same shape, timed in the same run; prints JSON.

    python -m terdit_kernels.benchmark                       # full sweep (meant for a GPU)
    python -m terdit_kernels.benchmark --sweep tiny --backend xla   # seconds on a CPU

Layer shapes are those of the TerDiT ternary linears (terdit_official.md section 1): per block wq/wk/wv/wo
(D -> D), w1/w3 (D -> F), w2 (F -> D) and adaLN (C -> 6D), with C = 1024. M is tokens x batch for the
token linears and batch for adaLN; the sweep uses the same M grid for all of them. Each timing is the
mean over ``--iters`` back-to-back calls (dispatch is asynchronous, so launch latency is amortised the
same way for both sides; best of 3 such means). ``speedup`` = baseline time / kernel time; CPU numbers say
nothing about GPUs. ``max_err_vs_xla``: max |y - y_xla| / max |y_xla| against the tiled XLA fallback, the
same call (bf16 outputs: about 4e-3 is one rounding).

``--backend all`` times every backend this process can run (on a GPU: triton, pallas, xla; on a CPU: xla,
plus the interpreted kernels with ``--interpret``) and adds ``auto_table``: per act dtype, the fastest
backend at each M (summed over the sweep's layers), merged into ``(max_m, backend)`` rows in the form of
``terdit_kernels.ops.AUTO_GPU_TABLE``. Only a GPU run's table means anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from terdit_kernels.ops import resolve_backend, ternary_matmul
from terdit_kernels.triton_ternary import interpreter_available, triton_available
from terdit_kernels.packing import PACK_FORMAT, pack

MODELS = {  # name: (D, F, C)
    "terdit-600m": (1536, 4096, 1024),
    "terdit-4.2b": (3072, 8192, 1024),
}
SWEEPS = {
    "full": ((1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), tuple(MODELS)),
    "small": ((1, 16, 256), ("terdit-600m",)),
    "tiny": ((1, 16), ("toy",)),
}


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of the distinct ternary linears of one model; 'toy' is a 256 x 256 layer for CPU tests."""
    if model == "toy":
        return [("toy", 256, 256)]
    d, f, c = MODELS[model]
    return [("attn_qkvo", d, d), ("ffn_w1_w3", d, f), ("ffn_w2", f, d), ("adaLN", c, 6 * d)]


def _time_ms(fn, args, iters: int, repeats: int = 3) -> float:
    """Best of ``repeats`` means over ``iters`` back-to-back calls (min filters scheduler noise)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) * 1e3 / iters)
    return best


def available_backends(interpret: bool) -> list[str]:
    """Backends ``--backend all`` times: the GPU kernels on a GPU (triton only with jax_triton) or interpreted."""
    on_gpu = jax.default_backend() == "gpu"
    names = []
    if (on_gpu and triton_available()) or (interpret and interpreter_available()):
        names.append("triton")
    if on_gpu or interpret:
        names.append("pallas")
    return names + ["xla"]


def auto_table(rows: list[dict]) -> dict:
    """Per act: the fastest backend at each M (kernel_ms summed over layers) as (max_m, backend) rows.

    Consecutive Ms with the same winner merge into one row; the last row is open-ended (max_m None).
    """
    table = {}
    for act in sorted({r["act"] for r in rows}):
        total = {}
        for r in rows:
            if r["act"] == act:
                total[(r["M"], r["backend"])] = total.get((r["M"], r["backend"]), 0.0) + r["kernel_ms"]
        ms = sorted({m for m, _ in total})
        best = [min((t, b) for (m2, b), t in total.items() if m2 == m)[1] for m in ms]
        merged = []
        for m, b in zip(ms, best):
            if merged and merged[-1][1] == b:
                merged[-1][0] = m
            else:
                merged.append([m, b])
        merged[-1][0] = None
        table[act] = [tuple(r) for r in merged]
    return table


def run(sweep: str = "full", backend: str = "auto", interpret: bool = False,
        acts: tuple[str, ...] = ("bf16", "int8"), iters: int = 20, seed: int = 0) -> dict:
    """Time every (model, layer, M, act, backend) of a sweep; returns the JSON-ready report."""
    ms, models = SWEEPS[sweep]
    backends = available_backends(interpret) if backend == "all" else [resolve_backend(backend, interpret)]
    dev = jax.devices()[0]
    rng = np.random.default_rng(seed)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    rows = []
    for model in models:
        for name, k, n in layer_shapes(model):
            w_t = rng.integers(-1, 2, size=(k, n), dtype=np.int8)
            packed = jnp.asarray(pack(w_t))
            w_bf16 = jnp.asarray(w_t, jnp.bfloat16) * jnp.bfloat16(0.5)
            alpha = jnp.float32(0.5)
            for m in ms:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                base = _time_ms(dense, (x, w_bf16), iters)
                for act in acts:
                    # the tiled XLA fallback's output is the yardstick each kernel's output is checked against
                    want = np.asarray(ternary_matmul(x, packed, alpha, k=k, act_dtype=act, backend="xla"), np.float32)
                    for be in backends:
                        fn = lambda x, p, a, act=act, be=be: ternary_matmul(
                            x, p, a, k=k, act_dtype=act, backend=be, interpret=interpret and be != "xla")
                        t = _time_ms(fn, (x, packed, alpha), iters)
                        got = np.asarray(fn(x, packed, alpha), np.float32)
                        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
                        rows.append(dict(model=model, layer=name, M=m, K=k, N=n, act=act, backend=be,
                                         kernel_ms=round(t, 5), xla_bf16_ms=round(base, 5),
                                         speedup=round(base / t, 4), max_err_vs_xla=err))
    report = dict(
        device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
        backend=backends[0] if len(backends) == 1 else backends, interpret=interpret, pack_format=PACK_FORMAT,
        sweep=sweep, iters=iters, baseline="jnp.dot bf16 x bf16 -> f32 -> bf16 (dense weights), same run",
        weight_bytes_per_param={"packed": 0.25, "bf16": 2.0}, results=rows)
    if len(backends) > 1:
        report["auto_table"] = auto_table(rows)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="full")
    ap.add_argument("--backend", choices=("auto", "triton", "pallas", "xla", "all"), default="auto",
                    help="'all': every backend this process can run, plus the auto_table they imply")
    ap.add_argument("--interpret", action="store_true", help="run the GPU kernels in their CPU interpreters")
    ap.add_argument("--acts", default="bf16,int8", help="comma list of bf16, f32, int8")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)
    report = run(a.sweep, a.backend, a.interpret, tuple(a.acts.split(",")), a.iters)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
