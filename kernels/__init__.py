"""Packed 2-bit ternary weights and the packed-ternary matmul (Pallas kernel + XLA fallback)."""
from terdit_kernels.ops import resolve_backend, ternary_matmul
from terdit_kernels.packing import PACK_BLOCK_K, PACK_FORMAT, from_hqq, pack, padded_k, to_hqq, unpack
from terdit_kernels.pallas_ternary import BlockConfig, choose_config, pallas_ternary_matmul
from terdit_kernels.reference import quantize_activations, ternary_matmul_reference

__all__ = [
    "PACK_BLOCK_K", "PACK_FORMAT", "BlockConfig", "choose_config", "from_hqq", "pack", "padded_k",
    "pallas_ternary_matmul", "quantize_activations", "resolve_backend", "ternary_matmul",
    "ternary_matmul_reference", "to_hqq", "unpack",
]
