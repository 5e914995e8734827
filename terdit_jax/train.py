"""Training: the sharded train state, one jitted step (explicit shardings, donated state, optional gradient
accumulation and per-block remat), EMA, and the loop with logging, periodic sample grids, resumable Orbax
checkpoints and clean preemption (SIGTERM)."""
from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from terdit_jax import parallel
from terdit_jax.checkpoint import CheckpointError, Checkpoints
from terdit_jax.config import sample_labels
from terdit_jax.data import conditions
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.model_fn import param_count
from terdit_jax.sample import generate, save_grid
from terdit_jax.text import captions as captions_file
from terdit_jax.train_state import abstract_state, init_state, learning_rate, make_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; no checkpoint is written after that point."""


def make_train_step(apply, config, mesh=None, null_y=None):
    """One optimisation step (state, batch) → (state, metrics), jitted with donated state (and, with a mesh,
    explicit in/out shardings). batch: {'x': (B, H, W, C), 'y': y} or {'moments': (B, h, w, 8), 'y': y}, in which
    case the latents are drawn on device (terdit_jax.data.latents.sample_latents); y: (B,) int labels, or a text
    family's (caption (B, L, C), mask (B, L)).

    CFG dropout (model.class_dropout_prob: DiT's label dropout, PixArt's caption dropout) replaces an example's y by
    `null_y`: by default the null class model.num_classes; a text family passes the empty prompt's (caption (L, C),
    mask (L,)) (`make_data(...).null_y`).

    All random draws (t, noise, condition dropout, latents) are made for the whole global batch first, so the result
    does not depend on the mesh or on train.grad_accum_steps; with k microbatches the gradients are summed and each
    microbatch's loss is divided by the global batch size (Large-DiT divides each microbatch loss by the local batch).
    """
    t_cfg, m, p = config.train, config.model, config.parallel
    diffusion = create_diffusion("", config.diffusion.num_timesteps, m.prediction)
    tx, lr_fn, decay, k = make_optimizer(t_cfg), learning_rate(t_cfg), t_cfg.ema_decay, int(t_cfg.grad_accum_steps)
    fwd = functools.partial(parallel.forward, apply.graphdef, remat=p.remat, mesh=mesh,
                            constrain_acts=p.constrain_activations)
    scale = config.data.latent_scale
    if null_y is None:
        if conditions.takes_captions(m):
            raise ValueError(f"model.family={m.family!r} conditions on captions: pass null_y, the empty prompt's "
                             "(caption, mask), e.g. make_data(config).null_y")
        null_y = m.num_classes
    null_y = jax.tree.map(jnp.asarray, null_y)

    def loss_fn(params, inputs, total):
        x0, t, noise, y = inputs
        terms = diffusion.training_losses(lambda x, tt, yy: fwd(params, x, tt, yy), x0, t, noise, y,
                                          min_snr_gamma=config.diffusion.min_snr_gamma or None)
        return terms["loss"].sum() / total, {"mse": terms["mse"].sum() / total, "vb": terms["vb"].sum() / total}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_noise, k_drop, k_lat = jax.random.split(key, 4)
        y = batch["y"]
        if "moments" in batch:
            from terdit_jax.data.latents import sample_latents
            x0 = sample_latents(batch["moments"], k_lat, scale)
        else:
            x0 = batch["x"]
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        if m.class_dropout_prob > 0:  # CFG training: an example's whole condition → the null one (drawn per example)
            y = conditions.drop(y, null_y, jax.random.uniform(k_drop, (b,)) < m.class_dropout_prob)
        inputs = (x0, t, noise, y)
        if k == 1:
            (loss, aux), grads = grad_fn(state["params"], inputs, b)
        else:
            # Microbatch j = rows j, j+k, j+2k, ...: each device's contiguous rows hold whole groups of k, so
            # every microbatch stays spread over all devices of data×fsdp.
            micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape((b // k, k) + a.shape[1:]), 0, 1), inputs)

            def body(carry, mb):
                mb = jax.tree.map(lambda a: parallel.constrain(a, mesh, ("batch",) + (None,) * (a.ndim - 1)), mb)
                out = grad_fn(state["params"], mb, b)
                return jax.tree.map(jnp.add, carry, out), None

            zero = ((jnp.zeros(()), {"mse": jnp.zeros(()), "vb": jnp.zeros(())}),
                    jax.tree.map(jnp.zeros_like, state["params"]))
            ((loss, aux), grads), _ = jax.lax.scan(body, zero, micro)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        d = decay
        if t_cfg.ema_warmup:  # decay (1+n)/(10+n) until it reaches ema_decay, so a short run's EMA forgets the init
            d = jnp.minimum(decay, (1.0 + state["step"]) / (10.0 + state["step"]))
        ema = jax.tree.map(lambda e, q: d * e + (1.0 - d) * q, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state["step"]),
                   "param_norm": optax.tree.norm(params), **aux}
        return {**state, "step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    _, abstract = abstract_state(config, mesh)
    state_sh = parallel.state_shardings(abstract, mesh)
    batch_sh = jax.tree.map(lambda nd: parallel.batch_sharding(mesh, nd), batch_ndims(config))
    return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, parallel.replicated(mesh)))


def batch_ndims(config) -> dict:
    """Keys and ranks of the batches `make_data(config)` gives (y: one rank per leaf of the condition)."""
    return {"moments" if config.data.kind == "imagenet_latents" else "x": 4,
            "y": conditions.CONDITIONS.get(conditions.kind_of(config.model)).ndims}


def compile_step(step_fn, state, batch, *, log=print):
    """AOT-compile the step for these arguments (maxtext's .lower().compile()) and print its memory per device."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    mem = parallel.memory_report(compiled)
    gib = lambda v: f"{v / 2**30:.2f} GiB"  # noqa: E731
    if mem is None:
        log(f"compiled the train step in {time.perf_counter() - t0:.1f}s (this backend reports no memory use)")
    else:
        log(f"compiled the train step in {time.perf_counter() - t0:.1f}s; memory per device: {gib(mem['total'])} "
            f"(arguments {gib(mem['argument_size'])}, outputs {gib(mem['output_size'])}, aliased "
            f"{gib(mem['alias_size'])}, temporaries {gib(mem['temp_size'])})")
    return compiled, mem


class MetricsLog:
    """metrics.jsonl (one object per logged step) plus TensorBoard events in the workdir (process 0 only)."""

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


class StepData:
    """A source whose batches are a pure function of the step (the digits): no position to save.

    Like `GrainData`: `null_y` is CFG's unconditional y, `captions` (a text family's, else None) the captions
    the sample grids draw."""

    def __init__(self, source, null_y, captions=None):
        self.source, self.null_y, self.captions = source, null_y, captions

    def batch(self, step: int) -> dict:
        return self.source.batch(step)

    def get_state(self) -> str:
        return ""

    def set_state(self, state: str | None):
        pass


class GrainData:
    """This process's grain iterator (terdit_jax.data.pipeline); its position is saved with every checkpoint."""

    def __init__(self, iterator, key: str, condition: str, null_y, captions=None):
        self.it, self.key, self.condition = iterator, key, condition
        self.null_y, self.captions = null_y, captions

    def batch(self, step: int) -> dict:
        b = next(self.it)
        return {"x" if self.key == "image" else self.key: b[self.key],
                "y": conditions.CONDITIONS.get(self.condition).y(b)}

    def get_state(self) -> str:
        s = self.it.get_state()
        return s.decode() if isinstance(s, bytes) else json.dumps(s)

    def set_state(self, state: str | None):
        if state:
            self.it.set_state(state.encode())


def _null_y(config, captions):
    """CFG's unconditional y: the empty prompt's (caption, mask) for a text family, else the null class."""
    return config.model.num_classes if captions is None else captions.null()


def digit_caption_set(config):
    """A text family's captions of the ten digit classes (index = class): data.caption_embeds when given, else
    the demo's own (`digits.digit_captions`, a random-weight T5)."""
    from terdit_jax.data.digits import DIGIT_WORDS, digit_captions
    m, path = config.model, config.data.caption_embeds
    caps = captions_file.read(path) if path else digit_captions(m.caption_channels, m.caption_len, config.seed)
    if path and len(caps) != len(DIGIT_WORDS):
        raise captions_file.CaptionError(f"{path} holds {len(caps)} prompts; the digits need one per class, "
                                         f"{len(DIGIT_WORDS)}, in class order")
    return conditions.check_captions(caps, m, path or "the digit captions")


def make_data(config, process_index: int = 0, process_count: int = 1):
    """This process's data: `batch(step)` returns its rows of global batch `step` as numpy arrays
    ({'x' | 'moments', 'y'}); `get_state()`/`set_state()` save and restore the position; `null_y` and `captions`
    as `StepData` says."""
    d, t = config.data, config.train
    kind = conditions.kind_of(config.model)
    if d.kind == "digits":
        from terdit_jax.data.digits import DigitBatches
        caps = digit_caption_set(config) if kind == "caption" else None
        return StepData(DigitBatches(t.batch_size, config.seed, process_index, process_count, caps),
                        _null_y(config, caps), caps)
    if d.kind in ("imagenet_latents", "imagenet"):
        if d.kind == "imagenet" and d.latent:
            raise ValueError("config.data.kind='imagenet' feeds pixels; a latent model (data.latent=True) trains on "
                             "pre-extracted latents: run --mode extract_latents and use data.kind='imagenet_latents'")
        if not d.path:
            raise FileNotFoundError(f"config.data.path is empty; point it at the {d.kind} data")
        from terdit_jax.data.pipeline import make_train_iterator
        caps = None
        if d.kind == "imagenet_latents":
            from terdit_jax.data.latents import LatentSource
            src = LatentSource(d.path, image_size=d.image_size)
            if src.condition != kind:
                raise captions_file.CaptionError(
                    f"the latent shards in {d.path} are conditioned on {src.condition}s but model.family="
                    f"{config.model.family!r} takes {kind}s: extract them with this model's config "
                    "(--mode extract_latents)")
            if src.captions is not None:
                caps = conditions.check_captions(src.captions, config.model, f"the captions of {d.path}")
        elif kind != "label":
            raise captions_file.CaptionError(
                "config.data.kind='imagenet' gives class labels; a text family trains on caption latents: "
                "--mode extract_latents with data.caption_embeds, then data.kind=imagenet_latents")
        source = "latents" if d.kind == "imagenet_latents" else "images"
        it = make_train_iterator(source, d.path, image_size=d.image_size, global_batch_size=t.batch_size,
                                 seed=config.seed, process_index=process_index, process_count=process_count,
                                 workers=d.workers)
        return GrainData(it, "moments" if source == "latents" else "image", kind, _null_y(config, caps), caps)
    raise ValueError(f"config.data.kind={d.kind!r}; use 'digits', 'imagenet_latents' or 'imagenet'")


def _local_copy(tree):
    """The tree on this process's first device (replicating it first where it spans other processes)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return tree
    mesh = leaves[0].sharding.mesh
    full = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))(tree)
    return jax.tree.map(lambda a: a.addressable_data(0), full)


def sample_grid(apply, params, config, path: str, key, *, per_class: int | None = None, decode=None,
                captions=None):
    """Write a labelled grid: sample.classes rows × per_class columns, or with a text family's `captions` one row
    per caption (labelled by its index). Returns (images, labels) on process 0, (None, labels) elsewhere. Every
    process must call it (a sharded model is first gathered)."""
    labels = sample_labels(config) if captions is None else list(range(len(captions)))
    if per_class or captions is not None:
        per_class = per_class or config.sample.per_class
        labels = [k for k in dict.fromkeys(labels) for _ in range(per_class)]
    params = _local_copy(params)
    if not parallel.is_main_process():
        return None, labels
    y, null_y = (labels, None) if captions is None else (captions.condition(labels), captions.null())
    images = generate(apply, params, y, config, key, null_y=null_y, decode=decode)
    save_grid(path, images, labels)
    return images, labels


class _Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the next agreed step (every step with one process; every
    `every` steps with several, where the processes agree by an all-gather, so that all stop at the same step)."""

    def __init__(self, every: int):
        self.flag, self.every, self.old = False, max(1, every), None
        try:
            self.old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.old = None

    def _handler(self, signum, frame):
        self.flag = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if step % self.every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))

    def restore(self):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _check_finite(pending: list, done: int, ckpt) -> list[dict]:
    values = jax.device_get(pending)
    for i, v in enumerate(values):
        if not all(np.isfinite(x) for x in v.values()):
            bad = done - len(values) + i + 1
            good = ckpt.latest_step()
            raise TrainingDiverged(
                f"loss became non-finite at step {bad} ({ {k: float(x) for k, x in v.items()} }); nothing was saved "
                f"after it (last good checkpoint: {good if good is not None else 'none'} in {ckpt.directory}). Lower "
                "config.train.lr, check the data, or use config.model.dtype=float32.")
    return values


def _init_from(source_workdir: str, state, abstract, config, *, log=print):
    """Start from the params and EMA of the newest checkpoint of another run (fresh optimizer, step 0); the
    optimizer state there is never read. A weights-only checkpoint (an imported release) starts both from its
    weights.

    Only the resolution may differ: Large-DiT has no absolute position table (RoPE covers any length), which
    is how the paper continues TerDiT-4.2B from 256 px to 512 px."""
    src = Checkpoints(os.path.join(source_workdir, "checkpoints"), async_save=False)
    step = src.latest_step()
    if step is None:
        raise CheckpointError(f"config.train.init_from={source_workdir!r} has no checkpoint in {src.directory}")
    params, ema = src.restore_weights(step, abstract["params"], config.model, ignore=("input_size",))
    src.close()
    log(f"initialised params and EMA from {src.directory}/{step} (input size "
        f"{src.meta(step)['model'].get('input_size')} → {config.model.input_size})")
    return {**state, "params": params, "ema": ema}


def train(config, workdir: str, *, log=print) -> dict:
    """Train from the newest readable checkpoint in `workdir` (or from scratch) up to `train.steps`, or until a
    SIGTERM (then the state is saved and the result has preempted=True). Returns paths, apply and the state."""
    t = config.train
    main = parallel.is_main_process()
    say = log if main else (lambda *_: None)
    mesh = parallel.create_mesh(config)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), keep=t.keep_ckpts, keep_every=t.keep_every or None,
                       async_save=t.async_checkpoint)
    if main:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    apply, abstract = abstract_state(config, mesh)
    say(f"model {config.model.name}: {param_count(abstract['params']):,} parameters, linear={config.model.linear}, "
        f"γ={config.model.ternary_gamma}, dtype={config.model.dtype}; mesh {dict(mesh.shape)} over "
        f"{jax.device_count()} devices in {jax.process_count()} processes")
    start, state = ckpt.restore_latest(abstract, config.model, fallback=t.resume_fallback, log=say)
    data = make_data(config, jax.process_index(), jax.process_count())
    if state is None:
        start, state = 0, init_state(config, mesh)[1]
        if t.init_from:
            state = _init_from(t.init_from, state, abstract, config, log=say)
    else:
        data.set_state(ckpt.data_state(start))
        say(f"resumed from {ckpt.directory}/{start}")
    if t.batch_size % (parallel.batch_spec_divisor(mesh) * t.grad_accum_steps):
        raise ValueError(f"config.train.batch_size={t.batch_size} must divide by data×fsdp "
                         f"({parallel.batch_spec_divisor(mesh)}) × grad_accum_steps ({t.grad_accum_steps})")
    step_fn = make_train_step(apply, config, mesh, null_y=data.null_y)
    if main and data.captions is not None:  # what the grids draw, for --mode sample from prompts later
        captions_file.write(os.path.join(workdir, "captions.npz"), data.captions)
    metrics_log = MetricsLog(workdir) if main else None
    key = jax.random.key(config.sample.seed)
    preempt = _Preemption(config.parallel.preempt_check_every)
    pending, last_time, last_step, done, preempted = [], time.perf_counter(), start, start, False
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="train", dynamic_ncols=True,
               disable=not main)
    try:
        for step in bar:
            batch = parallel.global_batch(data.batch(step), mesh, t.batch_size)
            if step == start and t.aot_memory_report:
                step_fn, _ = compile_step(step_fn, state, batch, log=say)
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            done = step + 1
            preempted = preempt.should_stop(done)
            save_now = done % t.ckpt_every == 0 or done == t.steps or preempted
            if done % t.log_every == 0 or save_now:
                values = _check_finite(pending, done, ckpt)
                if done % t.log_every == 0 or done == t.steps:
                    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                    pending.clear()
                    now = time.perf_counter()
                    mean["steps_per_s"] = (done - last_step) / (now - last_time)
                    last_time, last_step = now, done
                    if main:
                        metrics_log.write(done, mean)
                        bar.set_postfix(loss=f"{mean['loss']:.4f}", gn=f"{mean['grad_norm']:.2f}")
            if done % t.sample_every == 0 and done != t.steps and not preempted:
                sample_grid(apply, state["ema"], config, os.path.join(workdir, "samples", f"grid_{done:07d}.png"),
                            key, per_class=4, captions=data.captions)
            if save_now:
                ckpt.save(done, state, config.model, data_state=data.get_state())
            if preempted:
                say(f"SIGTERM: saved step {done} in {ckpt.directory}; stopping")
                break
    finally:
        preempt.restore()
        bar.close()
        ckpt.wait()
        ckpt.close()
    return {"checkpoints": ckpt.directory, "metrics": os.path.join(workdir, "metrics.jsonl"), "apply": apply,
            "state": state, "step": done, "preempted": preempted, "mesh": mesh, "captions": data.captions}


def run_train_mode(config, workdir: str, *, log=print) -> dict:
    """--mode train: `train`, then the final grid of the EMA weights (and, for the digits demo, its class accuracy
    and FID/precision/recall against held-out digits, appended to metrics.jsonl)."""
    out = train(config, workdir, log=log)
    if out["preempted"]:
        log(f"preempted: saved step {out['step']} in {out['checkpoints']}; rerun the same command to resume")
        return out
    grid = os.path.join(workdir, "samples", "final_grid.png")
    log("sampling the final grid from the EMA weights ...")
    images, labels = sample_grid(out["apply"], out["state"]["ema"], config, grid, jax.random.key(config.sample.seed),
                                 captions=out["captions"])
    if parallel.is_main_process() and config.data.kind == "digits" and config.eval.demo_quality:
        from terdit_jax.eval.run import digits_quality
        log("measuring sample quality (class accuracy; FID/precision/recall vs held-out digits) ...")
        quality = digits_quality(config, workdir, images, labels, log=log)
        MetricsLog(workdir).write(out["step"], quality)
        log("quality: " + ", ".join(f"{k}={v:.4g}" for k, v in quality.items()))
    if parallel.is_main_process():
        log(f"checkpoints: {out['checkpoints']}\nmetrics:     {out['metrics']}\n"
            f"tensorboard: {os.path.join(workdir, 'tensorboard')}\nsample grid: {grid}")
    return out
