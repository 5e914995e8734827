"""Latents/s one host reads from ArrayRecord latent shards through the training pipeline. Prints JSON.

Shards are made on the fly in a temp dir by ``extract_latents`` (random 256 px images, a random-moments
stand-in for the VAE), then ``make_train_iterator('latents', ...)`` is timed after a warm-up.

  python benchmarks/latent_throughput.py --records 4096 --batch 256 --workers 0,4
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from terdit_jax.data.latents import extract_latents
from terdit_jax.data.pipeline import make_train_iterator


class RandomImages:
    """n random uint8 (S, S, 3) images, made per index so nothing large sits in memory."""

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {"image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), "label": i % 1000}


def h100_demand(image_size: int, mfu: float) -> dict:
    """Latents/s one host of 8 H100s consumes training TerDiT-4.2B: 8 · peak · MFU / train FLOPs per image, with
    the analytic count of benchmarks/train_step.py (train FLOPs = 3 · 2 · forward MACs). An estimate at an assumed
    MFU, not a measured GPU step time."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import PEAK_BF16, train_macs_per_image
    from terdit_jax.config import base_config, finalize
    c = base_config()
    c.model.name, c.data.image_size = "DiT_Llama_3B_patch2", image_size
    flops = 6 * sum(train_macs_per_image(finalize(c).model).values())
    return {"latents_per_s": round(8 * PEAK_BF16["H100"] * mfu / flops, 1), "mfu_assumed": mfu,
            "train_tflop_per_image": round(flops / 1e12, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=4096)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="per-host batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", default="0,2", help="comma-separated grain worker counts to time")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--mfu", type=float, default=0.40, help="assumed MFU of the 8-H100 train step (the target)")
    a = p.parse_args()
    h = a.image_size // 8
    rng = np.random.default_rng(0)

    def encode(x):  # stands in for the VAE: only the shape matters for reading speed
        return rng.standard_normal((x.shape[0], h, h, 8), dtype=np.float32)

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        m = extract_latents(RandomImages(a.records, a.image_size), encode, d, image_size=a.image_size, batch_size=64,
                            records_per_shard=1024, dtype=a.dtype, progress=False)
        setup_s = time.perf_counter() - t
        shard_bytes = sum(os.path.getsize(os.path.join(d, s)) for s in m["shards"])
        results = []
        for w in (int(x) for x in a.workers.split(",")):
            it = make_train_iterator("latents", d, image_size=a.image_size, global_batch_size=a.batch, seed=0,
                                     process_index=0, process_count=1, workers=w)
            for _ in range(3):  # worker start-up and first reads
                next(it)
            t = time.perf_counter()
            for _ in range(a.steps):
                b = next(it)
            dt = time.perf_counter() - t
            assert b["moments"].shape == (a.batch, h, h, 8)
            results.append({"workers": w, "latents_per_s_per_host": round(a.steps * a.batch / dt, 1),
                            "batches_per_s": round(a.steps / dt, 2)})
    best = max(r["latents_per_s_per_host"] for r in results)
    need = h100_demand(a.image_size, a.mfu)
    print(json.dumps({"benchmark": "latent_throughput", "best_latents_per_s_per_host": best,
                      "demand_8xH100_4b": need, "supply_over_demand": round(best / need["latents_per_s"], 2), "records": a.records, "moments_shape": m["moments_shape"],
                      "dtype": a.dtype, "bytes_per_record": round(shard_bytes / m["num_records"]), "batch": a.batch,
                      "steps": a.steps, "setup_s": round(setup_s, 1), "cpus": os.cpu_count(),
                      "machine": platform.node() or platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
