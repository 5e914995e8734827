"""Flax port of the Stable-Diffusion VAE (diffusers AutoencoderKL) and its weight loader."""

from terdit_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig, sample_latent
from terdit_jax.vae.convert import convert_state_dict, load_vae, read_state_dict

__all__ = ["AutoencoderKL", "VAEConfig", "sample_latent", "load_vae", "convert_state_dict", "read_state_dict"]
