"""The post-training quantization methods by name (`quant.method`): each is a module of ptq/ with
`quantize(job) -> {"model", "model_cfg", "info"}` (ptq/run.py builds the job). Listed by module path and
imported when used, so the config check can name them without importing the models."""
from __future__ import annotations

import importlib

from terdit_jax.registry import Registry

METHODS: Registry[str] = Registry("quantization method", {
    "rtn": "terdit_jax.ptq.rtn",
    "ptq4dit": "terdit_jax.ptq.ptq4dit",
    "tqdit": "terdit_jax.ptq.tqdit",
})


def method_module(name: str):
    return importlib.import_module(METHODS.get(name))
