"""Packed 2-bit ternary weights, the jnp reference / tiled XLA fallback, the Pallas kernel (interpreted),
backend choice and the benchmark. The Triton-language kernel: test_kernels_triton.py."""
import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from terdit_kernels import benchmark, ops, packing
from terdit_kernels.ops import auto_gpu_backend, resolve_backend, ternary_matmul
from terdit_kernels.pallas_ternary import BlockConfig, pallas_ternary_matmul
from terdit_kernels.reference import (TILE_ELEMENTS, accumulate, quantize_activations, ternary_matmul_reference,
                                      tile_columns)

RNG = np.random.default_rng(1234)


def _ternary(k, n):
    return RNG.integers(-1, 2, size=(k, n), dtype=np.int8)


# ---------------------------------------------------------------- packing


def test_pack_unpack_round_trip_with_ragged_k():
    w = _ternary(300, 24)  # 300 is not a multiple of the 128-row block
    p = packing.pack(w)
    assert p.dtype == jnp.uint8 and p.shape == (packing.padded_k(300) // 4, 24) == (96, 24)
    np.testing.assert_array_equal(np.asarray(packing.unpack(p, 300)), w)
    # the padding rows must decode to weight 0 (code 1) so padded activations contribute nothing
    np.testing.assert_array_equal(np.asarray(packing.unpack_codes(p))[300:], 1)


def test_pack_layout_quarters_within_k_block():
    # one +1 weight at K row 128 + 64 + 5 (block 1, quarter 2, row 5), column 3 -> byte (32 + 5, 3) bits 3-2
    w = np.zeros((256, 4), np.int8)
    w[128 + 64 + 5, 3] = 1
    p = np.asarray(packing.pack(w))
    expected = np.full_like(p, 0x55)  # code 1 everywhere
    expected[32 + 5, 3] = 0b01011001
    np.testing.assert_array_equal(p, expected)


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="expected only -1, 0, 1"):
        packing.pack(np.full((4, 4), 2, np.int8))
    with pytest.raises(TypeError, match="integer"):
        packing.pack(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="does not match the packed weight"):
        packing.unpack(packing.pack(_ternary(130, 8)), 100)  # 100 pads to 128, the array holds 256


def _official_pack(w_out_in):
    """hqq pack_2bit_u8 per terdit_official.md section 5: P[i,j] = u[i]<<6 | u[i+s]<<4 | u[i+2s]<<2 | u[i+3s]."""
    u = (w_out_in.astype(np.int16) + 1).astype(np.uint8)
    s = u.shape[0] // 4
    return (u[:s] << 6) | (u[s:2 * s] << 4) | (u[2 * s:3 * s] << 2) | u[3 * s:]


def _official_unpack(p):
    """hqq unpack_2bit_u8 per the spec: row quarters from bits 7-6, 5-4, 3-2, 1-0; then W_t = u - 1."""
    u = np.concatenate([(p & 0xC0) >> 6, (p & 0x30) >> 4, (p & 0x0C) >> 2, p & 0x03], axis=0)
    return u.astype(np.int8) - 1


def test_from_hqq_is_the_transpose_of_the_official_matrix_and_round_trips():
    r, c = 48, 200  # torch Linear(in=200, out=48): weight (48, 200)
    w_torch = _ternary(r, c)
    p_off = _official_pack(w_torch)
    assert p_off.shape == (r // 4, c)
    np.testing.assert_array_equal(_official_unpack(p_off), w_torch)
    ours = packing.from_hqq(p_off, out_features=r)
    assert ours.shape == (packing.padded_k(c) // 4, r)
    np.testing.assert_array_equal(np.asarray(packing.unpack(ours, c)), _official_unpack(p_off).T)
    np.testing.assert_array_equal(np.asarray(packing.to_hqq(ours, c)), p_off)
    with pytest.raises(ValueError, match="out_features"):
        packing.from_hqq(p_off, out_features=r + 4)


# ---------------------------------------------------------------- reference


def test_reference_matches_dense_formulas():
    m, k, n = 5, 200, 24
    w = _ternary(k, n)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32)
    p = packing.pack(w)
    y16 = ternary_matmul_reference(jnp.asarray(x), p, 0.3, k=k, bias=jnp.asarray(bias), act_dtype="f32")
    np.testing.assert_allclose(np.asarray(y16), x @ (0.3 * w.astype(np.float32)) + bias, rtol=1e-5, atol=1e-5)
    # W2A8: s = max|x_row| / 127, q = clip(round(x / s)), y = s * alpha * (q @ W_t)
    s = np.abs(x).max(axis=1, keepdims=True) / 127.0
    q = np.clip(np.round(x / s), -127, 127)
    y8 = ternary_matmul_reference(jnp.asarray(x), p, 0.3, k=k, act_dtype="int8")
    np.testing.assert_allclose(np.asarray(y8), s * 0.3 * (q @ w.astype(np.float32)), rtol=1e-5, atol=1e-5)


def test_quantize_activations_zero_row_is_finite():
    q, s = quantize_activations(jnp.zeros((2, 8)))
    assert np.all(np.asarray(q) == 0) and np.all(np.isfinite(np.asarray(s)))


# ---------------------------------------------------------------- XLA fallback: bounded tiles


def test_tile_columns_bounds_each_tile_and_leaves_small_layers_whole():
    assert tile_columns(1536, 1536) == 1536  # the 600M attention: one dot, no loop
    # the 4.2B stacked adaLN (C=1024 -> 32 blocks x 6 x 3072): 72 equal tiles of 8192 columns
    assert tile_columns(1024, 32 * 6 * 3072) == 8192
    for k, n in [(3072, 3072), (3072, 8192), (8192, 3072), (1024, 28 * 6 * 1536)]:
        tn = tile_columns(k, n)
        assert tn < n and n % tn == 0 and tn % 128 == 0 and k * tn <= TILE_ELEMENTS
    assert tile_columns(200, 1000, 200 * 300) == 256  # 1000 = 3 x 256 + 232: the last tile overlaps


@pytest.mark.parametrize("act", ["int8", "bf16"])
def test_tiled_fallback_equals_untiled(act):
    k, n, m = 200, 1000, 5  # 4 tiles of 256 at this budget, the last one shifted back to end at N
    p = packing.pack(_ternary(k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
    tiny = 200 * 300
    assert tile_columns(k, n, tiny) < n
    if act == "int8":
        q, _ = quantize_activations(x)
        np.testing.assert_array_equal(np.asarray(accumulate(q, p, k=k, tile_elements=tiny)),
                                      np.asarray(accumulate(q, p, k=k, tile_elements=None)))
    else:  # integer-valued activations: every f32 partial sum is exact, so equality is bit for bit
        xi = jnp.asarray(RNG.integers(-8, 9, size=(m, k)), jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(accumulate(xi, p, k=k, tile_elements=tiny)),
                                      np.asarray(accumulate(xi, p, k=k, tile_elements=None)))
    bias = jnp.asarray(RNG.standard_normal(n), jnp.float32)
    kw = dict(k=k, bias=bias, act_dtype=act)
    tiled = ternary_matmul_reference(x, p, 0.3, tile_elements=tiny, **kw)
    whole = ternary_matmul_reference(x, p, 0.3, tile_elements=None, **kw)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_fallback_temporaries_are_a_small_fraction_of_the_unpacked_weight():
    """The 4.2B's stacked adaLN (K=1024, N=32*6*3072) at M = batch 2, compiled for this CPU, never run."""
    k, n = 1024, 32 * 6 * 3072
    x = jax.ShapeDtypeStruct((2, k), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((k // 4, n), jnp.uint8)
    bf16_bytes = 2 * k * n  # 1.2 GB: what unpacking the whole matrix at once costs

    def temp_bytes(act, tile_elements):
        f = jax.jit(lambda x, p: ternary_matmul_reference(x, p, 0.5, k=k, act_dtype=act, tile_elements=tile_elements))
        ma = f.lower(x, p).compile().memory_analysis()
        if ma is None:
            pytest.skip("this backend reports no memory analysis")
        return ma.temp_size_in_bytes

    for act in ("bf16", "int8"):
        assert temp_bytes(act, TILE_ELEMENTS) < 0.03 * bf16_bytes  # ~18 MB: one tile, not 1.2 GB
    assert temp_bytes("bf16", None) > 0.9 * bf16_bytes  # untiled, the matrix does materialise


# ---------------------------------------------------------------- Pallas kernel (interpreted)


@pytest.mark.parametrize("m", [1, 7, 256, 512])
def test_pallas_w2a8_accumulator_is_bit_exact(m):
    k, n = 200, 32  # K pads to 256: two K blocks, the second half padding
    w = _ternary(k, n)
    p = packing.pack(w)
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
    acc = pallas_ternary_matmul(x, p, 1.0, k=k, act_dtype="int8", interpret=True, return_accumulator=True)
    q, s = quantize_activations(x)
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(accumulate(q, p, k=k)))
    if m == 1:
        return  # M = 1 and M = 7 share the split-K epilogue; one scaled check is enough
    y = pallas_ternary_matmul(x, p, 0.7, k=k, act_dtype="int8", interpret=True)
    ref = ternary_matmul_reference(x, p, 0.7, k=k, act_dtype="int8")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 7, 256, 512])
def test_pallas_w2a16_bf16_matches_reference(m):
    k, n = 200, 32
    p = packing.pack(_ternary(k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.bfloat16)
    bias = jnp.asarray(RNG.standard_normal(n), jnp.float32)
    y = pallas_ternary_matmul(x, p, 0.05, k=k, bias=bias, act_dtype="bf16", interpret=True)
    ref = ternary_matmul_reference(x, p, 0.05, k=k, bias=bias, act_dtype="bf16")
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_pallas_float_path_is_exact_on_integer_activations():
    # small integers make every f32 partial sum exact, so any summation order gives the same bits
    k, n, m = 384, 40, 9  # N = 40 is padded to the 16-wide tile
    p = packing.pack(_ternary(k, n))
    x = jnp.asarray(RNG.integers(-8, 9, size=(m, k)), jnp.float32)
    acc = pallas_ternary_matmul(x, p, 1.0, k=k, act_dtype="f32", interpret=True, return_accumulator=True)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(accumulate(x, p, k=k)))


def test_pallas_split_k_equals_single_pass():
    k, n, m = 512, 64, 3
    p = packing.pack(_ternary(k, n))
    x = jnp.asarray(RNG.standard_normal((m, k)), jnp.float32)
    kw = dict(k=k, act_dtype="int8", interpret=True)
    one = pallas_ternary_matmul(x, p, 0.5, config=BlockConfig(16, 32, split_k=1), **kw)
    four = pallas_ternary_matmul(x, p, 0.5, config=BlockConfig(16, 32, split_k=4), **kw)
    np.testing.assert_allclose(np.asarray(one), np.asarray(four), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="split_k"):
        pallas_ternary_matmul(x, p, 0.5, config=BlockConfig(16, 32, split_k=3), **kw)


def _abstract_gpu():
    """An abstract H200 mesh: what jax 0.11's Pallas Triton lowering reads the target GPU from when none is
    attached (jax 0.10 ignores it and assumes sm_90, the same target)."""
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


def test_pallas_kernel_lowers_to_triton_for_cuda():
    """Cross-lowers (no GPU needed) through the Pallas Triton lowering, which rejects unsupported ops/shapes."""
    k, n = 1024, 256
    p = jax.ShapeDtypeStruct((k // 4, n), jnp.uint8)
    for m, act in [(1, "bf16"), (256, "int8")]:
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        f = jax.jit(lambda x, p: pallas_ternary_matmul(x, p, 1.0, k=k, act_dtype=act))
        with _abstract_gpu():
            try:
                text = f.trace(x, p).lower(lowering_platforms=("cuda",)).as_text()
            except RuntimeError as e:  # a jaxlib without the CUDA lowering rules registered
                pytest.skip(f"cuda cross-lowering unavailable: {e}")
        assert "xla.gpu.triton" in text


# ---------------------------------------------------------------- public op and benchmark


def test_ternary_matmul_xla_equals_pallas_interpret_with_batch_dims():
    k, n = 130, 48
    p = packing.pack(_ternary(k, n))
    x = jnp.asarray(RNG.standard_normal((2, 3, k)), jnp.float32)
    bias = jnp.asarray(RNG.standard_normal(n), jnp.float32)
    for act in ("int8", "bf16"):
        a = ternary_matmul(x, p, jnp.array([0.2]), k=k, bias=bias, act_dtype=act, backend="xla")
        b = ternary_matmul(x, p, jnp.array([0.2]), k=k, bias=bias, act_dtype=act, backend="pallas", interpret=True)
        assert a.shape == b.shape == (2, 3, n) and a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_ternary_matmul_rejects_bad_arguments():
    p = packing.pack(_ternary(64, 16))
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match="in-features"):
        ternary_matmul(jnp.ones((2, 63)), p, 1.0, k=64)
    with pytest.raises(ValueError, match="act_dtype"):
        ternary_matmul(x, p, 1.0, k=64, act_dtype="fp8")
    if jax.default_backend() != "gpu":
        for backend in ("pallas", "triton"):
            with pytest.raises(ValueError, match="interpret=True"):
                ternary_matmul(x, p, 1.0, k=64, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        ternary_matmul(x, p, 1.0, k=64, backend="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU choice")
def test_auto_backend_is_the_xla_fallback_off_gpu():
    assert resolve_backend("auto") == resolve_backend("auto", m=4096, act_dtype="int8") == "xla"
    assert resolve_backend("auto", interpret=True) == "pallas"
    assert resolve_backend("triton", interpret=True) == "triton"


def test_auto_gpu_table_picks_by_m_and_falls_back_to_pallas(monkeypatch):
    table = {"bf16": ((16, "xla"), (512, "pallas"), (None, "triton"))}
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    assert [auto_gpu_backend(m, "bf16", table) for m in (1, 16, 17, 512, 513, None)] == \
        ["xla", "xla", "pallas", "pallas", "triton", "triton"]
    monkeypatch.setattr(ops, "triton_available", lambda: False)  # no jax_triton on this GPU
    assert auto_gpu_backend(4096, "bf16", table) == "pallas"
    for act in ("bf16", "f32", "int8"):  # the unmeasured default covers every act dtype and M
        assert ops.AUTO_GPU_TABLE[act][-1][0] is None


@pytest.mark.parametrize("args", [["--backend", "xla"], ["--interpret", "--acts", "int8"]])
def test_benchmark_tiny_prints_valid_json(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert benchmark.main(["--sweep", "tiny", "--iters", "1", *args]) == 0
    report = json.loads(buf.getvalue())
    assert report["device"] and report["pack_format"] == packing.PACK_FORMAT
    rows = report["results"]
    assert len(rows) == len(benchmark.SWEEPS["tiny"][0]) * (1 if "--acts" in args else 2)
    for r in rows:
        assert r["kernel_ms"] > 0 and r["xla_bf16_ms"] > 0
        assert r["speedup"] == pytest.approx(r["xla_bf16_ms"] / r["kernel_ms"], rel=1e-2)
