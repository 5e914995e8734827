"""The embedded demo (the default): a small ternary DiT on 4,500 real MNIST digits, pixel space, 2-core CPU.

    python -m terdit_jax.main                      # train ~10 min, then sample a labelled grid
    python -m terdit_jax.main --config.model.linear=fp   # its full-precision twin
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.name = "custom"
    m.dim, m.n_layers, m.n_heads = 128, 4, 4
    m.patch_size = 4  # 28×28 digits → 7×7 = 49 tokens
    m.in_channels = 1
    m.num_classes = 10
    m.multiple_of = 32
    m.dtype = "float32"  # bf16 matmuls are slow on CPUs

    d = c.data
    d.kind, d.image_size, d.latent = "digits", 28, False

    t = c.train
    t.steps = 3000
    t.batch_size = 64
    t.lr = 1e-3
    t.lr_reduce_step = 2500
    t.lr_reduced = 2e-4
    t.ema_decay = 0.999  # short run: 0.9999 would average over more steps than it trains
    t.log_every = 50
    t.sample_every = 1000
    t.ckpt_every = 1000

    s = c.sample
    s.classes = "0,1,2,3,4,5,6,7,8,9"
    s.per_class = 8
    s.num_steps = 100
    s.cfg_scale = 2.0
    s.cfg_channels = None  # 1 grey channel: guide it (the 3-channel quirk is for 4-channel latents)
    s.batch_size = 80
    return c
