"""terdit_jax's CPU settings (terdit_jax/xla_flags.py) against each other on the programs the project runs:
  default  what importing terdit_jax sets: YNNPACK dots and reductions, XLA's Eigen convolutions
  eigen    TERDIT_CPU_EIGEN=1: no YNNPACK, Eigen dots and convolutions
  xla_own  XLA's own fusion types (YNNPACK convolutions too), named in XLA_FLAGS so terdit_jax leaves them
The settings are process-wide (XLA reads XLA_FLAGS when its CPU client starts, and per-program compile options do
not reproduce everything they change), so each variant runs in its own worker processes: one per variant and
round, alternating (the order rotated every round). A worker builds every workload from the same seeds, compiles
it, makes one untimed call whose output the parent compares with the default's, then times --calls calls. The
JSON gives the medians over all rounds and ratio = default / variant (< 1: the default is faster).

    python benchmarks/cpu_eigen.py            # DiT-S/2 forward, DiT-B/2 training step, SD-VAE decode
    python benchmarks/cpu_eigen.py --quick    # tiny shapes (seconds; the test suite runs it)

Workloads (float32; the shapes of benchmarks/vs_diffusers.py's rows):
  dit_forward  DiT-S/2 denoiser call on 16 latents of 32×32×4 (one CFG step of the ddim row)
  train_step   DiT-B/2 ε-MSE + AdamW step, batch 8 (the train row; the state is donated, one copy per variant)
  vae_decode   SD-VAE decode of 8 latents of 32×32×4 to 256 px (the vae row)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vs_diffusers as vd  # noqa: E402

TOL = 1e-4  # max |variant − default| / max |default|: the same computation, summed in another order
XLA_OWN = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce,individual_convolution"
VARIANTS = {"default": {}, "eigen": {"TERDIT_CPU_EIGEN": "1"}, "xla_own": {"XLA_FLAGS": XLA_OWN}}


OURS = types.SimpleNamespace(dev=None, perturb=0.0, side="ours")  # vs_diffusers' rows for ours alone


def dit_forward(p):
    """→ (zero-argument call, compiled program)."""
    import jax
    import jax.numpy as jnp
    config, apply, params, _ = vd.build_dit(p.ddim_dit, p, OURS, seed=2)
    x, t, y = (np.concatenate([v, v]) for v in vd._inputs(p, config.model, seed=3))
    args = (params, *(jnp.asarray(v) for v in (x, t, y)))
    compiled = jax.jit(apply).lower(*args).compile()
    return lambda: compiled(*args), compiled


def train_step(p):
    import jax
    import jax.numpy as jnp
    _, _, params, _, (x, t, y, eps), _, step, tx = vd.train_problem(p, OURS)
    batch = tuple(jnp.asarray(v) for v in (x, t, y, eps))
    state = [params, tx.init(params)]
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, *batch).compile()

    def run():  # the first call's loss is the compared output (both variants start from the same state)
        state[0], state[1], loss = compiled(*state, *batch)
        return loss
    return run, compiled


def vae_decode(p):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig
    cfg = VAEConfig(**{k: v for k, v in p.vae.items() if k in ("block_out_channels", "layers_per_block",
                                                               "latent_channels", "norm_num_groups", "sample_size")})
    graphdef, state = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(7)))
    z = jnp.asarray(np.random.default_rng(8).standard_normal((p.batch, p.latent, p.latent, 4), dtype=np.float32))
    compiled = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, z).compile()
    return lambda: compiled(state, z), compiled


WORKLOADS = {"dit_forward": dit_forward, "train_step": train_step, "vae_decode": vae_decode}
CALLS = {"dit_forward": 3, "train_step": 2, "vae_decode": 1}  # timed calls per worker (default preset)


def worker(names: list[str], quick: bool, calls: dict, tmp: str, tag: str) -> None:
    """One variant of the workloads, in this process: saves each first call's output to tmp, prints JSON."""
    import jax  # (vs_diffusers imported terdit_jax first: its CPU flags are set)
    result = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in names:
        run, compiled = WORKLOADS[name](vd.PRESETS["quick" if quick else "default"])
        np.save(os.path.join(tmp, f"{name}_{tag}.npy"), np.asarray(jax.block_until_ready(run())))
        times = []
        for _ in range(calls[name]):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(round(time.perf_counter() - t0, 4))
        result[name] = {"times_s": times, "ynn_fusions": compiled.as_text().count("__ynn_fusion")}
    print(json.dumps(result))


def worker_env(variant: dict) -> dict:
    """This environment without the CPU settings' flags, then `variant`'s: each worker starts from what importing
    terdit_jax sets, and a variant's XLA_FLAGS are added to the user's other flags."""
    from terdit_jax import xla_flags
    env = {k: x for k, x in os.environ.items() if k != "TERDIT_CPU_EIGEN"}
    kept = [f for f in env.get("XLA_FLAGS", "").split() if f.split("=")[0].lstrip("-") not in xla_flags.CPU_EIGEN]
    return {**env, **variant, "XLA_FLAGS": " ".join(kept + variant.get("XLA_FLAGS", "").split())}


def measure(names: list[str], quick: bool, rounds: int, calls: dict, tmp: str) -> dict:
    """Alternating worker processes, one per variant and round, each running every workload."""
    runs, order = {v: [] for v in VARIANTS}, list(VARIANTS)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(names), "--worker_calls",
                   json.dumps(calls), "--tmp", tmp, "--tag", f"{v}_{r}", *(["--quick"] if quick else [])]
            done = subprocess.run(cmd, env=worker_env(VARIANTS[v]), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: the {v} worker failed:\n{done.stderr[-2000:]}")
            runs[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {}
    for name in names:
        outs = {v: np.load(os.path.join(tmp, f"{name}_{v}_0.npy")) for v in VARIANTS}
        times = {v: {"times_s": [t for w in ws for t in w[name]["times_s"]], "ynn_fusions": ws[0][name]["ynn_fusions"],
                     "xla_flags": ws[0]["xla_flags"]} for v, ws in runs.items()}
        for t in times.values():
            t["median_s"] = statistics.median(t["times_s"])
        report[name] = {"max_rel_diff": {v: vd.agree(f"{name} ({v})", outs[v], outs["default"], TOL)
                                         for v in VARIANTS if v != "default"},
                        "times": times, "ratio": vd.ratios(times, "default")}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--rounds", type=int, default=2, help="worker pairs per workload (alternating)")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per worker (default: per workload)")
    for hidden in ("--worker", "--worker_calls", "--tmp", "--tag"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker.split(","), a.quick, json.loads(a.worker_calls), a.tmp, a.tag)
        return 0
    names = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        print(f"error: --workloads {a.workloads!r}: unknown {bad}; choose from {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    if a.rounds < 1 or (a.calls is not None and a.calls < 1):
        print(f"error: --rounds {a.rounds} --calls {a.calls}: need at least 1 of each", file=sys.stderr)
        return 2
    import jax
    if jax.default_backend() != "cpu":
        print(f"error: these are CPU settings; JAX runs on {jax.default_backend()} here "
              "(set JAX_PLATFORMS=cpu)", file=sys.stderr)
        return 2
    from terdit_jax import xla_flags
    if not xla_flags._jaxlib_checked():  # XLA aborts on a fusion type it does not know
        print(f"error: the CPU settings were checked on jaxlib {xla_flags.JAXLIB} only", file=sys.stderr)
        return 2
    report = {"benchmark": "cpu_eigen", "preset": "quick" if a.quick else "default",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jax": jax.__version__,
              "cpu_count": len(os.sched_getaffinity(0)), "load_avg_1m_at_start": os.getloadavg()[0],
              "flags": {"default": xla_flags.CPU_NO_YNN_CONV, "eigen": xla_flags.CPU_EIGEN, "xla_own": XLA_OWN},
              "tolerance": TOL, "workloads": {}}
    calls = {n: a.calls or (1 if a.quick else CALLS[n]) for n in names}
    print(f"[cpu_eigen] {', '.join(names)}: {a.rounds} round(s) of {len(VARIANTS)} worker processes ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["workloads"] = measure(names, a.quick, a.rounds, calls, tmp)
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
