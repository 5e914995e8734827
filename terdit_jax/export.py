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
import numpy as np
from flax import nnx

import terdit_kernels
from terdit_jax.models import packed as packed_lib  # registers LINEAR_KINDS["packed"]
from terdit_jax.models.dit import DiT
from terdit_jax.models.ternary import absmean_ternary

FORMAT_NAME = "terdit-jax-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
LABEL_ORDERS = ("imagenet", "official_string_sorted")  # see convert.terdit_official.official_label


class ExportError(RuntimeError):
    """An export that cannot be written or read; the message says which and what to do."""


def packed_model_config(model_cfg):
    """A copy of the model config with `linear='packed'` (the deployed model's architecture)."""
    import ml_collections
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    d["linear"] = "packed"
    return ml_collections.ConfigDict(d)


def abstract_packed(model_cfg):
    """(graphdef, abstract nnx.State) of the packed model, shapes only (nothing allocated)."""
    cfg = packed_model_config(model_cfg)
    return nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))


def packed_nbytes(model_cfg) -> int:
    """Bytes of the exported variables of this architecture (2-bit codes + float32 rest), from shapes only."""
    _, state = abstract_packed(model_cfg)
    return int(sum(v.get_value().size * np.dtype(v.get_value().dtype).itemsize
                   for _, v in nnx.to_flat_state(state)))


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _to_flat(params) -> dict[str, object]:
    """An nnx.State or nested (pure) dict → {'layers.0.attention.wq.kernel': array}."""
    if isinstance(params, nnx.State):
        return {_key(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)
        else:
            out[_key(prefix)] = node.get_value() if isinstance(node, nnx.Variable) else node
    walk((), params)
    return out


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
    src = _to_flat(ternary_params)
    _, abstract = abstract_packed(model_cfg)
    used, missing, bad_shape, leaves = set(), [], [], []
    for path, var in nnx.to_flat_state(abstract):
        want = var.get_value()
        key = _key(path)
        if path[-1] == "packed":
            kkey = _key(path[:-1] + ("kernel",))
            if kkey not in src:
                missing.append(kkey)
                continue
            used.add(kkey)
            value = _quantize_and_pack(jnp.asarray(src[kkey], jnp.float32))
        else:
            if key not in src:
                missing.append(key)
                continue
            used.add(key)
            value = jnp.asarray(src[key], want.dtype)
        if value.shape != want.shape:
            bad_shape.append(f"{key}: {value.shape} vs {want.shape}")
            continue
        leaves.append((path, var.replace(value)))
    extra = sorted(set(src) - used)
    if missing or extra or bad_shape:
        raise ExportError("the parameters do not match the packed model of this config: "
                          f"missing {missing[:20]}{'…' if len(missing) > 20 else ''}; unexpected {extra[:20]}; "
                          f"wrong shapes {bad_shape[:20]} (was the checkpoint trained with this model config, "
                          "with model.linear='ternary'?)")
    return nnx.from_flat_state(leaves)


def _nested_str(state: nnx.State) -> dict:
    """nnx.State → nested dict with string keys and numpy/jax array leaves (the on-disk tree)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = var.get_value()
    return out


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
    flat = {_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}
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
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), _nested_str(state))
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
        from terdit_jax.checkpoint import load_ema
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


def load_packed(path: str, *, act_dtype: str | None = None, backend: str | None = None, dtype: str | None = None,
                fuse_adaln: bool = True):
    """Restore a packed export → (apply, params, model_cfg_dict, manifest).

    apply(params, x, t, y) has the `model_fn.ApplyDiT` contract (use `model_fn.bind(apply, params)` with the
    samplers). act_dtype/backend: packed matmul settings (default from the manifest's model config, else
    'bf16'/'auto'); dtype overrides the compute dtype; fuse_adaln computes all blocks' adaLN in one matmul.
    """
    import ml_collections
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    manifest = read_manifest(path)
    cfg = ml_collections.ConfigDict(manifest["model"])
    if dtype is not None:
        cfg.dtype = dtype
    graphdef, abstract = abstract_packed(cfg)
    target = _nested_str(abstract)
    try:
        ckptr = ocp.StandardCheckpointer()
        tree = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
        ckptr.close()
    except Exception as e:  # orbax raises many types for truncated or mismatching trees
        raise ExportError(f"{path}: the packed parameters could not be read ({type(e).__name__}: {str(e)[:300]})") from e
    leaves = []
    for p, var in nnx.to_flat_state(abstract):
        node = tree
        for part in p:
            node = node[str(part)]
        leaves.append((p, var.replace(jnp.asarray(node))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    want_act, want_backend = packed_lib.packed_settings(cfg)
    packed_lib.configure_packed(model, act_dtype or want_act, backend or want_backend)
    apply, params = packed_lib.split_packed(model, fuse=fuse_adaln)
    return apply, params, cfg.to_dict(), manifest


def to_model_labels(labels, manifest: dict) -> np.ndarray:
    """ImageNet class indices → the labels the exported model was trained with (identity for our own
    exports; the string-sorted class order for the released TerDiT weights, terdit_official.md §3.1).
    The null class (num_classes) is passed through unchanged."""
    labels = np.asarray(labels, np.int64)
    n = int(manifest["num_classes"])
    if labels.size and (labels.min() < 0 or labels.max() > n):
        raise ValueError(f"labels must lie in [0, {n}] ({n} = null class), got {labels.min()}..{labels.max()}")
    if manifest.get("label_order", "imagenet") == "imagenet":
        return labels.astype(np.int32)
    from terdit_jax.convert.terdit_official import official_label_table
    table = official_label_table(n)
    return np.where(labels == n, labels, table[np.minimum(labels, n - 1)]).astype(np.int32)
