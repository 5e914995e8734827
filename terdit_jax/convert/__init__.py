"""Importers of officially released checkpoints (TerDiT, DiT). torch is needed here only, imported lazily."""
import importlib.util
import os


def torch_module(what: str):
    """torch, or one clear ImportError that says how to install the CPU build for `what`."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {what} needs PyTorch (CPU is enough): pip install 'terdit-jax[convert]'") from e
    return torch


def shipped_config(name: str) -> str:
    """The absolute path of a config file that ships with the package (configs/ installs as terdit_jax.configs), so
    that a printed command runs from any folder."""
    import terdit_jax.configs
    return os.path.join(os.path.dirname(os.path.abspath(terdit_jax.configs.__file__)), name)


def load_config_file(path: str, error: type[Exception]):
    """get_config() of a config file (as `python -m terdit_jax.main --config PATH` loads it); FileNotFoundError
    when there is none, `error` when the file fails."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such config file")
    try:
        spec = importlib.util.spec_from_file_location("_convert_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported the same way
        raise error(f"could not load the config file {path} ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                    ) from e
