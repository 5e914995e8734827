"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
from terdit_jax import xla_flags

xla_flags.apply()  # opt-in XLA settings (TERDIT_CPU_EIGEN=1), before JAX starts a backend
