"""What a training example is conditioned on, how it is stored in a latent shard, and its classifier-free-guidance
dropout, for every kind of condition at once.

Two kinds, chosen by the model family (`takes_captions`):
  'label'    y (B,) int32; the null condition is the class `model.num_classes` (the LabelEmbedder's extra row).
  'caption'  y = (caption (B, L, C) float32, mask (B, L) int32); the null condition is the empty prompt's
             (null_caption (L, C), null_mask (L,)), the same that sampling's CFG uses (`text.captions`).

Dropout (DiT's label dropout; PixArt's caption dropout, `uncond_prob` 0.1) is one rule for any pytree y: each
example's whole condition becomes the null one with probability p (`drop`). PixArt's own code swaps only the
caption tokens for its `y_embedding` and keeps the caption's mask; we swap the mask too, so that training sees the
exact unconditional input that CFG feeds at sampling time.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from terdit_jax.models.families import family_of
from terdit_jax.registry import Registry
from terdit_jax.text.captions import Captions


def takes_captions(model_cfg) -> bool:
    """Whether the family conditions on caption tokens: it reads model.caption_channels (its registry entry does not
    list it among the fields it ignores)."""
    return "caption_channels" not in family_of(model_cfg).unused_fields


def kind_of(model_cfg) -> str:
    return "caption" if takes_captions(model_cfg) else "label"


def drop(y, null_y, dropped: jax.Array):
    """y with example i replaced by null_y wherever dropped[i]. y: a pytree whose leaves lead with B; null_y: the
    same pytree for one example (or a scalar label); dropped: (B,) bool."""
    def one(a, u):
        return jnp.where(dropped.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.asarray(u, a.dtype), a)
    return jax.tree.map(one, y, null_y)


# ----------------------------------------------------------------------------------------- records in latent shards

@dataclasses.dataclass(frozen=True)
class LabelRecords:
    """Writes a class label per record: {'label': int} from the source item's 'label'."""
    kind = "label"

    def pack(self, item: dict) -> dict:
        return {"label": int(item["label"])}

    def manifest(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class CaptionRecords:
    """Writes caption tokens per record, looked up in `captions` by the source item's 'caption_index'.

    A record holds the tokens up to the last unmasked one ('tokens': bytes of `dtype` (n, C), 'tmask': int8 (n,))
    and the caption's index; reading pads them back to L with zeros. Padding tokens are masked out of the
    cross-attention and projected token by token, so their values never reach the output; leaving them out keeps a
    T5-XXL caption of ~40 of 120 tokens at a third of the size. Tokens live in the shards, not as an index into one
    embeddings file, because in a real data set nearly every image has its own caption: the embeddings then weigh
    as much as the shards (120×4096 float32 = 2 MB per caption) and could not all sit in each host's memory, while
    shards stream from disk and split over hosts like the latents.
    """
    captions: Captions
    dtype: str = "float32"
    kind = "caption"

    def pack(self, item: dict) -> dict:
        i = int(item["caption_index"])
        mask = self.captions.mask[i]
        n = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else 0
        return {"caption_index": i, "n": n, "tokens": self.captions.caption[i, :n].astype(self.dtype).tobytes(),
                "tmask": mask[:n].astype(np.int8).tobytes()}

    def manifest(self) -> dict:
        _, length, width = self.captions.caption.shape
        return {"caption_len": int(length), "caption_channels": int(width), "caption_dtype": self.dtype}


def _unpack_label(record: dict, manifest: dict) -> dict:
    return {"label": np.int32(record["label"])}


def _unpack_caption(record: dict, manifest: dict) -> dict:
    """→ {'caption': float32 (L, C), 'mask': int32 (L,), 'caption_index': int32}."""
    n, length, width = int(record["n"]), manifest["caption_len"], manifest["caption_channels"]
    caption, mask = np.zeros((length, width), np.float32), np.zeros((length,), np.int32)
    caption[:n] = np.frombuffer(record["tokens"], manifest["caption_dtype"]).reshape(n, width)
    mask[:n] = np.frombuffer(record["tmask"], np.int8)
    return {"caption": caption, "mask": mask, "caption_index": np.int32(record["caption_index"])}


@dataclasses.dataclass(frozen=True)
class Condition:
    """unpack(record, manifest) → the record's condition arrays; y(batch) → the model's y from a batch of them;
    ndims: the ranks of y's leaves with the batch axis (what their shardings are built from)."""
    unpack: Callable[[dict, dict], dict]
    y: Callable[[dict], object]
    ndims: object


CONDITIONS: Registry[Condition] = Registry("condition kind", {
    "label": Condition(unpack=_unpack_label, y=lambda b: np.asarray(b["label"], np.int32), ndims=1),
    "caption": Condition(unpack=_unpack_caption,
                         y=lambda b: (np.asarray(b["caption"], np.float32), np.asarray(b["mask"], np.int32)),
                         ndims=(3, 2)),
})


def check_captions(captions: Captions, model_cfg, what: str) -> Captions:
    """captions, or a CaptionError when their token count or width is not the model's."""
    return captions.check(int(model_cfg.caption_channels), int(model_cfg.caption_len), what)
