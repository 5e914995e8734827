"""PixArt-α XL/2 at 512 px (Chen et al. 2023; diffusers `PixArt-alpha/PixArt-XL-2-512x512`): 610,856,096
trainable parameters plus the fixed 1024×1152 position table (612,035,744 as the original .pth counts it).

What exists: the model family (`model.family=pixart`, equal to diffusers' PixArtTransformer2DModel), its
state-dict importer (terdit_jax.convert.pixart_diffusers.load_diffusers), and sampling from prompts with PixArt's
settings (DPM-Solver++(2M), 20 steps, CFG 4.5 on all ε channels with the empty prompt):

    python -m terdit_jax.main --mode sample --config configs/pixart_alpha_512.py --workdir W \
        --config.sample.prompts=prompts.txt --config.text.encoder_path=PixArt-XL-2-512x512/text_encoder
    (or --config.sample.prompt_embeds=captions.npz, written by --mode encode_prompts)

See README, "Text-to-image (PixArt)", for what is not built yet.
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
    m.caption_len = 120  # PixArt-α's T5 token limit
    s = c.sample  # diffusers' PixArtAlphaPipeline defaults
    s.sampler, s.num_steps, s.cfg_scale, s.cfg_channels = "dpm++", 20, 4.5, None
    d = c.data
    d.kind, d.image_size, d.latent = "imagenet_latents", 512, True
    return c
