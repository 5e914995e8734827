"""Orbax checkpoints of the train state, with the model config stored beside it so that a checkpoint
from a different architecture is refused with a clear message instead of a shape error."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which one and what to do."""


def _model_signature(model_cfg) -> dict:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    # dtype and alpha_init do not change the parameter tree; everything else does (or changes its meaning).
    return {k: v for k, v in sorted(d.items()) if k not in ("dtype", "alpha_init")}


class Checkpoints:
    """workdir/checkpoints: keep the newest `keep` steps plus every `keep_every`-th; saves are asynchronous."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, model_cfg, extra: dict | None = None) -> bool:
        """Save `state` (a pytree) at `step` unless that step exists already; refuses non-finite params."""
        if step in self.manager.all_steps():
            return False
        finite = jax.tree_util.tree_reduce(lambda a, x: a and bool(np.isfinite(np.asarray(x)).all()),
                                           state["params"], True)
        if not finite:
            raise CheckpointError(f"refusing to save step {step}: the parameters contain NaN/inf "
                                  f"(the previous checkpoints in {self.directory} are kept)")
        meta = {"model": _model_signature(model_cfg), "step": int(step), **(extra or {})}
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

    def restore(self, step: int, abstract_state, model_cfg):
        """Restore `step` onto the structure (and shardings) of `abstract_state`; checks the architecture first."""
        saved = self.meta(step).get("model", {})
        want = _model_signature(model_cfg)
        diff = {k: (saved.get(k), want.get(k)) for k in set(saved) | set(want) if saved.get(k) != want.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is a different architecture "
                                  f"({lines}); use the config it was trained with or another --workdir")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # orbax raises many types for truncated or corrupt files
            raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); delete that step folder to fall back to an older one") from e
        return out.state

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
