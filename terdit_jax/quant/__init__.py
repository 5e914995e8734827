"""Quantization beyond ternary QAT: quantization sites, fake quantizers, calibration and the PTQ methods.

Imports nothing, so that the models can use `quant.sites` without pulling in the methods above them.
"""
