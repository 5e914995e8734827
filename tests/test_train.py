"""Training: the loss falls, NaN stops training without a checkpoint after it, and exact
resume (model, EMA, optimizer, RNG and the grain iterator position) on pre-extracted latents."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import tiny_config  # noqa: E402

from terdit_jax import parallel, train as T  # noqa: E402
from terdit_jax.checkpoint import Checkpoints  # noqa: E402


pytestmark = pytest.mark.usefixtures("xla_cache")


def quiet(*_):
    pass


def test_loss_falls_on_a_fixed_batch():
    c = (tiny_config())
    mesh = parallel.create_mesh(c)
    apply, state = T.init_state(c, mesh)
    from terdit_jax.data.digits import DigitBatches
    batch = parallel.global_batch(DigitBatches(8, 0).batch(0), mesh, 8)
    step = T.make_train_step(apply, c, mesh)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


class NaNAt:
    """Wraps make_data's source: the batch of step `bad` is NaN."""

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def batch(self, step):
        b = self.inner.batch(step)
        return {**b, "x": b["x"] * np.nan} if step == self.bad else b

    def __getattr__(self, name):  # null_y, captions
        return getattr(self.inner, name)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, s):
        self.inner.set_state(s)


def test_nan_loss_raises_and_writes_no_checkpoint_after_it(tmp_path, monkeypatch):
    make = T.make_data
    monkeypatch.setattr(T, "make_data", lambda *a, **k: NaNAt(make(*a, **k), bad=2))  # step index 2 = step 3
    c = tiny_config(steps=8, ckpt_every=2, log_every=100)
    with pytest.raises(T.TrainingDiverged, match="at step 3"):
        T.train(c, str(tmp_path), log=quiet)
    ck = Checkpoints(str(tmp_path / "checkpoints"))
    assert ck.steps() == [2]
    ck.close()


def write_latents(path, n=24, size=32):
    """A tiny latent data set through the real extractor; the 'encoder' is a fixed 8×8 average pool + linear map
    (a data fixture, not a VAE)."""
    from terdit_jax.data.latents import extract_latents
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (size, size, 3), np.uint8), "label": int(i % 10)} for i in range(n)]
    proj = rng.normal(size=(3, 4)).astype(np.float32)

    def encode(x):
        b = x.shape[0]
        pooled = x.reshape(b, size // 8, 8, size // 8, 8, 3).mean((2, 4))
        return np.concatenate([pooled @ proj, np.full(pooled.shape[:3] + (4,), -2.0, np.float32)], -1)

    extract_latents(source, encode, str(path), image_size=size, batch_size=8, records_per_shard=10, progress=False,
                    threads=1)


def latent_config(path, **train):
    c = tiny_config(**train)
    c.model.in_channels, c.model.patch_size = 4, 1
    c.data.kind, c.data.path, c.data.image_size, c.data.latent, c.data.workers = "imagenet_latents", str(path), 32, True, 0
    from terdit_jax.config import finalize
    return finalize(c)


@pytest.mark.slow
def test_resume_is_bitwise_exact_with_the_data_position(tmp_path):
    write_latents(tmp_path / "latents")
    straight = T.train(latent_config(tmp_path / "latents", steps=6, ckpt_every=3), str(tmp_path / "a"), log=quiet)
    T.train(latent_config(tmp_path / "latents", steps=3, ckpt_every=3), str(tmp_path / "b"), log=quiet)
    resumed = T.train(latent_config(tmp_path / "latents", steps=6, ckpt_every=3), str(tmp_path / "b"), log=quiet)
    assert resumed["step"] == 6
    for key in ("params", "ema", "opt_state", "step", "rng"):
        for x, y in zip(jax.tree.leaves(straight["state"][key]), jax.tree.leaves(resumed["state"][key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key)
    # and the stored iterator position is the one after step 3, not the start
    ck = Checkpoints(str(tmp_path / "b" / "checkpoints"))
    assert ck.steps() == [3, 6] and ck.data_state(3) and ck.data_state(3) != ck.data_state(6)
    ck.close()


@pytest.mark.slow
def test_a_higher_resolution_run_starts_from_lower_resolution_weights(tmp_path):
    """The paper's 256 → 512 px continuation, in pixel space: 28 px weights start a 56 px run (RoPE, no position
    table), the loaded weights are the ones used, and the model runs at the new size."""
    from terdit_jax.config import finalize
    low = T.train(tiny_config(steps=2, ckpt_every=2), str(tmp_path / "low"), log=quiet)
    c = tiny_config(init_from=str(tmp_path / "low"))
    c.data.image_size = 56
    c = finalize(c)
    apply, abstract = T.abstract_state(c)
    fresh = T.init_state(c)[1]
    state = T._init_from(c.train.init_from, fresh, abstract, c, log=quiet)
    for key in ("params", "ema"):
        for x, y in zip(jax.tree.leaves(state[key]), jax.tree.leaves(low["state"][key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    x = jax.random.normal(jax.random.key(0), (2, 56, 56, 1))
    out = apply(state["params"], x, jnp.array([10, 500]), jnp.array([3, 7]))
    assert out.shape == (2, 56, 56, 2) and np.isfinite(np.asarray(out)).all()
    assert np.abs(np.asarray(out)).max() > 0  # a fresh model's zero-initialised final layer would give exactly 0
    other = tiny_config(init_from=str(tmp_path / "low"))
    other.model.dim = 64
    with pytest.raises(Exception, match="different architecture"):
        T._init_from(str(tmp_path / "low"), fresh, T.abstract_state(finalize(other))[1], finalize(other), log=quiet)


@pytest.mark.parametrize("warmup,d", [pytest.param(False, 0.9999, marks=pytest.mark.slow), (True, 0.1)])
def test_ema_after_one_step(warmup, d):
    """EMA from step 0 (official) or with the (1+n)/(10+n) warmup, whose first-step decay is 0.1."""
    c = tiny_config(ema_warmup=warmup)
    apply, state = T.init_state(c)
    init = jax.tree.map(np.asarray, state["params"])
    from terdit_jax.data.digits import DigitBatches
    state, _ = T.make_train_step(apply, c)(state, jax.tree.map(jnp.asarray, DigitBatches(8, 0).batch(0)))
    for e, p0, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(init), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(e, d * p0 + (1 - d) * np.asarray(p), rtol=1e-5, atol=1e-7)
