"""PixArt's low-bit forms against float: stored bytes and compiled memory of one CFG model call. Prints JSON.

PixArt-XL/2 (α, 512 px: 1024 image tokens, 120 caption tokens of width 4096), random weights, compile only, batch 2
(one prompt and the empty caption), XLA's `Compiled.memory_analysis()` on this machine's backend:

* fp32, bf16 (every float parameter and the compute in bf16);
* packed W1.58A16 / W1.58A8: a TerDiT QAT model (`model.linear=ternary` on attn1, attn2, ff_net and adaLN-single's
  linear) exported to 2-bit codes (`export.py`), bf16 compute;
* deployed W8A8 / W4A8 (ptq/deploy.py): RTN/PTQ4DiT's site layout (every linear's weight per output channel, inputs
  and q/k/v/probs per tensor), integer codes, bf16 compute.

  python benchmarks/pixart_lowbit_memory.py            # PixArt-XL/2 (compiles: minutes on 2 cores)
  python benchmarks/pixart_lowbit_memory.py --quick    # a tiny PixArt (seconds)
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from terdit_jax.config import base_config, finalize
from terdit_jax.export import abstract_packed
from terdit_jax.model_fn import ApplyDiT
from terdit_jax.models.families import abstract
from terdit_jax.ptq.common import uniform_rules, with_sites
from terdit_jax.ptq.deploy import deployed_config

TERNARY_LAYERS = "attn1,attn2,ff_net,adaln_single.linear"  # TerDiT's choice: blocks and adaLN, embedders in float
VARIANTS = ("fp32", "bf16", "packed_w1.58a16", "packed_w1.58a8", "W8A8", "W4A8")


def pixart_config(quick: bool):
    c = base_config()
    m = c.model
    m.update(family="pixart", name="custom" if quick else "PixArt-XL/2", linear="fp", learn_sigma=True,
             caption_channels=4096, caption_len=120)
    if quick:
        m.update(dim=64, n_layers=2, n_heads=4, patch_size=2, caption_channels=32, caption_len=8)
    c.data.update(kind="imagenet_latents", image_size=64 if quick else 512, latent=True)
    return finalize(c).model


def variant_state(model_cfg, variant: str):
    """(graphdef, abstract state) of a variant's model."""
    cfg = with_sites(model_cfg, ())
    if variant == "fp32":
        return nnx.split(abstract(cfg))
    cfg.dtype = "bfloat16"
    if variant.startswith("packed"):
        cfg.update(linear="ternary", quantized_layers=TERNARY_LAYERS, act_bits=8 if variant.endswith("a8") else 16,
                   packed_act_dtype="int8" if variant.endswith("a8") else "bf16")
        return abstract_packed(cfg)
    if variant == "bf16":
        graphdef, state = nnx.split(abstract(cfg))
        return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, jnp.bfloat16 if s.dtype == jnp.float32 else s.dtype), state)
    w, a = {"W8A8": (8, 8), "W4A8": (4, 8)}[variant]
    return nnx.split(abstract(deployed_config(with_sites(cfg, uniform_rules(cfg, w, a, init="minmax")))))


def step_memory(model_cfg, variant: str) -> dict:
    graphdef, state = variant_state(model_cfg, variant)
    n, m = model_cfg.input_size, model_cfg
    x = jax.ShapeDtypeStruct((2, n, n, m.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    y = (jax.ShapeDtypeStruct((2, m.caption_len, m.caption_channels), jnp.float32),
         jax.ShapeDtypeStruct((2, m.caption_len), jnp.float32))
    t0 = time.perf_counter()
    ma = jax.jit(ApplyDiT(graphdef)).lower(state, x, t, y).compile().memory_analysis()
    return {"model_bytes": int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(state))),
            "compile_s": round(time.perf_counter() - t0, 1), "argument_bytes": int(ma.argument_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny PixArt instead of PixArt-XL/2")
    args = p.parse_args(argv)
    model_cfg = pixart_config(args.quick)
    rows = {v: step_memory(model_cfg, v) for v in VARIANTS}
    for r in rows.values():
        r["model_vs_bf16"] = round(r["model_bytes"] / rows["bf16"]["model_bytes"], 4)
        r["temp_vs_bf16"] = round(r["temp_bytes"] / rows["bf16"]["temp_bytes"], 4)
    out = {"model": "tiny PixArt" if args.quick else "PixArt-XL/2 512 px", "batch": 2, "rows": rows,
           "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
           "jax": jax.__version__}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
