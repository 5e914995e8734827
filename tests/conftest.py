import os

# Tests run on the CPU; a GPU visible to the test process would change numerics and timings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from terdit_jax.config import base_config, finalize  # noqa: E402


def tiny_config(**model):
    """A 2-block Large-DiT on 8×8×4 latents (16 tokens of width 32), float32; `model` overrides model fields."""
    c = base_config()
    c.model.update({**dict(name="custom", dim=32, n_layers=2, n_heads=4, multiple_of=16, patch_size=2, in_channels=4,
                           num_classes=10, dtype="float32"), **model})
    c.data.image_size = 64  # latent 8×8; K = 32 pads to 128 in the packed layout
    return finalize(c)


def tiny_model_config(**model):
    return tiny_config(**model).model
