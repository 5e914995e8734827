"""The benchmark scripts run and print the JSON their READMEs promise (tiny sizes; speeds are not checked)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_latent_throughput_reports_supply_and_the_8xh100_demand():
    out = run("latent_throughput.py", "--records", "64", "--steps", "2", "--workers", "0", "--batch", "16",
              "--image_size", "64")
    assert out["best_latents_per_s_per_host"] > 0 and out["moments_shape"] == [2, 8, 8, 8]
    need = out["demand_8xH100_4b"]
    # 4.2B at 64 px (8×8 latents, 16 tokens): 6 · (32 · 16 · (4·3072² + 3·3072·8192) + ...) FLOPs per image
    assert 0.3 < need["train_tflop_per_image"] < 0.5 and need["latents_per_s"] > 0
    assert abs(out["supply_over_demand"] - out["best_latents_per_s_per_host"] / need["latents_per_s"]) < 0.01
