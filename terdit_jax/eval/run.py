"""`--mode eval`: sample N images (resumable, all local devices), save the ADM `.npz`, score it against a
reference with the ADM metrics, and write a JSON report."""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np


def reference_for(config, workdir: str, *, log=print) -> str:
    """The reference batch: config.eval.reference, or for the digits demo `eval.digits_reference_size` held-out
    real digits (their Inception statistics are computed once and kept in workdir/eval/)."""
    if config.eval.reference:
        if not os.path.exists(config.eval.reference):
            raise FileNotFoundError(f"config.eval.reference={config.eval.reference!r} does not exist; pass an ADM "
                                    "reference .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder")
        return config.eval.reference
    if config.data.kind != "digits":
        raise FileNotFoundError("set config.eval.reference to an ADM reference batch .npz (for ImageNet 256: "
                                "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion) or an image folder")
    from terdit_jax.data.digits import load_digits
    from terdit_jax.eval.evaluate import reference_stats

    n = config.eval.digits_reference_size
    path = os.path.join(workdir, "eval", f"reference_heldout_digits_{n}.npz")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        images, labels = load_digits("test")
        keep = np.concatenate([np.flatnonzero(labels == k)[:n // 10] for k in range(10)])  # class-balanced
        log(f"computing Inception statistics of {len(keep)} held-out real digits (once per workdir) ...")
        reference_stats(images[keep], path, weights_path=config.eval.inception_weights or None,
                        batch_size=config.eval.batch_size)
    return path


def samples_key(model: dict, config) -> dict:
    """Everything the evaluation samples depend on: which model exactly (`sample.identify_model`, its paths
    aside, so a moved workdir keeps its samples), the sampler settings and seed, the compute dtype."""
    s, m = config.sample, config.model
    prompts = {"prompts": s.prompts or s.prompt_embeds} if (s.prompts or s.prompt_embeds) else {}
    return {"model": {k: v for k, v in model.items() if k not in ("what", "path")}, **prompts, "sampler": s.sampler,
            "num_steps": int(s.num_steps), "cfg_scale": float(s.cfg_scale), "cfg_channels": s.cfg_channels,
            "seed": int(s.seed), "dtype": m.dtype, "packed_act_dtype": m.get("packed_act_dtype", ""),
            "vae_path": config.data.vae_path if config.data.latent else ""}


def run_eval_mode(config, workdir: str, *, log=print) -> dict:
    """Sample config.eval.num_samples images and score them. Returns the report. A class-conditional model draws
    uniformly random labels; a text family cycles through the prompts of sample.prompts / sample.prompt_embeds
    (e.g. COCO captions; each `sample.per_class` times), the .npz labels being the prompt indices.

    The samples go to <workdir>/eval/<model>_step_<step>_<sampler><steps>_cfg<scale>_<id>/, where <id> hashes
    `samples_key`: an interrupted evaluation resumes there, and a model quantized (or trained) again never
    reuses another model's samples."""
    from terdit_jax.eval.evaluate import evaluate, generate_samples
    from terdit_jax.data.conditions import kind_of
    from terdit_jax.sample import artifact_tag, generate, identify_model, latent_decoder, load_for_sampling, \
        sample_conditions, sampling_tag

    model = identify_model(config, workdir)  # a wrong name fails here, before the reference's Inception pass
    tag = artifact_tag(config)
    config, apply, params, step, model_labels = load_for_sampling(config, workdir, log=log)
    reference = reference_for(config, workdir, log=log)
    s, n = config.sample, config.eval.num_samples
    key_fields = samples_key(model, config)
    sid = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:10]
    out_dir = os.path.join(workdir, "eval", f"{tag + '_' if tag else ''}step_{step:07d}_{sampling_tag(config)}_{sid}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples_key.json"), "w") as f:
        json.dump(key_fields, f, indent=1)
    decode, key = latent_decoder(config), jax.random.key(s.seed)

    text = sample_conditions(config, model_labels, log) if kind_of(config.model) == "caption" else None

    def sample_fn(start: int, count: int):  # deterministic in `start`, so an interrupted run resumes exactly
        if text is None:
            labels = np.random.default_rng([s.seed, start]).integers(0, config.model.num_classes, count)
            y, null_y = model_labels(labels), None
        else:
            entry = np.arange(start, start + count) % len(text.rows)
            labels, null_y = text.rows[entry], text.null_y
            y = jax.tree_util.tree_map(lambda a: a[entry], text.y)
        images = generate(apply, params, y, config, jax.random.fold_in(key, start), null_y=null_y, decode=decode)
        return images, labels

    log(f"sampling {n} images from {model['what']} into {out_dir} (resumable) ...")
    npz = generate_samples(sample_fn, n, s.batch_size, os.path.join(out_dir, "parts"),
                           os.path.join(out_dir, f"samples_{n}.npz"))
    report = evaluate(npz, reference, weights_path=config.eval.inception_weights or None,
                      batch_size=config.eval.batch_size)
    report.update(model=model, step=step, sampler=s.sampler, num_steps=s.num_steps, cfg_scale=s.cfg_scale,
                  seed=s.seed, samples=npz, reference=reference)
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    report["report"] = path
    return report


def digits_quality(config, workdir: str, images: np.ndarray, labels, *, log=print) -> dict:
    """Quality of generated digits: class accuracy (a classifier trained on the real training digits) and, when
    the Inception weights are installed, FID / Precision / Recall against held-out real digits."""
    from terdit_jax.eval.digit_classifier import class_accuracy, train_classifier

    clf, real_acc = train_classifier(config.seed)
    out = {"class_accuracy": class_accuracy(clf, images, labels), "classifier_heldout_accuracy": real_acc}
    try:
        from terdit_jax.eval.evaluate import evaluate

        report = evaluate(images, reference_for(config, workdir, log=log),
                          weights_path=config.eval.inception_weights or None, batch_size=config.eval.batch_size)
        out.update(fid=report["fid"], precision=report["precision"], recall=report["recall"],
                   fid_num_samples=report["num_samples"])
    except FileNotFoundError as e:  # no Inception weights installed: report what we have, say how to get FID
        log(f"FID skipped: {e}")
    return out
