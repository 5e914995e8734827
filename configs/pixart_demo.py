"""The text-to-image demo: a tiny PixArt (family "pixart", full precision) on the 4,500 MNIST digits, pixel space,
2-core CPU, conditioned on one caption per class ("a handwritten digit zero", ...).

    python -m terdit_jax.main --config configs/pixart_demo.py     # train, then a grid with one row per caption

The captions' embeddings come from a 2-layer T5 v1.1 encoder (terdit_jax/text/t5.py) with RANDOM weights and byte
tokens (data/digits.py `digit_captions`), made at start-up, no download: it exercises the caption path (tokens,
mask, cross-attention, dropout to the empty prompt, CFG against it) but knows no language, so the model learns
which token sequence means which digit. `--config.data.caption_embeds=FILE.npz` (text.captions format, ten prompts
in class order) trains on other embeddings, e.g. a real T5's. The training recipe is the class demo's
(configs/demo.py: v-prediction, warmup, EMA warmup, DDIM-50 grids, cfg 4).
"""
from terdit_jax.configs import demo


def get_config():
    c = demo.get_config()
    m = c.model
    m.family = "pixart"
    m.name = "custom"
    m.dim, m.n_layers, m.n_heads = 64, 4, 4
    m.patch_size = 4  # 28×28 digits → 49 tokens
    m.linear = "fp"
    m.quantized_layers = "attn1,attn2,ff_net"
    m.caption_channels = 32  # the random T5's width
    m.caption_len = 32  # byte tokens: the longest prompt is 25 bytes + EOS
    m.class_dropout_prob = 0.1  # PixArt's caption dropout (uncond_prob)
    m.num_classes = 10  # not read by the model: the grid rows and the quality check count the ten captions
    # a PixArt step costs ~1.25× a class-demo step on the 2-core VM (measured): fewer steps, same wall time
    c.train.steps = 2800
    c.train.lr_reduce_step = 2400
    return c
