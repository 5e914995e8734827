"""A small MLP digit classifier trained on the demo's real training digits, used to measure whether
generated digits are recognisable as the class they were asked for (class accuracy)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from terdit_jax.data.digits import load_digits


def _logits(params, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _prep(images: np.ndarray) -> jax.Array:
    """uint8 (N, 28, 28, 1) → float32 (N, 784) in [0, 1]."""
    return jnp.asarray(images.reshape(len(images), -1), jnp.float32) / 255.0


def train_classifier(seed: int = 0, steps: int = 600, hidden: int = 256) -> tuple[dict, float]:
    """Fit 784 → hidden → 10 on the training digits (light shift augmentation).

    Returns (params, accuracy on the 500 held-out real digits).
    """
    images, labels = load_digits("train")
    k1, k2, k_loop = jax.random.split(jax.random.key(seed), 3)
    params = {"w1": jax.random.normal(k1, (784, hidden)) * (2 / 784) ** 0.5, "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k2, (hidden, 10)) * (1 / hidden) ** 0.5, "b2": jnp.zeros(10)}
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    x_all = jnp.asarray(images, jnp.float32)[..., 0] / 255.0
    y_all = jnp.asarray(labels)

    @jax.jit
    def step(params, opt, key):
        k_idx, k_dx, k_dy = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (256,), 0, len(labels))
        # random ±2 px shifts, so the classifier is not fooled by slightly off-centre samples
        x = jnp.roll(x_all[idx], (jax.random.randint(k_dy, (), -2, 3), jax.random.randint(k_dx, (), -2, 3)), (1, 2))
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            _logits(p, x), y_all[idx]).mean())(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for i in range(steps):
        params, opt = step(params, opt, jax.random.fold_in(k_loop, i))
    test_images, test_labels = load_digits("test")
    return params, class_accuracy(params, test_images, test_labels)


def class_accuracy(params, images: np.ndarray, labels) -> float:
    """Fraction of uint8 (N, 28, 28, 1) images classified as their label."""
    pred = np.asarray(jnp.argmax(_logits(params, _prep(images)), -1))
    return float(np.mean(pred == np.asarray(labels)))
