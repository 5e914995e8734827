"""Quantization sites: identity by default (the model before sites existed: the same program), a quantizer kind
registered here quantizes exactly the sites its rules name without touching the model files, observers record
tensors as NNX intermediates, and bad rules fail clearly."""
import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from terdit_jax.model_fn import init_model
from terdit_jax.models.families import build, site_paths
from terdit_jax.quant.quantizers import QUANTIZERS, QuantState
from terdit_jax.quant.sites import SiteError, observe, sites_of

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "identity_golden")
VARIANTS = {"ternary": dict(), "fp": dict(linear="fp"), "qk_sincos": dict(qk_norm=True, pos_embed="sincos")}


class Toy(nnx.Module):
    """Rounds its tensor to multiples of a per-site step held in QuantState (a stand-in for a real method)."""

    def __init__(self, *, path, shape, step=0.25):
        self.step = QuantState(jnp.asarray(step, jnp.float32))

    def __call__(self, x, t):
        return (jnp.round(x / self.step[...]) * self.step[...]).astype(x.dtype)


@pytest.fixture(autouse=True, scope="module")
def toy_kind():
    QUANTIZERS.add("toy", Toy)
    yield
    QUANTIZERS.remove("toy")


def randomised(params, seed):
    """Every parameter random (a fresh model's zero adaLN and final layer would make the output 0)."""
    rng, leaves = np.random.default_rng(seed), []
    for path, var in nnx.to_flat_state(params):
        v = var.get_value()
        new = 1 + 0.2 * rng.standard_normal(v.shape) if path[-1] == "weight" else 0.3 * rng.standard_normal(v.shape)
        leaves.append((path, var.replace(jnp.asarray(0.2 if path[-1] == "alpha" else new, v.dtype))))
    return nnx.from_flat_state(leaves)


def inputs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
    return x, jnp.array([3, 700]), jnp.array([1, 10])


def primitive_counts(jaxpr, counts):
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(sub, "jaxpr"):
                    primitive_counts(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr, counts)
                elif hasattr(sub, "eqns"):
                    primitive_counts(sub, counts)
    return counts


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rules_is_the_model_before_sites_with_the_same_program(variant):
    """tests/data/identity_golden.* were written by the forward of commit 3ac247c (before sites, families and
    the linear registry existed) on these inputs and these randomised parameters, on an AMD EPYC VM, where this
    forward reproduces them bit for bit. XLA:CPU generates code for the host's vector units, so another CPU (an
    Intel Xeon: 2e-5 of |out| ≤ 33) changes the last bits: the values are compared to float32 round-off, the
    program exactly (the same primitives and the same number of compiled HLO instructions). The program part was
    rewritten three times, by intended changes of the forward (2-D token matmuls in every linear, head-major
    attention on the CPU: 28 more reshapes, 2 fewer max, 20 fewer HLO instructions; the attention scale applied to
    q, not to the scores: 5 fewer HLO instructions; the final norm's statistics as matrix-vector products on the
    CPU, a platform-dependent branch: 2 more dots, 33 fewer HLO instructions); the values are still the
    original's."""
    apply, params = init_model(tiny_model_config(**VARIANTS[variant]), 0)
    params = randomised(params, 1)
    fn = lambda p, x, t, y: apply(p, x, t, y)  # noqa: E731
    out = np.asarray(jax.jit(fn)(params, *inputs()))
    want = np.load(GOLDEN + ".npz")[variant]
    np.testing.assert_allclose(out, want, rtol=0, atol=4e-6 * np.abs(want).max())
    golden = json.load(open(GOLDEN + ".json"))[variant]
    prims = primitive_counts(jax.make_jaxpr(fn)(params, *inputs()).jaxpr, collections.Counter())
    assert dict(prims) == golden["primitives"]
    hlo = jax.jit(fn).lower(params, *inputs()).compile().as_text()
    assert sum(1 for line in hlo.splitlines() if re.match(r"\s*(ROOT\s+)?%?[\w.\-]+ = ", line)) == \
        golden["hlo_instructions"]


def _model(cfg, seed=0):
    model = build(cfg, nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, randomised(params, 1), rest)


def test_a_registered_kind_quantizes_exactly_the_sites_its_rules_name():
    rules = ({"path": r"layers\.0\.attention\.q", "kind": "none"},  # first match wins: block 0's q stays
             {"path": r"layers\.\d+\.attention\.q", "kind": "toy", "step": 0.5},
             {"path": r".*feed_forward\.w2\.input", "kind": "toy"},
             {"path": r"layers\.1\.attention\.probs", "kind": "toy", "step": 0.125})
    plain = _model(tiny_model_config(linear="fp"))
    quant = _model(tiny_model_config(linear="fp", sites=rules))
    toys = {p: m for p, m in sites_of(quant).items() if isinstance(m, Toy)}
    assert sorted(toys) == ["layers.0.feed_forward.w2.input", "layers.1.attention.probs", "layers.1.attention.q",
                            "layers.1.feed_forward.w2.input"]
    assert float(toys["layers.1.attention.q"].step[...]) == 0.5
    # quantizer state is its own variable type: not a Param, checkpointable beside them
    qstate = nnx.state(quant, QuantState)
    assert len(jax.tree.leaves(qstate)) == 4
    assert jax.tree.structure(nnx.state(quant, nnx.Param)) == jax.tree.structure(nnx.state(plain, nnx.Param))
    x, t, y = inputs()
    a, b = plain(x, t, y), quant(x, t, y)
    assert float(jnp.abs(a - b).max()) > 1e-3  # the quantizers act
    # only the named sites act: the block-1 w2 input is what the toy rounds, so rounding it by hand reproduces it
    w2 = quant.layers[1].feed_forward.w2
    h = jax.random.normal(jax.random.key(0), (3, w2.kernel.shape[0]))
    np.testing.assert_allclose(w2(h), jnp.round(h / 0.25) * 0.25 @ w2.kernel[...], rtol=1e-5, atol=1e-5)


def test_the_probabilities_site_runs_attention_unfused_with_the_same_numerics():
    tiny_step = ({"path": r".*attention\.probs", "kind": "toy", "step": 1e-7},)  # rounding far below float32 eps·p
    fused = _model(tiny_model_config(linear="fp"))
    unfused = _model(tiny_model_config(linear="fp", sites=tiny_step))
    x, t, y = inputs()
    np.testing.assert_allclose(unfused(x, t, y), fused(x, t, y), rtol=2e-5, atol=2e-5)


def test_observers_record_site_tensors_as_intermediates():
    rules = ({"path": r"layers\.1\.attention\.k", "kind": "observe"},
             {"path": r"layers\.0\.feed_forward\.w1\.input", "kind": "observe", "reduce": "channel_absmax"})
    model = _model(tiny_model_config(linear="fp", sites=rules))
    x, t, y = inputs()
    out, seen = jax.jit(lambda m: observe(m, x, t, y))(model)
    assert sorted(seen) == ["layers.0.feed_forward.w1.input", "layers.1.attention.k"]
    assert seen["layers.1.attention.k"][0].shape == (2, 16, 4, 8)  # (B, T, H, hd), one entry per call
    h = seen["layers.0.feed_forward.w1.input"][0]
    assert h.shape == (2, 32) and float(h.min()) >= 0  # (B, C): max |x| over tokens
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
    plain = _model(tiny_model_config(linear="fp"))
    np.testing.assert_allclose(jax.jit(lambda m: m(x, t, y))(plain), out, rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(out).max()))  # observing changes nothing


def test_bad_rules_fail_with_one_clear_message():
    with pytest.raises(SiteError, match=r"matches no site.*layers\.0\.x_embedder|matches no site"):
        build(tiny_model_config(sites=({"path": r"layers\.9\.attention\.q", "kind": "toy"},)), nnx.Rngs(0))
    with pytest.raises(SiteError, match="unknown quantizer kind 'nope'"):
        build(tiny_model_config(sites=({"path": r".*\.q", "kind": "nope"},)), nnx.Rngs(0))
    with pytest.raises(SiteError, match="not a valid regular expression"):
        build(tiny_model_config(sites=({"path": r"(", "kind": "toy"},)), nnx.Rngs(0))


def test_site_paths_list_every_site_of_the_model():
    paths = site_paths(tiny_model_config())
    for want in ("x_embedder.input", "t_embedder.mlp_0.weight", "layers.1.attention.wq.input",
                 "layers.1.attention.v", "layers.1.attention.probs", "layers.0.feed_forward.hidden",
                 "layers.0.adaLN_modulation.weight", "final_layer.linear.input"):
        assert want in paths
    assert len(paths) == len(set(paths))
