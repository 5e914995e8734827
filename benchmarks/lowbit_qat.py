"""Cost of the low-bit QAT kinds: training-step time of BitNet b1.58 DiT and TerDiT W1.58A8 as ratios to TerDiT's,
and packed sampling time with int8 activations (W1.58A8 on the W2A8 path) against bf16 ones (W1.58A16). Prints JSON.

    python benchmarks/lowbit_qat.py           # the demo model and batch (configs/demo.py): ~5 min on a busy 2-core VM
    python benchmarks/lowbit_qat.py --tiny    # 1 block, few steps (the test suite runs it; mostly compile time)

Training: the demo config built three ways (`KINDS`: the overrides each row of the study uses), every step
compiled first, then timed in interleaved rounds (each round runs `--steps` steps of every kind in turn, the order
rotating from round to round), so a change in the machine's load during the run hits all kinds alike. Reported
per kind: the median and the minimum over rounds of the time per step, and their ratios to TerDiT's (the TerDiT
paper, §4.2: BitNet trains at 0.9× TerDiT's speed, i.e. a ratio of about 1.11); on a shared machine the minimum
is the less disturbed number. The batch is one fixed batch of real digits; every step's loss is reported too.

Sampling: the demo's sampler (DDIM, 50 steps, CFG 4.0, the 80-image grid in one batch) from the packed export of
a TerDiT W1.58A8 model at initialisation (the codes' values do not change the time), once with int8 activations
and once with bf16 ones, the adaLN of all blocks fused, on the XLA fallback (`model.packed_backend=xla`) and, on a
GPU, on the kernel that `auto` picks there; "not measured" where there is no GPU. Median over `--repeats` timed
samplings (the two variants alternating) after one compiling sampling each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

NOT_MEASURED = "not measured"
# kind → model overrides on configs/demo.py (the study's rows "TerDiT", "BitNet b1.58 DiT", "TerDiT W1.58A8").
KINDS = {
    "ternary": {},
    "bitnet": {"linear": "bitnet", "act_bits": 8, "pre_norms": False, "adaln_norm": False},
    "ternary_act8": {"act_bits": 8},
}
TINY_MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2}


def demo_config(kind: str, tiny: bool, batch: int | None):
    from configs.demo import get_config
    from terdit_jax.config import finalize
    c = get_config()
    c.model.update(KINDS[kind])
    if tiny:  # and no warmup, so that a few steps on the fixed batch already lower the loss (a test checks it)
        c.model.update(TINY_MODEL)
        c.train.warmup_steps = 0
    if batch:
        c.train.batch_size = batch
    return finalize(c)


def time_training(a) -> dict:
    from terdit_jax import parallel, train as T
    from terdit_jax.data.digits import DigitBatches

    runs = {}
    for kind in KINDS:
        c = demo_config(kind, a.tiny, a.batch)
        mesh = parallel.create_mesh(c)
        apply, state = T.init_state(c, mesh)
        batch = parallel.global_batch(DigitBatches(c.train.batch_size, 0).batch(0), mesh, c.train.batch_size)
        step = T.make_train_step(apply, c, mesh)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(state)
        runs[kind] = {"step": step, "state": state, "batch": batch, "compile_s": time.perf_counter() - t0,
                      "rounds": [], "loss": [float(m["loss"])]}
    order = list(runs)
    for i in range(a.rounds):
        for kind in order[i % len(order):] + order[:i % len(order)]:  # rotated, so no kind always runs first
            r = runs[kind]
            state, losses = r["state"], []
            t0 = time.perf_counter()
            for _ in range(a.steps):
                state, m = r["step"](state, r["batch"])
                losses.append(m["loss"])  # read after the round: a host sync per step would be timed too
            jax.block_until_ready(state)
            r["rounds"].append((time.perf_counter() - t0) / a.steps)
            r["state"] = state
            r["loss"] += [float(x) for x in losses]
    out = {kind: {"overrides": KINDS[kind], "step_s": round(float(np.median(r["rounds"])), 5),
                  "step_s_min": round(float(np.min(r["rounds"])), 5),
                  "round_step_s": [round(x, 5) for x in r["rounds"]], "compile_s": round(r["compile_s"], 2),
                  "loss": [round(x, 5) for x in r["loss"]]} for kind, r in runs.items()}
    base, base_min = out["ternary"]["step_s"], out["ternary"]["step_s_min"]
    return {"batch_size": int(runs["ternary"]["batch"]["x"].shape[0]), "steps_per_round": a.steps,
            "rounds": a.rounds, "kinds": out,
            "ratio_over_ternary": {k: round(v["step_s"] / base, 4) for k, v in out.items() if k != "ternary"},
            "ratio_over_ternary_min": {k: round(v["step_s_min"] / base_min, 4) for k, v in out.items()
                                       if k != "ternary"}}


def _packed_sampler(c, act_dtype: str, backend: str):
    """(apply, params) of the fused packed model of config `c` (a W1.58A8 QAT config) with the given matmul settings."""
    from flax import nnx
    from terdit_jax import export
    from terdit_jax.model_fn import init_model, split_packed
    from terdit_jax.models import packed as packed_lib

    _, params = init_model(c.model, 0)
    pcfg = export.packed_model_config(c.model)
    graphdef, _ = export.abstract_packed(pcfg)
    model = nnx.merge(graphdef, export.pack_state(params, c.model))
    packed_lib.configure_packed(model, act_dtype, backend)
    return split_packed(model, fuse=True)


def time_sampling(a, backend: str) -> dict:
    from terdit_jax.diffusion.gaussian import create_diffusion
    from terdit_jax.diffusion.samplers import sample
    from terdit_jax.model_fn import bind

    c = demo_config("ternary_act8", a.tiny, None)
    s, m = c.sample, c.model
    steps = a.sample_steps or int(s.num_steps)
    n = a.images or int(s.batch_size)
    diffusion = create_diffusion(str(steps), c.diffusion.num_timesteps, m.prediction)
    shape = (n, m.input_size, m.input_size, m.in_channels)
    y = jnp.arange(n, dtype=jnp.int32) % m.num_classes
    variants = {"w158a16_bf16": "bf16", "w158a8_int8": "int8"}
    fns, out = {}, {"sampler": s.sampler, "num_steps": steps, "cfg_scale": float(s.cfg_scale), "images": n}
    for name, act in variants.items():
        apply, params = _packed_sampler(c, act, backend)
        fns[name] = lambda seed, apply=apply, params=params: jax.block_until_ready(sample(
            bind(apply, params), diffusion, shape, jax.random.key(seed), y, sampler=s.sampler,
            cfg_scale=float(s.cfg_scale), null_y=m.num_classes, guidance_channels=s.cfg_channels))
        t0 = time.perf_counter()
        fns[name](0)
        out[name] = {"first_call_s": round(time.perf_counter() - t0, 3), "times_s": []}
    for r in range(a.repeats):  # interleaved, as the training rounds
        for name, fn in fns.items():
            t0 = time.perf_counter()
            x = fn(r + 1)
            out[name]["times_s"].append(round(time.perf_counter() - t0, 4))
            out[name]["output_finite"] = bool(np.isfinite(np.asarray(x)).all())
    for name in variants:
        out[name]["time_s"] = round(float(np.median(out[name]["times_s"])), 4)
    out["ratio_a8_over_a16"] = round(out["w158a8_int8"]["time_s"] / out["w158a16_bf16"]["time_s"], 4)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="1 block of width 32, few steps: seconds on a CPU")
    p.add_argument("--steps", type=int, default=None, help="train steps per round (default 8; 10 with --tiny)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 12; 3 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the demo's 64; 8 with --tiny)")
    p.add_argument("--sample_steps", type=int, default=None, help="sampler steps (default: the demo's 50; 2 --tiny)")
    p.add_argument("--images", type=int, default=None, help="images per sampling (default: the demo's 80; 4 --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed samplings (default 5; 1 with --tiny)")
    a = p.parse_args(argv)
    tiny_defaults = dict(steps=10, rounds=3, batch=8, sample_steps=2, images=4, repeats=1)
    full_defaults = dict(steps=8, rounds=12, batch=None, sample_steps=None, images=None, repeats=5)
    for k, v in (tiny_defaults if a.tiny else full_defaults).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    on_gpu = jax.default_backend() == "gpu"
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
              "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": "configs/demo.py"
              + (f" with {TINY_MODEL}" if a.tiny else ""),
              "train": time_training(a),
              "packed_sampling": {"xla": time_sampling(a, "xla"),
                                  "kernel": time_sampling(a, "auto") if on_gpu else NOT_MEASURED}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
