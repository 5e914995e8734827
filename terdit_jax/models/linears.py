"""The linear-layer factory: every linear of every model family is built by `make_linear(path, ...)`.

The layer's role (its path without the block prefix, e.g. "attention.wq") and the model config decide the kind:
`model.linear` for roles that start with one of `model.quantized_layers`, full precision otherwise (TerDiT keeps
the embedders and the final layer in full precision). Kinds are entries of `LINEAR_KINDS`; each entry builds
its layer from the shared arguments and the config fields it needs, so adding a kind is one entry here (a test
or a plug-in may `LINEAR_KINDS.add` its own). Every linear also gets its input, weight and output quantization
sites.
"""
from __future__ import annotations

import re
from typing import Callable

from flax import nnx

from terdit_jax.models.bitnet import BitLinear
from terdit_jax.models.integer import IntDense
from terdit_jax.models.packed import PackedTernaryDense
from terdit_jax.models.ternary import Dense, ShardGammaTernaryDense, TernaryDense
from terdit_jax.quant.sites import make_site
from terdit_jax.registry import Registry

_BLOCK_PREFIX = re.compile(r"^(layers|blocks|transformer_blocks)\.\d+\.")


def _fp(in_features, out_features, cfg, **kw):
    return Dense(in_features, out_features, **kw)


def _ternary(in_features, out_features, cfg, **kw):
    act_bits = cfg.get("act_bits", 16)
    if cfg.get("ternary_gamma", "global") == "shard" and cfg.get("tensor_shards", 1) > 1:
        return ShardGammaTernaryDense(in_features, out_features, alpha_init=cfg.alpha_init, act_bits=act_bits,
                                      tensor_shards=cfg.tensor_shards, **kw)
    return TernaryDense(in_features, out_features, alpha_init=cfg.alpha_init, act_bits=act_bits, **kw)


def _bitnet(in_features, out_features, cfg, **kw):
    return BitLinear(in_features, out_features, norm=cfg.get("bitnet_norm", "rms"), eps=cfg.norm_eps,
                     act_bits=cfg.get("act_bits", 16), **kw)


def _packed(in_features, out_features, cfg, *, kernel_init, **kw):
    # Values come from an export, so the initialiser is unused; the matmul settings come from the config. A BitNet
    # export keeps BitLinear's (parameter-free) input norm.
    norm = cfg.get("bitnet_norm", "rms") if cfg.get("packed_from", "ternary") == "bitnet" else None
    return PackedTernaryDense(in_features, out_features, act_dtype=cfg.get("packed_act_dtype") or "bf16",
                              backend=cfg.get("packed_backend", "auto"), input_norm=norm, norm_eps=cfg.norm_eps,
                              **kw)


def _int(in_features, out_features, cfg, *, kernel_init, **kw):
    return IntDense(in_features, out_features, backend=cfg.get("packed_backend", "auto"), **kw)


# name → builder(in_features, out_features, model_cfg, *, use_bias, kernel_init, axes, dtype, rngs,
#                input_site, weight_site, output_site) → nnx.Module called as layer(x, t)
LINEAR_KINDS: Registry[Callable] = Registry("linear kind", {"fp": _fp, "ternary": _ternary, "bitnet": _bitnet,
                                                            "packed": _packed, "int": _int})
PACKABLE_KINDS = ("ternary", "bitnet")  # QAT kinds `export.py` packs (the values of model.packed_from)
# Kinds for which model.act_bits=8 means something: the QAT kinds train with int8 inputs, a packed model records
# it (`export.load_packed` then runs int8 activations); "fp" keeps its inputs in model.dtype.
ACT_BITS_KINDS = ("ternary", "bitnet", "packed")


def role_of(path: str) -> str:
    """'layers.3.attention.wq' → 'attention.wq' (the block index does not change a layer's kind)."""
    return _BLOCK_PREFIX.sub("", path)


def layer_kind(path: str, model_cfg) -> str:
    """Kind of the linear at `path`: `model.linear` if its role starts with one of `model.quantized_layers`,
    else full precision."""
    prefixes = tuple(p for p in str(model_cfg.quantized_layers).split(",") if p)
    return model_cfg.linear if role_of(path).startswith(prefixes) else "fp"


def make_linear(path: str, in_features: int, out_features: int, *, model_cfg, rngs: nnx.Rngs, use_bias: bool,
                kernel_init: Callable, axes, dtype) -> nnx.Module:
    """Build the linear at `path` (e.g. 'layers.3.attention.wq') with the kind the config picks; in a deployed PTQ
    model (`model.deployed`) every linear whose weight a site rule quantizes is integer ("int")."""
    input_site = make_site(f"{path}.input", model_cfg, (None, in_features))
    weight_site = make_site(f"{path}.weight", model_cfg, (in_features, out_features))
    deployed = model_cfg.get("deployed", False) and weight_site is not None
    builder = LINEAR_KINDS.get("int" if deployed else layer_kind(path, model_cfg))
    return builder(in_features, out_features, model_cfg, use_bias=use_bias, kernel_init=kernel_init,
                   axes=tuple(axes), dtype=dtype, rngs=rngs, input_site=input_site, weight_site=weight_site,
                   output_site=make_site(f"{path}.output", model_cfg, (None, out_features)))
