"""Quantizer kinds: the modules a quantization site holds (quant/sites.py builds them by name).

Every kind is constructed as `Kind(path=..., shape=..., **settings)` and called as `q(x, t)`:
x the site's tensor, t (B,) int timesteps of the batch rows (None outside the denoiser), returning a tensor of
x's shape and dtype. `shape` is the site tensor's shape with None for the axes unknown when the model is built
(batch, tokens); the layouts are listed in quant/sites.py. A quantizer keeps its calibrated values in
`QuantState` variables, so they checkpoint with Orbax beside the parameters and a filter tells them apart
from trainable `nnx.Param`s and from calibration statistics (`nnx.Intermediate`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from terdit_jax.registry import Registry


class QuantState(nnx.Variable):
    """Quantizer state (step sizes, zero points, rounding variables, split points)."""


# --------------------------------------------------------------------------------------------------- observing

def _channel_absmax(x: jax.Array) -> jax.Array:
    """(B, ..., C) → (B, C): max |x| over every axis but the first and the last (tokens)."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else jnp.abs(x)


REDUCERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "none": lambda x: x,  # the whole tensor
    "channel_absmax": _channel_absmax,  # PTQ4DiT's channel salience per sample
}


class Observer(nnx.Module):
    """Identity that records what flows through its site, for calibration: `sow`s reduce(x) as an
    `nnx.Intermediate` named "observed" (`observe` runs a model and collects them by site path)."""

    def __init__(self, *, path: str, shape: tuple, reduce: str = "none"):
        if reduce not in REDUCERS:
            raise ValueError(f"observer reduce={reduce!r} is not one of {sorted(REDUCERS)}")
        self.path, self.reduce = path, reduce

    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        self.sow(nnx.Intermediate, "observed", REDUCERS[self.reduce](x))
        return x


def observe(model: nnx.Module, *args, **kwargs) -> tuple[object, dict[str, list[jax.Array]]]:
    """Run model(*args, **kwargs) → (output, {site path: [reduced tensor of each call]}) from its Observers.

    Works inside jit (the model is an argument there). The model is left without intermediates."""
    if hasattr(nnx, "capture"):  # flax ≥ 0.12.8: sow outside capture is deprecated
        out, inter = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    else:
        out = model(*args, **kwargs)
        inter = nnx.pop(model, nnx.Intermediate)
    sites = {path: m.path for path, m in nnx.iter_modules(model) if isinstance(m, Observer)}
    return out, {sites[path[:-1]]: list(v.get_value()) for path, v in nnx.to_flat_state(inter)}


QUANTIZERS: Registry[type] = Registry("quantizer kind", {"observe": Observer})
