"""grain training pipeline over ImageNet images or pre-extracted latents.

Order of work per host: a fixed seeded permutation of the whole dataset (so that a host's contiguous shard is not
a block of classes, since converted shards are stored class by class), then grain's per-host shard, a seeded
shuffle repeated every epoch, per-record augmentation with grain's per-record RNG (so results do not depend on
the number of workers), corrupt-image filtering and batching to global_batch_size / process_count.
The returned iterator has ``get_state() -> bytes`` and ``set_state(bytes)`` (grain's DataLoader iterator), which is
what ``grain.python.PyGrainCheckpointSave/Restore`` store in an Orbax checkpoint.
"""
from __future__ import annotations

import grain.python as grain
from absl import flags
import jax
import numpy as np

from terdit_jax.data.imagenet import open_image_source
from terdit_jax.data.latents import LatentSource
from terdit_jax.data.transforms import center_crop_arr, hflip, to_float


class Permuted:
    """``src`` seen through a fixed random permutation (seed), so contiguous index ranges mix all classes."""

    def __init__(self, src, seed: int):
        self.src, self.seed = src, seed
        self.perm = np.random.default_rng(seed).permutation(len(src)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:  # grain compares reprs when restoring a checkpointed iterator
        return f"Permuted({self.src!r}, seed={self.seed})"

    def __getitem__(self, i: int):
        return self.src[int(self.perm[i])]


# Transforms live at module level: grain pickles them into worker processes.
class DropCorrupt(grain.FilterTransform):
    def filter(self, element) -> bool:
        return element["image"] is not None


class CropFlip(grain.RandomMapTransform):
    """uint8 image of any size -> float32 (S, S, 3) in [-1, 1], ADM-cropped and mirrored with probability 1/2."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def random_map(self, element, rng: np.random.Generator):
        x = center_crop_arr(_pil(element["image"]), self.image_size)
        return {"image": to_float(hflip(x) if rng.random() < 0.5 else x), "label": element["label"]}


class PickView(grain.RandomMapTransform):
    """Stored moments (2, h, w, 8) = [image, mirror] -> one of them at random: the flip augmentation for latents.
    The condition (label or caption) passes through."""

    def random_map(self, element, rng: np.random.Generator):
        return {**element, "moments": element["moments"][rng.integers(2)]}


def _pil(arr: np.ndarray):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return Image.fromarray(arr)


def make_train_iterator(source_kind: str, path: str, *, image_size: int, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None, workers: int = 0,
                        worker_buffer_size: int = 2, read_threads: int = 8, num_epochs: int | None = None):
    """Builds this host's infinite (or ``num_epochs``) training iterator.

    Args:
      source_kind: 'images' (any ImageNet layout ``imagenet.open_image_source`` reads) or 'latents'
        (a directory written by ``latents.extract_latents``).
      image_size: pixel resolution S; latents must have been extracted at S.
      global_batch_size: summed over hosts; must divide by process_count.
      seed: fixes the permutation, the shuffle of every epoch and the flips.
      process_index, process_count: this host and the host count (default: jax.process_index()/process_count()).
      workers: grain worker processes (0 = in the main process). Does not change the data or its order.
      read_threads: threads fetching records in each process (grain ReadOptions).
    Yields dicts of numpy arrays, B = global_batch_size // process_count:
      'image' float32 (B, S, S, 3) in [-1, 1] or 'moments' float32 (B, S/8, S/8, 8); 'label' int32 (B,), or for
      caption latents 'caption' float32 (B, L, C), 'mask' int32 (B, L) and 'caption_index' int32 (B,).
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} is outside [0, process_count={pc}).")
    if global_batch_size <= 0 or global_batch_size % pc:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of process_count {pc}.")
    if source_kind == "images":
        src = open_image_source(path)
        ops = [DropCorrupt(), CropFlip(image_size)]
    elif source_kind == "latents":
        src = LatentSource(path, image_size=image_size)
        ops = [PickView()]
    else:
        raise ValueError(f"source_kind must be 'images' or 'latents', got {source_kind!r}")
    per_host = global_batch_size // pc
    if workers > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker start reads absl flags; outside absl.app they are still unparsed
    if len(src) // pc < per_host:
        raise ValueError(f"{path} has {len(src)} records, fewer than one batch of {per_host} per host on {pc} hosts.")
    sampler = grain.IndexSampler(len(src), grain.ShardOptions(pi, pc, drop_remainder=True), shuffle=True,
                                 num_epochs=num_epochs, seed=seed)
    loader = grain.DataLoader(data_source=Permuted(src, seed), sampler=sampler,
                              operations=ops + [grain.Batch(per_host, drop_remainder=True)],
                              worker_count=workers, worker_buffer_size=worker_buffer_size,
                              # grain's default 500-record prefetch buffer costs more in bookkeeping than it
                              # gains for small latent records (measured with benchmarks/latent_throughput.py).
                              read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=128))
    return iter(loader)
