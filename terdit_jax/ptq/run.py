"""`--mode quantize`: a full-precision training checkpoint → <workdir>/quantized/<method>_w<W>a<A>/.

The driver checks the request, takes the architecture from the checkpoint, reads the EMA weights, makes (or
reuses) the calibration set, runs the method's `quantize(job)` and writes the quantized model
(ptq/checkpoint.py). Every stage is timed, with the peak resident host memory while it ran and the device's
peak memory where the backend reports it; all go to the manifest. An interrupted run resumes from
<name>.partial/ (the last `job.save`) when it is started again with the same settings.

SIGTERM stops any stage: the run keeps its last resume point (a save in progress finishes first), says what
it kept, and `run_quantize_mode` returns None (exit code 0, as training does on SIGTERM).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np

from terdit_jax import trees
from terdit_jax.checkpoint import adopt_architecture, load_ema, stored_model
from terdit_jax.ptq import checkpoint as qckpt
from terdit_jax.ptq.calibration import CalibSet, calibration_set, fingerprint_id
from terdit_jax.ptq.methods import method_module
from terdit_jax.ptq.common import QuantizeError, deployed_bytes, values_of

NOT_MEASURED = "not measured"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_peak_bytes():
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else NOT_MEASURED


class Stages:
    """Per named stage: seconds, peak resident host bytes while it ran (sampled every 20 ms) and how far that is
    above the resident bytes when it started (what the stage itself needed, also in a long-lived process), and the
    device's peak bytes so far (XLA keeps one running peak per device; NOT_MEASURED on backends without it, e.g.
    CPU)."""

    def __init__(self, log=print, report: dict | None = None):
        self.report: dict[str, dict] = dict(report or {})  # a resumed run starts from the interrupted run's report
        self.log = log
        self.running: dict[str, float] = {}  # stage → perf_counter at its start
        self.stopped_in: str | None = None  # the innermost stage an exception left

    def snapshot(self) -> dict[str, dict]:
        """The report with the running stages' time so far added (what a resume point keeps, so a resumed run's
        stage times add up to the whole run's)."""
        out = dict(self.report)
        for name, t0 in self.running.items():
            before = out.get(name, {"seconds": 0.0})
            out[name] = {**before, "seconds": round(before["seconds"] + time.perf_counter() - t0, 2)}
        return out

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = _rss()
        peak, stop = [start], threading.Event()

        def sample():
            while not stop.wait(0.02):
                peak[0] = max(peak[0], _rss())
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = self.running[name] = time.perf_counter()
        try:
            yield
        except BaseException:
            self.stopped_in = self.stopped_in or name
            raise
        finally:
            del self.running[name]
            stop.set()
            thread.join()
            top = max(peak[0], _rss())
            now = {"seconds": round(time.perf_counter() - t0, 2), "host_peak_bytes": top,
                   "host_peak_increase_bytes": top - start, "device_peak_bytes": device_peak_bytes()}
            before = self.report.get(name)
            if before:  # the same stage again after a resume: times add up, peaks are the larger
                now = {"seconds": round(before["seconds"] + now["seconds"], 2),
                       **{k: max(v, before[k]) if isinstance(v, int) and isinstance(before.get(k), int) else v
                          for k, v in now.items() if k != "seconds"}}
            self.report[name] = now
            self.log(f"  {name}: {self.report[name]['seconds']:.1f} s, host peak "
                     f"{self.report[name]['host_peak_bytes'] / 2**20:.0f} MiB")


class Preempted(BaseException):
    """SIGTERM arrived during --mode quantize (a BaseException, so no `except Exception` of a method holds it)."""


class StopOnSigterm:
    """While active, SIGTERM raises Preempted in the main thread; inside `deferred()` (a resume point being
    written) it waits until the block ends, so a resume point is never half written."""

    def __init__(self):
        self.depth, self.pending, self.old = 0, False, None

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise Preempted

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending and not self.depth:
            raise Preempted


@dataclasses.dataclass
class Job:
    """What a method's `quantize` gets. fp_values: the FP EMA weights {flat path: host array}; resume: (values,
    progress) of an interrupted run of the same settings, or None; save(model, progress): the resume point."""
    config: object
    fp_cfg: object
    fp_values: dict
    calib: CalibSet
    partial_dir: str
    stage: Stages
    resume: tuple | None
    log: Callable = print
    stop: StopOnSigterm = dataclasses.field(default_factory=StopOnSigterm)

    def save(self, model, progress: dict, values: dict | None = None) -> None:
        """Keep the resume point: `values` (default: every variable of `model`) and `progress`."""
        with self.stop.deferred():
            values = values_of(model) if values is None else values
            qckpt.save_progress(self.partial_dir, values, {"settings": settings_of(self.config),
                                                           "stages": self.stage.snapshot(), **progress})

    @staticmethod
    def estimate(done: list[tuple[str, float]], left: list[str]) -> str:
        """'about 2 min 10 s left' for units of the kinds `left`, each taking as long as the last finished unit
        of its kind (done: (kind, seconds) in order), a kind not run yet as the mean of the finished. Units of
        different kinds differ several-fold (a block against the embedder), so there is no estimate until the
        kind most of the units left are of has run once."""
        last = dict(done)
        common = max(dict.fromkeys(left), key=left.count)
        if common not in last:
            return f"the time left is estimated once a {common} unit has run"
        mean = sum(t for _, t in done) / len(done)
        return f"about {_duration(sum(last.get(k, mean) for k in left))} left"


def _duration(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s" if m else f"{sec} s"


def weights_id(values: dict) -> str:
    """A short hash of the weights themselves (names, shapes, dtypes, bytes): what a calibration set was made
    from, wherever the workdir lies."""
    h = hashlib.sha256()
    for k in sorted(values):
        v = np.ascontiguousarray(values[k])
        h.update(f"{k}:{v.dtype}:{v.shape};".encode())
        h.update(v.tobytes())
    return h.hexdigest()[:16]


def settings_of(config) -> dict:
    """The request a quantized model (and a resume point) belongs to: the quant section and the sampler."""
    s = config.sample
    quant = {k: v for k, v in config.quant.to_dict().items() if v or k != "calib_prompts"}  # older runs lack it
    return json.loads(json.dumps({"quant": quant, "sampler": s.sampler, "num_steps": s.num_steps,
                                  "cfg_channels": s.cfg_channels}))


def check_request(config) -> None:
    """What --mode quantize needs from the config alone."""
    if not config.quant.method:
        raise QuantizeError("config.quant.method is empty; pick one, e.g. --config.quant.method=ptq4dit "
                            "(or rtn) with --config.quant.w_bits / a_bits")
    if config.sample.packed_path or config.sample.quantized:
        raise QuantizeError("config.sample.packed_path / sample.quantized name a deployed model; --mode quantize "
                            "reads the full-precision training checkpoint of --workdir: clear them")


def check_source(config) -> None:
    """The checkpoint (whose architecture `config` has now) must be full precision."""
    linear = config.model.linear
    if linear != "fp":
        raise QuantizeError(f"the checkpoint is a model.linear={linear!r} model: post-training quantization starts "
                            f"from a full-precision model (train with model.linear=fp; a {linear} model deploys "
                            "with --mode export)")


def resume_point(partial: str, config, *, overwrite: bool, log=print):
    """(values, progress) of an interrupted run of these settings, or None. A damaged resume point is set aside
    (said, then started over); one of other settings is kept and refused unless `overwrite`."""
    try:
        resume = qckpt.load_progress(partial)
    except qckpt.QuantizedModelError as e:
        log(f"warning: {e}; starting this model over (the damaged resume point is removed)")
        shutil.rmtree(partial)
        return None
    if resume is not None and resume[1].get("settings") != settings_of(config):
        if not overwrite:
            was, now = resume[1].get("settings") or {}, settings_of(config)
            diff = sorted(f"quant.{k}" for k in set(was.get("quant", {})) | set(now["quant"])
                          if was.get("quant", {}).get(k) != now["quant"].get(k))
            diff += sorted(f"sample.{k}" for k in set(was) | set(now) if k != "quant" and was.get(k) != now.get(k))
            raise QuantizeError(f"{partial} holds an interrupted run with other settings (differs in: "
                                f"{', '.join(diff) or 'its format'}); rerun with those settings to resume it, choose "
                                "another --config.quant.name, or pass --overwrite to discard it")
        log(f"{partial} was made with other settings; discarding it (--overwrite)")
        shutil.rmtree(partial)
        resume = None
    return resume


def run_quantize_mode(config, workdir: str, *, overwrite: bool = False, log=print) -> dict | None:
    """Quantize the EMA weights of workdir's newest checkpoint (or sample.step) with config.quant. Returns the
    manifest of the written model, or None when SIGTERM stopped the run (see the module docstring)."""
    stages = Stages(log)
    with StopOnSigterm() as stop:
        try:
            return _quantize(config, workdir, overwrite, log, stop, stages)
        except Preempted:
            where = f"stage '{stages.stopped_in}'" if stages.stopped_in else "the setup"
            partial = qckpt.model_dir(workdir, qckpt.default_name(config.quant)) + ".partial"
            progress = os.path.join(partial, "progress.json")
            if os.path.exists(progress):
                with open(progress) as f:
                    kept = {k: v for k, v in json.load(f).items() if k not in ("settings", "stages", "units")}
                log(f"SIGTERM: stopped in {where}; the resume point {partial} keeps "
                    f"{', '.join(f'{k}={v}' for k, v in kept.items())}; rerun the same command to resume")
            else:
                log(f"SIGTERM: stopped in {where}, before the first resume point (a finished calibration set is "
                    "kept); rerun the same command to start again")
            return None


def _quantize(config, workdir: str, overwrite: bool, log, stop: StopOnSigterm, stages: Stages) -> dict:
    check_request(config)
    q = config.quant
    name = qckpt.default_name(q)
    out = qckpt.model_dir(workdir, name)
    partial = out + ".partial"
    if os.path.exists(os.path.join(out, qckpt.MANIFEST)) and not overwrite:
        raise qckpt.QuantizedModelError(f"{out} holds a quantized model already; sample it with "
                                        f"--config.sample.quantized={name}, or pass --overwrite to quantize again")
    step, stored, _ = stored_model(workdir, config.sample.step)
    config = adopt_architecture(config, stored, f"checkpoint step {step} in {workdir}", log=log)
    check_source(config)
    resume = resume_point(partial, config, overwrite=overwrite, log=log)
    stages.report.update(resume[1].get("stages", {}) if resume else {})
    apply, ema, step = load_ema(config, workdir, step)
    source = {"workdir": os.path.abspath(workdir), "step": int(step)}
    fp_values = {k: np.asarray(jax.device_get(v)) for k, v in trees.flat(ema).items()}
    with stages("calibration set"):  # keyed by the weights, not the path: a copied workdir reuses its set
        calib = calibration_set(apply, ema, config, {"step": int(step), "weights": weights_id(fp_values)},
                                os.path.dirname(out), log=log)
    del ema
    log(f"quantizing step {step} of {workdir} with {q.method} at W{q.w_bits}A{q.a_bits} → {out}")
    job = Job(config, config.model, fp_values, calib, partial, stages, resume, log, stop)
    result = method_module(q.method).quantize(job)
    model = result["model"]
    with stop.deferred():  # the model is written whole, and its resume point removed, before SIGTERM counts
        manifest = qckpt.write_quantized(out, model, result["model_cfg"], {
            "method": q.method, "settings": settings_of(config), "source": source,
            "calibration": {"id": fingerprint_id(calib.fingerprint), "entries": len(calib),
                            "statistics_entries": int(len(calib.init))},
            "stages": stages.report, "info": result["info"],
            "bits": {"weights": int(q.w_bits), "activations": int(q.a_bits)},
            "deployed_bytes": deployed_bytes(model, int(q.w_bits))}, overwrite=overwrite)
        shutil.rmtree(partial, ignore_errors=True)
    log(f"quantized model: {out}; sample it with --config.sample.quantized={name}")
    return manifest
