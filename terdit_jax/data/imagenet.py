"""ImageNet (ILSVRC2012 train) sources for training, none of which imports TensorFlow.

Three layouts can be read by ``open_image_source(path)``:

* a tfds ``imagenet2012`` that was already prepared with ``file_format='array_record'`` (read with
  ``tfds.data_source``; preparing it needs TensorFlow once, reading it does not);
* this project's own ArrayRecord conversion (``convert_to_array_record``), made without TensorFlow from
  ``ILSVRC2012_img_train.tar`` (one ``nXXXXXXXX.tar`` per class inside) or from an extracted
  ``train/nXXXXXXXX/*.JPEG`` folder;
* an extracted ``train/nXXXXXXXX/*.JPEG`` folder, read file by file (slow on network disks; convert instead).

Every source is a random-access sequence whose items are ``{'image': uint8 (H, W, 3) or None, 'label': int32}``.
``image`` is None when the stored bytes are corrupt: the item is counted, logged and later dropped by the pipeline.
Labels are the index of the synset in the sorted list of synsets (0..999 for the full dataset), which is also
tfds's order. (The released TerDiT checkpoints use another order; see reference/terdit_official.md §3.1.)
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import tarfile
from typing import Iterator

import msgpack
import numpy as np

from terdit_jax.data.transforms import CorruptImageError, decode_rgb

log = logging.getLogger(__name__)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGES_KIND = "imagenet_images"
_SYNSET = re.compile(r"^n\d{8}$")
_HOWTO = ("Give one of: a tfds data_dir holding imagenet2012/<version>/ prepared with file_format='array_record'; "
          "a directory made by `python -m terdit_jax.data.imagenet convert SRC OUT`; or an extracted "
          "train/nXXXXXXXX/*.JPEG folder. See the README section 'ImageNet'.")


# ----------------------------------------------------------------------------------------------- shard files
def write_array_record(path: str, records: list[bytes], meta: dict) -> None:
    """Writes one finished shard atomically: a sidecar ``<path>.json`` with ``meta``, then the shard via tmp + rename.

    The shard's existence is the sign that both files are complete, which is what resuming relies on.
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    with open(path + ".json.tmp", "w") as f:
        json.dump(meta, f)
    os.replace(path + ".json.tmp", path + ".json")
    # group_size 1: cheapest random access; uncompressed: JPEG bytes and float latents hardly compress, and
    # skipping decompression reads latents ~4x faster.
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1,uncompressed")
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(path + ".tmp", path)


def write_json(path: str, obj: dict) -> None:
    """Writes JSON atomically (tmp + rename) so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_manifest(path: str, kind: str) -> dict:
    """Loads ``path/manifest.json`` and checks it describes a finished dataset of ``kind``."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path} has no manifest.json, so it is not a finished {kind} directory.")
    with open(mpath) as f:
        m = json.load(f)
    if m.get("kind") != kind:
        raise ValueError(f"{mpath} describes a {m.get('kind')!r} dataset, expected {kind!r}.")
    if not m.get("complete"):
        raise ValueError(f"{path} is an unfinished {kind} conversion ({m.get('shards_done', '?')} of "
                         f"{m.get('num_shards', '?')} shards). Re-run the same command to resume it.")
    missing = [s for s in m["shards"] if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"{path}: manifest lists shards that are missing, e.g. {missing[:3]}. "
                                "Copy the whole directory, or convert again into an empty directory.")
    return m


# ------------------------------------------------------------------------------------------- raw layouts
def _synset_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if _SYNSET.match(d) and os.path.isdir(os.path.join(root, d)))


def find_layout(path: str) -> tuple[str, str]:
    """Works out which ImageNet layout ``path`` holds. Returns (kind, root) with kind in
    {'converted', 'tfds', 'folder', 'train_tar'}; raises FileNotFoundError / ValueError with a fix otherwise."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"ImageNet path {path!r} does not exist. {_HOWTO}")
    if os.path.isfile(path):
        if tarfile.is_tarfile(path):
            return "train_tar", path
        raise ValueError(f"{path!r} is a file but not a tar archive; expected {TRAIN_TAR}. {_HOWTO}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return "converted", path
    for cand in (path, os.path.join(path, "imagenet2012")):
        if os.path.isfile(os.path.join(cand, "dataset_info.json")):  # a version directory
            return "tfds", os.path.dirname(os.path.dirname(cand.rstrip("/")))
        if os.path.isdir(cand) and os.path.basename(cand.rstrip("/")) == "imagenet2012":
            return "tfds", os.path.dirname(cand.rstrip("/"))
    for cand in (path, os.path.join(path, "train")):
        if os.path.isdir(cand) and _synset_dirs(cand):
            return "folder", cand
    if os.path.isfile(os.path.join(path, TRAIN_TAR)):
        return "train_tar", os.path.join(path, TRAIN_TAR)
    found = sorted(os.listdir(path))[:8]
    raise ValueError(f"{path!r} does not look like ImageNet: no manifest.json, imagenet2012/, nXXXXXXXX/ or train/nXXXXXXXX/ "
                     f"class folders, nor {TRAIN_TAR} (found {found}). {_HOWTO}")


def iter_raw_train(path: str) -> tuple[list[str], Iterator[tuple[str, bytes, int]]]:
    """Streams the raw training set in a fixed order (sorted synsets, then file order).

    ``path``: ILSVRC2012_img_train.tar (or a directory holding it), or a train/nXXXXXXXX/*.JPEG folder.
    Returns (sorted synsets, iterator of (file_name, encoded bytes, label)).
    """
    kind, root = find_layout(path)
    if kind == "folder":
        synsets = _synset_dirs(root)

        def gen():
            for label, s in enumerate(synsets):
                for name in sorted(os.listdir(os.path.join(root, s))):
                    with open(os.path.join(root, s, name), "rb") as f:
                        yield name, f.read(), label
        return synsets, gen()
    if kind != "train_tar":
        raise ValueError(f"{path!r} is a {kind} dataset, not raw ImageNet; it can be read directly with open_image_source.")
    outer = tarfile.open(root)
    members = {os.path.basename(m.name)[:-4]: m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")}
    synsets = sorted(s for s in members if _SYNSET.match(s))
    if not synsets:
        raise ValueError(f"{root!r} holds no nXXXXXXXX.tar class archives (members: {sorted(members)[:5]}). "
                         f"Expected the ILSVRC2012 training tar, {TRAIN_TAR}.")

    def gen():
        with outer:
            for label, s in enumerate(synsets):
                with tarfile.open(fileobj=outer.extractfile(members[s]), mode="r|") as inner:  # stream, no temp files
                    for m in inner:
                        if m.isfile():
                            yield os.path.basename(m.name), inner.extractfile(m).read(), label
    return synsets, gen()


def _check_image(item: tuple[str, bytes, int]) -> bool:
    try:
        decode_rgb(item[1], item[0])
        return True
    except CorruptImageError as e:
        log.warning("skipping corrupt image: %s", e)
        return False


def convert_to_array_record(src: str, out_dir: str, *, records_per_shard: int = 5000, verify: bool = True,
                            threads: int = 8, progress: bool = True) -> dict:
    """Converts raw ImageNet train (tar of class tars, or class folders) to ArrayRecord shards, without TensorFlow.

    Each record is msgpack ``{'jpeg': original bytes, 'label': int, 'file_name': str}``; the original bytes are kept so
    any resolution can be cropped later. With ``verify`` every image is fully decoded first (``threads`` in
    parallel) and corrupt ones are skipped and listed in the manifest. Shard k holds the k-th block of
    ``records_per_shard`` source files, written atomically, so an interrupted run resumes by skipping finished shards.
    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    synsets, items = iter_raw_train(src)
    os.makedirs(out_dir, exist_ok=True)
    plan = {"kind": IMAGES_KIND, "source": os.path.abspath(src), "records_per_shard": records_per_shard,
            "synsets": synsets, "complete": False}
    mpath = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        if old.get("complete"):
            return old
        if (old.get("records_per_shard"), old.get("synsets")) != (records_per_shard, synsets):
            raise ValueError(f"{out_dir} holds an unfinished conversion with other settings; use an empty out_dir or "
                             f"records_per_shard={old.get('records_per_shard')}.")
    write_json(mpath, plan)
    shards, block, k = [], [], 0
    bar = tqdm(desc="convert imagenet", unit="img", disable=not progress)
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def flush(block, k):
        name = f"images-{k:05d}.array_record"
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):  # not done by an earlier, interrupted run
            ok = list(pool.map(_check_image, block)) if verify else [True] * len(block)
            recs = [msgpack.packb({"jpeg": b, "label": l, "file_name": n}) for (n, b, l), good in zip(block, ok) if good]
            write_array_record(path, recs, {"records": len(recs), "skipped": [n for (n, _, _), g in zip(block, ok) if not g]})
        shards.append(name)
        bar.update(len(block))

    for item in items:
        block.append(item)
        if len(block) == records_per_shard:
            flush(block, k)
            block, k = [], k + 1
    if block:
        flush(block, k)
    bar.close()
    pool.shutdown()
    metas = [read_json(os.path.join(out_dir, s + ".json")) for s in shards]
    manifest = dict(plan, complete=True, shards=shards, num_shards=len(shards),
                    num_records=sum(m["records"] for m in metas), skipped=[n for m in metas for n in m["skipped"]])
    write_json(mpath, manifest)
    log.info("converted %d images (%d corrupt skipped) into %s", manifest["num_records"], len(manifest["skipped"]), out_dir)
    return manifest


# ------------------------------------------------------------------------------------------ image sources
class ImageSource:
    """Random-access ImageNet train set: ``src[i] -> {'image': uint8 (H, W, 3) or None if corrupt, 'label': int32}``.

    Picklable, so grain worker processes can each open their own copy. ``num_corrupt`` counts corrupt items seen in
    this process.
    """

    def __init__(self, path: str):
        self.path = path
        self.kind, root = find_layout(path)
        self.num_corrupt = 0
        if self.kind == "converted":
            import grain.python as grain  # pylint: disable=import-outside-toplevel
            m = read_manifest(root, IMAGES_KIND)
            self.synsets = m["synsets"]
            self._base = grain.ArrayRecordDataSource([os.path.join(root, s) for s in m["shards"]])
        elif self.kind == "tfds":
            self._base = _open_tfds(root)
            self.synsets = None
        elif self.kind == "folder":
            self.synsets = _synset_dirs(root)
            self._root = root
            self._files = [(f"{s}/{n}", label) for label, s in enumerate(self.synsets)
                           for n in sorted(os.listdir(os.path.join(root, s)))]
        else:
            raise ValueError(f"{path!r} is the raw {TRAIN_TAR}, which has no random access. Convert it once with "
                             f"`python -m terdit_jax.data.imagenet convert {path} OUT_DIR` and train from OUT_DIR.")
        if len(self) == 0:
            raise ValueError(f"ImageNet source {path!r} ({self.kind}) holds no images.")

    def __len__(self) -> int:
        return len(self._files) if self.kind == "folder" else len(self._base)

    def __repr__(self) -> str:  # no path: a checkpoint must still restore after the data directory moved
        return f"ImageSource(kind={self.kind}, len={len(self)})"

    def __getitem__(self, i: int) -> dict:
        name = f"{self.path}[{i}]"
        try:
            if self.kind == "converted":
                rec = msgpack.unpackb(self._base[i])
                name, label, image = rec["file_name"], rec["label"], np.asarray(decode_rgb(rec["jpeg"], rec["file_name"]))
            elif self.kind == "folder":
                rel, label = self._files[i]
                name = rel
                with open(os.path.join(self._root, rel), "rb") as f:
                    image = np.asarray(decode_rgb(f.read(), rel))
            else:
                rec = self._base[i]  # tfds decodes the JPEG itself (cv2 if installed, else PIL)
                label, image = rec["label"], np.asarray(decode_rgb(rec["image"], name))
        except Exception as e:  # pylint: disable=broad-except
            # A bad file must not stop a multi-day run: count it, say which one, and let the pipeline drop it.
            self.num_corrupt += 1
            log.warning("skipping corrupt image %s (%d so far in this process): %s", name, self.num_corrupt, e)
            return {"image": None, "label": np.int32(-1)}
        return {"image": image, "label": np.int32(label)}


def _open_tfds(data_dir: str):
    """tfds.data_source for a prepared imagenet2012, with the usual mistakes turned into instructions."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    base = os.path.join(data_dir, "imagenet2012")
    versions = sorted(v for v in os.listdir(base) if os.path.isfile(os.path.join(base, v, "dataset_info.json")))
    if not versions:
        raise ValueError(f"{base} has no prepared version (no <version>/dataset_info.json). Prepare it first (README, "
                         "'ImageNet', option A), or convert the raw tars with `python -m terdit_jax.data.imagenet convert`.")
    files = os.listdir(os.path.join(base, versions[-1]))
    if not any(".array_record" in f for f in files):
        raise ValueError(f"{base}/{versions[-1]} was prepared without array_record files (found {files[:4]}); grain needs "
                         "random access. Prepare again with download_and_prepare(file_format='array_record').")
    return tfds.data_source("imagenet2012", split="train", data_dir=data_dir, download=False)


def open_image_source(path: str) -> ImageSource:
    """Opens any supported ImageNet layout as a random-access source (see module docstring)."""
    return ImageSource(path)


def main(argv=None):
    import argparse  # pylint: disable=import-outside-toplevel
    p = argparse.ArgumentParser(description="Convert raw ImageNet train to ArrayRecord shards (no TensorFlow).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src", help=f"{TRAIN_TAR}, a directory holding it, or an extracted train/ folder")
    c.add_argument("out_dir")
    c.add_argument("--records_per_shard", type=int, default=5000)
    c.add_argument("--threads", type=int, default=8)
    c.add_argument("--no_verify", action="store_true", help="do not decode every image to find corrupt ones")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    m = convert_to_array_record(a.src, a.out_dir, records_per_shard=a.records_per_shard, verify=not a.no_verify,
                                threads=a.threads)
    print(json.dumps({k: m[k] for k in ("num_records", "num_shards")} | {"num_skipped": len(m["skipped"])}))


if __name__ == "__main__":
    main()
