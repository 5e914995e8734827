"""Fidelity of a quantized model to its full-precision (FP) twin under the same noise: how SVDQuant (Li et al.
2024, Table 1: PSNR / LPIPS / "FID to the 16-bit model") and ViDiT-Q (Zhao et al. 2024) judge quantized diffusion
models, because FID against real data alone can rank a noisier model above full precision.

Every sample of the quantized model has an FP twin (same initial noise, label and deterministic sampler), so the
metrics are paired: PSNR of each image against its twin, agreement of a classifier's predictions, the Fréchet
distance between the two sets' features, and the denoiser's relative error at each sampling step along the FP
trajectory. All functions are pure NumPy.
"""
from __future__ import annotations

import numpy as np

from terdit_jax.eval.metrics import feature_statistics, frechet_distance


def psnr(images: np.ndarray, references: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of a set of images against their twins: 10·log10(peak² / MSE), the MSE over
    every pixel of every image (inf for identical sets). images, references: (N, H, W, C), uint8 or float."""
    a, b = np.asarray(images, np.float64), np.asarray(references, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs paired images of one shape, got {a.shape} and {b.shape}")
    mse = np.mean(np.square(a - b))
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def fid_to_reference(features: np.ndarray, reference_features: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D): "FID-to-FP" when the
    reference is the FP twin's samples. 0 for identical sets; |shift|² for a set against itself shifted."""
    return frechet_distance(*feature_statistics(features), *feature_statistics(reference_features))


def class_agreement(predictions: np.ndarray, reference_predictions: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals their twin's (N,) → float in [0, 1]."""
    p, q = np.asarray(predictions), np.asarray(reference_predictions)
    if p.shape != q.shape:
        raise ValueError(f"class agreement needs paired predictions, got {p.shape} and {q.shape}")
    return float(np.mean(p == q))


def relative_error(outputs: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per sampling step, ‖output − reference‖ / ‖reference‖ (Frobenius norms over the batch and the image).
    outputs, references: (S, N, ...) denoiser outputs at S steps → (S,) float64."""
    a, b = np.asarray(outputs, np.float64), np.asarray(references, np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"relative error needs paired (steps, N, ...) outputs, got {a.shape} and {b.shape}")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), np.finfo(np.float64).tiny)
