"""FPA offline objectives as a trainer mode (``--algo fpa_dpo | fpa_rpo | fpa_simper | fpa_kto | fpa_pg``).

Per RL step the loop rolls out G responses per prompt as usual; this module then

1. builds preference pairs: for each prompt whose G rewards are not all equal, the first highest-reward
   response is "chosen" and the first lowest-reward one "rejected" (on the 0/1 toy tasks: one correct vs one
   incorrect response of the same prompt); prompts with only correct or only incorrect responses give none;
2. runs one policy forward over the 2n paired rows and one no-grad forward of the frozen reference (the
   warm-start model), and ``ops.fpa_logprobs`` -> per-token log pi_theta, log pi_ref, log pi_hat
   (pi_hat = softmax((1 + lam) h_theta - lam h_ref), ``--fpa-lam``; lam = 0 is the base method);
3. evaluates the objective of ``ops.fpa.objectives`` (coefficients at pi_hat, ``--fpa-side``), one backward,
   gradient clipping, one optimizer step (none when the gradient is not finite: ``update.skipped``).

Unpaired objectives use the same rows: KTO takes chosen as desirable and rejected as undesirable (kl = 0);
the offline PG takes the rows' group advantages (the trainer's ``--advantage``). A step with no pair makes no
update (0 backward passes, ``update.skipped``).

Shapes: B = P * G rollout rows, T response tokens, V vocabulary; n pairs -> 2n rows (chosen first).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Tuple

import torch

from ..ops.fpa.logprobs import fpa_logprobs
from ..ops.fpa.objectives import (FPALogProbs, fpa_dpo_loss, fpa_kto_loss, fpa_offline_pg_loss, fpa_rpo_loss,
                                  fpa_simper_loss)
from .model import amp
from .rollout import Rollout, loss_backend, response_logits


def build_pairs(rewards: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B,) rewards, each prompt's G responses contiguous -> (chosen rows (n,), rejected rows (n,)) int64.

    One pair per prompt whose rewards are not all equal: its first max-reward and first min-reward response.
    """
    if rewards.dim() != 1 or rewards.numel() % group:
        raise ValueError(f"rewards must be (P * G,) with G = {group}, got shape {tuple(rewards.shape)}")
    r = rewards.view(-1, group)
    hi, lo = r.max(1), r.min(1)          # .indices: the first occurrence of the max / min
    keep = (hi.values > lo.values).nonzero().squeeze(1)
    base = keep * group
    return base + hi.indices[keep], base + lo.indices[keep]


def objective(cfg, batch: FPALogProbs, n: int, advantages: torch.Tensor):
    """The ``cfg.algo`` objective on 2n rows (chosen first) -> (loss, metrics of ``ops.fpa.objectives``)."""
    name = cfg.algo[len("fpa_"):]
    if name in ("dpo", "rpo", "simper"):
        w = FPALogProbs(*(None if t is None else t[:n] for t in batch))
        l = FPALogProbs(*(None if t is None else t[n:] for t in batch))
        if name == "dpo":
            return fpa_dpo_loss(w, l, beta=cfg.fpa_beta, fpa_side=cfg.fpa_side)
        if name == "rpo":
            return fpa_rpo_loss(w, l, beta=cfg.fpa_beta, alpha=cfg.fpa_rpo_alpha, fpa_side=cfg.fpa_side)
        return fpa_simper_loss(w, l, fpa_side=cfg.fpa_side)
    if name == "kto":
        desirable = torch.arange(2 * n, device=batch.logp.device) < n
        return fpa_kto_loss(batch, desirable, beta=cfg.fpa_beta, fpa_side=cfg.fpa_side)
    if name == "pg":
        return fpa_offline_pg_loss(batch, advantages.float(), fpa_side=cfg.fpa_side)
    raise ValueError(f"unknown FPA objective {cfg.algo!r}")


def _side_means(c_w: torch.Tensor, c_l: torch.Tensor, n: int) -> Tuple[float, float]:
    # paired objectives return (n,) coefficients; unpaired ones (2n,), zero on the other kind of sample
    if c_w.numel() == 2 * n:
        c_w, c_l = c_w[:n], c_l[n:]
    return float(c_w.float().mean()), float(c_l.float().mean())


def update(cfg, model, ref_model, opt, params, ro: Rollout, adv: torch.Tensor,
           clock: Callable[[], float]) -> Tuple[Dict, Dict, float, float, int]:
    """One FPA update on the rollout ``ro`` -> (update info, {"loss", "metrics"} of the step, seconds of
    forward+backward (policy and reference) on ``clock`` and in process CPU time, backward passes)."""
    rows_w, rows_l = build_pairs(ro.rewards, cfg.group)
    n = int(rows_w.numel())
    if n == 0:
        return {"pairs": 0, "skipped": True, "backward_passes": 0, "optimizer_steps": 0}, {}, 0.0, 0.0, 0
    device = ro.resp.device
    rows = torch.cat([rows_w, rows_l])
    pid, pattn, resp, mask = ro.prompt_ids[rows], ro.prompt_attn[rows], ro.resp[rows], ro.mask[rows]
    tb, cb = clock(), time.process_time()
    opt.zero_grad(set_to_none=True)
    with amp(device):
        logits = response_logits(model, pid, pattn, resp, mask)
    with torch.no_grad(), amp(device):
        ref_logits = response_logits(ref_model, pid, pattn, resp, mask)
    logp, ref_logp, fpa_logp = fpa_logprobs(logits, ref_logits, resp, lam=cfg.fpa_lam, temperature=cfg.temperature,
                                            mask=mask, backend=loss_backend(device))
    loss, m = objective(cfg, FPALogProbs(logp, ref_logp, fpa_logp, mask), n, adv[rows])
    loss.backward()
    t_bwd, cpu_bwd = clock() - tb, time.process_time() - cb
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    stepped = math.isfinite(grad_norm)   # a non-finite gradient takes no step (NaN weights), as in the rules
    if stepped:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    c_w, c_l = _side_means(m["c_w"], m["c_l"], n)
    mf = mask.float()
    tok_logp = (logp.detach() * mf).sum(-1) / mf.sum(-1).clamp(min=1)      # per-row mean token log-prob
    metrics = {"c_w_mean": c_w, "c_l_mean": c_l, "base_loss": float(m["base_loss"]), "fpa_loss": float(m["fpa_loss"]),
               "pairs": n, "logp_chosen": float(tok_logp[:n].mean()), "logp_rejected": float(tok_logp[n:].mean())}
    info = {"pairs": n, "skipped": not stepped, "grad_norm": grad_norm, "backward_passes": 1,
            "optimizer_steps": int(stepped)}
    return info, {"loss": loss.detach(), "metrics": metrics}, t_bwd, cpu_bwd, 1
