"""The quantization study (shared/study.md): every low-bit method of the project on one model, one data set, one
sampler and one evaluator, in one table.

    python benchmarks/quant_study.py --out runs/study [--rows NAME,...] [--seeds 0] [--quick] [--inception]

Training rows train configs/demo.py (its recipe, steps and seed) with their overrides; PTQ rows quantize the EMA
weights of the full-precision row. Every row samples 1,000 digits (100 per class) with the demo's sampler (DDIM
50 steps, CFG 4.0) and one fixed seed; the FP row is sampled a second time with another seed, the noise floor
below which two rows do not differ. One evaluator for all: a small CNN trained once on the training digits
(terdit_jax.eval.digit_cnn) gives class accuracy, and FID / precision / recall (k = 3) in its penultimate
features against all 5,000 real digits; `--inception` adds an Inception FID of 500 samples per row.

Writes <out>/results.json, results.md (the table), loss_curves.png (training rows, exponential smoothing 0.995 as
the TerDiT paper's Fig. 5), a grid per row (rows/<row>/grid.png) and prints the table. Resumable: a row whose
result exists is skipped, training resumes from its checkpoints, PTQ rows share the FP row's calibration set.
`--quick` runs every row at a toy budget (a 1-block model, a few steps and samples) to check the machinery.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--quick" in sys.argv:  # toy budget: compiling dominates, and LLVM at -O0 compiles ~1.5× faster (measured)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from terdit_jax.config import finalize  # noqa: E402
from terdit_jax.configs.demo import get_config as demo_config  # noqa: E402
from terdit_jax.data.digits import load_digits  # noqa: E402
from terdit_jax.eval import digit_cnn, metrics  # noqa: E402
from terdit_jax.ptq.run import Stages, run_quantize_mode  # noqa: E402
from terdit_jax.sample import generate, load_for_sampling, save_grid  # noqa: E402

REFERENCE, TERDIT, QAT, PTQ = "reference", "TerDiT", "other QAT", "PTQ"
STUDY_RECON_ITERS = 2000  # per unit, a tenth of the paper's 20k: the study's budget (shared/study.md)


@dataclasses.dataclass(frozen=True)
class Row:
    """name: as the table shows it; kind: "train" (QAT or FP training), "resample" (the FP model, another
    sampling seed) or "ptq" (quantizes the FP row); overrides: dotted config fields."""
    name: str
    group: str
    kind: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_").replace("__", "_")


def _ptq(name, method, w, a, **extra):
    return Row(name, PTQ, "ptq", (("quant.method", method), ("quant.w_bits", w), ("quant.a_bits", a),
                                  *((f"quant.{k}", v) for k, v in extra.items())))


ROWS = (
    Row("FP", REFERENCE, "train", (("model.linear", "fp"),)),
    Row("FP, sampling seed 1", REFERENCE, "resample", (("sample.seed", 1),)),
    Row("TerDiT", TERDIT, "train"),
    Row("TerDiT w/o adaLN RMSNorm", TERDIT, "train", (("model.adaln_norm", False),)),
    Row("TerDiT w/o LR reduction", TERDIT, "train", (("train.lr_reduce_step", -1),)),
    Row("BitNet b1.58 DiT", QAT, "train", (("model.linear", "bitnet"), ("model.act_bits", 8),
                                           ("model.pre_norms", False), ("model.adaln_norm", False))),
    Row("TerDiT W1.58A8", QAT, "train", (("model.act_bits", 8),)),
    *(_ptq(f"RTN W{w}A{a}", "rtn", w, a) for w, a in ((8, 8), (6, 6), (4, 8), (2, 16))),
    *(_ptq(f"PTQ4DiT W{w}A{a}", "ptq4dit", w, a) for w, a in ((8, 8), (6, 6), (4, 8), (2, 16))),
    _ptq("PTQ4DiT W4A8 w/o CSB+SSC", "ptq4dit", 4, 8, csb=False),
    _ptq("PTQ4DiT W4A8 w/o reconstruction", "ptq4dit", 4, 8, recon=False),
    *(_ptq(f"TQ-DiT W{w}A{a}", "tqdit", w, a) for w, a in ((8, 8), (6, 6), (4, 8))),
    _ptq("TQ-DiT W6A6 w/o TGQ", "tqdit", 6, 6, tgq=False),
    _ptq("TQ-DiT W6A6 w/o MRQ", "tqdit", 6, 6, mrq=False),
    _ptq("TQ-DiT W6A6, two-region SwiGLU hidden", "tqdit", 6, 6, swiglu_mrq=True),
    _ptq("TQ-DiT W6A6, HO = MSE", "tqdit", 6, 6, ho="mse"),
)
FP_ROW = ROWS[0]


def study_config(row: Row, seed: int, quick: bool):
    """configs/demo.py with the row's overrides (training rows) or the FP row's model (the others)."""
    c = demo_config()
    c.seed = seed
    c.sample.per_class, c.sample.batch_size = 100, 250
    c.eval.demo_quality = False
    q = c.quant
    q.calib_cfg_scale = c.sample.cfg_scale  # calibrate with the guidance the study samples with
    q.recon_iters = STUDY_RECON_ITERS
    if quick:
        c.model.n_layers = 1
        c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.warmup_steps = 6, 2, 6, 0
        c.train.lr_reduce_step = 4 if c.train.lr_reduce_step >= 0 else -1
        c.sample.per_class, c.sample.num_steps, c.sample.batch_size = 2, 4, 20
        q.update(calib_steps=2, calib_latents=4, recon_iters=2, recon_batch_size=8, time_groups=2, alpha_grid=5,
                 search_rounds=1)
    overrides = dict(row.overrides) if row.kind == "train" else {**dict(FP_ROW.overrides), **dict(row.overrides)}
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    if row.kind == "train" and quick and c.train.lr_reduce_step >= 0:
        c.train.lr_reduce_step = 4
    if row.kind == "ptq":
        c.quant.name = row.slug
    return finalize(c)


# ------------------------------------------------------------------------------------------------- evaluator

class Evaluator:
    """The study's CNN (trained once, cached in <out>/evaluator.npz) and the statistics of all 5,000 real digits."""

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
        train, test = load_digits("train")[0], load_digits("test")[0]
        real = np.concatenate([train, test])
        _, self.real_features = digit_cnn.predict(self.params, real)
        self.real_images = real
        # the scale of this feature space's FID: the 500 held-out real digits against all 5,000
        self.real_fid = self(test, load_digits("test")[1])["fid"]

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
        preds, feats = digit_cnn.predict(self.params, images)
        mu, sigma = self.real_features.mean(0), np.cov(self.real_features, rowvar=False)
        fid = metrics.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
        precision, recall = metrics.precision_recall(self.real_features, feats, k=3)
        return {"class_accuracy": float(np.mean(preds == labels)), "fid": fid, "precision": precision,
                "recall": recall}


def inception_fid(images: np.ndarray, real: np.ndarray) -> float:
    """Inception FID (pool_3) of 500 samples against 500 real digits, when the Inception weights are installed."""
    from terdit_jax.eval.evaluate import evaluate
    return float(evaluate(images[:500], real[np.random.default_rng(0).permutation(len(real))[:500]])["fid"])


# ------------------------------------------------------------------------------------------------------ rows

def train_row(row: Row, config, workdir: str, log) -> dict:
    from terdit_jax.train import train

    stages = Stages(lambda *_: None)
    with stages("training"):
        out = train(config, workdir, log=log)
    if out["preempted"]:
        raise SystemExit("preempted; rerun the study to resume")
    return {"method_seconds": stages.report["training"]["seconds"],
            "host_peak_bytes": stages.report["training"]["host_peak_increase_bytes"]}


def deployed(row: Row, config, manifest: dict | None) -> dict:
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


def run_row(row: Row, seed: int, args, evaluator: Evaluator, log) -> dict:
    path = os.path.join(args.out, "rows", f"{row.slug}_seed{seed}")
    result_path = os.path.join(path, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(path, exist_ok=True)
    config = study_config(row, seed, args.quick)
    source = row if row.kind == "train" else FP_ROW
    workdir = os.path.join(args.out, "train", f"{source.slug}_seed{seed}")
    result = {"row": row.name, "group": row.group, "seed": seed}
    manifest = None
    t0 = time.perf_counter()
    if row.kind == "train" or not os.path.exists(os.path.join(workdir, "checkpoints")):
        cfg = config if row.kind == "train" else study_config(FP_ROW, seed, args.quick)
        log(f"[{row.name}] training {cfg.train.steps} steps in {workdir}")
        stats = train_row(source, cfg, workdir, log=lambda *_: None)
        if row.kind == "train":
            result.update(stats)
    if row.kind == "ptq":
        log(f"[{row.name}] quantizing {workdir}")
        manifest = run_quantize_mode(config, workdir, log=lambda *_: None)
        if manifest is None:  # SIGTERM: the resume point is kept
            raise SystemExit("preempted; rerun the study to resume")
        result["method_seconds"] = round(sum(s["seconds"] for k, s in manifest["stages"].items()
                                             if k != "calibration set"), 2)
        result["host_peak_bytes"] = max(s["host_peak_increase_bytes"] for s in manifest["stages"].values())
        config.sample.quantized = row.slug
    result.update(deployed(row, config, manifest))
    loaded, apply, params, _, to_labels = load_for_sampling(config, workdir)
    labels = np.repeat(np.arange(10), loaded.sample.per_class)
    log(f"[{row.name}] sampling {len(labels)} digits (seed {loaded.sample.seed}) ...")
    images = generate(apply, params, to_labels(labels), loaded, jax.random.key(loaded.sample.seed))
    np.savez(os.path.join(path, "samples.npz"), images=images, labels=labels)
    grid = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
    save_grid(os.path.join(path, "grid.png"), images[grid], labels[grid])
    result.update(evaluator(images, labels))
    if args.inception:
        try:
            result["inception_fid"] = inception_fid(images, evaluator.real_images)
        except FileNotFoundError as e:
            result["inception_fid"] = f"not measured ({e})"
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(result_path + ".tmp", result_path)
    return result


# ------------------------------------------------------------------------------------------------------ report

def smoothed(values, weight: float = 0.995) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing, the TerDiT paper's Fig. 5)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return np.asarray(out)


def loss_curves(out: str, seeds: list[int]) -> str | None:
    """loss_curves.png: every training row's smoothed training loss, and TerDiT with/without the adaLN RMSNorm
    side by side (the paper's Fig. 5). None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in ROWS:
        if row.kind != "train":
            continue
        for seed in seeds:
            log = os.path.join(out, "train", f"{row.slug}_seed{seed}", "metrics.jsonl")
            if not os.path.exists(log):
                continue
            recs = [json.loads(line) for line in open(log) if '"loss"' in line]
            steps, loss = [r["step"] for r in recs], smoothed([r["loss"] for r in recs])
            label = row.name + (f" (seed {seed})" if len(seeds) > 1 else "")
            axes[0].plot(steps, loss, label=label)
            if row.name in ("TerDiT", "TerDiT w/o adaLN RMSNorm"):
                axes[1].plot(steps, loss, label=label)
    for ax, title in zip(axes, ("training rows", "adaLN RMSNorm ablation (TerDiT Fig. 5)")):
        ax.set(title=title, xlabel="step", ylabel="training loss (EMA 0.995)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = os.path.join(out, "loss_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def table(results: list[dict], evaluator_acc: float, real_fid: float) -> str:
    """The results as a markdown table (one line per row; with several seeds, the mean and the range)."""
    cols = ("group", "row", "class acc.", "FID", "precision", "recall", "bits", "MB deployed", "method s",
            "host MB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    for name, rs in by_row.items():
        def agg(key, spec):
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            if not vals:
                return "—"
            mean = _fmt(float(np.mean(vals)), spec)
            return mean if len(vals) == 1 else f"{mean} ({_fmt(min(vals), spec)}–{_fmt(max(vals), spec)})"
        mb = _fmt(rs[0]["deployed_bytes"] / 1e6, ".3f") if "deployed_bytes" in rs[0] else "—"
        lines.append("| " + " | ".join([rs[0]["group"], name, agg("class_accuracy", ".3f"), agg("fid", ".1f"),
                                        agg("precision", ".3f"), agg("recall", ".3f"), rs[0]["bits"],
                                        mb, agg("method_seconds", ".0f"),
                                        _fmt(max(r.get("host_peak_bytes", 0) for r in rs) / 2**20, ".0f")]) + " |")
    lines.append("")
    lines.append(f"Evaluator: digit CNN, {evaluator_acc:.1%} on the 500 held-out real digits. FID/precision/recall "
                 f"in its penultimate features against all 5,000 real digits (the 500 held-out real digits score FID "
                 f"{real_fid:.1f}); compare rows within this table and "
                 "against the FP sampling-seed row (the noise floor). bits: weights/activations of the quantized "
                 "layers. method s: training, or calibration without the shared calibration set. host MB: peak "
                 "resident host memory above what the process held when the method started.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="", help="comma-separated row names or slugs (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--quick", action="store_true", help="every row at a toy budget (checks the machinery)")
    p.add_argument("--inception", action="store_true", help="also an Inception FID of 500 samples per row")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    wanted = {w.strip().lower() for w in args.rows.split(",") if w.strip()}
    rows = [r for r in ROWS if not wanted or r.name.lower() in wanted or r.slug in wanted]
    unknown = wanted - {r.name.lower() for r in rows} - {r.slug for r in rows}
    if unknown:
        sys.exit(f"error: unknown rows {sorted(unknown)}; known: {', '.join(r.slug for r in ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    evaluator = Evaluator(args.out, args.quick, log)
    results = [run_row(row, seed, args, evaluator, log) for row in rows for seed in seeds]
    curves = loss_curves(args.out, seeds)
    md = table(results, evaluator.heldout_accuracy, evaluator.real_fid)
    summary = {"rows": results, "evaluator_heldout_accuracy": evaluator.heldout_accuracy,
               "real_heldout_fid": evaluator.real_fid, "quick": args.quick,
               "seeds": seeds, "seconds": round(time.perf_counter() - t0, 1), "loss_curves": curves,
               "device": jax.devices()[0].device_kind, "recon_iters": STUDY_RECON_ITERS if not args.quick else 2}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"study: {len(results)} results in {summary['seconds']:.0f} s → {args.out}")
    return summary


if __name__ == "__main__":
    main()
