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
# XLA aborts the process on a flag it does not know (the Eigen one is experimental): only the jaxlib releases the
# flags were checked on get them.
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
    not set. → the flags added ([] when every flag is already set, on a jaxlib they were not checked on, or when a
    backend has started and it is too late; the opt-in warns then, the default stays quiet)."""
    eigen = environ.get("TERDIT_CPU_EIGEN", "0") == "1"
    given = environ.get("XLA_FLAGS", "")
    named = {f.split("=")[0].lstrip("-") for f in given.split()}
    flags = {**GPU_CUBLAS, **(CPU_EIGEN if eigen else {})}
    added = [f"--{k}={v}" for k, v in flags.items() if k not in named]
    late, checked = _backend_started(), _jaxlib_checked()
    if added and (late or not checked):
        if eigen and any(k not in named for k in CPU_EIGEN):
            import warnings
            why = ("JAX started a backend before terdit_jax was imported; import terdit_jax first" if late else
                   f"the flag was checked on jaxlib {', '.join('%d.%d' % v for v in JAXLIB)} only; set XLA_FLAGS "
                   "yourself")
            warnings.warn(f"TERDIT_CPU_EIGEN=1 not applied: {why}", stacklevel=2)
        return []
    if added:
        environ["XLA_FLAGS"] = " ".join([given, *added]).strip()
    return added
