"""Float64 PyTorch reference for the GRPO-family loss: the executable definition, written independently of
``gxpo_kernels.losses``.

Written for clarity, not speed: it materialises log_softmax over the vocabulary and loops over sequences.
Tests compare the fused op (both backends) against it; benchmarks use it as the eager "torch" provider.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..logprobs.reference import token_logprobs_ref


def group_advantages_ref(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6):
    """GRPO (``scale="std"``: (R - mean) / (unbiased std + eps)) or Dr.GRPO (``"none"``: R - mean) advantages.

    ``rewards`` is (num_prompts * group_size,) with each prompt's responses contiguous. A group of one gets 0.
    """
    r = rewards.double().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    centred = r - mean
    if scale == "none":
        return centred.flatten()
    if group_size == 1:
        return torch.zeros_like(centred).flatten()
    return (centred / (r.std(-1, unbiased=True, keepdim=True) + eps)).flatten()


def grpo_loss_ref(logits, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None, *,
                  temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, beta=0.0,
                  entropy_coef=0.0, importance_sampling="token", loss_agg_mode="token-mean",
                  max_length=None, policy_loss="clip", log_ratio_clamp=20.0, kl_clamp=10.0,
                  use_bias_correction_kl=False, empty_sequences="count", sapo_temperature_pos=1.0,
                  sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                  vespo_lambda_neg=2.0, reduce=True, num_items_in_batch=None
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Float64 GRPO-family loss and metrics; same options and semantics as ``gxpo_kernels.grpo_loss``."""
    B, T, _ = logits.shape
    m = torch.ones(B, T, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    mf = m.double()
    logp, ent = token_logprobs_ref(logits, tokens, temperature)
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().double()
    A = advantages.detach().double()
    A = A.reshape(B, -1).expand(B, T) if A.dim() == 1 or A.shape[1] == 1 else A
    A = torch.where(m, A, torch.zeros_like(A))
    clamp = (lambda x: x) if log_ratio_clamp is None else (lambda x: x.clamp(-log_ratio_clamp, log_ratio_clamp))

    tok_log_ratio = torch.where(m, logp - old, torch.zeros_like(logp))
    log_ratio = tok_log_ratio
    if importance_sampling == "sequence":
        # GSPO: one ratio per sequence from the mean token log-ratio; gradient reaches every token
        seq = torch.stack([log_ratio[i][m[i]].sum() / max(int(m[i].sum()), 1) for i in range(B)])
        log_ratio = seq[:, None].expand(B, T)
    ratio = clamp(log_ratio).exp()

    if policy_loss == "clip":
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        loss1 = -A * unclipped
        loss2 = -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        pg = torch.maximum(loss1, loss2)
        if dual_clip is not None:
            pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    elif policy_loss == "cispo":  # MiniMax-M1: REINFORCE weighted by the detached, upper-capped ratio
        pg = -torch.clamp(ratio, max=1 + eps_high).detach() * A * logp
    elif policy_loss == "sapo":  # soft sigmoid gate instead of a hard clip
        tau = torch.where(A > 0, torch.tensor(sapo_temperature_pos, dtype=torch.float64),
                          torch.tensor(sapo_temperature_neg, dtype=torch.float64))
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    elif policy_loss == "vespo":  # detached gamma weight of the sequence ratio w: phi(w) = e^lam w^k e^(-lam w)
        with torch.no_grad():
            phi = torch.zeros(B, T, dtype=torch.float64)
            for i in range(B):
                lw = sum(float(tok_log_ratio[i, t].clamp(-20, 20)) for t in range(T) if m[i, t])
                lw = min(max(lw, math.log(1e-8)), 20.0)
                for t in range(T):
                    k, lam = (vespo_k_pos, vespo_lambda_pos) if A[i, t] >= 0 else (vespo_k_neg, vespo_lambda_neg)
                    v = math.exp(lam + k * lw - lam * math.exp(lw))
                    phi[i, t] = v if math.isfinite(v) else 0.0
        pg = -phi * A * logp
    else:
        raise ValueError(policy_loss)
    per_token = pg
    k3 = None
    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.detach().double() - logp, torch.zeros_like(logp))
        d = clamp(d)
        k3 = torch.expm1(d) - d   # e^d − d − 1 without the cancellation near d = 0
        if kl_clamp is not None:
            k3 = torch.clamp(k3, -kl_clamp, kl_clamp)
        if use_bias_correction_kl:
            k3 = k3 * ratio
        per_token = per_token + beta * k3
    per_token = per_token - entropy_coef * ent
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))

    lens = [float(mf[i].sum()) for i in range(B)]
    seqs = [i for i in range(B)] if empty_sequences == "count" else [i for i in range(B) if lens[i] > 0]
    if not reduce:
        loss = per_token
    elif num_items_in_batch is not None:
        loss = per_token.sum() / max(float(num_items_in_batch), 1.0)
    elif loss_agg_mode == "token-mean":
        loss = per_token.sum() / max(float(mf.sum()), 1.0)
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = sum((per_token[i].sum() / max(lens[i], 1.0) for i in seqs), torch.zeros((), dtype=torch.float64))
        loss = loss / max(len(seqs), 1)
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = sum((per_token[i].sum() for i in seqs), torch.zeros((), dtype=torch.float64)) / max(len(seqs), 1)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        loss = per_token.sum() / (B * (T if max_length is None else max_length))
    else:
        raise ValueError(loss_agg_mode)

    n = max(float(mf.sum()), 1.0)

    def mmean(x):
        return torch.where(m, x.detach().double(), torch.zeros_like(mf)).sum() / n

    metrics = {
        # fraction of tokens where a bound of the policy loss binds: cispo has an upper cap only, sapo / vespo none
        "clip_frac_low": mmean(((ratio < 1 - eps_low) & (A < 0)).double() * (policy_loss == "clip")),
        "clip_frac_high": mmean(((ratio > 1 + eps_high) & (A > 0)).double() * (policy_loss in ("clip", "cispo"))),
        "ratio_mean": mmean(ratio),
        "entropy": mmean(ent),
        "logp_mean": mmean(logp),
    }
    if k3 is not None:
        metrics["kl"] = mmean(k3)
    return loss, metrics
