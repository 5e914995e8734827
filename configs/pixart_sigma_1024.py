"""PixArt-Σ XL/2 at 1024 px (Chen et al. 2024; diffusers `PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`): 610,856,096
trainable parameters plus the fixed 4096×1152 position table (615,574,688 as the original .pth counts it).

PixArt-α's architecture and sampling settings (configs/pixart_alpha_512.py, which says what exists and how to
sample from prompts) with Σ's longer caption (300 T5 tokens: prompts are tokenized to 300) and resolution.
"""
from terdit_jax.configs.pixart_alpha_512 import get_config as alpha_config


def get_config():
    c = alpha_config()
    c.model.caption_len = 300  # PixArt-Σ's T5 token limit
    c.data.image_size = 1024
    # PixArt-Σ's latents are the SDXL VAE's (the pipeline's vae/ folder as data.vae_path: the SD-VAE architecture,
    # its own weights), scaled by its scaling_factor 0.13025 instead of the SD-VAE's 0.18215
    c.data.latent_scale = 0.13025
    return c
