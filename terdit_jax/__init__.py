"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
