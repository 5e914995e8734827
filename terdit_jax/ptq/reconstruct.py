"""Block reconstruction (BRECQ / Q-Diffusion, as PTQ4DiT runs it; ptq_baselines.md §2.7, step 5).

For one unit: inputs from the model with every earlier unit quantized, targets from the full-precision model on
full-precision inputs ("asym" mode). Trained jointly: AdaRound's α of every weight quantizer in the unit
(rectified sigmoid, ζ = 1.1, γ = −0.1; Adam 1e-3) and the step size Δ of every static activation quantizer
(Adam 4e-5, cosine to 0); zero points stay. Loss: Q-Diffusion's lp_loss, Σ (ŷ − y)² over axis 1 of the official
code's layout of the unit's output, mean over the rest (`recon_loss`: the embedder's (B, D, h, w) and the t-MLP's
(B, D) sum channels, a block's (B, T, D) and the final layer's (B, T, p²C) sum tokens; the sum sets the
reconstruction term's weight against the regulariser) + λ Σ (1 − |2h(α) − 1|^β), λ = 0.01, β from 20 to 2 linearly after a
20% warm-up without the regulariser. At the end every weight is rounded hard, ⌊W/Δ⌋ + 1[α ≥ 0], and stored as the
layer's weight, so nearest rounding reproduces it afterwards and α is dropped.

The unit's inputs and targets stay on the host; they go to the device in chunks of at most `chunk_bytes`, each
used for an equal share of the iterations (the official code cycles through 10 on-disk chunks the same way).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from terdit_jax.quant.quantizers import UniformQuantizer, rectified_sigmoid
from terdit_jax.ptq.units import Unit, angles_of, in_unit, to_device, unit_fn, unit_inputs, unit_module


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    iters: int = 20000
    batch_size: int = 32
    lr_alpha: float = 1e-3  # Q-Diffusion's default AdaRound learning rate (PTQ4DiT passes no other)
    lr_delta: float = 4e-5  # PTQ4DiT's activation step-size learning rate
    weight: float = 0.01  # λ of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    chunk_bytes: int = 1 << 30
    seed: int = 0


def beta_at(step, s: ReconSettings):
    """Q-Diffusion's LinearTempDecay: β = start until the warm-up ends, then linearly to end."""
    t0 = s.warmup * s.iters
    rel = jnp.clip((step - t0) / max(1.0, s.iters - t0), 0.0, 1.0)
    return s.beta[1] + (s.beta[0] - s.beta[1]) * (1.0 - rel)


def quantizers_of(module, owned) -> tuple[list, list]:
    """(weight quantizers, static activation quantizers) inside `module` whose paths the unit owns."""
    weights, acts = [], []
    for path, m in nnx.iter_modules(module):
        if isinstance(m, UniformQuantizer) and owned(path):
            if str(path[-1]) == "weight_site":
                weights.append((path, m))
            elif not m.dynamic:
                acts.append((path, m))
    return weights, acts


def _labels(train):
    return jax.tree_util.tree_map_with_path(lambda p, _: "alpha" if _key_name(p) == "alpha" else "delta", train)


def _optimizer(train, s: ReconSettings):
    """Adam on AdaRound's α (lr_alpha) and, with a cosine decay to 0, on the activation steps (lr_delta)."""
    return optax.multi_transform({"alpha": optax.adam(s.lr_alpha),
                                  "delta": optax.adam(optax.cosine_decay_schedule(s.lr_delta, s.iters))},
                                 _labels(train))


def summed_size(unit: Unit, carry_q, target: np.ndarray) -> int:
    """The size of the axis the official lp_loss sums over (axis 1 of the official layout of the unit's output):
    channels for the embedder and the t-MLP, tokens for a block, the final layer and PixArt's caption projection."""
    if unit.kind == "caption":  # (B, N, D) caption tokens, laid out as a block's tokens
        return int(target.shape[1])
    return int(target.shape[-1]) if unit.kind in ("embed", "condition") else int(carry_q.tokens.shape[1])


def recon_loss(out: jax.Array, y: jax.Array, summed: int) -> jax.Array:
    """lp_loss (p = 2) of the official layout: Σ over the `summed` axis, mean over the rest, which is the mean
    over every element times `summed` whatever our layout of the same elements."""
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y)) * summed


@functools.partial(jax.jit, static_argnames=("graphdef", "fn", "settings", "summed"))
def _train_step(train, rest, opt, inputs, y, angles, step, *, graphdef, fn, settings: ReconSettings, summed: int):
    def loss_fn(train):
        rec = recon_loss(fn(nnx.merge(graphdef, train, rest), *inputs, angles=angles), y, summed)
        hs = [rectified_sigmoid(a) for p, a in jax.tree_util.tree_leaves_with_path(train) if _key_name(p) == "alpha"]
        beta = beta_at(step, settings)
        reg = sum(jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta) for h in hs) if hs else 0.0
        on = (step >= settings.warmup * settings.iters).astype(jnp.float32)
        return rec + settings.weight * on * reg, rec

    (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
    updates, opt = _optimizer(train, settings).update(grads, opt, train)
    return optax.apply_updates(train, updates), opt, rec


def reconstruct(model, unit: Unit, carry_q, target: np.ndarray, groups: np.ndarray, settings: ReconSettings,
                *, desc: str = "") -> dict:
    """Reconstruct `unit` of `model` in place (see the module docstring). carry_q: the quantized model's carry
    before the unit; target: the FP output of the unit for every entry; groups: (E/4, 4) entry indices batched
    whole. Returns {"loss_start", "loss_end"} (reconstruction loss of the first and last 100 iterations)."""
    fn, angles = unit_fn(unit, carry_q), angles_of(carry_q)
    with unit_module(model, unit) as module:
        weights, acts = quantizers_of(module, in_unit(unit))
        if not weights and not acts:
            return {"loss_start": None, "loss_end": None}
        for path, q in weights:
            q.start_adaround(_weight_of(module, path))
        alpha_paths = {path for path, _ in weights}
        delta_paths = {path for path, _ in acts}

        def trainable(path, value) -> bool:
            return (path[:-1] in alpha_paths and path[-1] == "alpha") or (path[:-1] in delta_paths and path[-1] == "delta")

        graphdef, train, rest = nnx.split(module, trainable, ...)
        train, rest = to_device(train), to_device(rest)
        opt = _optimizer(train, settings).init(train)
        rng = np.random.default_rng(settings.seed)
        per_entry = sum(a.nbytes for a in jax.tree.leaves(unit_inputs(unit, carry_q, np.arange(1)))) + target[:1].nbytes
        per_chunk = max(1, min(len(groups), settings.chunk_bytes // max(1, 4 * per_entry)))
        order = rng.permutation(len(groups))
        chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
        per_batch = max(1, settings.batch_size // 4)
        summed = summed_size(unit, carry_q, target)
        recs, it = [], 0
        bar = tqdm(total=settings.iters, desc=desc or f"reconstruct {unit.name}", leave=False)
        for c, chunk in enumerate(chunks):
            idx = np.sort(groups[chunk].reshape(-1))
            dev_inputs, dev_y = to_device(unit_inputs(unit, carry_q, idx)), to_device(target[idx])
            n_iter = settings.iters * (c + 1) // len(chunks) - it
            local = np.arange(len(idx)).reshape(-1, 4)
            for _ in range(n_iter):
                pick = local[rng.choice(len(local), size=min(per_batch, len(local)), replace=False)].reshape(-1)
                batch = jax.tree.map(lambda a: a[pick], dev_inputs)
                train, opt, rec = _train_step(train, rest, opt, batch, dev_y[pick], angles,
                                              jnp.asarray(it, jnp.float32), graphdef=graphdef, fn=fn,
                                              settings=settings, summed=summed)
                recs.append(rec)
                it += 1
                bar.update(1)
        bar.close()
        nnx.update(module, jax.device_get(train))
        for path, q in weights:  # hard rounding, stored as the layer's weight
            _set_weight(module, path, q.finish_adaround(_weight_of(module, path)))
        recs = [float(r) for r in jax.device_get(recs[:100] + recs[-100:])]
    return {"loss_start": float(np.mean(recs[:100])), "loss_end": float(np.mean(recs[-100:]))}


def _key_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _linear_of(module, site_path: tuple):
    """The linear whose weight site is at `site_path` (…, 'weight_site')."""
    node = module
    for part in site_path[:-1]:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _weight_of(module, site_path: tuple) -> jax.Array:
    return _linear_of(module, site_path).weight()


def _set_weight(module, site_path: tuple, w: jax.Array) -> None:
    lin = _linear_of(module, site_path)
    lin.kernel[...] = jnp.asarray(w, lin.kernel[...].dtype)

