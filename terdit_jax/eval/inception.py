"""Pure-JAX InceptionV3 equal to the TF "inception-2015-12-05" graph used by the ADM evaluator (and by TTUR FID).

Params are the folded tree from `weights.load_inception_params`: ``{tf_path: {"w": HWIO, "b": (O,)}}`` (+ ``"logits"``).
Layer wiring follows the TF graph names (``mixed`` ... ``mixed_10``); the quirks that matter for exact features are the
average pools that exclude padding from the count and the *max* pool in the last block's pool branch (``mixed_10``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from terdit_jax.eval.preprocess import inception_input

POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 17 * 17 * 7, 1008


def _conv(params, name, x, stride=1, padding="SAME", precision=jax.lax.Precision.HIGHEST):
    """conv + folded BN + ReLU. All stride-1 convs in the graph pad symmetrically, i.e. SAME for odd kernels."""
    p = params[name]
    y = jax.lax.conv_general_dilated(x, p["w"].astype(x.dtype), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return jax.nn.relu(y + p["b"].astype(x.dtype))


def _max_pool(x, stride, padding):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool_exclusive(x):
    """3x3/1 SAME average where the padded zeros do not count (torch ``count_include_pad=False``, TF AvgPool SAME)."""
    window = ((1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    count = jax.lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add, *window)
    return total / count


def inception_features(params, images, precision=jax.lax.Precision.HIGHEST) -> dict:
    """Runs the graph from pixels to features.

    images: (N, H, W, 3) pixels in [0, 255] (uint8 or float), any H, W: resized as the graph does (see preprocess).
    Returns float32 {"pool_3": (N, 2048), "spatial": (N, 2023) = mixed_6/conv[..., :7] flattened (h, w, c) as ADM,
    and "logits": (N, 1008) = pool_3 @ W without bias, only when the params have the classifier}.
    """
    c = lambda name, x, stride=1, padding="SAME": _conv(params, name, x, stride, padding, precision)
    x = inception_input(images)
    # stem
    x = c("conv", x, 2, "VALID")
    x = c("conv_1", x, 1, "VALID")
    x = c("conv_2", x)
    x = _max_pool(x, 2, "VALID")
    x = c("conv_3", x, 1, "VALID")
    x = c("conv_4", x, 1, "VALID")
    x = _max_pool(x, 2, "VALID")  # (N, 35, 35, 192)
    for m in ("mixed", "mixed_1", "mixed_2"):  # 35x35 blocks: 1x1 | 5x5 | double 3x3 | pool
        x = jnp.concatenate([
            c(f"{m}/conv", x),
            c(f"{m}/tower/conv_1", c(f"{m}/tower/conv", x)),
            c(f"{m}/tower_1/conv_2", c(f"{m}/tower_1/conv_1", c(f"{m}/tower_1/conv", x))),
            c(f"{m}/tower_2/conv", _avg_pool_exclusive(x))], axis=-1)
    x = jnp.concatenate([  # grid reduction 35 -> 17
        c("mixed_3/conv", x, 2, "VALID"),
        c("mixed_3/tower/conv_2", c("mixed_3/tower/conv_1", c("mixed_3/tower/conv", x)), 2, "VALID"),
        _max_pool(x, 2, "VALID")], axis=-1)
    spatial = None
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):  # 17x17 blocks with factorised 7x7 towers
        b0 = c(f"{m}/conv", x)
        if m == "mixed_6":
            spatial = b0[..., :7]  # ADM's sFID tensor "mixed_6/conv:0", first 7 channels
        t = c(f"{m}/tower/conv_2", c(f"{m}/tower/conv_1", c(f"{m}/tower/conv", x)))
        t1 = x
        for i in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
            t1 = c(f"{m}/tower_1/{i}", t1)
        x = jnp.concatenate([b0, t, t1, c(f"{m}/tower_2/conv", _avg_pool_exclusive(x))], axis=-1)
    t1 = x
    for i in ("conv", "conv_1", "conv_2", "conv_3"):
        t1 = c(f"mixed_8/tower_1/{i}", t1, *((2, "VALID") if i == "conv_3" else ()))
    x = jnp.concatenate([  # grid reduction 17 -> 8
        c("mixed_8/tower/conv_1", c("mixed_8/tower/conv", x), 2, "VALID"), t1, _max_pool(x, 2, "VALID")], axis=-1)
    for m in ("mixed_9", "mixed_10"):  # 8x8 blocks with split 1x3 / 3x1 outputs
        a = c(f"{m}/tower_conv", x)
        b = c(f"{m}/tower_1_conv_1", c(f"{m}/tower_1_conv", x))
        pooled = _max_pool(x, 1, "SAME") if m == "mixed_10" else _avg_pool_exclusive(x)
        x = jnp.concatenate([
            c(f"{m}/conv", x), c(f"{m}/tower_mixed_conv", a), c(f"{m}/tower_mixed_conv_1", a),
            c(f"{m}/tower_1_mixed_conv", b), c(f"{m}/tower_1_mixed_conv_1", b),
            c(f"{m}/tower_2_conv", pooled)], axis=-1)
    pool_3 = jnp.mean(x, axis=(1, 2))  # the graph's 8x8 VALID average pool = global mean
    out = {"pool_3": pool_3.astype(jnp.float32), "spatial": spatial.reshape(spatial.shape[0], -1).astype(jnp.float32)}
    if "logits" in params:
        out["logits"] = jnp.dot(pool_3, params["logits"]["w"], precision=precision).astype(jnp.float32)
    return out
