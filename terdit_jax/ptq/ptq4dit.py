"""PTQ4DiT (Wu et al., NeurIPS 2024, arXiv 2405.16005), with the official code's constants (ptq_baselines.md §2).

Stages, in the order of the official quant_sample.py:
1. CSB with SSC (§2.4–2.5) on the layers the paper names: qkv, proj, fc1 (Large-DiT: wq/wk/wv with one factor,
   wo, w1/w3 with one factor; PixArt: to_q, to_k, to_v and to_out_0 of self- and cross-attention and ff_net_0_proj,
   each with its own factor, as each quantizes its own input). Salience s(X_j) = max |X_{·,j}| from a full-precision pass over the statistics
   subset, s(W_j) = max over outputs of |W_{j,·}|; SSC weights η = softmax(−ρ) of the Spearman correlations ρ
   between s(X) and s(W) per time step (the paper; `quant.ssc="sample"`: per calibration sample as the code);
   f = sqrt(s_ρ(X)/(s(W) + 1e-8)); the weight rows are multiplied by f and the activation divided by f before its
   quantizer (the official unfused form). `quant.reparam` folds the division into the adaLN rows (shift/scale
   chunks, or the pre-norm weight where there is one) and into W_v instead, exactly equivalent (§2.6, which the
   official code never released).
2. Weight quantizers (per output channel, asymmetric, percentile-MSE) on the balanced weights.
3. Activation quantizers (per tensor, asymmetric, percentile-MSE) unit by unit from the statistics subset.
4. Reconstruction (ptq/reconstruct.py) of every unit: the embedder, the t-MLP's two linears one after the
   other (layer reconstruction, as the code: mlp_0 against its FP output, then mlp_2 against c; `quant.t_mlp=
   "joint"` reconstructs the conditioning unit as one), each block, the final layer; resumable unit by unit.

One departure, documented: f is floored at 1e-5 (a channel never active in the statistics subset would otherwise
be divided by zero).
"""
from __future__ import annotations

import re
import time

import numpy as np

from terdit_jax.ptq import common as ptq
from terdit_jax.ptq.reconstruct import ReconSettings, reconstruct
from terdit_jax.ptq.units import PARTS, Carry, advance, observe_unit, run_unit, target_of, unit_list

SSC_MODES = ("timestep", "sample")
T_MLP_MODES = ("layers", "joint")  # the t-MLP's two linears reconstructed one after the other (the code), or as one
F_FLOOR = 1e-5


def ssc_weights(s_x: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """η_i = softmax(−ρ_i) with ρ_i = Spearman(s_x[i], s_w): rows whose salience ranks disagree with the weights'
    weigh most (PTQ4DiT Eq. 11). s_x (n, C), s_w (C,) → (n,)."""
    from scipy import stats  # here, not at the top: scipy.stats takes ~0.7 s to import and every CLI imports this
    rho = np.array([stats.spearmanr(row, s_w).statistic for row in s_x], np.float64)
    rho = np.nan_to_num(rho)  # a constant row has no rank order
    e = np.exp(-(rho - rho.min()))
    return e / e.sum()


def balance_factor(s_x: np.ndarray, t: np.ndarray, s_w: np.ndarray, mode: str) -> np.ndarray:
    """CSB's f (C,) from per-sample activation salience s_x (n, C) at timesteps t (n,) and weight salience s_w."""
    if mode == "timestep":
        ts = np.unique(t)
        s_x = np.stack([s_x[t == v].max(axis=0) for v in ts])
    s_rho = ssc_weights(s_x, s_w) @ s_x
    return np.maximum(np.sqrt(s_rho / (s_w + 1e-8)), F_FLOOR).astype(np.float32)


def csb_groups(model, roles: ptq.Roles) -> list[tuple[str, tuple[str, ...]]]:
    """Per block, (input site, the linears reading it): the linears of a group share one balancing factor."""
    return [(f"{b}.{site}", tuple(f"{b}.{r}" for r in group)) for b in ptq.block_prefixes(model)
            for site, group in roles.csb_groups()]


def salience(fp_cfg, fp_values: dict, calib, groups, *, log=print, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{input site: per-sample channel salience (n, C)} from a full-precision pass over the statistics subset,
    with observers (max |x| over tokens) on each group's input site."""
    rules = tuple({"path": re.escape(site), "kind": "observe", "reduce": "channel_absmax"} for site, _ in groups)
    model = ptq.host_model(ptq.with_sites(fp_cfg, rules), fp_values)
    carry, seen = ptq.calib_carry(calib, calib.init), {}
    for unit in unit_list(model):
        seen.update(observe_unit(model, unit, carry, batch_size=batch_size))
        carry = advance(model, unit, carry, batch_size=batch_size)
    return seen


def apply_csb(model, groups, factors: dict[str, np.ndarray]) -> None:
    """Weights: rows × f (W̃ = B^W W); inputs: the sites' divisor f (X̃ = X B^X). X̃ W̃ = X W exactly."""
    for site, linears in groups:
        f = factors[site]
        for path in linears:
            lin = ptq.module_at(model, path)
            lin.kernel[...] = lin.kernel[...] * f[:, None]
        ptq.site_at(model, site).smooth[...] = f


def fold(model, roles: ptq.Roles, family: str) -> None:
    """Offline re-parameterization (PTQ4DiT §4.3): move each CSB divisor out of the input sites into the layers
    before them, then set the sites' divisors to 1. The attention-input and FFN-input divisors go into the
    modulation (the pre-norm weight absorbs 1/f where the family has one, the shift chunk becomes shift/f; without
    a pre-norm weight the scale chunk becomes (1+scale)/f − 1), the output-projection divisor into W_v's columns.
    Exact in full precision; a per-tensor quantizer of v then sees v/f (the official code has no fold to compare)."""
    for b in ptq.block_prefixes(model):
        block = ptq.module_at(model, b)
        for role_group, norm_name, chunk in ((roles.attn_in, "attention_norm", 0), (roles.mlp_in, "ffn_norm", 3)):
            site = ptq.site_at(model, f"{b}.{roles.input_of(role_group)}")
            f = np.asarray(site.smooth[...])
            norm = getattr(block, norm_name, None)
            if norm is not None:  # Large-DiT: modulate(RMSNorm(x)·w, shift, scale) / f
                norm.weight[...] = norm.weight[...] / f
                _scale_chunk(block, chunk, 1.0 / f)
            else:  # DiT: LayerNorm without affine, so the scale chunk takes 1/f
                _scale_chunk(block, chunk, 1.0 / f)
                _scale_chunk(block, chunk + 1, 1.0 / f, plus_one=True)
            site.smooth[...] = np.ones_like(f)
        out_site = ptq.site_at(model, f"{b}.{roles.input_of(roles.attn_out)}")
        f = np.asarray(out_site.smooth[...])
        _scale_v(ptq.module_at(model, f"{b}.{roles.attention}"), family, 1.0 / f)
        out_site.smooth[...] = np.ones_like(f)


def _scale_chunk(block, chunk: int, s: np.ndarray, plus_one: bool = False) -> None:
    """Multiply modulation chunk `chunk` (of 6) by s; with `plus_one`, (1 + chunk) instead. Through the TerDiT
    adaLN RMSNorm's weight when the block has one (it scales the normalised chunk), else the adaLN linear."""
    d = s.shape[0]
    cols = slice(chunk * d, (chunk + 1) * d)
    norm = getattr(block, "adaLN_norm", None)
    if norm is not None:
        if plus_one:
            raise ValueError("cannot fold a (1 + scale) factor through the adaLN RMSNorm")
        norm.weight[...] = norm.weight[...].at[cols].multiply(s)
        return
    lin = block.adaLN_modulation
    lin.kernel[...] = lin.kernel[...].at[:, cols].multiply(s)
    bias = lin.bias[...]
    lin.bias[...] = bias.at[cols].set((bias[cols] + 1.0) * s - 1.0 if plus_one else bias[cols] * s)


def _scale_v(attention, family: str, s: np.ndarray) -> None:
    """Scale the value projection's output columns by s (the attention output channels follow them)."""
    if family == "dit":  # fused qkv: columns [2D, 3D) are V
        lin, d = attention.qkv, s.shape[0]
        lin.kernel[...] = lin.kernel[...].at[:, 2 * d:].multiply(s)
        lin.bias[...] = lin.bias[...].at[2 * d:].multiply(s)
    else:
        attention.wv.kernel[...] = attention.wv.kernel[...] * s
        if attention.wv.bias is not None:
            attention.wv.bias[...] = attention.wv.bias[...] * s


def quantize(job) -> dict:
    """PTQ4DiT on job.fp_values; returns {"model", "model_cfg", "info"} (see ptq/run.py for the job)."""
    q, fp_cfg = job.config.quant, job.fp_cfg
    roles = ptq.roles(fp_cfg)
    family = fp_cfg.get("family", "large_dit")
    if q.reparam and q.csb and (roles.cross is not None or not roles.attn_input):
        raise ptq.QuantizeError(f"config.quant.reparam: the fold is written for one attention with a shared input "
                                f"site (Large-DiT, DiT), not the {family!r} family; leave quant.reparam=False (the "
                                "balancing stays inside the input quantizers, exactly as the fold would compute)")
    smooth = ptq.csb_inputs(roles) if q.csb else ()
    q_cfg = ptq.with_sites(fp_cfg, ptq.uniform_rules(fp_cfg, q.w_bits, q.a_bits, init=q.init, smooth_inputs=smooth,
                                                     softmax_bits=int(q.softmax_bits)))
    model = ptq.host_model(q_cfg, job.fp_values)
    info = {"csb": bool(q.csb), "ssc": q.ssc if q.csb else None, "reparam": bool(q.reparam and q.csb),
            "recon": bool(q.recon), "recon_iters": int(q.recon_iters) if q.recon else 0, "init": q.init,
            "t_mlp": q.t_mlp if q.recon else None,
            "softmax_bits": int(q.softmax_bits) if q.a_bits < 16 else None}
    done = 0
    if job.resume is not None:
        ptq.set_values(model, job.resume[0])
        done = int(job.resume[1]["done_units"])
        job.log(f"resuming PTQ4DiT at unit {done + 1} of {len(unit_list(model))} from {job.partial_dir}")
    else:
        if q.csb:
            with job.stage("csb"):
                groups = csb_groups(model, roles)
                sal = salience(fp_cfg, job.fp_values, job.calib, groups, log=job.log)
                factors = {}
                for site, linears in groups:
                    s_w = np.max([np.abs(np.asarray(ptq.module_at(model, p).kernel[...])).max(axis=1)
                                  for p in linears], axis=0)
                    factors[site] = balance_factor(sal[site], job.calib.t[job.calib.init], s_w, q.ssc)
                apply_csb(model, groups, factors)
                if q.reparam:
                    fold(model, roles, family)
        ptq.init_quantizers(job, model, q_cfg)
        job.save(model, {"done_units": 0})
    if q.recon:
        with job.stage("reconstruction"):
            info["units"] = reconstruct_all(job, model, done)
    return {"model": model, "model_cfg": q_cfg, "info": info}


def reconstruct_all(job, model, done: int) -> list[dict]:
    """Reconstruct every unit from `done` on, saving the model after each (resume point). Returns every unit's
    report, those of an interrupted run's units included."""
    q = job.config.quant
    fp = ptq.host_model(job.fp_cfg, job.fp_values)
    carry_q: Carry = ptq.calib_carry(job.calib)
    carry_fp = carry_q.copy()
    settings = ReconSettings(iters=int(q.recon_iters), batch_size=int(q.recon_batch_size), seed=int(q.calib_seed))
    units = unit_list(model)
    report = list(job.resume[1].get("units", [])) if done else []
    for i, unit in enumerate(units):
        carry_fp_next = advance(fp, unit, carry_fp)
        if i >= done:
            job.log(f"reconstruction: unit {i + 1} of {len(units)} ({unit.name})")
            for part in unit.parts(model) if q.t_mlp == "layers" else [unit]:
                t0 = time.perf_counter()
                own = PARTS.get(part.part) is not None  # a linear judged at its own output
                target = run_unit(fp, part, carry_fp) if own else target_of(unit, carry_fp_next)
                r = reconstruct(model, part, carry_q, target, job.calib.groups(), settings,
                                desc=f"unit {i + 1}/{len(units)} {part.name}")
                report.append({"unit": part.name, "kind": unit.kind, **r,
                               "seconds": round(time.perf_counter() - t0, 2)})
            job.save(model, {"done_units": i + 1, "units": report})
            if i + 1 < len(units):
                job.log(f"reconstruction: unit {i + 1} took {report[-1]['seconds']:.0f} s; " + job.estimate(
                    [(u["kind"], u["seconds"]) for u in report if "seconds" in u], [u.kind for u in units[i + 1:]]))
        carry_q, carry_fp = advance(model, unit, carry_q), carry_fp_next
    return report
