"""Pre-extracted VAE latents: encode ImageNet once, then train without running the VAE.

The official TerDiT/DiT code encodes every batch on the fly and draws ``latent_dist.sample() * 0.18215``. To keep
that randomness while encoding only once, we store the posterior *moments* (4 mean + 4 log-variance channels) of
each image and of its mirror image, and draw a fresh sample per training step with ``sample_latents``.

Layout of ``out_dir``: ``latents-KKKKK-of-NNNNN.array_record`` shards (msgpack records
``{'m': bytes of dtype (2, h, w, 8), 'shape': [2, h, w, 8], **condition}``; view 0 is the image, view 1 its
mirror), one ``<shard>.json`` sidecar per shard, and ``manifest.json`` (its ``condition`` says what each record is
conditioned on: ``'label'`` adds ``'label': int``; ``'caption'`` adds the caption's tokens, see
``data.conditions.CaptionRecords``, and a text set also has ``captions.npz``: the empty prompt's embedding and
the first captions, for CFG dropout and sample grids).
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from terdit_jax.data import imagenet
from terdit_jax.data.captioned import CaptionedImages
from terdit_jax.data.conditions import CONDITIONS, CaptionRecords, LabelRecords, check_captions, kind_of
from terdit_jax.data.transforms import center_crop_arr, decode_rgb, hflip, to_float
from terdit_jax.text import captions
from terdit_jax.vae.autoencoder_kl import sample_latent

log = logging.getLogger(__name__)

LATENTS_KIND = "imagenet_latents"
SD_VAE_SCALE = 0.18215  # Stable Diffusion VAE latent scale, as in DiT/TerDiT train.py


CAPTIONS_FILE = "captions.npz"  # next to caption shards: the empty prompt's embedding and the first captions
PREVIEW_CAPTIONS = 16  # how many of the data set's first distinct captions captions.npz keeps (sample grids)


def _crop(source, i: int, image_size: int):
    item = source[i]
    if item["image"] is None:  # the source already counted and logged it
        return None
    return center_crop_arr(decode_rgb(item["image"]), image_size), item


def extract_latents(source, encode_fn: Callable[[np.ndarray], np.ndarray], out_dir: str, *, image_size: int,
                    batch_size: int = 32, records_per_shard: int = 2048, dtype: str = "float32", threads: int = 8,
                    process_index: int = 0, process_count: int = 1, progress: bool = True,
                    condition=LabelRecords()) -> dict:
    """Encodes every image of ``source`` and its horizontal flip to VAE moments in ArrayRecord shards.

    Args:
      source: an ImageNet path (any layout ``imagenet.open_image_source`` reads) or a random-access sequence of
        ``{'image': uint8 (H, W, 3) or None, 'label': int}`` (or ``'caption_index'`` for caption records).
      encode_fn: maps float32 (2B, S, S, 3) in [-1, 1] to moments (2B, S/8, S/8, 8) (mean channels first, as
        diffusers' DiagonalGaussianDistribution splits them). Called with a fixed batch (padded) so jit compiles once.
      out_dir: shard directory; an interrupted run resumes there, skipping finished shards.
      image_size: ADM center-crop size S.
      records_per_shard: source images per shard (corrupt ones are skipped and counted in the sidecar).
      dtype: 'float32' or 'float16' storage (float16 halves disk but rounds the mean more than the posterior std).
      process_index, process_count: this process encodes shards k with k % process_count == process_index.
      condition: what each record stores besides the moments, from its source item (`conditions.LabelRecords`:
        the item's 'label'; `conditions.CaptionRecords`: the tokens of the item's 'caption_index').
    Returns the manifest; it has ``complete: True`` once all shards (from all processes) exist.
    """
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE downsamples 8x), got {image_size}")
    if isinstance(source, (str, os.PathLike)):
        source = imagenet.open_image_source(str(source))
    n = len(source)
    num_shards = math.ceil(n / records_per_shard)
    os.makedirs(out_dir, exist_ok=True)
    plan = {"kind": LATENTS_KIND, "image_size": image_size, "records_per_shard": records_per_shard,
            "num_source": n, "num_shards": num_shards, "dtype": dtype, "scale": SD_VAE_SCALE, "complete": False,
            "layout": "moments[view, h, w, c]: view 0 image, 1 mirrored; c 0-3 mean, 4-7 logvar",
            "condition": condition.kind, **condition.manifest()}
    mpath = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(mpath):
        old = imagenet.read_json(mpath)
        old.setdefault("condition", "label")  # written before captions existed
        changed = [k for k in ("kind", "image_size", "records_per_shard", "num_source", "dtype", "condition",
                               *condition.manifest()) if old.get(k) != plan[k]]
        if changed:
            raise ValueError(f"{out_dir} already holds latents made with other settings ({', '.join(changed)}: "
                             f"{[old.get(k) for k in changed]} vs {[plan[k] for k in changed]}). Use an empty out_dir.")
        if old.get("complete"):
            return old
    else:
        imagenet.write_json(mpath, plan)
    names = [f"latents-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    todo = [k for k in range(process_index, num_shards, process_count) if not os.path.isfile(os.path.join(out_dir, names[k]))]
    mine = len(range(process_index, num_shards, process_count))
    done_imgs = (mine - len(todo)) * records_per_shard
    total = sum(min(records_per_shard, n - k * records_per_shard) for k in range(process_index, num_shards, process_count))
    bar = tqdm(total=total, initial=min(done_imgs, total), desc="extract latents", unit="img", disable=not progress)
    pool = concurrent.futures.ThreadPoolExecutor(threads)  # PIL decode/resize release the GIL
    for k in todo:
        idx = range(k * records_per_shard, min((k + 1) * records_per_shard, n))
        crops = list(pool.map(lambda i: _crop(source, i, image_size), idx))
        good = [c for c in crops if c is not None]
        records, shape = [], None
        for b in range(0, len(good), batch_size):
            chunk = good[b:b + batch_size]
            x = to_float(np.stack([c[0] for c in chunk]))
            x = np.concatenate([x, np.zeros((batch_size - len(chunk),) + x.shape[1:], np.float32)])  # fixed jit shape
            m = np.asarray(encode_fn(np.concatenate([x, hflip(x)])))
            want = (2 * batch_size, image_size // 8, image_size // 8, 8)
            if m.shape != want:
                raise ValueError(f"encode_fn returned moments of shape {m.shape}, expected {want} "
                                 "(4 mean then 4 log-variance channels at 1/8 resolution, NHWC).")
            m = np.stack([m[:batch_size], m[batch_size:]], axis=1)[:len(chunk)].astype(dtype)  # (B, 2, h, w, 8)
            shape = list(m.shape[1:])
            records += [msgpack.packb({"m": mi.tobytes(), "shape": shape, **condition.pack(c[1])})
                        for mi, c in zip(m, chunk)]
        imagenet.write_array_record(os.path.join(out_dir, names[k]), records,
                                    {"records": len(records), "skipped": len(idx) - len(good), "moments_shape": shape})
        bar.update(len(idx))
    bar.close()
    pool.shutdown()
    if not all(os.path.isfile(os.path.join(out_dir, s)) for s in names):
        return dict(plan, shards_done=sum(os.path.isfile(os.path.join(out_dir, s)) for s in names))
    metas = [imagenet.read_json(os.path.join(out_dir, s + ".json")) for s in names]
    shapes = {tuple(m["moments_shape"]) for m in metas if m["moments_shape"]}
    if len(shapes) != 1:
        raise ValueError(f"{out_dir}: shards disagree on the latent shape {shapes} (or hold no images); delete them and extract again.")
    manifest = dict(plan, complete=True, shards=names, moments_shape=list(shapes.pop()),
                    num_records=sum(m["records"] for m in metas), num_skipped=sum(m["skipped"] for m in metas))
    imagenet.write_json(mpath, manifest)
    log.info("extracted %d latents (%d corrupt skipped) into %s", manifest["num_records"], manifest["num_skipped"], out_dir)
    return manifest


class LatentSource:
    """Random-access reader of extracted latents: ``src[i] -> {'moments': float32 (2, h, w, 8), **condition}`` with
    condition ``{'label': int32}`` or ``{'caption': float32 (L, C), 'mask': int32 (L,), 'caption_index': int32}``
    (the manifest's ``condition``); for captions, ``self.captions`` is the set's ``captions.npz``."""

    def __init__(self, path: str, image_size: int | None = None):
        import grain.python as grain  # pylint: disable=import-outside-toplevel
        if not os.path.isdir(path):
            raise FileNotFoundError(f"latent directory {path!r} does not exist; create it with --mode extract_latents.")
        m = imagenet.read_manifest(path, LATENTS_KIND)
        if image_size is not None and m["image_size"] != image_size:
            raise ValueError(f"latents in {path} were extracted at {m['image_size']} px but image_size={image_size}; "
                             "extract again at this size or change the config.")
        self.path, self.shape, self.dtype = path, tuple(m["moments_shape"]), np.dtype(m["dtype"])
        self.manifest, self.condition = m, m.get("condition", "label")
        self._unpack = CONDITIONS.get(self.condition).unpack
        self.captions = captions.read(os.path.join(path, CAPTIONS_FILE)) if self.condition == "caption" else None
        self._base = grain.ArrayRecordDataSource([os.path.join(path, s) for s in m["shards"]])

    def __len__(self) -> int:
        return len(self._base)

    def __repr__(self) -> str:  # no path: a checkpoint must still restore after the data directory moved
        # (labels: the repr of before captions existed, which runs started then have in their checkpoints)
        cond = "" if self.condition == "label" else f", condition={self.condition}"
        return f"LatentSource(len={len(self)}, shape={self.shape}, image_size={self.manifest['image_size']}{cond})"

    def __getitem__(self, i: int) -> dict:
        r = msgpack.unpackb(self._base[i])
        if tuple(r["shape"]) != self.shape or len(r["m"]) != math.prod(self.shape) * self.dtype.itemsize:
            raise ValueError(f"latent record {i} in {self.path} has shape {r['shape']} ({len(r['m'])} bytes) but the manifest "
                             f"says {list(self.shape)} {self.dtype}: the shards come from different extractions. "
                             "Delete the directory and run --mode extract_latents again.")
        m = np.frombuffer(r["m"], self.dtype).reshape(self.shape).astype(np.float32)
        return {"moments": m, **self._unpack(r, self.manifest)}


def sample_latents(moments: jax.Array, key: jax.Array, scale: float = SD_VAE_SCALE) -> jax.Array:
    """Draws z = (mean + exp(logvar / 2) * eps) * scale, as diffusers' DiagonalGaussianDistribution.sample().

    moments: (..., h, w, 8), channels 0-3 mean, 4-7 log-variance (clipped to [-30, 20] like diffusers).
    Returns (..., h, w, 4) float32.
    """
    return sample_latent(moments.astype(jnp.float32), key) * scale


def _label_data(config, out_dir: str):
    return config.data.image_path, LabelRecords()


def _caption_data(config, out_dir: str):
    """An image folder with captions (data.captioned) and their embeddings; writes captions.npz into out_dir."""
    d = config.data
    if not d.caption_embeds:
        raise FileNotFoundError("a text-conditioned model (model.family=" + str(config.model.family) + ") extracts "
                                "caption shards: pass --config.data.caption_embeds=FILE.npz, the caption embeddings "
                                "(text.captions format) whose prompts are the captions of the images")
    embeds = check_captions(captions.read(d.caption_embeds), config.model, f"caption embeddings {d.caption_embeds}")
    source = CaptionedImages(d.image_path, embeds, d.caption_file)
    first = list(dict.fromkeys(source.caption_index.tolist()))[:PREVIEW_CAPTIONS]
    os.makedirs(out_dir, exist_ok=True)
    captions.write(os.path.join(out_dir, CAPTIONS_FILE),
                   captions.make([embeds.prompts[i] for i in first], *embeds.condition(first), *embeds.null()))
    return source, CaptionRecords(embeds)


# the model's condition kind (data.conditions.kind_of) → (source, records) to extract
EXTRACT_DATA = {"label": _label_data, "caption": _caption_data}


def run_extract_mode(config, *, log=print) -> dict:
    """--mode extract_latents: data.image_path → SD-VAE moments of every image and its mirror in data.path, with
    each image's class label, or, for a text-conditioned model, its caption's tokens (data.caption_file,
    data.caption_embeds)."""
    from terdit_jax.vae import load_vae

    d = config.data
    if not (d.image_path and d.path and d.vae_path):
        raise FileNotFoundError("extract_latents needs --config.data.image_path (the training images), "
                                "--config.data.path (where the latent shards go) and --config.data.vae_path")
    source, records = EXTRACT_DATA[kind_of(config.model)](config, d.path)
    vae = load_vae(d.vae_path, dtype=jnp.dtype(config.model.dtype))
    encode = jax.jit(vae.encode)
    log(f"encoding {d.image_path} at {d.image_size} px into {d.path} (resumable) ...")
    return extract_latents(source, lambda x: np.asarray(encode(x)), d.path, image_size=d.image_size,
                           batch_size=d.extract_batch_size, process_index=jax.process_index(),
                           process_count=jax.process_count(), condition=records)
