"""Checkpoints that survive: SIGTERM saves and exits cleanly, SIGKILL during a save keeps the previous step and the
next start resumes from it, a corrupted step is named and skipped, retention, and the EMA-only export."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import CACHE, ROOT, XLA_FLAGS, tiny_config  # noqa: E402
from test_train import quiet  # noqa: E402

from terdit_jax import train as T  # noqa: E402
from terdit_jax.checkpoint import CheckpointError, Checkpoints, export_orbax, load_exported  # noqa: E402

pytestmark = pytest.mark.usefixtures("xla_cache")  # the shared compile cache (conftest)

CHILD = r'''
import json, os, signal, sys
sys.path.insert(0, "tests")
from test_parallel import tiny_config
from terdit_jax import train as T
if sys.argv[2] == "kill_in_second_save":
    # SIGKILL this process after the arrays of the second save are written, before Orbax commits (renames) it
    from orbax.checkpoint._src.path import atomicity
    orig = atomicity.AtomicRenameTemporaryPath.finalize
    def finalize(self, *a, **k):
        if self.get_final().name == "4":
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    c = tiny_config(steps=6, ckpt_every=2)
else:
    c = tiny_config(steps=10**6, ckpt_every=10**6, log_every=10**6)
out = T.train(c, sys.argv[1], log=lambda m: print(m, flush=True))
print(json.dumps({"step": out["step"], "preempted": out["preempted"]}), flush=True)
'''


def child(workdir, mode):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(workdir), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    p = child(tmp_path, "sigterm")
    for line in p.stdout:  # wait until the loop runs
        if line.startswith("compiled the train step"):
            break
    import time
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    res = __import__("json").loads(out.strip().splitlines()[-1])
    assert res["preempted"] and res["step"] >= 1
    ck = Checkpoints(str(tmp_path / "checkpoints"))
    assert ck.steps() == [res["step"]]
    ck.close()


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_continues(tmp_path):
    p = child(tmp_path / "run", "kill_in_second_save")
    out, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, (out[-2000:], err[-3000:])
    names = os.listdir(tmp_path / "run" / "checkpoints")
    assert "2" in names and "4" not in names and any(n.startswith("4.") and "tmp" in n for n in names), names
    said = []
    resumed = T.train(tiny_config(steps=6, ckpt_every=2), str(tmp_path / "run"), log=said.append)
    assert any(m.startswith("resumed from") and m.endswith("/2") for m in said), said
    assert resumed["step"] == 6 and int(resumed["state"]["step"]) == 6  # (bitwise resume: test_train.py)
    assert not any("tmp" in n for n in os.listdir(tmp_path / "run" / "checkpoints"))


def small_state(v):
    return {"params": {"w": jnp.full((64,), float(v))}, "step": jnp.asarray(7, jnp.int32)}


def test_corrupt_checkpoint_is_named_and_falls_back(tmp_path):
    cfg = {"dim": 4}
    ck = Checkpoints(str(tmp_path / "c"), async_save=False)
    for s in (1, 2):
        ck.save(s, small_state(s), cfg)
    ck.wait()
    for root, _, files in os.walk(tmp_path / "c" / "2" / "state"):
        for f in files:
            if os.sep + "d" in root:  # the array data files: cut each in half
                path = os.path.join(root, f)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
    abstract = jax.eval_shape(lambda: small_state(0))
    with pytest.raises(CheckpointError, match="step 2"):
        ck.restore(2, abstract, cfg)
    with pytest.raises(CheckpointError, match="step 2"):
        ck.restore_latest(abstract, cfg, fallback=False)
    step, state = ck.restore_latest(abstract, cfg, fallback=True, log=quiet)
    assert step == 1 and float(state["params"]["w"][0]) == 1.0
    assert ck.steps() == [1] and os.listdir(str(tmp_path / "c") + ".corrupt")
    with pytest.raises(CheckpointError, match="different architecture"):
        ck.restore(1, abstract, {"dim": 8})
    # a checkpoint without model.prediction (written before it existed) is an ε model, not a v one
    meta = tmp_path / "c" / "1" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["model"].pop("prediction")
    meta.write_text(json.dumps(saved))
    ck.restore(1, abstract, cfg)
    with pytest.raises(CheckpointError, match="prediction: checkpoint 'eps' vs config 'v'"):
        ck.restore(1, abstract, {**cfg, "prediction": "v"})
    os.remove(tmp_path / "c" / "1" / "meta" / "metadata")
    with pytest.raises(CheckpointError, match="step 1 .* no readable metadata"):
        ck.restore(1, abstract, cfg)
    ck.close()


def test_keep_last_n_plus_every_k(tmp_path):
    ck = Checkpoints(str(tmp_path / "k"), keep=2, keep_every=4)
    for s in range(1, 10):
        ck.save(s, small_state(s), {})
    ck.wait()
    assert ck.steps() == [4, 8, 9]
    with pytest.raises(CheckpointError, match="NaN"):
        ck.save(10, small_state(float("nan")), {})
    ck.close()


def test_export_orbax_writes_the_ema_alone(tmp_path):
    c = tiny_config()
    apply, state = T.init_state(c)
    state["ema"] = jax.tree.map(lambda a: a + 1.0, state["ema"])  # distinguishable from params
    ck = Checkpoints(str(tmp_path / "w" / "checkpoints"), async_save=False)
    ck.save(7, state, c.model)
    ck.close()
    out = export_orbax(c, str(tmp_path / "w"), str(tmp_path / "export"), log=quiet)
    assert sorted(os.listdir(out)) == ["ema", "model_config.json"]
    cfg, ema = load_exported(out)
    assert cfg.dim == 32 and cfg.linear == "ternary"
    for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(state["ema"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
