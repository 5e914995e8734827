"""Deployable packed checkpoints: ternary layers at 2 bits, everything else in its own dtype (float32).

Layout of an export directory (written to a temporary sibling and renamed at the end, so a half-written
export never looks valid)::

    <out_dir>/manifest.json   format name/version, PACK_FORMAT, model config, label order, byte counts
    <out_dir>/params/         Orbax (StandardCheckpointer) tree: the packed model's variables, nested
                              dicts with string keys ("layers" → "0" → "attention" → "wq" → "packed")

Each ternary layer stores `packed` = terdit_kernels.pack(W_t) with W_t = absmean_ternary(latent EMA
kernel) — exactly the training quantizer (TerDiT eq. 2, `models.ternary.absmean_ternary`) — and its
learned scalar `alpha`; α·W_t is then the weight the QAT model computed with.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import terdit_kernels
from terdit_jax import trees
from terdit_jax.checkpoint import ADDED_MODEL_FIELDS, RUNTIME_MODEL_FIELDS, load_ema
from terdit_jax.labels import LABEL_ORDERS
from terdit_jax.model_fn import split_packed
from terdit_jax.models import packed as packed_lib
from terdit_jax.models.families import abstract
from terdit_jax.models.ternary import absmean_ternary

FORMAT_NAME = "terdit-jax-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"


class ExportError(RuntimeError):
    """An export that cannot be written or read; the message says which and what to do."""


def packed_model_config(model_cfg):
    """A copy of the model config with `linear='packed'` (the deployed model's architecture)."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return ml_collections.ConfigDict({**d, "linear": "packed"})


def abstract_packed(model_cfg):
    """(graphdef, abstract nnx.State) of the packed model, shapes only (nothing allocated)."""
    return nnx.split(abstract(packed_model_config(model_cfg)))


def packed_nbytes(model_cfg) -> int:
    """Bytes of the exported variables of this architecture (2-bit codes + float32 rest), from shapes only."""
    _, state = abstract_packed(model_cfg)
    return int(sum(v.get_value().size * np.dtype(v.get_value().dtype).itemsize
                   for _, v in nnx.to_flat_state(state)))


@jax.jit
def _quantize_and_pack(latent: jax.Array) -> jax.Array:
    """(K, N) float32 latent kernel → (padded_k(K)/4, N) uint8 codes of absmean_ternary(latent), one layer at a time."""
    return terdit_kernels.pack(absmean_ternary(latent).astype(jnp.int8))


def pack_state(ternary_params, model_cfg) -> nnx.State:
    """Ternary QAT params (nnx.State or nested dict, paths of the linear='ternary' model) → packed model state.

    Ternary layers: `kernel` (K, N) float32 latent → `packed` = pack(absmean_ternary(kernel)); `alpha`, `bias`
    and every other variable are copied (cast to the packed model's dtype, float32). Unknown or missing
    paths raise ExportError listing them.
    """
    src = trees.flat(ternary_params)
    used = set()

    def lookup(path, want):
        if path[-1] == "packed":
            k = trees.key(path[:-1] + ("kernel",))
            if k not in src:
                raise KeyError(k)
            used.add(k)
            return _quantize_and_pack(jnp.asarray(src[k], jnp.float32))
        k = trees.key(path)
        if k not in src:
            raise KeyError(k)
        used.add(k)
        return src[k]

    state, missing, bad_shape = trees.fill(abstract_packed(model_cfg)[1], lookup)
    extra = sorted(set(src) - used)
    if missing or extra or bad_shape:
        raise ExportError("the parameters do not match the packed model of this config: "
                          f"missing {missing[:20]}{'…' if len(missing) > 20 else ''}; unexpected {extra[:20]}; "
                          f"wrong shapes {bad_shape[:20]} (was the checkpoint trained with this model config, "
                          "with model.linear='ternary'?)")
    return state


def _finish_dir(tmp: str, out_dir: str, overwrite: bool):
    """Atomically publish `tmp` as `out_dir` (replacing an existing export only with `overwrite`)."""
    if os.path.exists(out_dir):
        if not overwrite:
            raise ExportError(f"{out_dir} exists; pass overwrite=True to replace it")
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(old, "x"))  # out_dir is absent only between these two renames
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


def write_packed(out_dir: str, state: nnx.State, model_cfg, *, label_order: str = "imagenet",
                 source: dict | None = None, overwrite: bool = False) -> dict:
    """Write a packed model state + manifest to `out_dir` (temp dir + rename). Returns the manifest."""
    import orbax.checkpoint as ocp

    if label_order not in LABEL_ORDERS:
        raise ExportError(f"label_order must be one of {LABEL_ORDERS}, got {label_order!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = packed_model_config(model_cfg)
    flat = trees.flat(state)
    ternary = sorted(k[:-len(".packed")] for k in flat if k.endswith(".packed"))
    nbytes = int(sum(v.nbytes for v in flat.values()))
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "pack_format": terdit_kernels.PACK_FORMAT,
        "model": cfg.to_dict(), "label_order": label_order, "num_classes": int(cfg.num_classes),
        "null_class": int(cfg.num_classes), "nbytes": nbytes,
        "nbytes_packed_codes": int(sum(flat[k + ".packed"].nbytes for k in ternary)),
        "ternary_layers": ternary, "dtypes": sorted({str(np.dtype(v.dtype)) for v in flat.values()}),
        "source": source or {},
    }
    manifest = json.loads(json.dumps(manifest))  # exactly what a reader gets back (tuples become lists)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), trees.nested(state))
        ckptr.wait_until_finished()
        ckptr.close()
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence marks a complete export
            json.dump(manifest, f, indent=1, sort_keys=True)
        _finish_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_packed(config, workdir_or_params, out_dir: str, *, step: int = -1, overwrite: bool = False) -> dict:
    """Training checkpoint (EMA weights) → deployable packed checkpoint in `out_dir`. Returns the manifest.

    workdir_or_params: a training workdir (its checkpoints/ are read with `checkpoint.load_ema`, step `step`,
    -1 = newest) or the ternary params themselves (nnx.State or nested dict). `config` is the training
    config (model.linear='ternary').
    """
    if config.model.linear != "ternary":
        raise ExportError(f"export packs a ternary QAT model; config.model.linear is {config.model.linear!r}")
    source = {"kind": "terdit-jax-ema"}
    if isinstance(workdir_or_params, (str, os.PathLike)):
        _, params, step = load_ema(config, str(workdir_or_params), step)
        source.update(workdir=os.path.abspath(workdir_or_params), step=int(step))
    else:
        params = workdir_or_params
    state = pack_state(params, config.model)
    return write_packed(out_dir, state, config.model, label_order="imagenet", source=source, overwrite=overwrite)


def read_manifest(path: str) -> dict:
    """The manifest of a packed export; a clear error for a missing, partial or foreign directory."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not a complete packed export (no readable {MANIFEST}: {e}); "
                          "re-run the export (terdit_jax.export.export_packed)") from e
    if manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format version {manifest.get('version')} is not supported "
                          f"(this code reads version {FORMAT_VERSION}); re-export with this version")
    if manifest.get("pack_format") != terdit_kernels.PACK_FORMAT:
        raise ExportError(f"{path}: packed with {manifest.get('pack_format')!r} but the kernels use "
                          f"{terdit_kernels.PACK_FORMAT!r}; re-export it")
    return manifest


def runtime_model_config(arch: dict, runtime=None) -> ml_collections.ConfigDict:
    """The model config to run a stored architecture with: every architecture field from `arch` (a manifest's
    or checkpoint's model config), the compute settings (`RUNTIME_MODEL_FIELDS`: dtype, packed activation
    precision and backend) from `runtime`, the user's config, where it has them."""
    runtime = {} if runtime is None else (runtime.to_dict() if hasattr(runtime, "to_dict") else dict(runtime))
    mine = {k: runtime[k] for k in RUNTIME_MODEL_FIELDS if runtime.get(k) is not None}
    return ml_collections.ConfigDict({**ADDED_MODEL_FIELDS, **arch, **mine})


def load_packed(path: str, runtime=None, *, fuse_adaln: bool = True):
    """Restore a packed export → (apply, params, model_cfg_dict, manifest).

    apply(params, x, t, y) has the `model_fn.ApplyDiT` contract (use `model_fn.bind(apply, params)` with the
    samplers). The architecture comes from the manifest; the compute settings (`model.dtype`,
    `model.packed_act_dtype`, `model.packed_backend`) from `runtime` (a model config or a dict of those fields;
    default: the manifest's). fuse_adaln computes all blocks' adaLN in one matmul.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    manifest = read_manifest(path)
    cfg = runtime_model_config(manifest["model"], runtime)
    graphdef, target = abstract_packed(cfg)
    try:
        ckptr = ocp.StandardCheckpointer()
        tree = ckptr.restore(os.path.join(path, PARAMS_DIR), trees.nested(target))
        ckptr.close()
    except Exception as e:  # orbax raises many types for truncated or mismatching trees
        raise ExportError(f"{path}: the packed parameters could not be read ({type(e).__name__}: {str(e)[:300]})") from e
    state, missing, bad = trees.fill(target, trees.lookup_nested(tree))
    if missing or bad:
        raise ExportError(f"{path}: the packed parameters do not match its manifest (missing {missing[:10]}, "
                          f"bad {bad[:10]}); re-export it")
    model = nnx.merge(graphdef, state)
    packed_lib.configure_packed(model, *packed_lib.packed_settings(cfg))
    apply, params = split_packed(model, fuse=fuse_adaln)
    return apply, params, cfg.to_dict(), manifest
