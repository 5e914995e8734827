"""The W4A8 matmul as a Triton-language kernel (``_triton_kernel.int4_matmul_kernel``), launched like the ternary
one (``triton_ternary``): ``jax_triton.triton_call`` on a GPU, Triton's interpreter on the CPU in the tests, and
``compile_int4_for_target`` compiles it for a CUDA arch without a GPU.

Each program walks its share of K one 64-row layout block (``int4.INT4_BLOCK_K``) at a time: one (32, BN) uint8
load gives the block's two (32, BN) weight halves (shift, mask, minus 8), each multiplied with its (BM, 32)
int8 activation columns by ``tl.dot`` into an exact int32 accumulator. It returns the raw accumulators (summed
over split-K partials); the zero-point terms and scales are the caller's float epilogue
(``terdit_jax.quant.integer.epilogue``). Ragged M, N, K are masked, never padded.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from terdit_kernels.blocks import BlockConfig, choose_config
from terdit_kernels.int4 import INT4_BLOCK_K, int4_padded_k
from terdit_kernels.triton_ternary import _launch, jit_kernel

KERNEL = "int4_matmul_kernel"


def int4_config(m: int, n: int, k: int, config: BlockConfig | None = None) -> BlockConfig:
    """The ternary kernel's tile heuristic, with split-K dividing the 64-row block count."""
    cfg = config or choose_config(m, n, int4_padded_k(k))
    for name in ("bm", "bn"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"BlockConfig.{name} must be a power of two >= 16 (Triton dot), got {v}.")
    if (int4_padded_k(k) // INT4_BLOCK_K) % cfg.split_k:
        if config is not None:
            raise ValueError(f"split_k={cfg.split_k} does not divide the {int4_padded_k(k) // INT4_BLOCK_K} "
                             f"K blocks of K={k}")
        cfg = dataclasses.replace(cfg, split_k=1)
    return cfg


def _plan(m: int, n: int, k: int, cfg: BlockConfig):
    grid = (-(-m // cfg.bm), -(-n // cfg.bn), cfg.split_k)
    meta = dict(M=m, N=n, K=k, BLOCKS_PER_SPLIT=int4_padded_k(k) // INT4_BLOCK_K // cfg.split_k, BM=cfg.bm, BN=cfg.bn)
    return grid, meta


def triton_int4_matmul(x, packed, *, k: int, config: BlockConfig | None = None, interpret: bool = False):
    """Exact int32 x @ unpack_int4(packed): x (M, K) int8, packed (int4_padded_k(K) // 2, N) uint8 → (M, N) int32."""
    if x.ndim != 2 or x.shape[1] != k or x.dtype != jnp.int8:
        raise ValueError(f"x must be int8 (M, K={k}), got {x.dtype}{x.shape}")
    if packed.dtype != jnp.uint8 or packed.shape[0] * 2 != int4_padded_k(k):
        raise ValueError(f"packed must be uint8 ({int4_padded_k(k) // 2}, N), got {packed.dtype}{packed.shape}")
    m, n = x.shape[0], packed.shape[1]
    cfg = int4_config(m, n, k, config)
    grid, meta = _plan(m, n, k, cfg)
    out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.int32)
    partials = _launch(x, packed, out_shape=out_shape, grid=grid, meta=meta, cfg=cfg, interpret=interpret,
                       name="int4_matmul_w4a8", kernel=KERNEL)
    return partials.sum(axis=0)  # exact in int32


def compile_int4_for_target(m: int, n: int, k: int, *, config: BlockConfig | None = None, capability: int = 90):
    """Compile the W4A8 kernel for CUDA compute capability ``capability`` without a GPU (Triton's CompiledKernel;
    ``.asm`` has 'ttgir', 'ptx', 'cubin')."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = int4_config(m, n, k, config)
    _, meta = _plan(m, n, k, cfg)
    signature = dict(x_ptr="*i8", p_ptr="*u8", o_ptr="*i32", **{name: "constexpr" for name in meta})
    src = ASTSource(fn=jit_kernel(KERNEL), signature=signature, constexprs=meta)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
