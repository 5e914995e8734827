"""Reading and writing the ADM sample / reference batch layout, plus a resumable on-disk sample store.

ADM layout (openai/guided-diffusion evaluations): an ``.npz`` with ``arr_0`` = uint8 (N, H, W, 3) images; reference
batches may add precomputed ``mu, sigma`` (pool_3, 2048-d) and ``mu_s, sigma_s`` (spatial, 2023-d). ``arr_0`` is
streamed from the zip member so 50k 256px images (9.8 GB) never sit in memory. Files written here may also carry
``acts_pool_3`` (N, 2048) float32: this project's extension (ADM ignores it) that saves recomputing reference features.
"""
from __future__ import annotations

import glob
import os
import zipfile

import numpy as np

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class NpzArrayStream:
    """Streams one array of an ``.npz`` in batches along axis 0 (the ADM evaluator reads ``arr_0`` the same way)."""

    def __init__(self, path: str, name: str = "arr_0"):
        self.path, self.name = path, name
        with zipfile.ZipFile(path) as zf:
            if f"{name}.npy" not in zf.namelist():
                raise KeyError(f"{path!r} has no {name!r} array (keys: {npz_keys(path)}); an ADM batch keeps its "
                               "images in arr_0")
            with zf.open(f"{name}.npy") as f:
                self.shape, self.dtype, self._offset = _read_npy_header(f)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, start: int = 0):
        """Yields arrays of up to `batch_size` rows, from row `start` to the end."""
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as f:
            f.seek(self._offset + start * row)
            for i in range(start, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - i)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{self.path!r}: {self.name} is truncated at row {i}")
                yield np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError("cannot stream a Fortran-ordered or object array; re-save it with np.savez")
    return shape, dtype, f.tell()


def npz_keys(path: str) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def read_stats(path: str) -> dict | None:
    """Precomputed {mu, sigma, mu_s, sigma_s} of an ADM batch, or None when it has no ``mu`` (ADM: all four or none)."""
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [k for k in STATS_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path!r} has 'mu' but lacks {missing}; ADM reference batches carry all of {STATS_KEYS}")
    with np.load(path) as z:
        return {k: z[k] for k in STATS_KEYS}


def write_npz(path: str, arrays: dict) -> None:
    """Writes arrays as an uncompressed ``.npz`` atomically (temp file, then rename), so a crash leaves no half file."""
    tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_adm_batch(path: str, images: np.ndarray, labels: np.ndarray | None = None, **extra) -> None:
    """Saves uint8 (N, H, W, 3) images as an ADM batch (``arr_0``; ``arr_1`` labels as guided-diffusion's sampler)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"ADM batches hold uint8 NHWC images, got {images.dtype} {images.shape}")
    arrays = {"arr_0": images, **({"arr_1": np.asarray(labels)} if labels is not None else {}), **extra}
    write_npz(path, arrays)


def load_image_folder(folder: str) -> np.ndarray:
    """Reads every image file of a folder (sorted by name) into uint8 (N, H, W, 3); all must have the same size."""
    from PIL import Image

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTS)}) in folder {folder!r}")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder!r} have different sizes {sorted(shapes)[:4]}; resize/crop them first "
                         "(ADM reference batches use center_crop_arr to one size)")
    return np.stack(images)


class SampleStore:
    """Resumable sample output: each finished batch is one shard file, written atomically, named by its first index.

    After an interruption `count()` says how many samples exist, so sampling continues from there; `write_adm` then
    streams the shards into one ADM ``.npz`` without holding all images in memory.
    """

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _shards(self) -> list[tuple[int, str]]:
        out = []
        for f in glob.glob(os.path.join(self.folder, "shard_*.npz")):
            stem = os.path.basename(f)[len("shard_"):-len(".npz")]
            if stem.isdigit():
                out.append((int(stem), f))
        return sorted(out)

    def count(self) -> int:
        """Number of samples in consecutive shards from index 0 (a gap ends the count)."""
        n = 0
        for start, f in self._shards():
            if start != n:
                break
            with np.load(f) as z:
                n += len(z["images"])
        return n

    def add(self, start: int, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Stores samples [start, start + len(images)). images: uint8 (B, H, W, 3); labels: (B,) ints or None."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"samples must be uint8 NHWC, got {images.dtype} {images.shape}")
        arrays = {"images": images, **({"labels": np.asarray(labels)} if labels is not None else {})}
        write_npz(os.path.join(self.folder, f"shard_{start:09d}.npz"), arrays)

    def write_adm(self, path: str, num: int) -> None:
        """Streams the first `num` stored samples into an ADM ``.npz`` (``arr_0``, plus ``arr_1`` if labels exist)."""
        have = self.count()
        if have < num:
            raise ValueError(f"{self.folder!r} holds {have} samples, fewer than the {num} requested; sample the rest")
        shards = [f for s, f in self._shards() if s < num]
        with np.load(shards[0]) as z:
            img_shape, has_labels = z["images"].shape[1:], "labels" in z
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            members = [("arr_0", "images", np.uint8, (num,) + img_shape)]
            if has_labels:
                members.append(("arr_1", "labels", None, (num,)))
            for member, key, dtype, shape in members:
                with zf.open(f"{member}.npy", "w", force_zip64=True) as f:
                    written = 0
                    for shard in shards:
                        with np.load(shard) as z:
                            a = z[key][: num - written]
                        if dtype is None:  # labels: take the dtype of the first shard
                            dtype = a.dtype
                        if written == 0:
                            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                      "shape": shape}
                            np.lib.format.write_array_header_2_0(f, header)
                        f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
                        written += len(a)
        os.replace(tmp, path)
