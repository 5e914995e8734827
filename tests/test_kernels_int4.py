"""Packed int4 codes and the exact integer matmul of deployed PTQ models (kernels/int4.py, triton_int4.py, ops.py),
against NumPy: the XLA path, and the Triton W4A8 kernel in Triton's CPU interpreter and compiled for sm_90."""
import jax.numpy as jnp
import numpy as np
import pytest

from terdit_kernels import INT4_PACK_FORMAT, int4_padded_k, int_matmul, pack_int4, unpack_int4


def _codes(rng, k, n, lo=-8, hi=7):
    c = rng.integers(lo, hi + 1, (k, n)).astype(np.int8)
    c[0, 0], c[-1, -1] = lo, hi  # the extremes, where a sign or nibble bug shows
    return c


def test_the_int4_layout_is_the_documented_one():
    """Byte P[b*32 + r, n] = (s[b*64 + r] + 8) << 4 | (s[b*64 + 32 + r] + 8), padding rows weight 0, by a loop."""
    rng = np.random.default_rng(0)
    k, n = 100, 3  # K pads to 128: two blocks, the second half padding
    s = _codes(rng, k, n)
    packed = np.asarray(pack_int4(jnp.asarray(s)))
    assert packed.shape == (64, 3) and packed.dtype == np.uint8 and INT4_PACK_FORMAT == "terdit-int4-k2-v1"
    padded = np.zeros((128, n), np.int64)
    padded[:k] = s
    for b in range(2):
        for r in range(32):
            for j in range(n):
                want = (padded[b * 64 + r, j] + 8) << 4 | (padded[b * 64 + 32 + r, j] + 8)
                assert packed[b * 32 + r, j] == want
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), k)), s)


def test_out_of_range_codes_and_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(jnp.full((4, 2), 8, jnp.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match="K=65 has 64"):
        unpack_int4(jnp.zeros((32, 2), jnp.uint8), 65)


@pytest.mark.parametrize("w_bits,tile", [(8, None), (4, None), (4, 200)])
def test_int_matmul_is_the_exact_integer_product(w_bits, tile):
    """Against a NumPy int64 matmul, with extreme codes (int8 −128..127 × int4 −8..7, K = 300 not a block multiple),
    leading batch dims, and a column-tiled int4 unpack (128-column tiles, the last one overlapping the one before)."""
    rng = np.random.default_rng(1)
    k, n = 300, 260
    x = rng.integers(-128, 128, (2, 5, k)).astype(np.int8)
    x[0, 0, :] = -128  # a row of extremes: |acc| = 300·128·128 needs more than 16 bits
    w = _codes(rng, k, n, *((-128, 127) if w_bits == 8 else (-8, 7)))
    w[:, 0] = -128 if w_bits == 8 else -8
    stored = jnp.asarray(w) if w_bits == 8 else pack_int4(jnp.asarray(w))
    got = int_matmul(jnp.asarray(x), stored, k=k, w_bits=w_bits, backend="xla", tile_elements=tile)
    assert got.dtype == jnp.int32 and got.shape == (2, 5, n)
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.int64) @ w.astype(np.int64))


def test_padding_is_sized_in_whole_blocks():
    assert [int4_padded_k(k) for k in (1, 64, 65, 1152, 4608)] == [64, 64, 128, 1152, 4608]


# ------------------------------------------------------------------ the Triton-language W4A8 kernel


def _triton():
    pytest.importorskip("triton", reason='the W4A8 kernel needs triton (pip install "triton==3.7.1")')
    pytest.importorskip("torch", reason="Triton's interpreter runs on torch CPU tensors (pip install torch==2.13.0)")
    from terdit_kernels.blocks import BlockConfig
    from terdit_kernels.triton_int4 import compile_int4_for_target, triton_int4_matmul
    return BlockConfig, compile_int4_for_target, triton_int4_matmul


@pytest.mark.parametrize("m,k,n,cfg", [(5, 100, 40, None), (33, 300, 70, (16, 32, 1)), (8, 256, 64, (16, 16, 2))])
def test_the_triton_w4a8_kernel_is_the_exact_integer_product(m, k, n, cfg):
    """In Triton's interpreter (the kernel function jax_triton compiles on a GPU) against a NumPy int64 matmul:
    ragged M, N and K (masked, not padded), and split-K partials."""
    block_config, _, triton_int4_matmul = _triton()
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = _codes(rng, k, n)
    x[0] = -128
    got = triton_int4_matmul(jnp.asarray(x), pack_int4(jnp.asarray(w)), k=k, interpret=True,
                             config=None if cfg is None else block_config(*cfg[:2], split_k=cfg[2]))
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.int64) @ w.astype(np.int64))
    via_ops = int_matmul(jnp.asarray(x), pack_int4(jnp.asarray(w)), k=k, w_bits=4, backend="triton", interpret=True)
    np.testing.assert_array_equal(np.asarray(via_ops), np.asarray(got))


def test_the_triton_w4a8_kernel_compiles_for_sm90_without_a_gpu(tmp_path, monkeypatch):
    """Triton's own compiler (the one jax_triton calls) to PTX and cubin for an H100/H200: int8 Hopper wgmma at M = 256."""
    _, compile_int4_for_target, _ = _triton()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    c = compile_int4_for_target(256, 256, 1152)
    assert ".target sm_90a" in c.asm["ptx"] and len(c.asm["cubin"]) > 0
    assert "warp_group_dot" in c.asm["ttgir"] and "i8" in c.asm["ttgir"]
