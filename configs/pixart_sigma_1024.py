"""PixArt-Σ XL/2 at 1024 px (Chen et al. 2024; diffusers `PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`): 610,856,096
trainable parameters plus the fixed 4096×1152 position table (615,574,688 as the original .pth counts it).

What exists: the model family (`model.family=pixart`, equal to diffusers' PixArtTransformer2DModel) and its
state-dict importer (terdit_jax.convert.pixart_diffusers.load_diffusers). Prompt sampling, the T5 encoder,
DPM-Solver++ and training on caption shards are not built yet (README, "Text-to-image (PixArt)").
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.family = "pixart"
    m.name = "PixArt-XL/2"
    m.linear = "fp"
    m.quantized_layers = "attn1,attn2,ff_net"
    m.dtype = "float32"
    m.learn_sigma = True
    m.prediction = "eps"
    m.caption_channels = 4096  # T5-XXL
    m.caption_len = 300  # PixArt-Σ's T5 token limit
    d = c.data
    d.kind, d.image_size, d.latent = "imagenet_latents", 1024, True  # SDXL VAE
    return c
