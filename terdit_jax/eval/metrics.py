"""FID, sFID, Inception Score, Precision and Recall computed exactly as the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) computes them from Inception features.

All functions take numpy features; only the pairwise-distance blocks of Precision/Recall run in JAX (jitted), because
50k x 10k distances in 2048-d are the one heavy step.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


def feature_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) activations -> (mu (D,), sigma (D, D)) in float64, with np.cov's N-1 normalisation (as ADM)."""
    acts = np.asarray(acts, np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise ValueError(f"need (N >= 2, D) activations for statistics, got shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # ADM calls sqrtm(..., disp=False), which returns quietly for a singular product (fewer samples than feature
    # dimensions make one); scipy >= 1.16 deprecates `disp` and warns instead, so the warning is silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (TTUR fid.py, as in ADM's FIDStatistics):
    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2)); retries with eps*I on both sigmas if sqrtm is not finite."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (pool_3 stats are 2048-d, spatial stats 2023-d)")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis (TF's tf.nn.softmax on the 1008 unbiased logits)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score as ADM: mean over consecutive splits of `split_size` rows (10 splits for 50k samples) of
    exp(mean_i KL(p_i || mean_split p)) (improved-gan inception_score/model.py). probs: (N, C) class probabilities."""
    probs = np.asarray(probs)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------- Precision / Recall
def _sq_dists(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) with every op in the dtype of u, v (ADM's _batch_pairwise_distances)."""
    nu = jnp.sum(jnp.square(u), 1)[:, None]
    nv = jnp.sum(jnp.square(v), 1)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2 * uv + nv, 0)


@jax.jit
def distance_block(u, v):
    """ADM's DistanceBlock: squared distances computed in float16 first; if any value of the block is not finite
    (overflow past 65504) the whole block is recomputed in float32. u: (n1, D), v: (n2, D) -> (n1, n2) float32."""
    u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    d16 = _sq_dists(u.astype(jnp.float16), v.astype(jnp.float16))
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), lambda: _sq_dists(u, v))


@functools.partial(jax.jit, static_argnums=1)
def _smallest_k(d, k_plus_1: int):
    """The k_plus_1 smallest values of each row, ascending (rows shorter than that are padded with +inf)."""
    if d.shape[1] < k_plus_1:
        d = jnp.pad(d, ((0, 0), (0, k_plus_1 - d.shape[1])), constant_values=jnp.inf)
    return -jax.lax.top_k(-d, k_plus_1)[0]


def manifold_radii(features: np.ndarray, k: int = 3, row_batch_size: int = 10000,
                   col_batch_size: int = 10000) -> np.ndarray:
    """(N, D) -> (N,) squared radius of each point's k-NN ball: the value at index k of the sorted distance row, where
    index 0 is the point itself (ADM ManifoldEstimator.manifold_radii with nhood_sizes=(k,), no percentile clamp)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set, got {n}")
    radii = np.zeros([n], np.float32)
    for b1 in range(0, n, row_batch_size):
        rows = jnp.asarray(features[b1:b1 + row_batch_size])
        best = None  # running k+1 smallest distances of each row over the column blocks: same value as np.partition
        for b2 in range(0, n, col_batch_size):
            blk = _smallest_k(distance_block(rows, jnp.asarray(features[b2:b2 + col_batch_size])), k + 1)
            best = blk if best is None else _smallest_k(jnp.concatenate([best, blk], axis=1), k + 1)
        radii[b1:b1 + row_batch_size] = np.asarray(best[:, k])
    return radii


@jax.jit
def _less_thans(u, r_u, v, r_v):
    d = distance_block(u, v)
    return jnp.any(d <= r_v[None, :], axis=1), jnp.any(d <= r_u[:, None], axis=0)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     row_batch_size: int = 10000, col_batch_size: int = 10000) -> tuple[float, float]:
    """Improved Precision and Recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator.evaluate_pr.

    precision = fraction of samples inside at least one reference k-NN ball; recall = fraction of reference points
    inside at least one sample k-NN ball (squared distances, `d <= r`). Block sizes matter only through the float16/float32
    choice, which ADM makes per (row block, column block); the defaults are ADM's.
    """
    ref = np.asarray(ref_features, np.float32)
    smp = np.asarray(sample_features, np.float32)
    r_ref = manifold_radii(ref, k, row_batch_size, col_batch_size)
    r_smp = manifold_radii(smp, k, row_batch_size, col_batch_size)
    ref_in, smp_in = np.zeros(len(ref), bool), np.zeros(len(smp), bool)
    for b1 in range(0, len(ref), row_batch_size):
        for b2 in range(0, len(smp), col_batch_size):
            a, b = _less_thans(ref[b1:b1 + row_batch_size], r_ref[b1:b1 + row_batch_size],
                               smp[b2:b2 + col_batch_size], r_smp[b2:b2 + col_batch_size])
            ref_in[b1:b1 + row_batch_size] |= np.asarray(a)
            smp_in[b2:b2 + col_batch_size] |= np.asarray(b)
    return float(np.mean(smp_in)), float(np.mean(ref_in))
