"""The Triton-language kernels: the packed-ternary matmul and the W4A8 integer matmul (imports triton; loaded
lazily by ``triton_ternary``).

``ternary_matmul_kernel`` (and ``int4_matmul_kernel`` alike) is a plain Python function written in Triton language. ``triton_ternary`` wraps
this one function object twice: ``triton.JITFunction`` (compiled by Triton, launched by
``jax_triton.triton_call`` on a GPU) and ``InterpretedFunction`` (what ``TRITON_INTERPRET=1`` makes
``triton.jit`` return: Triton's CPU interpreter, driven with torch CPU tensors in the tests). So the tests
run the very code the GPU compiles.
"""
import triton.language as tl

# packed rows per layout block == activation columns per 2-bit field (packing._Q), and per 4-bit field of the int4
# layout (int4.py); a kernel may only read globals that are tl.constexpr
QUARTER = tl.constexpr(32)


def ternary_matmul_kernel(
    x_ptr,  # (M, K) activations, row-major: int8 (W2A8), bf16 or f32 (W2A16)
    p_ptr,  # (Kp/4, N) uint8 codes in terdit-k4-v1 (packing.py)
    s_ptr,  # (M,) f32 row scales s_row * alpha if ROW_SCALE, else (1,) f32 alpha
    b_ptr,  # (N,) f32 bias; never read unless HAS_BIAS
    o_ptr,  # (M, N) output in its final dtype, or (SPLIT_K, M, N) raw f32/int32 partials if RAW
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,  # K unpadded; Kp = 128 * SPLIT_K * BLOCKS_PER_SPLIT
    BLOCKS_PER_SPLIT: tl.constexpr,  # 128-row layout blocks of K walked by one program
    BM: tl.constexpr, BN: tl.constexpr,  # output tile; powers of two >= 16 (tl.dot)
    INT8: tl.constexpr, F32: tl.constexpr,  # activation kind: int8, f32, else bf16
    ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr,
):
    """Program (i, j, t) computes output tile (i, j) over K blocks [t*B, (t+1)*B), B = BLOCKS_PER_SPLIT."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rq = tl.arange(0, QUARTER)
    m_ok = rm < M
    n_ok = rn < N
    # int64 row offsets: M*K and M*N can pass 2**31 for the stacked adaLN (N = L*6D) at large M.
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    # tl.full, not tl.zeros: tl.zeros is itself a @triton.jit function, which the interpreter can only call
    # when triton was imported under TRITON_INTERPRET=1; builtins work in both modes (see module docstring).
    if INT8:
        acc = tl.full((BM, BN), 0, tl.int32)
    else:
        acc = tl.full((BM, BN), 0, tl.float32)
    first = pid_k * BLOCKS_PER_SPLIT
    for i in range(BLOCKS_PER_SPLIT):  # constant trip count (the interpreter cannot range over a program id)
        b = first + i
        # One (32, BN) byte tile holds four (32, BN) weight slices; out-of-range columns read code 1
        # (weight 0) and are never stored.
        codes = tl.load(p_ptr + (b * QUARTER + rq).to(tl.int64)[:, None] * N + rn[None, :],
                        mask=n_ok[None, :], other=0x55)
        for q in tl.static_range(4):
            w = ((codes >> (6 - 2 * q)) & 3).to(tl.int8) - 1  # quarter q: bits 7-6, 5-4, 3-2, 1-0
            cols = b * 128 + q * QUARTER + rq  # its activation columns (a Triton tensor cannot be sliced)
            # Columns >= K are the layout's padding rows (weight 0) and rows >= M are padding: load 0.
            xs = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < K), other=0)
            if INT8:
                acc = tl.dot(xs, w, acc, out_dtype=tl.int32)  # exact: int8 x int8 -> int32
            elif F32:
                acc = tl.dot(xs, w.to(tl.float32), acc, input_precision="ieee")  # not TF32
            else:
                acc = tl.dot(xs, w.to(tl.bfloat16), acc)  # bf16 x bf16 -> f32
    out_mask = m_ok[:, None] & n_ok[None, :]
    if RAW:
        o = o_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(o, acc, mask=out_mask)
    else:
        # Same f32 epilogue as reference.py: acc * scale, then + bias (two roundings; fusion is disabled).
        if ROW_SCALE:
            scale = tl.load(s_ptr + rm, mask=m_ok, other=0.0)[:, None]
        else:
            scale = tl.load(s_ptr)
        y = acc.to(tl.float32) * scale
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(o_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(o_ptr.dtype.element_ty), mask=out_mask)


def int4_matmul_kernel(
    x_ptr,  # (M, K) int8 activation codes, row-major
    p_ptr,  # (Kp/2, N) uint8 4-bit codes in terdit-int4-k2-v1 (int4.py)
    o_ptr,  # (SPLIT_K, M, N) int32 partial accumulators
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,  # K unpadded; Kp = 64 * SPLIT_K * BLOCKS_PER_SPLIT
    BLOCKS_PER_SPLIT: tl.constexpr,  # 64-row layout blocks of K walked by one program
    BM: tl.constexpr, BN: tl.constexpr,
):
    """W4A8: program (i, j, t) computes the exact int32 tile (i, j) over K blocks [t*B, (t+1)*B). One (32, BN)
    byte tile holds the block's two (32, BN) weight halves (high nibble, low nibble; code − 8 is the weight)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rq = tl.arange(0, QUARTER)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    acc = tl.full((BM, BN), 0, tl.int32)
    first = pid_k * BLOCKS_PER_SPLIT
    for i in range(BLOCKS_PER_SPLIT):
        b = first + i
        # out-of-range columns read 0x88 (both codes 8: weight 0) and are never stored
        codes = tl.load(p_ptr + (b * QUARTER + rq).to(tl.int64)[:, None] * N + rn[None, :],
                        mask=n_ok[None, :], other=0x88)
        for h in tl.static_range(2):
            w = ((codes >> (4 - 4 * h)) & 15).to(tl.int8) - 8  # half h: bits 7-4, 3-0
            cols = b * 64 + h * QUARTER + rq
            xs = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < K), other=0)
            acc = tl.dot(xs, w, acc, out_dtype=tl.int32)  # exact: int8 x int8 -> int32
    o = o_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(o, acc, mask=m_ok[:, None] & n_ok[None, :])
