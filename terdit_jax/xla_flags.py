"""Opt-in XLA settings, applied when `terdit_jax` is imported with TERDIT_CPU_EIGEN=1 in the environment.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so they take effect only if `terdit_jax` is imported
before anything runs on a device (`jax.numpy` calls, `jax.devices()`); a flag the user already put in XLA_FLAGS is
left as given.

CPU_EIGEN: XLA's CPU backend (jaxlib 0.10, 0.11) sends dots and reductions to YNNPACK. Its Eigen path ran the
float32 programs faster on the 2-core Xeon (AVX-512) VM, most of all the SD-VAE decode's convolutions
(`benchmarks/cpu_eigen.py` runs both in worker processes and prints the ratios). It is not the default because
Eigen has no bfloat16 dot: the packed-ternary fallback's bf16 matmuls then run upcast, with larger temporaries.
"""
from __future__ import annotations

import os

# flag → value; an empty YNN fusion-type list sends every dot and reduction to XLA's own (Eigen) emitters
CPU_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
# XLA aborts the process on a flag it does not know, and this one is experimental: only the jaxlib releases it was
# checked on get it.
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
    """With TERDIT_CPU_EIGEN=1, append the CPU_EIGEN flags the user did not set to XLA_FLAGS. → the flags added ([]
    when not asked for, when every flag is already set, on a jaxlib they were not checked on, or when a backend
    has started and it is too late)."""
    if environ.get("TERDIT_CPU_EIGEN", "0") != "1":
        return []
    late, checked = _backend_started(), _jaxlib_checked()
    if late or not checked:
        import warnings
        why = ("JAX started a backend before terdit_jax was imported; import terdit_jax first" if late else
               f"the flag was checked on jaxlib {', '.join('%d.%d' % v for v in JAXLIB)} only; set XLA_FLAGS yourself")
        warnings.warn(f"TERDIT_CPU_EIGEN=1 not applied: {why}", stacklevel=2)
        return []
    given = environ.get("XLA_FLAGS", "")
    named = {f.split("=")[0].lstrip("-") for f in given.split()}
    added = [f"--{k}={v}" for k, v in CPU_EIGEN.items() if k not in named]
    if added:
        environ["XLA_FLAGS"] = " ".join([given, *added]).strip()
    return added
