"""Packed 2-bit ternary inference layers and the fused adaLN of all blocks (deployment).

`PackedTernaryDense` is the linear kind "packed" (`models.linears.LINEAR_KINDS`): a DiT built with
`model.linear="packed"` has the same module tree as the QAT model, with each ternary layer's float32
latent `kernel` replaced by `packed`, the uint8 codes of W_t in `terdit_kernels.PACK_FORMAT`
((padded_k(K)/4, N), four codes per byte). Its forward is `terdit_kernels.ternary_matmul`, which on a
GPU runs the Pallas kernel (weights unpacked in registers) and elsewhere unpacks one layer at a time
inside the matmul, so the full-precision ternary matrices of the model never exist at once.

The adaLN modulations depend only on (t, y), so a deployment computes those of all L blocks in one
matmul per step (`StackedAdaLN`): the L packed (Kp/4, 6D) matrices sit side by side as one
(Kp/4, L·6D) packed matrix (the layout packs along K, so concatenating along N is again a valid packed
matrix), and `DiT.__call__(..., modulations=(L, B, 6D))` consumes the result. `fuse_adaln` moves a
model to that form and drops the per-block copies, so no adaLN weight is held twice (`model_fn.PackedApply`
runs it).

A BitNet export (`model.packed_from="bitnet"`) keeps BitLinear's parameter-free input norm in each packed layer
(`input_norm`); its α is the γ = mean|W| the BitLinear scaled by. With act_dtype 'int8' a packed layer computes
exactly what a QAT layer with `model.act_bits=8` trained with (`models.ternary.int8_linear`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.models.bitnet import input_norm as apply_input_norm
from terdit_jax.quant.sites import quantize
from terdit_kernels import padded_k, quantize_activations, resolve_backend, ternary_matmul
from terdit_kernels.ops import BACKENDS
from terdit_kernels.reference import ACT_DTYPES as _KERNEL_ACT_DTYPES, accumulate, tile_columns

ACT_DTYPES = tuple(_KERNEL_ACT_DTYPES)  # "bf16", "f32" (W2A16), "int8" (W2A8)
_ZERO_BYTE = 0x55  # four codes u = 1, i.e. W_t = 0 (code u = W_t + 1, terdit_kernels.packing)


class PackedCodes(nnx.Variable):
    """uint8 packed ternary codes. Not an `nnx.Param`: optimisers and `nnx.split(model, nnx.Param)` never see it."""


class PackedTernaryDense(nnx.Module):
    """Inference ternary linear y = x·(α·W_t) (+ b) from 2-bit codes (official `layer_inference.py`, §2.3).

    Same constructor as `Dense`/`TernaryDense` (kernel_init is unused: values come from a checkpoint).
    Variables: `packed` (padded_k(in)/4, out) uint8 PackedCodes, `alpha` () float32, `bias` (out,) or None.
    `act_dtype` ('bf16' W2A16, 'f32', 'int8' W2A8) and `backend` (terdit_kernels.ops.BACKENDS) are static
    settings of the matmul; `configure_packed` sets them on a whole model from the config. `input_site`: a
    quantizer of the layer input (quant/sites.py); the weight is 2-bit already, so it has no weight site.
    `input_norm` ('rms' | 'layer' | None, eps `norm_eps`): a BitNet export's in-layer norm, after the input site.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str | None, str | None],
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None, act_dtype: str = "bf16", backend: str = "auto",
                 input_site: nnx.Module | None = None, weight_site: nnx.Module | None = None,
                 output_site: nnx.Module | None = None, input_norm: str | None = None, norm_eps: float = 1e-5):
        _check_settings(act_dtype, backend)
        if weight_site is not None:
            raise ValueError("a packed ternary layer's weight is 2-bit already; no site rule may quantize it")
        self.input_site, self.output_site = input_site, output_site
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dtype, self.act_dtype, self.backend = dtype, act_dtype, backend
        self.input_norm, self.norm_eps = input_norm, float(norm_eps)
        # Until a checkpoint fills them: W_t = 0 and α = 1 (a freshly built inference layer is the zero map).
        self.packed = PackedCodes(jnp.full((padded_k(in_features) // 4, out_features), _ZERO_BYTE, jnp.uint8),
                                  logical_axes=tuple(axes))
        self.alpha = nnx.Param(jnp.ones((), jnp.float32), logical_axes=())
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=tuple(axes)[1:]) if use_bias else None

    def __call__(self, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
        """x (..., in) → (..., out) in `dtype` (the bias is added in float32 inside the matmul epilogue)."""
        x = apply_input_norm(self.input_norm, quantize(self.input_site, x, t), self.norm_eps)
        codes = _after_input(self.packed[...], x, self.backend, self.in_features)
        y = ternary_matmul(x.astype(self.dtype), codes, self.alpha[...], k=self.in_features,
                           bias=None if self.bias is None else self.bias[...], act_dtype=self.act_dtype,
                           backend=self.backend)
        return quantize(self.output_site, y, t)

    def accumulator(self, x: jax.Array) -> jax.Array:
        """The W2A8 int32 accumulators (M, N) for the layer input x (..., K) (after the input site), as the XLA
        fallback forms them (`terdit_kernels.reference.accumulate`; every kernel reproduces them bit for bit)."""
        h = apply_input_norm(self.input_norm, x, self.norm_eps)
        q, _ = quantize_activations(h.reshape(-1, self.in_features).astype(self.dtype))
        return accumulate(q, self.packed[...], k=self.in_features)


def _after_input(codes: jax.Array, x: jax.Array, backend: str, k: int) -> jax.Array:
    """On the XLA path, give an untiled layer's unpacking a data dependency on the layer input (k: in-features).

    The XLA fallback unpacks W_t into a dense (K, N) matrix. Those unpacks depend only on the weights, so
    XLA may run all of them before the first block, and XLA:CPU does: the compiled 4.2B forward then holds
    every unpacked bf16 matrix at once (8.5 GB of temporaries, `Compiled.memory_analysis()`; an
    optimization barrier is dropped by the CPU pipeline and does not help). OR-ing in `x0 != x0` (false
    unless the first activation is NaN, and XLA cannot fold it because of NaN semantics) makes each unpack
    wait for its layer's input, so a layer's dense matrix exists only while that layer runs. With a NaN
    input the codes change, but the sample is NaN already. The GPU kernels never build the matrix, and a layer
    the fallback unpacks tile by tile (`terdit_kernels.reference.tile_columns`) already waits for its input
    inside its loop, where the OR would only add a copy of the codes (117 MB more temporaries for 4.2B), so
    both are skipped.
    """
    if resolve_backend(backend, m=x.size // x.shape[-1]) != "xla" or tile_columns(k, codes.shape[1]) < codes.shape[1]:
        return codes
    return wait_for(codes, x)


def wait_for(codes: jax.Array, x: jax.Array) -> jax.Array:
    """`codes` (integer) made to depend on the float layer input x, unchanged unless x[0] is NaN (`_after_input`)."""
    x0 = x.reshape(-1)[0]
    return codes | (x0 != x0).astype(codes.dtype)


def _check_settings(act_dtype: str, backend: str):
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"packed act_dtype must be one of {ACT_DTYPES}, got {act_dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"packed backend must be one of {BACKENDS}, got {backend!r}")


def packed_settings(model_cfg) -> tuple[str, str]:
    """(act_dtype, backend) from `model.packed_act_dtype` / `model.packed_backend`, defaults ('bf16', 'auto')."""
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d: getattr(model_cfg, k, d)
    return str(get("packed_act_dtype", "bf16") or "bf16"), str(get("packed_backend", "auto") or "auto")


def configure_packed(model: nnx.Module, act_dtype: str = "bf16", backend: str = "auto") -> nnx.Module:
    """Set the matmul settings of every packed layer of `model` (before `nnx.split`, they live in the graphdef)."""
    _check_settings(act_dtype, backend)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (PackedTernaryDense, StackedAdaLN)):
            module.act_dtype, module.backend = act_dtype, backend
    return model


class StackedAdaLN(nnx.Module):
    """adaLN modulation of all L blocks in one packed matmul: silu(c) → ternary matmul → per-block α, bias
    → TerDiT RMSNorm over each block's 6D vector with that block's weight (official `adaLN_modulation`
    = SiLU, TernaryLinear(C→6D, bias), RMSNorm(6D); terdit_official.md §1.5).

    Variables: `packed` (padded_k(C)/4, L·6D) uint8 (block l owns columns [l·6D, (l+1)·6D)), `alpha` (L,),
    `bias` (L, 6D) or None, `norm` (L, 6D) or None (the adaln_norm=False ablation). `input_norm` / `input_eps`:
    a BitNet export's parameter-free in-layer norm of silu(c), the same for every block.
    """

    def __init__(self, packed, alpha, bias, norm, *, in_features: int, eps: float, dtype, act_dtype: str = "bf16",
                 backend: str = "auto", input_norm: str | None = None, input_eps: float = 1e-5):
        _check_settings(act_dtype, backend)
        self.n_layers, self.width = alpha.shape[0], packed.shape[1] // alpha.shape[0]
        self.in_features, self.eps, self.dtype = int(in_features), float(eps), dtype
        self.act_dtype, self.backend = act_dtype, backend
        self.input_norm, self.input_eps = input_norm, float(input_eps)
        self.packed = PackedCodes(packed, logical_axes=("cond", None))
        self.alpha = nnx.Param(alpha.astype(jnp.float32), logical_axes=(None,))
        self.bias = None if bias is None else nnx.Param(bias, logical_axes=(None, "adaln"))
        self.norm = None if norm is None else nnx.Param(norm, logical_axes=(None, "adaln"))

    def __call__(self, c: jax.Array) -> jax.Array:
        """c (B, C) float32 → modulations (L, B, 6D) in `dtype`, equal to each block's `modulation(c)`."""
        # Same arithmetic as L separate PackedTernaryDense calls: the activations are rounded to the compute
        # dtype first, the accumulation is float32, then acc·α_l + b_l in float32 and one rounding to `dtype`.
        x = apply_input_norm(self.input_norm, jax.nn.silu(c), self.input_eps).astype(self.dtype).astype(jnp.float32)
        if self.act_dtype == "int8":
            # The kernels take one scalar α per call, but W2A8 rounds acc·(s·α_l) with each block's own α_l; so the
            # exact int32 accumulators come from the XLA path (M = batch rows here: a kernel would gain nothing) and
            # each block gets the row scale s·α_l that its own layer forms.
            q, s = quantize_activations(x)
            acc = accumulate(q, _after_input(self.packed[...], x, "xla", self.in_features), k=self.in_features)
            scale = s[:, None, :] * self.alpha[...][None, :, None]  # (B, L, 1)
            mod = acc.reshape(x.shape[0], self.n_layers, self.width).astype(jnp.float32) * scale
        else:
            acc = ternary_matmul(x, _after_input(self.packed[...], x, self.backend, self.in_features),
                                 jnp.ones((), jnp.float32),
                                 k=self.in_features,
                                 act_dtype=self.act_dtype, backend=self.backend)  # (B, L·6D) float32
            mod = acc.reshape(x.shape[0], self.n_layers, self.width) * self.alpha[...][None, :, None]
        if self.bias is not None:
            mod = mod + self.bias[...][None].astype(jnp.float32)
        mod = mod.astype(self.dtype)
        if self.norm is not None:  # RMSNorm as layers.RMSNorm: float32, x/sqrt(mean(x²)+eps)·w, back to dtype
            m32 = mod.astype(jnp.float32)
            m32 = m32 * jax.lax.rsqrt(jnp.mean(m32 * m32, axis=-1, keepdims=True) + self.eps)
            mod = (m32 * self.norm[...][None]).astype(self.dtype)
        return jnp.swapaxes(mod, 0, 1)


def fuse_adaln(model: nnx.Module) -> nnx.Module:
    """Move the per-block packed adaLN layers of a DiT into one `model.adaln_stack` (in place; returns model).

    Afterwards the blocks hold no adaLN weights, so the model must be called with `modulations=` (as
    `model_fn.PackedApply` does); the stacked weights are the only copy.
    """
    blocks = list(model.block_list())
    lins = [getattr(b, "adaLN_modulation", None) for b in blocks]  # adaLN-single (PixArt) has none per block
    if not lins or not all(isinstance(m, PackedTernaryDense) for m in lins):
        raise ValueError("fuse_adaln needs a DiT whose block adaLN linears are packed (model.linear='packed' "
                         "with 'adaLN_modulation' in model.quantized_layers)")
    if any(m.input_site is not None or m.output_site is not None for m in lins):
        raise ValueError("fuse_adaln would skip the quantization sites of the adaLN layers; sample unfused")
    norms = [getattr(b, "adaLN_norm", None) for b in blocks]  # TerDiT's RMSNorm; the original DiT has none
    has_bias, has_norm = lins[0].bias is not None, norms[0] is not None
    first = lins[0]
    model.adaln_stack = StackedAdaLN(
        jnp.concatenate([m.packed[...] for m in lins], axis=1),
        jnp.stack([m.alpha[...] for m in lins]),
        jnp.stack([m.bias[...] for m in lins]) if has_bias else None,
        jnp.stack([n.weight[...] for n in norms]) if has_norm else None,
        in_features=first.in_features, eps=norms[0].eps if has_norm else 0.0, dtype=first.dtype,
        act_dtype=first.act_dtype, backend=first.backend, input_norm=first.input_norm, input_eps=first.norm_eps)
    for b in blocks:
        b.adaLN_modulation = None
        b.adaLN_norm = None
    return model
