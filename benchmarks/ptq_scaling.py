"""How PTQ's time and memory grow on DiT-XL/2 (width 1152, 16 heads, patch 2) at 256 and 512 px, measured with
random weights at reduced depth and calibration size, fitted and extrapolated to the official settings.

    python benchmarks/ptq_scaling.py --out runs/ptq_scaling [--methods rtn,ptq4dit,tqdit] [--sizes 256,512]
    python benchmarks/ptq_scaling.py --out /tmp/ptq_scaling --tiny     # the machinery at toy widths (the test)
    python benchmarks/ptq_scaling.py --out OUT --methods ptq4dit --sizes 512 --single 4,2 --recon_iters 50  # GPU suite

Every run is `--mode quantize` in its own process (so its host peak is its own) on random full-precision weights of
configs/dit_xl2_<size>.py with `depth` blocks, `calib_steps` × `latents` × {class, null} calibration entries, a
few reconstruction iterations (PTQ4DiT) and a small α grid (TQ-DiT); the quantize stages report seconds, peak
resident host bytes and the device's peak bytes (ptq/run.py `Stages`; not measured on a CPU). Per method and
size it runs (E1, 1), (E2, 1), (E3, 1), (E1, 2) in (entries, depth) and fits host peak = a + b·E + c·depth by
least squares on the three runs that determine it, reports the fourth-E check (how far the line misses E3: the
growth is linear when that is small) and extrapolates to the official settings: 28 blocks and the config's
calibration size (256 px: 25 steps × 32 latents × 2 = 1,600 entries; 512 px: 10 × 64 × 2 = 1,280). Below 64
entries the unit passes run in one padded batch, so the per-entry slope of small runs understates large ones, and
two depths do not show the growth in depth to be linear: the extrapolation is an estimate (README).

Times on a CPU say where the time goes, not what a GPU takes: per-unit reconstruction seconds per iteration and
per-layer search seconds are printed as measured, and the GPU suite's `ptq_512` stage runs this at 512 px on
the GPU (device peak, per-unit seconds). Prints one JSON object and writes it to <out>/ptq_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

OFFICIAL = {256: {"calib_steps": 25, "calib_latents": 32}, 512: {"calib_steps": 10, "calib_latents": 64}}
OFFICIAL_DEPTH = 28
GiB = 2 ** 30


def point_settings(tiny: bool) -> dict:
    """The reduced run: its model, sampler and method budgets (tiny: toy widths that test the machinery)."""
    model = {"dim": 64, "n_heads": 4} if tiny else {"dim": 1152, "n_heads": 16}
    return {"model": model, "num_steps": 4, "calib_steps": 2, "recon_iters": 3 if tiny else 5, "alpha_grid": 5,
            "search_rounds": 1, "sizes_px": {"256": 64, "512": 128} if tiny else {"256": 256, "512": 512}}


def points() -> list[tuple[int, int]]:
    """(latents per step, depth) of the four runs of a method and size."""
    return [(2, 1), (4, 1), (6, 1), (2, 2)]  # latents come in pairs (two per class and group)


# ------------------------------------------------------------------------------------- one run (a subprocess)

def one_run(spec: dict) -> dict:
    """Quantize random DiT-XL/2-shaped weights as `spec` says; returns the manifest's stages and unit times."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from terdit_jax.checkpoint import Checkpoints
    from terdit_jax.config import finalize
    from terdit_jax.model_fn import init_model
    from terdit_jax.ptq.run import run_quantize_mode
    from importlib import import_module

    c = import_module(f"terdit_jax.configs.dit_xl2_{spec['size']}").get_config()
    s = spec["settings"]
    c.model.update(name="custom", patch_size=2, n_layers=spec["depth"], **s["model"])
    c.data.image_size = s["sizes_px"][str(spec["size"])]
    c.sample.update(sampler="ddim", num_steps=s["num_steps"])
    c.quant.update(method=spec["method"], w_bits=8, a_bits=8, calib_steps=s["calib_steps"],
                   calib_latents=spec["latents"], recon_iters=s["recon_iters"], recon_batch_size=4,
                   alpha_grid=s["alpha_grid"], search_rounds=s["search_rounds"], time_groups=s["calib_steps"],
                   ho_batch_size=2)
    config = finalize(c)
    _, params = init_model(config.model, 0)
    rng = np.random.default_rng(0)
    leaves = []
    for path, var in nnx.to_flat_state(params):  # random weights: DiT's zero-initialised adaLN / final layer
        v = var.get_value()                      # would make every block the identity
        std = 1.0 / np.sqrt(v.shape[-2]) if v.ndim >= 2 else 0.02
        leaves.append((path, var.replace(jnp.asarray(std * rng.standard_normal(v.shape), v.dtype))))
    workdir = spec["workdir"]
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save_weights(0, nnx.from_flat_state(leaves), config.model, {"kind": "ptq_scaling"})
    ckpt.close()
    t0 = time.perf_counter()
    manifest = run_quantize_mode(config, workdir, overwrite=True, log=lambda *_: None)
    info = manifest["info"]
    units = info.get("units") or info.get("layers") or []
    return {"seconds": round(time.perf_counter() - t0, 2), "stages": manifest["stages"],
            "entries": int(s["calib_steps"] * spec["latents"] * 2), "platform": jax.devices()[0].platform,
            "units": [{k: u[k] for k in ("unit", "layer", "seconds") if k in u} for u in units]}


# --------------------------------------------------------------------------------------------- the benchmark

def run_point(method: str, size: int, latents: int, depth: int, settings: dict, out: str) -> dict:
    workdir = os.path.join(out, f"{method}_{size}_e{latents}_d{depth}")
    spec = {"method": method, "size": size, "latents": latents, "depth": depth, "settings": settings,
            "workdir": workdir}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"latents": latents, "depth": depth, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"latents": latents, "depth": depth, **json.loads(proc.stdout.strip().splitlines()[-1])}


def peak(run: dict, key: str = "host_peak_bytes") -> int | None:
    values = [s.get(key) for s in run["stages"].values() if isinstance(s.get(key), int)]
    return max(values) if values else None


def fit(runs: list[dict], size: int) -> dict:
    """host peak = a + b·E + c·depth from the runs at (E1, 1), (E2, 1), (E1, 2); the miss at (E3, 1); the
    official settings' extrapolation."""
    ok = [r for r in runs if "error" not in r]
    if len(ok) < 4:
        return {"host_peak_fit": "not measured (a run failed)"}
    (e1, e2, e3, d2) = ok
    x = np.array([[1, r["entries"], r["depth"]] for r in (e1, e2, d2)], np.float64)
    y = np.array([peak(r) for r in (e1, e2, d2)], np.float64)
    a, b, c = np.linalg.lstsq(x, y, rcond=None)[0]
    miss = peak(e3) - (a + b * e3["entries"] + c)
    off = OFFICIAL[size]
    entries = off["calib_steps"] * off["calib_latents"] * 2
    official_host = a + b * entries + c * OFFICIAL_DEPTH
    return {"per_entry_bytes": round(b), "per_block_bytes": round(c), "fixed_bytes": round(a),
            "linear_miss_at_E3_bytes": round(miss), "linear_miss_fraction": round(miss / peak(e3), 3),
            "official_entries": entries, "official_depth": OFFICIAL_DEPTH,
            "official_host_peak_gib": round(official_host / GiB, 1), "within_64_gib": bool(official_host < 64 * GiB)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the runs and ptq_scaling.json")
    p.add_argument("--methods", default="rtn,ptq4dit,tqdit")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--tiny", action="store_true", help="toy widths: checks the machinery (the test runs it)")
    p.add_argument("--single", help="LATENTS,DEPTH: one run per method and size, no fit (the GPU suite's stage)")
    p.add_argument("--recon_iters", type=int, help="PTQ4DiT reconstruction iterations per unit (default 5)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, as a JSON spec
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    if not args.out:
        p.error("--out is required")
    settings = point_settings(args.tiny)
    if args.recon_iters:
        settings["recon_iters"] = args.recon_iters
    grid = [tuple(map(int, args.single.split(",")))] if args.single else points()
    results = {"settings": settings, "tiny": args.tiny, "methods": {}}
    for method in args.methods.split(","):
        for size in map(int, args.sizes.split(",")):
            runs = []
            for latents, depth in grid:
                runs.append(run_point(method, size, latents, depth, settings, args.out))
                r = runs[-1]
                print(f"{method} {size}px E={r.get('entries')} depth={depth}: "
                      + (f"error {r['error']}" if "error" in r else
                         f"{r['seconds']:.0f} s, host peak {peak(r) / GiB:.2f} GiB"), file=sys.stderr)
            results["methods"][f"{method}_{size}"] = {"runs": runs, **({} if args.single else fit(runs, size))}
    results["platform"] = next((r["platform"] for m in results["methods"].values() for r in m["runs"]
                                if "platform" in r), "not measured")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ptq_scaling.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
