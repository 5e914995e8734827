"""Training the text family (pixart): caption shards from an image folder, caption batches, CFG dropout to the empty
prompt, logical axes on every parameter, remat, a sharded step, and bitwise resume."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import run_script  # noqa: E402

from terdit_jax import parallel, train as T  # noqa: E402
from terdit_jax.checkpoint import Checkpoints  # noqa: E402
from terdit_jax.config import base_config, finalize  # noqa: E402
from terdit_jax.data import conditions  # noqa: E402
from terdit_jax.data.captioned import CaptionedImages, CaptionFileError  # noqa: E402
from terdit_jax.data.digits import byte_tokens, digit_captions  # noqa: E402
from terdit_jax.data.latents import LatentSource, extract_latents  # noqa: E402
from terdit_jax.models.families import FAMILIES, abstract  # noqa: E402
from terdit_jax.text import captions as C  # noqa: E402

pytestmark = pytest.mark.usefixtures("xla_cache")
CC, L = 16, 28  # caption width and length of the tiny models (28 ≥ the digit prompts' 26 byte tokens)


def quiet(*_):
    pass


def pixart_config(**train):
    """A 1-block PixArt (D 32) on the 28×28 digits with the random-T5 digit captions, float32."""
    c = base_config()
    c.model.update(family="pixart", name="custom", dim=32, n_layers=1, n_heads=2, patch_size=4, in_channels=1,
                   linear="fp", quantized_layers="attn1,attn2,ff_net", caption_channels=CC, caption_len=L,
                   dtype="float32", class_dropout_prob=0.1)
    c.data.kind, c.data.image_size, c.data.latent = "digits", 28, False
    c.train.update({**dict(steps=6, batch_size=8, lr=1e-3, log_every=5, sample_every=10**9, ckpt_every=10**9),
                    **train})
    return finalize(c)


def perturbed(state, scale=0.02):
    """Params away from the zero-initialised output layer, so the caption changes the output."""
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(7), len(leaves))
    new = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return {**state, "params": jax.tree.unflatten(tree, new)}


@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_parameter_has_logical_axes(family):
    """A parameter without logical axes would silently stay replicated on every device (state_shardings)."""
    c = pixart_config()
    c.model.family = family
    params = nnx.state(abstract(finalize(c).model), nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) > 10
    for path, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(v.shape), (jax.tree_util.keystr(path), axes, v.shape)
        for name in axes:
            parallel.mesh_axes(name)  # every name has a rule


def test_drop_replaces_whole_examples_like_a_loop():
    rng = np.random.default_rng(0)
    cap, mask = rng.standard_normal((5, 4, 3)).astype(np.float32), rng.integers(0, 2, (5, 4)).astype(np.int32)
    null = (rng.standard_normal((4, 3)).astype(np.float32), np.array([1, 0, 0, 0], np.int32))
    dropped = np.array([True, False, True, False, False])
    got = conditions.drop((cap, mask), null, jnp.asarray(dropped))
    for i in range(5):
        np.testing.assert_array_equal(got[0][i], null[0] if dropped[i] else cap[i])
        np.testing.assert_array_equal(got[1][i], null[1] if dropped[i] else mask[i])
    labels = np.arange(5, dtype=np.int32)  # the class-label rule it replaces: jnp.where(dropped, num_classes, y)
    np.testing.assert_array_equal(conditions.drop(labels, 10, jnp.asarray(dropped)), np.where(dropped, 10, labels))


def test_caption_dropout_in_the_step_is_the_empty_prompts_caption_and_mask():
    """With dropout probability 1 the step must equal a step without dropout whose batch already holds the null
    caption and mask (t and noise do not depend on the dropout); keeping the caption's mask must differ."""
    c1 = pixart_config()
    data = T.make_data(c1)
    c1.model.class_dropout_prob = 1.0
    c0 = pixart_config()
    c0.model.class_dropout_prob = 0.0
    apply, state = T.init_state(c1)
    state = perturbed(state, 0.2)
    batch = data.batch(0)
    null_cap, null_mask = data.null_y
    b = len(batch["x"])
    as_null = {"x": batch["x"], "y": (np.broadcast_to(null_cap, (b, L, CC)), np.broadcast_to(null_mask, (b, L)))}
    keep_mask = {"x": batch["x"], "y": (as_null["y"][0], batch["y"][1])}
    step1 = T.make_train_step(apply, c1, null_y=data.null_y)
    step0 = T.make_train_step(apply, c0, null_y=data.null_y)
    run = lambda step, bt: step(jax.tree.map(jnp.copy, state), jax.tree.map(jnp.asarray, bt))[1]["loss"]  # noqa
    dropped, want, wrong_mask, plain = (float(run(step1, batch)), float(run(step0, as_null)),
                                        float(run(step0, keep_mask)), float(run(step0, batch)))
    np.testing.assert_allclose(dropped, want, rtol=1e-6)
    assert abs(plain - want) > 1e-3 * want, (plain, want)  # the caption matters
    assert abs(wrong_mask - want) > 1e-3 * want, (wrong_mask, want)  # and so does the mask
    with pytest.raises(ValueError, match="null_y"):
        T.make_train_step(apply, c1)


def test_loss_falls_on_caption_batches():
    c = pixart_config()
    data = T.make_data(c)
    assert data.captions.prompts[3] == "a handwritten digit three"
    batch = jax.tree.map(jnp.asarray, data.batch(0))
    assert batch["y"][0].shape == (8, L, CC) and batch["y"][1].shape == (8, L)
    apply, state = T.init_state(c)
    step = T.make_train_step(apply, c, null_y=data.null_y)
    losses, norms = [], []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    assert np.isfinite(losses).all() and np.isfinite(norms).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_digit_captions_are_ten_distinct_random_t5_encodings():
    caps = digit_captions(CC, L, seed=0)
    ids, mask = byte_tokens(["ab", ""], 4)
    np.testing.assert_array_equal(ids, [[ord("a") + 3, ord("b") + 3, 1, 0], [1, 0, 0, 0]])  # ByT5 ids, EOS 1
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert len(caps) == 10 and caps.caption.shape == (10, L, CC) and caps.null_mask.sum() == 1
    tokens = [caps.caption[i][caps.mask[i] > 0] for i in range(10)]
    assert min(np.abs(tokens[i][-2] - tokens[j][-2]).max() for i in range(10) for j in range(i)) > 1e-3
    np.testing.assert_array_equal(digit_captions(CC, L, seed=0).caption, caps.caption)  # deterministic
    with pytest.raises(ValueError, match="too short"):
        digit_captions(CC, 20)


def test_remat_forward_and_gradients_equal_the_model_call():
    """parallel.forward (remat 'full' and 'dots') against the model's own call: a random linear functional of the
    output and its gradient with respect to every parameter."""
    c = pixart_config()
    data = T.make_data(c)
    apply, state = T.init_state(c)
    params = perturbed(state)["params"]
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t, y = jnp.array([3, 700]), jax.tree.map(lambda a: jnp.asarray(a[:2]), data.batch(0)["y"])
    w = jax.random.normal(jax.random.key(2), (2, 28, 28, 2))
    f = lambda out: jnp.sum(out * w)  # noqa: E731
    v_ref, g_ref = jax.jit(jax.value_and_grad(lambda p: f(apply(p, x, t, y))))(params)
    assert abs(float(v_ref)) > 1e-2
    for remat in ("full", "dots"):
        v, g = jax.jit(jax.value_and_grad(lambda p: f(parallel.forward(apply.graphdef, p, x, t, y, remat=remat))))(
            params)
        np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- caption shards, end to end

def image_folder(root, n=12, size=32):
    """n random PNGs, a TSV caption file and the same captions as <name>.txt sidecars; 3 captions, one unused."""
    rng = np.random.default_rng(0)
    prompts = ["a red square", "two cats on a sofa", "an empty prompt's cousin", "never used"]
    os.makedirs(root / "sub", exist_ok=True)
    lines = []
    for i in range(n):
        name = f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), np.uint8)).save(root / name)
        cap = prompts[(i * 7) % 3]
        (root / name).with_suffix(".txt").write_text(cap + "\n")
        lines.append(f"{name}\t{cap}")
    (root / "captions.txt").write_text("# path<TAB>caption\n" + "\n".join(lines) + "\n")
    lengths = np.array([3, 7, 1, 5])
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    embeds = C.make(prompts, rng.standard_normal((4, L, CC)), mask, rng.standard_normal((L, CC)),
                    np.eye(L, dtype=np.int32)[0])
    C.write(str(root / "embeds.npz"), embeds)
    return embeds


def fake_encode(x):
    """A data fixture, not a VAE: an 8×8 average pool and a fixed channel map to 4 means, log-variance −2."""
    b, s = x.shape[0], x.shape[1]
    pooled = x.reshape(b, s // 8, 8, s // 8, 8, 3).mean((2, 4))
    proj = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    return np.concatenate([pooled @ proj, np.full(pooled.shape[:3] + (4,), -2.0, np.float32)], -1)


def shard_config(path, **train):
    c = pixart_config(**train)
    c.model.update(in_channels=4, patch_size=1)
    c.data.update(kind="imagenet_latents", path=str(path), image_size=32, latent=True, workers=0)
    return finalize(c)


def extract(root, out):
    """What run_extract_mode does for a text family, with the fixture encoder instead of the SD-VAE."""
    from terdit_jax.data.conditions import CaptionRecords
    from terdit_jax.data.latents import _caption_data
    c = shard_config(out)
    c.data.update(image_path=str(root), caption_file=str(root / "captions.txt"),
                  caption_embeds=str(root / "embeds.npz"))
    source, records = _caption_data(c, str(out))
    assert isinstance(records, CaptionRecords)
    return source, extract_latents(source, fake_encode, str(out), image_size=32, batch_size=4, records_per_shard=5,
                                   progress=False, threads=1, condition=records)


def test_caption_shards_hold_each_images_caption_tokens(tmp_path):
    embeds = image_folder(tmp_path / "img")
    source, manifest = extract(tmp_path / "img", tmp_path / "lat")
    assert manifest["complete"] and manifest["condition"] == "caption" and manifest["num_records"] == 12
    sidecars = CaptionedImages(str(tmp_path / "img"), embeds)  # the other layout finds the same pairs
    assert dict(zip(sidecars.files, sidecars.caption_index)) == dict(zip(source.files, source.caption_index))
    src = LatentSource(str(tmp_path / "lat"), image_size=32)
    assert src.condition == "caption" and len(src) == 12
    for i in range(12):
        r = src[i]
        k = int(source.caption_index[i])
        assert r["caption_index"] == k and r["moments"].shape == (2, 4, 4, 8)
        np.testing.assert_array_equal(r["mask"], embeds.mask[k])
        on = embeds.mask[k] > 0
        np.testing.assert_array_equal(r["caption"][on], embeds.caption[k][on])
        assert not r["caption"][~on].any()  # padding is stored as nothing and read back as zeros
    # captions.npz: the captions in order of first appearance and the empty prompt's, for dropout and grids
    assert src.captions.prompts == tuple(embeds.prompts[k] for k in dict.fromkeys(source.caption_index.tolist()))
    np.testing.assert_array_equal(src.captions.null_caption, embeds.null_caption)


def test_zeroed_padding_gives_the_same_model_output():
    """Why the shards may drop the padding tokens: the model never reads their values."""
    c = pixart_config()
    apply, state = T.init_state(c)
    params = perturbed(state)["params"]
    rng = np.random.default_rng(0)
    cap = rng.standard_normal((2, L, CC)).astype(np.float32)
    mask = (np.arange(L)[None] < np.array([[4], [9]])).astype(np.int32)
    x, t = jax.random.normal(jax.random.key(0), (2, 28, 28, 1)), jnp.array([5, 600])
    run = jax.jit(apply)
    full, zeroed = run(params, x, t, (cap, mask)), run(params, x, t, (cap * mask[..., None], mask))
    assert float(jnp.std(full)) > 1e-3
    np.testing.assert_allclose(np.asarray(zeroed), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_bad_caption_input_says_what_to_fix(tmp_path):
    embeds = image_folder(tmp_path / "img")
    (tmp_path / "bad.txt").write_text("img00.png\ta caption nobody encoded\n")
    with pytest.raises(CaptionFileError, match="not among the 4 prompts.*a caption nobody encoded"):
        CaptionedImages(str(tmp_path / "img"), embeds, str(tmp_path / "bad.txt"))
    (tmp_path / "bad.txt").write_text("img00.png a caption without a tab\n")
    with pytest.raises(CaptionFileError, match=r"bad.txt:1: expected"):
        CaptionedImages(str(tmp_path / "img"), embeds, str(tmp_path / "bad.txt"))
    (tmp_path / "img" / "img00.txt").unlink()
    with pytest.raises(CaptionFileError, match="1 images have no caption"):
        CaptionedImages(str(tmp_path / "img"), embeds)


@pytest.mark.slow
def test_resume_on_caption_shards_is_bitwise_exact(tmp_path):
    image_folder(tmp_path / "img")
    extract(tmp_path / "img", tmp_path / "lat")
    straight = T.train(shard_config(tmp_path / "lat", steps=6, ckpt_every=3), str(tmp_path / "a"), log=quiet)
    mid = T.train(shard_config(tmp_path / "lat", steps=3, ckpt_every=3), str(tmp_path / "b"), log=quiet)
    resumed = T.train(shard_config(tmp_path / "lat", steps=6, ckpt_every=3), str(tmp_path / "b"), log=quiet)
    assert resumed["step"] == 6
    for key in ("params", "ema", "opt_state", "step", "rng"):
        for x, y in zip(jax.tree.leaves(straight["state"][key]), jax.tree.leaves(resumed["state"][key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(straight["state"]["params"]), jax.tree.leaves(mid["state"]["params"]))]
    assert max(moved) > 1e-4  # steps 4-6 moved the params: the comparison above means something
    ck = Checkpoints(str(tmp_path / "b" / "checkpoints"))
    assert ck.steps() == [3, 6] and ck.data_state(3) != ck.data_state(6)
    ck.close()
    assert C.read(str(tmp_path / "b" / "captions.npz")).prompts == resumed["captions"].prompts
    # shards of the other condition kind are refused with a message naming both
    class_cfg = shard_config(tmp_path / "lat")
    class_cfg.model.family = "dit"
    with pytest.raises(C.CaptionError, match="conditioned on captions.*takes labels"):
        T.make_data(finalize(class_cfg))


SHARDED = r'''
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_pixart_train import pixart_config
from terdit_jax import parallel, train as T
c = pixart_config(grad_accum_steps=2)
c.parallel.ici_data, c.parallel.ici_fsdp, c.parallel.ici_tensor = 2, 2, 2
c.parallel.remat = "dots"
mesh = parallel.create_mesh(c)
data = T.make_data(c)
apply, st = T.init_state(c, mesh)
new, m = T.make_train_step(apply, c, mesh, null_y=data.null_y)(st, parallel.global_batch(data.batch(0), mesh, 8))
np.savez(sys.argv[1], *[np.asarray(a) for a in jax.tree.leaves(new["params"])])
split = sorted({str(v.sharding.spec) for v in jax.tree.leaves(st["params"]) if "tensor" in str(v.sharding.spec)})
print(json.dumps({"loss": float(m["loss"]), "mesh": dict(mesh.shape), "tensor_split": split}))
'''


@pytest.mark.slow
def test_sharded_step_with_captions_matches_unsharded(tmp_path):
    """data 2 × fsdp 2 × tensor 2, 2 microbatches, 'dots' remat, caption batches: the same step as one device, no
    mesh, one batch."""
    r = run_script(SHARDED.replace("sys.argv[1]", repr(str(tmp_path / "p.npz"))))
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r["tensor_split"], "no pixart parameter is split over the tensor axis"
    c = pixart_config()
    data = T.make_data(c)
    apply, state = T.init_state(c)
    init = [np.asarray(a) for a in jax.tree.leaves(state["params"])]
    new, m = T.make_train_step(apply, c, null_y=data.null_y)(state, jax.tree.map(jnp.asarray, data.batch(0)))
    np.testing.assert_allclose(r["loss"], float(m["loss"]), rtol=1e-5)
    got = np.load(tmp_path / "p.npz")
    ref = [np.asarray(a) for a in jax.tree.leaves(new["params"])]
    assert max(np.abs(a - b).max() for a, b in zip(ref, init)) > 1e-4  # the step moved the params
    assert max(np.abs(got[f"arr_{i}"] - a).max() for i, a in enumerate(ref)) < 1e-5
