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


def fill_state(state_dict: dict, model_cfg, lookup, used: set, what: str, error: type[Exception]):
    """Our params (the nnx.State of the model `model_cfg` builds), each variable filled by lookup(path, want) from
    `state_dict` (`trees.fill`); `used` holds the keys lookup read and those checked elsewhere. Missing, unknown
    and misshapen tensors raise one `error` that lists them after `what` ("x.pt does not match DiT-XL/2 (...)")."""
    from terdit_jax import trees
    from terdit_jax.model_fn import abstract_model

    state, missing, bad = trees.fill(abstract_model(model_cfg)[1], lookup)
    unknown = sorted(set(state_dict) - used)
    if missing or unknown or bad:
        short = lambda xs: f"{xs[:8]}{f' … ({len(xs)} in all)' if len(xs) > 8 else ''}"  # noqa: E731
        raise error(f"{what}: missing keys {short(missing)}; unknown keys {short(unknown)}; bad tensors {short(bad)}")
    return state


def save_imported(ckpt_dir: str, params, model_cfg, source: dict) -> str:
    """Write imported weights as the weights-only checkpoint step 0 of ckpt_dir (what --mode sample|eval read)
    and return its path."""
    from terdit_jax.checkpoint import Checkpoints

    ckpt = Checkpoints(ckpt_dir, async_save=False)
    try:
        ckpt.save_weights(0, params, model_cfg, source)
    finally:
        ckpt.close()
    return os.path.join(ckpt_dir, "0")
