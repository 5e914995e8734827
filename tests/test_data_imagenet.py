"""ImageNet pipeline tests on a tiny fixture built here in the real ILSVRC2012 layout (class tars in a tar)."""
import io
import json
import os
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from terdit_jax.data import imagenet, latents, pipeline, transforms

SYNSETS = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = (7, 7, 6)  # 20 files, one of them corrupt
CORRUPT = "n01443537_3.JPEG"


def _jpeg(rng, h=40, w=50) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """ILSVRC2012_img_train.tar holding one nXXXXXXXX.tar per class; class tars added in unsorted order on purpose."""
    d = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    with tarfile.open(d / imagenet.TRAIN_TAR, "w") as outer:
        for s, n in reversed(list(zip(SYNSETS, PER_CLASS))):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(n):
                    name = f"{s}_{i}.JPEG"
                    data = _jpeg(rng)
                    _add(inner, name, data[:len(data) // 3] if name == CORRUPT else data)  # truncated JPEG
            _add(outer, f"{s}.tar", buf.getvalue())
    return d


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    m = imagenet.convert_to_array_record(str(raw), str(out), records_per_shard=8, threads=2, progress=False)
    return str(out), m


def _encode(x):
    """Trivial deterministic 'VAE': 8x8 average pool for the 4 mean channels (RGB + grey), zero log-variance."""
    b, h, w, _ = x.shape
    p = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
    return np.concatenate([p, p.mean(-1, keepdims=True), np.zeros(p.shape[:3] + (4,), np.float32)], -1)


@pytest.fixture(scope="module")
def folder(raw, tmp_path_factory):
    """The same images extracted to train/nXXXXXXXX/*.JPEG (corrupt file included)."""
    d = tmp_path_factory.mktemp("folder")
    with tarfile.open(raw / imagenet.TRAIN_TAR) as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                inner.extractall(d / "train" / m.name[:-4], filter="data")
    return str(d)


@pytest.fixture(scope="module")
def lat(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lat"))
    return out, latents.extract_latents(folder, _encode, out, image_size=32, batch_size=4, records_per_shard=6,
                                        threads=2, progress=False)


# ------------------------------------------------------------------------------------------------ transforms
def test_center_crop_box_halving_and_center():
    checker = (np.indices((128, 256)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    out = transforms.center_crop_arr(Image.fromarray(checker).convert("RGB"), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 127.5).max() <= 1  # two BOX halvings average the pattern away exactly
    halves = np.zeros((64, 128, 3), np.uint8)
    halves[:, 64:] = 255  # left black, right white; short side 64 -> halved once to 32x64, centre 32 columns kept
    out = transforms.center_crop_arr(Image.fromarray(halves), 32)
    assert (out[:, :16] == 0).all() and (out[:, 16:] == 255).all()
    assert transforms.center_crop_arr(Image.new("RGB", (50, 40)), 32).shape == (32, 32, 3)  # bicubic upscale path


def test_preprocess_range_and_flip():
    x = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    a, b = transforms.preprocess(x, 32, False), transforms.preprocess(x, 32, True)
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(b, a[:, ::-1])
    assert transforms.to_float(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


def test_corrupt_bytes_raise_clear_error():
    with pytest.raises(transforms.CorruptImageError, match="bad.JPEG: cannot decode"):
        transforms.decode_rgb(b"not a jpeg", "bad.JPEG")


# -------------------------------------------------------------------------------------------- raw + convert
def test_convert_reads_tar_layout_and_skips_corrupt(converted):
    out, m = converted
    assert m["complete"] and m["synsets"] == SYNSETS and m["num_records"] == 19 and m["skipped"] == [CORRUPT]
    assert m["num_shards"] == 3  # ceil(20 / 8) source files per shard
    src = imagenet.open_image_source(out)
    labels = [int(src[i]["label"]) for i in range(len(src))]
    assert labels == [0] * 7 + [1] * 6 + [2] * 6  # sorted synsets, although the tar stores them in reverse
    assert src[0]["image"].shape == (40, 50, 3) and src[0]["image"].dtype == np.uint8


def test_convert_is_idempotent_and_resumes(raw, converted, tmp_path):
    out, m = converted
    assert imagenet.convert_to_array_record(str(raw), out, records_per_shard=8, progress=False) == m
    os.makedirs(tmp_path / "c")
    m1 = imagenet.convert_to_array_record(str(raw), str(tmp_path / "c"), records_per_shard=8, progress=False)
    man = json.load(open(tmp_path / "c" / "manifest.json"))
    man["complete"] = False  # simulate a run killed after shard 0: only shard 0 and the plan remain
    json.dump(man, open(tmp_path / "c" / "manifest.json", "w"))
    for s in m1["shards"][1:]:
        os.remove(tmp_path / "c" / s)
    first = os.stat(tmp_path / "c" / m1["shards"][0]).st_mtime_ns
    assert imagenet.convert_to_array_record(str(raw), str(tmp_path / "c"), records_per_shard=8, progress=False) == m1
    assert os.stat(tmp_path / "c" / m1["shards"][0]).st_mtime_ns == first  # finished shard kept, not rewritten
    with pytest.raises(ValueError, match="other settings"):
        man["complete"] = False
        json.dump(man, open(tmp_path / "c" / "manifest.json", "w"))
        imagenet.convert_to_array_record(str(raw), str(tmp_path / "c"), records_per_shard=5, progress=False)


def test_folder_layout_counts_corrupt(folder):
    src = imagenet.open_image_source(folder)
    assert src.kind == "folder" and len(src) == 20
    items = [src[i] for i in range(20)]
    assert sum(it["image"] is None for it in items) == 1 and src.num_corrupt == 1
    assert [int(it["label"]) for it in items].count(2) == 6


def test_tfds_prepared_layout_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import splits as splits_lib
    from tensorflow_datasets.proto import tf_example_pb2
    b = tfds.builder("imagenet2012", data_dir=str(tmp_path), file_format="array_record")
    os.makedirs(b.data_dir)
    w = ArrayRecordWriter(f"{b.data_dir}/imagenet2012-train.array_record-00000-of-00001", "group_size:1")
    rng = np.random.default_rng(2)
    for i in range(6):  # tfds stores serialized tf.train.Example protos: image bytes, label, file name
        ex = tf_example_pb2.Example()
        ex.features.feature["image"].bytes_list.value.append(_jpeg(rng, 36, 48))
        ex.features.feature["label"].int64_list.value.append(i * 100)
        ex.features.feature["file_name"].bytes_list.value.append(f"x_{i}.JPEG".encode())
        w.write(ex.SerializeToString())
    w.close()
    b.info.set_splits(splits_lib.SplitDict([splits_lib.SplitInfo(name="train", shard_lengths=[6], num_bytes=0,
                                                                 filename_template=None)]))
    b.info.write_to_directory(b.data_dir)
    it = pipeline.make_train_iterator("images", str(tmp_path), image_size=32, global_batch_size=6, seed=0,
                                      process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (6, 32, 32, 3) and sorted(batch["label"].tolist()) == [0, 100, 200, 300, 400, 500]
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------------------------ pipeline
def _images(path, seed=0, pi=0, pc=1, bs=4, **kw):
    return pipeline.make_train_iterator("images", path, image_size=32, global_batch_size=bs, seed=seed,
                                        process_index=pi, process_count=pc, **kw)


def test_images_batches_are_cropped_flipped_and_deterministic(converted):
    out, _ = converted
    a, b, c = _images(out), _images(out), _images(out, seed=1)
    ba = [next(a) for _ in range(3)]
    bb = [next(b) for _ in range(3)]
    assert ba[0]["image"].shape == (4, 32, 32, 3) and ba[0]["image"].dtype == np.float32
    assert ba[0]["label"].dtype == np.int32
    for x, y in zip(ba, bb):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(ba[0]["image"], next(c)["image"])
    # Every image equals the ADM crop of some source image, either as is or mirrored.
    src = imagenet.open_image_source(out)
    crops = [transforms.preprocess(src[i]["image"], 32, False) for i in range(len(src))]
    flips = 0
    for x, lab in zip(np.concatenate([q["image"] for q in ba]), np.concatenate([q["label"] for q in ba])):
        hits = [(i, f) for i, cr in enumerate(crops) for f in (0, 1) if np.array_equal(x, cr[:, ::-1] if f else cr)]
        assert len(hits) == 1 and int(src[hits[0][0]]["label"]) == lab
        flips += hits[0][1]
    assert 0 < flips < 12  # both orientations occur


def test_two_hosts_read_disjoint_shards(converted):
    out, _ = converted
    seen = []
    for pi in range(2):
        it = _images(out, pi=pi, pc=2, bs=6, num_epochs=1)  # 19 records -> 9 per host -> 3 batches of 3
        batches = list(it)
        assert len(batches) == 3 and all(q["image"].shape == (3, 32, 32, 3) for q in batches)
        seen.append({round(float(x.sum()), 2) for q in batches for x in q["image"]})  # flip-invariant identity
    assert len(seen[0]) == len(seen[1]) == 9 and not seen[0] & seen[1]
    # Shards are contiguous index ranges, so the fixed permutation must spread each half over the whole dataset.
    first_half = [pipeline.Permuted(list(range(1000)), seed=0)[i] for i in range(500)]
    assert 200 < sum(x < 500 for x in first_half) < 300


def test_iterator_state_restores_position(converted):
    out, _ = converted
    it = _images(out, seed=3)
    for _ in range(5):  # crosses an epoch boundary (19 records, batches of 4)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = _images(out, seed=3)
    it2.set_state(state)
    for w in want:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], w["image"])
        np.testing.assert_array_equal(got["label"], w["label"])


def test_worker_process_gives_same_batches(lat):
    out, _ = lat
    kw = dict(image_size=32, global_batch_size=4, seed=5, process_index=0, process_count=1)
    a = pipeline.make_train_iterator("latents", out, workers=0, **kw)
    b = pipeline.make_train_iterator("latents", out, workers=1, **kw)
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["moments"], next(b)["moments"])


def test_bad_paths_say_what_to_do(raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _images(str(tmp_path / "nope"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="does not look like ImageNet"):
        _images(str(tmp_path))
    with pytest.raises(ValueError, match="terdit_jax.data.imagenet convert"):
        _images(str(raw))
    with pytest.raises(ValueError, match="multiple of process_count"):
        _images(str(raw), pc=2, bs=3)


# ------------------------------------------------------------------------------------------------- latents
def test_extract_latents_contents(converted, lat):
    out, m = lat
    assert m["complete"] and m["num_records"] == 19 and m["num_skipped"] == 1 and m["moments_shape"] == [2, 4, 4, 8]
    assert m["num_shards"] == 4  # ceil(20 source files / 6)
    src, ls = imagenet.open_image_source(converted[0]), latents.LatentSource(out)
    for i in (0, 11, 18):
        want = _encode(transforms.preprocess(src[i]["image"], 32, False)[None])[0]
        got = ls[i]
        np.testing.assert_allclose(got["moments"][0], want, atol=1e-6)
        np.testing.assert_allclose(got["moments"][1], want[:, ::-1], atol=1e-6)  # stored flip copy
        assert got["label"] == src[i]["label"]


def test_extract_latents_resumes_only_missing_shards(folder, lat, tmp_path):
    out, m = lat
    calls = []

    def enc(x):
        calls.append(len(x))
        return _encode(x)
    d = str(tmp_path / "l")
    latents.extract_latents(folder, enc, d, image_size=32, batch_size=4, records_per_shard=6, progress=False)
    man = json.load(open(os.path.join(d, "manifest.json")))
    man["complete"] = False
    json.dump(man, open(os.path.join(d, "manifest.json"), "w"))
    os.remove(os.path.join(d, m["shards"][1]))  # killed while writing shard 1: only its tmp file is left
    open(os.path.join(d, m["shards"][1] + ".tmp"), "wb").write(b"partial")
    calls.clear()
    m2 = latents.extract_latents(folder, enc, d, image_size=32, batch_size=4, records_per_shard=6, progress=False)
    assert calls == [8, 8] and m2 == m  # shard 1: 5 good images + 1 corrupt -> 2 padded batches of 4 (+ flips)
    a, b = latents.LatentSource(d), latents.LatentSource(out)
    assert len(a) == len(b) == 19 and all(np.array_equal(a[i]["moments"], b[i]["moments"]) for i in range(19))


def test_two_processes_split_extraction(folder, tmp_path):
    d = str(tmp_path / "l")
    kw = dict(image_size=32, batch_size=4, records_per_shard=6, progress=False, process_count=2)
    first = latents.extract_latents(folder, _encode, d, process_index=0, **kw)
    assert not first["complete"] and first["shards_done"] == 2  # shards 0 and 2 of 4
    assert latents.extract_latents(folder, _encode, d, process_index=1, **kw)["complete"]


def test_latent_pipeline_and_shape_errors(converted, lat, tmp_path):
    out, _ = lat
    it = pipeline.make_train_iterator("latents", out, image_size=32, global_batch_size=4, seed=0,
                                      process_index=1, process_count=2)
    b = next(it)
    assert b["moments"].shape == (2, 4, 4, 8) and b["moments"].dtype == np.float32 and b["label"].dtype == np.int32
    ls = latents.LatentSource(out)
    stored = [(int(ls[i]["label"]), v, ls[i]["moments"][v]) for i in range(len(ls)) for v in (0, 1)]
    views = []
    for q in [b] + [next(it) for _ in range(9)]:  # each item is one stored view, picked at random
        for x, lab in zip(q["moments"], q["label"]):
            views += [v for l, v, m in stored if l == lab and np.array_equal(m, x)]
    assert len(views) == 20 and 0 < sum(views) < 20
    with pytest.raises(ValueError, match="extracted at 32 px"):
        pipeline.make_train_iterator("latents", out, image_size=64, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="encode_fn returned moments of shape"):
        latents.extract_latents(converted[0], lambda x: x, str(tmp_path / "e"), image_size=32, progress=False)
    bad = str(tmp_path / "bad")  # shards from a 64 px extraction under a 32 px manifest
    latents.extract_latents(converted[0], _encode, bad, image_size=64, batch_size=4, records_per_shard=20, progress=False)
    man = json.load(open(os.path.join(bad, "manifest.json")))
    man.update(image_size=32, moments_shape=[2, 4, 4, 8])
    json.dump(man, open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(ValueError, match=r"has shape \[2, 8, 8, 8\].*extract_latents again"):
        latents.LatentSource(bad)[0]


def test_sample_latents_statistics():
    mean = np.linspace(-2, 2, 4, dtype=np.float32)
    m = np.concatenate([np.broadcast_to(mean, (4096, 4)), np.full((4096, 4), np.log(0.25), np.float32)], -1)
    z = np.asarray(latents.sample_latents(m, jax.random.key(0), scale=2.0))
    assert z.shape == (4096, 4)
    np.testing.assert_allclose(z.mean(0), 2 * mean, atol=0.05)
    np.testing.assert_allclose(z.std(0), 2 * 0.5, atol=0.05)  # std = exp(logvar / 2) = 0.5, times scale
    np.testing.assert_array_equal(z, latents.sample_latents(m, jax.random.key(0), scale=2.0))
    big = np.concatenate([np.zeros((8, 4)), np.full((8, 4), 100.0)], -1)  # logvar clipped to 20
    assert np.abs(np.asarray(latents.sample_latents(big, jax.random.key(1), 1.0))).max() < 6 * np.exp(10)
