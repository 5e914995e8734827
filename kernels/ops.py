"""Public entry point: ``ternary_matmul`` dispatches to a GPU kernel (Triton-language or Pallas) or the XLA path.

Backends:

* ``"triton"``: the Triton-language kernel launched with ``jax_triton.triton_call`` (``triton_ternary``);
  needs a GPU, triton and jax-triton. With ``interpret=True`` it runs in Triton's CPU interpreter (tests).
* ``"pallas"``: the Pallas kernel on Pallas' Triton backend (``pallas_ternary``); kept while JAX has that
  backend (deprecated in jax 0.11). ``interpret=True`` runs it in the Pallas interpreter.
* ``"xla"``: unpack + dot in bounded N tiles (``reference.ternary_matmul_reference``): CPU, TPU, or a GPU
  whose kernel does not work.
* ``"auto"``: off a GPU, ``"xla"`` (``"pallas"`` when ``interpret=True``, as before). On a GPU, the row of
  ``AUTO_GPU_TABLE[act_dtype]`` whose M range holds the call's M (rows of x after flattening the leading
  dims) names the backend; ``"triton"`` falls back to ``"pallas"`` when jax_triton cannot be imported.

``AUTO_GPU_TABLE`` is not measured yet (no GPU has run these kernels). Until the GPU suite fills it from
``python -m terdit_kernels.benchmark --backend all`` (which prints the fastest backend per act dtype and M
as ``auto_table``), every M goes to ``"triton"``: the Pallas Triton backend is deprecated in jax 0.11, and
the Triton-language kernel handles ragged shapes with masks instead of padded copies and compiles to
Hopper wgmma at M >= 64 (``triton_ternary.compile_for_target``, tested on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from terdit_kernels.int4 import TILE_ELEMENTS, int_matmul_xla
from terdit_kernels.packing import check_k
from terdit_kernels.pallas_ternary import pallas_ternary_matmul
from terdit_kernels.reference import ACT_DTYPES, ternary_matmul_reference
from terdit_kernels.triton_int4 import triton_int4_matmul
from terdit_kernels.triton_ternary import triton_available, triton_ternary_matmul

BACKENDS = ("auto", "triton", "pallas", "xla")
GPU_BACKENDS = ("triton", "pallas")

# act_dtype -> ((max_m, backend), ...): the first row with M <= max_m wins; max_m None = any M.
# NOT MEASURED: the default below; replace with the benchmark's `auto_table` from a GPU run.
AUTO_GPU_TABLE: dict[str, tuple[tuple[int | None, str], ...]] = {
    "bf16": ((None, "triton"),),
    "f32": ((None, "triton"),),
    "int8": ((None, "triton"),),
}


def auto_gpu_backend(m: int | None, act_dtype: str = "bf16", table=None) -> str:
    """The backend 'auto' gives on a GPU for M rows; M None takes the table's catch-all (last) row."""
    rows = (table or AUTO_GPU_TABLE)[act_dtype]
    if m is None:
        choice = rows[-1][1]
    else:
        choice = next((b for max_m, b in rows if max_m is None or m <= max_m), rows[-1][1])
    if choice == "triton" and not triton_available():
        return "pallas"
    return choice


def resolve_backend(backend: str = "auto", interpret: bool = False, m: int | None = None,
                    act_dtype: str = "bf16") -> str:
    """The backend a call runs: 'auto' -> ``auto_gpu_backend`` on GPU, 'pallas' when interpreting, else 'xla'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        if interpret:
            return "pallas"
        return auto_gpu_backend(m, act_dtype) if on_gpu else "xla"
    if backend in GPU_BACKENDS and not interpret and not on_gpu:
        raise ValueError(f"the {backend!r} ternary kernel targets GPUs (Triton) and this process runs on "
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
      backend: 'auto', 'triton', 'pallas' or 'xla' (module docstring: what 'auto' picks).
      interpret: run the chosen GPU kernel in its CPU interpreter (tests); 'auto' then means 'pallas'.
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
    kw = dict(k=k, bias=bias, act_dtype=act_dtype)
    chosen = resolve_backend(backend, interpret, m=x2.shape[0], act_dtype=act_dtype)
    if chosen == "triton":
        y = triton_ternary_matmul(x2, packed, alpha, interpret=interpret, **kw)
    elif chosen == "pallas":
        y = pallas_ternary_matmul(x2, packed, alpha, interpret=interpret, **kw)
    else:
        y = ternary_matmul_reference(x2, packed, alpha, **kw)
    return y.reshape(*lead, n)


INT_BACKENDS = ("auto", "triton", "xla")


def int_matmul(x, w, *, k: int, w_bits: int, backend: str = "auto", interpret: bool = False,
               tile_elements: int | None = TILE_ELEMENTS) -> jax.Array:
    """Exact int32 Σ_k x[m, k]·w[k, n] of a deployed PTQ linear: x (..., K) int8 (leading dims flattened into M),
    w the int8 (K, N) codes (w_bits 8: 5–8-bit codes) or the packed int4 codes (w_bits 4, `int4.pack_int4`).
    → (..., N) int32.

    backend "triton": the W4A8 Triton-language kernel (`triton_int4`; w_bits 4 only: 8-bit weights go to XLA's
    int8 GEMM, which is cuBLASLt's int8 tensor-core GEMM on a GPU and needs no unpacking); "xla": `int4.int_matmul_xla`;
    "auto": "triton" for int4 on a GPU where jax_triton imports (or when interpreting), else "xla"."""
    if backend not in INT_BACKENDS:
        raise ValueError(f"int_matmul backend must be one of {INT_BACKENDS}, got {backend!r}")
    if x.dtype != jnp.int8 or x.shape[-1] != k:
        raise ValueError(f"x must be int8 with last dim K={k}, got {x.dtype}{x.shape}")
    lead, x2 = x.shape[:-1], x.reshape(-1, k)
    kernel = w_bits == 4 and (backend == "triton" or (backend == "auto" and (
        interpret or (jax.default_backend() == "gpu" and triton_available()))))
    if backend == "triton" and not interpret and jax.default_backend() != "gpu":
        raise ValueError(f"the Triton int4 kernel targets GPUs and this process runs on {jax.default_backend()!r}; "
                         "use backend='xla', or interpret=True for testing")
    if kernel:
        y = triton_int4_matmul(x2, w, k=k, interpret=interpret)
    else:
        y = int_matmul_xla(x2, w, k=k, w_bits=w_bits, tile_elements=tile_elements)
    return y.reshape(*lead, y.shape[-1])
