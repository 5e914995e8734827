"""Packed 2-bit ternary weights and the packed-ternary matmul (Triton and Pallas GPU kernels + tiled XLA fallback);
int8 / packed int4 weights and the exact integer matmul of deployed PTQ models (int4.py)."""
from terdit_kernels.blocks import BlockConfig, choose_config
from terdit_kernels.int4 import INT4_PACK_FORMAT, int4_padded_k, pack_int4, unpack_int4
from terdit_kernels.ops import AUTO_GPU_TABLE, BACKENDS, auto_gpu_backend, int_matmul, resolve_backend, ternary_matmul
from terdit_kernels.packing import PACK_BLOCK_K, PACK_FORMAT, from_hqq, pack, padded_k, to_hqq, unpack
from terdit_kernels.pallas_ternary import pallas_ternary_matmul
from terdit_kernels.reference import TILE_ELEMENTS, quantize_activations, ternary_matmul_reference, tile_columns
from terdit_kernels.triton_int4 import compile_int4_for_target, triton_int4_matmul
from terdit_kernels.triton_ternary import triton_ternary_matmul

__all__ = [
    "AUTO_GPU_TABLE", "BACKENDS", "INT4_PACK_FORMAT", "PACK_BLOCK_K", "PACK_FORMAT", "TILE_ELEMENTS", "BlockConfig",
    "auto_gpu_backend", "int4_padded_k", "int_matmul", "pack_int4", "unpack_int4",
    "choose_config", "from_hqq", "pack", "padded_k", "pallas_ternary_matmul", "quantize_activations",
    "resolve_backend", "ternary_matmul", "ternary_matmul_reference", "tile_columns", "to_hqq",
    "triton_ternary_matmul", "unpack", "triton_int4_matmul", "compile_int4_for_target",
]
