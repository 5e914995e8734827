"""PixArt's low-bit forms against float: stored bytes and compiled memory of one CFG model call, and with --time its
median time on this machine's device. Prints JSON.

A PixArt config (`--config`, default PixArt-α XL/2 at 512 px: 1024 image tokens, 120 caption tokens of width 4096;
`pixart_sigma_1024`: 4096 image tokens, 300 caption tokens), batch 2 (one prompt and the empty caption), XLA's
`Compiled.memory_analysis()` on this machine's backend, for

* fp32 (parameters and compute in float32), bf16 (every float parameter and the compute in bf16);
* packed W1.58A16 / W1.58A8: a TerDiT QAT model (`model.linear=ternary` on attn1, attn2, ff_net and adaLN-single's
  linear) exported to 2-bit codes (`export.py`), bf16 compute;
* deployed W8A8 / W4A8 (ptq/deploy.py): RTN/PTQ4DiT's site layout (every linear's weight per output channel, inputs
  and q/k/v/probs per tensor), integer codes, bf16 compute.

Without --time nothing is allocated (shapes only). --time builds random weights of every variant (speed does not
depend on trained values) and times each compiled call on the same random inputs, the variants alternated, median of
--repeats after one untimed call; the ratio is against bf16 in the same run. Use --layers to make it fit.

  python benchmarks/pixart_lowbit_memory.py                                  # PixArt-α XL/2 512 px (minutes on 2 cores)
  python benchmarks/pixart_lowbit_memory.py --config pixart_sigma_1024       # PixArt-Σ 1024 px, 300 caption tokens
  python benchmarks/pixart_lowbit_memory.py --config pixart_sigma_1024 --layers 4 --time   # the GPU suite's stage
  python benchmarks/pixart_lowbit_memory.py --quick [--time]                 # a tiny PixArt (seconds)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from terdit_jax.config import ConfigError, finalize
from terdit_jax.export import abstract_packed
from terdit_jax.model_fn import ApplyDiT
from terdit_jax.models.families import abstract
from terdit_jax.ptq.common import uniform_rules, with_sites
from terdit_jax.ptq.deploy import deployed_config

TERNARY_LAYERS = "attn1,attn2,ff_net,adaln_single.linear"  # TerDiT's choice: blocks and adaLN, embedders in float
VARIANTS = ("fp32", "bf16", "packed_w1.58a16", "packed_w1.58a8", "W8A8", "W4A8")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# byte value of each of the 81 combinations of four 2-bit ternary codes in {0, 1, 2} (code 3 is never written)
_TERNARY_BYTES = np.array([(a << 6) | (b << 4) | (c << 2) | d for a in range(3) for b in range(3) for c in range(3)
                           for d in range(3)], np.uint8)


def pixart_configs() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.startswith("pixart_") and f.endswith(".py"))


def pixart_config(name: str = "pixart_alpha_512", quick: bool = False, layers: int = 0):
    """The finalized model config of configs/<name>.py (quick: its tiny form; layers > 0: that many blocks)."""
    c = importlib.import_module(f"terdit_jax.configs.{name}").get_config()
    if quick:
        c.model.update(name="custom", dim=64, n_layers=2, n_heads=4, patch_size=2, caption_channels=32, caption_len=8)
        c.data.image_size = 64
    m = finalize(c).model
    if layers:
        m.n_layers = layers  # after finalize: a preset (PixArt-XL/2) sets the depth there
    return m


def variant_state(model_cfg, variant: str):
    """(graphdef, abstract state) of a variant's model."""
    cfg = with_sites(model_cfg, ())
    cfg.dtype = "float32" if variant == "fp32" else "bfloat16"  # the compute dtype, whatever the config says
    if variant == "fp32":
        return nnx.split(abstract(cfg))
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


def _random_leaf(rng: np.random.Generator, name: str, shape, dtype) -> np.ndarray:
    """A random value for one variable (name: its last path entry): kernels N(0, 1/K), other floats N(0, 0.02²),
    norm weights 1, step sizes and α 0.02, zero points and integer offsets 0, ternary codes uniform over the valid
    bytes, integer codes (int8, or two int4 in a uint8) uniform over all."""
    if name == "packed":
        return _TERNARY_BYTES[rng.integers(0, 81, size=shape)]
    if name == "codes":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, size=shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer) or name == "zero":
        return np.zeros(shape, dtype)
    if name in ("weight", "delta", "w_scale", "alpha"):
        return np.full(shape, 1.0 if name == "weight" else 0.02, dtype)
    std = 1.0 / np.sqrt(shape[0]) if name == "kernel" else 0.02
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def random_state(state, seed: int = 0):
    """Concrete random arrays, on the default device, of an abstract state's shapes and dtypes (`_random_leaf`)."""
    rng, leaves = np.random.default_rng(seed), []
    for path, var in nnx.to_flat_state(state):
        s = var.get_value()
        leaves.append((path, var.replace(jax.device_put(_random_leaf(rng, str(path[-1]), s.shape, np.dtype(s.dtype))))))
    return nnx.from_flat_state(leaves)


def call_inputs(model_cfg, concrete: bool = False, seed: int = 0):
    """(x, t, y) of one CFG call, batch 2: latents (2, n, n, C), timesteps (2,), and y = (T5 embeddings (2, L, 4096),
    key mask (2, L)): the prompt's L tokens all kept, the empty caption one token. Shapes only unless `concrete`."""
    n, m = model_cfg.input_size, model_cfg
    shapes = ((2, n, n, m.in_channels), (2, m.caption_len, m.caption_channels))
    if not concrete:
        return (jax.ShapeDtypeStruct(shapes[0], jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32),
                (jax.ShapeDtypeStruct(shapes[1], jnp.float32), jax.ShapeDtypeStruct((2, m.caption_len), jnp.float32)))
    rng = np.random.default_rng(seed)
    mask = np.ones((2, m.caption_len), np.float32)
    mask[1, 1:] = 0.0
    return (jnp.asarray(rng.standard_normal(shapes[0], dtype=np.float32)), jnp.asarray(rng.integers(0, 1000, 2),
            jnp.int32), (jnp.asarray(rng.standard_normal(shapes[1], dtype=np.float32)), jnp.asarray(mask)))


def step_memory(model_cfg, variant: str):
    """(memory row, compiled call, abstract state) of one variant's CFG call."""
    graphdef, state = variant_state(model_cfg, variant)
    t0 = time.perf_counter()
    compiled = jax.jit(ApplyDiT(graphdef)).lower(state, *call_inputs(model_cfg)).compile()
    ma = compiled.memory_analysis()
    row = {"model_bytes": int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(state))),
           "compile_s": round(time.perf_counter() - t0, 1), "argument_bytes": int(ma.argument_size_in_bytes),
           "temp_bytes": int(ma.temp_size_in_bytes)}
    return row, compiled, state


def time_calls(calls: dict, repeats: int) -> tuple[dict, dict, dict]:
    """({name: first call s}, {name: median s}, {name: first call's output}) of zero-argument calls that each wait
    for their result; the timed repeats alternate the variants, so a noisy machine's drift hits every one alike."""
    first, times, outs = {}, {n: [] for n in calls}, {}
    for n, call in calls.items():
        t0 = time.perf_counter()
        outs[n] = call()
        first[n] = time.perf_counter() - t0
    for _ in range(repeats):
        for n, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[n].append(time.perf_counter() - t0)
    return first, {n: statistics.median(ts) for n, ts in times.items()}, outs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="pixart_alpha_512", help="a PixArt config of configs/ (by name, no .py)")
    p.add_argument("--layers", type=int, default=0, help="blocks (0: the config's depth)")
    p.add_argument("--quick", action="store_true", help="a tiny PixArt (of the config's family) instead")
    p.add_argument("--time", action="store_true", help="also time each variant's call on random weights and inputs")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (--time)")
    args = p.parse_args(argv)
    if args.config not in pixart_configs():
        p.error(f"--config {args.config!r} is not a PixArt config; choose one of {', '.join(pixart_configs())}")
    if args.layers < 0 or args.repeats < 1:
        p.error("--layers must be >= 0 (0: the config's depth) and --repeats >= 1")
    try:
        model_cfg = pixart_config(args.config, args.quick, args.layers)
    except ConfigError as e:
        p.error(f"{args.config}: {e}")
    rows, calls = {}, {}
    inputs = call_inputs(model_cfg, concrete=True) if args.time else None
    for v in VARIANTS:
        rows[v], compiled, state = step_memory(model_cfg, v)
        if args.time:
            params = random_state(state)
            calls[v] = lambda c=compiled, s=params: jax.block_until_ready(c(s, *inputs))
    for r in rows.values():
        r["model_vs_bf16"] = round(r["model_bytes"] / rows["bf16"]["model_bytes"], 4)
        r["temp_vs_bf16"] = round(r["temp_bytes"] / rows["bf16"]["temp_bytes"], 4)
    if args.time:
        first, med, outs = time_calls(calls, args.repeats)
        for v, r in rows.items():  # finite: random weights that overflow would time a NaN path, not the model's
            r.update(first_call_s=round(first[v], 4), median_s=round(med[v], 6),
                     time_vs_bf16=round(med[v] / med["bf16"], 4),
                     output_finite=bool(np.isfinite(np.asarray(outs[v], np.float32)).all()))
    size = model_cfg.input_size * 8
    out = {"model": f"{'tiny PixArt' if args.quick else model_cfg.name} {size} px", "config": args.config,
           "quick": args.quick, "image_size": size, "image_tokens": (model_cfg.input_size // model_cfg.patch_size) ** 2,
           "caption_len": model_cfg.caption_len, "n_layers": model_cfg.n_layers, "batch": 2, "timed": args.time,
           "repeats": args.repeats if args.time else 0, "rows": rows, "backend": jax.default_backend(),
           "platform": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "machine": platform.processor() or platform.machine(), "jax": jax.__version__}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
