"""benchmarks/quant_study.py --quick (the machinery, not the numbers) on one row of every kind — the FP row and its
second sampling seed, TerDiT (training), PTQ4DiT and TQ-DiT (the two calibration paths; RTN, BitNet and W1.58A8
differ from these only in settings their own tests cover; every row of the study at this budget takes several
minutes on the 2-core VM, mostly XLA compiles): one result per row, the table, the loss curves, a grid per row,
and a second call that recomputes nothing."""
import json
import os
import subprocess
import sys

import pytest

from test_parallel import CACHE, ROOT

pytestmark = pytest.mark.slow


def test_quick_study_writes_every_row_and_resumes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from quant_study import ROWS

    slugs = ["fp", "fp_sampling_seed_1", "terdit", "ptq4dit_w4a8", "tq_dit_w6a6"]
    rows = [r.name for r in ROWS if r.slug in slugs]
    assert len(rows) == len(slugs)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "quant_study.py"), "--out", str(tmp_path), "--quick",
           "--rows", ",".join(slugs)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert [r["row"] for r in results["rows"]] == [r.name for r in ROWS if r.name in rows]
    for r in results["rows"]:
        assert 0 <= r["class_accuracy"] <= 1 and r["fid"] >= 0 and 0 <= r["precision"] <= 1
        assert r["deployed_bytes"] > 0 and r["bits"].startswith("W")
        assert os.path.exists(tmp_path / "rows" / f"{next(x.slug for x in ROWS if x.name == r['row'])}_seed0" / "grid.png")
    md = open(tmp_path / "results.md").read()
    assert all(f"| {name} |" in md for name in rows) and "noise floor" in md
    assert results["loss_curves"] is None or os.path.getsize(tmp_path / "loss_curves.png") > 0
    fp, ptq4 = (next(r for r in results["rows"] if r["row"] == name) for name in ("FP", "PTQ4DiT W4A8"))
    assert fp["bits"] == "W32A32" and ptq4["deployed_bytes"] < fp["deployed_bytes"]
    again = subprocess.run(cmd[:-1] + ["fp,tq_dit_w6a6"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] training" not in again.stdout and "] quantizing" not in again.stdout  # resumed: nothing recomputed
