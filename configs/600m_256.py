"""TerDiT-600M at 256 px on ImageNet SD-VAE latents (paper Table 1: FID 4.34 with cfg 1.5).

Full-precision twin (Large-DiT-600M): --config.model.linear=fp
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "DiT_Llama_600M_patch2"
    c.data.image_size = 256
    c.train.steps = 875_000  # ≈ 448M images at batch 512 (Table 1)
    c.train.batch_size = 512
    return c
