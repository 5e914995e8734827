"""TQ-DiT (Hwang, Lee, Kang; arXiv 2502.04056): search-only PTQ with Hessian-guided scales (HO), two-region
quantizers (MRQ) and time-grouped activation parameters (TGQ). The paper is primary; the official code (a
PTQ4ViT port that does not run as released, ptq_baselines.md §3.8) gives the constants (§3.2–3.6).

What is quantized (§3.2): every block linear, weights per tensor with one scale per q/k/v third of a fused qkv
(Large-DiT's separate wq/wk/wv are per tensor each), inputs per tensor (one quantizer for an input several linears
share: Large-DiT's wq/wk/wv and w1/w3); q·kᵀ and softmax·V with head-wise q, k, v; the patch embedding's weight
per output channel (its input stays full precision); the final linear per tensor. All symmetric. The adaLN
linears and the timestep MLP stay full precision, as in the code.

The search (§3.3): for each layer in order, with every earlier layer quantized (`quant.sequential`; earlier units
through the carry, earlier layers of the unit through a model variant whose later sites are full precision; the
official code calibrates each layer with all others in full precision: `sequential=False`), Δ = α·Δ0 over
`quant.alpha_grid` values of α in [0.01, 1.2], Δ0 = max|x|/(2^(b−1) − 0.5) per channel / head / third / tensor,
alternating weight then activation (A then B operand for a matmul) for `quant.search_rounds` rounds. The
objective is the HO error Σ g² ⊙ (O_fp − O_q)² at the layer's output, summed over the calibration entries. It
separates over the heads of q, k, v, the thirds of a fused qkv weight and the output channels of the patch
embedding, so each picks its own α (the official code's n_G / n_V / channel-wise searches): the independent choice
is each group's own minimiser, at least as good as one shared α (`quant.shared_alpha=True`). Candidates are scored
in float32 at HIGHEST matmul precision (no TF32), one jitted program per layer shape that maps over the candidates
and streams the calibration rows in chunks, so device memory stays bounded at 512 px.

HO's weights g (§3.4): the official gradient is of a KL between the FP and quantized outputs with every other layer
in full precision, which makes it zero up to round-off. Here (`quant.ho="fisher"`, the default) g is the gradient of
the FP model's own denoising loss at the layer's output, ‖ε̂(x_t) − ε*‖² with ε* the noise that links x_t to the
sample its calibration trajectory ended at (v-models: the matching v*) — the diagonal Fisher of the paper's Eq.
13–16 in a form that is defined and non-zero; `quant.ho="mse"` uses unit weights (PTQ4ViT's L2 search). They are
computed for a window of units at a time (`HOWeights`), never for the whole model at once (all of DiT-XL/2's would
need ~45 GB of host memory at 256 px).

MRQ (§3.5): post-softmax probabilities get the two-region quantizer (split s searched over 2^−i, i = 0…19,
recombined by selection, not the code's sum; quantizers.TwoRegionSoftmax); a GELU model's fc2 input the post-GELU
one (Δ− fixed at 0.17/2^(b−1), Δ+ searched). A SwiGLU model's FFN hidden (SiLU(w1 x) ⊙ w3 x) is a signed product
without GELU's bounded negative part, so it gets the plain symmetric quantizer by default and, with
`quant.swiglu_mrq=True`, a two-region quantizer with both steps searched (the study reports both). The split is
scored with V quantized (the official code scores it against full-precision V): every step of the alternating search
then minimises the one objective the model is judged by, so no step can make it worse.

TGQ (§3.6): G = `quant.time_groups` groups of consecutive sampling steps, group(i) = min(i // (T/G), G − 1) for the
i-th step of the T-step schedule (0 = the noisiest); time-grouped quantizers hold [G, ...] parameters and a table
from timestep to group, so the jitted sampler picks the group from t without recompiling. Scope: the post-softmax
quantizers (`quant.tgq_scope="softmax"`, the code) or every activation quantizer ("all", the paper's Eq. 12);
each group's parameters are searched on that group's calibration entries (both operands of q·kᵀ and softmax·V with
"all"). Every group needs calibration entries: a group without any is an error before anything runs.

Resumable: the quantizer state (search only: the weights never change) is saved after every layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from terdit_jax import trees
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.diffusion.samplers import respacing
from terdit_jax.ptq import common as ptq
from terdit_jax.ptq.common import QuantizeError
from terdit_jax.quant.quantizers import (QuantState, TwoRegionGELU, TwoRegionSoftmax, UniformQuantizer, fake_quant,
                                         gelu_negative_step, two_region_signed, two_region_softmax)
from terdit_jax.quant.sites import site_path, sites_of
from terdit_jax.ptq.units import Carry, advance, batches, observe_unit, to_device, unit_list, unit_prefix

SPLITS = tuple(2.0 ** -i for i in range(20))  # MRQ softmax split candidates
HO_MODES = ("fisher", "mse")
TGQ_SCOPES = ("softmax", "all")
ROW_CHUNK_BYTES = 256 << 20  # the calibration rows one search step puts on the device at once (largest tensor)
HO_WINDOW_BYTES = 2 << 30  # HO weights held on the host at once
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Layer:
    """One searched layer, by site roles relative to its unit's prefix. kind: "linear" (out_j = a·b_j, each b_j the
    weight of one of the linears reading the input a), "qk" (scores = a·bᵀ, q already scaled by hd^−½) or "pv"
    (out = a·b); out: per b, the site whose gradient weights its error (a linear's output, the attention scores,
    the output projection's input). quantize_a: False where the input stays full precision (patch embedding)."""
    kind: str
    a: str
    b: tuple[str, ...]
    out: tuple[str, ...]
    quantize_a: bool = True

    @property
    def name(self) -> str:
        return f"{self.kind} {self.a}"


def _linears(names: tuple[str, ...], input_role: str, quantize_a: bool = True) -> Layer:
    return Layer("linear", input_role, tuple(f"{r}.weight" for r in names), tuple(f"{r}.output" for r in names),
                 quantize_a)


def block_layers(roles: ptq.Roles) -> list[Layer]:
    """Per attention (PixArt: self- then cross-attention) its input linears, q·kᵀ, softmax·V and output projection,
    then the FFN's two linears."""
    layers = []
    for att, inputs, out in roles.attentions():
        layers += [_linears(group, site) for site, group in inputs]
        layers += [Layer("qk", f"{att}.q", (f"{att}.k",), (f"{att}.scores",)),
                   Layer("pv", f"{att}.probs", (f"{att}.v",), (roles.input_of(out),)),
                   _linears(out, roles.input_of(out))]
    return layers + [_linears(roles.mlp_in, roles.input_of(roles.mlp_in)),
                     _linears(roles.mlp_out, roles.input_of(roles.mlp_out))]


def head_layers(roles: ptq.Roles) -> dict[str, list[Layer]]:
    """The searched head linears: the patch embedding (its input stays full precision) and the final linear. The
    t-MLP, adaLN and a text family's caption projection stay full precision (TQ-DiT's code keeps the conditioning
    in full precision)."""
    return {"embed": [_linears((roles.embedder,), f"{roles.embedder}.input", quantize_a=False)],
            "unembed": [_linears((roles.final,), f"{roles.final}.input")]}


def layers_of(unit, roles) -> list[Layer]:
    return block_layers(roles) if unit.kind == "block" else head_layers(roles).get(unit.kind, [])


def tq_rules(fp_cfg, q) -> tuple:
    """The sites TQ-DiT quantizes and how (module docstring). Regexes are block-generic."""
    roles, w, a = ptq.roles(fp_cfg), int(q.w_bits), int(q.a_bits)
    g = int(q.time_groups) if q.tgq else 1
    g_all = g if q.tgq_scope == "all" else 1
    gelu, block = roles.gelu, roles.block
    sym = {"kind": "uniform", "symmetric": True}
    site = lambda module, role: re.escape(roles.rule_path(f"{module}.{role}"))  # noqa: E731
    rules = [{"path": site(roles.embedder, "weight"), **sym, "bits": w, "granularity": "channel", "axis": -1},
             {"path": site(roles.final, "weight"), **sym, "bits": w},
             {"path": site(roles.final, "input"), **sym, "bits": a, "time_groups": g_all}]
    rules += [{"path": block + re.escape(r), "kind": "none"} for r in roles.shadowed_inputs()]
    if len(roles.attn_in) == 1:  # fused qkv: one scale per q/k/v third
        rules.append({"path": block + re.escape(roles.attn_in[0]) + r"\.weight", **sym, "bits": w,
                      "granularity": "block", "axis": -1, "group_size": int(fp_cfg.dim)})
    names = [att for att, _, _ in roles.attentions()]
    att = re.escape(names[0]) if len(names) == 1 else "(?:" + "|".join(map(re.escape, names)) + ")"
    probs = ({"kind": "mrq_softmax", "bits": a} if q.mrq else {"kind": "uniform", "bits": a, "zero_point": False})
    rules += [{"path": block + att + r"\.(q|k|v)", **sym, "bits": a, "granularity": "channel", "axis": 2,
               "time_groups": g_all},
              {"path": block + att + r"\.probs", **probs, "time_groups": g}]
    if q.mrq and (gelu or q.swiglu_mrq):
        rules.append({"path": block + re.escape(roles.mlp_out[0]) + r"\.input", "kind": "mrq_gelu" if gelu else
                      "mrq_signed", "bits": a, "time_groups": g_all})
    linears = "|".join(re.escape(r) for r in roles.linears())
    inputs = "|".join(re.escape(r) for r in roles.input_sites())
    rules += [{"path": block + f"(?:{linears})" + r"\.weight", **sym, "bits": w},
              {"path": block + f"(?:{inputs})", **sym, "bits": a, "time_groups": g_all}]
    return tuple(rules)


def variant_rules(final_rules: tuple, layers: list[Layer], k: int, prefix: str, sequential: bool = True,
                  roles: ptq.Roles | None = None) -> tuple:
    """Rules to search layer k of a unit: observers on its activation operands, the final model's quantizers on
    the operands of layers 0..k−1 when `sequential`, nothing anywhere else (later layers and other units in full
    precision)."""
    roles = roles or ptq.ROLES["large_dit"]

    def rule_for(role):
        concrete = prefix + role if prefix else roles.rule_path(role)
        return next((r for r in final_rules if re.fullmatch(r["path"], concrete)), None)

    generic = (lambda role: roles.block + re.escape(role)) if prefix else (lambda role: re.escape(roles.rule_path(role)))
    out = [{"path": generic(s), "kind": "observe"} for s in (layers[k].a, *layers[k].b) if not s.endswith(".weight")]
    for layer in layers[:k] if sequential else ():
        for role in (layer.a, *layer.b):
            r = rule_for(role)
            if r is not None and r["kind"] != "none":
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


def check_groups(entry_group: np.ndarray, groups: int, num_steps: int) -> None:
    """Every time group must have calibration entries (else its parameters would keep their defaults)."""
    empty = [g for g in range(groups) if not np.any(entry_group == g)]
    if empty:
        per = num_steps / groups
        spans = ", ".join(f"{g} (sampling steps {math.ceil(g * per)}–{math.ceil((g + 1) * per) - 1})" for g in empty)
        raise QuantizeError(f"TQ-DiT time group(s) {spans} have no calibration entries: the {groups} groups need at "
                            f"least one calibrated step each; raise config.quant.calib_steps (to at least {groups}) "
                            "or lower config.quant.time_groups")


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


@functools.partial(jax.jit, static_argnames=("graphdef", "keep", "channels"))
def _ho_grads(state, x, t, y, target, *, graphdef, keep: tuple[str, ...], channels: int):
    """{site: g²} of the probes `keep`: squared gradients of Σ_entries mean((ε̂ − ε*)²) at each probe's tensor,
    so entry e's g² is the gradient of its own loss (the loss is a sum over the batch)."""
    _, zero = nnx.capture(nnx.merge(graphdef, state), nnx.Perturbation)(x, t, y)

    def loss(p):  # the model is merged inside: grad traces it at its own level
        out = nnx.capture(nnx.merge(graphdef, state), init=p)(x, t, y)  # no variable types: the output itself
        return jnp.sum(jnp.mean(jnp.square(out[..., :channels] - target), axis=(1, 2, 3)))
    flat = {site_path(path[:-1]): v.get_value() for path, v in nnx.to_flat_state(jax.grad(loss)(zero))}
    return {k: jnp.square(flat[k]) for k in keep}


class HOWeights:
    """HO weights g² (E, ...) of the output sites of each unit, computed for a window of consecutive units at a
    time (one backward pass of the FP model per window, `batch_size` entries at a time) and kept only while the
    search is in that window: the host holds at most `budget` bytes of them."""

    def __init__(self, fp_cfg, fp_values, outs: list[list[str]], carry: Carry, targets: np.ndarray, *,
                 batch_size: int, budget: int = HO_WINDOW_BYTES, stage=None):
        if not hasattr(nnx, "capture"):
            raise RuntimeError("TQ-DiT's Fisher weights need flax >= 0.12.8 (nnx.capture); use quant.ho='mse'")
        all_outs = [p for unit in outs for p in unit]
        names = ptq.roles(fp_cfg)
        model = ptq.host_model(ptq.with_sites(fp_cfg, tuple({"path": re.escape(names.rule_path(p)), "kind": "probe"}
                                                            for p in all_outs)), fp_values)
        self.graphdef, state = nnx.split(model)
        self.state = to_device(state)
        self.carry, self.targets, self.batch_size = carry, targets, int(batch_size)
        self.channels = int(fp_cfg.in_channels)
        first = jax.tree.map(jnp.asarray, self.inputs(np.arange(1)))
        one = jax.eval_shape(lambda: nnx.capture(nnx.merge(self.graphdef, self.state), nnx.Perturbation)(*first)[1])
        per_entry = {site_path(p[:-1]): math.prod(v.get_value().shape) * 4 for p, v in nnx.to_flat_state(one)}
        entries = len(carry.t)
        self.windows: list[list[int]] = []
        size = 0
        for u, unit_outs in enumerate(outs):  # greedy windows of consecutive units within the budget
            need = entries * sum(per_entry[p] for p in unit_outs)
            if not self.windows or (size + need > budget and size > 0):
                self.windows.append([])
                size = 0
            self.windows[-1].append(u)
            size += need
        self.outs, self._window, self._weights, self.stage = outs, -1, {}, stage

    def inputs(self, idx) -> tuple:
        """The model's (x, t, y) for entries `idx` (a text family's y: the entries' captions and masks)."""
        return self.carry.x[idx], self.carry.t[idx], self.carry.cond(idx)

    def of_unit(self, u: int) -> dict[str, np.ndarray]:
        """{output site: g² (E, ...)} of unit u's layers (computing its window when the search enters it)."""
        w = next(i for i, units in enumerate(self.windows) if u in units)
        if w != self._window:
            self._weights = {}  # free the previous window before computing the next
            keep = tuple(p for v in self.windows[w] for p in self.outs[v])
            seen: dict[str, list] = {}
            with self.stage("HO weights") if self.stage else contextlib.nullcontext():
                for idx, n in batches(len(self.targets), self.batch_size):
                    args = to_device(self.inputs(idx) + (self.targets[idx],))
                    got = jax.device_get(_ho_grads(self.state, *args, graphdef=self.graphdef, keep=keep,
                                                   channels=self.channels))
                    for k, v in got.items():
                        seen.setdefault(k, []).append(np.asarray(v)[:n])
            self._weights, self._window = {k: np.concatenate(v) for k, v in seen.items()}, w
        return {p: self._weights[p] for p in self.outs[u]}


# ------------------------------------------------------------------------------------------------------ search

@dataclasses.dataclass(frozen=True)
class QSpec:
    """A quantizer as a pure function of its values, hashable: the jitted search is keyed by it, so the blocks of
    a model share one compiled program. kind: "uniform" | "softmax" | "signed"; split: (axis, group size) of a
    block/group granularity's view, counted from the end."""
    kind: str
    bits: int
    lo: int = 0
    hi: int = 0
    split: tuple[int, int] | None = None
    fixed_negative: bool = False

    @classmethod
    def of(cls, q) -> "QSpec":
        if isinstance(q, UniformQuantizer):
            if q.smooth is not None or q.zero_point:
                raise ValueError("TQ-DiT searches symmetric (or zero-point-free) quantizers without a CSB divisor")
            split = (q.axis - len(q.shape), q.group_size) if q.granularity in ("group", "block") else None
            return cls("uniform", q.bits, q.lo, q.hi, split)
        if isinstance(q, TwoRegionSoftmax):
            return cls("softmax", q.bits)
        return cls("signed", q.bits, fixed_negative=isinstance(q, TwoRegionGELU))

    def apply(self, x: jax.Array, values: dict) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "softmax":
            return two_region_softmax(x, values["split"], self.bits)
        if self.kind == "signed":
            neg = gelu_negative_step(self.bits) if self.fixed_negative else values["delta_neg"]
            return two_region_signed(x, values["delta"], neg, self.bits)
        if self.split is None:
            return fake_quant(x, values["delta"], 0.0, self.lo, self.hi)
        a, gs = self.split
        a %= x.ndim
        view = x.reshape(x.shape[:a] + (x.shape[a] // gs, gs) + x.shape[a + 1:])
        return fake_quant(view, values["delta"], 0.0, self.lo, self.hi).reshape(x.shape)


class Operand:
    """A searched operand: its quantizer's values, each a candidate grid `factors` times a `base` (Δ = α·Δ0 over
    the α grid, Δ0 from `x`, the operand's calibration tensor or weight; MRQ's split over SPLITS), one value per
    group of the quantizer (per head / third / channel, or one). `group`: the time group it belongs to (None: all)."""

    def __init__(self, q, x, grid: np.ndarray, group: int | None = None):
        self.q, self.spec, self.group = q, QSpec.of(q), group
        x = jnp.asarray(x, jnp.float32)
        half = 2 ** (q.bits - 1) - 0.5
        if isinstance(q, UniformQuantizer):
            v = q._view(q.prepare(x))
            d0 = jnp.max(jnp.abs(v), axis=q._reduced(v.ndim, dynamic=False), keepdims=True) / half
            self.bases, self.factors = {"delta": jnp.maximum(d0, 1e-8)}, {"delta": np.asarray(grid, np.float32)}
        elif isinstance(q, TwoRegionSoftmax):
            self.bases, self.factors = {"split": jnp.ones(())}, {"split": np.asarray(SPLITS, np.float32)}
        else:  # TwoRegionSigned
            pos = jnp.maximum(jnp.max(x), 1e-8) / half
            self.bases, self.factors = {"delta": pos}, {"delta": np.asarray(grid, np.float32)}
            if not q.fixed_negative:
                neg = jnp.maximum(-jnp.min(x), 1e-8) / half
                self.bases["delta_neg"], self.factors["delta_neg"] = neg, np.asarray(grid, np.float32)
        self.values = dict(self.bases)  # factor 1 until searched

    def groups(self, name: str) -> int:
        return int(np.size(self.bases[name]))

    def choose(self, name: str, sums: np.ndarray, shared: bool) -> None:
        """Set `name` from the candidates' per-group objective sums (C, G): each group's minimiser, or with
        `shared` the one factor minimising the total."""
        pick = np.full(sums.shape[1], np.argmin(sums.sum(axis=1))) if shared else np.argmin(sums, axis=0)
        f = self.factors[name][pick].reshape(np.shape(self.bases[name]))
        self.values[name] = jnp.asarray(f) * self.bases[name]

    def store(self) -> None:
        """Write the chosen values into the quantizer (for its time group, or all of its groups)."""
        for name, value in self.values.items():
            var = getattr(self.q, name)
            grouped = getattr(self.q, "time_groups", 1) > 1
            value = jnp.asarray(value).reshape(var[...].shape[1:] if grouped else var[...].shape)
            if grouped:
                value = var[...].at[slice(None) if self.group is None else self.group].set(value)
            var[...] = value


def layer_output(kind: str, a, b) -> jax.Array:
    """The layer's output from its operands: a linear a (..., K)·b (K, O); qk a (E, T, H, hd)·b → (E, H, T, T)
    (q is scaled already); pv a (E, H, T, T)·b (E, T, H, hd) → (E, T, H·hd)."""
    if kind == "linear":
        return jnp.einsum("...i,io->...o", a, b, precision=HIGHEST)
    if kind == "qk":
        return jnp.einsum("bqhd,bkhd->bhqk", a, b, precision=HIGHEST)
    out = jnp.einsum("bhqk,bkhd->bqhd", a, b, precision=HIGHEST)
    return out.reshape(out.shape[0], out.shape[1], -1)


def reduce_to_groups(err: jax.Array, kind: str, operand: int, groups: int) -> jax.Array:
    """Σ of an error tensor over everything but the searched operand's groups → (G,). operand −1 = A, j = B_j. The
    groups map onto the output: a linear weight's channels / thirds onto its output columns, q's and k's heads onto
    the scores' head axis, v's heads onto the head-major columns of softmax·V."""
    if groups == 1:
        return jnp.sum(err)[None]
    if kind == "qk":
        return jnp.sum(err, axis=(0, 2, 3))
    if operand < 0:
        raise ValueError(f"{kind}: an A operand with {groups} groups does not separate over the output")
    cols = jnp.sum(err.reshape(-1, err.shape[-1]), axis=0)
    return jnp.sum(cols.reshape(groups, -1), axis=1)


@functools.partial(jax.jit, static_argnames=("kind", "specs", "operand", "name", "groups"))
def _candidate_sums(factors, base, values, a_fp, b_fps, targets, weights, mask, *, kind: str, specs, operand: int,
                    name: str, groups: int):
    """(C, G): the objective Σ w ⊙ (O_fp − O_q)² over one chunk of rows (mask 0 for padding rows), per group of the
    searched value, for every candidate factor (a sequential map over candidates: one candidate's temporaries at a
    time). specs: (A's QSpec or None, (B_j's QSpec, ...)); values: ({A's values} or None, ({B_j's values}, ...))."""
    a_spec, b_specs = specs
    outs = range(len(b_specs)) if operand < 0 else (operand,)

    def one(f):
        a_vals, b_vals = values
        if operand < 0:
            a_vals = {**a_vals, name: f * base}
        else:
            b_vals = tuple({**v, name: f * base} if j == operand else v for j, v in enumerate(b_vals))
        a_q = a_fp if a_spec is None else a_spec.apply(a_fp, a_vals)
        total = jnp.zeros((groups,), jnp.float32)
        for j in outs:
            diff = targets[j] - layer_output(kind, a_q, b_specs[j].apply(b_fps[j], b_vals[j]))
            err = jnp.square(diff) * mask.reshape((-1,) + (1,) * (diff.ndim - 1))
            total = total + reduce_to_groups(err if weights[j] is None else err * weights[j], kind, operand, groups)
        return total
    return jax.lax.map(one, factors)


@dataclasses.dataclass
class Part:
    """The calibration rows of one time group (all rows without TGQ): A's operand for them (None where A stays full
    precision), B's operands (shared by every part for weights; the part's own for time-grouped activations), and
    the rows' full-precision A, per-row B's (None for weights), FP outputs and HO weights (None: unit weights)."""
    a: Operand | None
    b: list[Operand]
    a_fp: np.ndarray
    b_fp: list[np.ndarray | None]
    targets: list[np.ndarray]
    weights: list[np.ndarray | None]


class LayerSearch:
    """The alternating search of one layer over its parts (module docstring). `weights_b`: the B tensors that are
    weights (one per B, None for per-row activations)."""

    def __init__(self, kind: str, parts: list[Part], weights_b: list[np.ndarray | None], *, shared: bool = False,
                 chunk_bytes: int = ROW_CHUNK_BYTES, label: str = ""):
        self.kind, self.parts, self.shared, self.label = kind, parts, shared, label
        self.weights_b = [None if w is None else jnp.asarray(w, jnp.float32) for w in weights_b]
        self.chunks = [self._chunks(p, chunk_bytes) for p in parts]

    def _chunks(self, p: Part, chunk_bytes: int) -> list[tuple]:
        """The part's rows in equal chunks (the last padded by repeating its last row, masked out), on the device
        when they fit in one chunk, else streamed per call."""
        per_row = max([p.a_fp[0].nbytes] + [t[0].nbytes for t in p.targets] + [b[0].nbytes for b in p.b_fp
                                                                                 if b is not None])
        n = len(p.a_fp)
        size = max(1, min(n, chunk_bytes // max(1, per_row)))
        out = []
        for lo in range(0, n, size):
            idx = np.arange(lo, min(lo + size, n))
            mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(size - len(idx), np.float32)])
            idx = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
            out.append((idx, mask))
        if len(out) == 1:
            return [self._arrays(p, *out[0])]
        return out

    def _arrays(self, p: Part, idx, mask) -> tuple:
        b = tuple(w if w is not None else jnp.asarray(bf[idx]) for w, bf in zip(self.weights_b, p.b_fp))
        take = (lambda a: None if a is None else jnp.asarray(a[idx]))
        return (jnp.asarray(p.a_fp[idx]), b, tuple(take(t) for t in p.targets), tuple(take(w) for w in p.weights),
                jnp.asarray(mask))

    def sums(self, op: Operand, operand: int, name: str) -> np.ndarray:
        """(C, G) objective sums over every part that uses `op` (its own for A, the shared B across parts)."""
        total = 0.0
        for p, chunks in zip(self.parts, self.chunks):
            if (p.a if operand < 0 else p.b[operand]) is not op:
                continue
            specs = (None if p.a is None else p.a.spec, tuple(b.spec for b in p.b))
            values = (None if p.a is None else p.a.values, tuple(b.values for b in p.b))
            for chunk in chunks:
                arrays = self._arrays(p, *chunk) if len(chunk) == 2 else chunk
                total = total + np.asarray(jax.device_get(_candidate_sums(
                    jnp.asarray(op.factors[name]), op.bases[name], values, *arrays, kind=self.kind, specs=specs,
                    operand=operand, name=name, groups=op.groups(name))), np.float64)
        return total

    def step(self, op: Operand, operand: int) -> None:
        for name in op.factors:
            sums = self.sums(op, operand, name)
            dead = np.flatnonzero(np.all(sums == 0, axis=0))
            if len(dead):
                where = f"time group {op.group}" if op.group is not None else "all calibration entries"
                raise QuantizeError(
                    f"TQ-DiT {self.label}: the objective of {name} (group(s) {dead.tolist()[:8]}) is zero for every "
                    f"candidate over {where}: its HO weights are zero there, so no scale can be chosen; check the "
                    "calibration set, or use config.quant.ho=mse")
            op.choose(name, sums, self.shared)

    def run(self, rounds: int) -> float:
        """`rounds` alternating rounds (B then A for a linear, A then B for a matmul); returns the final objective
        (mean over all rows and elements)."""
        a_ops = list(dict.fromkeys(p.a for p in self.parts if p.a is not None))
        b_ops = list(dict.fromkeys((j, b) for p in self.parts for j, b in enumerate(p.b)))
        for _ in range(rounds):
            a_step = lambda: [self.step(op, -1) for op in a_ops]  # noqa: E731
            b_step = lambda: [self.step(op, j) for j, op in b_ops]  # noqa: E731
            for step in ((b_step, a_step) if self.kind == "linear" else (a_step, b_step)):
                step()
        return self.objective()

    def objective(self) -> float:
        total, count = 0.0, 0
        for p in self.parts:
            a_q = p.a_fp if p.a is None else np.asarray(p.a.spec.apply(jnp.asarray(p.a_fp), p.a.values))
            for j, b in enumerate(p.b):
                bf = self.weights_b[j] if self.weights_b[j] is not None else jnp.asarray(p.b_fp[j])
                out = layer_output(self.kind, jnp.asarray(a_q), b.spec.apply(bf, b.values))
                err = np.square(np.asarray(p.targets[j], np.float64) - np.asarray(out, np.float64))
                if p.weights[j] is not None:
                    err = err * p.weights[j].reshape(err.shape)
                total, count = total + err.sum(), count + err.size
        return float(total / max(count, 1))


# ------------------------------------------------------------------------------------------------------ method

def quant_state(model) -> dict:
    """{flat path: host array} of the quantizers' state (TQ-DiT's resume point: it never changes the weights)."""
    return {k: np.asarray(jax.device_get(v)) for k, v in trees.flat(nnx.state(model, QuantState)).items()}


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
    d = create_diffusion(respacing(config.sample.sampler, config.sample.num_steps), config.diffusion.num_timesteps,
                         fp_cfg.prediction)
    table = group_table(d.num_timesteps, groups, config.diffusion.num_timesteps, d.timestep_map)
    for site in sites_of(model).values():
        if getattr(site, "time_groups", 1) > 1:
            site.time_group[...] = jnp.asarray(table)
    idx = job.calib.init
    entry_group = group_of_entries(job.calib, groups)[idx]
    check_groups(entry_group, groups, int(config.sample.num_steps))
    carry = ptq.calib_carry(job.calib, idx)
    fp_model = None if q.sequential else ptq.host_model(fp_cfg, job.fp_values)
    grid = np.linspace(0.01, 1.2, int(q.alpha_grid))
    units = unit_list(model)
    start, report = (0, 0), []
    if job.resume is not None:
        ptq.set_values(model, job.resume[0])
        start, report = tuple(job.resume[1]["next"]), list(job.resume[1]["layers"])
        job.log(f"resuming TQ-DiT at unit {start[0] + 1} of {len(units)}, layer {start[1] + 1} from {job.partial_dir}")
    ho = None
    if q.ho == "fisher":
        outs = [[unit_prefix(model, u) + o for layer in layers_of(u, roles) for o in layer.out] for u in units]
        outs = [o if i >= start[0] else [] for i, o in enumerate(outs)]
        ho = HOWeights(fp_cfg, job.fp_values, outs, carry, denoising_targets(job.calib, config, idx),
                       batch_size=int(q.ho_batch_size), stage=job.stage)
    variants: dict[tuple[str, int], nnx.Module] = {}
    with job.stage("scale search"):
        for u, unit in enumerate(tqdm(units, desc="TQ-DiT units", leave=False)):
            layers, prefix = layers_of(unit, roles), unit_prefix(model, unit)
            if u < start[0] or not layers:
                carry = advance(model if q.sequential else fp_model, unit, carry)
                continue
            weights = ho.of_unit(u) if ho is not None else {}
            qs = sites_of(model)
            for k, layer in enumerate(layers):
                if (u, k) < start:
                    continue
                if (unit.kind, k) not in variants:  # blocks share one graph: one variant per layer position
                    variants[unit.kind, k] = ptq.host_model(ptq.with_sites(
                        fp_cfg, variant_rules(rules, layers, k, prefix, bool(q.sequential), roles)))
                obs, t0 = variants[unit.kind, k], time.perf_counter()
                ptq.set_values(obs, ptq.values_of(model))
                seen = observe_unit(obs, unit, carry)
                error = search_one(layer, prefix, qs, model, seen, weights, entry_group, groups, grid, q,
                                   label=f"{unit.name}, {layer.name}")
                report.append({"unit": unit.name, "layer": layer.name, "error": error,
                               "seconds": round(time.perf_counter() - t0, 2)})
                job.save(model, {"next": [u, k + 1], "layers": report}, values=quant_state(model))
            carry = advance(model if q.sequential else fp_model, unit, carry)
    info = {"ho": q.ho, "mrq": bool(q.mrq), "tgq": bool(q.tgq), "time_groups": groups, "tgq_scope": q.tgq_scope,
            "num_steps": int(config.sample.num_steps), "swiglu_mrq": bool(q.swiglu_mrq),
            "sequential": bool(q.sequential), "shared_alpha": bool(q.shared_alpha), "layers": report}
    return {"model": model, "model_cfg": q_cfg, "info": info}


def search_one(layer: Layer, prefix: str, qs: dict, model, seen: dict, weights: dict, entry_group: np.ndarray,
               groups: int, grid: np.ndarray, q, *, label: str) -> float:
    """Search one layer's quantizers in place (their values stored at the end); returns the final objective."""
    a_q = qs.get(prefix + layer.a) if layer.quantize_a else None
    b_qs = [qs[prefix + b] for b in layer.b]
    lins = [ptq.module_at(model, prefix + b[:-len(".weight")]) if b.endswith(".weight") else None for b in layer.b]
    weights_b = [None if lin is None else np.asarray(lin.weight(), np.float32) for lin in lins]
    a_x = seen[prefix + layer.a]
    b_x = [w if w is not None else seen[prefix + b] for w, b in zip(weights_b, layer.b)]
    targets = [np.asarray(layer_output(layer.kind, jnp.asarray(a_x), jnp.asarray(bx))) for bx in b_x]
    hw = [weights.get(prefix + o) for o in layer.out]
    hw = [None if w is None else w.reshape(t.shape) for w, t in zip(hw, targets)]
    timed = lambda qq: qq is not None and getattr(qq, "time_groups", 1) > 1  # noqa: E731
    rows = ([(g, np.flatnonzero(entry_group == g)) for g in range(groups)] if timed(a_q) or any(map(timed, b_qs))
            else [(None, np.arange(len(a_x)))])
    # an operand without time groups is one Operand shared by every part (its Δ0 from all rows)
    shared_a = Operand(a_q, a_x, grid) if a_q is not None and not timed(a_q) else None
    shared_b = {j: Operand(bq, b_x[j], grid) for j, bq in enumerate(b_qs) if not timed(bq)}
    parts = []
    for g, r in rows:
        b_ops = [shared_b[j] if j in shared_b else Operand(bq, b_x[j][r], grid, g) for j, bq in enumerate(b_qs)]
        a_op = shared_a if a_q is None or shared_a is not None else Operand(a_q, a_x[r], grid, g)
        parts.append(Part(a_op, b_ops, a_x[r], [None if w is not None else bx[r] for w, bx in zip(weights_b, b_x)],
                          [t[r] for t in targets], [None if w is None else w[r] for w in hw]))
    search = LayerSearch(layer.kind, parts, weights_b, shared=bool(q.shared_alpha), label=label)
    error = search.run(int(q.search_rounds))
    for op in dict.fromkeys(op for p in parts for op in ([p.a] if p.a else []) + p.b):
        op.store()
    return error
