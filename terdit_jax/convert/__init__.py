"""Importers of officially released checkpoints (TerDiT, DiT). torch is needed here only, imported lazily."""


def torch_module(what: str):
    """torch, or one clear ImportError that says how to install the CPU build for `what`."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {what} needs PyTorch (CPU is enough): pip install 'terdit-jax[convert]'") from e
    return torch
