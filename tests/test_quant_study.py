"""benchmarks/quant_study.py: the same-noise guarantee and the verdict logic (fast), and `--quick` end to end (the
machinery, not the numbers) on one row of every kind in both families, two seeds: the FP row (training seeds; the
QAT rows train through the same code with other linear kinds) and its noise floor, PTQ4DiT on Large-DiT and TQ-DiT
on the original DiT (the two calibration paths; RTN differs from these only in settings its own tests cover): one
result per job, the table, the guidance sweeps, the verdicts, the plots, a grid per job, and a second call that
recomputes nothing. Under 2 minutes on the 2-core VM."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_parallel import CACHE, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import quant_study as qs  # noqa: E402


def _random_model(config, seed):
    """A model whose zero-initialised layers (adaLN-zero, final layer) are not zero, so its outputs are not."""
    import jax
    from terdit_jax.model_fn import init_model

    apply, params = init_model(config.model, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return apply, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                            for x, k in zip(leaves, keys)])


def test_rows_of_one_model_with_one_seed_sample_identical_digits():
    configs = [qs.study_config(qs.ROW_BY_NAME[n], 0, True, 2.0) for n in ("RTN W8A8", "TQ-DiT W6A6", "FP (DiT)")]
    (x_T, labels), *others = [qs.study_noise(c, 0) for c in configs]
    for x, y in others:  # every row, of either family, starts from the same noises and labels
        np.testing.assert_array_equal(x, x_T)
        np.testing.assert_array_equal(y, labels)
    assert not np.array_equal(qs.study_noise(configs[0], 1)[0], x_T)
    c = configs[0]
    apply, params = _random_model(c, 0)
    first = qs.draw(apply, params, c, x_T, labels, 2.0)
    c.sample.batch_size = 7  # other batches, and a trajectory recorded on the way, change nothing
    states = []
    again = qs.draw(apply, params, c, x_T, labels, 2.0, on_step=lambda k, x: states.append(k))
    np.testing.assert_array_equal(first, again)
    assert len(states) == c.sample.num_steps * 3
    other = qs.draw(apply, params, c, qs.study_noise(c, 1)[0], labels, 2.0)
    assert not np.array_equal(first, other)


def test_denoiser_error_along_the_trajectory_is_zero_for_the_model_itself():
    from terdit_jax.eval import fidelity
    c = qs.study_config(qs.ROW_BY_NAME["FP"], 0, True, 2.0)
    apply, params = _random_model(c, 0)
    x_T, labels = qs.study_noise(c, 0)
    states, steps = [], []
    qs.draw(apply, params, c, x_T[:4], labels[:4], 2.0, on_step=lambda k, x: (states.append(np.asarray(x)),
                                                                               steps.append(k)))
    fn = qs.guided(apply, params, c, 2.0)
    ref = qs.denoiser_outputs(fn, c, np.stack(states), np.asarray(steps), labels[:4])
    assert ref.shape == (c.sample.num_steps, 4, 28, 28, 1)
    np.testing.assert_array_equal(fidelity.relative_error(ref, ref), 0.0)
    other = qs.guided(*_random_model(c, 1), c, 2.0)  # another model's error is not
    assert np.all(fidelity.relative_error(qs.denoiser_outputs(other, c, np.stack(states), np.asarray(steps),
                                                                labels[:4]), ref) > 0.01)


@pytest.mark.parametrize("a, b, floor, kind, lower, tol, expected", [
    ((10.0, 0.1), (10.4, 0.1), 1.0, "better", True, 0, "within noise"),   # inside the floor: not "holds"
    ((10.0, 2.0), (13.0, 2.0), 1.0, "better", True, 0, "within noise"),   # past the floor, intervals overlap
    ((10.0, 0.1), (13.0, 0.1), 1.0, "better", True, 0, "holds"),
    ((13.0, 0.1), (10.0, 0.1), 1.0, "better", True, 0, "does not hold"),
    ((0.9, 0.01), (0.7, 0.01), 0.0, "better", False, 0, "holds"),         # higher is better
    ((10.5, 0.0), (10.0, 0.0), 1.0, "close", True, 0, "holds"),
    ((15.0, 0.1), (10.0, 0.1), 1.0, "close", True, 0.1, "does not hold"),
    ((10.8, 0.0), (10.0, 0.0), 0.1, "close", True, 0.1, "holds"),         # within the 10% tolerance
])
def test_decide(a, b, floor, kind, lower, tol, expected):
    assert qs.decide(qs.Stat(*a, 3), qs.Stat(*b, 3), kind, floor, lower, tol) == expected


def test_verdicts_from_constructed_results():
    def res(row, seed, **metrics):
        return {"row": row, "seed": seed, **metrics}

    results = [res("FP", 0, fid=50.0), res("FP, noise seed 1", 0, fid=52.0, fid_to_fp=5.0),
               *(res("TerDiT", s, fid=v) for s, v in enumerate((60.0, 61.0, 62.0))),
               res("BitNet b1.58 DiT", 0, fid=63.5),
               *(res("PTQ4DiT W4A8", s, fid_to_fp=v) for s, v in enumerate((2.0, 2.2, 2.4))),
               *(res("RTN W4A8", s, fid_to_fp=v) for s, v in enumerate((4.0, 4.1, 4.2))),
               *(res("RTN W8A8", s, fid_to_fp=v) for s, v in enumerate((0.1, 0.2, 0.3))),
               *(res("TQ-DiT W8A8", s, fid_to_fp=v) for s, v in enumerate((6.0, 6.1, 6.2))),
               *(res("TQ-DiT W6A6", s, fid_to_fp=v) for s, v in enumerate((2.0, 3.0, 4.0))),
               *(res("RTN W6A6", s, fid_to_fp=v) for s, v in enumerate((3.5, 3.6, 3.7)))]
    stats = qs.aggregate(results)
    assert stats["RTN W4A8"]["fid_to_fp"].mean == pytest.approx(np.mean([4.0, 4.1, 4.2]))
    assert stats["RTN W4A8"]["fid_to_fp"].std == pytest.approx(np.std([4.0, 4.1, 4.2]))
    assert qs.noise_floors(stats) == {"": 0.0, "real": 2.0, "fp": 5.0}
    by_claim = {v["claim"]: v["verdict"] for v in qs.verdicts(stats)}
    # BitNet 2.5 above TerDiT: past the floor (2.0) and the intervals (0.82 + 0) → holds; 1.0 above: inside the floor
    assert by_claim["BitNet worse than TerDiT (CNN-FID)"] == "holds"
    results[5]["fid"] = 62.0
    assert {v["claim"]: v["verdict"] for v in qs.verdicts(qs.aggregate(results))}[
        "BitNet worse than TerDiT (CNN-FID)"] == "within noise"
    # paired FID-to-FP: separated seed intervals decide; overlapping ones are within noise
    assert by_claim["PTQ4DiT ahead of RTN at W4A8 (FID-to-FP)"] == "holds"
    assert by_claim["TQ-DiT ahead of RTN at W6A6 (FID-to-FP)"] == "within noise"
    # "within noise of FP": below the FP-resample floor (5.0) holds, above it does not
    assert by_claim["RTN W8A8 within noise of FP (FID-to-FP)"] == "holds"
    assert by_claim["TQ-DiT W8A8 within noise of FP (FID-to-FP)"] == "does not hold"
    assert by_claim["TerDiT close to FP (CNN-FID within the floor or 10%)"] == "does not hold"  # 61 vs 50
    assert by_claim["PTQ4DiT W8A8 within noise of FP (FID-to-FP)"] == "not measured"
    md = qs.verdict_table(qs.verdicts(stats))
    assert "**within noise**" in md and "PTQ4DiT W4A8: 2.2 ± 0.163" in md


def test_unknown_row_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        qs.main(["--out", "unused", "--rows", "fp,nonsense"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unknown rows ['nonsense']")


@pytest.mark.slow
@pytest.mark.slow
def test_quick_study_writes_every_row_and_resumes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    slugs = ["fp", "fp_noise_seed_1", "ptq4dit_w4a8", "tq_dit_w6a6_dit"]
    rows = [r for r in qs.ROWS if r.slug in slugs]
    assert len(rows) == len(slugs)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "quant_study.py"), "--out", str(tmp_path), "--quick",
           "--seeds", "2", "--rows", ",".join(slugs)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    jobs = [(r.name, s) for r in rows for s in qs.row_seeds(r, 2)]
    assert [(r["row"], r["seed"]) for r in results["rows"]] == jobs
    assert {s["family"] for s in results["guidance_sweeps"]} == {"large_dit", "dit"}
    for r in results["rows"]:
        assert 0 <= r["class_accuracy"] <= 1 and r["fid"] >= 0 and 0 <= r["precision"] <= 1
        assert r["deployed_bytes"] > 0 and r["bits"].startswith("W")
        assert r["guidance"] == next(s["best"] for s in results["guidance_sweeps"] if s["family"] == r["family"])
        slug = qs.ROW_BY_NAME[r["row"]].slug
        assert os.path.exists(tmp_path / "rows" / f"{slug}_seed{r['seed']}" / "grid.png")
    for r in results["rows"]:
        if r["group"] == "PTQ":
            assert r["fid_to_fp"] >= 0 and r["psnr"] > 0 and 0 <= r["class_agreement"] <= 1
            assert len(r["step_error"]) == 4 and all(e >= 0 for e in r["step_error"])
    floor = next(r for r in results["rows"] if r["row"] == "FP, noise seed 1")
    assert floor["noise_seed"] == 1 and floor["fid_to_fp"] > 0
    md = open(tmp_path / "results.md").read()
    assert all(f"| {r.name} |" in md for r in rows) and "Verdicts" in md and " ± " in md
    assert len(results["verdicts"]) == len(qs.claims())
    for plot in ("loss_curves", "pareto", "step_error"):
        assert results[plot] is None or os.path.getsize(tmp_path / f"{plot}.png") > 0
    again = subprocess.run(cmd[:-1] + ["fp,tq_dit_w6a6_dit"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] training" not in again.stdout and "] quantizing" not in again.stdout  # resumed: nothing recomputed
    assert "sampling" not in again.stdout


def test_estimate_uses_measured_jobs_before_priors(tmp_path):
    fp, rtn, dit_rtn = qs.ROW_BY_NAME["FP"], qs.ROW_BY_NAME["RTN W8A8"], qs.ROW_BY_NAME["RTN W8A8 (DiT)"]
    jobs = [(fp, 0), (fp, 1), (rtn, 0), (dit_rtn, 0)]
    p = qs.PRIOR_SECONDS
    sweep = len(qs.GUIDANCES) * p["sample"]
    expected = 100.0 + 2 * (p["rtn"] + p["sample"]) + 2 * sweep + p["train fp dit"]  # DiT's FP is no job: trained
    assert qs.estimate_seconds(jobs, {(fp, 0): {"wall_seconds": 100.0}}, str(tmp_path)) == pytest.approx(expected)
    (tmp_path / "guidance_large_dit.json").write_text("{}")  # swept already
    done = {(fp, 0): {"wall_seconds": 100.0}, (rtn, 0): {"wall_seconds": 30.0}}
    assert qs.estimate_seconds(jobs, done, str(tmp_path)) == pytest.approx(100.0 + 30.0 + sweep + p["train fp dit"])


def test_another_reconstruction_budget_gets_its_own_models_and_row_folders(tmp_path, capsys):
    """A PTQ job at --recon_iters 20000 must neither read back nor overwrite the study's 2,000-iteration one."""
    row, fp = qs.ROW_BY_NAME["PTQ4DiT W4A8"], qs.ROW_BY_NAME["FP"]
    ours, paper = (qs.study_config(row, 1, False, 1.5, n).quant for n in (qs.STUDY_RECON_ITERS, 20000))
    assert (ours.recon_iters, ours.name) == (2000, "ptq4dit_w4a8_s1")
    assert (paper.recon_iters, paper.name) == (20000, "ptq4dit_w4a8_s1_r20000")
    assert qs.job_dir("o", row, 1) == os.path.join("o", "rows", "ptq4dit_w4a8_seed1")
    assert qs.job_dir("o", row, 1, 20000) == os.path.join("o", "rows", "ptq4dit_w4a8_seed1_r20000")
    assert qs.job_dir("o", fp, 0, 20000) == os.path.join("o", "rows", "fp_seed0")  # training rows: no budget
    with pytest.raises(SystemExit) as e:
        qs.main(["--out", str(tmp_path), "--recon_iters", "0"])
    assert e.value.code == 2 and "error: --recon_iters 0" in capsys.readouterr().err


def test_release_drops_models_and_compiled_programs_only_near_the_mapping_limit(monkeypatch):
    import jax
    study = qs.Study.__new__(qs.Study)
    study._models = {"a": 1}
    assert 0 < qs.mappings_used() < 1  # this process, on Linux
    compiled = jax.jit(lambda x: x + 1)
    compiled(1.0)
    assert compiled._cache_size() == 1
    assert not study.release() and study._models and compiled._cache_size() == 1  # far below: kept
    monkeypatch.setattr(qs, "mappings_used", lambda: 0.6)
    assert study.release() and not study._models and compiled._cache_size() == 0
