"""Tile sizes of the GPU packed-ternary kernels (the Pallas one and the Triton-language one share them).

Both kernels compute one (BM, BN) output tile per program over a grid (ceil(M/BM), ceil(N/BN), S) and walk
their share of K one layout block (``PACK_BLOCK_K`` = 128 rows) at a time, so one config describes both.
"""
from __future__ import annotations

import dataclasses

from terdit_kernels.packing import PACK_BLOCK_K


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and Triton launch knobs. bm, bn: powers of two >= 16; split_k divides the K-block count."""
    bm: int
    bn: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << (v - 1).bit_length())


def choose_config(m: int, n: int, kp: int) -> BlockConfig:
    """Heuristic (untuned) block config for an (m, kp) x (kp, n) problem.

    Small M (GEMV-like, the adaLN linears run at M = batch) uses BM = 16 and split-K so that the grid
    still has a few hundred programs; large M uses 128 x 128 tiles with 8 warps.
    """
    bm = min(_pow2_at_least(m, 16), 128)
    bn = next((b for b in (128, 64, 32) if n % b == 0), 16)
    nkb = kp // PACK_BLOCK_K
    split = 1
    if m <= 64:
        programs = -(-m // bm) * -(-n // bn)
        for s in (8, 4, 2):
            if nkb % s == 0 and programs * s <= 512:
                split = s
                break
    warps = 8 if bm * bn >= 128 * 128 else 4
    return BlockConfig(bm=bm, bn=bn, split_k=split, num_warps=warps)


def check_config(cfg: BlockConfig, kp: int) -> None:
    """Raise unless ``cfg`` is valid for a packed weight of ``kp`` (padded) rows of K."""
    for name in ("bm", "bn"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"BlockConfig.{name} must be a power of two >= 16 (Triton dot), got {v}.")
    if cfg.split_k < 1 or (kp // PACK_BLOCK_K) % cfg.split_k:
        raise ValueError(f"BlockConfig.split_k={cfg.split_k} must divide the number of K blocks "
                         f"{kp // PACK_BLOCK_K} (Kp={kp} / {PACK_BLOCK_K}).")
