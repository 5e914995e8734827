"""Quantization primitives below the models: quantization sites, fake quantizers and their integer codes.

The post-training methods, which import the models, live a floor higher in `terdit_jax.ptq`.
"""
