"""`--mode quantize`: a full-precision training checkpoint → <workdir>/quantized/<method>_w<W>a<A>/.

The driver checks the request, reads the EMA weights, makes (or reuses) the calibration set, runs the method's
`quantize(job)` and writes the quantized model (quant/checkpoint.py). Every stage is timed, with the peak
resident host memory while it ran and the device's peak memory where the backend reports it; all go to the
manifest. An interrupted run resumes from <name>.partial/ when it is started again with the same settings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from typing import Callable

import jax
import numpy as np

from terdit_jax import trees
from terdit_jax.checkpoint import load_ema
from terdit_jax.quant import checkpoint as qckpt
from terdit_jax.quant.calibration import CalibSet, calibration_set, fingerprint_id
from terdit_jax.quant.methods import method_module
from terdit_jax.quant.ptq import QuantizeError, deployed_bytes, values_of

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

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = _rss()
        peak, stop = [start], threading.Event()

        def sample():
            while not stop.wait(0.02):
                peak[0] = max(peak[0], _rss())
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            top = max(peak[0], _rss())
            now = {"seconds": round(time.perf_counter() - t0, 2), "host_peak_bytes": top,
                   "host_peak_increase_bytes": top - start, "device_peak_bytes": device_peak_bytes()}
            before = self.report.get(name)
            if before:  # the same stage again after a resume: times add up, peaks are the larger
                now = {"seconds": round(before["seconds"] + now["seconds"], 2),
                       **{k: max(v, before[k]) if isinstance(v, int) and isinstance(before[k], int) else v
                          for k, v in now.items() if k != "seconds"}}
            self.report[name] = now
            self.log(f"  {name}: {self.report[name]['seconds']:.1f} s, host peak "
                     f"{self.report[name]['host_peak_bytes'] / 2**20:.0f} MiB")


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

    def save(self, model, progress: dict) -> None:
        qckpt.save_progress(self.partial_dir, values_of(model), {"settings": settings_of(self.config),
                                                                 "stages": self.stage.report, **progress})


def settings_of(config) -> dict:
    """The request a quantized model (and a resume point) belongs to: the quant section and the sampler."""
    s = config.sample
    return json.loads(json.dumps({"quant": config.quant.to_dict(), "sampler": s.sampler, "num_steps": s.num_steps,
                                  "cfg_channels": s.cfg_channels}))


def check_request(config) -> None:
    q, m = config.quant, config.model
    if not q.method:
        raise QuantizeError("config.quant.method is empty; pick one, e.g. --config.quant.method=ptq4dit "
                            "(or rtn) with --config.quant.w_bits / a_bits")
    if m.linear != "fp":
        raise QuantizeError(f"config.model.linear={m.linear!r}: post-training quantization starts from a "
                            f"full-precision model, and this one is {m.linear} already (train with model.linear=fp; "
                            "a ternary model deploys with --mode export)")
    if config.sample.packed_path or config.sample.quantized:
        raise QuantizeError("config.sample.packed_path / sample.quantized name a deployed model; --mode quantize "
                            "reads the full-precision training checkpoint of --workdir: clear them")


def run_quantize_mode(config, workdir: str, *, overwrite: bool = False, log=print) -> dict:
    """Quantize the EMA weights of workdir's newest checkpoint (or sample.step) with config.quant. Returns the
    manifest of the written model."""
    check_request(config)
    q = config.quant
    name = qckpt.default_name(q)
    out = qckpt.model_dir(workdir, name)
    partial = out + ".partial"
    if os.path.exists(os.path.join(out, qckpt.MANIFEST)) and not overwrite:
        raise qckpt.QuantizedModelError(f"{out} holds a quantized model already; sample it with "
                                        f"--config.sample.quantized={name}, or pass --overwrite to quantize again")
    resume = qckpt.load_progress(partial)
    if resume is not None and resume[1].get("settings") != settings_of(config):
        log(f"{partial} was made with other settings; starting over")
        shutil.rmtree(partial)
        resume = None
    stages = Stages(log, resume[1].get("stages") if resume else None)
    apply, ema, step = load_ema(config, workdir, config.sample.step)
    source = {"workdir": os.path.abspath(workdir), "step": int(step)}
    fp_values = {k: np.asarray(jax.device_get(v)) for k, v in trees.flat(ema).items()}
    with stages("calibration set"):
        calib = calibration_set(apply, ema, config, source, os.path.dirname(out), log=log)
    del ema
    log(f"quantizing step {step} of {workdir} with {q.method} at W{q.w_bits}A{q.a_bits} → {out}")
    job = Job(config, config.model, fp_values, calib, partial, stages, resume, log)
    result = method_module(q.method).quantize(job)
    model = result["model"]
    manifest = qckpt.write_quantized(out, model, result["model_cfg"], {
        "method": q.method, "settings": settings_of(config), "source": source,
        "calibration": {"id": fingerprint_id(calib.fingerprint), "entries": len(calib),
                        "statistics_entries": int(len(calib.init))},
        "stages": stages.report, "info": result["info"], "bits": {"weights": int(q.w_bits), "activations": int(q.a_bits)},
        "deployed_bytes": deployed_bytes(model, int(q.w_bits))}, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"quantized model: {out}; sample it with --config.sample.quantized={name}")
    return manifest
