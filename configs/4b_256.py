"""TerDiT-4.2B at 256 px (`DiT_Llama_3B_patch2`; paper: FID 2.42 with cfg 1.5, 1.18M steps at batch 512).

Full-precision twin (Large-DiT-4.2B): --config.model.linear=fp
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "DiT_Llama_3B_patch2"
    c.data.image_size = 256
    c.train.steps = 1_180_000
    c.train.batch_size = 512
    return c
