"""Quantization sites: the named places in a model where a tensor can be quantized, and the rules that give
each site its quantizer.

A model asks `make_site(path, cfg, shape)` for every site, as it asks `models.linears.make_linear` for every
linear. The path is the module path in the parameter tree plus the tensor's role, e.g.

    layers.3.attention.wq.input    (..., in)       input of a linear (every linear has one)
    layers.3.attention.wq.weight   (in, out)       weight of a linear, as the matmul uses it
    layers.3.attention.wq.output   (..., out)      output of a linear (HO's gradient probes read it)
    layers.3.attention.input       (..., D)        the input wq, wk and wv share (Large-DiT; feed_forward.input:
                                                   the one w1 and w3 share); the DiT's fused qkv has one input
    layers.3.attention.q / .k / .v (B, T, H, hd)   attention operands (q, k after RoPE where there is RoPE; q
                                                   times 1/sqrt(hd) where it has a site, PTQ4DiT's order)
    layers.3.attention.scores      (B, H, T, T)    q·kᵀ/sqrt(hd) before the softmax (then attention runs unfused)
    layers.3.attention.probs       (B, H, T, T)    softmax probabilities (then attention runs unfused)
    layers.3.feed_forward.hidden   (B, T, F)       FFN hidden: the gated SwiGLU product, or post-GELU for DiT;
                                                   the same tensor as the input of w2/fc2 (quantize one of them)

(DiT-XL paths read `blocks.N.attn...` and `blocks.N.mlp.hidden`.) `model.sites` is an ordered tuple of rules
{"path": regex, "kind": quantizer kind, **settings}; the first rule whose regex matches the whole path wins,
kind "none" leaves a site alone, and a rule that matches no site is an error (`check_rules`). A site no rule
names is None: it holds no variables and adds nothing to the program. Rules match paths like qwix's
`QuantizationRule` matches module paths, but nothing is intercepted: the model calls its sites itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Callable

import jax
from flax import nnx

from terdit_jax.quant.quantizers import QUANTIZERS

_REQUESTED: contextvars.ContextVar[list | None] = contextvars.ContextVar("requested_sites", default=None)
RULE_KEYS = ("path", "kind")
SITE_SUFFIX = "_site"


class SiteError(ValueError):
    """A site rule that cannot work; the message names the rule and what to do."""


def site_path(tree_path) -> str:
    """The site path of a site module at `tree_path` in the model: a module stores the site of role r under the
    attribute f"{r}_site", so ('layers', 3, 'attention', 'wq', 'input_site') → 'layers.3.attention.wq.input'.
    Quantizers do not store their path, so the blocks of a model share one graph structure (one compile)."""
    *owner, attr = (str(p) for p in tree_path)
    if not attr.endswith(SITE_SUFFIX):
        raise ValueError(f"{'.'.join(map(str, tree_path))} is not a site attribute (*{SITE_SUFFIX})")
    return ".".join([*owner, attr[:-len(SITE_SUFFIX)]])


def sites_of(module, prefix: str = "") -> dict:
    """{site path: site module} of every quantization site inside `module` (its tree paths prefixed by `prefix`,
    e.g. 'layers.3.' for a block taken out of its model)."""
    return {prefix + site_path(p): m for p, m in nnx.iter_modules(module)
            if p and str(p[-1]).endswith(SITE_SUFFIX)}


def quantize(site, x: jax.Array, t: jax.Array | None) -> jax.Array:
    """x through `site` (None = identity)."""
    return x if site is None else site(x, t)


def _rules(cfg) -> tuple[dict, ...]:
    get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
    return tuple(get("sites", ()) or ())


def _pattern(rule) -> re.Pattern:
    if not isinstance(rule, dict) or any(k not in rule for k in RULE_KEYS):
        raise SiteError(f"site rule {rule!r} must be a dict with keys 'path' (a regex) and 'kind'")
    try:
        return re.compile(rule["path"])
    except re.error as e:
        raise SiteError(f"site rule path {rule['path']!r} is not a valid regular expression ({e})") from e


def make_site(path: str, cfg, shape: tuple):
    """The quantizer of site `path` under the rules `cfg.sites` (first full match wins), or None."""
    requested = _REQUESTED.get()
    if requested is not None:
        requested.append(path)
    for rule in _rules(cfg):
        if _pattern(rule).fullmatch(path):
            if rule["kind"] == "none":
                return None
            _check_kind(rule)
            settings = {k: v for k, v in rule.items() if k not in RULE_KEYS}
            return QUANTIZERS.get(rule["kind"])(path=path, shape=tuple(shape), **settings)
    return None


def _check_kind(rule):
    if rule["kind"] != "none" and rule["kind"] not in QUANTIZERS:
        raise SiteError(f"site rule {rule['path']!r}: unknown quantizer kind {rule['kind']!r}; known: "
                        f"{', '.join(QUANTIZERS.names())} or 'none'")


@contextlib.contextmanager
def recording():
    """Collect the path of every site requested while the block runs (a model being built)."""
    token = _REQUESTED.set([])
    try:
        yield _REQUESTED.get()
    finally:
        _REQUESTED.reset(token)


def check_rules(cfg, paths: list[str]) -> None:
    """Every rule of `cfg.sites` must match at least one of the model's site `paths`."""
    for rule in _rules(cfg):
        pattern = _pattern(rule)
        _check_kind(rule)
        if not any(pattern.fullmatch(p) for p in paths):
            examples = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise SiteError(f"site rule {rule['path']!r} matches no site of this model (its sites look like "
                            f"{examples}; `terdit_jax.models.families.site_paths(cfg)` lists them all)")


def observe(module: nnx.Module, *args, fn: Callable | None = None, prefix: str = "") -> tuple[object, dict]:
    """Run fn(module, *args) (default: module(*args)) → (output, {site path: [reduced tensor of each call]}) from
    the module's Observers (site paths prefixed by `prefix` for a block taken out of its model). Works inside jit
    (the module is an argument there); leaves no intermediates behind."""

    fn = fn or (lambda m, *a: m(*a))
    if hasattr(nnx, "capture"):  # flax ≥ 0.12.8: sow outside capture is deprecated
        out, inter = nnx.capture(fn, nnx.Intermediate)(module, *args)
    else:
        out = fn(module, *args)
        inter = nnx.pop(module, nnx.Intermediate)
    return out, {prefix + site_path(path[:-1]): list(v.get_value()) for path, v in nnx.to_flat_state(inter)}
