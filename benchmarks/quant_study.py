"""The quantization study (shared/study.md): every low-bit method of the project on the same models, data, noise,
sampler and evaluator, in one table with a verdict on each expectation of the papers.

    python benchmarks/quant_study.py --out runs/study [--rows NAME,...] [--seeds 3] [--quick] [--inception] [--plan]

Models. Two families of the demo's size (configs/demo.py: width 64, 4 blocks, 4 heads, patch 4): Large-DiT
(`large_dit`, the demo) and the original DiT (`dit`: GELU MLP, fused qkv, LayerNorm), each with a full-precision
(FP) twin trained with the demo recipe, steps and seed. Training rows (TerDiT, its ablations, BitNet, W1.58A8)
train the demo config with their overrides; PTQ rows quantize the FP twin of their family (seed 0).

Same noise. Every row samples 1,000 digits (100 per class) with the demo's deterministic sampler (DDIM 50) from one
fixed set of initial noises (drawn once from the noise seed, independent of the batch size) and labels, so every
sample of a PTQ row has an FP twin. Guidance: each family's FP model is swept over GUIDANCES on CNN-FID against the
real digits; every row samples (and PTQ rows calibrate) at its family's FP-best guidance.

Metrics (one evaluator): a small CNN trained once on the training digits (terdit_jax.eval.digit_cnn): class
accuracy, FID / precision / recall (k = 3) in its penultimate features against all 5,000 real digits. PTQ rows
also get fidelity to the FP twin (terdit_jax.eval.fidelity): PSNR, FID-to-FP (the row's features against the FP
samples'), class agreement, and the denoiser's relative error at each sampling step along the FP trajectory (100
of the samples). Noise floors: the FP model sampled with another noise seed. Seeds: the claim rows run --seeds
seeds (training seeds for FP and TerDiT, calibration + noise seeds for RTN / PTQ4DiT / TQ-DiT at W8A8, W6A6, W4A8);
the table shows mean ± std, and two rows differ only where the difference exceeds the floor and the mean ± std
intervals do not overlap.

Writes <out>/results.json, results.md (the table, the guidance sweep, the verdicts), loss_curves.png, pareto.png,
step_error.png and rows/<row>_seed<s>/grid.png. Resumable job by job: a result that exists is skipped, training
resumes from its checkpoints, FP samples, trajectories and calibration sets are made once. `--plan` prints the jobs
and the time estimate and stops. `--quick` runs a 1-block model at a toy budget to check the machinery.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if "--quick" in sys.argv:  # toy budget: compiling dominates, and LLVM at -O0 compiles ~1.5× faster (measured)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from terdit_jax.config import finalize  # noqa: E402
from terdit_jax.configs.demo import get_config as demo_config  # noqa: E402
from terdit_jax.data.digits import load_digits  # noqa: E402
from terdit_jax.diffusion.gaussian import create_diffusion  # noqa: E402
from terdit_jax.diffusion.samplers import cfg_model_fn, sample  # noqa: E402
from terdit_jax.eval import digit_cnn, fidelity, metrics  # noqa: E402
from terdit_jax.model_fn import bind  # noqa: E402
from terdit_jax.sample import load_for_sampling, save_grid, to_uint8  # noqa: E402
# The PTQ methods' entry points: the study's one import of them.
from terdit_jax.ptq import checkpoint as qckpt  # noqa: E402
from terdit_jax.ptq.run import Stages, run_quantize_mode  # noqa: E402

REFERENCE, TERDIT, QAT, PTQ = "reference", "TerDiT", "other QAT", "PTQ"
LARGE_DIT, DIT = "large_dit", "dit"
FAMILY_TAG = {LARGE_DIT: "", DIT: " (DiT)"}  # row-name suffix of each family
GUIDANCES = (1.0, 1.5, 2.0, 3.0, 4.0)
CLAIM_BITS = ((8, 8), (6, 6), (4, 8))  # the PTQ widths the papers' claims rest on
STUDY_RECON_ITERS = 2000  # per unit, a tenth of the paper's 20k: the study's budget (shared/study.md)
TRAJECTORY_PER_CLASS = 10  # samples per class whose FP trajectory the per-step error follows


@dataclasses.dataclass(frozen=True)
class Row:
    """name: as the table shows it; kind: "train" (QAT or FP training), "resample" (the family's FP model, another
    noise seed: the noise floor) or "ptq" (quantizes the family's FP twin); overrides: dotted config fields;
    claim: a row the papers' claims rest on (it runs every seed)."""
    name: str
    group: str
    kind: str
    family: str = LARGE_DIT
    overrides: tuple[tuple[str, object], ...] = ()
    claim: bool = False

    @property
    def slug(self) -> str:
        s = "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")
        while "__" in s:
            s = s.replace("__", "_")
        return s


def _ptq(family, name, method, w, a, **extra):
    return Row(f"{name}{FAMILY_TAG[family]}", PTQ, "ptq", family,
               (("quant.method", method), ("quant.w_bits", w), ("quant.a_bits", a),
                *((f"quant.{k}", v) for k, v in extra.items())), claim=not extra and (w, a) in CLAIM_BITS)


def _ptq_rows(family):
    return (
        *(_ptq(family, f"RTN W{w}A{a}", "rtn", w, a) for w, a in ((8, 8), (6, 6), (4, 8), (2, 16))),
        *(_ptq(family, f"PTQ4DiT W{w}A{a}", "ptq4dit", w, a) for w, a in ((8, 8), (6, 6), (4, 8), (2, 16))),
        _ptq(family, "PTQ4DiT W4A8 w/o CSB+SSC", "ptq4dit", 4, 8, csb=False),
        _ptq(family, "PTQ4DiT W4A8 w/o reconstruction", "ptq4dit", 4, 8, recon=False),
        *(_ptq(family, f"TQ-DiT W{w}A{a}", "tqdit", w, a) for w, a in CLAIM_BITS),
        _ptq(family, "TQ-DiT W6A6 w/o TGQ", "tqdit", 6, 6, tgq=False),
        _ptq(family, "TQ-DiT W6A6 w/o MRQ", "tqdit", 6, 6, mrq=False),
        *((_ptq(family, "TQ-DiT W6A6, two-region SwiGLU hidden", "tqdit", 6, 6, swiglu_mrq=True),)
          if family == LARGE_DIT else ()),  # the SwiGLU hidden exists only in Large-DiT
        _ptq(family, "TQ-DiT W6A6, HO = MSE", "tqdit", 6, 6, ho="mse"),
    )


FP_ROWS = {f: Row(f"FP{FAMILY_TAG[f]}", REFERENCE, "train", f, (("model.linear", "fp"),), claim=f == LARGE_DIT)
           for f in (LARGE_DIT, DIT)}
ROWS = (
    FP_ROWS[LARGE_DIT],
    Row("FP, noise seed 1", REFERENCE, "resample", LARGE_DIT),
    FP_ROWS[DIT],
    Row("FP (DiT), noise seed 1", REFERENCE, "resample", DIT),
    Row("TerDiT", TERDIT, "train", claim=True),
    Row("TerDiT w/o adaLN RMSNorm", TERDIT, "train", overrides=(("model.adaln_norm", False),)),
    Row("TerDiT w/o LR reduction", TERDIT, "train", overrides=(("train.lr_reduce_step", -1),)),
    Row("BitNet b1.58 DiT", QAT, "train", overrides=(("model.linear", "bitnet"), ("model.act_bits", 8),
                                                     ("model.pre_norms", False), ("model.adaln_norm", False))),
    Row("TerDiT W1.58A8", QAT, "train", overrides=(("model.act_bits", 8),)),
    *_ptq_rows(LARGE_DIT),
    *_ptq_rows(DIT),
)
ROW_BY_NAME = {r.name: r for r in ROWS}


def row_seeds(row: Row, n_seeds: int) -> list[int]:
    return list(range(n_seeds)) if row.claim else [0]


def budget_tag(recon_iters: int) -> str:
    """"" at the study's reconstruction budget, "_r<N>" at another: the suffix of a PTQ job's stored model and row
    folder, so a run at another budget never reads back (or overwrites) the study's own."""
    return "" if recon_iters == STUDY_RECON_ITERS else f"_r{recon_iters}"


def study_config(row: Row, seed: int, quick: bool, guidance: float = 4.0, recon_iters: int = STUDY_RECON_ITERS):
    """configs/demo.py in the row's family with the row's overrides (training rows, training seed `seed`) or its
    family's FP twin (seed 0) plus the method's settings (PTQ rows: calibration seed 1 + `seed`, at `guidance`,
    `recon_iters` reconstruction iterations per unit)."""
    c = demo_config()
    c.model.family = row.family
    c.seed = seed if row.kind == "train" else 0
    c.sample.per_class, c.sample.batch_size = 100, 250
    c.sample.cfg_scale = guidance
    c.eval.demo_quality = False
    q = c.quant
    q.calib_cfg_scale = guidance  # calibrate with the guidance the study samples with
    q.calib_seed = 1 + seed
    q.recon_iters = recon_iters
    if quick:
        c.model.n_layers = 1
        c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.warmup_steps = 6, 2, 6, 0
        c.sample.per_class, c.sample.num_steps, c.sample.batch_size = 2, 4, 20
        q.update(calib_steps=2, calib_latents=4, recon_iters=2, recon_batch_size=8, time_groups=2, alpha_grid=5,
                 search_rounds=1)
    source = row.overrides if row.kind == "train" else FP_ROWS[row.family].overrides + row.overrides
    for key, value in source:
        section, field = key.split(".")
        c[section][field] = value
    if quick and c.train.lr_reduce_step >= 0:
        c.train.lr_reduce_step = 4
    if row.kind == "ptq":
        q.name = f"{row.slug}_s{seed}{budget_tag(recon_iters)}"
    if c.sample.sampler != "ddim":
        raise ValueError("the study's same-noise guarantee needs the deterministic sampler (DDIM, eta 0)")
    return finalize(c)


# ------------------------------------------------------------------------------------------------- evaluator

class Evaluator:
    """The study's CNN (trained once, cached in <out>/evaluator.npz) and the features of all 5,000 real digits."""

    def __init__(self, out: str, quick: bool, log=print):
        path = os.path.join(out, "evaluator.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                self.params = {k: f[k] for k in f.files if k != "accuracy"}
                self.heldout_accuracy = float(f["accuracy"])
        else:
            log("evaluator: training the digit CNN on the 4,500 training digits ...")
            self.params, self.heldout_accuracy = digit_cnn.train(0, 30 if quick else 1500)
            self.params = {k: np.asarray(v) for k, v in self.params.items()}
            np.savez(path, accuracy=self.heldout_accuracy, **self.params)
        (train, _), (test, test_labels) = load_digits("train"), load_digits("test")
        self.real_images = np.concatenate([train, test])
        _, self.real_features = digit_cnn.predict(self.params, self.real_images)
        self.real_stats = metrics.feature_statistics(self.real_features)
        # the scale of this feature space's FID: the 500 held-out real digits against all 5,000
        self.real_fid = self.quality(*self.features(test), test_labels)["fid"]

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 28, 28, 1) → (class predictions (N,), penultimate features (N, 128))."""
        return digit_cnn.predict(self.params, images)

    def quality(self, preds: np.ndarray, feats: np.ndarray, labels: np.ndarray) -> dict:
        """Quality against the real digits: class accuracy, CNN-FID, precision and recall (k = 3)."""
        fid = metrics.frechet_distance(*metrics.feature_statistics(feats), *self.real_stats)
        precision, recall = metrics.precision_recall(self.real_features, feats, k=3)
        return {"class_accuracy": float(np.mean(preds == labels)), "fid": fid, "precision": precision,
                "recall": recall}


def fidelity_to_fp(images, preds, feats, fp: dict) -> dict:
    """PSNR, FID-to-FP and class agreement of a row's samples against their FP twins (same noise and labels)."""
    return {"psnr": fidelity.psnr(images, fp["images"]), "fid_to_fp": fidelity.fid_to_reference(feats, fp["feats"]),
            "class_agreement": fidelity.class_agreement(preds, fp["preds"])}


def inception_fid(images: np.ndarray, real: np.ndarray) -> float:
    """Inception FID (pool_3) of 500 samples against 500 real digits, when the Inception weights are installed."""
    from terdit_jax.eval.evaluate import evaluate
    return float(evaluate(images[:500], real[np.random.default_rng(0).permutation(len(real))[:500]])["fid"])


# ------------------------------------------------------------------------------------ sampling under one noise

def study_noise(config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The initial noises and labels every row of the study samples from: 100 per class in class order, x_T drawn
    once as one (N, H, W, C) array from `seed` (so it does not depend on the batch size) → (x_T float32, labels)."""
    m = config.model
    labels = np.repeat(np.arange(10, dtype=np.int32), config.sample.per_class)
    x_T = jax.random.normal(jax.random.key(seed), (len(labels), m.input_size, m.input_size, m.in_channels))
    return np.asarray(x_T, np.float32), labels


def guided(apply, params, config, guidance: float):
    """The model function the sampler calls: classifier-free guided unless guidance is 1."""
    fn = bind(apply, params)
    if guidance == 1.0:
        return fn
    return cfg_model_fn(fn, guidance, config.model.num_classes, config.sample.cfg_channels)


def draw(apply, params, config, x_T, labels, guidance: float, on_step=None) -> np.ndarray:
    """Deterministic DDIM samples from the given initial noises → uint8 (N, H, W, C). on_step(k, x) (optional) sees
    each batch's state before step k."""
    s, m = config.sample, config.model
    diffusion = create_diffusion(str(s.num_steps), config.diffusion.num_timesteps, m.prediction)
    out = []
    for lo in range(0, len(labels), s.batch_size):
        x0 = x_T[lo:lo + s.batch_size]
        # eta = 0: the step noise is multiplied by σ = 0, so the key does not matter; the initial noise is all
        x = sample(bind(apply, params), diffusion, x0.shape, jax.random.key(0), labels[lo:lo + s.batch_size],
                   sampler="ddim", eta=0.0, cfg_scale=float(guidance), null_y=m.num_classes,
                   guidance_channels=s.cfg_channels, x_T=jnp.asarray(x0), on_step=on_step)
        out.append(to_uint8(jax.device_get(x)))
    return np.concatenate(out)


@jax.jit
def _denoise(model_fn, x, t, y):
    return model_fn(x, t, y)


def denoiser_outputs(model_fn, config, states: np.ndarray, steps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The (guided) model's prediction at each recorded state: states (S, M, H, W, C), steps (S,) step indices of
    the respaced diffusion → (S, M, H, W, C) float32 (the prediction channels, not the variance ones)."""
    s, m = config.sample, config.model
    diffusion = create_diffusion(str(s.num_steps), config.diffusion.num_timesteps, m.prediction)
    y = jnp.asarray(labels, jnp.int32)
    outs = []
    for x, k in zip(states, steps):
        t = diffusion.timestep_map[jnp.full((len(x),), int(k), jnp.int32)]
        outs.append(np.asarray(_denoise(model_fn, jnp.asarray(x), t, y)[..., :m.in_channels], np.float32))
    return np.stack(outs)


def trajectory_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` samples of each class (the samples whose FP trajectory is followed)."""
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)])


# ------------------------------------------------------------------------------------------------------- study

def _save_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def smoothed(values, weight: float = 0.995) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing, the TerDiT paper's Fig. 5)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return np.asarray(out)


def loss_log(workdir: str) -> tuple[list[int], list[float]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], []
    recs = [json.loads(line) for line in open(path) if '"loss"' in line]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def mappings_used() -> float:
    """The share of the kernel's memory-mapping limit (vm.max_map_count) this process holds; 1.0 where /proc does
    not tell (then every job releases)."""
    try:
        with open("/proc/self/maps") as f:
            held = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return held / int(f.read())
    except (OSError, ValueError):
        return 1.0


class Study:
    """Everything the rows share, made once and cached under <out>: trained models, each family's guidance sweep,
    the FP twins' samples per noise seed and their trajectories."""

    def __init__(self, args, evaluator: Evaluator, log=print):
        self.args, self.evaluator, self.log, self.out = args, evaluator, log, args.out
        self._models: dict = {}
        for sub in ("train", "rows", "fp"):
            os.makedirs(os.path.join(self.out, sub), exist_ok=True)

    def release(self, share: float = 0.5) -> bool:
        """After a job: drop the loaded models and every compiled program once this process holds more than
        `share` of the kernel's memory-mapping limit. XLA's CPU executables each hold mappings: kept for all 82
        jobs of one process, they reached the limit (vm.max_map_count, 65,530) and LLVM failed with "Cannot
        allocate memory" at job 68 of a --quick run (2026-12-04). Below the share, the next job reuses them.
        → whether it released."""
        if mappings_used() <= share:
            return False
        self._models.clear()
        jax.clear_caches()
        return True

    def workdir(self, row: Row, seed: int) -> str:
        return os.path.join(self.out, "train", f"{row.slug}_seed{seed}")

    def trained(self, row: Row, seed: int) -> dict:
        """Train a training row (resuming from its checkpoints) unless done → its training stats."""
        workdir, done = self.workdir(row, seed), os.path.join(self.workdir(row, seed), "trained.json")
        if os.path.exists(done):
            return json.load(open(done))
        from terdit_jax.train import train

        config = study_config(row, seed, self.args.quick)
        self.log(f"[{row.name}] training {config.train.steps} steps (seed {seed}) in {workdir}")
        stages = Stages(lambda *_: None)
        with stages("training"):
            out = train(config, workdir, log=lambda *_: None)
        if out["preempted"]:
            raise SystemExit("preempted; rerun the study to resume")
        steps, losses = loss_log(workdir)
        stats = {"method_seconds": stages.report["training"]["seconds"],
                 "host_peak_bytes": stages.report["training"]["host_peak_increase_bytes"],
                 "final_loss": float(smoothed(losses)[-1]) if losses else None}
        _save_json(done, stats)
        return stats

    def model(self, config, workdir: str):
        """(config, apply, params) of a stored model, loaded once per process (so its sampler compiles once)."""
        key = (workdir, config.sample.quantized)
        if key not in self._models:
            loaded, apply, params, _, _ = load_for_sampling(config, workdir, log=lambda *_: None)
            self._models[key] = (loaded, apply, params)
        return self._models[key]

    def fp_model(self, family: str, guidance: float = 4.0):
        row = FP_ROWS[family]
        self.trained(row, 0)
        config = study_config(row, 0, self.args.quick, guidance)
        return self.model(config, self.workdir(row, 0))[1:] + (config,)

    def fp_set(self, family: str, noise_seed: int, guidance: float) -> dict:
        """The family's FP model (seed 0) sampled from noise seed `noise_seed` at `guidance`, with its CNN
        predictions and features (cached in fp/)."""
        path = os.path.join(self.out, "fp", f"{family}_noise{noise_seed}_cfg{guidance:g}.npz")
        if not os.path.exists(path):
            apply, params, config = self.fp_model(family, guidance)
            x_T, labels = study_noise(config, noise_seed)
            self.log(f"[FP{FAMILY_TAG[family]}] sampling {len(labels)} digits, noise seed {noise_seed}, "
                     f"guidance {guidance:g}")
            images = draw(apply, params, config, x_T, labels, guidance)
            preds, feats = self.evaluator.features(images)
            np.savez(path + ".tmp.npz", images=images, labels=labels, preds=preds, feats=feats)
            os.replace(path + ".tmp.npz", path)
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def fp_trajectory(self, family: str, noise_seed: int, guidance: float) -> dict:
        """The FP model's states at every sampling step for TRAJECTORY_PER_CLASS samples per class, and its own
        predictions there: states, outputs (S, M, H, W, C), steps (S,), labels (M,) (cached in fp/)."""
        path = os.path.join(self.out, "fp", f"{family}_noise{noise_seed}_cfg{guidance:g}_trajectory.npz")
        if not os.path.exists(path):
            apply, params, config = self.fp_model(family, guidance)
            x_T, labels = study_noise(config, noise_seed)
            pick = trajectory_subset(labels, min(TRAJECTORY_PER_CLASS, config.sample.per_class))
            states, steps = [], []
            draw(apply, params, config, x_T[pick], labels[pick], guidance,
                 on_step=lambda k, x: (states.append(np.asarray(x, np.float32)), steps.append(k)))
            states, steps = np.stack(states), np.asarray(steps)
            outputs = denoiser_outputs(guided(apply, params, config, guidance), config, states, steps, labels[pick])
            np.savez(path + ".tmp.npz", states=states, outputs=outputs, steps=steps, labels=labels[pick])
            os.replace(path + ".tmp.npz", path)
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def sweep(self, family: str) -> dict:
        """CNN quality of the family's FP model (seed 0, noise seed 0) at every guidance of GUIDANCES, and the
        guidance of the lowest CNN-FID (cached in guidance_<family>.json)."""
        path = os.path.join(self.out, f"guidance_{family}.json")
        if os.path.exists(path):
            return json.load(open(path))
        scales = {}
        for g in GUIDANCES:
            fp = self.fp_set(family, 0, g)
            scales[f"{g:g}"] = self.evaluator.quality(fp["preds"], fp["feats"], fp["labels"])
        best = float(min(scales, key=lambda g: scales[g]["fid"]))
        result = {"family": family, "scales": scales, "best": best}
        _save_json(path, result)
        self.log(f"[FP{FAMILY_TAG[family]}] guidance sweep: " + ", ".join(
            f"{g}: FID {v['fid']:.1f}" for g, v in scales.items()) + f" → best {best:g}")
        return result

    def run(self, row: Row, seed: int) -> dict:
        """One job (a row at one seed) → its result (read back if it exists)."""
        path = job_dir(self.out, row, seed, self.args.recon_iters)
        result_path = os.path.join(path, "result.json")
        if os.path.exists(result_path):
            return json.load(open(result_path))
        os.makedirs(path, exist_ok=True)
        t0 = time.perf_counter()
        guidance = self.sweep(row.family)["best"]
        config = study_config(row, seed, self.args.quick, guidance, self.args.recon_iters)
        result = {"row": row.name, "group": row.group, "family": row.family, "seed": seed, "guidance": guidance}
        manifest = None
        if row.kind == "train":
            result.update(self.trained(row, seed))
            workdir = self.workdir(row, seed)
        else:
            workdir = self.workdir(FP_ROWS[row.family], 0)
            self.trained(FP_ROWS[row.family], 0)
        if row.kind == "ptq":
            stored = qckpt.model_dir(workdir, config.quant.name)
            if os.path.exists(os.path.join(stored, qckpt.MANIFEST)):  # quantized before an interruption
                manifest = qckpt.read_manifest(stored)
            else:
                self.log(f"[{row.name}] quantizing {workdir} (calibration seed {config.quant.calib_seed})")
                manifest = run_quantize_mode(config, workdir, log=lambda *_: None)
            if manifest is None:  # SIGTERM: the resume point is kept
                raise SystemExit("preempted; rerun the study to resume")
            result["method_seconds"] = round(sum(s["seconds"] for k, s in manifest["stages"].items()
                                                 if k != "calibration set"), 2)
            result["host_peak_bytes"] = max(s["host_peak_increase_bytes"] for s in manifest["stages"].values())
            config.sample.quantized = config.quant.name
        result.update(deployed(config, manifest))
        noise_seed = 1 if row.kind == "resample" else seed
        result["noise_seed"] = noise_seed
        if row.kind == "resample" or row == FP_ROWS[row.family] and seed == 0:
            fp_row = self.fp_set(row.family, noise_seed, guidance)
            images, preds, feats = fp_row["images"], fp_row["preds"], fp_row["feats"]
        else:
            loaded, apply, params = self.model(config, workdir)
            x_T, labels = study_noise(config, noise_seed)
            self.log(f"[{row.name}] sampling {len(labels)} digits, noise seed {noise_seed}, guidance {guidance:g}")
            images = draw(apply, params, loaded, x_T, labels, guidance)
            preds, feats = self.evaluator.features(images)
        labels = study_noise(config, noise_seed)[1]
        np.savez(os.path.join(path, "samples.npz"), images=images, labels=labels)
        grid = trajectory_subset(labels, min(10, config.sample.per_class))
        save_grid(os.path.join(path, "grid.png"), images[grid], labels[grid])
        result.update(self.evaluator.quality(preds, feats, labels))
        if row.kind == "resample":  # the floor of FID-to-FP: FP against itself under another noise
            result.update(fidelity_to_fp(images, preds, feats, self.fp_set(row.family, 0, guidance)))
        if row.kind == "ptq":
            result.update(fidelity_to_fp(images, preds, feats, self.fp_set(row.family, noise_seed, guidance)))
            traj = self.fp_trajectory(row.family, noise_seed, guidance)
            loaded, apply, params = self.model(config, workdir)
            outs = denoiser_outputs(guided(apply, params, loaded, guidance), loaded, traj["states"], traj["steps"],
                                    traj["labels"])
            result["step_error"] = fidelity.relative_error(outs, traj["outputs"]).tolist()
            result["step_index"] = traj["steps"].tolist()
        if self.args.inception:
            try:
                result["inception_fid"] = inception_fid(images, self.evaluator.real_images)
            except FileNotFoundError as e:
                result["inception_fid"] = f"not measured ({e})"
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        _save_json(result_path, result)
        return result


def deployed(config, manifest: dict | None) -> dict:
    """Bits per weight in the quantized layers (W/A) and the model's bytes as deployed."""
    from terdit_jax.export import packed_nbytes
    from terdit_jax.models.families import count_params

    if manifest is not None:
        return {"bits": f"W{manifest['bits']['weights']}A{manifest['bits']['activations']}",
                "deployed_bytes": int(manifest["deployed_bytes"])}
    m = config.model
    if m.linear == "fp":
        return {"bits": "W32A32", "deployed_bytes": 4 * count_params(m)}
    return {"bits": f"W1.58A{m.act_bits}", "deployed_bytes": int(packed_nbytes(m))}


# ---------------------------------------------------------------------------------------------------- verdicts

@dataclasses.dataclass(frozen=True)
class Stat:
    """A row's metric over its seeds."""
    mean: float
    std: float
    n: int


FP_TWIN = "FP twin"  # the pseudo-row "identical to FP": fidelity metrics of FP against itself under the same noise
FP_TWIN_STATS = {"fid_to_fp": Stat(0.0, 0.0, 1), "class_agreement": Stat(1.0, 0.0, 1)}


@dataclasses.dataclass(frozen=True)
class Claim:
    """An expectation of shared/study.md as a comparison of row `a` with row `b` on `metric`.
    kind "better": a is better than b; "close": a is within the noise of b (or within `tolerance`·|b|).
    floor: which noise floor applies to `metric` ("real": FID against the real digits, "fp": FID-to-FP, "" none)."""
    text: str
    kind: str
    a: str
    b: str
    metric: str
    lower_is_better: bool = True
    floor: str = ""
    tolerance: float = 0.0


def decide(a: Stat, b: Stat, kind: str, floor: float, lower_is_better: bool = True,
           tolerance: float = 0.0) -> str:
    """The verdict of one claim from the numbers. Two rows differ only where |a − b| exceeds the noise floor and
    their mean ± std intervals do not overlap (shared/study.md). "better": holds if they differ in the claimed
    direction, does not hold if they differ the other way, within noise if they do not differ. "close": holds if
    they do not differ by more than max(floor, tolerance·|b|), does not hold otherwise."""
    diff = a.mean - b.mean
    separated = abs(diff) > a.std + b.std
    if kind == "better":
        if not (abs(diff) > floor and separated):
            return "within noise"
        return "holds" if (diff < 0) == lower_is_better else "does not hold"
    if kind == "close":
        return "does not hold" if abs(diff) > max(floor, tolerance * abs(b.mean)) and separated else "holds"
    raise ValueError(f"unknown claim kind {kind!r}")


def claims() -> list[Claim]:
    """Every expectation of shared/study.md, for each family that has the rows."""
    out = [Claim("TerDiT close to FP (CNN-FID within the floor or 10%)", "close", "TerDiT", "FP", "fid",
                 floor="real", tolerance=0.1),
           Claim("the adaLN RMSNorm lowers the training loss", "better", "TerDiT", "TerDiT w/o adaLN RMSNorm",
                 "final_loss"),
           Claim("the adaLN RMSNorm lowers CNN-FID", "better", "TerDiT", "TerDiT w/o adaLN RMSNorm", "fid",
                 floor="real"),
           Claim("BitNet worse than TerDiT (CNN-FID)", "better", "TerDiT", "BitNet b1.58 DiT", "fid", floor="real"),
           Claim("BitNet slower to train than TerDiT", "better", "TerDiT", "BitNet b1.58 DiT", "method_seconds")]
    for f, tag in FAMILY_TAG.items():
        out += [Claim(f"{m} W8A8 within noise of FP{tag} (FID-to-FP)", "close", f"{m} W8A8{tag}", FP_TWIN,
                      "fid_to_fp", floor="fp") for m in ("RTN", "PTQ4DiT", "TQ-DiT")]
        # Two PTQ rows are compared on FID-to-FP against the same FP samples from the same noise (paired), so their
        # noise is the seed spread alone; the FP-resample floor (unpaired samples) decides "within noise of FP".
        out.append(Claim(f"PTQ4DiT ahead of RTN at W4A8{tag} (FID-to-FP)", "better", f"PTQ4DiT W4A8{tag}",
                         f"RTN W4A8{tag}", "fid_to_fp"))
        out += [Claim(f"{m} W2A16{tag} fails where TerDiT does not (CNN-FID)", "better", "TerDiT",
                      f"{m} W2A16{tag}", "fid", floor="real") for m in ("RTN", "PTQ4DiT")]
        out += [Claim(f"TQ-DiT ahead of {m} at W6A6{tag} (FID-to-FP)", "better", f"TQ-DiT W6A6{tag}",
                      f"{m} W6A6{tag}", "fid_to_fp") for m in ("RTN", "PTQ4DiT")]
    return out


def aggregate(results: list[dict]) -> dict[str, dict[str, Stat]]:
    """row name → metric → Stat over the row's seeds (population std; 0 for one seed)."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    out = {}
    for name, rs in by_row.items():
        keys = {k for r in rs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[name] = {k: Stat(float(np.mean(v)), float(np.std(v)), len(v))
                     for k in keys if (v := [r[k] for r in rs if isinstance(r.get(k), (int, float))])}
    return out


def noise_floors(stats: dict[str, dict[str, Stat]], family: str = LARGE_DIT) -> dict[str, float]:
    """"real": |CNN-FID(FP, noise seed 1) − CNN-FID(FP, noise seed 0)|; "fp": FID-to-FP of FP at noise seed 1."""
    tag = FAMILY_TAG[family]
    resample, fp = stats.get(f"FP{tag}, noise seed 1", {}), stats.get(f"FP{tag}", {})
    floors = {"": 0.0}
    if "fid" in resample and "fid" in fp:
        floors["real"] = abs(resample["fid"].mean - fp["fid"].mean)
    if "fid_to_fp" in resample:
        floors["fp"] = resample["fid_to_fp"].mean
    return floors


def verdicts(stats: dict[str, dict[str, Stat]]) -> list[dict]:
    """Each claim's verdict and the numbers that decide it ("not measured" where a row or floor is missing)."""
    out = []
    for c in claims():
        family = next((ROW_BY_NAME[n].family for n in (c.a, c.b) if n in ROW_BY_NAME and
                       ROW_BY_NAME[n].group == PTQ), LARGE_DIT)
        floors = noise_floors(stats, family)
        a, b = (FP_TWIN_STATS.get(c.metric) if n == FP_TWIN else stats.get(n, {}).get(c.metric)
                for n in (c.a, c.b))
        entry = {"claim": c.text, "a": c.a, "b": c.b, "metric": c.metric}
        if a is None or b is None or c.floor not in floors:
            entry["verdict"] = "not measured"
        else:
            entry.update(verdict=decide(a, b, c.kind, floors[c.floor], c.lower_is_better, c.tolerance),
                         a_mean=a.mean, a_std=a.std, a_n=a.n, b_mean=b.mean, b_std=b.std, b_n=b.n,
                         floor=floors[c.floor])
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------------ report

def _pm(s: Stat | None, spec: str) -> str:
    if s is None or not math.isfinite(s.mean):
        return "—" if s is None else str(s.mean)
    return format(s.mean, spec) + (f" ± {format(s.std, spec)}" if s.n > 1 else "")


TABLE = (("class acc.", "class_accuracy", ".3f"), ("CNN-FID", "fid", ".1f"), ("precision", "precision", ".3f"),
         ("recall", "recall", ".3f"), ("FID-to-FP", "fid_to_fp", ".2f"), ("PSNR dB", "psnr", ".1f"),
         ("class agr.", "class_agreement", ".3f"))


def table(results: list[dict], stats: dict, evaluator_acc: float, real_fid: float) -> str:
    """The results as a markdown table, one line per row: mean ± std over its seeds."""
    cols = ("group", "row", "seeds", *(c[0] for c in TABLE), "bits", "MB deployed", "method s", "host MB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    first = {}
    for r in results:
        first.setdefault(r["row"], r)
    for name, r in first.items():
        s = stats[name]
        host = max(x.get("host_peak_bytes", 0) for x in results if x["row"] == name)
        cells = [r["group"], name, str(s["fid"].n if "fid" in s else 1), *(_pm(s.get(k), f) for _, k, f in TABLE),
                 r["bits"], format(r["deployed_bytes"] / 1e6, ".3f"), _pm(s.get("method_seconds"), ".0f"),
                 format(host / 2**20, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Evaluator: digit CNN, {evaluator_acc:.1%} on the 500 held-out real digits. CNN-FID / precision / "
              f"recall in its penultimate features against all 5,000 real digits (the 500 held-out real digits score "
              f"{real_fid:.1f}). FID-to-FP, PSNR and class agreement: each sample against its FP twin (same noise, "
              "label, sampler); the FP noise-seed-1 rows are the noise floors. bits: weights/activations of the "
              "quantized layers. method s: training, or calibration without the shared calibration set. host MB: "
              "peak resident host memory above what the process held when the method started."]
    return "\n".join(lines)


def sweep_table(sweeps: list[dict]) -> str:
    lines = ["| family | " + " | ".join(f"CFG {g:g}" for g in GUIDANCES) + " | best |",
             "|" + "---|" * (len(GUIDANCES) + 2)]
    for s in sweeps:
        lines.append(f"| {s['family']} | " + " | ".join(f"{s['scales'][f'{g:g}']['fid']:.1f}" for g in GUIDANCES)
                     + f" | {s['best']:g} |")
    return "\n".join(["CNN-FID of each family's FP model against the real digits, by guidance:", "", *lines])


def verdict_table(vs: list[dict]) -> str:
    lines = ["| expectation | verdict | a | b | floor |", "|---|---|---|---|---|"]
    for v in vs:
        if v["verdict"] == "not measured":
            lines.append(f"| {v['claim']} | not measured | {v['a']} | {v['b']} | — |")
            continue
        a = _pm(Stat(v["a_mean"], v["a_std"], v["a_n"]), ".3g")
        b = _pm(Stat(v["b_mean"], v["b_std"], v["b_n"]), ".3g")
        lines.append(f"| {v['claim']} | **{v['verdict']}** | {v['a']}: {a} | {v['b']}: {b} | {v['floor']:.3g} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def loss_curves(study: Study, jobs) -> str | None:
    """loss_curves.png: every training row's smoothed training loss, and TerDiT with/without the adaLN RMSNorm
    side by side (the paper's Fig. 5). None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, seed in jobs:
        if row.kind != "train":
            continue
        steps, losses = loss_log(study.workdir(row, seed))
        if not losses:
            continue
        label, loss = f"{row.name} (seed {seed})", smoothed(losses)
        axes[0].plot(steps, loss, label=label)
        if row.name in ("TerDiT", "TerDiT w/o adaLN RMSNorm"):
            axes[1].plot(steps, loss, label=label)
    for ax, title in zip(axes, ("training rows", "adaLN RMSNorm ablation (TerDiT Fig. 5)")):
        ax.set(title=title, xlabel="step", ylabel="training loss (EMA 0.995)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, os.path.join(study.out, "loss_curves.png"))


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


METHOD_COLORS = {"RTN": "tab:blue", "PTQ4DiT": "tab:orange", "TQ-DiT": "tab:green", "TerDiT": "tab:red",
                 "BitNet": "tab:purple", "FP": "black"}
WIDTH_STYLES = {"W8A8": "-", "W6A6": "--", "W4A8": "-.", "W2A16": ":"}


def _style(name: str) -> tuple[str, str, bool]:
    """(colour by method, line style by bit width, whether it is a method's main row rather than an ablation or
    variant) of a row: the 17 curves of a panel stay tellable apart."""
    color = next((c for m, c in METHOD_COLORS.items() if name.startswith(m)), "gray")
    style = next((ls for w, ls in WIDTH_STYLES.items() if f" {w}" in name), "-")
    main = name.removesuffix(FAMILY_TAG[DIT]) in {f"{m} {w}" for m in ("RTN", "PTQ4DiT", "TQ-DiT") for w in WIDTH_STYLES}
    return color, style, main


def pareto(out: str, results: list[dict], stats: dict) -> str | None:
    """pareto.png: deployed bytes (log) against FID-to-FP (PTQ rows) and against CNN-FID (every row), both log: the
    2-bit rows sit two orders of magnitude above the rest. Colour by method; only the claim rows are labelled."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    size = {r["row"]: r["deployed_bytes"] for r in results}
    group = {r["row"]: r["group"] for r in results}
    for ax, metric, title, only_ptq in ((axes[0], "fid_to_fp", "PTQ rows: FID to the FP twin", True),
                                        (axes[1], "fid", "every row: CNN-FID against the real digits", False)):
        for name, s in stats.items():
            if metric not in s or (only_ptq and group[name] != PTQ):
                continue
            color = _style(name)[0]
            ax.errorbar(size[name], s[metric].mean, yerr=s[metric].std, fmt="o", ms=4, color=color)
            if name in ROW_BY_NAME and (ROW_BY_NAME[name].claim or "W2A16" in name) or group[name] != PTQ:
                ax.annotate(name, (size[name], s[metric].mean), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="deployed model bytes", ylabel=metric, title=title)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in METHOD_COLORS.items()]
    axes[1].legend(handles=handles, fontsize=7)
    return _save(fig, plt, os.path.join(out, "pareto.png"))


def step_error_plot(out: str, results: list[dict]) -> str | None:
    """step_error.png: the denoiser's relative error against FP at each sampling step (mean over seeds), one panel
    per family, noisiest step on the left; colour by method, line style by bit width, ablations thin."""
    plt = _pyplot()
    if plt is None:
        return None
    curves: dict[tuple[str, str], list] = {}
    for r in results:
        if "step_error" in r:
            curves.setdefault((r["family"], r["row"]), []).append(r["step_error"])
    families = [f for f in FAMILY_TAG if any(f == fam for fam, _ in curves)] or list(FAMILY_TAG)
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 5.5), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        for (f, name), errs in curves.items():
            if f == family:
                color, ls, main = _style(name)
                ax.plot(np.mean(errs, 0), label=name, color=color, ls=ls, lw=1.8 if main else 0.8,
                        alpha=1.0 if main else 0.6)
        ax.set(title=f"{family}: ‖f_q − f_FP‖/‖f_FP‖ along the FP trajectory", ylabel="relative error",
               xlabel="sampling step (noisiest first)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5.5, ncol=2)
    return _save(fig, plt, os.path.join(out, "step_error.png"))


# ---------------------------------------------------------------------------------------------------- estimate

# Seconds per job on the 2-core VM, shared with other work (load 3-5), so these are upper bounds. Training 3,400 steps:
# FP 590 s and FP (DiT) 1,150 s (0.17 and 0.34 s/step over 300 steps, measured 2026-12-04), the TerDiT-family rows
# from the last full study (2026-12-02, README: TerDiT 653 s); calibration at 2,000 reconstruction iterations per
# unit from that study (the TQ-DiT rows before the HO fix); sampling 1,000 digits (DDIM 50, CFG) of one model, 67 s
# (Large-DiT) and 86 s (DiT) measured 2026-12-04. The running estimate replaces them by this run's own measured
# jobs as soon as there are any of the same kind.
PRIOR_SECONDS = {"train": 650.0, "train fp": 590.0, "train fp dit": 1150.0, "rtn": 5.0, "ptq4dit": 250.0,
                 "ptq4dit w/o reconstruction": 7.0, "ptq4dit w2a16": 122.0, "tqdit": 115.0, "sample": 75.0}


def job_kind(row: Row) -> str:
    if row.kind != "ptq":
        return ("train fp" + (" dit" if row.family == DIT else "")) if row in FP_ROWS.values() else row.kind
    o = dict(row.overrides)
    if o["quant.method"] == "ptq4dit" and not o.get("quant.recon", True):
        return "ptq4dit w/o reconstruction"
    if o["quant.method"] == "ptq4dit" and o["quant.w_bits"] == 2:
        return "ptq4dit w2a16"
    return o["quant.method"]


def estimate_seconds(jobs, done: dict, out: str = "") -> float:
    """Seconds left for `jobs` not in `done` ((row, seed) → result): each job costs the mean wall time of the
    finished jobs of its kind, or PRIOR_SECONDS (method + one sampling of 1,000 digits); a family not swept yet adds
    its guidance sweep (one sampling per guidance) and, when no job trains it, its FP model."""
    measured: dict[str, list[float]] = {}
    for (row, _), r in done.items():
        measured.setdefault(job_kind(row), []).append(r["wall_seconds"])
    total = 0.0
    for row, seed in jobs:
        if (row, seed) not in done:
            kind = job_kind(row)
            total += float(np.mean(measured[kind])) if kind in measured else (
                PRIOR_SECONDS.get(kind, 0.0) + (PRIOR_SECONDS["sample"] if kind != "resample" else 0.0))
    for family in {row.family for row, _ in jobs}:
        if not os.path.exists(os.path.join(out, f"guidance_{family}.json")):
            total += len(GUIDANCES) * PRIOR_SECONDS["sample"]
            if (FP_ROWS[family], 0) not in jobs:
                total += PRIOR_SECONDS[job_kind(FP_ROWS[family])]
    return total


# -------------------------------------------------------------------------------------------------------- main

def select_rows(spec: str) -> list[Row]:
    wanted = {w.strip().lower() for w in spec.split(",") if w.strip()}
    rows = [r for r in ROWS if not wanted or r.name.lower() in wanted or r.slug in wanted]
    unknown = wanted - {r.name.lower() for r in rows} - {r.slug for r in rows}
    if unknown:
        print(f"error: unknown rows {sorted(unknown)}; known: {', '.join(r.slug for r in ROWS)}", file=sys.stderr)
        sys.exit(2)
    return rows


def job_dir(out: str, row: Row, seed: int, recon_iters: int = STUDY_RECON_ITERS) -> str:
    tag = budget_tag(recon_iters) if row.kind == "ptq" else ""
    return os.path.join(out, "rows", f"{row.slug}_seed{seed}{tag}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="", help="comma-separated row names or slugs (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the claim rows (the others run seed 0)")
    p.add_argument("--quick", action="store_true", help="every row at a toy budget (checks the machinery)")
    p.add_argument("--inception", action="store_true", help="also an Inception FID of 500 samples per row")
    p.add_argument("--plan", action="store_true", help="print the jobs and the time estimate, run nothing")
    p.add_argument("--recon_iters", type=int, default=STUDY_RECON_ITERS,
                   help=f"PTQ reconstruction iterations per unit (default {STUDY_RECON_ITERS}, the study's; the "
                        "paper's 20000); another budget gets its own stored models and row folders")
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds}: need at least 1 seed per row", file=sys.stderr)
        sys.exit(2)
    if args.recon_iters < 1:
        print(f"error: --recon_iters {args.recon_iters}: need at least 1 iteration per unit", file=sys.stderr)
        sys.exit(2)
    rows = select_rows(args.rows)
    jobs = [(row, seed) for row in rows for seed in row_seeds(row, args.seeds)]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    done = {}
    for row, seed in jobs:
        path = os.path.join(job_dir(args.out, row, seed, args.recon_iters), "result.json")
        if os.path.exists(path):
            done[(row, seed)] = json.load(open(path))
    hours_left = lambda: estimate_seconds(jobs, done, args.out) / 3600  # noqa: E731
    log(f"study: {len(jobs)} jobs ({len(done)} done); estimate for the rest {hours_left():.1f} h on the 2-core VM"
        + (" (at the full budget; --quick takes minutes)" if args.quick else ""))
    if args.plan:
        for row, seed in jobs:
            log(f"  {'done' if (row, seed) in done else 'todo'}  {row.name} (seed {seed}, {job_kind(row)})")
        return {"jobs": len(jobs), "done": len(done), "estimate_hours": hours_left()}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    study = Study(args, Evaluator(args.out, args.quick, log), log)
    results = []
    for i, (row, seed) in enumerate(jobs):
        if (row, seed) not in done:
            done[(row, seed)] = study.run(row, seed)
            study.release()
        results.append(done[(row, seed)])
        log(f"[{i + 1}/{len(jobs)}] {row.name} seed {seed}: {results[-1]['wall_seconds']:.0f} s; elapsed "
            f"{time.perf_counter() - t0:.0f} s; estimate for the rest {hours_left():.2f} h")
    stats = aggregate(results)
    vs = verdicts(stats)
    sweeps = [study.sweep(f) for f in FAMILY_TAG if any(r.family == f for r in rows)]
    md = "\n\n".join([table(results, stats, study.evaluator.heldout_accuracy, study.evaluator.real_fid),
                      sweep_table(sweeps), "Verdicts (shared/study.md's expectations):", verdict_table(vs)])
    summary = {"rows": results, "verdicts": vs, "guidance_sweeps": sweeps,
               "evaluator_heldout_accuracy": study.evaluator.heldout_accuracy,
               "real_heldout_fid": study.evaluator.real_fid, "quick": args.quick, "seeds": args.seeds,
               "seconds": round(time.perf_counter() - t0, 1), "device": jax.devices()[0].device_kind,
               "recon_iters": study_config(rows[0], 0, args.quick, recon_iters=args.recon_iters).quant.recon_iters,
               "loss_curves": loss_curves(study, jobs), "pareto": pareto(args.out, results, stats),
               "step_error": step_error_plot(args.out, results)}
    _save_json(os.path.join(args.out, "results.json"), summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"study: {len(results)} results in {summary['seconds']:.0f} s → {args.out}")
    return summary


if __name__ == "__main__":
    main()
