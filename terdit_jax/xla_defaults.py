"""XLA settings the project runs with unless the user says otherwise, applied when `terdit_jax` is imported.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so they take effect only if `terdit_jax` is imported
before anything runs on a device (`jax.numpy` calls, `jax.devices()`); a flag the user already put in XLA_FLAGS is
left as given, and `TERDIT_XLA_DEFAULTS=0` turns them all off.

- CPU: XLA (jaxlib 0.10, 0.11) sends dots and reductions to YNNPACK, and the elementwise work around them to loop
  fusions that then need their broadcast operands materialized. Its Eigen path ran the same programs faster on
  the 2-core Xeon (AVX-512) VM, most in the convolutions of the SD-VAE decode
  (`benchmarks/cpu_xla_defaults.py` times both in one process and prints the ratios).
"""
from __future__ import annotations

import os

# flag → value; an empty YNN fusion-type list sends every dot and reduction to XLA's own (Eigen) emitters.
FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# what XLA does without the flag (jaxlib 0.10, 0.11): the benchmark compiles this variant for its baseline
XLA_OWN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# XLA aborts the process on a flag it does not know, and these are experimental: only the jaxlib releases they
# were checked on get them.
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
    """Append the FLAGS the user did not set to XLA_FLAGS. → the flags added ([] when turned off, when every flag
    is already set, on a jaxlib they were not checked on, or when a backend has started and it is too late)."""
    if environ.get("TERDIT_XLA_DEFAULTS", "1") == "0" or _backend_started() or not _jaxlib_checked():
        return []
    given = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in FLAGS.items() if f"--{k}" not in given]
    if added:
        environ["XLA_FLAGS"] = " ".join([given, *added]).strip()
    return added
