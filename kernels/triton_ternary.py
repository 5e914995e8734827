"""Packed-ternary matmul (W2A16 and W2A8) as a Triton-language kernel launched from JAX with jax_triton.

The kernel (``_triton_kernel.ternary_matmul_kernel``) computes one (BM, BN) output tile per program over a
grid (ceil(M/BM), ceil(N/BN), S), walking its share of K one 128-row layout block at a time: one (32, BN)
uint8 load gives the four (32, BN) weight slices of the block (shift, mask, minus 1), each multiplied by
the matching (BM, 32) activation columns with ``tl.dot`` (bf16/f32 -> f32, or int8 -> exact int32).
Unlike the Pallas kernel, ragged M, N and K are handled with masked loads, so the wrapper never pads (and
so never copies) the weights or the activations.

Three ways to run the same kernel function:

* GPU: ``jax_triton.triton_call`` compiles it with the installed Triton and launches it inside the XLA
  program (``triton_ternary_matmul``).
* CPU tests: ``interpret=True`` runs it in Triton's interpreter (the one ``TRITON_INTERPRET=1`` selects)
  on torch CPU tensors, from a ``jax.pure_callback``, so it also works under ``jax.jit``.
* No device at all: ``compile_for_target`` compiles it to TTGIR/PTX/cubin for a given CUDA arch
  (sm_90 by default) with Triton's own compiler, which needs no GPU.

triton, jax_triton and torch are imported only when one of these runs, so ``terdit_kernels`` imports
without them. Tested with triton 3.6.0 and 3.7.1 (torch 2.13.0's pin), jax-triton 0.3.1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from terdit_kernels.blocks import BlockConfig, check_config, choose_config
from terdit_kernels.packing import PACK_BLOCK_K, check_k
from terdit_kernels.reference import ACT_DTYPES, quantize_activations

INSTALL_HINT = 'pip install "triton==3.7.1" "jax-triton==0.3.1"'


@functools.cache
def _kernel_module():
    try:
        from terdit_kernels import _triton_kernel
    except ImportError as e:
        raise ImportError(f"the Triton ternary kernel needs the triton package ({INSTALL_HINT}): {e}") from e
    return _triton_kernel


@functools.cache
def jit_kernel(name: str = "ternary_matmul_kernel"):
    """A kernel of `_triton_kernel` as a ``triton.JITFunction`` (what ``@triton.jit`` returns without
    TRITON_INTERPRET)."""
    fn = getattr(_kernel_module(), name)
    from triton.runtime.jit import JITFunction
    return JITFunction(fn)


@functools.cache
def interpreted_kernel(name: str = "ternary_matmul_kernel"):
    """The same kernel function as Triton's interpreter runs it (``@triton.jit`` under TRITON_INTERPRET=1)."""
    fn = getattr(_kernel_module(), name)
    from triton.runtime.interpreter import InterpretedFunction
    _fix_interpreter_bf16()
    return InterpretedFunction(fn)


def _fix_interpreter_bf16() -> None:
    """Make Triton's interpreter compute bf16 as a GPU does (checked broken in triton 3.6.0 and 3.7.1).

    The interpreter keeps bf16 tensors as their uint16 bit patterns, and (a) ``tl.dot`` multiplies those bit
    patterns as integers, (b) int <-> bf16 casts convert the integer value into/out of the bit pattern, and
    (c) f32 -> bf16 truncates instead of rounding to nearest even. So a W2A16 bf16 kernel gives garbage
    there while it is right on a GPU. This decodes bf16 with ml_dtypes (a jax dependency; its conversions
    round to nearest even like the GPU's cvt.rn) in the interpreter's cast and dot; other dtypes are
    untouched. The kernel code itself is not changed for the interpreter.
    """
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    if getattr(builder, "_terdit_bf16_fixed", False):
        return
    bf16 = np.dtype(jnp.bfloat16)
    cast, dot = builder.cast_impl, builder.create_dot

    def values(h):
        return h.data.view(bf16) if h.dtype.scalar == tl.bfloat16 else h.data

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == d or tl.bfloat16 not in (s, d):
            return cast(self, src, dst_type)
        out = values(src).astype(bf16).view(np.uint16) if d == tl.bfloat16 else values(src).astype(ti._get_np_dtype(d))
        return ti.TensorHandle(out, d)

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):  # bf16 x bf16 products are exact in f32
            a = ti.TensorHandle(values(a).astype(np.float32), tl.float32)
            b = ti.TensorHandle(values(b).astype(np.float32), tl.float32)
        return dot(self, a, b, acc, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot
    builder._terdit_bf16_fixed = True


@functools.cache  # a failed import is not cached by Python and jax_triton's import sets TRITON_CACHE_DIR
def triton_available() -> bool:
    """True when jax_triton imports, i.e. triton is installed and jaxlib has its GPU Triton support."""
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_available() -> bool:
    """True when the kernel can run in Triton's interpreter here (triton and torch installed)."""
    import importlib.util
    return all(importlib.util.find_spec(name) is not None for name in ("triton", "torch"))


def launch_plan(m: int, n: int, k: int, act_dtype: str, cfg: BlockConfig, *, raw: bool, has_bias: bool,
                row_scale: bool) -> tuple[tuple[int, int, int], dict]:
    """(grid, constexpr arguments) of one launch; shared by the GPU, interpreter and compile-only paths."""
    kp = -(-k // PACK_BLOCK_K) * PACK_BLOCK_K
    grid = (-(-m // cfg.bm), -(-n // cfg.bn), cfg.split_k)
    meta = dict(M=m, N=n, K=k, BLOCKS_PER_SPLIT=kp // PACK_BLOCK_K // cfg.split_k, BM=cfg.bm, BN=cfg.bn,
                INT8=act_dtype == "int8", F32=act_dtype == "f32", ROW_SCALE=row_scale, HAS_BIAS=has_bias,
                RAW=raw)
    return grid, meta


# ------------------------------------------------------------------ interpreter path (CPU tests)


def _to_torch(a: np.ndarray):
    import torch
    a = np.array(a)  # a writable, contiguous copy: torch warns on the read-only buffers jax hands out
    if a.dtype == jnp.bfloat16:  # numpy has no bf16: move the bits through int16
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _from_torch(t, dtype) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def _torch_dtype(dtype):
    import torch
    return {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float32): torch.float32,
            jnp.dtype(jnp.float16): torch.float16, jnp.dtype(jnp.int32): torch.int32}[jnp.dtype(dtype)]


def _interpret_host(*arrays, out_shape, grid, meta, num_warps, kernel):
    import torch
    args = [_to_torch(np.asarray(a)) for a in arrays]
    out = torch.empty(out_shape.shape, dtype=_torch_dtype(out_shape.dtype))
    interpreted_kernel(kernel)[grid](*args, out, **meta, num_warps=num_warps)
    return _from_torch(out, out_shape.dtype)


def _launch(*arrays, out_shape, grid, meta, cfg: BlockConfig, interpret: bool, name: str,
            kernel: str = "ternary_matmul_kernel"):
    """Run kernel `kernel` of `_triton_kernel` on `arrays` (its input pointers, in order; the output comes last)."""
    if interpret:
        interpreted_kernel(kernel)  # import errors surface here, at trace time, rather than inside the callback
        if not interpreter_available():
            raise ImportError("interpreting the Triton kernel needs torch on the CPU (torch==2.13.0, the test extra)")
        host = functools.partial(_interpret_host, out_shape=out_shape, grid=grid, meta=meta,
                                 num_warps=cfg.num_warps, kernel=kernel)
        return jax.pure_callback(host, out_shape, *arrays)
    try:
        import jax_triton as jt
    except ImportError as e:
        raise ImportError(f"backend 'triton' needs jax_triton and a CUDA jaxlib ({INSTALL_HINT}): {e}") from e
    # enable_fp_fusion=False keeps the epilogue's multiply and add as two roundings, as in reference.py.
    return jt.triton_call(*arrays, kernel=jit_kernel(kernel), out_shape=out_shape, grid=grid,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
                          name=name, **meta)


# ------------------------------------------------------------------ public entry points


def triton_ternary_matmul(x, packed, alpha, *, k: int, bias=None, act_dtype: str = "bf16", out_dtype=None,
                          config: BlockConfig | None = None, interpret: bool = False,
                          return_accumulator: bool = False) -> jax.Array:
    """y = x @ (alpha * W_t) (+ bias) with the Triton-language kernel; same arithmetic as ``reference``.

    Args:
      x: (M, K) float activations.
      packed: (padded_k(K) // 4, N) uint8 (``packing.pack``).
      alpha: scalar or (1,) per-layer scale.
      k: unpadded K.
      bias: optional (N,).
      act_dtype: 'bf16' / 'f32' (W2A16) or 'int8' (W2A8, per-token absmax, quantized by XLA before the call).
      out_dtype: defaults to x.dtype.
      config: block config; ``blocks.choose_config`` when None. bm, bn need not divide M, N (masked).
      interpret: run in Triton's interpreter on the CPU (needs triton and torch) instead of jax_triton.
      return_accumulator: return the raw (M, N) accumulator (int32 for W2A8, f32 otherwise) instead of y.
    Returns:
      (M, N) array.
    """
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be one of {sorted(ACT_DTYPES)}, got {act_dtype!r}.")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K={k}), got {x.shape}.")
    if packed.dtype != jnp.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 array (Kp/4, N), got {packed.dtype}{packed.shape}.")
    check_k(packed.shape[0], k)
    m, n = x.shape[0], packed.shape[1]
    kp = 4 * packed.shape[0]
    cfg = config or choose_config(m, n, kp)
    check_config(cfg, kp)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    alpha = jnp.asarray(alpha, jnp.float32).reshape(())

    int8 = act_dtype == "int8"
    if int8:
        xa, s = quantize_activations(x)
        scale = (s * alpha).reshape(m)  # same f32 product as the reference epilogue
    else:
        xa = x.astype(ACT_DTYPES[act_dtype])
        scale = alpha.reshape(1)
    has_bias = bias is not None
    # The kernel never reads b_ptr without HAS_BIAS, but jax_triton needs an array for every pointer.
    b = bias.astype(jnp.float32) if has_bias else jnp.zeros((1,), jnp.float32)
    raw = return_accumulator or cfg.split_k > 1
    acc_dtype = jnp.int32 if int8 else jnp.float32
    out_shape = (jax.ShapeDtypeStruct((cfg.split_k, m, n), acc_dtype) if raw
                 else jax.ShapeDtypeStruct((m, n), out_dtype))
    grid, meta = launch_plan(m, n, k, act_dtype, cfg, raw=raw, has_bias=has_bias and not raw, row_scale=int8)
    out = _launch(xa, packed, scale, b, out_shape=out_shape, grid=grid, meta=meta, cfg=cfg, interpret=interpret,
                  name="ternary_matmul_w2a8" if int8 else "ternary_matmul_w2a16")
    if not raw:
        return out
    acc = out.sum(axis=0)  # exact for int32; split-K partials of f32 add in a fixed order
    if return_accumulator:
        return acc
    y = acc.astype(jnp.float32) * (scale[:, None] if int8 else scale)
    if has_bias:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


_TRITON_TYPES = {"int8": "i8", "bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "int32": "i32",
                 "uint8": "u8"}


def compile_for_target(m: int, n: int, k: int, *, act_dtype: str = "bf16", out_dtype=jnp.bfloat16,
                       has_bias: bool = True, config: BlockConfig | None = None, capability: int = 90):
    """Compile the kernel for CUDA compute capability ``capability`` without a GPU; returns Triton's CompiledKernel.

    Same launch plan and pointer types as ``triton_ternary_matmul`` would give jax_triton for an (m, k) x
    (k, n) call. ``.asm`` holds 'ttir', 'ttgir', 'llir', 'ptx' and 'cubin' (ptxas ships in the triton wheel).
    What jax_triton adds on a GPU (the XLA custom call wrapping the PTX) needs a CUDA jaxlib and is not run.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kp = -(-k // PACK_BLOCK_K) * PACK_BLOCK_K
    cfg = config or choose_config(m, n, kp)
    check_config(cfg, kp)
    raw = cfg.split_k > 1
    int8 = act_dtype == "int8"
    _, meta = launch_plan(m, n, k, act_dtype, cfg, raw=raw, has_bias=has_bias and not raw, row_scale=int8)
    x_t = _TRITON_TYPES[jnp.dtype(ACT_DTYPES[act_dtype]).name]
    o_t = "i32" if raw and int8 else "fp32" if raw else _TRITON_TYPES[jnp.dtype(out_dtype).name]
    signature = dict(x_ptr="*" + x_t, p_ptr="*u8", s_ptr="*fp32", b_ptr="*fp32", o_ptr="*" + o_t)
    signature.update({name: "constexpr" for name in meta})
    src = ASTSource(fn=jit_kernel(), signature=signature, constexprs=meta)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False))
