"""What every post-training method shares: the roles of each family's layers, the site rules of a bit setting,
building a model variant (other rules, same weights) on the host, moving state between variants, and
initialising quantizers (weights from themselves, activations unit by unit from what observers record).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from terdit_jax import trees
from terdit_jax.models.families import build
from terdit_jax.quant.quantizers import UniformQuantizer
from terdit_jax.quant.sites import sites_of
from terdit_jax.ptq.units import Carry, advance, blocks_attr, observe_unit, unit_list


class QuantizeError(ValueError):
    """A quantization request that cannot work; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Cross:
    """A block's cross-attention (PixArt's attn2): q reads the image tokens, k and v the caption tokens (the same
    for every sampling step of one prompt), out projects back. Each linear quantizes its own input."""
    q: tuple[str, ...]
    kv: tuple[str, ...]
    out: tuple[str, ...]
    attention: str


@dataclasses.dataclass(frozen=True)
class Roles:
    """Role names (paths inside a block) of one family's layers.
    attn_in: the linears reading the attention input (fused qkv, or wq/wk/wv); attn_out: the output projection;
    mlp_in: the linears reading the FFN input; mlp_out: the FFN's last linear (its input is the FFN hidden);
    attention / ffn: the attention and FFN modules; adaln: the block's adaLN linear; attn_input / ffn_input: the
    one site of the input attn_in / mlp_in share (a deployed kernel quantizes a shared input once; "" where the
    family has no shared site and each linear quantizes its own input: PixArt).
    cross: the cross-attention, or None; block: the regex of a block prefix in site paths; gelu: the FFN hidden
    is post-GELU (TQ-DiT's two-region quantizer); embedder / final: the module paths of the patch embedding and the
    last linear; site_names: (module path, the path its sites are built with) where the two differ (PixArt names its
    head linears as diffusers' state dict: module pos_embed_proj, sites pos_embed.proj.*)."""
    attn_in: tuple[str, ...]
    attn_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    attention: str
    ffn: str
    attn_input: str
    ffn_input: str
    adaln: str = "adaLN_modulation"
    cross: Cross | None = None
    block: str = r"(?:layers|blocks)\.\d+\."
    gelu: bool = False
    embedder: str = "x_embedder"
    final: str = "final_layer.linear"
    site_names: tuple[tuple[str, str], ...] = ()

    def rule_path(self, path: str) -> str:
        """A site's path as site rules match it, from its path in the module tree (`quant.sites.sites_of`)."""
        for tree, built in self.site_names:
            if path.startswith(tree + "."):
                return built + path[len(tree):]
        return path

    def input_of(self, group: tuple[str, ...]) -> str:
        """The input site role of a group of linears that read one tensor through one site (attn_out, mlp_out,
        or attn_in / mlp_in where the family shares their input site)."""
        return {self.attn_in: self.attn_input, self.mlp_in: self.ffn_input}.get(group) or f"{group[0]}.input"

    def split(self, group: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """(input site, linears) of a group: one pair with a shared site, else one per linear (its own input)."""
        shared = {self.attn_in: self.attn_input, self.mlp_in: self.ffn_input}.get(group)
        return [(self.input_of(group), group)] if shared or len(group) == 1 else [(f"{r}.input", (r,)) for r in group]

    def attentions(self) -> list[tuple[str, list, tuple[str, ...]]]:
        """(attention module, its input (site, linears) pairs, its output projection) per attention of a block."""
        out = [(self.attention, self.split(self.attn_in), self.attn_out)]
        if self.cross is not None:
            c = self.cross
            out.append((c.attention, self.split(c.q) + self.split(c.kv), c.out))
        return out

    def csb_groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """(input site, linears) of the groups CSB balances: qkv, proj and fc1 of every attention (Large-DiT:
        wq/wk/wv, wo, w1/w3; PixArt: each of to_q, to_k, to_v, to_out_0 of attn1 and attn2, and ff_net_0_proj)."""
        pairs = [p for _, ins, out in self.attentions() for p in ins + self.split(out)]
        return pairs + self.split(self.mlp_in)

    def input_sites(self) -> tuple[str, ...]:
        """Every input site role the block's linears read through (shared ones once)."""
        return tuple(dict.fromkeys([s for s, _ in self.csb_groups()] + [self.input_of(self.mlp_out)]))

    def linears(self) -> tuple[str, ...]:
        return tuple(r for _, lins in self.csb_groups() for r in lins) + self.mlp_out

    def shadowed_inputs(self) -> tuple[str, ...]:
        """The linears' own input sites that a shared input site stands for (left unquantized)."""
        return tuple(f"{r}.input" for g in (self.attn_in, self.mlp_in) for site, lins in self.split(g) for r in lins
                     if site != f"{r}.input")


ROLES = {
    "large_dit": Roles(("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",),
                       ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",), "attention", "feed_forward",
                       "attention.input", "feed_forward.input"),
    "dit": Roles(("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",), "attn", "mlp", "attn.qkv.input",
                 "mlp.fc1.input", gelu=True),
    # PixArt: self-attention attn1, cross-attention attn2 (q from the image tokens, k and v from the caption
    # tokens), GELU FFN; adaLN-single and the caption projection are head linears (condition / caption units).
    "pixart": Roles(("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out_0",), ("ff_net_0_proj",),
                    ("ff_net_2",), "attn1", "ff", "", "ff_net_0_proj.input", adaln="adaln_single.linear",
                    cross=Cross(("attn2.to_q",), ("attn2.to_k", "attn2.to_v"), ("attn2.to_out_0",), "attn2"),
                    block=r"transformer_blocks\.\d+\.", gelu=True, embedder="pos_embed_proj",
                    final="final_layer.proj_out",
                    site_names=(("pos_embed_proj", "pos_embed.proj"), ("final_layer.proj_out", "proj_out"),
                                ("adaln_single_emb_timestep_embedder_linear_1",
                                 "adaln_single.emb.timestep_embedder.linear_1"),
                                ("adaln_single_emb_timestep_embedder_linear_2",
                                 "adaln_single.emb.timestep_embedder.linear_2"),
                                ("adaln_single_linear", "adaln_single.linear"),
                                ("caption_projection_linear_1", "caption_projection.linear_1"),
                                ("caption_projection_linear_2", "caption_projection.linear_2"),
                                *((f"adaln_single_emb_{c}_embedder_linear_{i}",
                                   f"adaln_single.emb.{c}_embedder.linear_{i}")
                                  for c in ("resolution", "aspect_ratio") for i in (1, 2)))),
}
BLOCK = Roles.block  # the block prefix of a site path of the class-conditional families


def roles(model_cfg) -> Roles:
    family = model_cfg.get("family", "large_dit")
    if family not in ROLES:
        raise ValueError(f"post-training quantization knows the layers of {sorted(ROLES)}, not family {family!r}")
    return ROLES[family]


def with_sites(model_cfg, rules) -> ml_collections.ConfigDict:
    """A copy of the model config with these site rules."""
    return ml_collections.ConfigDict({**model_cfg.to_dict(), "sites": tuple(rules)})


def host_model(model_cfg, values: dict | None = None) -> nnx.Module:
    """The model on the host CPU (whatever accelerator there is), with every variable named in `values`
    ({'layers.0.attention.wq.kernel': array}) set from it; the rest keep their initial values (quantizer
    defaults). Units are moved to the device one at a time (ptq/units.py)."""
    with jax.default_device(jax.devices("cpu")[0]):
        model = build(model_cfg, nnx.Rngs(0))
    if values:
        set_values(model, values)
    return model


def values_of(model) -> dict:
    """{flat path: host array} of every variable of `model`."""
    return {k: np.asarray(jax.device_get(v)) for k, v in trees.flat(nnx.state(model)).items()}


def set_values(model, values: dict) -> None:
    """Set the variables of `model` found in `values` (same path and shape) as arrays on the host CPU; others
    are left alone."""
    cpu = jax.devices("cpu")[0]
    state = nnx.state(model)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        k = trees.key(path)
        if k in values:
            v = values[k]
            if tuple(np.shape(v)) != tuple(var.get_value().shape):
                raise ValueError(f"{k}: shape {np.shape(v)} does not fit {var.get_value().shape}")
            leaves.append((path, var.replace(jax.device_put(np.asarray(v), cpu))))
    nnx.update(model, nnx.from_flat_state(leaves))


def quantizers(model) -> dict[str, UniformQuantizer]:
    """{site path: quantizer} of every UniformQuantizer in `model`."""
    return {p: m for p, m in sites_of(model).items() if isinstance(m, UniformQuantizer)}


def linears_with_weight_sites(model) -> list:
    """(linear, its weight quantizer) for every linear whose weight is quantized."""
    return [(m, m.weight_site) for _, m in nnx.iter_modules(model)
            if isinstance(getattr(m, "weight_site", None), UniformQuantizer)]


def uniform_rules(model_cfg, w_bits: int, a_bits: int, *, init: str, smooth_inputs: tuple[str, ...] = (),
                  softmax_bits: int = 8) -> tuple:
    """PTQ4DiT's sites and granularities (ptq_baselines.md §2.2), also RTN's: every linear's weight per output
    channel and every linear's input per tensor, asymmetric (one quantizer per shared input: wq/wk/wv and w1/w3
    read theirs from the attention / FFN input site); attention q (after the 1/sqrt(hd) scaling), k, v per tensor;
    softmax probabilities unsigned per tensor at `softmax_bits` (the official `sm_abit`, 8 whatever A is). The
    input sites `smooth_inputs` (CSB's, roles in a block) divide by their balancing factor first. a_bits = 16 leaves
    activations in full precision (CSB's layers keep only the division)."""
    rules = [{"path": r".*\.weight", "kind": "uniform", "bits": w_bits, "granularity": "channel", "axis": -1,
              "init": init}]
    quant_acts, block = a_bits < 16, roles(model_cfg).block
    rules += [{"path": block + re.escape(r), "kind": "none"} for r in roles(model_cfg).shadowed_inputs()]
    for role in smooth_inputs:
        path = block + re.escape(role)
        rules.append({"path": path, "kind": "uniform", "bits": a_bits, "init": init, "smooth": True}
                     if quant_acts else {"path": path, "kind": "smooth"})
    if quant_acts:
        rules += [{"path": r".*\.input", "kind": "uniform", "bits": a_bits, "init": init},
                  {"path": block + r".*\.(q|k|v)", "kind": "uniform", "bits": a_bits, "init": init}]
        if softmax_bits < 16:
            rules.append({"path": block + r".*\.probs", "kind": "uniform", "bits": softmax_bits, "init": init,
                          "zero_point": False})
    return tuple(rules)


def csb_inputs(r: Roles) -> tuple[str, ...]:
    """The input sites CSB balances: those of qkv, proj and fc1 (Large-DiT: wq/wk/wv's, wo's, w1/w3's)."""
    return tuple(site for site, _ in r.csb_groups())


def observer_rules(rules) -> tuple:
    """The same sites with every activation quantizer replaced by an Observer (weights stay quantized)."""
    out = []
    for r in rules:
        if r["path"].endswith(r"\.weight") or r["kind"] == "none":
            out.append(r)
        else:
            out.append({"path": r["path"], "kind": "observe", "smooth": bool(r.get("smooth") or r["kind"] == "smooth")})
    return tuple(out)


def init_weights(model) -> None:
    """Every weight quantizer calibrated on its own (already balanced) weight."""
    for lin, q in linears_with_weight_sites(model):
        q.calibrate(lin.weight())


def init_activations(q_model, obs_model, carry: Carry, *, log=print, batch_size: int = 64) -> None:
    """Calibrate every static activation quantizer of `q_model` unit by unit: the unit's observers (in
    `obs_model`, which shares the weights) see the unit's inputs from the model quantized so far, then the
    unit's quantizers are set from what they saw and the quantized unit advances the carry. Inside a unit the
    observed tensors come from full-precision activations (all of the unit's sites are observed in one pass)."""
    qs = quantizers(q_model)
    units = unit_list(q_model)
    for unit in tqdm(units, desc="activation quantizers", leave=False):
        set_values(obs_model, values_of(q_model))
        for site, x in observe_unit(obs_model, unit, carry, batch_size=batch_size).items():
            q = qs.get(site)
            if q is not None and not q.dynamic:
                q.calibrate(x)
        carry = advance(q_model, unit, carry, batch_size=batch_size)


def init_quantizers(job, model, q_cfg) -> None:
    """The two initialisation stages RTN and PTQ4DiT share: weight quantizers from the weights, then (when
    activations are quantized) activation quantizers from the statistics subset, unit by unit."""
    with job.stage("weight quantizers"):
        init_weights(model)
    if job.config.quant.a_bits < 16:
        with job.stage("activation quantizers"):
            obs = host_model(with_sites(job.fp_cfg, observer_rules(q_cfg.sites)), job.fp_values)
            init_activations(model, obs, calib_carry(job.calib, job.calib.init), log=job.log)


def calib_carry(calib, idx=None) -> Carry:
    """The carry of calibration entries `idx` (all by default) before the first unit."""
    idx = np.arange(len(calib)) if idx is None else idx
    x, t, y = calib.batch(idx)
    return Carry(x=x, t=t, y=y, table=calib.table)


def deployed_bytes(model, w_bits: int) -> int:
    """Bytes of the model as deployed: quantized weights at w_bits (their Δ and z are float32 variables of the
    quantizers), every other variable at its own size."""
    total = sum(int(np.asarray(v).nbytes) for v in trees.flat(nnx.state(model)).values())
    for lin, _ in linears_with_weight_sites(model):
        k = lin.kernel[...]
        total += int(np.ceil(k.size * w_bits / 8)) - k.size * k.dtype.itemsize
    return total


def site_at(model, path: str):
    """The site module at a site path ('layers.3.attention.input' → that Attention's `input_site`)."""
    owner, role = path.rsplit(".", 1)
    return getattr(module_at(model, owner), role + "_site")


def module_at(model, path: str):
    """The submodule at a dotted tree path ('layers.3.attention.wq')."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def block_prefixes(model) -> list[str]:
    """'layers.0', 'layers.1', ... (or 'blocks.N' for the original DiT): the tree paths of the blocks."""
    name = blocks_attr(model)
    return [f"{name}.{i}" for i in range(len(model.block_list()))]
