"""Image preprocessing for ImageNet training, matching the ADM / DiT / TerDiT recipe.

The official TerDiT training code (via DiT) uses guided-diffusion's ``center_crop_arr`` followed by
``RandomHorizontalFlip`` and ``Normalize(0.5, 0.5)``. Everything here works on single images in
numpy NHWC (no batch axis) so that it can run inside grain worker processes.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


class CorruptImageError(ValueError):
    """An image's bytes could not be decoded (truncated, not an image, unsupported format)."""


def decode_rgb(data: bytes | np.ndarray, name: str = "image") -> Image.Image:
    """Decodes encoded image bytes (JPEG, PNG, CMYK JPEG...) or a uint8 (H, W[, C]) array to an RGB PIL image.

    Raises CorruptImageError naming ``name`` if the bytes are not a readable image.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"{name}: expected a uint8 (H, W) or (H, W, C) array, got {data.dtype} {data.shape}")
        img = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
        return img.convert("RGB")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode now so truncated files fail here, not later inside a resize
        return img.convert("RGB")  # ImageNet has a few CMYK and greyscale JPEGs
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on how the file is broken
        raise CorruptImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion ``image_datasets.center_crop_arr``, also used by DiT and TerDiT).

    Halves the image with a BOX filter while its short side is at least 2*image_size (cheap anti-aliasing),
    then BICUBIC-resizes so the short side equals image_size, then takes the central square.
    Returns uint8 (image_size, image_size, 3).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(pil_image.size)
    # Python round() (half to even), as in the reference, so sizes agree pixel for pixel.
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def hflip(x: np.ndarray) -> np.ndarray:
    """Mirrors an (..., H, W, C) array left-right."""
    return x[..., ::-1, :]


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]; same as torchvision ToTensor then Normalize(0.5, 0.5)."""
    return x.astype(np.float32) / 127.5 - 1.0


def preprocess(data: bytes | np.ndarray, image_size: int, flip: bool, name: str = "image") -> np.ndarray:
    """Decode, ADM-crop, optionally mirror and scale one image. Returns float32 (image_size, image_size, 3) in [-1, 1]."""
    arr = center_crop_arr(decode_rgb(data, name), image_size)
    return to_float(hflip(arr) if flip else arr)
