"""Quantized models on disk: <workdir>/quantized/<name>/ holds the full-precision weights as the method changed
them and every site's quantizer state (one Orbax tree, `state/`), and `manifest.json` (format, method and its
settings, the model config with its site rules, source checkpoint, calibration set, per-stage time and memory),
written last into a temporary folder that is then renamed, so an interrupted run never looks complete.

A run in progress keeps <name>.partial/ (`progress.json` + `state.npz`, rewritten after every finished unit) so
an interrupted `--mode quantize` resumes at the unit it was in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
from flax import nnx

from terdit_jax import trees
from terdit_jax.checkpoint import CheckpointError, adopt_architecture
from terdit_jax.export import runtime_model_config
from terdit_jax.model_fn import MODEL_STATE, ApplyDiT
from terdit_jax.models.families import abstract

FORMAT_NAME = "terdit-jax-quantized"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = "state"


class QuantizedModelError(CheckpointError):
    """A quantized model that cannot be written or read; the message says which and what to do."""


def default_name(q) -> str:
    return q.name or f"{q.method}_w{q.w_bits}a{q.a_bits}"


def model_dir(workdir: str, name: str) -> str:
    """<workdir>/quantized/<name>; `name` must be one folder name (config.finalize says so first), never a path
    that could point at, and replace, another folder."""
    if not name or os.path.basename(name) != name or name in (".", "..") or name.endswith(".partial"):
        raise QuantizedModelError(f"{name!r} is not a quantized model name (one folder name, no path)")
    return os.path.join(os.path.abspath(workdir), "quantized", name)


def write_quantized(out_dir: str, model, model_cfg, manifest: dict, *, overwrite: bool = False) -> dict:
    """Write `model`'s Params and QuantState + manifest to out_dir (temp folder + rename). Returns the manifest."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, MANIFEST)) and not overwrite:
        raise QuantizedModelError(f"{out_dir} holds a quantized model already; pass --overwrite to replace it")
    manifest = json.loads(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                      "model": model_cfg.to_dict(), **manifest}))
    tmp = trees.staging_dir(out_dir)
    try:
        state = nnx.state(model, MODEL_STATE)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, STATE_DIR), trees.nested(state))
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence marks a complete model
            json.dump(manifest, f, indent=1, sort_keys=True)
        trees.publish_dir(tmp, out_dir)  # replaces an earlier model (with overwrite) or a leftover without manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        partial = os.path.exists(path + ".partial")
        raise QuantizedModelError(
            f"{path} is not a complete quantized model (no readable {MANIFEST})"
            + ("; a run was interrupted: rerun the same --mode quantize command to resume it" if partial else
               "; make it with --mode quantize")) from e
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise QuantizedModelError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                                  f"{FORMAT_NAME!r} v{FORMAT_VERSION}; quantize again with this version")
    return manifest


def check_matches(manifest: dict, config, path: str, *, log=print):
    """`config` with the quantized model's architecture (its manifest wins, with one line where the config
    differs; site rules are always the manifest's). The model must be of the config's method when the config
    names one."""
    method = config.quant.method
    if method and method != manifest.get("method"):
        raise QuantizedModelError(f"{path} was made by {manifest.get('method')!r}, but config.quant.method is "
                                  f"{method!r}; drop the override or pick the matching model")
    return adopt_architecture(config, manifest["model"], f"the quantized model {path}", ignore=("sites",), log=log)


def manifest_id(path: str) -> str:
    """A short hash of a model's manifest file, which records the settings, the calibration set and how long
    every stage ran: a model quantized again gets another id (the same one only if nothing about it differs)."""
    with open(os.path.join(path, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def check_sampler(manifest: dict, config, path: str) -> None:
    """A model whose activation parameters are per group of sampling steps (TQ-DiT's TGQ) samples only with the
    step count it was calibrated for: another schedule would put steps in groups they were not calibrated on."""
    info = manifest.get("info", {})
    if info.get("time_groups", 1) > 1 and int(info["num_steps"]) != int(config.sample.num_steps):
        raise QuantizedModelError(f"{path} has activation parameters for {info['time_groups']} groups of its "
                                  f"{info['num_steps']} calibration sampling steps; sample it with "
                                  f"--config.sample.num_steps={info['num_steps']} (config has "
                                  f"{config.sample.num_steps}), or quantize again for that step count")


def load_quantized(path: str, runtime=None):
    """→ (apply, params, model config dict, manifest): the architecture and site rules from the manifest, the
    compute settings (dtype, ...) from `runtime` (a model config). params: the Params and QuantState."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    manifest = read_manifest(path)
    cfg = runtime_model_config(manifest["model"], runtime)
    cfg.sites = tuple(dict(r) for r in cfg.sites)
    graphdef, target = nnx.split(abstract(cfg), MODEL_STATE)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(os.path.join(path, STATE_DIR), trees.nested(target))
    except Exception as e:  # orbax raises many types for truncated or mismatching trees
        raise QuantizedModelError(f"{path}: the quantized state could not be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); quantize again") from e
    state, missing, bad = trees.fill(target, trees.lookup_nested(tree))
    if missing or bad:
        raise QuantizedModelError(f"{path}: the state does not match its manifest (missing {missing[:10]}, bad "
                                  f"{bad[:10]}); quantize again")
    return ApplyDiT(graphdef), state, cfg.to_dict(), manifest


# ---------------------------------------------------------------------------------------------------- resume

def save_progress(partial_dir: str, values: dict, progress: dict) -> None:
    """Atomically replace the run's saved state and progress (state first, progress last)."""
    os.makedirs(partial_dir, exist_ok=True)
    tmp = os.path.join(partial_dir, "state.tmp.npz")
    np.savez(tmp, **{k.replace(".", "/"): v for k, v in values.items()})
    os.replace(tmp, os.path.join(partial_dir, "state.npz"))
    with open(os.path.join(partial_dir, "progress.tmp.json"), "w") as f:
        json.dump(progress, f, indent=1)
    os.replace(os.path.join(partial_dir, "progress.tmp.json"), os.path.join(partial_dir, "progress.json"))


def load_progress(partial_dir: str) -> tuple[dict, dict] | None:
    """(values, progress) of an interrupted run, or None. A resume point that cannot be read (a truncated
    state.npz, say) raises QuantizedModelError naming the file."""
    ppath = os.path.join(partial_dir, "progress.json")
    if not os.path.exists(ppath):
        return None
    spath = os.path.join(partial_dir, "state.npz")
    try:
        with open(ppath) as f:
            progress = json.load(f)
        with np.load(spath) as f:
            values = {k.replace("/", "."): f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # JSONDecodeError is a ValueError
        raise QuantizedModelError(f"the resume point in {partial_dir} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from e
    return values, progress
