"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
from terdit_jax import xla_flags

xla_flags.apply()  # cuBLAS GEMMs on GPUs, Eigen convolutions on CPUs (TERDIT_CPU_EIGEN=1: all Eigen); before JAX starts
