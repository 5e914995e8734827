"""benchmarks/vs_diffusers.py: its --quick run compares both sides before timing them, and the comparison is
not vacuous (a perturbed weight of ours fails it, so the rows refuse to time different computations)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_diffusers.py")


def _load():
    spec = importlib.util.spec_from_file_location("vs_diffusers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


vs = _load()


def test_quick_run_agrees_within_tolerance_on_every_row_then_times_both_sides():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--repeats", "2"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["theirs"] == "measured" and out["machine"]["torch_threads"] == len(out["machine"]["cores_used"])
    assert list(out["rows"]) == list(vs.ROWS)
    for name, row in out["rows"].items():
        errs = row["max_rel_err"]
        assert errs and all(0 <= e <= vs.TOL for e in errs.values()), (name, errs)
        assert set(row["times"]) == {"ours", "torch_eager"} and list(row["ratio"]) == ["ours/torch_eager"]
        for v in row["times"].values():
            assert len(v["times_s"]) == 2 and v["median_s"] > 0
        assert row["ratio"]["ours/torch_eager"] == pytest.approx(
            row["times"]["ours"]["median_s"] / row["times"]["torch_eager"]["median_s"], rel=1e-2)
    assert set(out["rows"]["train"]["max_rel_err"]) == {"loss", "grad_qkv", "grad_fc1", "grad_adaLN", "grad_final"}
    assert set(out["rows"]["ddim"]["max_rel_err"]) == {"2_steps", "5_steps"}  # before; the timed samples after
    assert set(out["rows"]["gemm"]["max_rel_err"]) == {"forward", "grad_input", "grad_weight"}
    assert out["rows"]["vae"]["memory"]["ours_compiled"]["total"] > 0


@pytest.mark.parametrize("row", ["dit_cfg", "vae"])
def test_a_perturbed_weight_of_ours_is_refused_before_timing(row, monkeypatch):
    """The same row with one of our weights moved by 1e-3 of its largest entry: AgreementError, nothing timed."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    timed_anything = []
    monkeypatch.setattr(vs, "alternate", lambda *a, **k: timed_anything.append(1))
    a = argparse.Namespace(perturb=1e-3, torch_compile=False, ddim_model=None, dev="cpu", why_not=None,
                           side=None)
    with pytest.raises(vs.AgreementError, match="differ by"):
        vs.ROW_FNS[row](vs.PRESETS["quick"], a)
    assert not timed_anything


def test_agree_measures_relative_to_the_reference_and_refuses_vacuous_comparisons():
    ref = np.array([[2.0, -4.0], [1.0, 0.5]])
    assert vs.agree("x", ref + 3e-4, ref) == pytest.approx(3e-4 / 4)
    with pytest.raises(vs.AgreementError, match=r"differ by 0\.00025"):
        vs.agree("x", ref + 1e-3, ref)
    with pytest.raises(vs.AgreementError, match="shapes differ"):
        vs.agree("x", ref[:1], ref)
    with pytest.raises(vs.AgreementError):  # an all-zero reference would make any output pass a relative check
        vs.agree("x", np.zeros(3), np.zeros(3))


def test_bad_arguments_are_one_error_line_and_exit_2():
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--rows", "dit_cfg,nope"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "nope" in r.stderr
    assert "\n" not in r.stderr.strip() and "dit_cfg, ddim, train, vae" in r.stderr


@pytest.mark.slow
def test_a_row_that_disagrees_is_not_timed_and_the_other_rows_still_are():
    """One disagreeing row must not cost the others (the GPU suite runs every row in one budgeted process)."""
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--repeats", "1", "--rows", "dit_cfg,gemm",
                        "--perturb", "1e-3"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1 and "rows dit_cfg: ours and diffusers disagree" in r.stderr, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    assert set(rows["dit_cfg"]) == {"error"} and "differ by" in rows["dit_cfg"]["error"]
    assert rows["gemm"]["times"]["ours"]["median_s"] > 0 and rows["gemm"]["times"]["torch_eager"]["median_s"] > 0


@pytest.mark.slow
def test_memory_runs_each_side_alone_and_ours_holds_at_least_the_step_arguments():
    """--memory: each side of a row alone in a fresh process; ours' peak holds at least what XLA says the training
    step's arguments take (the parameters and both AdamW moments, resident throughout), theirs' at least torch's
    parameters, gradients and two AdamW moments."""
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--repeats", "1", "--rows", "train", "--memory"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads(r.stdout.strip().splitlines()[-1])["rows"]["train"]
    peak, compiled = train["memory"]["process_peak_bytes"], train["memory"]["ours_compiled"]
    assert isinstance(peak["ours"], int) and isinstance(peak["theirs"], int), peak
    assert peak["ours"] >= compiled["argument"] > 0
    params_bytes = compiled["output"] // 3  # the step returns params and both moments (+ a scalar loss)
    assert peak["theirs"] >= 4 * params_bytes


def test_the_high_water_mark_sees_a_freed_allocation():
    base = vs.reset_peak_rss()
    a = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB, every page written, then returned to the kernel
    del a
    assert 60 * 2**20 <= vs.high_water_bytes() - base < 128 * 2**20
    assert vs.reset_peak_rss() == pytest.approx(vs.high_water_bytes(), rel=0.05)
