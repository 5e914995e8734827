"""The benchmark scripts run and print the JSON their READMEs promise (tiny sizes; speeds are not checked)."""
import json
import os
import subprocess
import sys

import pytest

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


def test_ptq_scaling_fit_recovers_a_known_linear_growth_and_its_miss():
    """The fit against peaks made from a known a + b·E + c·depth (and one off the line by a known amount)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ptq_scaling

    a, b, c = 1.0e9, 3.0e6, 2.0e8

    def run_at(entries, depth, off=0):
        return {"entries": entries, "depth": depth, "stages": {
            "s1": {"host_peak_bytes": int(a / 2)}, "s2": {"host_peak_bytes": int(a + b * entries + c * depth + off),
                                                          "device_peak_bytes": "not measured"}}}
    got = ptq_scaling.fit([run_at(8, 1), run_at(16, 1), run_at(24, 1, off=5e7), run_at(8, 2)], 512)
    assert abs(got["per_entry_bytes"] - b) < 2 and abs(got["per_block_bytes"] - c) < 2
    assert abs(got["linear_miss_at_E3_bytes"] - 5e7) < 2
    assert got["official_entries"] == 10 * 64 * 2
    want = (a + b * 1280 + c * 28) / 2 ** 30
    assert abs(got["official_host_peak_gib"] - want) < 0.06 and got["within_64_gib"] == (want < 64)
    assert "not measured" in ptq_scaling.fit([run_at(8, 1), {"error": ["boom"]}], 512)["host_peak_fit"]


@pytest.mark.slow
def test_cpu_eigen_compares_the_same_programs_compiled_three_ways():
    """The CPU settings change how XLA compiles (TERDIT_CPU_EIGEN=1: no YNNPACK fusions; the default: no YNNPACK
    convolutions, which XLA's own settings make), and not what it computes: every variant agrees with the default."""
    out = run("cpu_eigen.py", "--quick", "--rounds", "1")
    assert set(out["workloads"]) == {"dit_forward", "train_step", "vae_decode"}
    for name, w in out["workloads"].items():
        assert all(d <= out["tolerance"] for d in w["max_rel_diff"].values()), name
        n = {v: t["ynn_fusions"] for v, t in w["times"].items()}
        assert n["eigen"] == 0 < n["default"] <= n["xla_own"], (name, n)
        assert w["ratio"]["default/eigen"] > 0 and w["ratio"]["default/xla_own"] > 0
    vae = {v: t["ynn_fusions"] for v, t in out["workloads"]["vae_decode"]["times"].items()}
    assert vae["default"] < vae["xla_own"], vae  # the convolutions
