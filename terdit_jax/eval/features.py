"""Batched, jitted Inception feature extraction, data-parallel over all local devices."""
from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from terdit_jax.eval.inception import inception_features
from terdit_jax.eval.preprocess import to_rgb_nhwc
from terdit_jax.eval.weights import load_inception_params


class InceptionExtractor:
    """Turns uint8 images into ADM features ({"pool_3": (N, 2048), "spatial": (N, 2023)[, "logits": (N, 1008)]}).

    Each step runs one global batch of `batch_size` images, split evenly over a 1-D ``data`` mesh of the local devices
    (params replicated); the last batch is zero-padded so the step compiles once per image size.
    """

    def __init__(self, weights_path: str | None = None, batch_size: int = 256, params: dict | None = None,
                 devices=None, precision=jax.lax.Precision.HIGHEST):
        devices = list(devices or jax.local_devices())
        if batch_size % len(devices):
            batch_size += len(devices) - batch_size % len(devices)  # even split over devices
        self.batch_size = batch_size
        self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        if params is None:
            from terdit_jax.eval.weights import default_weights_path
            weights_path = weights_path or default_weights_path()
        self.weights_path = weights_path  # None when params were given directly
        host_params = params if params is not None else load_inception_params(weights_path)
        self.params = jax.device_put(host_params, NamedSharding(self.mesh, P()))
        self.has_logits = "logits" in host_params
        self._step = jax.jit(lambda p, x: inception_features(p, x, precision),
                             out_shardings=self._batch_sharding)

    def _fixed_batches(self, source: Iterable[np.ndarray]):
        """Re-chunks arbitrary uint8 batches into full global batches; yields (batch, number of real images)."""
        buf, n_buf = [], 0
        for b in source:
            b = to_rgb_nhwc(b)
            buf.append(b)
            n_buf += len(b)
            while n_buf >= self.batch_size:
                cat = np.concatenate(buf)
                yield cat[:self.batch_size], self.batch_size
                buf, n_buf = [cat[self.batch_size:]], n_buf - self.batch_size
        if n_buf:
            cat = np.concatenate(buf)
            pad = np.zeros((self.batch_size - n_buf,) + cat.shape[1:], np.uint8)
            yield np.concatenate([cat, pad]), n_buf

    def extract(self, source, total: int | None = None, progress: bool = True) -> dict[str, np.ndarray]:
        """source: a uint8 array (N, H, W, C) with C in {1, 3}, or an iterable of such batches (e.g. a streamed npz).
        total: number of images, for the progress bar. Returns float32 numpy features (see class docstring)."""
        if isinstance(source, np.ndarray):
            arr, total = source, len(source)
            source = (arr[i:i + self.batch_size] for i in range(0, total, self.batch_size))
        outs: dict[str, list] = {}
        bar = tqdm(total=total, unit="img", desc="inception", disable=not progress)

        def collect(pending):
            feats, n = pending
            for k, v in feats.items():
                outs.setdefault(k, []).append(np.asarray(v)[:n])
            bar.update(n)

        pending = None
        for batch, n in self._fixed_batches(source):
            feats = self._step(self.params, jax.device_put(batch, self._batch_sharding))
            if pending is not None:  # fetch the previous batch while this one runs
                collect(pending)
            pending = (feats, n)
        if pending is not None:
            collect(pending)
        bar.close()
        if not outs:
            raise ValueError("no images to extract features from")
        return {k: np.concatenate(v) for k, v in outs.items()}
