"""The original DiT-XL/2 at 256 px (Peebles & Xie 2023; released weights: FID-50K 2.27 with cfg 1.5, 250 DDPM steps).

Import the released weights (torch is needed only for this step: pip install 'terdit-jax[convert]'), then sample:

    wget https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt
    python -m terdit_jax.convert.dit_official DiT-XL-2-256x256.pt runs/dit_xl2_256
    python -m terdit_jax.main --config configs/dit_xl2_256.py --workdir runs/dit_xl2_256 --mode sample \
        --config.data.vae_path=vae/   # a diffusers SD-VAE folder (DiT's sample.py uses sd-vae-ft-mse)

The grid follows DiT's sample.py (its eight classes, cfg 4.0, seed 0). For FID use its sample_ddp.py protocol:
--mode eval --config.sample.cfg_scale=1.5 with the sd-vae-ft-ema VAE. Guidance acts on the first 3 latent channels
only (sample.cfg_channels = 3), the official `forward_with_cfg` quirk. The model runs in float32, as the official
(fp32 with TF32 matmuls), which is also what post-training quantization calibrates against.

Training follows DiT's train.py (AdamW lr 1e-4, no weight decay, batch 256, EMA 0.9999) except that the project's
gradient clipping (train.grad_clip) stays on; the official does not clip. model.quantized_layers names the layers
a ternary run (--config.model.linear=ternary) quantizes.
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.family = "dit"
    m.name = "DiT-XL/2"
    m.linear = "fp"
    m.quantized_layers = "attn,mlp,adaLN_modulation"
    m.dtype = "float32"
    m.learn_sigma = True
    m.prediction = "eps"

    d = c.data
    d.kind, d.image_size, d.latent = "imagenet_latents", 256, True

    t = c.train
    t.steps = 7_000_000  # the released XL/2 checkpoints were trained for 7M steps
    t.batch_size = 256
    t.lr = 1e-4
    t.weight_decay = 0.0
    t.ema_decay = 0.9999

    s = c.sample
    s.classes = "207,360,387,974,88,979,417,279"  # DiT's sample.py
    s.per_class = 1
    s.sampler = "ddpm"
    s.num_steps = 250
    s.cfg_scale = 4.0
    s.cfg_channels = 3
    s.seed = 0
    return c
