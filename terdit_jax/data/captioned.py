"""An image folder with one caption per image, for `--mode extract_latents` of a text-to-image model.

Captions come in one of two layouts:
  * a caption file (`data.caption_file`): one line per image, `relative/path.jpg<TAB>caption` (UTF-8; blank lines
    and lines starting with '#' are skipped), paths relative to the image folder;
  * no caption file: next to every image `name.jpg` a `name.txt` holding its caption (as many datasets ship).

The caption embeddings are computed elsewhere (the T5 encoder) and given as a `text.captions` file whose `prompts`
are the captions; each image is matched to its caption's index there.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from terdit_jax.data.transforms import decode_rgb
from terdit_jax.text.captions import Captions

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class CaptionFileError(ValueError):
    """An image folder or caption file that cannot be read as image–caption pairs; the message says what to fix."""


def read_caption_file(path: str) -> list[tuple[str, str]]:
    """`path<TAB>caption` lines → [(relative path, caption)] in file order."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            name, tab, caption = line.partition("\t")
            if not tab or not name.strip() or not caption.strip():
                raise CaptionFileError(f"{path}:{n}: expected 'relative/path.jpg<TAB>caption', got {line[:80]!r}")
            pairs.append((name.strip(), caption.strip()))
    if not pairs:
        raise CaptionFileError(f"{path} holds no 'path<TAB>caption' line")
    return pairs


def sidecar_captions(root: str) -> list[tuple[str, str]]:
    """Every image under `root` (sorted) with the caption in its `<stem>.txt`."""
    pairs, missing = [], []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTS:
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            txt = os.path.join(dirpath, os.path.splitext(f)[0] + ".txt")
            if not os.path.isfile(txt):
                missing.append(rel)
                continue
            with open(txt, encoding="utf-8") as fh:
                pairs.append((rel, " ".join(fh.read().split())))
    if missing:
        raise CaptionFileError(f"{root}: {len(missing)} images have no caption (<name>.txt next to them), e.g. "
                               f"{missing[:3]}; add them or give a caption file (--config.data.caption_file)")
    if not pairs:
        raise CaptionFileError(f"{root} holds no image ({', '.join(IMAGE_EXTS)}) with a <name>.txt caption")
    return pairs


class CaptionedImages:
    """Random-access source: `src[i] -> {'image': uint8 (H, W, 3) or None if corrupt, 'caption_index': int32}`,
    the index of image i's caption in `captions.prompts`."""

    def __init__(self, root: str, captions: Captions, caption_file: str = ""):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (config.data.image_path)")
        pairs = read_caption_file(caption_file) if caption_file else sidecar_captions(root)
        index = {p: i for i, p in enumerate(captions.prompts)}
        unknown = sorted({c for _, c in pairs if c not in index})
        if unknown:
            raise CaptionFileError(f"{len(unknown)} captions are not among the {len(captions)} prompts of the caption "
                                   f"embeddings (config.data.caption_embeds), e.g. {unknown[:3]}; encode every "
                                   "caption of the data set into that file")
        missing = [n for n, _ in pairs if not os.path.isfile(os.path.join(root, n))]
        if missing:
            raise CaptionFileError(f"{len(missing)} images named in the caption file are not in {root}, e.g. "
                                   f"{missing[:3]}")
        self.root, self.num_corrupt = root, 0
        self.files = [n for n, _ in pairs]
        self.caption_index = np.asarray([index[c] for _, c in pairs], np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        name = self.files[i]
        try:
            with open(os.path.join(self.root, name), "rb") as f:
                image = np.asarray(decode_rgb(f.read(), name))
        except Exception as e:  # pylint: disable=broad-except  # one bad file must not stop the extraction
            self.num_corrupt += 1
            log.warning("skipping corrupt image %s (%d so far): %s", name, self.num_corrupt, e)
            image = None
        return {"image": image, "caption_index": self.caption_index[i]}
