"""The Triton-language packed-ternary kernel: run by Triton's CPU interpreter (torch CPU tensors) against the
jnp reference, and compiled for sm_90 without a GPU. The interpreter runs the same kernel function that
jax_triton launches on a GPU (``triton_ternary.jit_kernel``)."""
import jax.numpy as jnp
import numpy as np
import pytest

triton = pytest.importorskip(
    "triton", reason='triton is not installed; these tests need it (pip install "triton==3.7.1")')
pytest.importorskip("torch", reason="Triton's interpreter runs on torch CPU tensors (pip install torch==2.13.0)")

from terdit_kernels import _triton_kernel, packing  # noqa: E402
from terdit_kernels.blocks import BlockConfig  # noqa: E402
from terdit_kernels.ops import ternary_matmul  # noqa: E402
from terdit_kernels.reference import accumulate, quantize_activations, ternary_matmul_reference  # noqa: E402
from terdit_kernels.triton_ternary import (compile_for_target, interpreted_kernel, jit_kernel,  # noqa: E402
                                           triton_ternary_matmul)

RNG = np.random.default_rng(4321)
K, N = 200, 40  # K pads to 256 (two K blocks, the second mostly padding); N = 40 is ragged for every BN


def _case(m, dtype=jnp.float32):
    p = packing.pack(RNG.integers(-1, 2, size=(K, N), dtype=np.int8))
    return jnp.asarray(RNG.standard_normal((m, K)), dtype), p


def test_interpreter_and_gpu_launch_share_one_kernel_function():
    assert jit_kernel().fn is interpreted_kernel().fn is _triton_kernel.ternary_matmul_kernel
    assert isinstance(jit_kernel(), triton.runtime.JITFunction)


@pytest.mark.parametrize("m, cfg", [(1, None), (7, BlockConfig(16, 16, split_k=2)), (130, BlockConfig(64, 32))])
def test_triton_w2a8_accumulator_is_bit_exact(m, cfg):
    # (1, None): choose_config's split-K; (130, 64x32): three M tiles, the last one mostly masked
    x, p = _case(m)
    acc = triton_ternary_matmul(x, p, 1.0, k=K, act_dtype="int8", config=cfg, interpret=True,
                                return_accumulator=True)
    q, _ = quantize_activations(x)
    assert acc.dtype == jnp.int32 and acc.shape == (m, N)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(accumulate(q, p, k=K, tile_elements=None)))
    bias = jnp.asarray(RNG.standard_normal(N), jnp.float32)
    y = triton_ternary_matmul(x, p, 0.7, k=K, bias=bias, act_dtype="int8", config=cfg, interpret=True)
    ref = ternary_matmul_reference(x, p, 0.7, k=K, bias=bias, act_dtype="int8")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [3, 33])
def test_triton_w2a16_bf16_matches_reference(m):
    x, p = _case(m, jnp.bfloat16)
    bias = jnp.asarray(RNG.standard_normal(N), jnp.float32)
    y = triton_ternary_matmul(x, p, 0.05, k=K, bias=bias, act_dtype="bf16", interpret=True)
    ref = ternary_matmul_reference(x, p, 0.05, k=K, bias=bias, act_dtype="bf16")
    assert y.dtype == jnp.bfloat16 and y.shape == (m, N)
    # Both sum exact bf16 products in f32 (in different orders), then round once to bf16: at most 1 ulp apart.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=8e-3, atol=1e-3)


def test_triton_f32_path_is_exact_on_integer_activations():
    # small integers make every f32 partial sum exact, so any summation order gives the same bits
    p = packing.pack(RNG.integers(-1, 2, size=(384, N), dtype=np.int8))
    x = jnp.asarray(RNG.integers(-8, 9, size=(9, 384)), jnp.float32)
    acc = triton_ternary_matmul(x, p, 1.0, k=384, act_dtype="f32", interpret=True, return_accumulator=True)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(accumulate(x, p, k=384)))


def test_ternary_matmul_triton_backend_under_jit_with_batch_dims():
    x = jnp.asarray(RNG.standard_normal((2, 3, K)), jnp.float32)
    _, p = _case(1)
    bias = jnp.asarray(RNG.standard_normal(N), jnp.float32)
    a = ternary_matmul(x, p, jnp.array([0.2]), k=K, bias=bias, act_dtype="int8", backend="xla")
    b = ternary_matmul(x, p, jnp.array([0.2]), k=K, bias=bias, act_dtype="int8", backend="triton", interpret=True)
    assert b.shape == (2, 3, N) and b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_triton_kernel_compiles_for_sm90_without_a_gpu(tmp_path, monkeypatch):
    """Triton's own compiler (the one jax_triton calls) to PTX and cubin for an H100/H200 target."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    small = compile_for_target(1, 256, 1024, act_dtype="bf16")  # BM 16 + split-K: mma.sync path
    large = compile_for_target(256, 256, 1024, act_dtype="int8", has_bias=False)  # BM 128: Hopper wgmma
    for c in (small, large):
        assert ".target sm_90a" in c.asm["ptx"] and len(c.asm["cubin"]) > 0
    assert "warp_group_dot" in large.asm["ttgir"] and "i8" in large.asm["ttgir"]
