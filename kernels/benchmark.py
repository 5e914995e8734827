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

``--timing loop`` (the GPU suite's choice) runs the calls inside ONE jitted ``fori_loop`` instead of as
separate dispatches: at M <= 16 a 3072 x 3072 layer takes a few microseconds on an H100/H200, about what
one Python-side dispatch costs, so back-to-back calls would time the host, not the kernel. Each loop
iteration makes ``--unroll`` calls, so the loop's own per-iteration work is shared by that many. The calls
are chained through their data (``_loop``): nothing can be hoisted out of the loop, merged or dropped,
for one single-element update of the activations per call, the same on both sides. With ``--loop_ms T`` the number
of calls per run is chosen per (layer, M) so that a run of the dense dot would take about T ms at the
H200's measured rates (``ROOFLINE``; at least ``--iters``, at most ``MAX_LOOP_CALLS``), the same number
for every backend of that shape: a microsecond kernel is timed over hundreds of calls, a millisecond one
over a few. The last call's output is also the correctness check, so each (layer, M, act, backend)
compiles once. ``--stat median --repeats R``: the median of R timed runs (after a warm-up run) instead of
the best of them. ``--sweep suite`` is the GPU suite's grid: the 4.2B model's linears with the adaLN of
all 32 blocks stacked into one 1024 -> 32*6*3072 matrix (one matmul per step, as the packed sampler runs
it: ``models.packed.fuse_adaln``) at M = 2, 16, 512, 4096.
"""
from __future__ import annotations

import argparse
import json
import statistics
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
N_LAYERS = {"terdit-600m": 16, "terdit-4.2b": 32, "toy": 2}  # blocks whose adaLN a '-stacked' model fuses
# bf16 matrix rate and device-to-device copy bandwidth measured on an H200 of this workplace (the device
# notes' KINDS.md: 769-798 TFLOP/s, about 4.3 TB/s). Only --loop_ms uses them, to size a loop; never reported.
ROOFLINE = {"flops": 7.8e14, "bytes_per_s": 4.3e12}
MAX_LOOP_CALLS = 4096
SWEEPS = {
    "full": ((1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), tuple(MODELS)),
    "small": ((1, 16, 256), ("terdit-600m",)),
    "tiny": ((1, 16), ("toy",)),
    "suite": ((2, 16, 512, 4096), ("terdit-4.2b-stacked",)),
    "suite-tiny": ((2, 16), ("toy-stacked",)),
}


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of the distinct ternary linears of one model; 'toy' is a 256 x 256 layer for CPU tests.

    A '-stacked' name replaces the per-block adaLN (C -> 6D) by the adaLN of all blocks as one matrix
    (C -> L*6D), the shape the packed sampler multiplies once per step ('toy-stacked': 64 -> 2*6*64), and
    puts it first: its weight-bound M <= 16 rows are where the 8x smaller weights show most, so a sweep
    stopped early (the GPU suite's budget) has them.
    """
    base, stacked = (model[:-len("-stacked")], True) if model.endswith("-stacked") else (model, False)
    if base == "toy":
        layers = [("toy", 256, 256)]
        return [("adaLN_stacked", 64, N_LAYERS["toy"] * 6 * 64)] + layers if stacked else layers
    d, f, c = MODELS[base]
    layers = [("attn_qkvo", d, d), ("ffn_w1_w3", d, f), ("ffn_w2", f, d)]
    return [("adaLN_stacked", c, N_LAYERS[base] * 6 * d)] + layers if stacked else layers + [("adaLN", c, 6 * d)]


def _summary(means: list[float], stat: str) -> float:
    """'best': the smallest mean (filters scheduler noise); 'median': the middle one (robust to outliers both ways)."""
    return min(means) if stat == "best" else statistics.median(means)


def _time_ms(fn, args, iters: int, repeats: int = 3, stat: str = "best") -> float:
    """``stat`` of ``repeats`` means over ``iters`` back-to-back calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t0) * 1e3 / iters)
    return _summary(means, stat)


def _chain_first(a, dep):
    """a with ``dep`` added to its first element, in place (an update of one element)."""
    first = (0,) * a.ndim
    return a.at[first].set(a[first] + dep.astype(a.dtype))


def _chain_all(a, dep):
    """a + dep everywhere: costs nothing when XLA fuses it into a consumer that reads all of a anyway."""
    return a + dep.astype(a.dtype)


def _loop(fn, calls: int, unroll: int = 1, fused_chain: tuple[int, ...] = ()):
    """jit of ``calls`` chained calls fn(x, *rest), ``unroll`` per fori_loop iteration.

    run(zero, x, *rest) -> (the last call's output, a scalar that depends on every call). Before each call,
    ``dep = zero * y[0, 0]`` of the previous call's output y is added to the first element of x, in place,
    and to all of the args at positions ``fused_chain`` (the XLA fallback's packed weights: the add is
    fused into their unpacking, which reads all of them anyway). zero is a run-time 0.0 that XLA cannot see
    through, so no value changes, yet every call depends on the one before it: XLA can neither hoist work
    out of the loop (the fallback's unpacking, W2A8's quantization of the activations), nor merge calls,
    nor drop one as dead. The price is a one-element update of x per call, the same for every backend and
    the dense dot. Only x travels in the loop's carry: a carried weight is copied into the loop once per
    run, and an in-place update of a weight makes XLA copy it every call (the call still reads it).
    """
    def run(zero, x, *rest):
        out = jax.eval_shape(fn, x, *rest)

        def body(_, carry):
            x, dep, y = carry
            for _ in range(unroll):
                x = _chain_first(x, dep)
                y = fn(x, *(_chain_all(r, dep) if i + 1 in fused_chain else r for i, r in enumerate(rest)))
                dep = y[(0,) * y.ndim].astype(jnp.float32) * zero
            return x, dep, y

        _, dep, y = jax.lax.fori_loop(0, calls // unroll, body, (x, zero, jnp.zeros(out.shape, out.dtype)))
        return y, dep
    return jax.jit(run)


def loop_calls(m: int, k: int, n: int, loop_ms: float, iters: int, unroll: int) -> int:
    """Calls per timed run: enough for the dense (m, k) x (k, n) dot to take ~loop_ms at ROOFLINE rates."""
    calls = iters
    if loop_ms > 0:
        dense_s = max(2 * m * k * n / ROOFLINE["flops"], 2 * (m * k + k * n + m * n) / ROOFLINE["bytes_per_s"])
        calls = min(max(iters, int(-(-loop_ms * 1e-3 // dense_s))), MAX_LOOP_CALLS)
    # a whole number of loop iterations, at least two (XLA inlines a loop that runs once)
    return max(2 * unroll, -(-calls // unroll) * unroll)


def _time_loop_ms(fn, args, calls: int, repeats: int, stat: str, unroll: int = 1,
                  fused_chain: tuple[int, ...] = ()) -> tuple[float, jax.Array]:
    """(``stat`` over ``repeats`` runs of ``_loop(fn, ...)`` in ms per call, the last call's output)."""
    many, zero = _loop(fn, calls, unroll, fused_chain), jnp.float32(0.0)
    out = jax.block_until_ready(many(zero, *args))[0]  # compile and warm up
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(many(zero, *args))[0]
        means.append((time.perf_counter() - t0) * 1e3 / calls)
    return _summary(means, stat), out


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
        acts: tuple[str, ...] = ("bf16", "int8"), iters: int = 20, seed: int = 0, timing: str = "calls",
        stat: str = "best", repeats: int = 3, unroll: int = 1, loop_ms: float = 0.0,
        partial: str | None = None) -> dict:
    """Time every (model, layer, M, act, backend) of a sweep; returns the JSON-ready report.

    partial: a file that gets the device as a first JSON line and then each row as soon as it is measured, so
    that a run stopped before the end (a time budget) still leaves what it measured.
    """
    ms, models = SWEEPS[sweep]
    backends = available_backends(interpret) if backend == "all" else [resolve_backend(backend, interpret)]
    if timing == "loop":  # the xla fallback's loop output is then the yardstick of the others: run it first
        backends = sorted(backends, key=lambda b: b != "xla")
    dev = jax.devices()[0]
    rng = np.random.default_rng(seed)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    rows = []
    sink = open(partial, "w") if partial else None
    if sink:
        sink.write(json.dumps(dict(device=dev.device_kind, platform=dev.platform, sweep=sweep, timing=timing,
                                   stat=stat, repeats=repeats, unroll=unroll)) + "\n")
    for model in models:
        for name, k, n in layer_shapes(model):
            # moved to the device once as int8 and packed / widened there: the stacked 4.2B adaLN has 6e8
            # weights, which numpy would take tens of seconds to pack and to convert to bf16
            w_t = jnp.asarray(rng.integers(-1, 2, size=(k, n), dtype=np.int8))
            packed = pack(w_t)
            w_bf16 = w_t.astype(jnp.bfloat16) * jnp.bfloat16(0.5)
            alpha = jnp.float32(0.5)
            for m in ms:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                calls = loop_calls(m, k, n, loop_ms, iters, unroll) if timing == "loop" else iters
                if timing == "loop":
                    base = _time_loop_ms(dense, (x, w_bf16), calls, repeats, stat, unroll)[0]
                else:
                    base = _time_ms(dense, (x, w_bf16), iters, repeats, stat)
                for act in acts:
                    want = None
                    if timing == "calls":
                        # the tiled XLA fallback's output is the yardstick each kernel's output is checked against
                        want = np.asarray(ternary_matmul(x, packed, alpha, k=k, act_dtype=act, backend="xla"),
                                          np.float32)
                    for be in backends:
                        fn = lambda x, p, a, act=act, be=be: ternary_matmul(
                            x, p, a, k=k, act_dtype=act, backend=be, interpret=interpret and be != "xla")
                        if timing == "loop":
                            t, got = _time_loop_ms(fn, (x, packed, alpha), calls, repeats, stat, unroll,
                                                   fused_chain=(1,) if be == "xla" else ())
                            got = np.asarray(got, np.float32)
                            want = got if be == "xla" else want
                        else:
                            t = _time_ms(fn, (x, packed, alpha), iters, repeats, stat)
                            got = np.asarray(fn(x, packed, alpha), np.float32)
                        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
                        rows.append(dict(model=model, layer=name, M=m, K=k, N=n, act=act, backend=be,
                                         kernel_ms=round(t, 5), xla_bf16_ms=round(base, 5),
                                         speedup=round(base / t, 4), max_err_vs_xla=err))
                        if timing == "loop":
                            rows[-1]["calls_per_run"] = calls
                        if sink:
                            sink.write(json.dumps(rows[-1]) + "\n")
                            sink.flush()
    if sink:
        sink.close()
    report = dict(
        device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
        backend=backends[0] if len(backends) == 1 else backends, interpret=interpret, pack_format=PACK_FORMAT,
        sweep=sweep, iters=iters, timing=timing, stat=stat, repeats=repeats, unroll=unroll, loop_ms=loop_ms,
        baseline="jnp.dot bf16 x bf16 -> f32 -> bf16 (dense weights), same run",
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
    ap.add_argument("--timing", choices=("calls", "loop"), default="calls",
                    help="'calls': --iters separate dispatches; 'loop': --iters calls inside one jitted loop "
                         "(excludes host dispatch, which dominates microsecond kernels)")
    ap.add_argument("--stat", choices=("best", "median"), default="best", help="summary of the --repeats runs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, after a warm-up")
    ap.add_argument("--unroll", type=int, default=1, help="--timing loop: chained calls per loop iteration")
    ap.add_argument("--loop_ms", type=float, default=0.0,
                    help="--timing loop: size each run to ~this many ms of the dense dot (0: --iters calls)")
    ap.add_argument("--partial", default=None, help="also write each row to this file (JSON lines) when measured")
    a = ap.parse_args(argv)
    if a.unroll < 1 or a.iters < 1:
        ap.error("--unroll and --iters must be >= 1")
    report = run(a.sweep, a.backend, a.interpret, tuple(a.acts.split(",")), a.iters, timing=a.timing, stat=a.stat,
                 repeats=a.repeats, unroll=a.unroll, loop_ms=a.loop_ms, partial=a.partial)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
