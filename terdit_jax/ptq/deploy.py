"""A quantized model (RTN, PTQ4DiT, TQ-DiT: float weights + quantizer state) → a deployed one: integer weights and
integer matmuls, in the packed format family of `export.py` (manifest kind "ptq"), sampled with
`--config.sample.packed_path` like a packed ternary export.

`--mode export --config.sample.quantized=NAME` writes <workdir>/quantized/NAME/deployed/. The deployed model is
the quantized model's architecture with `model.deployed=True`: every linear whose weight a site rule quantizes
becomes `models.integer.IntDense` (codes, per-column Δw/zw, column sums), its weight quantizer dropped; every
activation site keeps its static Δ, z (a [G, ...] table and the timestep → group map for time-grouped sites), and
the attention multiplies quantized q·kᵀ and softmax·V as integers (`quant.integer`). A shared input site (Large-DiT's
one quantizer for wq/wk/wv, and for w1/w3) becomes a copy at each linear's own input, so every integer linear
quantizes its own input (the same codes: same parameters, same tensor).

CSB's balancing (PTQ4DiT): the weight rows already carry ×f; the input's ÷f stays inside the input quantizer's
elementwise pass (the same fused pass that divides by Δ). Folding it into the layer before would change what the
quantizers between them see (v/f under the v quantizer) and has no place in DiT's affine-free LayerNorm, so the
deployed model would no longer equal the fake-quantized one.
"""
from __future__ import annotations

import os
import re

import ml_collections
from flax import nnx

import terdit_kernels
from terdit_jax import trees
from terdit_jax.export import ExportError, check_free, write_export
from terdit_jax.models.integer import IntDense, container_bits, weight_codes
from terdit_jax.ptq import checkpoint as qckpt
from terdit_jax.ptq.common import host_model, module_at, roles, set_values, values_of, with_sites
from terdit_jax.quant.integer import ENCODERS, integer_operand

DEPLOYED_DIR = "deployed"
CODED_SITES = tuple(kind for kind, _ in ENCODERS)  # site kinds that quantize (others pass a float through)


def shared_inputs(model_cfg) -> dict[str, str]:
    """{linear role: the shared input site role it reads} ('attention.wq' → 'attention.input') of the family."""
    r = roles(model_cfg)
    return {lin: site for g in (r.attn_in, r.mlp_in) for site, lins in r.split(g) for lin in lins
            if site != f"{lin}.input"}


def deployed_config(model_cfg):
    """The deployed model's config: `deployed=True`, and each shared input site's rule moved to the inputs of the
    linears that read it and the shared site itself set to "none" (rules prepended: the first match wins)."""
    rules = [dict(r) for r in model_cfg.sites]
    moved = []
    for lin, shared in shared_inputs(model_cfg).items():
        example = ("blocks.0." if model_cfg.get("family", "large_dit") == "dit" else "layers.0.") + shared
        rule = next((r for r in rules if re.fullmatch(r["path"], example)), None)
        if rule is not None and rule["kind"] != "none":
            moved.append({**rule, "path": roles(model_cfg).block + re.escape(f"{lin}.input")})
            moved.append({"path": roles(model_cfg).block + re.escape(shared), "kind": "none"})
    cfg = with_sites(model_cfg, list({r["path"]: r for r in moved}.values()) + rules)
    cfg.deployed = True
    return cfg


def _source_of(path: str, shared: dict[str, str]) -> str:
    """The quantized model's variable a deployed input-site variable copies: its own, or the shared site's."""
    for lin, site in shared.items():
        m = re.fullmatch(rf"((?:layers|blocks)\.\d+\.){re.escape(lin)}\.input_site\.(.+)", path)
        if m:
            owner, role = site.rsplit(".", 1)
            return f"{m.group(1)}{owner}.{role}_site.{m.group(2)}"
    return path


def deployed_values(qmodel, dmodel, model_cfg) -> dict:
    """{flat path: array} of every variable of the deployed model `dmodel` from the quantized model `qmodel`."""
    shared, source = shared_inputs(model_cfg), values_of(qmodel)
    values = {}
    for path in trees.flat(nnx.state(dmodel)):
        src = _source_of(path, shared)
        if src in source:
            values[path] = source[src]
    for path, lin in ((".".join(map(str, p)), m) for p, m in nnx.iter_modules(dmodel) if isinstance(m, IntDense)):
        q_lin = module_at(qmodel, path)
        codes = weight_codes(q_lin.weight_site, q_lin.kernel[...])
        if codes is None:
            raise ExportError(f"{path}.weight: its quantization steps vary along the input axis, so the product "
                              "cannot be factored into integer codes; quantize it per output channel or per tensor")
        values.update({f"{path}.{k}": v for k, v in codes.items()})
    return values


def integer_report(dmodel) -> dict:
    """How the deployed model computes: integer and weight-only linears, and one line for every quantized
    activation site an integer product cannot use (it runs in float instead)."""
    report = {"integer_linears": 0, "weight_only_linears": 0, "float_sites": []}
    for path, m in ((".".join(map(str, p)), m) for p, m in nnx.iter_modules(dmodel)):
        if isinstance(m, IntDense):
            if m.input_site is not None and integer_operand(m.input_site, (2, m.k), t_shape=(2,)):
                report["integer_linears"] += 1
            else:
                report["weight_only_linears"] += 1
                if isinstance(m.input_site, CODED_SITES):  # a quantized input without integer codes
                    report["float_sites"].append(f"{path}.input: its {type(m.input_site).__name__} has no integer "
                                                 "codes constant along the input channels; the layer multiplies "
                                                 "in float")
        if getattr(m, "integer", False):  # an attention of a deployed model
            for role, axis in (("q", 3), ("k", 3), ("v", 1)):
                site = getattr(m, f"{role}_site")
                if site is not None and not integer_operand(site, (2, 4, m.n_heads, m.head_dim), axis, t_shape=(2,)):
                    report["float_sites"].append(f"{path}.{role}: no integer codes along the contracted axis; "
                                                 "that product runs in float")
    return report


def export_deployed(config, workdir: str, out_dir: str | None = None, *, overwrite: bool = False, log=print) -> dict:
    """<workdir>/quantized/<config.sample.quantized> → its deployed model in `out_dir` (default <that>/deployed).
    Returns the manifest."""
    path = qckpt.model_dir(workdir, config.sample.quantized)
    qmanifest = qckpt.read_manifest(path)
    out = os.path.abspath(out_dir or os.path.join(path, DEPLOYED_DIR))
    check_free(out, overwrite)  # before any work; nothing is touched
    apply, state, model_cfg, _ = qckpt.load_quantized(path)
    qmodel = nnx.merge(apply.graphdef, state)
    qcfg = ml_collections.ConfigDict(model_cfg)
    dcfg = deployed_config(qcfg)
    dmodel = host_model(dcfg)
    set_values(dmodel, deployed_values(qmodel, dmodel, qcfg))
    report = integer_report(dmodel)
    for line in report["float_sites"]:
        log(f"note: {line}")
    bits, info = qmanifest.get("bits", {}), qmanifest.get("info", {})
    flat = trees.flat(nnx.state(dmodel))
    codes = sum(v.nbytes for k, v in flat.items() if k.endswith(".codes"))
    manifest = {
        "kind": "ptq", "int4_format": terdit_kernels.INT4_PACK_FORMAT, "model": dcfg.to_dict(),
        "method": qmanifest.get("method"), "bits": bits,
        "info": {k: info[k] for k in ("time_groups", "num_steps") if k in info},  # sampling checks (check_sampler)
        "label_order": "imagenet", "num_classes": int(dcfg.num_classes), "null_class": int(dcfg.num_classes),
        "nbytes_weight_codes": int(codes), "weight_container_bits": container_bits(int(bits.get("weights", 8))),
        "compute": report, "source": {"quantized": path, "manifest": qckpt.manifest_id(path),
                                      "step": int(qmanifest.get("source", {}).get("step", 0))},
    }
    manifest = {**write_export(out, nnx.state(dmodel), manifest, overwrite=overwrite), "path": out}
    log(f"deployed {qmanifest.get('method')} W{bits.get('weights')}A{bits.get('activations')}: "
        f"{report['integer_linears']} integer linears, {report['weight_only_linears']} weight-only, "
        f"{manifest['nbytes'] / 1e6:.2f} MB → {out}")
    return manifest
