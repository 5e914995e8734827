"""PixArt-α XL/2 at 1024 px (diffusers `PixArt-alpha/PixArt-XL-2-1024-MS`): PixArt-α 512's model with the
multi-scale model's micro-conditions (the image's height, width and aspect ratio, embedded like the timestep and
added to it; square images at 1024 px when sampling) and the position table interpolated ×2. Import the released
weights with `python -m terdit_jax.convert.pixart_official SRC OUT --config configs/pixart_alpha_1024.py`.
"""
from terdit_jax.configs.pixart_alpha_512 import get_config as alpha_512


def get_config():
    c = alpha_512()
    c.model.micro_conditions = True
    c.data.image_size = 1024
    return c
