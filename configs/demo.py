"""The embedded demo (the default): a small ternary DiT on 4,500 real MNIST digits, pixel space, 2-core CPU.

    python -m terdit_jax.main                            # ~10 minutes: train, labelled grid, quality numbers
    python -m terdit_jax.main --config.model.linear=fp --workdir runs/demo_fp   # its full-precision twin
    python -m terdit_jax.main --workdir runs/demo_fp --mode quantize --config.quant.method=ptq4dit \
        --config.quant.w_bits=4 --config.quant.a_bits=8                           # the twin, post-training quantized

Differences from the paper's recipe, all because the budget is ~3,400 steps on a CPU instead of ~1M on GPUs:
v-prediction instead of ε (model.prediction), a fixed 2-D sin-cos position table next to RoPE (model.pos_embed;
"none" is the paper's architecture), a higher learning rate with a short warmup, an EMA that warms up, and 50
DDIM steps for the grid instead of 250 DDPM steps. The README gives the measured effect of each.
"""
from terdit_jax.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.name = "custom"
    m.dim, m.n_layers, m.n_heads = 64, 4, 4
    m.patch_size = 4  # 28×28 digits → 7×7 = 49 tokens
    m.in_channels = 1
    m.num_classes = 10
    m.multiple_of = 32
    m.pos_embed = "sincos"
    m.dtype = "float32"  # bf16 matmuls are no faster on CPUs
    # v-prediction instead of the paper's ε: at high noise, where a digit's shape is decided, a small model cannot
    # copy x_t into its ε output precisely enough (x̂0 = (x_t − sqrt(1−ᾱ)·ε̂)/sqrt(ᾱ) magnifies its error ~12× at
    # t = 700); there u = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 is mostly the digit itself.
    m.prediction = "v"

    d = c.data
    d.kind, d.image_size, d.latent = "digits", 28, False

    t = c.train
    t.steps = 3400
    t.batch_size = 64
    t.lr = 2e-3
    t.warmup_steps = 200
    t.lr_reduce_step = 2900  # TerDiT's late learning-rate reduction (paper App. A.3)
    t.lr_reduced = 4e-4
    t.ema_decay = 0.999  # 0.9999 would average over more steps than the demo trains
    t.ema_warmup = True
    t.log_every = 50
    t.sample_every = 10**9  # only the final grid: sampling on a CPU costs training time
    t.ckpt_every = 1000
    t.aot_memory_report = False

    s = c.sample
    s.classes = "0,1,2,3,4,5,6,7,8,9"
    s.per_class = 8
    s.sampler = "ddim"  # deterministic 50 steps: cleaner strokes than ancestral DDPM-100 at half the cost
    s.num_steps = 50
    s.cfg_scale = 4.0
    s.cfg_channels = None  # one grey channel: guide it (the 3-channel quirk is for 4-channel latents)
    s.batch_size = 80

    c.eval.batch_size = 80  # the grid's 80 samples in one Inception batch
    c.eval.digits_reference_size = 200  # Inception runs at ~4 images/s on 2 cores: keep the demo within 10 min
    c.eval.num_samples = 500  # --mode eval: FID-50K would take hours of CPU Inception

    # --mode quantize of the full-precision twin: 2,000 reconstruction iterations per unit (the study's budget, a
    # tenth of PTQ4DiT's 20,000, which would take hours on a CPU)
    c.quant.recon_iters = 2000
    return c
