"""XLA settings applied when `terdit_jax` is imported: one default for GPUs, one for CPUs, one CPU opt-in.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so they take effect only if `terdit_jax` is imported
before anything runs on a device (`jax.numpy` calls, `jax.devices()`); a flag the user already put in XLA_FLAGS is
left as given (`--xla_gpu_enable_triton_gemm=true` in XLA_FLAGS turns the GPU default off).

GPU_CUBLAS, the default: XLA's GPU backend compiles GEMMs to cuBLAS, not to its own Triton GEMM fusions. On an
H200 (jax 0.11.2, 2026-12-04, `benchmarks/gpu_suite.py`): with Triton GEMMs at autotune level 0 the DiT-XL/2 CFG
call (float32, batch 16) took 0.420 s against diffusers' 0.107 s; with cuBLAS 0.098 s. At XLA's default autotune
level (Triton GEMMs on) every suite stage was still autotuning GEMMs when its 25-90 s budget ran out; how long
compiles take there with cuBLAS alone is not measured. The CPU backend accepts the flag and ignores it.

CPU_NO_YNN_CONV, the default on the jaxlib releases it was checked on: XLA's CPU backend (jaxlib 0.10, 0.11) hands
dots, reductions and convolutions to YNNPACK (its default fusion types are exactly
"individual_dot,reduce,individual_convolution": the compiled programs are the same). This keeps the dots and
reductions there and sends convolutions to XLA's Eigen convolution: on the 2-core AMD EPYC VM the SD-VAE decode
of 8 latents took 0.91x the time (`benchmarks/cpu_eigen.py`, 2026-12-04) and its peak resident memory fell by
0.5 GB (`benchmarks/vs_diffusers.py --memory`); programs without convolutions (every DiT) compile to the same HLO.

CPU_EIGEN, with TERDIT_CPU_EIGEN=1: no YNNPACK at all; dots and reductions go to XLA's own (Eigen) emitters too.
It ran the float32 programs faster on the 2-core Xeon (AVX-512) VM (`benchmarks/cpu_eigen.py` runs the settings
in worker processes and prints the ratios). It is not the default because Eigen has no bfloat16 dot: the
packed-ternary fallback's bf16 matmuls then run upcast, with larger temporaries.
"""
from __future__ import annotations

import os

# flag → value
GPU_CUBLAS = {"xla_gpu_enable_triton_gemm": "false"}
# XLA's own YNNPACK fusion types without "individual_convolution"
CPU_NO_YNN_CONV = {"xla_cpu_experimental_ynn_fusion_type": "individual_dot,reduce"}
# an empty YNN fusion-type list sends every dot and reduction to XLA's own (Eigen) emitters
CPU_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
# XLA aborts the process on a flag or a fusion type it does not know, and the CPU flag is experimental: only the
# jaxlib releases it was checked on get it (the GPU one is a stable flag of XLA's and goes to every release).
JAXLIB = ((0, 10), (0, 11))


def _jaxlib_checked() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(v) for v in version("jaxlib").split(".")[:2]) in JAXLIB
    except (PackageNotFoundError, ValueError):
        return False


def _backend_started() -> bool:
    import sys
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge and getattr(bridge, "_backends", None))


def apply(environ=os.environ) -> list[str]:
    """Append to XLA_FLAGS the GPU_CUBLAS flags and, on a checked jaxlib, CPU_NO_YNN_CONV's, or CPU_EIGEN's with
    TERDIT_CPU_EIGEN=1, where the user did not name the flag. → the flags added ([] when every flag is already
    set, or when a backend has started and it is too late). The opt-in warns when it is not applied (too late,
    or a jaxlib it was not checked on); the defaults stay quiet."""
    given = environ.get("XLA_FLAGS", "")
    named = {f.split("=")[0].lstrip("-") for f in given.split()}
    late, flags, checked = _backend_started(), dict(GPU_CUBLAS), _jaxlib_checked()
    if checked:
        flags.update(CPU_NO_YNN_CONV)
    if environ.get("TERDIT_CPU_EIGEN", "0") == "1":
        why = ("JAX started a backend before terdit_jax was imported; import terdit_jax first" if late else
               None if checked else
               f"the flag was checked on jaxlib {', '.join('%d.%d' % v for v in JAXLIB)} only; set XLA_FLAGS yourself")
        if why and any(k not in named for k in CPU_EIGEN):
            import warnings
            warnings.warn(f"TERDIT_CPU_EIGEN=1 not applied: {why}", stacklevel=2)
        elif not why:
            flags.update(CPU_EIGEN)
    added = [] if late else [f"--{k}={v}" for k, v in flags.items() if k not in named]
    if added:
        environ["XLA_FLAGS"] = " ".join([given, *added]).strip()
    return added
