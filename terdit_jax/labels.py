"""Class-label orders: ImageNet class indices and the order the released TerDiT weights were trained with.

The released models were trained on an ImageFolder with class folders "0".."999", whose labels follow the
string sort of the folder names (terdit_official.md §3.1); a packed export records its `label_order` and
sampling maps ImageNet classes to model labels with `to_model_labels`.
"""
from __future__ import annotations

import functools

import numpy as np

LABEL_ORDERS = ("imagenet", "official_string_sorted")


@functools.lru_cache(maxsize=None)
def _string_sorted(num_classes: int) -> tuple[str, ...]:
    return tuple(sorted(str(i) for i in range(num_classes)))


def official_label(k: int, num_classes: int = 1000) -> int:
    """ImageNet class k → the label the released TerDiT models use: the index of str(k) among the sorted
    strings "0".."999" (torchvision ImageFolder over folders named by class index; TerDiT `class_to_idx.json`).
    E.g. 0→0, 10→2, 100→3, 207→121."""
    if not 0 <= int(k) < num_classes:
        raise ValueError(f"class {k} is outside [0, {num_classes})")
    return _string_sorted(num_classes).index(str(int(k)))


def official_label_table(num_classes: int = 1000) -> np.ndarray:
    """table[k] = official_label(k) for every class k (int32)."""
    order = _string_sorted(num_classes)
    table = np.empty(num_classes, np.int32)
    table[[int(s) for s in order]] = np.arange(num_classes)
    return table


def to_model_labels(labels, manifest: dict) -> np.ndarray:
    """ImageNet class indices → the labels the exported model was trained with (identity for our own
    exports; the string-sorted class order for the released TerDiT weights). The null class (num_classes) is
    passed through unchanged."""
    labels = np.asarray(labels, np.int64)
    n = int(manifest["num_classes"])
    if labels.size and (labels.min() < 0 or labels.max() > n):
        raise ValueError(f"labels must lie in [0, {n}] ({n} = null class), got {labels.min()}..{labels.max()}")
    if manifest.get("label_order", "imagenet") == "imagenet":
        return labels.astype(np.int32)
    table = official_label_table(n)
    return np.where(labels == n, labels, table[np.minimum(labels, n - 1)]).astype(np.int32)
