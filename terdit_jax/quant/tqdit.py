"""TQ-DiT (Hwang, Lee, Kang; arXiv 2502.04056): search-only PTQ with Hessian-guided scales (HO), two-region
quantizers (MRQ) and time-grouped activation parameters (TGQ). The paper is primary; the official code (a
PTQ4ViT port that does not run as released, ptq_baselines.md §3.8) gives the constants (§3.2–3.6).

What is quantized (§3.2): every block linear, weights per tensor with one scale per q/k/v third of a fused qkv
(Large-DiT's separate wq/wk/wv are per tensor each), inputs per tensor; q·kᵀ and softmax·V with head-wise q, k, v;
the patch embedding's weight per output channel (its input stays full precision); the final linear per tensor.
All symmetric. The adaLN linears and the timestep MLP stay full precision, as in the code.

The search (§3.3): for each layer in order, with every earlier layer quantized (earlier units through the carry,
earlier layers of the unit through a model variant whose later sites are full precision), Δ = α·Δ0 over
`quant.alpha_grid` values of α in [0.01, 1.2], Δ0 = max|x|/(2^(b−1) − 0.5), alternating weight then activation (A
then B operand for a matmul) for `quant.search_rounds` rounds, one α shared by the channels/heads of a per-channel
quantizer. The objective is the HO error E[(g ⊙ (O_fp − O_q))²] at the layer's output.

HO's weights g (§3.4): the official gradient is of a KL between the FP and quantized outputs with every other layer
in full precision, which makes it zero up to round-off. Here (`quant.ho="fisher"`, the default) g is the gradient of
the FP model's own denoising loss at the layer's output, ‖ε̂(x_t) − ε*‖² with ε* the noise that links x_t to the
sample its calibration trajectory ended at (v-models: the matching v*) — the diagonal Fisher of the paper's Eq.
13–16 in a form that is defined and non-zero; `quant.ho="mse"` uses unit weights (PTQ4ViT's L2 search).

MRQ (§3.5): post-softmax probabilities get the two-region quantizer (split s searched over 2^−i, i = 0…19,
recombined by selection, not the code's sum; quantizers.TwoRegionSoftmax); a GELU model's fc2 input the post-GELU
one (Δ− fixed at 0.17/2^(b−1), Δ+ searched). A SwiGLU model's FFN hidden (SiLU(w1 x) ⊙ w3 x) is a signed product
without GELU's bounded negative part, so it gets the plain symmetric quantizer by default and, with
`quant.swiglu_mrq=True`, a two-region quantizer with both steps searched (the study reports both).

TGQ (§3.6): G = `quant.time_groups` groups of consecutive sampling steps, group(i) = min(i // (T/G), G − 1) for the
i-th step of the T-step schedule (0 = the noisiest); time-grouped quantizers hold [G, ...] parameters and a table
from timestep to group, so the jitted sampler picks the group from t without recompiling. Scope: the post-softmax
quantizers (`quant.tgq_scope="softmax"`, the code) or every activation quantizer ("all", the paper's Eq. 12);
each group's parameters are searched on that group's calibration entries.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.quant import ptq
from terdit_jax.quant.ptq import QuantizeError
from terdit_jax.quant.quantizers import TwoRegionSoftmax, UniformQuantizer, fake_quant
from terdit_jax.quant.sites import site_path, sites_of
from terdit_jax.quant.units import Carry, advance, batches, observe_unit, to_device, unit_list, unit_prefix

SPLITS = tuple(2.0 ** -i for i in range(20))  # MRQ softmax split candidates
HO_MODES = ("fisher", "mse")
TGQ_SCOPES = ("softmax", "all")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One searched layer, by site roles relative to its unit's prefix. kind: "linear" (out = a·b with b the
    weight), "qk" (scores = a·bᵀ·hd^−½, head-wise) or "pv" (out = a·b); out: the site whose gradient weights the
    error (a linear's output, the attention scores, the output projection's input). quantize_a: False where the
    input stays full precision (the patch embedding)."""
    kind: str
    a: str
    b: str
    out: str
    quantize_a: bool = True


def _linear(role: str, quantize_a: bool = True) -> Layer:
    return Layer("linear", f"{role}.input", f"{role}.weight", f"{role}.output", quantize_a)


def block_layers(roles: ptq.Roles) -> list[Layer]:
    att = roles.attention
    return ([_linear(r) for r in roles.attn_in] + [Layer("qk", f"{att}.q", f"{att}.k", f"{att}.scores"),
                                                   Layer("pv", f"{att}.probs", f"{att}.v", f"{roles.attn_out[0]}.input")]
            + [_linear(r) for r in roles.attn_out + roles.mlp_in + roles.mlp_out])


HEAD_LAYERS = {"embed": [_linear("x_embedder", quantize_a=False)], "unembed": [_linear("final_layer.linear")]}


def layers_of(unit, roles) -> list[Layer]:
    return block_layers(roles) if unit.kind == "block" else HEAD_LAYERS.get(unit.kind, [])


def tq_rules(fp_cfg, q) -> tuple:
    """The sites TQ-DiT quantizes and how (module docstring). Regexes are block-generic."""
    roles, w, a = ptq.roles(fp_cfg), int(q.w_bits), int(q.a_bits)
    g = int(q.time_groups) if q.tgq else 1
    g_all = g if q.tgq_scope == "all" else 1
    gelu = fp_cfg.get("family", "large_dit") == "dit"
    sym = {"kind": "uniform", "symmetric": True}
    rules = [{"path": r"x_embedder\.weight", **sym, "bits": w, "granularity": "channel", "axis": -1},
             {"path": r"final_layer\.linear\.weight", **sym, "bits": w},
             {"path": r"final_layer\.linear\.input", **sym, "bits": a, "time_groups": g_all}]
    if gelu:  # fused qkv: one scale per q/k/v third
        rules.append({"path": ptq.BLOCK + re.escape(roles.attn_in[0]) + r"\.weight", **sym, "bits": w,
                      "granularity": "block", "axis": -1, "group_size": int(fp_cfg.dim)})
    att = re.escape(roles.attention)
    probs = ({"kind": "mrq_softmax", "bits": a} if q.mrq else {"kind": "uniform", "bits": a, "zero_point": False})
    rules += [{"path": ptq.BLOCK + att + r"\.(q|k|v)", **sym, "bits": a, "granularity": "channel", "axis": 2,
               "time_groups": g_all},
              {"path": ptq.BLOCK + att + r"\.probs", **probs, "time_groups": g}]
    if q.mrq and (gelu or q.swiglu_mrq):
        rules.append({"path": ptq.BLOCK + re.escape(roles.mlp_out[0]) + r"\.input", "kind": "mrq_gelu" if gelu else
                      "mrq_signed", "bits": a, "time_groups": g_all})
    linears = "|".join(re.escape(r) for r in roles.attn_in + roles.attn_out + roles.mlp_in + roles.mlp_out)
    rules += [{"path": ptq.BLOCK + f"(?:{linears})" + r"\.weight", **sym, "bits": w},
              {"path": ptq.BLOCK + f"(?:{linears})" + r"\.input", **sym, "bits": a, "time_groups": g_all}]
    return tuple(rules)


def variant_rules(final_rules: tuple, layers: list[Layer], k: int, prefix: str) -> tuple:
    """Rules to search layer k of a unit: observers on its activation operands, the final model's quantizers on
    the operands of layers 0..k−1, nothing anywhere else (later layers and other units in full precision)."""
    def rule_for(role):
        concrete = prefix + role
        return next((r for r in final_rules if re.fullmatch(r["path"], concrete)), None)

    generic = (lambda role: ptq.BLOCK + re.escape(role)) if prefix else re.escape
    out = [{"path": generic(s), "kind": "observe"} for s in (layers[k].a, layers[k].b) if not s.endswith(".weight")]
    for layer in layers[:k]:
        for role in (layer.a, layer.b):
            r = rule_for(role)
            if r is not None:
                out.append({**r, "path": generic(role)})
    return tuple(out)


def group_table(num_steps: int, groups: int, num_timesteps: int, timestep_map) -> np.ndarray:
    """(num_timesteps,) int32: the time group of every original timestep. The i-th sampling step (i = 0 the
    noisiest, respaced index k = T−1−i) is in group min(i // (T/G), G−1); a timestep outside the schedule takes
    the group of the nearest scheduled one."""
    k = np.arange(num_steps)
    group_of_k = np.minimum((num_steps - 1 - k) * groups // num_steps, groups - 1)
    nearest = np.abs(np.arange(num_timesteps)[:, None] - np.asarray(timestep_map)[None, :]).argmin(axis=1)
    return group_of_k[nearest].astype(np.int32)


def group_of_entries(calib, groups: int) -> np.ndarray:
    """The time group of each calibration entry, from its respaced step index."""
    i = calib.num_steps - 1 - calib.k
    return np.minimum(i * groups // calib.num_steps, groups - 1)


# --------------------------------------------------------------------------------------------------- HO weights

def denoising_targets(calib, config, idx) -> np.ndarray:
    """The target of the FP model's own denoising loss per entry: ε* = (x_t − sqrt(ᾱ)·x0)/sqrt(1 − ᾱ) with x0 the
    sample the entry's trajectory ended at (for v-models v* = sqrt(ᾱ)·ε* − sqrt(1 − ᾱ)·x0)."""
    d = create_diffusion("", config.diffusion.num_timesteps, config.model.prediction)
    ab = np.asarray(d.alphas_cumprod, np.float64)[calib.t[idx]].reshape(-1, 1, 1, 1)
    x, x0 = calib.x[idx], calib.x0[idx]
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1.0 - ab)
    if config.model.prediction == "v":
        eps = np.sqrt(ab) * eps - np.sqrt(1.0 - ab) * x0
    return eps.astype(np.float32)


def fisher_weights(fp_cfg, fp_values, outs: list[str], carry: Carry, targets: np.ndarray, *,
                   batch_size: int = 16) -> dict[str, np.ndarray]:
    """{output site: g² (E, ...)}: squared gradients of the FP denoising loss at each site in `outs` (Probes)."""
    if not hasattr(nnx, "capture"):
        raise RuntimeError("TQ-DiT's Fisher weights need flax >= 0.12.8 (nnx.capture); use quant.ho='mse'")
    rules = tuple({"path": re.escape(p), "kind": "probe"} for p in outs)
    model = ptq.host_model(ptq.with_sites(fp_cfg, rules), fp_values)
    graphdef, state = nnx.split(model)
    state = to_device(state)
    channels = fp_cfg.in_channels

    @jax.jit
    def grads(state, x, t, y, target):
        _, zero = nnx.capture(nnx.merge(graphdef, state), nnx.Perturbation)(x, t, y)

        def loss(p):  # the model is merged inside: grad traces it at its own level
            out = nnx.capture(nnx.merge(graphdef, state), init=p)(x, t, y)[0]
            return jnp.sum(jnp.mean(jnp.square(out[..., :channels] - target), axis=(1, 2, 3)))
        g = jax.grad(loss)(zero)
        return {site_path(path[:-1]): jnp.square(v.get_value()) for path, v in nnx.to_flat_state(g)}

    seen: dict[str, list] = {}
    for idx, n in batches(len(carry.t), batch_size):
        got = jax.device_get(grads(state, *to_device((carry.x[idx], carry.t[idx], carry.y[idx], targets[idx]))))
        for k, v in got.items():
            seen.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in seen.items()}


# ------------------------------------------------------------------------------------------------------ search

class Operand:
    """A searched operand: its quantizer and the values searched, each with its candidates (Δ = α·Δ0 over the α
    grid, Δ0 from `x`, the operand's calibration tensor or weight; MRQ's split over SPLITS)."""

    def __init__(self, q, x, grid: np.ndarray):
        self.q = q
        x = jnp.asarray(x, jnp.float32)
        half = 2 ** (q.bits - 1) - 0.5
        if isinstance(q, UniformQuantizer):
            v = q._view(q.prepare(x))
            d0 = jnp.max(jnp.abs(v), axis=q._reduced(v.ndim, dynamic=False), keepdims=True) / half
            self.values, self.candidates = {"delta": d0}, {"delta": [a * d0 for a in grid]}
        elif isinstance(q, TwoRegionSoftmax):
            self.values, self.candidates = {"split": jnp.asarray(1.0)}, {"split": [jnp.asarray(s) for s in SPLITS]}
        else:  # TwoRegionSigned
            pos = jnp.maximum(jnp.max(x), 1e-8) / half
            self.values, self.candidates = {"delta": pos}, {"delta": [a * pos for a in grid]}
            if not q.fixed_negative:
                neg = jnp.maximum(-jnp.min(x), 1e-8) / half
                self.values["delta_neg"], self.candidates["delta_neg"] = neg, [a * neg for a in grid]

    def apply(self, x, values: dict) -> jax.Array:
        q, x = self.q, x.astype(jnp.float32)
        if isinstance(q, UniformQuantizer):
            return fake_quant(q._view(q.prepare(x)), values["delta"], 0.0, q.lo, q.hi).reshape(x.shape)
        if isinstance(q, TwoRegionSoftmax):
            return q.quantize(x, values["split"])
        return q.quantize(x, values["delta"], q.negative_step() if q.fixed_negative else values["delta_neg"])

    def store(self, group: int | None) -> None:
        """Write the chosen values into the quantizer (for time group `group`, or all of its groups)."""
        for name, value in self.values.items():
            var = getattr(self.q, name)
            grouped = getattr(self.q, "time_groups", 1) > 1
            value = jnp.asarray(value).reshape(var[...].shape[1:] if grouped else var[...].shape)
            if grouped:
                value = var[...].at[slice(None) if group is None else group].set(value)
            var[...] = value


@dataclasses.dataclass
class Part:
    """The calibration rows of one time group (all rows without TGQ): A's operand for them (None where A stays
    full precision) and the full-precision A and B tensors, the FP output and the HO weights of these rows."""
    a: Operand | None
    a_fp: jax.Array
    b_fp: jax.Array
    weight: jax.Array | None


def layer_output(kind: str, a, b) -> jax.Array:
    if kind == "linear":
        return jnp.einsum("...i,io->...o", a, b)
    if kind == "qk":
        return jnp.einsum("bqhd,bkhd->bhqk", a, b) / np.sqrt(a.shape[-1])
    out = jnp.einsum("bhqk,bkhd->bqhd", a, b)
    return out.reshape(out.shape[0], out.shape[1], -1)


def search_layer(kind: str, parts: list[Part], b: Operand, rounds: int) -> float:
    """Alternating search of one layer (B then A for a linear, A then B for a matmul), each value over its
    candidates, minimising the HO error Σ_parts mean(w ⊙ (O_fp − O_q))². Each part's A operand is searched on
    that part's rows; B (shared by all time groups) on all of them. Returns the final error."""
    jobs = []
    for p in parts:
        target = layer_output(kind, p.a_fp, p.b_fp)
        w = jnp.ones_like(target) if p.weight is None else jnp.asarray(p.weight).reshape(target.shape)
        jobs.append((p, target, w, len(p.a_fp)))
    total = sum(n for *_, n in jobs)

    def error(p, target, w, av, bv):
        a_q = p.a_fp if p.a is None else p.a.apply(p.a_fp, av)
        return jnp.mean(w * jnp.square(target - layer_output(kind, a_q, b.apply(p.b_fp, bv))))

    def choose(op, name, score):
        losses = np.asarray(jax.device_get([score({**op.values, name: c}) for c in op.candidates[name]]))
        op.values[name] = op.candidates[name][int(np.argmin(losses))]

    def search_b():
        for name in b.candidates:
            choose(b, name, lambda bv: sum(error(p, tg, w, p.a.values if p.a else None, bv) * n / total
                                           for p, tg, w, n in jobs))

    def search_a():
        for p, tg, w, _ in jobs:
            if p.a is not None:
                for name in p.a.candidates:
                    choose(p.a, name, lambda av: error(p, tg, w, av, b.values))

    for _ in range(rounds):
        for step in ((search_b, search_a) if kind == "linear" else (search_a, search_b)):
            step()
    return float(sum(error(p, tg, w, p.a.values if p.a else None, b.values) * n / total for p, tg, w, n in jobs))


# ------------------------------------------------------------------------------------------------------ method

def quantize(job) -> dict:
    q, fp_cfg, config = job.config.quant, job.fp_cfg, job.config
    if q.tgq and q.time_groups > config.sample.num_steps:
        raise QuantizeError(f"config.quant.time_groups={q.time_groups} is more than the {config.sample.num_steps} "
                            "sampling steps it groups; use at most that many groups")
    roles = ptq.roles(fp_cfg)
    rules = tq_rules(fp_cfg, q)
    q_cfg = ptq.with_sites(fp_cfg, rules)
    model = ptq.host_model(q_cfg, job.fp_values)
    groups = int(q.time_groups) if q.tgq else 1
    d = create_diffusion(str(config.sample.num_steps), config.diffusion.num_timesteps, fp_cfg.prediction)
    table = group_table(d.num_timesteps, groups, config.diffusion.num_timesteps, d.timestep_map)
    for site in sites_of(model).values():
        if getattr(site, "time_groups", 1) > 1:
            site.time_group[...] = jnp.asarray(table)
    idx = job.calib.init
    carry = ptq.calib_carry(job.calib, idx)
    entry_group = group_of_entries(job.calib, groups)[idx]
    grid = np.linspace(0.01, 1.2, int(q.alpha_grid))
    units = unit_list(model)
    weights = {}
    if q.ho == "fisher":
        with job.stage("HO weights"):
            outs = [unit_prefix(model, u) + layer.out for u in units for layer in layers_of(u, roles)]
            weights = fisher_weights(fp_cfg, job.fp_values, outs, carry, denoising_targets(job.calib, config, idx))
    report = []
    with job.stage("scale search"):
        variants: dict[tuple[str, int], nnx.Module] = {}
        for unit in tqdm(units, desc="TQ-DiT units", leave=False):
            layers, prefix = layers_of(unit, roles), unit_prefix(model, unit)
            qs = sites_of(model)
            for k, layer in enumerate(layers):
                if (unit.kind, k) not in variants:  # blocks share one graph: one variant per layer position
                    variants[unit.kind, k] = ptq.host_model(ptq.with_sites(fp_cfg, variant_rules(rules, layers, k,
                                                                                                 prefix)))
                obs = variants[unit.kind, k]
                ptq.set_values(obs, ptq.values_of(model))
                seen = observe_unit(obs, unit, carry)
                a_q = qs.get(prefix + layer.a) if layer.quantize_a else None
                b_q = qs[prefix + layer.b]
                lin = ptq.module_at(model, prefix + layer.b[:-len(".weight")]) if layer.kind == "linear" else None
                b_x = np.asarray(lin.weight()) if lin is not None else seen[prefix + layer.b]
                a_x, w = seen[prefix + layer.a], weights.get(prefix + layer.out)
                grouped = a_q is not None and getattr(a_q, "time_groups", 1) > 1
                rows = ([np.flatnonzero(entry_group == g) for g in range(groups)] if grouped else
                        [np.arange(len(a_x))])
                keep = [(g if grouped else None, r) for g, r in enumerate(rows) if len(r)]
                b_op = Operand(b_q, b_x, grid)
                parts = [Part(Operand(a_q, a_x[r], grid) if a_q is not None else None, jnp.asarray(a_x[r]),
                              jnp.asarray(b_x if lin is not None else b_x[r]), None if w is None else w[r])
                         for _, r in keep]
                error = search_layer(layer.kind, parts, b_op, int(q.search_rounds))
                b_op.store(None)
                for (g, _), part in zip(keep, parts):
                    if part.a is not None:
                        part.a.store(g)
                report.append({"unit": unit.name, "layer": f"{layer.kind} {layer.a}", "error": error})
            carry = advance(model, unit, carry)
    info = {"ho": q.ho, "mrq": bool(q.mrq), "tgq": bool(q.tgq), "time_groups": groups, "tgq_scope": q.tgq_scope,
            "num_steps": int(config.sample.num_steps), "swiglu_mrq": bool(q.swiglu_mrq), "layers": report}
    return {"model": model, "model_cfg": q_cfg, "info": info}
