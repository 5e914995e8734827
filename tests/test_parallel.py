"""Sharding: mesh sizes, the rules table, sharded vs unsharded training steps (8 simulated CPU devices in a
subprocess), global vs per-shard ternary γ, the training forward pass, and restoring onto another mesh."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from terdit_jax import parallel
from terdit_jax.config import base_config, finalize
from terdit_jax.models import ternary
from terdit_jax.models.ternary import absmean_ternary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import CACHE, XLA_FLAGS  # noqa: E402  (the subprocesses' compile cache and XLA flags)


def tiny_config(**train):
    c = base_config()
    m = c.model
    m.name, m.dim, m.n_layers, m.n_heads = "custom", 32, 2, 2
    m.patch_size, m.in_channels, m.num_classes, m.multiple_of, m.dtype = 4, 1, 10, 32, "float32"
    c.data.kind, c.data.image_size, c.data.latent = "digits", 28, False
    t = c.train
    t.steps, t.batch_size, t.lr, t.log_every, t.sample_every, t.ckpt_every = 6, 8, 1e-3, 5, 10**9, 10**9
    for k, v in train.items():
        t[k] = v
    return finalize(c)


def run_script(code: str, devices: int = 8, timeout: int = 300) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


EIGHT_DEVICES = r'''
import json, sys, tempfile
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from test_parallel import tiny_config
from terdit_jax import parallel, train as T
from terdit_jax.checkpoint import Checkpoints
from terdit_jax.models import ternary
from terdit_jax.models.ternary import absmean_ternary
res = {}
def cfg(mesh, **kw):
    c = (tiny_config(**kw))
    c.parallel.ici_data, c.parallel.ici_fsdp, c.parallel.ici_tensor = mesh
    return c
base = cfg((1, 1, 1))
apply, ref_state = T.init_state(base)                      # unsharded (no mesh)
from terdit_jax.data.digits import DigitBatches
batch_np = DigitBatches(8, 0).batch(0)
ref_step = T.make_train_step(apply, base)
ref_new, ref_m = ref_step(jax.tree.map(jnp.copy, ref_state), {k: jnp.asarray(v) for k, v in batch_np.items()})

sh = cfg((2, 2, 2), grad_accum_steps=2)
sh.parallel.remat = "dots"
mesh = parallel.create_mesh(sh)
res["mesh"] = dict(mesh.shape)
_, st = T.init_state(sh, mesh)
res["init_equal"] = bool(all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                             zip(jax.tree.leaves(st), jax.tree.leaves(ref_state))))
flat = {"".join(map(str, p)): v for p, v in jax.tree_util.tree_leaves_with_path(st)}
res["specs"] = {k: [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec] for k, v in flat.items()}
res["shapes"] = {k: list(v.shape) for k, v in flat.items()}
step = T.make_train_step(apply, sh, mesh)
batch = parallel.global_batch(batch_np, mesh, 8)
compiled, mem = T.compile_step(step, st, batch, log=lambda *_: None)
res["memory"] = mem
new, m = compiled(st, batch)
res["loss"] = [float(ref_m["loss"]), float(m["loss"])]
res["grad_norm"] = [float(ref_m["grad_norm"]), float(m["grad_norm"])]
res["max_param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                            zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref_new["params"])))
res["max_param_change"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                              zip(jax.tree.leaves(ref_new["params"]), jax.tree.leaves(ref_state["params"])))
res["out_specs_kept"] = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(st)))

# γ: a plain jnp.mean under GSPMD is the mean over the whole logical matrix
w = jax.random.normal(jax.random.key(3), (32, 64)) * jnp.linspace(0.1, 3.0, 64)
ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))
g_dev = jax.jit(absmean_ternary)(ws)
wn = np.asarray(w, np.float64)
g_np = np.clip(np.round(wn / (np.abs(wn).mean() + 1e-6)), -1, 1)
res["gamma_global_equal"] = bool(np.array_equal(np.asarray(g_dev), g_np))

# restore onto other meshes
d = tempfile.mkdtemp()
ck = Checkpoints(d, async_save=False)
ck.save(1, new, sh.model)
ck.wait()
res["restores"] = {}
for shape in [(1, 8, 1), (4, 1, 2)]:
    other = cfg(shape)
    mesh2 = parallel.create_mesh(other)
    _, abstract = T.abstract_state(other, mesh2)
    back = ck.restore(1, abstract, other.model)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(new)))
    placed = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(abstract)))
    res["restores"][str(shape)] = [same, placed]

# the original DiT family through the same sharded step (its qkv, MLP and adaLN split over tensor)
from terdit_jax.config import finalize
def dit_cfg(mesh):
    c = cfg(mesh, grad_accum_steps=2)
    c.model.family, c.model.linear = "dit", "fp"
    return finalize(c)
d1 = dit_cfg((1, 1, 1))
apply_d, st_d = T.init_state(d1)
ref_d, ref_dm = T.make_train_step(apply_d, d1)(jax.tree.map(jnp.copy, st_d),
                                               {k: jnp.asarray(v) for k, v in batch_np.items()})
d8 = dit_cfg((2, 2, 2))
mesh_d = parallel.create_mesh(d8)
_, st_d8 = T.init_state(d8, mesh_d)
new_d8, m_d8 = T.make_train_step(apply_d, d8, mesh_d)(st_d8, parallel.global_batch(batch_np, mesh_d, 8))
res["dit_loss"] = [float(ref_dm["loss"]), float(m_d8["loss"])]
res["dit_max_param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                                zip(jax.tree.leaves(new_d8["params"]), jax.tree.leaves(ref_d["params"])))
res["dit_tensor_split"] = any("tensor" in str(v.sharding.spec) for v in jax.tree.leaves(st_d8["params"]))
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def eight():
    return run_script(EIGHT_DEVICES)


def test_sharded_step_of_the_dit_family_matches_unsharded(eight):
    assert eight["dit_tensor_split"]
    np.testing.assert_allclose(*eight["dit_loss"], rtol=1e-5)
    assert eight["dit_max_param_diff"] < 1e-5


def test_sharded_step_matches_unsharded(eight):
    """data 2 × fsdp 2 × tensor 2, with grad accumulation 2 and 'dots' remat, against one device, no mesh."""
    assert eight["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert eight["init_equal"], "the directly-sharded init differs from the unsharded one"
    ref, got = eight["loss"]
    assert abs(ref - got) < 1e-5 * abs(ref)
    assert abs(eight["grad_norm"][0] - eight["grad_norm"][1]) < 1e-5 * eight["grad_norm"][0]
    assert eight["max_param_change"] > 1e-4  # the step moved the params, so the comparison below means something
    assert eight["max_param_diff"] < 1e-6
    assert eight["out_specs_kept"]


def test_parameters_are_placed_as_the_rules_say(eight):
    specs = eight["specs"]
    # state tree paths: params/<module path>/value ; attention kernels split fsdp × tensor as ('embed','heads')
    def spec(suffix, root="params"):
        keys = [k for k in specs if k.startswith(f"['{root}']") and k.endswith(suffix)]
        assert keys, (suffix, sorted(specs)[:20])
        return specs[keys[0]]
    assert spec("['attention']['wq']['kernel'].value") == ["fsdp", "tensor"]
    assert spec("['attention']['wo']['kernel'].value") == ["tensor", "fsdp"]
    assert spec("['feed_forward']['w2']['kernel'].value") == ["tensor", "fsdp"]
    assert spec("['feed_forward']['w1']['kernel'].value") == ["fsdp", "tensor"]
    assert spec("[0]['adaLN_modulation']['kernel'].value") == [None, "tensor"]
    assert spec("[0]['adaLN_modulation']['bias'].value") == ["tensor"]
    assert spec("['attention']['wq']['alpha'].value") == []
    assert spec("['y_embedder']['embedding_table'].value") == [None, None]
    # EMA and both Adam moments mirror the parameters
    for k, v in specs.items():
        if k.startswith("['params']"):
            assert specs[k.replace("['params']", "['ema']", 1)] == v
    mu = [k for k in specs if "['opt_state']" in k and k.endswith("['attention']['wq']['kernel'].value")]
    assert len(mu) == 4 and all(specs[k] == ["fsdp", "tensor"] for k in mu)  # mu, nu × 2 layers
    assert all(v == [] for k, v in specs.items() if k in ("['step']", "['rng']"))


def test_global_gamma_under_gspmd_is_the_whole_matrix_mean(eight):
    assert eight["gamma_global_equal"]


def test_memory_analysis_is_reported(eight):
    mem = eight["memory"]
    assert mem is not None and mem["total"] > 0 and mem["argument_size"] > 0


def test_checkpoint_restores_onto_other_mesh_shapes(eight):
    assert eight["restores"] == {"(1, 8, 1)": [True, True], "(4, 1, 2)": [True, True]}


def test_mesh_sizes_fill_and_errors():
    assert parallel._fill({"data": 2, "fsdp": -1, "tensor": 2}, 8, "ici") == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one"):
        parallel._fill({"data": -1, "fsdp": -1, "tensor": 1}, 8, "ici")
    with pytest.raises(ValueError, match="do not split"):
        parallel._fill({"data": 3, "fsdp": -1, "tensor": 1}, 8, "ici")
    mesh = parallel.create_mesh(base_config())  # defaults: everything on fsdp
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_indivisible_dimension_is_left_unsplit():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
    fake = type("M", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
    assert parallel.logical_to_spec(("embed", "heads"), (32, 64), fake) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("embed", "heads"), (6, 64), fake) == P(None, "tensor")
    assert parallel.logical_to_spec(("batch", None), (8, 3), fake) == P(("data", "fsdp"), None)
    assert parallel.logical_to_spec(("embed", "embed"), (8, 8), fake) == P("fsdp", None)
    assert parallel.logical_to_spec((), (), mesh) == P()


def test_shard_gamma_is_per_tensor_shard_with_the_same_ste():
    # halves of very different scale: the global γ zeroes the small half, per-shard γ keeps it ternary
    w = jnp.concatenate([0.01 * jax.random.normal(jax.random.key(0), (16, 8)),
                         jax.random.normal(jax.random.key(1), (16, 8))], axis=1)
    alpha = jnp.asarray(0.7)
    got = ternary.ternary_weight(w, alpha, 1, 2)
    wn = np.asarray(w, np.float64)
    want = np.concatenate([np.clip(np.round(h / (np.abs(h).mean() + 1e-6)), -1, 1) for h in np.split(wn, 2, 1)], 1)
    np.testing.assert_array_equal(np.asarray(got), 0.7 * want.astype(np.float32))
    assert not np.array_equal(np.asarray(got), np.asarray(alpha * absmean_ternary(w)))
    np.testing.assert_array_equal(np.asarray(ternary.absmean_ternary_blocks(w, 1, 1)), np.asarray(absmean_ternary(w)))
    g = jax.random.normal(jax.random.key(2), w.shape)
    dw, da = jax.grad(lambda a, b: jnp.sum(ternary.ternary_weight(a, b, 1, 2) * g), argnums=(0, 1))(w, alpha)
    np.testing.assert_allclose(np.asarray(dw), 0.7 * np.asarray(g), rtol=1e-6)
    np.testing.assert_allclose(float(da), float(np.sum(np.asarray(g) * want)), rtol=1e-5)


def test_shard_gamma_model_splits_the_tensor_axis_of_each_kernel():
    c = tiny_config()
    c.model.ternary_gamma = "shard"
    from terdit_jax.model_fn import init_model
    apply, params = init_model(parallel.build_model_config(c.model, 2), 0)
    model = __import__("flax").nnx.merge(apply.graphdef, params)
    blk = model.layers[0]
    assert isinstance(blk.attention.wq, ternary.ShardGammaTernaryDense)
    assert (blk.attention.wq.shard_axis, blk.attention.wq.shards) == (1, 2)  # ('embed', 'heads'): column split
    assert (blk.attention.wo.shard_axis, blk.attention.wo.shards) == (0, 2)  # ('heads', 'embed'): row split
    assert (blk.adaLN_modulation.shard_axis, blk.adaLN_modulation.shards) == (1, 2)
    _, ref = init_model(c.model, 0)  # same parameters as the global-γ model
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


def test_training_forward_equals_the_model_call():
    """parallel.forward re-implements DiT.__call__ (to add remat and constraints); any drift shows here."""
    c = (tiny_config())
    from terdit_jax.model_fn import init_model
    apply, params = init_model(c.model, 0)
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(5), a.shape), params)  # non-zero gates
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t, y = jnp.array([3, 700]), jnp.array([1, 10])
    want = jax.jit(apply)(params, x, t, y)
    got = jax.jit(lambda p: parallel.forward(apply.graphdef, p, x, t, y, remat="full"))(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert float(jnp.std(want)) > 1e-3
