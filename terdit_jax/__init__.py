"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
from terdit_jax import xla_flags

xla_flags.apply()  # cuBLAS GEMMs on GPUs; TERDIT_CPU_EIGEN=1: Eigen dots on CPUs; before JAX starts a backend
