"""Training: the train state, one jitted step (donated state), EMA, and the loop with logging,
periodic sample grids and resumable Orbax checkpoints."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from terdit_jax.checkpoint import Checkpoints
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.model_fn import abstract_model, init_model, param_count
from terdit_jax.sample import generate, save_grid


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; no checkpoint is written after that point."""


def learning_rate(t):
    """TerDiT recipe: constant `lr` (5e-4), optional linear warmup, then `lr_reduced` from `lr_reduce_step` on."""
    def schedule(step):
        lr = jnp.asarray(t.lr, jnp.float32)
        if t.lr_reduce_step >= 0:
            lr = jnp.where(step >= t.lr_reduce_step, t.lr_reduced, lr)
        if t.warmup_steps > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / t.warmup_steps)
        return lr
    return schedule


def make_optimizer(t) -> optax.GradientTransformation:
    """AdamW (torch defaults β=(0.9, 0.999), eps 1e-8) after global-norm clipping (Large-DiT train.py)."""
    return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                       optax.adamw(learning_rate(t), b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay))


def init_state(config):
    """→ (apply, state). state = {step, params, ema, opt_state, rng}; the EMA starts as a copy (official)."""
    apply, params = init_model(config.model, config.seed)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params),
             "opt_state": make_optimizer(config.train).init(params),
             "rng": jax.random.key_data(jax.random.key(config.seed + 1))}
    return apply, state


def abstract_state(config):
    """The train state's structure as ShapeDtypeStructs (for restoring), built without allocating."""
    apply, _ = abstract_model(config.model)
    return apply, jax.eval_shape(lambda: init_state(config)[1])


def make_train_step(apply, config):
    """One optimisation step: (state, batch) → (state, metrics). batch = {'x': (B,H,W,C), 'y': (B,)}."""
    diffusion = create_diffusion("", config.diffusion.num_timesteps)
    tx, lr_fn, decay = make_optimizer(config.train), learning_rate(config.train), config.train.ema_decay

    def loss_fn(params, batch, key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        x0 = batch["x"]
        t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        model_fn = lambda x, tt, y: apply(params, x, tt, y, drop_key=k_drop)  # label dropout (CFG training)
        terms = diffusion.training_losses(model_fn, x0, t, noise, batch["y"])
        return terms["loss"].mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state["step"]), **aux}
        return {**state, "step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}, metrics

    return jax.jit(step, donate_argnums=0)


class MetricsLog:
    """metrics.jsonl (one object per logged step) plus TensorBoard events in the workdir."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()


def make_data(config, process_index: int = 0, process_count: int = 1):
    """An object whose `batch(step)` returns this process's part of global batch `step` as numpy arrays."""
    if config.data.kind == "digits":
        from terdit_jax.data.digits import DigitBatches
        return DigitBatches(config.train.batch_size, config.seed, process_index, process_count)
    raise ValueError(f"config.data.kind={config.data.kind!r} is not available in this build; use 'digits'")


def sample_grid(apply, params, config, path: str, key, *, per_class: int | None = None, decode=None):
    """Write a labelled grid: sample.classes rows × per_class columns. Returns (images, labels)."""
    from terdit_jax.config import sample_labels
    labels = sample_labels(config)
    if per_class:
        labels = [k for k in dict.fromkeys(labels) for _ in range(per_class)]
    images = generate(apply, params, labels, config, key, decode=decode)
    save_grid(path, images, labels)
    return images, labels


def train(config, workdir: str, *, log=print) -> dict:
    """Train from the newest checkpoint in `workdir` (or from scratch) up to `train.steps`. Returns paths."""
    t = config.train
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), keep=t.keep_ckpts)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    apply, state = init_state(config)
    log(f"model {config.model.name}: {param_count(state['params']):,} parameters, linear={config.model.linear}, "
        f"dtype={config.model.dtype}, devices={jax.devices()}")
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, jax.eval_shape(lambda: state), config.model)
        log(f"resumed from {ckpt.directory}/{start}")
    start = int(start or 0)
    data, step_fn, metrics_log = make_data(config), make_train_step(apply, config), MetricsLog(workdir)
    key = jax.random.key(config.sample.seed)
    pending, last_time, last_step = [], time.perf_counter(), start
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="train", dynamic_ncols=True)
    for step in bar:
        batch = jax.tree.map(jnp.asarray, data.batch(step))
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
            pending.clear()
            if not all(np.isfinite(v) for v in values.values()):
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"loss became non-finite ({values}) by step {done}; nothing was saved after it (last good "
                    f"checkpoint: {good if good is not None else 'none'} in {ckpt.directory}). Lower config.train.lr, "
                    "check the data, or use config.model.dtype=float32.")
            now = time.perf_counter()
            values["steps_per_s"] = (done - last_step) / (now - last_time)
            last_time, last_step = now, done
            metrics_log.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", gn=f"{values['grad_norm']:.2f}")
        if done % t.sample_every == 0 and done != t.steps:
            sample_grid(apply, state["ema"], config, os.path.join(workdir, "samples", f"grid_{done:07d}.png"),
                        key, per_class=4)
        if done % t.ckpt_every == 0 or done == t.steps:
            ckpt.save(done, state, config.model)
    bar.close()
    ckpt.wait()
    ckpt.close()
    return {"checkpoints": ckpt.directory, "metrics": metrics_log.path, "apply": apply, "state": state}
