"""XLA settings applied when `terdit_jax` is imported: one by default on GPUs, one opt-in for CPUs.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so they take effect only if `terdit_jax` is imported
before anything runs on a device (`jax.numpy` calls, `jax.devices()`); a flag the user already put in XLA_FLAGS is
left as given (`--xla_gpu_enable_triton_gemm=true` in XLA_FLAGS turns the GPU default off).

GPU_CUBLAS, the default: XLA's GPU backend compiles GEMMs to cuBLAS, not to its own Triton GEMM fusions. On an
H200 (jax 0.11.2, 2026-12-04, `benchmarks/gpu_suite.py`): with Triton GEMMs at autotune level 0 the DiT-XL/2 CFG
call (float32, batch 16) took 0.420 s against diffusers' 0.107 s; with cuBLAS 0.098 s. At XLA's default autotune
level (Triton GEMMs on) every suite stage was still autotuning GEMMs when its 25-90 s budget ran out; how long
compiles take there with cuBLAS alone is not measured. The CPU backend accepts the flag and ignores it.

CPU_EIGEN, with TERDIT_CPU_EIGEN=1: XLA's CPU backend (jaxlib 0.10, 0.11) sends dots and reductions to YNNPACK.
Its Eigen path ran the float32 programs faster on the 2-core Xeon (AVX-512) VM, most of all the SD-VAE decode's
convolutions (`benchmarks/cpu_eigen.py` runs both in worker processes and prints the ratios). It is not the
default because Eigen has no bfloat16 dot: the packed-ternary fallback's bf16 matmuls then run upcast, with larger
temporaries.
"""
from __future__ import annotations

import os

# flag → value
GPU_CUBLAS = {"xla_gpu_enable_triton_gemm": "false"}
# an empty YNN fusion-type list sends every dot and reduction to XLA's own (Eigen) emitters
CPU_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
# XLA aborts the process on a flag it does not know, and the Eigen one is experimental: only the jaxlib releases it
# was checked on get it (the GPU one is a stable flag of XLA's and goes to every release).
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
    """Append to XLA_FLAGS the GPU_CUBLAS flags, and with TERDIT_CPU_EIGEN=1 the CPU_EIGEN ones, that the user did
    not set. → the flags added ([] when every flag is already set, or when a backend has started and it is too
    late). The opt-in warns when it is not applied (too late, or a jaxlib it was not checked on); the default, a
    stable flag, stays quiet."""
    given = environ.get("XLA_FLAGS", "")
    named = {f.split("=")[0].lstrip("-") for f in given.split()}
    late, flags = _backend_started(), dict(GPU_CUBLAS)
    if environ.get("TERDIT_CPU_EIGEN", "0") == "1":
        why = ("JAX started a backend before terdit_jax was imported; import terdit_jax first" if late else
               None if _jaxlib_checked() else
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
