"""The original DiT-XL/2 at 512 px (released weights: FID-50K 3.04 with cfg 1.5, 250 DDPM steps): the 256 px
config (configs/dit_xl2_256.py, which says how to import the weights and sample) on 64×64 latents.

    python -m terdit_jax.convert.dit_official DiT-XL-2-512x512.pt runs/dit_xl2_512
    python -m terdit_jax.main --config configs/dit_xl2_512.py --workdir runs/dit_xl2_512 --mode sample \
        --config.data.vae_path=vae/

The 512 px model has its own weights (1024 tokens; the fixed position table depends on the resolution), so a
256 px checkpoint is no substitute for it.
"""
from terdit_jax.configs.dit_xl2_256 import get_config as _config_256


def get_config():
    c = _config_256()
    c.data.image_size = 512
    c.train.steps = 3_000_000  # the released 512 px model was trained for 3M steps
    # PTQ at 512 px as the official PTQ4DiT README runs it (--cali_st 10 --cali_n 128 --cali_batch_size 16):
    # 10 calibration steps × 64 latents × {class, null} = 128 entries per step, reconstruction batches of 16
    c.quant.calib_steps = 10
    c.quant.calib_latents = 64
    c.quant.recon_batch_size = 16
    c.quant.ho_batch_size = 2  # TQ-DiT's HO backward passes: 2 entries of 1024 tokens at a time
    return c
