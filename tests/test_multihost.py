"""Multi-host: launch/local.py starts 2 processes × 2 CPU devices (coordinator on localhost); each reads only its
rows of every global batch, and after a few steps the parameters equal those of one process with 4 devices."""
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import CACHE, ROOT  # noqa: E402

CHILD = r'''
import sys
sys.path.insert(0, "tests")
from terdit_jax import parallel
from test_parallel import tiny_config
c = (tiny_config(steps=2, ckpt_every=2))
c.parallel.ici_data, c.parallel.ici_fsdp = 2, -1
started = parallel.initialize_distributed(c)
import jax, numpy as np
from terdit_jax import train as T
out = T.train(c, sys.argv[1], log=lambda m: print(m, flush=True))
params = T._local_copy(out["state"]["params"])  # gathered over both hosts
if jax.process_index() == 0:
    np.savez(sys.argv[2], *[np.asarray(a) for a in jax.tree.leaves(params)])
    print("RESULT", started, jax.process_count(), jax.device_count(), dict(out["mesh"].shape), flush=True)
'''


@pytest.mark.slow
def test_two_hosts_match_one_host(tmp_path):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    two = subprocess.Popen([sys.executable, "launch/local.py", "-n", "2", "--cpu_devices", "2", "--", sys.executable,
                            "-c", CHILD, str(tmp_path / "two"), str(tmp_path / "two.npz")], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.Popen([sys.executable, "launch/local.py", "-n", "1", "--cpu_devices", "4", "--", sys.executable,
                            "-c", CHILD, str(tmp_path / "one"), str(tmp_path / "one.npz")], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_two, _ = two.communicate(timeout=400)
    out_one, _ = one.communicate(timeout=400)
    assert two.returncode == 0, out_two[-4000:]
    assert one.returncode == 0, out_one[-4000:]
    assert "RESULT True 2 4 {'data': 2, 'fsdp': 2, 'tensor': 1}" in out_two
    assert "RESULT True 1 4 {'data': 2, 'fsdp': 2, 'tensor': 1}" in out_one
    assert out_two.count("model custom") == 1  # only process 0 logs
    assert os.path.exists(tmp_path / "two" / "metrics.jsonl")
    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert os.listdir(tmp_path / "two" / "checkpoints") == ["2"]
