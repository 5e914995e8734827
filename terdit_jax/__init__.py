"""TerDiT in JAX/Flax: ternary-weight diffusion transformers."""
from terdit_jax import host_memory, xla_flags

xla_flags.apply()  # cuBLAS GEMMs on GPUs, Eigen convolutions on CPUs (TERDIT_CPU_EIGEN=1: all Eigen); before JAX starts
host_memory.apply()  # one malloc arena per core, the heap trimmed after long compiles: less freed heap resident
