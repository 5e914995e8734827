"""The project's CPU XLA settings (terdit_jax/xla_defaults.py) against XLA's own, on the programs the project
runs: each workload is compiled twice in one process (`compiler_options` = the project's FLAGS, and XLA_OWN),
both outputs are checked to agree, then the two are timed alternately and the JSON gives the medians and
ratio = project / XLA's own (< 1: the project's settings are faster).

    python benchmarks/cpu_xla_defaults.py            # DiT-S/2 forward, DiT-B/2 training step, SD-VAE decode
    python benchmarks/cpu_xla_defaults.py --quick    # tiny shapes (seconds; the test suite runs it)

Workloads (float32; the shapes of benchmarks/vs_diffusers.py's rows):
  dit_forward  DiT-S/2 denoiser call on 16 latents of 32×32×4 (one CFG step of the ddim row)
  train_step   DiT-B/2 ε-MSE + AdamW step, batch 8 (the train row; the state is donated, one copy per variant)
  vae_decode   SD-VAE decode of 8 latents of 32×32×4 to 256 px (the vae row)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import terdit_jax  # noqa: E402,F401  (applies the project's XLA flags before JAX starts)
import vs_diffusers as vd  # noqa: E402

TOL = 1e-4  # max |project − XLA's own| / max |XLA's own|: the same computation, summed in another order


def _variants(fn, args, donate=()) -> dict:
    """name → compiled fn for the project's flags and XLA's own."""
    import jax
    from terdit_jax import xla_defaults
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    return {"project": lowered.compile(compiler_options=xla_defaults.FLAGS),
            "xla_own": lowered.compile(compiler_options=xla_defaults.XLA_OWN)}


def ynn_fusions(compiled) -> int:
    """YNNPACK fusions in a compiled program (0 under the project's flags: the check that the two differ)."""
    return compiled.as_text().count("__ynn_fusion")


def dit_forward(p) -> tuple[dict, dict]:
    import jax.numpy as jnp
    a = types.SimpleNamespace(dev=None, perturb=0.0)
    config, apply, params, _ = vd.build_dit(p.ddim_dit, p, a, seed=2)
    x, t, y = (np.concatenate([v, v]) for v in vd._inputs(p, config.model, seed=3))
    args = (params, *(jnp.asarray(v) for v in (x, t, y)))
    compiled = _variants(apply, args)
    return {k: (lambda c=c: c(*args)) for k, c in compiled.items()}, compiled


def train_step(p) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    import optax
    a = types.SimpleNamespace(dev=None, perturb=0.0)
    config, apply, params, _ = vd.build_dit(p.train_dit, p, a, seed=4)
    m = config.model
    x, t, y = vd._inputs(p, m, seed=5)
    eps = np.random.default_rng(6).standard_normal(x.shape, dtype=np.float32)
    tx = optax.adamw(1e-4, weight_decay=0.0)

    def step(params, opt, x, t, y, eps):
        loss, g = jax.value_and_grad(
            lambda w: jnp.mean(jnp.square(apply(w, x, t, y)[..., :m.in_channels] - eps)))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    batch = tuple(jnp.asarray(v) for v in (x, t, y, eps))
    compiled = _variants(step, (params, tx.init(params), *batch), donate=(0, 1))
    states = {k: [jax.tree.map(jnp.copy, params), tx.init(params)] for k in compiled}

    def run(k):
        s = states[k]
        s[0], s[1], loss = compiled[k](*s, *batch)
        return loss
    return {k: (lambda k=k: run(k)) for k in compiled}, compiled


def vae_decode(p) -> tuple[dict, dict]:
    import jax.numpy as jnp
    from flax import nnx
    from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig
    cfg = VAEConfig(**{k: v for k, v in p.vae.items() if k in ("block_out_channels", "layers_per_block",
                                                               "latent_channels", "norm_num_groups", "sample_size")})
    graphdef, state = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(7)))
    z = jnp.asarray(np.random.default_rng(8).standard_normal((p.batch, p.latent, p.latent, 4), dtype=np.float32))
    compiled = _variants(lambda s, z: nnx.merge(graphdef, s).decode(z), (state, z))
    return {k: (lambda c=c: c(state, z)) for k, c in compiled.items()}, compiled


WORKLOADS = {"dit_forward": dit_forward, "train_step": train_step, "vae_decode": vae_decode}
REPEATS = {"dit_forward": 5, "train_step": 3, "vae_decode": 2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of each (default: per workload)")
    a = ap.parse_args(argv)
    names = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        print(f"error: --workloads {a.workloads!r}: unknown {bad}; choose from {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    if a.repeats is not None and a.repeats < 1:
        print(f"error: --repeats {a.repeats}: need at least 1 timed repeat", file=sys.stderr)
        return 2
    import jax
    if jax.default_backend() != "cpu":
        print(f"error: these are CPU settings; JAX runs on {jax.default_backend()} here "
              "(set JAX_PLATFORMS=cpu)", file=sys.stderr)
        return 2
    from terdit_jax import xla_defaults
    p = vd.PRESETS["quick" if a.quick else "default"]
    report = {"benchmark": "cpu_xla_defaults", "preset": "quick" if a.quick else "default",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jax": jax.__version__,
              "cpu_count": len(os.sched_getaffinity(0)), "load_avg_1m_at_start": os.getloadavg()[0],
              "project_flags": xla_defaults.FLAGS, "xla_own": xla_defaults.XLA_OWN, "tolerance": TOL,
              "workloads": {}}
    for name in names:
        print(f"[cpu_xla_defaults] {name} ...", file=sys.stderr, flush=True)
        fns, compiled = WORKLOADS[name](p)
        outs = {k: np.asarray(jax.block_until_ready(f())) for k, f in fns.items()}  # untimed first call each
        err = vd.agree(name, outs["project"], outs["xla_own"], TOL)
        times = vd.alternate({k: (lambda f=f: jax.block_until_ready(f())) for k, f in fns.items()},
                             a.repeats or (3 if a.quick else REPEATS[name]))
        report["workloads"][name] = {"max_rel_diff": err, "ynn_fusions": {k: ynn_fusions(c) for k, c in compiled.items()},
                                     "times": times, "ratio": vd.ratios(times, "project")}
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
