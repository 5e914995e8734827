"""Caption embeddings: what a text-conditioned family (pixart) samples, calibrates and trains from, and their file.

A text encoder (the Flax T5 of `text.t5`, or any other run elsewhere) turns P prompts into tokens padded to the
model's caption length L, with a mask; classifier-free guidance needs one more, the empty prompt's ("" encoded the
same way, as diffusers' PixArt pipeline does). The file is one `.npz`:

    prompts       (P,)       str
    caption       (P, L, C)  float32, the encoder's last hidden states
    mask          (P, L)     int32, 1 = token, 0 = padding
    null_caption  (L, C)     float32, the empty prompt's
    null_mask     (L,)       int32
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

FIELDS = ("prompts", "caption", "mask", "null_caption", "null_mask")


class CaptionError(ValueError):
    """Caption embeddings that do not fit the model, or a file that is not caption embeddings."""


@dataclasses.dataclass(frozen=True)
class Captions:
    prompts: tuple[str, ...]
    caption: np.ndarray  # (P, L, C) float32
    mask: np.ndarray  # (P, L) int32
    null_caption: np.ndarray  # (L, C) float32
    null_mask: np.ndarray  # (L,) int32

    def __len__(self) -> int:
        return len(self.prompts)

    def condition(self, index) -> tuple[np.ndarray, np.ndarray]:
        """The model's y for the prompts at `index` (int array (N,)): (caption (N, L, C), mask (N, L))."""
        index = np.asarray(index, np.int64)
        return self.caption[index], self.mask[index]

    def null(self) -> tuple[np.ndarray, np.ndarray]:
        """One example's unconditional y for CFG (`samplers.cfg_model_fn`'s null_y): (caption (L, C), mask (L,))."""
        return self.null_caption, self.null_mask

    def check(self, caption_channels: int, caption_len: int, what: str = "caption embeddings") -> "Captions":
        """self, or a CaptionError when the token width or count is not the model's (model.caption_channels,
        model.caption_len)."""
        p, n, c = self.caption.shape
        if (n, c) != (caption_len, caption_channels) or self.null_caption.shape != (caption_len, caption_channels):
            raise CaptionError(f"{what} have {n} tokens of width {c} (empty prompt: {self.null_caption.shape}), but "
                               f"the model takes {caption_len} tokens of width {caption_channels} "
                               f"(model.caption_len, model.caption_channels): encode the prompts with the model's "
                               f"text encoder and token limit")
        return self


def make(prompts, caption, mask, null_caption, null_mask) -> Captions:
    """Captions with the file's dtypes, checking that the arrays agree with each other."""
    caption, mask = np.asarray(caption, np.float32), np.asarray(mask, np.int32)
    null_caption, null_mask = np.asarray(null_caption, np.float32), np.asarray(null_mask, np.int32)
    prompts = tuple(str(p) for p in prompts)
    if caption.ndim != 3 or mask.shape != caption.shape[:2] or len(prompts) != len(caption):
        raise CaptionError(f"caption {caption.shape}, mask {mask.shape} and {len(prompts)} prompts do not fit "
                           f"(P, L, C), (P, L), P")
    if null_caption.shape != caption.shape[1:] or null_mask.shape != caption.shape[1:2]:
        raise CaptionError(f"the empty prompt's caption {null_caption.shape} and mask {null_mask.shape} must be "
                           f"{caption.shape[1:]} and {caption.shape[1:2]}")
    return Captions(prompts, caption, mask, null_caption, null_mask)


def write(path: str, captions: Captions) -> None:
    """Write the `.npz` whole or not at all (a temporary file, then a rename)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, prompts=np.asarray(captions.prompts, dtype=str),
             **{f: getattr(captions, f) for f in FIELDS if f != "prompts"})
    os.replace(tmp, path)


def read(path: str) -> Captions:
    """Caption embeddings from `path` (see the module docstring), or a CaptionError saying what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in FIELDS if k not in f.files]
            if missing:
                raise CaptionError(f"{path} is not a caption-embeddings file: it lacks {', '.join(missing)} "
                                   f"(expected {', '.join(FIELDS)})")
            return make(*(f[k] for k in FIELDS))
    except (OSError, ValueError) as e:
        if isinstance(e, CaptionError):
            raise
        raise CaptionError(f"cannot read caption embeddings from {path}: {e}") from None
