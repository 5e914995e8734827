"""The quantize flow through the command line: names that are paths, damaged caches and resume points, SIGTERM,
resume bookkeeping, the architecture taken from the checkpoint, evaluation samples that belong to the model that
made them, and sample file names. One tiny full-precision workdir (random weights) serves every test."""
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CACHE
from terdit_jax.checkpoint import Checkpoints
from terdit_jax.config import ConfigError, finalize
from terdit_jax.model_fn import init_model
from terdit_jax.ptq import checkpoint as qckpt
from terdit_jax.ptq.calibration import CalibSet
from terdit_jax.ptq.run import Job, QuantizeError, run_quantize_mode, settings_of
from test_ptq import randomised

# The 2-block FP Large-DiT of test_ptq.pixel_config on 8×8×1 pixels, with test_ptq.quick's settings.
TINY = '''from terdit_jax.config import base_config


def get_config():
    c = base_config()
    c.model.update(name="custom", dim=32, n_layers=2, n_heads=4, multiple_of=16, patch_size=2, in_channels=1,
                   num_classes=10, dtype="float32", linear="fp")
    c.data.update(kind="digits", image_size=8, latent=False)
    c.sample.update(num_steps=4, sampler="ddim", batch_size=8, classes="1,2", per_class=1)
    c.quant.update(calib_steps=2, calib_latents=4, recon_iters=5, recon_batch_size=8)
    c.eval.update(num_samples=4, batch_size=8)
    return c
'''


@pytest.fixture(scope="module")
def fp_workdir(tmp_path_factory):
    """(config file, workdir holding random FP weights of its model as a weights-only checkpoint at step 0)."""
    root = tmp_path_factory.mktemp("quant_cli")
    cfg_file = str(root / "tiny.py")
    with open(cfg_file, "w") as f:
        f.write(TINY)
    config = finalize(runpy.run_path(cfg_file)["get_config"]())
    _, params = init_model(config.model, 0)
    workdir = str(root / "fp")
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save_weights(0, randomised(params), config.model, {"kind": "test"})
    ckpt.close()
    return cfg_file, workdir


def config_of(cfg_file: str, **quant):
    config = finalize(runpy.run_path(cfg_file)["get_config"]())
    config.quant.update(quant)
    return config


def cli_args(cfg_file, workdir, *args):
    return [sys.executable, "-m", "terdit_jax.main", "--config", cfg_file, "--workdir", workdir, *args]


# the suite's compile cache of this worker, so that the CLI runs share compiled programs
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def cli(cfg_file, workdir, *args):
    return subprocess.run(cli_args(cfg_file, workdir, *args), capture_output=True, text=True, env=ENV, timeout=300)


def one_error_line(r, expect: str):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert any(line.startswith("error: ") and expect in line for line in lines), r.stderr


def tree_state(path: str) -> dict:
    """{relative path: (size, mtime)} of every file under `path`."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_a_model_name_that_is_a_path_is_refused_and_nothing_is_touched(fp_workdir):
    cfg_file, workdir = fp_workdir
    before = tree_state(workdir)
    r = cli(cfg_file, workdir, "--mode", "quantize", "--config.quant.method=rtn", "--config.quant.name=../checkpoints")
    one_error_line(r, "config.quant.name: '../checkpoints' is not a name")
    assert tree_state(workdir) == before  # the checkpoints are untouched and nothing was created
    for field, bad in [("quant.name", "/tmp"), ("quant.name", ".."), ("quant.name", "a/b"), ("quant.name", "m.partial"),
                       ("sample.quantized", "../checkpoints")]:
        c = config_of(cfg_file)
        section, key = field.split(".")
        c[section][key] = bad
        with pytest.raises(ConfigError, match=f"config.{field}: .* is not a name"):
            finalize(c)
    finalize(config_of(cfg_file, name="ptq4dit_w4a8-fast.2"))  # a name is fine


@pytest.mark.parametrize("args,expect", [
    (["--mode", "quantize", "--config.quant.method=ptq4dit", "--config.quant.recon_iters=0"],
     "config.quant.recon_iters: 0 must be positive"),
    (["--mode", "sample", "--config.sample.quantized=x", "--config.sample.packed_path=/tmp/p"],
     "both name a model to sample; set one of them"),
    (["--mode", "quantize", "--config.quant.method=rtn", "--config.quant.calib_path={cfg_file}"],
     "is not a readable calibration set"),
])
def test_bad_settings_end_in_one_error_line(fp_workdir, args, expect):
    cfg_file, workdir = fp_workdir
    one_error_line(cli(cfg_file, workdir, *[a.format(cfg_file=cfg_file) for a in args]), expect)


@pytest.mark.slow
def test_quantize_rebuilds_a_truncated_cached_calibration_set_and_takes_the_checkpoints_architecture(fp_workdir):
    """A truncated cache is named and rebuilt; a config that forgot model.linear=fp is told the checkpoint's
    architecture wins; the model's folder gets the permissions of a plain mkdir."""
    cfg_file, workdir = fp_workdir
    run_quantize_mode(config_of(cfg_file, method="rtn", name="rtn_cache"), workdir, log=lambda *_: None)
    cache = [os.path.join(workdir, "quantized", f) for f in os.listdir(os.path.join(workdir, "quantized"))
             if f.startswith("calibration_")]
    assert len(cache) == 1
    with open(cache[0], "r+b") as f:
        f.truncate(os.path.getsize(cache[0]) // 2)
    r = cli(cfg_file, workdir, "--mode", "quantize", "--config.quant.method=rtn", "--config.quant.name=rtn_again",
            "--config.model.linear=ternary")
    assert r.returncode == 0, r.stderr
    assert f"{cache[0]} is not a readable calibration set" in r.stdout and "recording it again" in r.stdout
    assert len(CalibSet.load(cache[0])) == 16  # rebuilt in place
    note = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "checkpoint step 0" in note[0] and "model.linear='fp' (config: 'ternary')" in note[0]
    out = qckpt.model_dir(workdir, "rtn_again")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_a_resume_point_of_other_settings_is_kept_and_a_truncated_one_is_said_and_started_over(fp_workdir):
    cfg_file, workdir = fp_workdir
    partial = qckpt.model_dir(workdir, "rtn_resume") + ".partial"
    args = ["--mode", "quantize", "--config.quant.method=rtn", "--config.quant.name=rtn_resume"]
    other = settings_of(config_of(cfg_file, method="rtn", name="rtn_resume", w_bits=4))
    qckpt.save_progress(partial, {"x": np.zeros(3)}, {"settings": other, "done_units": 1})
    before = tree_state(partial)
    one_error_line(cli(cfg_file, workdir, *args), "holds an interrupted run with other settings (differs in: "
                                                  "quant.w_bits)")
    assert tree_state(partial) == before  # hours of another run's work are never deleted unasked
    same = settings_of(config_of(cfg_file, method="rtn", name="rtn_resume"))
    qckpt.save_progress(partial, {"x": np.zeros(3)}, {"settings": same, "done_units": 1})
    state = os.path.join(partial, "state.npz")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) - 10)
    r = cli(cfg_file, workdir, *args)
    assert r.returncode == 0, r.stderr
    assert f"the resume point in {partial} cannot be read" in r.stdout and "starting this model over" in r.stdout
    assert os.path.exists(os.path.join(qckpt.model_dir(workdir, "rtn_resume"), qckpt.MANIFEST))


@pytest.mark.slow
def test_sigterm_in_reconstruction_keeps_the_resume_point_exits_0_and_the_resumed_model_keeps_every_unit(
        fp_workdir):
    cfg_file, workdir = fp_workdir
    args = cli_args(cfg_file, workdir, "--mode", "quantize", "--config.quant.method=ptq4dit",
                    "--config.quant.w_bits=4", "--config.quant.name=ptq_sigterm")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in proc.stdout:  # the resume point of unit 2 is written before unit 3 is announced
        seen.append(line)
        if line.startswith("reconstruction: unit 3 of 5"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "reconstruction: unit 1 took" in out and "the time left is estimated once a block unit has run" in out
    partial = qckpt.model_dir(workdir, "ptq_sigterm") + ".partial"
    progress = json.load(open(os.path.join(partial, "progress.json")))
    done = progress["done_units"]
    assert done >= 2 and f"SIGTERM: stopped in stage 'reconstruction'; the resume point {partial} keeps " \
                         f"done_units={done}" in out
    names = ["embed", "condition t_embedder.mlp_0", "condition t_embedder.mlp_2", "block 0", "block 1", "unembed"]
    assert [u["unit"] for u in progress["units"]] == names[:done + 1]  # the t-MLP's two linears: two reports
    saved_seconds = progress["stages"]["reconstruction"]["seconds"]
    assert saved_seconds > 0  # the time spent so far travels with the resume point

    again = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming PTQ4DiT at unit {done + 1} of 5" in again.stdout
    assert f"reconstruction: unit {done + 1} of 5" in again.stdout
    assert f"reconstruction: unit {done} of 5" not in again.stdout  # counted one way: no unit twice
    assert re.search(r"reconstruction: unit 3 took \d+ s; about .* left", again.stdout + out)  # after a block
    manifest = qckpt.read_manifest(qckpt.model_dir(workdir, "ptq_sigterm"))
    units = manifest["info"]["units"]
    assert [u["unit"] for u in units] == names
    assert all(np.isfinite(u["loss_end"]) and u["seconds"] > 0 for u in units)
    assert manifest["stages"]["reconstruction"]["seconds"] > saved_seconds  # both runs' time
    assert not os.path.exists(partial)


def test_sigterm_before_the_first_resume_point_says_so_and_leaves_no_half_file(fp_workdir, monkeypatch):
    from terdit_jax.ptq import calibration

    cfg_file, workdir = fp_workdir
    copy = workdir + "_sigterm_calib"
    shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(copy, "checkpoints"))
    real = calibration.record_trajectories

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return real(*a, **k)
    monkeypatch.setattr(calibration, "record_trajectories", killed)
    handler = signal.getsignal(signal.SIGTERM)
    said = []
    assert run_quantize_mode(config_of(cfg_file, method="rtn"), copy, log=said.append) is None
    assert any("SIGTERM: stopped in stage 'calibration set', before the first resume point" in s for s in said)
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is put back
    assert not os.path.exists(os.path.join(copy, "quantized")) or not os.listdir(os.path.join(copy, "quantized"))


def test_a_copied_workdir_reuses_its_calibration_set(fp_workdir):
    cfg_file, workdir = fp_workdir
    config = config_of(cfg_file, method="rtn", name="rtn_copy")
    run_quantize_mode(config, workdir, log=lambda *_: None)
    copy = workdir + "_copy"
    shutil.copytree(workdir, copy)
    said = []
    run_quantize_mode(config, copy, overwrite=True, log=said.append)
    assert any(s.startswith("calibration: reusing " + os.path.join(copy, "quantized")) for s in said), said


def test_a_ternary_checkpoint_is_refused(fp_workdir, tmp_path):
    cfg_file, _ = fp_workdir
    config = config_of(cfg_file, method="rtn")
    config.model.linear = "ternary"
    _, params = init_model(config.model, 0)
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save_weights(0, params, config.model, {"kind": "test"})
    ckpt.close()
    with pytest.raises(QuantizeError, match="the checkpoint is a model.linear='ternary' model"):
        run_quantize_mode(config_of(cfg_file, method="rtn"), str(tmp_path), log=lambda *_: None)


def test_evaluation_samples_belong_to_the_model_that_made_them(fp_workdir, monkeypatch):
    """Quantizing again under the same name (--overwrite) gives new samples, not the old model's; report.json
    names the model; a wrong model name fails before the reference statistics are computed."""
    from terdit_jax.eval import evaluate, run as eval_run

    cfg_file, workdir = fp_workdir
    references = []
    monkeypatch.setattr(eval_run, "reference_for", lambda *a, **k: references.append(1) or "reference.npz")

    def fake_evaluate(npz, reference, **kw):  # the Inception metrics take minutes on a CPU; the samples are the point
        with np.load(npz) as f:
            return {"fid": float(f["arr_0"].astype(np.float64).mean())}
    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    reports, said = [], []
    for w_bits in (8, 2):
        config = config_of(cfg_file, method="rtn", name="rtn_eval", w_bits=w_bits, a_bits=16)
        run_quantize_mode(config, workdir, overwrite=True, log=lambda *_: None)
        config.sample.quantized = "rtn_eval"
        reports.append(eval_run.run_eval_mode(config, workdir, log=said.append))
    first, second = reports
    with np.load(first["samples"]) as a, np.load(second["samples"]) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # W2 samples, not the W8 model's again
    assert first["samples"] != second["samples"] and os.path.exists(first["samples"])
    for w_bits in (8, 2):  # the log names the model
        assert any(f"from the quantized model rtn_eval (rtn W{w_bits}A16 of step 0)" in s for s in said), said
    written = json.load(open(second["report"]))
    assert written["model"]["kind"] == "quantized" and written["model"]["name"] == "rtn_eval"
    assert written["model"]["bits"] == {"weights": 2, "activations": 16}
    assert written["model"]["manifest"] == qckpt.manifest_id(qckpt.model_dir(workdir, "rtn_eval"))
    references.clear()
    config.sample.quantized = "rtn_evl"
    with pytest.raises(qckpt.QuantizedModelError, match="rtn_evl is not a complete quantized model"):
        eval_run.run_eval_mode(config, workdir, log=lambda *_: None)
    assert not references


def test_sample_files_are_named_by_what_made_them(fp_workdir):
    from terdit_jax.sample import run_sample_mode

    cfg_file, workdir = fp_workdir
    paths = []
    for steps in (4, 2):
        config = config_of(cfg_file)
        config.sample.num_steps = steps
        paths.append(run_sample_mode(config, workdir, log=lambda *_: None)["grid"])
    assert [os.path.basename(p) for p in paths] == ["sample_0000000_ddim4_cfg4.png", "sample_0000000_ddim2_cfg4.png"]
    assert all(os.path.exists(p) for p in paths)  # the quick run did not overwrite the other


def test_the_time_estimate_waits_for_the_kind_most_units_left_are():
    blocks = ["block"] * 3 + ["unembed"]
    assert Job.estimate([("embed", 12.0)], ["condition"] + blocks) == \
        "the time left is estimated once a block unit has run"
    # 3 blocks at the last block's 100 s + the unembed unit at the mean of the finished (12 + 12 + 100) / 3
    assert Job.estimate([("embed", 12.0), ("condition", 12.0), ("block", 100.0)], blocks) == "about 5 min 41 s left"


def test_the_official_preset_sets_the_codes_choices_and_refuses_a_conflicting_field():
    from terdit_jax.config import ConfigError, base_config, finalize
    c = base_config()
    c.quant.preset = "official"
    q = finalize(c).quant
    assert (q.calib_classes, q.ssc, q.recon_iters, q.sequential) == ("official", "sample", 20000, False)
    assert finalize(finalize(c)).quant.sequential is False  # a finalized config finalizes again unchanged
    c.quant.ssc = "timestep"  # the default: the preset wins
    assert finalize(c).quant.ssc == "sample"
    c.quant.recon_iters = 500
    with pytest.raises(ConfigError, match=r"quant.recon_iters: 500 conflicts with quant.preset='official'"):
        finalize(c)


@pytest.mark.slow
def test_export_deploys_a_quantized_model_that_samples_and_refuses_to_overwrite_it(fp_workdir):
    """--mode export --config.sample.quantized=NAME → <workdir>/quantized/NAME/deployed (integer weights);
    --config.sample.packed_path samples it; a second export exits 2 with one error line and leaves it alone."""
    cfg_file, workdir = fp_workdir
    if not os.path.exists(qckpt.model_dir(workdir, "rtn_w8a8")):
        run_quantize_mode(config_of(cfg_file, method="rtn", w_bits=8, a_bits=8), workdir, log=lambda *_: None)
    r = cli(cfg_file, workdir, "--mode", "export", "--config.sample.quantized=rtn_w8a8")
    assert r.returncode == 0, r.stderr
    out = os.path.join(qckpt.model_dir(workdir, "rtn_w8a8"), "deployed")
    assert f"--config.sample.packed_path={out}" in r.stdout
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    one_error_line(cli(cfg_file, workdir, "--mode", "export", "--config.sample.quantized=rtn_w8a8"),
                   "exists; pass --overwrite")
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
    r = cli(cfg_file, workdir, "--mode", "sample", f"--config.sample.packed_path={out}")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(workdir, "samples", "sample_packed_0000000_ddim4_cfg4.png"))
