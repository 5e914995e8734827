"""Input preprocessing of the TF-2015 Inception graph as the ADM evaluator feeds it.

The evaluator feeds float32 NHWC pixels in [0, 255] at ``ExpandDims:0``; the graph then resizes bilinearly to 299x299
with TF1's *legacy* kernel (``align_corners=False``, no half-pixel centres) and maps pixels to ``(x - 128) / 128``.
``jax.image.resize`` uses half-pixel centres and differs by up to ~32 grey levels at 256->299, so it is not used.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299


def _legacy_taps(out_size: int, in_size: int):
    """Source rows/cols and weights of TF1 ResizeBilinear (tensorflow/core/kernels/image/resize_bilinear_op.cc,
    LegacyScaler): src = i * (in/out) in float32, lower = floor(src), upper = min(ceil(src), in-1),
    lerp = src - floor(src)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int32)
    upper = np.minimum(np.ceil(src).astype(np.int32), in_size - 1)
    return lower, upper, (src - np.floor(src)).astype(np.float32)


def tf1_resize_bilinear(x, out_h: int, out_w: int):
    """TF1 legacy bilinear resize (``tf.compat.v1.image.resize_bilinear``, align_corners=False).

    x: (N, H, W, C) array, any real dtype; returns float32 (N, out_h, out_w, C). Works inside jit (taps are static).
    Interpolates as TF does, ``a + (b - a) * t``, first along width then along height.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"tf1_resize_bilinear expects NHWC images, got shape {x.shape}")
    if x.shape[1:3] == (out_h, out_w):  # scale 1: every lerp is 0, so TF returns the input unchanged
        return x
    y0, y1, fy = _legacy_taps(out_h, x.shape[1])
    x0, x1, fx = _legacy_taps(out_w, x.shape[2])
    fx = jnp.asarray(fx)[None, None, :, None]
    rows0, rows1 = jnp.take(x, y0, axis=1), jnp.take(x, y1, axis=1)
    top = jnp.take(rows0, x0, axis=2) + (jnp.take(rows0, x1, axis=2) - jnp.take(rows0, x0, axis=2)) * fx
    bot = jnp.take(rows1, x0, axis=2) + (jnp.take(rows1, x1, axis=2) - jnp.take(rows1, x0, axis=2)) * fx
    return top + (bot - top) * jnp.asarray(fy)[None, :, None, None]


def to_rgb_nhwc(images: np.ndarray) -> np.ndarray:
    """Checks a batch of uint8 images and returns it as (N, H, W, 3).

    Accepts (N, H, W), (N, H, W, 1) greyscale (repeated to 3 channels) and (N, H, W, 3).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] (the ADM sample layout), got dtype {images.dtype}; "
                         "convert with np.clip(np.round(x), 0, 255).astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def inception_input(images):
    """uint8/float (N, H, W, 3) pixels in [0, 255] -> network input (N, 299, 299, 3) in [-1, 1), as the graph does."""
    x = tf1_resize_bilinear(images, INCEPTION_SIZE, INCEPTION_SIZE)
    return (x - 128.0) * (1.0 / 128.0)  # graph ops Sub(128) then Mul(1/128) = exactly 0.0078125
