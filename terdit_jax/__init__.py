"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
from terdit_jax import xla_defaults

xla_defaults.apply()
