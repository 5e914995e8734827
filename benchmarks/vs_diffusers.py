"""Side by side with what users would run instead: our DiT, DDIM sampler, training step and SD-VAE against
diffusers' (PyTorch) on the same machine, in one process, as ratios ours / theirs.

    python benchmarks/vs_diffusers.py            # the README table (6 min on the 2-core Xeon VM, 13 on the EPYC)
    python benchmarks/vs_diffusers.py --quick    # a tiny preset of every row: seconds
    python benchmarks/vs_diffusers.py --rows dit_cfg,vae --repeats 3
    python benchmarks/vs_diffusers.py --memory   # and each row's peak memory, each side alone in a fresh process

Rows (float32 everywhere):
  dit_cfg  one classifier-free-guided denoiser call of DiT-XL/2 at 256 px (32×32×4 latents), 8 images (16 model
           rows with the null half): ours the jitted XLA call, theirs diffusers' DiTTransformer2DModel in eager
           mode and under torch.compile (where it compiles)
  ddim     a whole DDIM sample (50 steps, guidance 4 on every ε channel, η = 0) of 8 images: ours
           terdit_jax.diffusion.samplers.sample, theirs DiTPipeline's loop (DDIMScheduler, the doubled batch)
  train    one training step of DiT-B/2 on 32×32×4 latents, batch 8: the ε-MSE loss at given (x_t, t, y, ε),
           backward, AdamW update; ours jitted with the state donated (optax), theirs torch.optim.AdamW
  vae      the SD-VAE (sd-vae-ft-ema shapes) decode of 8 latents of 32×32×4 to 256×256 images
  gemm     the three float32 matmuls of one linear in the train row (forward, input and weight gradients of
           DiT-B/2's fc1 on 2,048 tokens): the kernels under every row, ours XLA's dots, theirs torch's matmul

Both sides get one set of random weights: the DiT's in the official checkpoint layout, imported into ours by
convert/dit_official.py's `convert_state` and into diffusers by its `diffusers_layout`; the VAE's drawn in diffusers
and imported by vae/convert.py. Before anything is timed each row checks that both sides compute the same thing:
max |ours − theirs| / max |theirs| ≤ 1e-4 (`agree`, which raises otherwise), on the outputs (dit_cfg, vae), on a
short sample from the same x_T (ddim; the timed samples are compared afterwards too), on the loss and the
gradients of one step (train).

Timing: after one untimed call each (the checking one; for ours it follows the compile, for torch.compile it is
the compile), the variants of a row run alternately, the order rotated every repeat, and the median of each is
reported with ratio = median ours / median theirs. Compile time is reported on its own (a user pays it once per
shape). Both sides use the same threads: the process is pinned to --threads cores (default all) and torch is told
that many. Memory: the resident set's rise above its level before each call, its peak sampled every 2 ms in a
thread (both sides, the largest over the timed calls), the process's peak resident set, and for ours XLA's
compiled memory (arguments + temporaries + outputs − aliased, from the AOT compiled `memory_analysis`). The rise
within one process favours torch, whose freed buffers stay in the allocator from the untimed call while XLA's
large temporaries go back to the kernel after each; --memory therefore also runs every row once more per side,
alone in a fresh process (--side), and reports the kernel's resident high-water mark from the moment the weights
are in place (building them from the shared random draw has transients a checkpoint loader would not: they are
finished, collected and the freed heap handed back first, `weights_in_place`) over compiling, the checking call
and one timed call, less the process's resident set after importing its libraries and running one small matmul
(`preimport`, `memory_child`): the memory a user of that side needs for the row, weights included. Both sides
run with terdit_jax's allocator setting (one malloc arena per core: the script imports terdit_jax first).

Prints one JSON object. Needs the test extra (torch, diffusers); the package itself never imports torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import threading
import time

import numpy as np

# The repo root last, not first: its kernels/ folder (installed as terdit_kernels) would otherwise shadow the Hugging
# Face `kernels` package that transformers, and diffusers through it, import.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import terdit_jax  # noqa: E402,F401  (first: opt-in XLA settings, TERDIT_CPU_EIGEN=1, apply before JAX starts)

TOL = 1e-4  # max |ours − theirs| / max |theirs| before anything is timed
NOT_MEASURED = "not measured"


@dataclasses.dataclass(frozen=True)
class Preset:
    """The shapes of every row."""
    dit: str                 # preset of dit_cfg ("custom" = the tiny model below)
    ddim_dit: str            # preset of the ddim row
    train_dit: str           # preset of the train row
    latent: int              # latent side (32 = 256 px)
    classes: int
    batch: int               # images per row
    ddim_steps: int
    check_steps: int         # steps of the sample compared before timing
    vae: dict                # diffusers AutoencoderKL kwargs
    repeats: dict            # timed repeats per row


SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=256)
TINY_VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY_DIT = dict(dim=64, n_layers=2, n_heads=4, patch_size=2)
# The default keeps the 2-core VM run under 15 minutes: DiT-XL/2 CFG at batch 8 is ~3.8 TFLOP a call (~30 s here)
# and the VAE decode of 8 images ~2.5 TFLOP, so those rows are timed once after their untimed checking call, the
# train step twice; the whole 50-step sample runs DiT-S/2 (DiT-B/2 with guidance would take ~12 min a side here;
# --ddim_model DiT-B/2 runs it, as the GPU suite does). --repeats N times every row N times.
PRESETS = {
    "default": Preset("DiT-XL/2", "DiT-S/2", "DiT-B/2", 32, 1000, 8, 50, 2, SD_VAE,
                      {"dit_cfg": 1, "ddim": 1, "train": 2, "vae": 1, "gemm": 10}),
    "quick": Preset("custom", "custom", "custom", 8, 10, 2, 5, 2, TINY_VAE,
                    {"dit_cfg": 3, "ddim": 3, "train": 3, "vae": 3, "gemm": 3}),
}
ROWS = ("dit_cfg", "ddim", "train", "vae", "gemm")
CFG_SCALE = 4.0  # DiTPipeline's default guidance


class AgreementError(AssertionError):
    """The two sides computed different things; nothing may be timed."""


def agree(name: str, ours, theirs, tol: float = TOL) -> float:
    """max |ours − theirs| / max |theirs| over same-shaped arrays; raises AgreementError above `tol` (or if theirs
    is all zeros, which would make any comparison vacuous)."""
    import numpy as np
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise AgreementError(f"{name}: shapes differ, ours {ours.shape} vs theirs {theirs.shape}")
    scale = float(np.abs(theirs).max())
    err = float(np.abs(ours - theirs).max()) / scale if scale > 0 else math.inf
    if not err <= tol:
        raise AgreementError(f"{name}: ours and diffusers differ by {err:.3g} (max |Δ| / max |theirs|, "
                             f"max |theirs| {scale:.3g}) > {tol:g}; the timings would compare different computations")
    return err


# ----------------------------------------------------------------------------- memory and timing

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process's resident set (VmHWM, Linux ≥ 4.0: writing 5 to
    /proc/self/clear_refs) → the resident bytes now, which a later `high_water_bytes` starts from."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def weights_in_place(*trees) -> None:
    """--side: the row's peak starts once its weights are built. Building has transients a checkpoint loader would
    not (the shared random draw, the layout conversions), so wait for JAX's asynchronous host copies (their NumPy
    sources live until they finish), collect the garbage, hand the allocator's free pages back to the kernel
    (glibc keeps freed heap resident: `malloc_trim`), and only then reset the high-water mark. Both sides alike."""
    import gc

    import jax
    from terdit_jax.host_memory import LIBC
    jax.block_until_ready(trees)
    gc.collect()
    if LIBC is not None:  # not glibc: nothing to hand back this way
        LIBC.malloc_trim(0)
    reset_peak_rss()


def high_water_bytes() -> int:
    """VmHWM: the largest resident set since the process started or `reset_peak_rss` (kernel-kept, every page)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class RSSPeak:
    """Samples the resident set every 2 ms while open: `.rise` = peak − level at entry (bytes)."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.rise = self.peak - self.base


def alternate(variants: dict, repeats: int) -> dict:
    """variants: name → zero-argument callable that runs to completion. Runs each `repeats` times, alternating,
    the order rotated each repeat. → name → {median_s, times_s, rss_rise_bytes (max over the calls)}."""
    names, out = list(variants), {n: {"times_s": [], "rss_rise_bytes": 0} for n in variants}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            with RSSPeak() as m:
                t0 = time.perf_counter()
                variants[n]()
                dt = time.perf_counter() - t0
            out[n]["times_s"].append(round(dt, 4))
            out[n]["rss_rise_bytes"] = max(out[n]["rss_rise_bytes"], m.rise)
    for v in out.values():
        v["median_s"] = statistics.median(v["times_s"])
    return out


def timed(fn):
    """(fn(), seconds, RSS rise during it)."""
    with RSSPeak() as m:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, round(dt, 3), m.rise


def compiled_memory(compiled) -> dict:
    """XLA's memory_analysis of an AOT-compiled program, in bytes."""
    m = compiled.memory_analysis()
    d = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    d["total"] = d["argument"] + d["output"] + d["temp"] - d["alias"]
    return d


def ratios(times: dict, ours: str = "ours") -> dict:
    # four significant digits: a fixed number of decimals loses a small ratio's precision (the --quick rows)
    return {f"{ours}/{n}": float(f"{times[ours]['median_s'] / v['median_s']:.4g}") for n, v in times.items() if n != ours}


# ----------------------------------------------------------------------------- one set of DiT weights

def dit_config(preset: str, latent: int, classes: int):
    """A finalized config of the "dit" family: `preset` ("custom" = TINY_DIT) on latent×latent×4 inputs."""
    from terdit_jax.config import finalize
    from terdit_jax.configs import dit_xl2_256
    c = dit_xl2_256.get_config()
    c.model.update(name=preset, num_classes=classes, dtype="float32", **(TINY_DIT if preset == "custom" else {}))
    c.data.image_size = 8 * latent
    return finalize(c)


def official_state_dict(m, seed: int = 0) -> dict:
    """Random float32 weights with the keys and shapes of an official DiT checkpoint (shared/reference/dit_xl.md §3),
    scaled so activations and every adaLN gate stay O(1) through the depth (nothing is zero, unlike a fresh init)."""
    import numpy as np
    from terdit_jax.models import dit_xl
    rng = np.random.default_rng(seed)
    d, p, c, f = m.dim, m.patch_size, m.in_channels, dit_xl.mlp_hidden_dim(m)
    draw = lambda shape, std: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))  # noqa: E731
    g = m.input_size // p
    sd = {"pos_embed": np.asarray(dit_xl.pos_embed(d, g, g))[None],
          "x_embedder.proj.weight": draw((d, c, p, p), 1 / math.sqrt(c * p * p)), "x_embedder.proj.bias": draw(d, .1),
          "y_embedder.embedding_table.weight": draw((m.num_classes + 1, d), 1.0)}

    def linear(name, out_f, in_f, std=None):
        sd[name + ".weight"], sd[name + ".bias"] = draw((out_f, in_f), std or 1 / math.sqrt(in_f)), draw(out_f, .1)

    linear("t_embedder.mlp.0", d, 256, 0.1)
    linear("t_embedder.mlp.2", d, d)
    for i in range(m.n_layers):
        linear(f"blocks.{i}.attn.qkv", 3 * d, d)
        linear(f"blocks.{i}.attn.proj", d, d)
        linear(f"blocks.{i}.mlp.fc1", f, d)
        linear(f"blocks.{i}.mlp.fc2", d, f)
        # gates of O(1/sqrt(depth)) keep the residual stream O(1) over 28 blocks
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * d, d, 0.3 / math.sqrt(d * m.n_layers))
    linear("final_layer.adaLN_modulation.1", 2 * d, d, 0.3 / math.sqrt(d))
    linear("final_layer.linear", p * p * m.out_channels, d)
    return sd


def build_dit(preset: str, p: Preset, a, seed: int = 0):
    """(config, apply, our params or None, the diffusers model or None) holding one set of random weights, theirs
    on a.dev (None without a.dev), ours unless a.side == "theirs"; a.perturb > 0 moves our copy of blocks.0's qkv
    weight (the test of a check that can fail)."""
    from terdit_jax.convert.dit_official import convert_state, diffusers_layout
    from terdit_jax.model_fn import abstract_model

    config = dit_config(preset, p.latent, p.classes)
    m = config.model
    sd = official_state_dict(m, seed)
    theirs = None
    if a.dev:
        import torch
        from diffusers import DiTTransformer2DModel
        theirs = DiTTransformer2DModel(num_attention_heads=m.n_heads, attention_head_dim=m.dim // m.n_heads,
                                       in_channels=m.in_channels, out_channels=m.out_channels, num_layers=m.n_layers,
                                       sample_size=m.input_size, patch_size=m.patch_size, attention_bias=True,
                                       activation_fn="gelu-approximate", num_embeds_ada_norm=m.num_classes,
                                       norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6).eval()
        theirs.load_state_dict({k: torch.from_numpy(v) for k, v in diffusers_layout(sd, m.n_layers).items()},
                               strict=True)
        for block in theirs.transformer_blocks:  # the original's /half timestep frequencies (dit_xl.md §4 item 1)
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        theirs = theirs.to(a.dev)
    if a.perturb:
        w = sd["blocks.0.attn.qkv.weight"]
        sd["blocks.0.attn.qkv.weight"] = w + np.float32(a.perturb) * np.abs(w).max()
    params = None if a.side == "theirs" else convert_state(sd, m)
    del sd
    if a.side:
        weights_in_place(params)
    return config, abstract_model(m)[0], params, theirs


# ----------------------------------------------------------------------------- the rows

def _inputs(p: Preset, m, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((p.batch, p.latent, p.latent, m.in_channels), dtype=np.float32)
    t = rng.integers(0, 1000, p.batch).astype(np.int32)
    y = rng.integers(0, m.num_classes, p.batch).astype(np.int32)
    return x, t, y


def to_torch(a, v, nhwc_to_nchw: bool = False):
    import torch
    v = np.ascontiguousarray(np.asarray(v).transpose(0, 3, 1, 2)) if nhwc_to_nchw else np.asarray(v)
    v = torch.from_numpy(v)
    return (v.long() if v.dtype == torch.int32 else v).to(a.dev)


def nhwc(t):
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def torch_run(a, fn):
    """fn wrapped to run without autograd and to return only once the device has finished."""
    import torch

    def run():
        with torch.no_grad():
            out = fn()
        if a.dev == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def torch_cfg_call(model, x, t, y, null: int, scale: float):
    """diffusers DiT on [x; x] with labels [y; null], ε guided on every channel, the conditional half (NCHW)."""
    import torch
    out = model(torch.cat([x, x]), timestep=torch.cat([t, t]),
                class_labels=torch.cat([y, torch.full_like(y, null)])).sample
    c = x.shape[1]
    cond, uncond = out[: len(x)], out[len(x):]
    return torch.cat([uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], 1)


def _finish(a, what: str, err: dict, compile_info: dict, variants: dict, repeats: int, compiled=None) -> dict:
    """Time the variants alternately and assemble the row."""
    times = alternate(variants, repeats)
    why = f"{NOT_MEASURED}: {a.why_not}" if not a.dev else f"{NOT_MEASURED}: --side {a.side}" if a.side else None
    row = {"what": what, "max_rel_err": why or err, "compile": compile_info, "times": times,
           "ratio": why or ratios(times)}
    if compiled is not None:
        row["memory"] = {"ours_compiled": compiled_memory(compiled)}
    return row


def row_dit_cfg(p: Preset, a) -> dict:
    import jax
    import jax.numpy as jnp
    from terdit_jax.diffusion.samplers import cfg_model_fn
    from terdit_jax.model_fn import bind

    config, apply, params, theirs = build_dit(p.dit, p, a)
    m = config.model
    x, t, y = _inputs(p, m)
    ours, info, variants, err = None, {}, {}, {}
    if params is not None:
        fn = cfg_model_fn(bind(apply, params), CFG_SCALE, m.num_classes, guidance_channels=None)
        args = (fn, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
        t0 = time.perf_counter()
        ours = jax.jit(lambda f, x, t, y: f(x, t, y)).lower(*args).compile()
        info["ours_s"] = round(time.perf_counter() - t0, 2)
        ours_out, info["ours_first_call_s"], _ = timed(lambda: jax.block_until_ready(ours(*args)))
        variants["ours"] = lambda: jax.block_until_ready(ours(*args))
    if theirs is not None:
        import torch
        tx, tt, ty = to_torch(a, x, True), to_torch(a, t), to_torch(a, y)
        models = {"torch_eager": theirs}
        if a.torch_compile:
            models["torch_compile"] = torch.compile(theirs)
        for name, model in models.items():
            run = torch_run(a, lambda model=model: torch_cfg_call(model, tx, tt, ty, m.num_classes, CFG_SCALE))
            try:
                out, info[f"{name}_first_call_s"], _ = timed(run)  # torch.compile compiles here
            except Exception as e:  # noqa: BLE001 - torch.compile "where it works": record why it did not
                if name == "torch_eager":
                    raise
                info[name] = f"{NOT_MEASURED}: {type(e).__name__}: {str(e)[:200]}"
                continue
            if ours is not None:
                err[name] = agree(f"dit_cfg ({name})", np.asarray(ours_out), nhwc(out))
            variants[name] = run
    return _finish(a, f"{p.dit} CFG denoiser call, {p.batch} images ({2 * p.batch} model rows), "
                      f"{p.latent}x{p.latent}x4 latents, float32", err, info, variants, p.repeats["dit_cfg"], ours)


def row_ddim(p: Preset, a) -> dict:
    import jax
    import jax.numpy as jnp
    from terdit_jax.diffusion import samplers
    from terdit_jax.diffusion.gaussian import create_diffusion
    from terdit_jax.model_fn import bind

    name = a.ddim_model or p.ddim_dit
    config, apply, params, theirs = build_dit(name, p, a, seed=2)
    m = config.model
    x_T, _, y = _inputs(p, m, seed=3)
    model_fn = bind(apply, params)

    def ours(steps: int):
        out = samplers.sample(model_fn, create_diffusion(f"ddim{steps}"), x_T.shape, jax.random.key(0),
                              jnp.asarray(y), sampler="ddim", cfg_scale=CFG_SCALE, null_y=m.num_classes,
                              guidance_channels=None, x_T=jnp.asarray(x_T))
        return np.asarray(jax.block_until_ready(out))

    def theirs_sample(steps: int):
        """DiTPipeline.__call__'s loop (diffusers 0.42) from the given latents, without the VAE decode."""
        import torch
        from diffusers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
        sched.set_timesteps(steps)
        c = m.in_channels
        lat, labels = to_torch(a, x_T, True), to_torch(a, y)
        labels = torch.cat([labels, torch.full_like(labels, m.num_classes)])
        lat = torch.cat([lat, lat])
        for t in sched.timesteps:
            half = lat[: len(lat) // 2]
            inp = sched.scale_model_input(torch.cat([half, half]), t)
            noise = theirs(inp, timestep=t[None].expand(len(inp)).to(a.dev), class_labels=labels).sample
            eps, rest = noise[:, :c], noise[:, c:]
            cond, uncond = torch.split(eps, len(eps) // 2)
            half_eps = uncond + CFG_SCALE * (cond - uncond)
            noise = torch.cat([torch.cat([half_eps, half_eps]), rest], 1)
            lat = sched.step(noise[:, :c], t, lat).prev_sample
        return nhwc(lat[: len(lat) // 2])

    check, info, outs, variants, err = p.check_steps, {}, {}, {}, {}
    if params is not None:  # the first sample compiles the one step program
        got, info[f"ours_first_{check}_step_sample_s"], _ = timed(lambda: ours(check))
        variants["ours"] = lambda: outs.__setitem__("ours", ours(p.ddim_steps))
    if theirs is not None:
        first = torch_run(a, lambda: theirs_sample(check))()
        if params is not None:
            err[f"{check}_steps"] = agree(f"ddim {check} steps", got, first)
        variants["torch_eager"] = torch_run(a, lambda: outs.__setitem__("theirs", theirs_sample(p.ddim_steps)))
    row = _finish(a, f"{name} DDIM {p.ddim_steps} steps, {p.batch} images, guidance {CFG_SCALE} (model batch "
                     f"{2 * p.batch}), eta 0, float32", err, info, variants, p.repeats["ddim"])
    if len(outs) == 2:  # the timed samples too
        err[f"{p.ddim_steps}_steps"] = agree(f"ddim {p.ddim_steps} steps", outs["ours"], outs["theirs"])
    return row


LR, WD = 1e-4, 0.0  # DiT's AdamW settings


def train_problem(p: Preset, a):
    """The train row's problem: (config, apply, params, theirs, (x, t, y, eps) NumPy, loss_fn, step, tx), with
    loss_fn(params, x, t, y, eps) the ε-MSE and step(params, opt, x, t, y, eps) → (params, opt, loss) one AdamW
    step (benchmarks/cpu_eigen.py times the same step)."""
    import jax
    import jax.numpy as jnp
    import optax

    config, apply, params, theirs = build_dit(p.train_dit, p, a, seed=4)
    m = config.model
    x, t, y = _inputs(p, m, seed=5)
    eps = np.random.default_rng(6).standard_normal(x.shape, dtype=np.float32)
    tx = optax.adamw(LR, weight_decay=WD)

    def loss_fn(params, x, t, y, eps):
        return jnp.mean(jnp.square(apply(params, x, t, y)[..., :m.in_channels] - eps))

    def step(params, opt, x, t, y, eps):
        loss, g = jax.value_and_grad(loss_fn)(params, x, t, y, eps)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    return config, apply, params, theirs, (x, t, y, eps), loss_fn, step, tx


def row_train(p: Preset, a) -> dict:
    import jax
    import jax.numpy as jnp

    config, _, params, theirs, (x, t, y, eps), loss_fn, step, tx = train_problem(p, a)
    m = config.model
    ours_step, info, err = None, {}, {}
    if params is not None:
        batch = tuple(jnp.asarray(v) for v in (x, t, y, eps))
        state = [params, tx.init(params)]
        t0 = time.perf_counter()
        ours_step = jax.jit(step, donate_argnums=(0, 1)).lower(*state, *batch).compile()
        info["ours_s"] = round(time.perf_counter() - t0, 2)

    if theirs is not None:
        import torch
        theirs.train()
        for block in theirs.transformer_blocks:  # no label dropout on either side: the same labels, the same loss
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        opt = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WD)
        tb = (to_torch(a, x, True), to_torch(a, t), to_torch(a, y), to_torch(a, eps, True))

        def theirs_loss():
            out = theirs(tb[0], timestep=tb[1], class_labels=tb[2]).sample
            return torch.mean(torch.square(out[:, :m.in_channels] - tb[3]))

        if ours_step is not None:  # the check: the loss and the qkv, fc1, adaLN gradients of block 0 and the
            # final layer's, before any update
            loss, g = jax.jit(jax.value_and_grad(loss_fn))(state[0], *batch)
            ref = theirs_loss()
            ref.backward()
            tb0, b0 = theirs.transformer_blocks[0], g["blocks"][0]
            grads = {"qkv": (b0["attn"]["qkv"]["kernel"][...],
                             torch.cat([getattr(tb0.attn1, n).weight.grad for n in ("to_q", "to_k", "to_v")]).T),
                     "fc1": (b0["mlp"]["fc1"]["kernel"][...], tb0.ff.net[0].proj.weight.grad.T),
                     "adaLN": (b0["adaLN_modulation"]["kernel"][...], tb0.norm1.linear.weight.grad.T),
                     "final": (g["final_layer"]["linear"]["kernel"][...], theirs.proj_out_2.weight.grad.T)}
            err["loss"] = agree("train loss", float(loss), ref.item())
            err.update({f"grad_{k}": agree(f"train grad {k}", np.asarray(o), r.cpu().numpy())
                        for k, (o, r) in grads.items()})
            opt.zero_grad(set_to_none=True)
            del g, grads

        def theirs_run():
            loss = theirs_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()  # waits for the device

    def ours_run():
        state[0], state[1], loss = ours_step(*state, *batch)
        return float(loss)

    variants = {}
    if ours_step is not None:
        _, info["ours_first_step_s"], _ = timed(ours_run)
        variants["ours"] = ours_run
    if theirs is not None:
        _, info["torch_eager_first_step_s"], _ = timed(theirs_run)  # AdamW allocates its moments here
        variants["torch_eager"] = theirs_run
    return _finish(a, f"{p.train_dit} training step (eps-MSE, AdamW lr {LR}), batch {p.batch}, "
                      f"{p.latent}x{p.latent}x4 latents, float32", err, info, variants, p.repeats["train"], ours_step)


def row_vae(p: Preset, a) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig
    from terdit_jax.vae.convert import convert_state_dict

    cfg = VAEConfig(**{k: v for k, v in p.vae.items() if k in ("block_out_channels", "layers_per_block",
                                                               "latent_channels", "norm_num_groups", "sample_size")})
    theirs, ours_model = None, None
    if a.dev:
        import torch
        from diffusers import AutoencoderKL as TorchVAE
        torch.manual_seed(7)
        theirs = TorchVAE(**p.vae).eval()
        with torch.no_grad():  # non-trivial norms and biases, so a wrong layout or a skipped op shows up
            for name, w in theirs.named_parameters():
                w.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(w.shape) if w.ndim == 1
                        else torch.randn(w.shape) / w[0].numel() ** 0.5)
        if a.side != "theirs":
            sd = {k: v.numpy().copy() for k, v in theirs.state_dict().items()}
            if a.perturb:
                k = "decoder.conv_in.weight"
                sd[k] = sd[k] + np.float32(a.perturb) * np.abs(sd[k]).max()
            ours_model = convert_state_dict(sd, cfg)
            del sd
        theirs = theirs.to(a.dev)
    else:  # random weights of ours alone: the times do not depend on the values
        ours_model = AutoencoderKL(cfg, rngs=nnx.Rngs(7))
    if a.side:
        weights_in_place(None if ours_model is None else nnx.state(ours_model))
    z = np.random.default_rng(8).standard_normal((p.batch, p.latent, p.latent, 4), dtype=np.float32)
    ours, info, err, variants = None, {}, {}, {}
    if ours_model is not None:
        graphdef, state = nnx.split(ours_model)
        zj = jnp.asarray(z)
        t0 = time.perf_counter()
        ours = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, zj).compile()
        info["ours_s"] = round(time.perf_counter() - t0, 2)
        out, info["ours_first_call_s"], _ = timed(lambda: jax.block_until_ready(ours(state, zj)))
        variants["ours"] = lambda: jax.block_until_ready(ours(state, zj))
    if theirs is not None:
        zt = to_torch(a, z, True)
        eager = torch_run(a, lambda: theirs.decode(zt).sample)
        ref, info["torch_eager_first_call_s"], _ = timed(eager)
        if ours is not None:
            err["decode"] = agree("vae decode", np.asarray(out), nhwc(ref))
        variants["torch_eager"] = eager
    side = p.latent * cfg.downsample_factor
    return _finish(a, f"AutoencoderKL {tuple(cfg.block_out_channels)} decode, {p.batch} latents "
                      f"{p.latent}x{p.latent}x4 -> {side}x{side}x3, float32", err, info, variants,
                   p.repeats["vae"], ours)


def row_gemm(p: Preset, a) -> dict:
    """The three matmuls of one linear in a training step, the kernels under every other row: forward x·W, input
    gradient G·Wᵀ, weight gradient xᵀ·G, for DiT-B/2's MLP fc1 at the train row's batch (B·T tokens, D → 4D), run
    one after the other. Ours: XLA's compiled dots (as the project compiles them); theirs: torch's matmul."""
    import jax
    import jax.numpy as jnp
    from terdit_jax.models import dit_xl
    m = dit_config(p.train_dit, p.latent, p.classes).model
    tokens, d, f = p.batch * (p.latent // m.patch_size) ** 2, m.dim, dit_xl.mlp_hidden_dim(m)
    rng = np.random.default_rng(9)
    host = {k: rng.standard_normal(s, dtype=np.float32) for k, s in (("x", (tokens, d)), ("w", (d, f)),
                                                                      ("g", (tokens, f)))}
    products = {"forward": (((1,), (0,)), "x", "w"), "grad_input": (((1,), (1,)), "g", "w"),
                "grad_weight": (((0,), (0,)), "x", "g")}
    ours, variants, err = [], {}, {}
    if a.side != "theirs":  # one copy of each operand a side (torch shares NumPy's): alone, ours drops NumPy's
        dev = {k: jnp.asarray(v) for k, v in host.items()}
        host = None if a.side == "ours" else host
    if a.side:  # the operands are this row's weights (and NumPy's copies a transient of building them)
        weights_in_place(dev if host is None else host)
    for contract, lhs, rhs in products.values() if a.side != "theirs" else ():
        args = (dev[lhs], dev[rhs])
        fn = jax.jit(lambda l, r, c=contract: jax.lax.dot_general(l, r, (c, ((), ()))))
        ours.append((fn.lower(*args).compile(), args))
    run_ours = lambda: [jax.block_until_ready(c(*args)) for c, args in ours]  # noqa: E731
    if ours:
        variants["ours"] = run_ours
    if a.dev:
        pairs = []
        for contract, lhs, rhs in products.values():
            tl, tr = to_torch(a, host[lhs]), to_torch(a, host[rhs])
            pairs.append((tl.T if contract[0] == (0,) else tl, tr.T if contract[1] == (1,) else tr))
        run_theirs = torch_run(a, lambda: [tl @ tr for tl, tr in pairs])
        err = {n: agree(f"gemm {n}", np.asarray(o), t.cpu().numpy())
               for n, o, t in zip(products, run_ours(), run_theirs())}
        variants["torch_eager"] = run_theirs
    row = _finish(a, f"{p.train_dit} fc1 matmuls (forward, input and weight gradients): {tokens} tokens, {d} -> "
                     f"{f}, float32", err, {}, variants, p.repeats["gemm"])
    flops = 3 * 2 * tokens * d * f
    row["gflop_per_s"] = {k: round(flops / v["median_s"] / 1e9, 1) for k, v in row["times"].items()}
    return row


ROW_FNS = {"dit_cfg": row_dit_cfg, "ddim": row_ddim, "train": row_train, "vae": row_vae, "gemm": row_gemm}


# ----------------------------------------------------------------------------- main

def theirs_device(platform: str) -> tuple[str | None, str | None, dict]:
    """(torch device for diffusers' side or None, why not, versions): the CPU with a CPU run, CUDA with a GPU
    run when torch has it; otherwise ours runs alone and every comparison is "not measured"."""
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        return None, f"no torch/diffusers ({e})", {}
    if platform == "cpu":
        return "cpu", None, {}
    if platform == "gpu" and torch.cuda.is_available():
        return "cuda", None, {}
    return None, "no CUDA torch" if platform == "gpu" else f"torch has no {platform} device", \
        {"torch": torch.__version__}


def pin_threads(n: int) -> list[int]:
    """Pin this process (and the threads XLA and torch start later) to n cores."""
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(cores):
        raise SystemExit(f"error: --threads {n}: this process may use {len(cores)} cores; pass 1..{len(cores)}")
    os.sched_setaffinity(0, cores[:n])
    return cores[:n]


SIDES = ("ours", "theirs")


def preimport(a) -> None:
    """Import what the rows of `a.side` import and start its runtime (one small elementwise op and one matmul on
    each side; ours compiles them: XLA's first compile and first dot set up ~20 MB once a process, its LLVM target
    and its YNNPACK runtime: 17 and 5 MB in a one-off check on the EPYC), so the memory baseline taken after it
    holds the libraries and only the row's weights, programs and buffers count."""
    import jax.numpy as jnp
    import optax  # noqa: F401
    from flax import nnx  # noqa: F401
    from terdit_jax.convert import dit_official  # noqa: F401
    from terdit_jax.diffusion import gaussian, samplers  # noqa: F401
    from terdit_jax.vae import autoencoder_kl, convert  # noqa: F401
    if a.side == "ours":
        import jax
        jax.jit(lambda x: x @ x + 1)(jnp.ones((64, 64))).block_until_ready()
    if a.side == "theirs":  # main has refused --side theirs without torch
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel  # noqa: F401
        x = torch.ones(64, 64, device=a.dev)
        (x @ x + 1).cpu()


def memory_child(a, row: str) -> dict:
    """Run `row` once per side, each in a fresh process (this script with --side) → {side: peak bytes or why not}:
    the process's resident high-water mark from when the side's weights are built (reset there) over compiling (ours),
    the untimed checking call and one timed call, less its resident set after the side's imports (`preimport`)."""
    import subprocess
    out = {}
    for side in SIDES:
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--rows", row, "--repeats", "1",
               "--threads", str(a.threads)] + ["--quick"] * a.quick + ["--ddim_model", a.ddim_model] * bool(a.ddim_model)
        r = subprocess.run(cmd, capture_output=True, text=True)
        try:
            out[side] = json.loads(r.stdout.strip().splitlines()[-1])["process_peak_bytes"]
        except (IndexError, KeyError, ValueError):
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            out[side] = f"{NOT_MEASURED}: --side {side} exited {r.returncode}: {tail[:200]}"
    return out


def write_partial(path: str | None, report: dict) -> None:
    """The report so far, written whole to a temporary file and renamed, so a reader never sees half of it."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny preset of every row (seconds)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of every row (default: per row, above)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores for both sides")
    ap.add_argument("--ddim_model", default=None, help="DiT preset of the ddim row (default DiT-S/2; --quick: tiny)")
    ap.add_argument("--torch_compile", choices=("on", "off"), default=None,
                    help="also time torch.compile in dit_cfg (default on; off with --quick: inductor takes ~30 s)")
    ap.add_argument("--partial", default=None, metavar="FILE",
                    help="write the report so far to FILE after each row (for a caller that may stop the run)")
    ap.add_argument("--perturb", type=float, default=0.0,
                    help="move one of OUR weights by this fraction of its max (the agreement check must then fail)")
    ap.add_argument("--memory", action="store_true",
                    help="also measure each row's peak memory, each side alone in a fresh process (memory_child)")
    ap.add_argument("--side", choices=SIDES, default=None,
                    help="run one side only, no comparison, and report its process peak (what --memory runs)")
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        print(f"error: --rows {a.rows!r}: unknown row(s) {bad}; choose from {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if a.repeats is not None and a.repeats < 1:
        print(f"error: --repeats {a.repeats}: need at least 1 timed repeat", file=sys.stderr)
        return 2
    cores = pin_threads(a.threads)
    p = PRESETS["quick" if a.quick else "default"]
    if a.repeats:
        p = dataclasses.replace(p, repeats={r: a.repeats for r in ROWS})
    if a.ddim_model is not None:
        from terdit_jax.models import dit_xl
        if a.ddim_model not in dit_xl.PRESETS:
            print(f"error: --ddim_model {a.ddim_model!r} is not a DiT preset; choose from {', '.join(dit_xl.PRESETS)}",
                  file=sys.stderr)
            return 2
    a.torch_compile = (a.torch_compile or ("off" if a.quick else "on")) == "on" and not a.side
    if a.side:  # a 50-step sample peaks where a short one does (the same step program): spare the time
        p = dataclasses.replace(p, ddim_steps=p.check_steps)

    import jax
    a.dev, a.why_not, versions = theirs_device(jax.default_backend())
    if a.side == "ours":  # ours alone, torch never imported
        a.dev, a.why_not, versions = None, "--side ours", {}
    elif a.side == "theirs" and not a.dev:
        print(f"error: --side theirs: {a.why_not}; install the test extra (torch, diffusers)", file=sys.stderr)
        return 2
    if a.dev:
        import torch
        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        versions.update(torch=torch.__version__, diffusers=__import__("diffusers").__version__)
    if a.dev == "cuda":  # full float32 matmuls on both sides (TF32 would fail the 1e-4 check)
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = jax.devices()[0]
    report = {"benchmark": "vs_diffusers", "preset": "quick" if a.quick else "default", "platform": device.platform,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cores_used": cores, "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
                          "jax_device": f"{device.platform}:{device.device_kind}", "torch_device": a.dev,
                          "torch_threads": a.threads if a.dev else None,
                          "xla_flags": os.environ.get("XLA_FLAGS", "")},  # terdit_jax's defaults included
              "theirs": "measured" if a.dev else f"{NOT_MEASURED}: {a.why_not}",
              "versions": {"jax": jax.__version__, **versions}, "tolerance": TOL, "rows": {}}
    if a.side:
        preimport(a)
        base = reset_peak_rss()
    disagreed = []
    for r in rows:
        t0 = time.perf_counter()
        print(f"[vs_diffusers] {r} ...", file=sys.stderr, flush=True)
        try:
            res = ROW_FNS[r](p, a)
        except AgreementError as e:  # this row is not timed; the others still are, and the exit status is 1
            print(f"error: {e}", file=sys.stderr, flush=True)
            report["rows"][r] = {"error": str(e)}
            disagreed.append(r)
        else:
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            report["rows"][r] = res
            # each row's medians on stderr as it ends: a run stopped later (the GPU suite's budget) still shows them
            medians = {k: v["median_s"] for k, v in res["times"].items()}
            print(f"[vs_diffusers] {r}: {json.dumps(res['ratio'])}, medians s {json.dumps(medians)}, "
                  f"in {res['wall_s']} s", file=sys.stderr, flush=True)
        if a.memory and "error" not in report["rows"][r]:
            report["rows"][r].setdefault("memory", {})["process_peak_bytes"] = memory_child(a, r)
        write_partial(a.partial, report)
    report["peak_rss_bytes"] = peak_rss_bytes()
    if a.side:
        report["process_peak_bytes"] = high_water_bytes() - base
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # accelerators: the device peaks of both sides
        report["device_peak_bytes"] = {"ours": stats["peak_bytes_in_use"]}
        if a.dev == "cuda":
            report["device_peak_bytes"]["theirs"] = torch.cuda.max_memory_allocated()
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(report))
    if disagreed:
        print(f"error: rows {', '.join(disagreed)}: ours and diffusers disagree, not timed (above)", file=sys.stderr)
    return 1 if disagreed else 0


if __name__ == "__main__":
    sys.exit(main())
