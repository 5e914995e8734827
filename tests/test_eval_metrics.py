"""ADM metrics (FID/sFID, IS, Precision/Recall), the legacy TF1 resize and the ADM npz layout, on known answers."""
import os

import jax
import numpy as np
import pytest

from terdit_jax.eval import adm_npz, metrics
from terdit_jax.eval.preprocess import inception_input, tf1_resize_bilinear, to_rgb_nhwc


# ------------------------------------------------------------------------------------------------ Fréchet distance
def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # commuting covariances: |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2 = 5 + (1 + 1 + 0)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.0, abs=1e-9)


def test_frechet_distance_matches_symmetric_closed_form_for_general_gaussians():
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    r1 = _sqrt_psd(s1)  # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), the latter symmetric PSD
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], np.float32)
    mu, sigma = metrics.feature_statistics(x)
    c = x - x.mean(0)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, c.T @ c / 2)  # N - 1 = 2


def test_fid_of_large_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    mu2 = np.array([1.0, 0.0, 0.0])  # x has mean 0
    x = rng.normal(size=(20000, 3))
    y = rng.normal(size=(20000, 3)) * 2.0 + mu2  # sigma2 = 4 I: FID = 1 + 3 * (1 - 2)^2 = 4
    fid = metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
    assert fid == pytest.approx(4.0, abs=0.15)


# --------------------------------------------------------------------------------------------------- Inception Score
def test_inception_score_of_peaked_predictions_has_closed_form():
    c, eps = 4, 0.2
    p = np.full((c, c), eps / (c - 1)) + np.eye(c) * (1 - eps - eps / (c - 1))  # class i gets 1 - eps
    # mean prediction is uniform, so IS = exp(KL(p_i || U)) = exp(sum p log(p c))
    expected = np.exp(np.sum(p[0] * np.log(p[0] * c)))
    assert metrics.inception_score(p) == pytest.approx(expected, rel=1e-6)
    assert metrics.inception_score(np.full((8, c), 1.0 / c)) == pytest.approx(1.0)


def test_inception_score_averages_consecutive_splits():
    c = 4
    peaked = np.full((c, c), 0.05) + np.eye(c) * 0.8
    uniform = np.full((c, c), 1.0 / c)
    probs = np.concatenate([peaked, uniform])
    split_is = metrics.inception_score(peaked)
    assert metrics.inception_score(probs, split_size=c) == pytest.approx((split_is + 1.0) / 2, rel=1e-6)


def test_softmax_rows_sum_to_one_and_keep_order():
    p = metrics.softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ Precision/Recall
def _brute_force_pr(ref, smp, k=3):
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d(smp, smp), axis=1)[:, k]
    precision = np.mean(np.any(d(smp, ref) <= r_ref[None, :], axis=1))
    recall = np.mean(np.any(d(ref, smp) <= r_smp[None, :], axis=1))
    return precision, recall


def test_precision_recall_on_points_on_a_line():
    ref = np.stack([np.arange(10.0), np.zeros(10)], 1)  # radii^2: 9 at the two ends, 4 inside
    smp = np.array([[0.5, 0], [4, 1], [9, 3], [20, 0], [30, 0], [31, 0], [32, 0], [33, 0]])
    # inside a reference ball: (0.5,0) yes, (4,1) d^2=1 yes, (9,3) d^2=9 <= r(9)=9 yes, (20..33,0) no -> 3/8
    precision, recall = metrics.precision_recall(ref, smp)
    assert precision == pytest.approx(3 / 8)
    assert (precision, recall) == pytest.approx(_brute_force_pr(ref, smp))


def test_precision_recall_matches_brute_force_for_any_block_size():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 6, size=(23, 3)).astype(np.float32)  # small integers: float16 distances are exact
    smp = rng.integers(1, 8, size=(17, 3)).astype(np.float32)
    expected = _brute_force_pr(ref, smp)
    assert metrics.precision_recall(ref, smp) == pytest.approx(expected)
    assert metrics.precision_recall(ref, smp, row_batch_size=5, col_batch_size=4) == pytest.approx(expected)


def test_precision_recall_falls_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 6, size=(12, 3)).astype(np.float32)
    smp = rng.integers(1, 8, size=(10, 3)).astype(np.float32)
    expected = _brute_force_pr(ref, smp)
    # x256: squared norms reach ~2e6 > float16 max 65504; ADM recomputes such blocks in float32
    assert metrics.precision_recall(ref * 256, smp * 256) == pytest.approx(expected)
    d = np.asarray(metrics.distance_block(ref * 256, smp * 256))
    assert np.isfinite(d).all()


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------------- legacy TF1 resize
def test_tf1_legacy_resize_known_values_upsampling():
    x = np.array([[0.0, 10.0], [20.0, 30.0]])[None, :, :, None]
    # scale 0.5, src = 0, .5, 1, 1.5 -> taps clamp at the last pixel (no half-pixel centres)
    expected = np.array([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], np.float32)
    np.testing.assert_allclose(np.asarray(tf1_resize_bilinear(x, 4, 4))[0, :, :, 0], expected)
    half_pixel = np.asarray(jax.image.resize(x, (1, 4, 4, 1), "bilinear"))[0, :, :, 0]
    assert not np.allclose(half_pixel, expected)  # the kernel jax.image.resize would use gives other values


def test_tf1_legacy_resize_known_values_downsampling_and_identity():
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    # 3 -> 2: scale 1.5, src = 0, 1.5 -> rows/cols 0 and halfway between 1 and 2
    expected = np.array([[0.0, 1.5], [4.5, 6.0]])
    np.testing.assert_allclose(np.asarray(tf1_resize_bilinear(x, 2, 2))[0, :, :, 0], expected)
    np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(x, 3, 3)), x)


def test_inception_input_normalises_like_the_graph_and_expands_greyscale():
    g = np.array([[[[0]], [[128]]], [[[255]], [[64]]]], np.uint8).reshape(1, 2, 2, 1)
    rgb = to_rgb_nhwc(g)
    assert rgb.shape == (1, 2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    x = np.asarray(inception_input(rgb))
    assert x.shape == (1, 299, 299, 3)
    assert x[0, 0, 0, 0] == -1.0 and x[0, -1, -1, 0] == pytest.approx((64 - 128) / 128)
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_nhwc(np.zeros((1, 4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------------------------ ADM npz I/O
def test_adm_batch_roundtrip_streams_arr_0_in_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    adm_npz.write_adm_batch(path, images, labels=np.arange(7))
    with np.load(path) as z:  # exactly the keys ADM's np.savez(path, arr, label_arr) produces
        assert sorted(z.keys()) == ["arr_0", "arr_1"]
    stream = adm_npz.NpzArrayStream(path)
    assert len(stream) == 7 and stream.dtype == np.uint8
    batches = list(stream.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(np.concatenate(list(stream.batches(4, start=2))), images[2:])
    assert adm_npz.read_stats(path) is None


def test_reference_stats_keys_are_read_all_or_nothing(tmp_path):
    path = str(tmp_path / "ref.npz")
    stats = {"mu": np.zeros(2), "sigma": np.eye(2), "mu_s": np.ones(3), "sigma_s": np.eye(3)}
    adm_npz.write_npz(path, stats)
    got = adm_npz.read_stats(path)
    np.testing.assert_array_equal(got["mu_s"], np.ones(3))
    adm_npz.write_npz(path, {"mu": np.zeros(2), "sigma": np.eye(2)})
    with pytest.raises(ValueError, match="lacks"):
        adm_npz.read_stats(path)
    with pytest.raises(KeyError, match="arr_0"):
        adm_npz.NpzArrayStream(path)


def test_sample_store_resumes_and_writes_one_adm_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    store = adm_npz.SampleStore(str(tmp_path / "shards"))
    store.add(0, images[:4], labels=np.arange(4))
    store.add(8, images[8:], labels=np.arange(8, 10))  # out of order: a gap stops the count
    assert adm_npz.SampleStore(str(tmp_path / "shards")).count() == 4
    with pytest.raises(ValueError, match="fewer"):
        store.write_adm(str(tmp_path / "x.npz"), 10)
    store.add(4, images[4:8], labels=np.arange(4, 8))
    assert store.count() == 10
    out = str(tmp_path / "samples.npz")
    store.write_adm(out, 9)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], images[:9])
        np.testing.assert_array_equal(z["arr_1"], np.arange(9))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


# ------------------------------------------------------------------------------ evaluate() plumbing (small features)
class _PixelFeatures:
    """Stands in for InceptionExtractor with cheap features (Inception itself is tested in test_eval_inception.py):
    pool_3 = per-image pixel statistics (N, 4), spatial = first pixels (N, 3), optional logits (N, 5)."""
    batch_size, weights_path = 4, "stand-in"

    def __init__(self, with_logits=False):
        self.has_logits = with_logits

    def extract(self, batches, total=None, progress=True):
        x = np.concatenate([to_rgb_nhwc(b) for b in batches]).astype(np.float64) / 255
        flat = x.reshape(len(x), -1)
        pool = np.stack([flat.mean(1), flat.std(1), flat[:, :5].mean(1), flat[:, -7:].mean(1)], 1)
        out = {"pool_3": pool.astype(np.float32), "spatial": flat[:, :3].astype(np.float32)}
        if self.has_logits:
            out["logits"] = (flat[:, :5] * 4).astype(np.float32)
        return out


def _digits(seed, n=24):
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)


def test_evaluate_matches_metrics_on_the_same_features(tmp_path):
    import json

    from terdit_jax.eval.evaluate import evaluate, reference_stats

    ref, smp, fx = _digits(0), _digits(1), _PixelFeatures()
    ref_npz, out_json = str(tmp_path / "ref.npz"), str(tmp_path / "report.json")
    reference_stats(ref, ref_npz, extractor=fx)
    with np.load(ref_npz) as z:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "acts_pool_3"} <= set(z.keys())
        assert z["arr_0"].shape == (24, 6, 6, 3)  # greyscale stored as the RGB batch ADM expects
    r = evaluate(smp, ref_npz, out_json=out_json, extractor=fx)
    fr, fs = fx.extract([ref]), fx.extract([smp])
    expected_fid = metrics.frechet_distance(*metrics.feature_statistics(fs["pool_3"]),
                                            *metrics.feature_statistics(fr["pool_3"]))
    assert r["fid"] == pytest.approx(expected_fid, rel=1e-9)
    assert (r["precision"], r["recall"]) == pytest.approx(metrics.precision_recall(fr["pool_3"], fs["pool_3"]))
    assert r["inception_score"] is None and "classifier" in r["inception_score_unavailable"]
    assert r["num_samples"] == 24 and r["num_reference"] == 24
    with open(out_json) as f:
        assert json.load(f)["fid"] == pytest.approx(r["fid"])


def test_evaluate_identical_sets_and_npz_samples(tmp_path):
    from terdit_jax.eval.evaluate import evaluate

    ref = _digits(0)
    path = str(tmp_path / "samples.npz")
    adm_npz.write_adm_batch(path, to_rgb_nhwc(ref))
    r = evaluate(path, ref, extractor=_PixelFeatures(with_logits=True))
    assert abs(r["fid"]) < 1e-6 and abs(r["sfid"]) < 1e-6
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    expected_is = metrics.inception_score(metrics.softmax(_PixelFeatures(True).extract([ref])["logits"]))
    assert r["inception_score"] == pytest.approx(expected_is)


def test_evaluate_against_statistics_only_reference_reports_missing_pr(tmp_path):
    from terdit_jax.eval.evaluate import evaluate

    fx, ref = _PixelFeatures(), _digits(0)
    acts = fx.extract([ref])
    path = str(tmp_path / "stats.npz")
    mu, sigma = metrics.feature_statistics(acts["pool_3"])
    mu_s, sigma_s = metrics.feature_statistics(acts["spatial"])
    adm_npz.write_npz(path, {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s})
    r = evaluate(ref, path, extractor=fx)
    assert abs(r["fid"]) < 1e-6 and r["precision"] is None and "arr_0" in r["precision_recall_unavailable"]


def test_generate_samples_resumes_from_the_first_missing_sample(tmp_path):
    from terdit_jax.eval.evaluate import generate_samples

    calls = []

    def sample_fn(start, n):
        calls.append((start, n))
        if len(calls) == 2 and not os.path.exists(tmp_path / "crashed"):
            (tmp_path / "crashed").touch()
            raise KeyboardInterrupt  # simulated interruption after the first batch
        return np.full((n, 2, 2, 3), start, np.uint8), np.arange(start, start + n)

    out = str(tmp_path / "s.npz")
    with pytest.raises(KeyboardInterrupt):
        generate_samples(sample_fn, 7, 3, str(tmp_path / "shards"), out)
    generate_samples(sample_fn, 7, 3, str(tmp_path / "shards"), out)
    assert calls == [(0, 3), (3, 3), (3, 3), (6, 1)]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_1"], np.arange(7))
        assert z["arr_0"][:, 0, 0, 0].tolist() == [0, 0, 0, 3, 3, 3, 6]


def test_a_singular_covariance_product_gives_fid_without_a_warning():
    """Features that are always 0 (dead pool_3 channels, few samples) make sigma1·sigma2 singular: ADM's
    sqrtm(..., disp=False) returns quietly, and so does frechet_distance (scipy ≥ 1.16 warns instead)."""
    import warnings

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((30, 64))
    a[:, :8] = b[:, :8] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    assert np.isfinite(fid) and fid > 0
