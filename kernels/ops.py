"""Public entry point: ``ternary_matmul`` picks the Pallas kernel on GPU and the jnp/XLA path elsewhere."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from terdit_kernels.packing import check_k
from terdit_kernels.pallas_ternary import pallas_ternary_matmul
from terdit_kernels.reference import ACT_DTYPES, ternary_matmul_reference

BACKENDS = ("auto", "pallas", "xla")


def resolve_backend(backend: str = "auto", interpret: bool = False) -> str:
    """'auto' -> 'pallas' on GPU (or when interpreting), 'xla' on CPU/TPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "pallas" if interpret or jax.default_backend() == "gpu" else "xla"
    if backend == "pallas" and not interpret and jax.default_backend() != "gpu":
        raise ValueError(f"the Pallas ternary kernel targets GPUs (Triton) and this process runs on "
                         f"{jax.default_backend()!r}; use backend='xla', or interpret=True for testing.")
    return backend


@functools.partial(jax.jit, static_argnames=("k", "act_dtype", "backend", "interpret"))
def ternary_matmul(x, packed, alpha, *, k: int, bias=None, act_dtype: str = "bf16",
                   backend: str = "auto", interpret: bool = False) -> jax.Array:
    """Packed-ternary linear: y = x @ (alpha * W_t) (+ bias).

    Args:
      x: (..., K) float activations; leading dims are flattened into M.
      packed: (padded_k(K) // 4, N) uint8 in ``packing.PACK_FORMAT``.
      alpha: per-layer float scale, scalar or shape (1,).
      k: unpadded K (in-features), static.
      bias: optional (N,).
      act_dtype: 'bf16' (W2A16), 'f32' (W2A16 with f32 activations) or 'int8' (W2A8, per-token absmax).
      backend: 'auto' (Pallas on GPU, XLA elsewhere), 'pallas' or 'xla'.
      interpret: run the Pallas kernel in the interpreter (CPU tests); implies backend 'pallas' for 'auto'.
    Returns:
      (..., N) in x.dtype.
    """
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be one of {sorted(ACT_DTYPES)}, got {act_dtype!r}.")
    if x.shape[-1] != k:
        raise ValueError(f"x has last dim {x.shape[-1]} but the layer has K={k} in-features.")
    if packed.dtype != jnp.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 array (Kp/4, N), got {packed.dtype}{packed.shape}.")
    check_k(packed.shape[0], k)
    n = packed.shape[1]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {bias.shape}.")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if resolve_backend(backend, interpret) == "pallas":
        y = pallas_ternary_matmul(x2, packed, alpha, k=k, bias=bias, act_dtype=act_dtype, interpret=interpret)
    else:
        y = ternary_matmul_reference(x2, packed, alpha, k=k, bias=bias, act_dtype=act_dtype)
    return y.reshape(*lead, n)
