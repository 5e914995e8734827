"""Deployable exports, one format family: packed ternary models (kind "ternary": ternary layers at 2 bits) and
deployed post-training-quantized models (kind "ptq": integer weights, written by `ptq.deploy`), everything else in
its own dtype (float32).

Layout of an export directory (written to a temporary sibling and renamed at the end, so a half-written
export never looks valid)::

    <out_dir>/manifest.json   format name/version, kind, the code formats, model config, label order, byte counts
    <out_dir>/params/         Orbax (StandardCheckpointer) tree: the deployed model's variables, nested
                              dicts with string keys ("layers" → "0" → "attention" → "wq" → "packed")

Version 2 added the manifest's "kind"; a version 1 manifest is a packed ternary export. `load_packed` reads both
kinds: a ternary export builds the model with the "packed" linear kind, a PTQ export with `model.deployed=True`
(integer linears, `models/integer.py`), and either samples with `--config.sample.packed_path`.

Each ternary layer stores `packed` = terdit_kernels.pack(W_t) with W_t = absmean_ternary(latent EMA
kernel) — exactly the training quantizer (TerDiT eq. 2, `models.ternary.absmean_ternary`) — and its
learned scalar `alpha`; α·W_t is then the weight the QAT model computed with. A BitNet model
(`model.linear="bitnet"`) has no α: its `alpha` is the γ = mean|W| its BitLinear scaled by
(`models.bitnet.bitnet_gamma`), and the manifest's model says `packed_from: "bitnet"`, so the packed layers
keep BitLinear's input norm.

Activation precision: the manifest records `act_bits` (8 = trained with per-token int8 activations, W1.58A8; 16
= not), top level and in its model config. `load_packed` runs an A8 export on the int8 (W2A8) path without being
told and refuses to run an export with activations it was not trained for (int8 on an A16 export, bf16/f32 on
an A8 one) unless `model.packed_act_force` says that is meant (`packed_act_dtype_for`).
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import terdit_kernels
from terdit_jax import trees
from terdit_jax.checkpoint import ADDED_MODEL_FIELDS, RUNTIME_MODEL_FIELDS, load_ema
from terdit_jax.labels import LABEL_ORDERS
from terdit_jax.model_fn import ApplyDiT, split_packed
from terdit_jax.models import packed as packed_lib
from terdit_jax.models.bitnet import bitnet_gamma
from terdit_jax.models.families import abstract, family_of
from terdit_jax.models.linears import PACKABLE_KINDS
from terdit_jax.models.ternary import ACT_BITS, absmean_ternary

FORMAT_NAME = "terdit-jax-packed"
FORMAT_VERSION = 2  # 2: manifest "kind" ("ternary" | "ptq"); 1: packed ternary only
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PARAMS_DIR = "params"


class ExportError(RuntimeError):
    """An export that cannot be written or read; the message says which and what to do."""


def packed_model_config(model_cfg):
    """A copy of the model config with `linear='packed'` (the deployed model's architecture) and `packed_from` the
    QAT kind it came from (kept as it is for a config that is packed already)."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    source = d.get("linear") if d.get("linear") in PACKABLE_KINDS else d.get("packed_from", "ternary")
    return ml_collections.ConfigDict({**d, "linear": "packed", "packed_from": source})


def abstract_packed(model_cfg):
    """(graphdef, abstract nnx.State) of the packed model, shapes only (nothing allocated)."""
    return nnx.split(abstract(packed_model_config(model_cfg)))


def packed_nbytes(model_cfg) -> int:
    """Bytes of the exported variables of this architecture (2-bit codes + float32 rest), from shapes only."""
    _, state = abstract_packed(model_cfg)
    return int(sum(v.get_value().size * np.dtype(v.get_value().dtype).itemsize
                   for _, v in nnx.to_flat_state(state)))


_gamma = jax.jit(bitnet_gamma)  # BitLinear's scale, computed as the layer computes it


@jax.jit
def _quantize_and_pack(latent: jax.Array) -> jax.Array:
    """(K, N) float32 latent kernel → (padded_k(K)/4, N) uint8 codes of absmean_ternary(latent), one layer at a time."""
    return terdit_kernels.pack(absmean_ternary(latent).astype(jnp.int8))


def pack_state(ternary_params, model_cfg) -> nnx.State:
    """QAT params (nnx.State or nested dict, paths of the `model_cfg.linear` model: 'ternary' or 'bitnet') →
    packed model state.

    Ternary layers: `kernel` (K, N) float32 latent → `packed` = pack(absmean_ternary(kernel)); `alpha`, `bias`
    and every other variable are copied (cast to the packed model's dtype, float32). BitLinear layers have no
    `alpha`; theirs is γ = bitnet_gamma(kernel). Unknown or missing paths raise ExportError listing them.
    """
    src = trees.flat(ternary_params)
    used = set()
    bitnet = packed_model_config(model_cfg).packed_from == "bitnet"

    def lookup(path, want):
        if path[-1] == "packed" or (bitnet and path[-1] == "alpha"):
            k = trees.key(path[:-1] + ("kernel",))
            if k not in src:
                raise KeyError(k)
            used.add(k)
            latent = jnp.asarray(src[k], jnp.float32)
            return _quantize_and_pack(latent) if path[-1] == "packed" else _gamma(latent)
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
                          f"with model.linear in {PACKABLE_KINDS}?)")
    return state


def check_free(out_dir: str, overwrite: bool) -> None:
    """An export may go to `out_dir`: it does not exist, or `overwrite` says to replace it."""
    if os.path.exists(out_dir) and not overwrite:
        complete = os.path.exists(os.path.join(out_dir, MANIFEST))
        raise ExportError(f"{out_dir} exists{'' if complete else ' (without a manifest: a half-written export?)'}; "
                          "pass --overwrite to replace it, or another --out")


def write_export(out_dir: str, state: nnx.State, manifest: dict, *, overwrite: bool = False) -> dict:
    """Write a deployable model (its variables + `manifest`, which gets the format name and version) to `out_dir`
    through a temporary sibling renamed at the end: the manifest is written last, so a half-written export never
    looks complete. Refuses an existing `out_dir` unless `overwrite`. Returns the manifest as a reader sees it."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    check_free(out_dir, overwrite)
    flat = trees.flat(state)
    manifest = json.loads(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest,
                                      "nbytes": int(sum(v.nbytes for v in flat.values())),
                                      "dtypes": sorted({str(np.dtype(v.dtype)) for v in flat.values()})}))
    tmp = trees.staging_dir(out_dir)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), trees.nested(state))
        ckptr.wait_until_finished()
        ckptr.close()
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence marks a complete export
            json.dump(manifest, f, indent=1, sort_keys=True)
        trees.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_packed(out_dir: str, state: nnx.State, model_cfg, *, label_order: str = "imagenet",
                 source: dict | None = None, overwrite: bool = False) -> dict:
    """Write a packed ternary model state + manifest to `out_dir` (`write_export`). Returns the manifest."""
    if label_order not in LABEL_ORDERS:
        raise ExportError(f"label_order must be one of {LABEL_ORDERS}, got {label_order!r}")
    cfg = packed_model_config(model_cfg)
    act_bits = int(cfg.get("act_bits", 16))
    cfg.packed_act_dtype = TRAINED_ACT_DTYPES[act_bits][0]  # the manifest's own setting: what was trained
    flat = trees.flat(state)
    ternary = sorted(k[:-len(".packed")] for k in flat if k.endswith(".packed"))
    manifest = {
        "kind": "ternary", "pack_format": terdit_kernels.PACK_FORMAT,
        "act_bits": act_bits, "activations": ACTIVATIONS[act_bits],
        "model": cfg.to_dict(), "label_order": label_order, "num_classes": int(cfg.num_classes),
        "null_class": int(cfg.num_classes),
        "nbytes_packed_codes": int(sum(flat[k + ".packed"].nbytes for k in ternary)),
        "ternary_layers": ternary, "source": source or {},
    }
    return write_export(out_dir, state, manifest, overwrite=overwrite)


def export_packed(config, workdir_or_params, out_dir: str, *, step: int = -1, overwrite: bool = False) -> dict:
    """Training checkpoint (EMA weights) → deployable packed checkpoint in `out_dir`. Returns the manifest.

    workdir_or_params: a training workdir (its checkpoints/ are read with `checkpoint.load_ema`, step `step`,
    -1 = newest) or the QAT params themselves (nnx.State or nested dict). `config` is the training config
    (model.linear 'ternary' or 'bitnet'; its model.act_bits goes into the manifest).
    """
    if config.model.linear not in PACKABLE_KINDS:
        raise ExportError(f"export packs a ternary-weight QAT model (model.linear in {PACKABLE_KINDS}); "
                          f"config.model.linear is {config.model.linear!r}")
    source = {"kind": "terdit-jax-ema"}
    if isinstance(workdir_or_params, (str, os.PathLike)):
        _, params, step = load_ema(config, str(workdir_or_params), step)
        source.update(workdir=os.path.abspath(workdir_or_params), step=int(step))
    else:
        params = workdir_or_params
    state = pack_state(params, config.model)
    return write_packed(out_dir, state, config.model, label_order="imagenet", source=source, overwrite=overwrite)


def _check_ternary(path: str, manifest: dict) -> None:
    if manifest.get("pack_format") != terdit_kernels.PACK_FORMAT:
        raise ExportError(f"{path}: packed with {manifest.get('pack_format')!r} but the kernels use "
                          f"{terdit_kernels.PACK_FORMAT!r}; re-export it")
    model_bits = manifest.get("model", {}).get("act_bits", ADDED_MODEL_FIELDS["act_bits"])
    if manifest.get("act_bits", model_bits) != model_bits:
        raise ExportError(f"{path}: the manifest says act_bits={manifest['act_bits']} but its model config says "
                          f"{model_bits}; re-export it")


def _check_ptq(path: str, manifest: dict) -> None:
    if manifest.get("int4_format") != terdit_kernels.INT4_PACK_FORMAT:
        raise ExportError(f"{path}: 4-bit codes in {manifest.get('int4_format')!r} but the kernels use "
                          f"{terdit_kernels.INT4_PACK_FORMAT!r}; export the quantized model again")


# manifest "kind" → its checks (version 1 manifests are packed ternary and have no kind)
KIND_CHECKS = {"ternary": _check_ternary, "ptq": _check_ptq}


def read_manifest(path: str) -> dict:
    """The manifest of a deployable export (packed ternary or integer PTQ); a clear error for a missing, partial
    or foreign directory."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not a complete packed export (no readable {MANIFEST}: {e}); "
                          "re-run the export (--mode export)") from e
    if manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("version") not in READ_VERSIONS:
        raise ExportError(f"{path}: format version {manifest.get('version')} is not supported "
                          f"(this code reads versions {READ_VERSIONS}); re-export with this version")
    kind = manifest.setdefault("kind", "ternary")
    if kind not in KIND_CHECKS:
        raise ExportError(f"{path}: an export of kind {kind!r}; this code deploys {sorted(KIND_CHECKS)}")
    KIND_CHECKS[kind](path, manifest)
    return manifest


def runtime_model_config(arch: dict, runtime=None) -> ml_collections.ConfigDict:
    """The model config to run a stored architecture with: every architecture field from `arch` (a manifest's
    or checkpoint's model config), the compute settings (`RUNTIME_MODEL_FIELDS`: dtype, packed activation
    precision and backend) from `runtime`, the user's config, where it has them."""
    runtime = {} if runtime is None else (runtime.to_dict() if hasattr(runtime, "to_dict") else dict(runtime))
    mine = {k: runtime[k] for k in RUNTIME_MODEL_FIELDS if runtime.get(k) is not None}
    return ml_collections.ConfigDict({**ADDED_MODEL_FIELDS, **arch, **mine})


# act_bits → how the manifest describes the activations the model was trained with.
ACTIVATIONS = {16: "compute dtype (W1.58A16)",
               8: "per-token absmax int8, int32 accumulation (W1.58A8; terdit_kernels.reference.quantize_activations)"}
TRAINED_ACT_DTYPES = {16: ("bf16", "f32"), 8: ("int8",)}  # packed_act_dtype values that run what was trained


def packed_act_dtype_for(arch: dict, runtime=None) -> str:
    """The packed activation dtype to sample an export with: arch is its manifest's model config, runtime the user's
    model config (or a dict of its fields; None = the manifest's own settings).

    An empty `packed_act_dtype` (the default) runs what the export was trained with: bf16 for an A16 export (or
    the manifest's own setting), int8 for an A8 one. An A16 export runs 'bf16' or 'f32' when asked. Other
    activations than trained (int8 on an A16 export, bf16/f32 on an A8 one) run only with `packed_act_force`;
    without it they are an ExportError, as is an act_bits this code cannot run.
    """
    runtime = {} if runtime is None else (runtime.to_dict() if hasattr(runtime, "to_dict") else dict(runtime))
    bits = arch.get("act_bits", ADDED_MODEL_FIELDS["act_bits"])
    if bits not in ACT_BITS:
        raise ExportError(f"the export was trained with act_bits={bits!r}; this sampler runs activations of "
                          f"{' or '.join(map(str, ACT_BITS))} bits only")
    asked = str(runtime.get("packed_act_dtype") or arch.get("packed_act_dtype") or TRAINED_ACT_DTYPES[bits][0])
    if asked not in packed_lib.ACT_DTYPES:
        raise ExportError(f"model.packed_act_dtype={asked!r} is not one of {packed_lib.ACT_DTYPES}")
    if asked in TRAINED_ACT_DTYPES[bits] or runtime.get("packed_act_force"):
        return asked
    raise ExportError(f"the export was trained with {ACTIVATIONS[bits]} but model.packed_act_dtype={asked!r} runs "
                      f"arithmetic it never saw; use {' or '.join(TRAINED_ACT_DTYPES[bits])}, or set "
                      "model.packed_act_force=True to sample it that way on purpose")


def load_packed(path: str, runtime=None, *, fuse_adaln: bool = True):
    """Restore a deployable export, packed ternary or integer PTQ (`ptq.deploy`) → (apply, params, model_cfg_dict,
    manifest).

    apply(params, x, t, y) has the `model_fn.ApplyDiT` contract (use `model_fn.bind(apply, params)` with the
    samplers). The architecture comes from the manifest; the compute settings (`model.dtype`,
    `model.packed_act_dtype`, `model.packed_backend`) from `runtime` (a model config or a dict of those fields;
    default: the manifest's), the activation dtype checked against the export's (`packed_act_dtype_for`; the
    returned config holds the one used). fuse_adaln computes all blocks' adaLN in one matmul (ternary exports of a
    family with per-block adaLN linears; PixArt's adaLN-single is one shared linear already, `Family.stacked_adaln`).
    """
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    if manifest["kind"] == "ptq":
        cfg = runtime_model_config(manifest["model"], runtime)
        graphdef, params = _restore(path, nnx.split(abstract(cfg)))
        return ApplyDiT(graphdef), params, cfg.to_dict(), manifest
    try:
        act_dtype = packed_act_dtype_for(manifest["model"], runtime)
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None
    cfg = runtime_model_config(manifest["model"], runtime)
    cfg.packed_act_dtype = act_dtype
    model = nnx.merge(*_restore(path, abstract_packed(cfg)))
    packed_lib.configure_packed(model, *packed_lib.packed_settings(cfg))
    apply, params = split_packed(model, fuse=fuse_adaln and family_of(cfg).stacked_adaln)
    return apply, params, cfg.to_dict(), manifest


def _restore(path: str, abstract_split) -> tuple:
    """(graphdef, state) of an export's variables, restored into the abstract (graphdef, state) of its model."""
    import orbax.checkpoint as ocp

    graphdef, target = abstract_split
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
    return graphdef, state
