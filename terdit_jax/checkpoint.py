"""Orbax checkpoints of the train state, with the model config and the data-iterator position of every process
stored beside it, so that resume is exact and a checkpoint from a different architecture is refused with a clear
message instead of a shape error.

Crash safety comes from Orbax's commit protocol: a step is written into a temporary folder and renamed to its final
name only once every process has finished writing, so a process killed mid-save leaves at most a temporary folder,
which the next start ignores (and removes: `cleanup_tmp_directories`). A finished step that is unreadable later
(truncated, corrupted) raises CheckpointError naming the step; `restore_latest(fallback=True)` moves it aside to
`<directory>.corrupt/` and tries the next older one.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from terdit_jax.model_fn import abstract_model
from terdit_jax.models.families import DEFAULT_FAMILY, family_of
from terdit_jax import train_state


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which one and what to do."""


# Model fields added later, with the value every older checkpoint and export has.
ADDED_MODEL_FIELDS = {"prediction": "eps", "family": DEFAULT_FAMILY, "sites": (), "act_bits": 16, "bitnet_norm": "rms",
                      "pre_norms": True, "packed_from": "ternary", "deployed": False, "micro_conditions": False}
# Compute settings do not change the parameter tree; every other model field does (or changes its meaning).
RUNTIME_MODEL_FIELDS = ("dtype", "alpha_init", "ternary_gamma", "tensor_shards", "packed_act_dtype", "packed_backend",
                        "packed_act_force")


def model_signature(model_cfg) -> dict:
    """The architecture fields of a model config (JSON-normalised, so tuples compare equal to lists)."""
    d = {**ADDED_MODEL_FIELDS, **(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))}
    try:
        family = family_of(d)
    except KeyError as e:  # a checkpoint or manifest from a version with a family this one lacks
        raise CheckpointError(f"the model names {e.args[0]}; read it with the version of terdit-jax that wrote it")
    skip = set(RUNTIME_MODEL_FIELDS) | set(family.unused_fields) | set(family.unused_for(ml_collections.ConfigDict(d)))
    return json.loads(json.dumps({k: v for k, v in sorted(d.items()) if k not in skip}))


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _gather_strings(s: str) -> list[str]:
    """Every process's `s`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [s]
    from jax.experimental import multihost_utils
    b = np.frombuffer(s.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(b)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(b)] = b
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(rows[i, :lengths[i]]).decode() for i in range(len(lengths))]


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """workdir/checkpoints: keep the newest `keep` steps plus every step that is a multiple of `keep_every`;
    saves are asynchronous (the call returns once the arrays are copied off the devices)."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None, create=True,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, model_cfg, extra: dict | None = None, data_state: str | None = None) -> bool:
        """Save `state` at `step` unless that step exists already; refuses non-finite params.

        data_state: this process's data-iterator position (a string); all processes' positions are gathered and
        stored in the metadata (every process must call `save`, as Orbax requires anyway)."""
        if step in self.manager.all_steps():
            return False
        if not bool(_all_finite(state["params"])):
            raise CheckpointError(f"refusing to save step {step}: the parameters contain NaN/inf "
                                  f"(the previous checkpoints in {self.directory} are kept)")
        data = _gather_strings(data_state or "")
        meta = {"model": model_signature(model_cfg), "step": int(step), "process_count": jax.process_count(),
                "data_state": data, **(extra or {})}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)))

    def meta(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no readable metadata ({e}); "
                                  "it is incomplete or corrupted: delete that step folder to fall back") from e

    def data_state(self, step: int) -> str | None:
        """This process's data-iterator position saved at `step` ('' or None when there is none)."""
        meta = self.meta(step)
        states = meta.get("data_state") or []
        if not states or not any(states):
            return None
        if len(states) != jax.process_count():
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds the data positions of "
                                  f"{len(states)} processes but {jax.process_count()} are running; grain shards the "
                                  "data per process, so resume with the same process count")
        return states[jax.process_index()]

    def check_architecture(self, step: int, model_cfg, ignore: tuple[str, ...] = ()):
        """Refuse a checkpoint whose model config differs from `model_cfg` (fields in `ignore` may differ)."""
        saved = model_signature(self.meta(step).get("model", {}))
        want = model_signature(model_cfg)
        diff = {k: (saved.get(k), want.get(k)) for k in set(saved) | set(want)
                if saved.get(k) != want.get(k) and k not in ignore}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is a different architecture "
                                  f"({lines}); use the config it was trained with or another --workdir")

    def save_weights(self, step: int, ema, model_cfg, source: dict) -> None:
        """A weights-only checkpoint ({"ema": params}, no optimizer state): what an importer of released weights
        writes, so that `--mode sample|eval` and `train.init_from` read it like a trained run's checkpoint."""
        if not bool(_all_finite(ema)):
            raise CheckpointError(f"refusing to save step {step}: the weights contain NaN/inf")
        meta = {"model": model_signature(model_cfg), "step": int(step), "process_count": jax.process_count(),
                "data_state": [], "weights_only": True, "source": source}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"ema": ema}),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def weights_only(self, step: int) -> bool:
        return bool(self.meta(step).get("weights_only", False))

    def restore(self, step: int, abstract_state, model_cfg, *, ignore: tuple[str, ...] = ()):
        """Restore `step` onto the structure (and shardings) of `abstract_state`; checks the architecture first
        (model fields in `ignore` may differ, e.g. input_size when a 512 px run starts from 256 px weights).
        The shardings may come from another mesh than the one that saved it (Orbax reshards on read)."""
        self.check_architecture(step, model_cfg, ignore)
        if self.weights_only(step):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds weights only (imported: "
                                  f"{self.meta(step).get('source', {})}); sample or evaluate from it, or fine-tune "
                                  f"it in a new --workdir with --config.train.init_from={os.path.dirname(self.directory)}")
        return self._read(step, ocp.args.StandardRestore(abstract_state))

    def _partial(self, step: int, item: dict) -> dict:
        return self._read(step, ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))

    def restore_ema(self, step: int, abstract_ema, model_cfg, *, ignore: tuple[str, ...] = ()):
        """Only the EMA weights of `step` (a partial restore: the optimizer state and params are never read)."""
        self.check_architecture(step, model_cfg, ignore)
        return self._partial(step, {"ema": abstract_ema})["ema"]

    def restore_weights(self, step: int, abstract_params, model_cfg, *, ignore: tuple[str, ...] = ()):
        """(params, EMA) of `step` without the optimizer state; a weights-only checkpoint gives its EMA twice."""
        self.check_architecture(step, model_cfg, ignore)
        if self.weights_only(step):
            ema = self._partial(step, {"ema": abstract_params})["ema"]
            return jax.tree.map(jnp.copy, ema), ema
        out = self._partial(step, {"params": abstract_params, "ema": abstract_params})
        return out["params"], out["ema"]

    def _read(self, step: int, args):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(state=args)).state
        except Exception as e:  # orbax raises many types for truncated or corrupt files
            raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); delete that step folder to fall back to an older one") from e

    def quarantine(self, step: int) -> str:
        """Move step `step` out of the way (to <directory>.corrupt/) so training can go on past it."""
        dest = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        _sync(f"quarantine_{step}")
        self.manager.reload()
        return dest

    def restore_latest(self, abstract_state, model_cfg, *, fallback: bool = True, log=print):
        """→ (step, state) of the newest readable checkpoint, or (None, None) if there is none.

        With `fallback`, an unreadable step is moved aside (`quarantine`) and the next older one is tried; an
        architecture mismatch is never skipped (it means the wrong config, not a damaged file)."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract_state, model_cfg)
            except CheckpointError as e:
                if not fallback or "different architecture" in str(e) or "weights only" in str(e):
                    raise
                dest = self.quarantine(step)
                log(f"warning: {e}\n  moved to {dest}; trying the previous checkpoint")
        return None, None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        # orbax's close() does not wait for the temp-folder cleanup its constructor starts in a thread; a process
        # that exits right after (e.g. on "no checkpoint") then dies with a traceback from that thread.
        cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()
        self.manager.close()


def _step(ckpt: Checkpoints, step: int) -> int:
    """`step`, or the newest for -1; a clear error when the workdir has no such checkpoint."""
    steps = ckpt.steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first (--mode train) or pass the "
                              "--workdir of a trained run")
    step = steps[-1] if step < 0 else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {ckpt.directory}; available: {steps}")
    return step


def stored_model(workdir: str, step: int = -1) -> tuple[int, dict, int | None]:
    """(step, the model config saved with it, when it was committed in ns) of checkpoint `step` (-1 = newest) in
    workdir/checkpoints. The commit time tells a checkpoint from another one of the same step (a run trained
    again); it travels with the files when the workdir is copied. None where Orbax did not record it."""
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = _step(ckpt, step)
        model = ckpt.meta(step).get("model", {})
    finally:
        ckpt.close()
    try:
        with open(os.path.join(ckpt.directory, str(step), "_CHECKPOINT_METADATA")) as f:
            committed = json.load(f).get("commit_timestamp_nsecs")
    except (OSError, ValueError):
        committed = None
    return step, model, committed


def adopt_architecture(config, stored: dict, what: str, *, ignore: tuple[str, ...] = (), log=print):
    """`config` with the architecture of a stored model (`stored`: the model config of a checkpoint or a
    manifest), which is what the weights are; the config keeps its compute settings (RUNTIME_MODEL_FIELDS).
    Where the two differ (fields in `ignore` aside) one line says so and that `what` wins."""
    have, want = model_signature(stored), model_signature(config.model)
    diff = sorted(k for k in set(have) | set(want) if k not in ignore and have.get(k) != want.get(k))
    if not diff:
        return config
    log(f"note: {what} decides the architecture where the config differs: "
        + ", ".join(f"model.{k}={have.get(k)!r} (config: {want.get(k)!r})" for k in diff))
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict({**config.model.to_dict(), **have})
    return out


def load_ema(config, workdir: str, step: int = -1):
    """EMA params of checkpoint `step` (-1 = newest) in workdir/checkpoints, on the first local device, read
    without the optimizer state (2× the model for Adam) → (apply, params, step)."""
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = _step(ckpt, step)
        apply, abstract = train_state.abstract_state(config)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        ema = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract["ema"])
        return apply, ckpt.restore_ema(step, ema, config.model), step
    finally:
        ckpt.close()


def export_orbax(config, workdir: str, out_dir: str, step: int = -1, *, log=print) -> str:
    """Inference checkpoint: the EMA weights of checkpoint `step` (-1 = newest) alone, as an Orbax StandardSave
    tree in out_dir/ema, plus out_dir/model_config.json (the model section of the config). Reads only the EMA
    (partial restore), so the optimizer state is never loaded. Returns out_dir."""
    _, ema, step = load_ema(config, workdir, step)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "ema")):
        raise CheckpointError(f"{out_dir}/ema exists already; choose another output folder")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "ema"), ema)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "model_config.json"), "w") as f:
            json.dump({"step": int(step), "model": config.model.to_dict()}, f, indent=1, sort_keys=True)
    log(f"exported the EMA weights of step {step} to {out_dir}")
    return out_dir


def load_exported(out_dir: str):
    """→ (model config, EMA params) of an `export_orbax` folder."""
    with open(os.path.join(out_dir, "model_config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["model"])
    _, abstract = abstract_model(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(out_dir), "ema"), abstract)
    return cfg, params
