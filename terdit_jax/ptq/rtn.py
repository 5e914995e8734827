"""Round-to-nearest: the baseline every PTQ paper starts from. The same sites and granularities as PTQ4DiT
(weights per output channel, activations per tensor, asymmetric), ranges by min-max — weights from themselves,
activations from the calibration set's statistics subset, unit by unit — and nothing else."""
from __future__ import annotations

from terdit_jax.ptq import common as ptq


def quantize(job) -> dict:
    q, fp_cfg = job.config.quant, job.fp_cfg
    q_cfg = ptq.with_sites(fp_cfg, ptq.uniform_rules(fp_cfg, q.w_bits, q.a_bits, init="minmax",
                                                     softmax_bits=int(q.softmax_bits)))
    model = ptq.host_model(q_cfg, job.fp_values)
    ptq.init_quantizers(job, model, q_cfg)
    info = {"init": "minmax", "softmax_bits": int(q.softmax_bits) if q.a_bits < 16 else None}
    return {"model": model, "model_cfg": q_cfg, "info": info}
