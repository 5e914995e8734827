"""Noise schedules and timestep respacing (IDDPM / DiT semantics), in float64 NumPy.

Everything here runs once at construction time on the host; `gaussian.py` turns the results into float32 device
arrays. Keeping the arithmetic in float64 matches IDDPM/DiT, whose schedule buffers are float64 NumPy arrays.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Linear β schedule of IDDPM/DiT ("linear"): 1e-4 .. 0.02 for 1000 steps, both ends scaled by 1000/T.

    Returns: (T,) float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    # IDDPM get_named_beta_schedule("linear"): the scale keeps the total noise roughly constant for any T.
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Original timesteps kept when respacing a `num_timesteps`-step process (IDDPM `space_timesteps`).

    section_counts:
      * an int or list of ints: split [0, T) into that many equal sections (the first T % len sections get one extra
        step) and keep `count` evenly strided steps in each, rounding with Python's round (half to even);
      * a comma string like "250" or "25,25": the same, parsed;
      * "ddimN": the fixed integer stride S (smallest S >= 1) for which range(0, T, S) has exactly N steps (DDIM paper);
      * "linspaceN": diffusers' `timestep_spacing="linspace"` (PixArt's DPM-Solver++): linspace(0, T−1, N+1) rounded,
        the 0 left out (the last step goes from the smallest kept step to the clean sample).

    Returns: the set of kept original timesteps (sort it for the respaced order).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("linspace"):
            try:
                want = int(text[len("linspace"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'linspaceN' with an integer N, e.g. "
                                 f"'linspace20'") from None
            kept = set(np.linspace(0, num_timesteps - 1, want + 1).round().astype(int)[1:].tolist())
            if want < 1 or len(kept) != want:
                raise ValueError(f"cannot take {want} distinct linspace steps out of {num_timesteps}")
            return kept
        if text.startswith("ddim"):
            try:
                want = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N, e.g. 'ddim50'")
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {want} steps out of {num_timesteps} with one integer stride "
                             f"('ddim{want}'); pick a count such as a divisor of {num_timesteps}, or use '{want}'")
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: expected comma-separated integers like '250' or "
                             f"'10,15,20', 'ddimN' or 'linspaceN'")
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"each section needs at least one step, got {counts}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps "
                             f"(respacing {section_counts!r} of {num_timesteps})")
        # Evenly spaced including both ends of the section; the cumulative float index is rounded the way IDDPM
        # does it (accumulate, then Python round), so e.g. 250 of 1000 keeps {0, 4, 8, ..., 995, 999}.
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        idx = 0.0
        for _ in range(count):
            kept.append(start + round(idx))
            idx += stride
        start += size
    return set(kept)


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """β of the respaced process that keeps only `use_timesteps` (IDDPM SpacedDiffusion).

    β'_k = 1 − ᾱ_{s_k} / ᾱ_{s_{k−1}} with ᾱ_{s_{−1}} = 1, so the respaced ᾱ'_k equals the original ᾱ_{s_k}.

    Returns: (new_betas (K,) float64, timestep_map (K,) int64 with timestep_map[k] = s_k, ascending).
    """
    betas = np.asarray(betas, dtype=np.float64)
    keep = sorted(set(int(s) for s in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= len(betas):
        raise ValueError(f"timesteps to keep must lie in [0, {len(betas)}), got {keep[:3]}...{keep[-3:]}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for s in keep:
        new_betas.append(1.0 - alphas_cumprod[s] / last)
        last = alphas_cumprod[s]
    return np.asarray(new_betas, dtype=np.float64), np.asarray(keep, dtype=np.int64)
