"""The command line end to end: the demo at a few steps, sample mode, resume, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TINY = ["--config.model.dim=32", "--config.model.n_layers=1", "--config.train.log_every=2",
        "--config.train.ckpt_every=2", "--config.sample.num_steps=3", "--config.sample.per_class=2",
        "--config.train.warmup_steps=0",
        "--config.eval.demo_quality=False"]  # FID needs minutes of Inception on a CPU; tested on its own


def cli(*args, check=True, cwd=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "terdit_jax.main", *args], capture_output=True, text=True, env=env,
                       timeout=300, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    r = cli("--workdir", workdir, "--config.train.steps=4", *TINY)
    return workdir, r


def test_demo_writes_checkpoint_metrics_tensorboard_and_grid(demo_run):
    workdir, r = demo_run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert {"step", "loss", "grad_norm", "lr", "steps_per_s", "mse", "vb"} <= set(row)
        assert np.isfinite(row["loss"]) and row["lr"] == pytest.approx(2e-3)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    grid = os.path.join(workdir, "samples", "final_grid.png")
    assert Image.open(grid).size[1] >= 10 * 56  # 10 labelled rows of upscaled 28 px digits
    for path in (grid, os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "checkpoints")):
        assert path in r.stdout  # every output location is printed


def test_sample_mode_writes_adm_npz_and_grid(demo_run):
    workdir, _ = demo_run
    r = cli("--workdir", workdir, "--mode", "sample", *TINY)
    npz = os.path.join(workdir, "samples", "sample_0000004_ddim3_cfg4.npz")
    assert npz in r.stdout
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(data["arr_1"], np.repeat(np.arange(10), 2))
    assert os.path.exists(npz[:-4] + ".png")


def test_resume_continues_from_the_newest_checkpoint(demo_run):
    workdir, _ = demo_run
    r = cli("--workdir", workdir, "--config.train.steps=6", *TINY)
    assert "resumed from" in r.stdout and "/4" in r.stdout
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [2, 4, 6]


def test_a_different_architecture_is_refused_and_checkpoints_kept(demo_run):
    workdir, _ = demo_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    r = cli("--workdir", workdir, "--config.train.steps=8", *TINY, "--config.model.n_layers=2", check=False)
    assert r.returncode == 2 and "different architecture" in r.stderr and "n_layers" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize("args,expect", [
    (["--config", "no/such/config.py"], "could not load the config file"),
    (["--config.train.stepz=3"], "no field 'stepz' (did you mean 'steps'?)"),
    (["--config.train.steps=many"], "--config.train.steps=many"),
    (["--config.model.name=DiT_Llama_1B"], "unknown model 'DiT_Llama_1B'"),
    (["--workdir", "/proc/not/writable"], "cannot write to workdir"),
    (["--mode", "sample", "--workdir", "/tmp/terdit-empty-workdir-for-test"], "no checkpoint in"),
    (["--config.model.family=nope"], "config.model.family: 'nope' is not one of 'large_dit'"),
    (["--mode", "sample", "--config.sample.num_steps=0"], "config.sample.num_steps: 0 cannot respace 1000 steps"),
    (["--mode", "quantize", "--config.quant.method=gptq"], "config.quant.method: 'gptq' is not one of 'rtn'"),
    (["--mode", "quantize", "--config.quant.method=rtn", "--config.quant.w_bits=1"],
     "config.quant.w_bits: 1 is outside 2..16"),
])
def test_bad_input_gives_one_clear_message(args, expect):
    r = cli(*args, check=False)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_imagenet_path_end_to_end_with_a_tiny_vae(tmp_path):
    """--mode extract_latents (ImageNet folder layout, diffusers VAE folder) → train on the latent shards →
    --mode sample decodes through the VAE."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=4, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for k, synset in enumerate(["n01440764", "n01443537", "n01484850"]):
        os.makedirs(tmp_path / "train" / synset)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
                tmp_path / "train" / synset / f"{synset}_{i}.JPEG")
    common = ["--config", "configs/600m_256.py", "--config.model.name=custom", "--config.model.dim=32",
              "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.patch_size=1",
              "--config.model.dtype=float32", "--config.data.image_size=16", f"--config.data.vae_path={tmp_path / 'vae'}",
              f"--config.data.path={tmp_path / 'latents'}", "--config.data.workers=0", "--config.train.batch_size=4",
              "--config.sample.num_steps=2", "--config.sample.classes=0,2", "--config.sample.batch_size=2",
              "--workdir", str(tmp_path / "run")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = cli(*common, "--mode", "extract_latents", f"--config.data.image_path={tmp_path / 'train'}",
            "--config.data.extract_batch_size=4", cwd=root)
    assert "complete: True" in r.stdout
    cli(*common, "--config.train.steps=2", "--config.train.ckpt_every=2", "--config.train.log_every=1", cwd=root)
    r = cli(*common, "--mode", "sample", cwd=root)
    images = np.load(os.path.join(tmp_path, "run", "samples", "sample_0000002_ddpm2_cfg4.npz"))["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


@pytest.mark.slow
def test_digits_quality_reports_class_accuracy_and_says_why_fid_is_missing(tmp_path):
    from terdit_jax.config import finalize
    from terdit_jax.configs.demo import get_config
    from terdit_jax.data.digits import load_digits
    from terdit_jax.eval.run import digits_quality

    c = get_config()
    c.eval.inception_weights = str(tmp_path / "missing.pt")
    images, labels = load_digits("test")
    said = []
    q = digits_quality(finalize(c), str(tmp_path), images[::5], labels[::5], log=said.append)
    assert q["class_accuracy"] > 0.85 and q["classifier_heldout_accuracy"] > 0.9  # real digits are recognised
    shuffled = digits_quality(finalize(c), str(tmp_path), images[::5], np.roll(labels[::5], 7), log=said.append)
    assert shuffled["class_accuracy"] < 0.3  # wrong labels are not
    assert "fid" not in q and any("FID skipped" in s and "missing.pt" in s for s in said)
