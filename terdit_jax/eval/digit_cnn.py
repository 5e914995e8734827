"""A small CNN on the demo's real digits: the quantization study's one evaluator (shared/study.md). Its class
prediction gives the class accuracy of generated digits, its penultimate features the FID / precision / recall
(k = 3) of generated digits against all 5,000 real ones. Trained once with a fixed seed (light shift
augmentation), it scores ≥ 98% on the 500 held-out digits; the study reports the figure it measured.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from terdit_jax.data.digits import load_digits

FEATURES = 128


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def init(key) -> dict:
    k = jax.random.split(key, 5)
    he = lambda kk, shape, fan: jax.random.normal(kk, shape) * np.sqrt(2.0 / fan)  # noqa: E731
    return {"c1": he(k[0], (3, 3, 1, 32), 9), "b1": jnp.zeros(32), "c2": he(k[1], (3, 3, 32, 64), 288),
            "b2": jnp.zeros(64), "c3": he(k[2], (3, 3, 64, 64), 576), "b3": jnp.zeros(64),
            "d1": he(k[3], (3 * 3 * 64, FEATURES), 576), "e1": jnp.zeros(FEATURES),
            "d2": he(k[4], (FEATURES, 10), FEATURES) * 0.5, "e2": jnp.zeros(10)}


def features(params, x: jax.Array) -> jax.Array:
    """x (N, 28, 28, 1) in [0, 1] → penultimate features (N, FEATURES): three conv + max-pool stages, one dense."""
    h = _pool(_conv(x, params["c1"], params["b1"]))  # 14×14
    h = _pool(_conv(h, params["c2"], params["b2"]))  # 7×7
    h = _pool(_conv(h, params["c3"], params["b3"]))  # 3×3
    return jax.nn.relu(h.reshape(h.shape[0], -1) @ params["d1"] + params["e1"])


def logits(params, x):
    return features(params, x) @ params["d2"] + params["e2"]


def to_input(images: np.ndarray) -> jax.Array:
    """uint8 (N, 28, 28, 1) → float32 in [0, 1]."""
    return jnp.asarray(images, jnp.float32) / 255.0


def train(seed: int = 0, steps: int = 1500, batch: int = 128) -> tuple[dict, float]:
    """Fit on the 4,500 training digits → (params, accuracy on the 500 held-out digits)."""
    images, labels = load_digits("train")
    x_all, y_all = to_input(images), jnp.asarray(labels)
    key_init, key_loop = jax.random.split(jax.random.key(seed))
    params = init(key_init)
    tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        k_idx, k_shift = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch,), 0, len(labels))
        shifts = jax.random.randint(k_shift, (batch, 2), -2, 3)  # every digit its own ±2 px shift
        x = jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), (0, 1)))(x_all[idx], shifts)
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            logits(p, x), y_all[idx]).mean())(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    for i in range(steps):
        params, opt = step(params, opt, jax.random.fold_in(key_loop, i))
    test_images, test_labels = load_digits("test")
    return params, accuracy(params, test_images, test_labels)


def predict(params, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(class predictions (N,), features (N, FEATURES)) of uint8 digits."""
    fn = jax.jit(lambda x: (jnp.argmax(logits(params, x), -1), features(params, x)))
    preds, feats = [], []
    for lo in range(0, len(images), batch):
        p, f = fn(to_input(images[lo:lo + batch]))
        preds.append(np.asarray(p))
        feats.append(np.asarray(f, np.float64))
    return np.concatenate(preds), np.concatenate(feats)


def accuracy(params, images: np.ndarray, labels) -> float:
    return float(np.mean(predict(params, images)[0] == np.asarray(labels)))
