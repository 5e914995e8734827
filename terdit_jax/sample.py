"""Generating images from a model: loading whatever `--mode sample|eval` draws from, what it is conditioned on
(class labels, or prompts for a text family: `Conditions`), batched sampling, the labelled PNG grid and the ADM
`.npz` layout."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from terdit_jax.checkpoint import adopt_architecture, load_ema, model_signature, stored_model
from terdit_jax.config import ConfigError, finalize, sample_labels
from terdit_jax.data.conditions import kind_of
from terdit_jax.diffusion.gaussian import create_diffusion
from terdit_jax.diffusion.samplers import respacing, sample
from terdit_jax.eval.adm_npz import write_adm_batch
from terdit_jax.export import ExportError, load_packed, read_manifest as read_packed_manifest
from terdit_jax.labels import to_model_labels
from terdit_jax.model_fn import bind
from terdit_jax.ptq import checkpoint as qckpt
from terdit_jax.registry import Registry


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[−1, 1] float → uint8 [0, 255] (as ADM/DiT save samples)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _prepare(graphdef, params, y):
    return nnx.merge(graphdef, params).prepare(y)


def prepare_condition(apply, params, y):
    """`DiffusionTransformer.prepare(y)` of the model `apply` runs (what is constant over the sampling steps, such
    as a caption's cross-attention K/V, computed once); y itself for an apply that is no model graph."""
    graphdef = getattr(apply, "graphdef", None)
    return y if graphdef is None else _prepare(graphdef, params, y)


def _take(y, lo: int, hi: int, n: int):
    """Rows lo:hi of every leaf of y, the last row repeated up to n rows."""
    return jax.tree_util.tree_map(lambda a: np.concatenate([a[lo:hi], np.repeat(a[hi - 1:hi], n - (hi - lo), 0)]), y)


def generate(apply, params, y, config, key, *, null_y=None, decode=None, progress: bool = False) -> np.ndarray:
    """Sample one image per condition → uint8 (N, H, W, C) (NHWC, ADM layout).

    y: (N,) int labels, or a pytree whose leaves lead with N (a text family's caption (N, L, C) and mask (N, L));
    null_y: one example's unconditional condition for CFG (default: the null class label model.num_classes).
    Each batch's condition (and null_y) is `prepare`d once, not at every step. Each batch is split over all local
    devices (params replicated); batch i's noise comes from fold_in(key, i), so results do not depend on the device
    count. `decode` maps model-space samples to [−1, 1] images (the VAE decoder for latent models; None = pixel
    space).
    """
    m, s = config.model, config.sample
    diffusion = create_diffusion(respacing(s.sampler, s.num_steps), config.diffusion.num_timesteps, m.prediction)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    y = jax.tree_util.tree_map(np.asarray, y) if isinstance(y, (tuple, dict)) else np.asarray(y, np.int32)
    total = len(jax.tree_util.tree_leaves(y)[0])
    null_y = m.num_classes if null_y is None else null_y
    if s.cfg_scale != 1.0:  # one example → a batch of one to prepare → back to one example
        null_y = jax.tree_util.tree_map(lambda a: a[0], prepare_condition(
            apply, params, jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a)[None], null_y), replicated)))
    out = []
    for i, lo in enumerate(range(0, total, s.batch_size)):
        hi = min(lo + s.batch_size, total)
        n = -(-(hi - lo) // mesh.size) * mesh.size  # pad to a multiple of the device count
        cond = prepare_condition(apply, params, jax.device_put(_take(y, lo, hi, n), batch_sharding))
        k_init, k_steps = jax.random.split(jax.random.fold_in(key, i))
        x_T = jax.random.normal(k_init, (n, m.input_size, m.input_size, m.in_channels))
        x = sample(bind(apply, params), diffusion, x_T.shape, k_steps, cond, x_T=jax.device_put(x_T, batch_sharding),
                   sampler=s.sampler, cfg_scale=float(s.cfg_scale), null_y=null_y, guidance_channels=s.cfg_channels,
                   progress=progress)
        if decode is not None:
            x = decode(x)
        out.append(to_uint8(jax.device_get(x))[:hi - lo])
    return np.concatenate(out)


def save_grid(path: str, images: np.ndarray, labels, *, names: dict | None = None, scale: int | None = None) -> None:
    """One row per distinct label (in order of first appearance), each row labelled on its left with
    names[label] (default str(label); non-ASCII characters drawn as '?')."""
    labels = np.asarray(labels)
    rows = list(dict.fromkeys(labels.tolist()))
    text = {k: str((names or {}).get(k, k)).encode("ascii", "replace").decode() for k in rows}
    per_row = max(int(np.sum(labels == k)) for k in rows)
    n, h, w, c = images.shape
    scale = scale or max(1, 64 // h)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_h, cell_w, margin = h * scale, w * scale, 12 + int(max(measure.textlength(v) for v in text.values()))
    grid = Image.new("RGB", (margin + per_row * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, k in enumerate(rows):
        draw.text((4, r * (cell_h + 2) + cell_h // 2 - 5), text[k], fill="black")
        for j, img in enumerate(images[labels == k]):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            grid.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (margin + j * (cell_w + 2), r * (cell_h + 2)))
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What `--mode sample` draws, one entry per image: y ((N,) class labels, or a pytree whose leaves lead with
    N), null_y (one example's unconditional y, for CFG), rows ((N,) int: the grid row and the .npz label of each
    image), names (row → the text at its left) and extra (further arrays for the samples .npz, e.g. the prompts)."""
    y: object
    null_y: object
    rows: np.ndarray
    names: dict
    extra: dict = dataclasses.field(default_factory=dict)


def short(prompt: str, width: int = 40) -> str:
    """A prompt cut to `width` characters for a grid label."""
    return prompt if len(prompt) <= width else prompt[:width - 3].rstrip() + "..."


def class_conditions(config, model_labels, log=print) -> Conditions:
    """`sample.classes` × `per_class`, mapped to the model's labels; CFG with the null class."""
    s = config.sample
    if s.prompts or s.prompt_embeds:
        raise ConfigError(f"config.sample.{'prompts' if s.prompts else 'prompt_embeds'}: model.family="
                          f"{config.model.family!r} is class-conditional and samples sample.classes; prompts need a "
                          f"text family (e.g. --config=configs/pixart_alpha_512.py)")
    labels = np.asarray(sample_labels(config), np.int64)
    return Conditions(np.asarray(model_labels(labels), np.int32), config.model.num_classes, labels,
                      {k: str(k) for k in labels.tolist()})


def caption_conditions(config, model_labels, log=print) -> Conditions:
    """The prompts of `sample.prompts` (encoded here with config.text's T5) or the caption embeddings of
    `sample.prompt_embeds`, each `per_class` times, prompt-major; CFG with the empty prompt's caption."""
    from terdit_jax.text import captions as captions_lib
    from terdit_jax.text.prompts import encode_prompts, read_prompts

    s, m = config.sample, config.model
    if s.prompt_embeds:
        caps = captions_lib.read(s.prompt_embeds).check(m.caption_channels, m.caption_len, s.prompt_embeds)
    elif s.prompts:
        prompts = read_prompts(s.prompts)
        log(f"encoding {len(prompts)} prompt(s) with the T5 encoder at {config.text.encoder_path or '(unset)'}")
        caps = encode_prompts(prompts, config.text, m.caption_len, log=log)
        caps.check(m.caption_channels, m.caption_len, f"the encoder at {config.text.encoder_path}'s captions")
    else:
        raise ConfigError(f"config.sample: model.family={m.family!r} samples from text: pass "
                          "--config.sample.prompts=FILE (one prompt per line; with --config.text.encoder_path=the T5 "
                          "folder) or --config.sample.prompt_embeds=FILE.npz (--mode encode_prompts writes one)")
    if not len(caps):
        raise captions_lib.CaptionError(f"{s.prompt_embeds} holds no prompts: encode at least one")
    index = np.repeat(np.arange(len(caps)), s.per_class)
    return Conditions(caps.condition(index), caps.null(), index,
                      {i: f"{i}: {short(p)}" for i, p in enumerate(caps.prompts)},
                      {"prompts": np.asarray(caps.prompts, dtype=str)})


# what a family is conditioned on (`data.conditions.kind_of`) → (config, to_model_labels, log) → Conditions
CONDITIONS: Registry[Callable] = Registry("condition kind", {"label": class_conditions, "caption": caption_conditions})


def sample_conditions(config, model_labels=lambda labels: labels, log=print) -> Conditions:
    """What `--mode sample` draws for the config's model family."""
    return CONDITIONS.get(kind_of(config.model))(config, model_labels, log)


def latent_decoder(config):
    """z (N, h, w, 4) → images in [−1, 1] through the SD-VAE at data.vae_path; None for pixel-space models."""
    if not config.data.latent:
        return None
    if not config.data.vae_path:
        raise FileNotFoundError("latent models decode through the SD-VAE: download it once (e.g. `huggingface-cli "
                                "download stabilityai/sd-vae-ft-ema --local-dir vae/`) and pass "
                                "--config.data.vae_path=vae/")
    from terdit_jax.vae import load_vae

    vae = load_vae(config.data.vae_path, dtype=jax.numpy.dtype(config.model.dtype))
    scale = config.data.latent_scale
    return jax.jit(lambda z: vae.decode(z / scale))


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A kind of stored model sampling can draw from: `requested(config)` says whether the config asks for it;
    `identify(config, workdir)` → which one exactly, read cheaply from its manifest or metadata (a dict with
    `kind`, `what` (words for logs) and what tells it from another model of the same name: its manifest's hash,
    or a checkpoint's commit time), failing as `load` would; `load(config, workdir, log)` → (config, apply,
    params, step, to_model_labels)."""
    requested: Callable[[ml_collections.ConfigDict], bool]
    identify: Callable
    load: Callable


def _identify_checkpoint(config, workdir: str) -> dict:
    step, _, committed = stored_model(workdir, config.sample.step)
    return {"kind": "checkpoint", "what": f"checkpoint step {step} of {os.path.abspath(workdir)}", "step": step,
            "committed": committed}


def _load_checkpoint(config, workdir: str, log=print):
    """The EMA weights of the workdir's newest training checkpoint (or `sample.step`)."""
    apply, params, step = load_ema(config, workdir, config.sample.step)
    return config, apply, params, step, lambda labels: np.asarray(labels, np.int32)


def _identify_packed(config, workdir: str) -> dict:
    path = os.path.abspath(config.sample.packed_path)
    manifest = read_packed_manifest(path)
    return {"kind": "packed", "what": f"the packed export {path}", "path": path,
            "manifest": qckpt.manifest_id(path), "step": int(manifest.get("source", {}).get("step", 0))}


def _load_packed(config, workdir: str, log=print):
    """A packed export at `sample.packed_path`: the architecture from its manifest, the compute settings
    (dtype, packed activation precision, backend) from the config. The activation precision must be what the
    export was trained with (an A8 export samples on the int8 path unasked); `model.packed_act_force` overrides
    that on purpose (`export.packed_act_dtype_for`). The returned config holds the precision used."""
    path = config.sample.packed_path
    stored = read_packed_manifest(path)
    if stored["kind"] == "ptq":
        check_deployed(stored, config, path)
    adopt_architecture(config, stored["model"], f"the packed export {path}",
                       ignore=("sites", "linear", "packed_from", "deployed"), log=log)
    apply, params, model_cfg, manifest = load_packed(path, config.model)
    packed = ml_collections.ConfigDict(config.to_dict())
    packed.model = ml_collections.ConfigDict({**model_cfg, "name": "custom"})
    step = int(manifest.get("source", {}).get("step", 0))
    return finalize(packed), apply, params, step, lambda labels: to_model_labels(labels, manifest)


def check_deployed(manifest: dict, config, path: str) -> None:
    """A deployed PTQ model samples only the architecture it was quantized for, and (with per-time-group
    activation parameters) the step count it was calibrated with."""
    have, want = model_signature(manifest["model"]), model_signature(config.model)
    diff = sorted(k for k in set(have) | set(want) if k not in ("sites", "linear", "deployed", "quantized_layers")
                  and have.get(k) != want.get(k))
    if diff:
        raise ExportError(f"{path} is a deployed model of another architecture: "
                          + ", ".join(f"model.{k}={have.get(k)!r} (config: {want.get(k)!r})" for k in diff)
                          + "; sample it with the config it was quantized from")
    try:
        qckpt.check_sampler(manifest, config, path)
    except qckpt.QuantizedModelError as e:
        raise ExportError(str(e)) from None


def _identify_quantized(config, workdir: str) -> dict:
    name = config.sample.quantized
    path = qckpt.model_dir(workdir, name)
    manifest = qckpt.read_manifest(path)
    bits, step = manifest.get("bits", {}), int(manifest["source"]["step"])
    return {"kind": "quantized", "what": f"the quantized model {name} ({manifest.get('method')} "
            f"W{bits.get('weights')}A{bits.get('activations')} of step {step})", "name": name, "path": path,
            "manifest": qckpt.manifest_id(path), "method": manifest.get("method"), "bits": bits, "step": step}


def _load_quantized(config, workdir: str, log=print):
    """A quantized model <workdir>/quantized/<sample.quantized> (--mode quantize): its architecture and site rules
    from its manifest (one line says where the config differs), of the config's method when the config names
    one."""
    path = qckpt.model_dir(workdir, config.sample.quantized)
    manifest = qckpt.read_manifest(path)
    config = qckpt.check_matches(manifest, config, path, log=log)
    qckpt.check_sampler(manifest, config, path)
    apply, params, model_cfg, manifest = qckpt.load_quantized(path, config.model)
    quantized = ml_collections.ConfigDict(config.to_dict())
    quantized.model = ml_collections.ConfigDict(model_cfg)
    return finalize(quantized), apply, params, int(manifest["source"]["step"]), lambda labels: np.asarray(labels,
                                                                                                          np.int32)


def artifact_tag(config) -> str:
    """A name for what is sampled, for output file names: '' (training checkpoint), 'packed', or the quantized
    model's name."""
    return config.sample.quantized or ("packed" if config.sample.packed_path else "")


def sampling_tag(config) -> str:
    """What made a set of samples, for file names: sampler, step count and guidance ('ddim50_cfg4')."""
    s = config.sample
    return f"{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}"


# Tried in order; the first the config asks for is loaded (a training checkpoint when nothing else is asked for).
ARTIFACTS: Registry[Artifact] = Registry("model artifact", {
    "quantized": Artifact(lambda c: bool(c.sample.quantized), _identify_quantized, _load_quantized),
    "packed": Artifact(lambda c: bool(c.sample.packed_path), _identify_packed, _load_packed),
    "checkpoint": Artifact(lambda c: True, _identify_checkpoint, _load_checkpoint),
})


def _requested(config) -> Artifact:
    return ARTIFACTS.get(next(n for n in ARTIFACTS if ARTIFACTS.get(n).requested(config)))


def identify_model(config, workdir: str) -> dict:
    """Which stored model `--mode sample|eval` would draw from (see `Artifact.identify`)."""
    return _requested(config).identify(config, workdir)


def load_for_sampling(config, workdir: str, *, log=print):
    """The model `--mode sample` and `--mode eval` draw from → (config, apply, params, step, to_model_labels).

    to_model_labels maps ImageNet class indices to the labels the model was trained with (the released TerDiT
    weights use the string-sorted folder order).
    """
    return _requested(config).load(config, workdir, log)


def run_sample_mode(config, workdir: str, *, log=print) -> dict:
    """--mode sample: the family's conditions (`sample_conditions`: classes, or prompts) →
    samples/sample_[<model>_]<step>_<sampler><steps>_cfg<scale>.png (one row per class or prompt) and .npz (ADM
    layout; arr_1 the class labels or prompt indices, `prompts` the prompts), named by what made them so that
    other settings never overwrite them."""
    what = identify_model(config, workdir)["what"]
    config, apply, params, step, model_labels = load_for_sampling(config, workdir, log=log)
    conds = sample_conditions(config, model_labels, log)
    log(f"sampling {len(conds.rows)} images from {what} with {config.sample.sampler}, {config.sample.num_steps} "
        f"steps, cfg {config.sample.cfg_scale}")
    images = generate(apply, params, conds.y, config, jax.random.key(config.sample.seed), null_y=conds.null_y,
                      decode=latent_decoder(config), progress=True)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    tag = artifact_tag(config)
    base = os.path.join(workdir, "samples", f"sample_{tag + '_' if tag else ''}{step:07d}_{sampling_tag(config)}")
    save_grid(base + ".png", images, conds.rows, names=conds.names)
    write_adm_batch(base + ".npz", images, np.asarray(conds.rows, np.int64), **conds.extra)
    return {"grid": base + ".png", "npz": base + ".npz"}


def run_encode_prompts_mode(config, workdir: str, out: str | None = None, *, overwrite: bool = False,
                            log=print) -> str:
    """--mode encode_prompts: `sample.prompts` → a caption-embeddings .npz (default
    <workdir>/captions/<prompt file name>.npz) for sampling, calibration or training to reuse."""
    from terdit_jax.text import captions as captions_lib
    from terdit_jax.text.prompts import encode_prompts, read_prompts

    if not config.sample.prompts:
        raise ConfigError("config.sample.prompts: --mode encode_prompts needs a prompt file (one prompt per line)")
    if kind_of(config.model) != "caption":
        raise ConfigError(f"config.model.family={config.model.family!r} is class-conditional; encode prompts for a "
                          "text family (e.g. --config=configs/pixart_alpha_512.py)")
    path = out or os.path.join(workdir, "captions",
                               os.path.splitext(os.path.basename(config.sample.prompts))[0] + ".npz")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"--out: {path} exists; pass --overwrite to replace it, or another --out")
    prompts = read_prompts(config.sample.prompts)
    caps = encode_prompts(prompts, config.text, config.model.caption_len, log=log)
    caps.check(config.model.caption_channels, config.model.caption_len,
               f"the encoder at {config.text.encoder_path}'s captions")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    captions_lib.write(path, caps)
    return path
