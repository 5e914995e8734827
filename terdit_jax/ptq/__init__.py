"""Post-training quantization (RTN, PTQ4DiT, TQ-DiT) of full-precision DiTs, above the models: calibration sets,
units, reconstruction, the methods, the quantized-model format, `--mode quantize`, and deployment as integers.

Imports nothing, so that the config check can name the methods without importing the models.
"""
