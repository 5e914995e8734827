"""TerDiT-4.2B at 512 px, continued from the 256 px run (paper: FID 2.81 with cfg 1.5).

The model has no absolute position table (RoPE only), so 256 px weights load unchanged.
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "DiT_Llama_3B_patch2"
    c.data.image_size = 512
    c.train.steps = 1_360_000  # ≈ 696M images at batch 512 (Table 1)
    c.train.batch_size = 512
    c.train.init_from = ""  # set to the 256 px run's workdir to continue from it, as the paper does
    c.parallel.remat = "dots"  # 1024 tokens per image: keep activations within 80 GB devices
    return c
