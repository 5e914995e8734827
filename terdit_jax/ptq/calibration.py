"""Calibration sets: the full-precision model's own sampling trajectories (PTQ4DiT §4 / its get_calibration_set.py).

The FP model samples with the sampler and step count of evaluation (config.sample) and guidance
quant.calib_cfg_scale (1.5); at quant.calib_steps steps spread uniformly over the trajectory (noisiest first, as
the official `range(0, N, N // cali_st)`) the model inputs x_t of quant.calib_latents latents are kept. Every
latent enters twice, with its class and with the null class, in groups [c, c, null, null] of two latents of one
class, so that batches made of whole groups keep each CFG pair together.

Classes: "uniform" draws the groups' classes evenly over all classes; "official" uses classes 0, 1, ... as the
official code does (it calibrates on classes 0–15 and takes its statistics from class 0 only). The statistics
subset (`init_indices`) is one group per selected step: the same first group at every step for "official",
a different group per step for "uniform".

A text family (PixArt: `Roles.cross`) conditions on caption embeddings instead of classes: quant.calib_prompts
names a caption-embeddings file (`text.captions`), its prompts take the classes' place (drawn the same way, two
latents per prompt) and the empty prompt the null class's (CFG with the empty caption, as PixArt's pipeline). The
set stores each entry's prompt index (P = the empty prompt) and the table of the P + 1 captions, not a caption per
entry.

Everything lives on the host (numpy); PTQ streams it to the device block by block.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import jax
import numpy as np

from terdit_jax.checkpoint import model_signature
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.diffusion.samplers import respacing, sample
from terdit_jax.model_fn import bind
from terdit_jax.ptq.common import roles
from terdit_jax.text import captions as captions_lib

CLASS_MODES = ("uniform", "official")
CALIB_FORMAT = 2  # 2: with the trajectories' final samples x0


class CalibrationError(ValueError):
    """A calibration set that does not belong to this model or these settings."""


@dataclasses.dataclass
class CalibSet:
    """E = S·N·2 entries. x (E, H, W, C) float32 model inputs, t (E,) original timesteps, y (E,) labels (the null
    class for the unconditional copies; a text family's: rows of `table`, the empty prompt's for those), k (E,) step index in the respaced schedule (0 = last step), x0 (E, H, W,
    C) the sample the entry's trajectory ended at, num_steps the schedule's length, init (100 for 25 steps) the
    statistics subset, fingerprint what made it, table the text family's conditions (caption (P+1, N, Cc), mask
    (P+1, N); row P the empty prompt) or None."""
    x: np.ndarray
    t: np.ndarray
    y: np.ndarray
    k: np.ndarray
    x0: np.ndarray
    num_steps: int
    init: np.ndarray
    fingerprint: dict
    table: tuple | None = None

    def __len__(self) -> int:
        return len(self.t)

    def batch(self, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[idx], self.t[idx], self.y[idx]

    def groups(self) -> np.ndarray:
        """(E/4, 4) entry indices of the [c, c, null, null] groups; shuffle and batch these, not entries."""
        return np.arange(len(self)).reshape(-1, 4)

    def save(self, path: str) -> None:
        tmp = path + ".tmp.npz"
        try:
            table = {} if self.table is None else {"table_caption": self.table[0], "table_mask": self.table[1]}
            np.savez(tmp, x=self.x, t=self.t, y=self.y, k=self.k, x0=self.x0, init=self.init, **table,
                     meta=np.asarray(json.dumps({"num_steps": self.num_steps, "fingerprint": self.fingerprint})))
            os.replace(tmp, path)
        except BaseException:  # e.g. SIGTERM while writing: no half-written file stays behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> "CalibSet":
        """The set stored at `path`; CalibrationError when the file is not a complete calibration set."""
        try:
            with np.load(path) as f:
                meta = json.loads(str(f["meta"]))
                table = (f["table_caption"], f["table_mask"]) if "table_caption" in f.files else None
                calib = cls(f["x"], f["t"], f["y"], f["k"], f["x0"], int(meta["num_steps"]), f["init"],
                            meta["fingerprint"], table)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise CalibrationError(f"{path} is not a readable calibration set ({type(e).__name__}: "
                                   f"{str(e)[:200]})") from e
        n = len(calib.t)
        if not n or n % 4 or any(len(a) != n for a in (calib.x, calib.y, calib.k, calib.x0)) or not isinstance(
                calib.fingerprint, dict):
            raise CalibrationError(f"{path} is not a calibration set: its arrays or its fingerprint are malformed")
        return calib


def selected_steps(num_steps: int, count: int) -> list[int]:
    """Positions in the trajectory (0 = first, noisiest step) kept for calibration: every (N // count)-th."""
    stride = max(1, num_steps // count)
    return list(range(0, num_steps, stride))[:count]


def group_classes(n_groups: int, num_classes: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    if mode == "official":
        return np.arange(n_groups) % num_classes
    reps = -(-n_groups // num_classes)  # every class before any repeats, in random order
    return np.concatenate([rng.permutation(num_classes) for _ in range(reps)])[:n_groups]


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What the trajectories are conditioned on: `count` conditions and the null one (index count). table: None for
    class labels (index = label, null = num_classes), else (caption (count+1, N, Cc), mask (count+1, N))."""
    count: int
    table: tuple | None = None
    digest: str = ""  # a hash of the caption file's arrays (the fingerprint's "prompts")

    def y(self, idx):
        """The model's y for conditions `idx` (int (n,)): labels, or (caption, mask) rows."""
        idx = np.asarray(idx)
        return idx.astype(np.int32) if self.table is None else tuple(a[idx] for a in self.table)

    def null(self):
        """One example's unconditional y (`samplers.cfg_model_fn`'s null_y)."""
        return self.count if self.table is None else tuple(a[self.count] for a in self.table)


def conditions(config) -> Conditions:
    """The classes of a class-conditional family, or the prompts of quant.calib_prompts for a text family."""
    m, path = config.model, config.quant.get("calib_prompts", "")
    if roles(m).cross is None:
        if path:
            raise CalibrationError(f"config.quant.calib_prompts={path!r}: the {m.get('family')!r} family is "
                                   "class-conditional and calibrates on classes; leave calib_prompts empty")
        return Conditions(int(m.num_classes))
    if not path:
        raise CalibrationError(f"the {m.family!r} family calibrates on caption embeddings: set "
                               "config.quant.calib_prompts to a caption-embeddings .npz (terdit_jax.text.captions)")
    try:
        caps = captions_lib.read(path).check(int(m.caption_channels), int(m.caption_len), f"{path}")
    except captions_lib.CaptionError as e:
        raise CalibrationError(f"config.quant.calib_prompts: {e}") from None
    table = (np.concatenate([caps.caption, caps.null_caption[None]]),
             np.concatenate([caps.mask, caps.null_mask[None]]).astype(np.float32))
    h = hashlib.sha256()
    for a in (*table, np.asarray("\n".join(caps.prompts))):
        h.update(np.ascontiguousarray(a).tobytes())
    return Conditions(len(caps), table, h.hexdigest()[:16])


def fingerprint(config, source: dict) -> dict:
    """What a calibration set depends on: the model (architecture and which weights), the sampler, the settings
    (and a text family's prompts)."""
    q, s = config.quant, config.sample
    cond = conditions(config)
    prompts = {"prompts": cond.digest} if cond.table is not None else {}  # class families: as before
    return {**prompts, "format": CALIB_FORMAT, "model": model_signature(config.model), "source": source, "sampler": s.sampler,
            "num_steps": int(s.num_steps), "cfg_channels": s.cfg_channels, "cfg_scale": float(q.calib_cfg_scale),
            "steps": int(q.calib_steps), "latents": int(q.calib_latents), "classes": q.calib_classes,
            "seed": int(q.calib_seed)}


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def record_trajectories(apply, params, config, fp: dict, *, log=print) -> CalibSet:
    """Sample with the FP model and keep the selected steps' inputs (see the module docstring)."""
    q, s, m = config.quant, config.sample, config.model
    if q.calib_latents % 2 or q.calib_latents < 2:
        raise CalibrationError(f"config.quant.calib_latents={q.calib_latents} must be even (two latents per class)")
    rng = np.random.default_rng(q.calib_seed)
    cond = conditions(config)
    classes = group_classes(q.calib_latents // 2, cond.count, q.calib_classes, rng)
    labels = np.repeat(classes, 2).astype(np.int32)  # latents 2g and 2g+1 share group g's class
    diffusion = create_diffusion(respacing(s.sampler, s.num_steps), config.diffusion.num_timesteps, m.prediction)
    keep = set(selected_steps(diffusion.num_timesteps, q.calib_steps))
    kept: list[tuple[int, np.ndarray]] = []

    def on_step(k: int, x):
        if diffusion.num_timesteps - 1 - k in keep:  # position in the trajectory, 0 = noisiest
            kept.append((k, np.asarray(jax.device_get(x), np.float32)))

    shape = (len(labels), m.input_size, m.input_size, m.in_channels)
    log(f"calibration: sampling {len(labels)} latents ({s.sampler}, {s.num_steps} steps, cfg {q.calib_cfg_scale}) "
        f"and keeping {len(keep)} steps ...")
    final = sample(bind(apply, params), diffusion, shape, jax.random.key(q.calib_seed), cond.y(labels),
                   sampler=s.sampler, cfg_scale=float(q.calib_cfg_scale), null_y=cond.null(),
                   guidance_channels=s.cfg_channels,
                   progress=True, on_step=on_step)
    final = np.asarray(jax.device_get(final), np.float32)
    tmap = np.asarray(diffusion.timestep_map)
    xs, ts, ys, ks, x0s = [], [], [], [], []
    for k, x in kept:  # per step: groups [2g, 2g+1, 2g (null), 2g+1 (null)]
        order = np.stack([np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)], 1)  # (G, 2)
        lat = np.concatenate([order, order], 1).reshape(-1)
        null = np.tile([False, False, True, True], len(order))
        xs.append(x[lat])
        x0s.append(final[lat])
        ys.append(np.where(null, cond.count, labels[lat]).astype(np.int32))
        ts.append(np.full(len(lat), tmap[k], np.int32))
        ks.append(np.full(len(lat), k, np.int32))
    n_groups, per_step = q.calib_latents // 2, 2 * q.calib_latents
    first = [0] * len(kept) if q.calib_classes == "official" else [i % n_groups for i in range(len(kept))]
    init = np.concatenate([i * per_step + 4 * g + np.arange(4) for i, g in enumerate(first)])
    return CalibSet(np.concatenate(xs), np.concatenate(ts), np.concatenate(ys), np.concatenate(ks),
                    np.concatenate(x0s), int(diffusion.num_timesteps), init.astype(np.int64), fp, cond.table)


def calibration_set(apply, params, config, source: dict, directory: str, *, log=print) -> CalibSet:
    """The calibration set of this model and these settings: read from `directory` (or quant.calib_path) when
    it was made already, else recorded and stored there, so all PTQ runs of one model share it."""
    fp = fingerprint(config, source)
    given = config.quant.calib_path
    path = given or os.path.join(directory, f"calibration_{fingerprint_id(fp)}.npz")
    calib = None
    if given and not os.path.isfile(path):
        raise CalibrationError(f"config.quant.calib_path={path!r} is not a file; leave it empty to record one")
    if os.path.exists(path):
        try:
            calib = CalibSet.load(path)
        except CalibrationError as e:
            if given:  # the user's file: never replaced
                raise CalibrationError(f"config.quant.calib_path: {e}; pass a calibration_<id>.npz written by "
                                       "--mode quantize, or leave it empty to record one") from e
            log(f"calibration: the cached set {e}; recording it again")  # a damaged cache: rebuilt
    if calib is not None and calib.fingerprint != json.loads(json.dumps(fp)):
        diff = sorted(k for k in set(fp) | set(calib.fingerprint) if calib.fingerprint.get(k) != fp.get(k))
        raise CalibrationError(f"the calibration set {path} was made from another model or other settings "
                               f"(differs in: {', '.join(diff)}); remove config.quant.calib_path or the file")
    if calib is not None:
        log(f"calibration: reusing {path} ({len(calib)} entries)")
        return calib
    calib = record_trajectories(apply, params, config, fp, log=log)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    calib.save(path)
    log(f"calibration: {len(calib)} entries ({len(np.unique(calib.t))} steps × {config.quant.calib_latents} latents "
        f"× {{class, null}}) saved to {path}")
    return calib
