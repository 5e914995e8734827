import os
import tempfile

# Tests run on the CPU; a GPU visible to the test process would change numerics and timings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0 for the tests and the subprocesses they start: compiling tiny programs is most of what the suite
# spends, and -O0 compiles them faster (the whole suite: 774 s → 548 s on the 2-core VM under the same load, measured)
# while toy shapes run fast enough unoptimised. Tolerances are unchanged.
XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in XLA_FLAGS:  # a level the caller names is kept (to compare levels)
    XLA_FLAGS = (XLA_FLAGS + " --xla_backend_optimization_level=0").strip()
os.environ["XLA_FLAGS"] = XLA_FLAGS

import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _InstalledKernelsFirst(importlib.abc.MetaPathFinder):
    """transformers (and diffusers through it) imports the Hugging Face `kernels` package when it is installed; at
    the repo root the repo's kernels/ folder (installed as terdit_kernels) would shadow it and break the import."""

    def find_spec(self, name, path, target=None):
        if name != "kernels":
            return None
        return importlib.machinery.PathFinder.find_spec(
            name, [p for p in sys.path if os.path.abspath(p or ".") != _ROOT])


sys.meta_path.insert(0, _InstalledKernelsFirst())

from terdit_jax.config import base_config, finalize  # noqa: E402

# JAX's persistent compilation cache for the tests that compile the same programs again (and their subprocesses):
# one folder per pytest-xdist worker, because JAX writes cache files in place.
CACHE = os.path.join(tempfile.gettempdir(), "terdit_jax_test_xla_cache" + os.environ.get("PYTEST_XDIST_WORKER", ""))


@pytest.fixture(scope="module")
def xla_cache():
    """Reuse compiled programs (same HLO) through JAX's persistent cache while a module runs."""
    from jax._src import compilation_cache as cc
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def tiny_config(**model):
    """A 2-block Large-DiT on 8×8×4 latents (16 tokens of width 32), float32; `model` overrides model fields."""
    c = base_config()
    c.model.update({**dict(name="custom", dim=32, n_layers=2, n_heads=4, multiple_of=16, patch_size=2, in_channels=4,
                           num_classes=10, dtype="float32"), **model})
    c.data.image_size = 64  # latent 8×8; K = 32 pads to 128 in the packed layout
    return finalize(c)


def tiny_model_config(**model):
    return tiny_config(**model).model


def diffusers_pixart(*, sample_size, dim, heads, layers, caption_channels, patch=2, micro=False, seed=0, scale=0.2):
    """diffusers' PixArtTransformer2DModel (PixArt-α's block settings) of a tiny config, every parameter redrawn
    N(0, scale²) so that no path is zero-initialised; the reference the pixart tests compare against."""
    import torch
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(sample_size=sample_size, patch_size=patch, in_channels=4, out_channels=8,
                                     num_layers=layers, num_attention_heads=heads, attention_head_dim=dim // heads,
                                     cross_attention_dim=dim, caption_channels=caption_channels,
                                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                     attention_bias=True, activation_fn="gelu-approximate",
                                     use_additional_conditions=micro).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model
