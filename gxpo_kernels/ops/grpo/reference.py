"""Float64 PyTorch reference for the GRPO loss (spec algorithms.md section 1): the executable spec.

Written for clarity, not speed: it materialises log_softmax over the vocabulary and loops over sequences.
Tests compare the fused op (both backends) against it; benchmarks use it as the eager "torch" provider.
"""
from __future__ import annotations

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
                  max_length=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Float64 GRPO loss and metrics; same signature and semantics as ``gxpo_kernels.grpo_loss``."""
    B, T, _ = logits.shape
    m = torch.ones(B, T, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    mf = m.double()
    logp, ent = token_logprobs_ref(logits, tokens, temperature)
    old = logp.detach() if old_logprobs is None else old_logprobs.double()
    A = advantages.double()
    A = A[:, None].expand(B, T) if A.dim() == 1 else A

    log_ratio = torch.where(m, logp - old, torch.zeros_like(logp))
    if importance_sampling == "sequence":
        # GSPO: one ratio per sequence from the mean token log-ratio; gradient reaches every token
        seq = torch.stack([log_ratio[i][m[i]].sum() / max(int(m[i].sum()), 1) for i in range(B)])
        log_ratio = seq[:, None].expand(B, T)
    ratio = log_ratio.exp()

    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss1 = -A * unclipped
    loss2 = -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    pg = torch.maximum(loss1, loss2)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    per_token = pg
    k3 = None
    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.double() - logp, torch.zeros_like(logp))
        k3 = torch.clamp(d.exp() - d - 1, -10.0, 10.0)
        per_token = per_token + beta * k3
    per_token = per_token - entropy_coef * ent
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))

    if loss_agg_mode == "token-mean":
        loss = per_token.sum() / max(float(mf.sum()), 1.0)
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = sum(per_token[i].sum() / max(float(mf[i].sum()), 1.0) for i in range(B)) / B
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = per_token.sum(-1).mean()
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        loss = per_token.sum() / (B * (T if max_length is None else max_length))
    else:
        raise ValueError(loss_agg_mode)

    n = max(float(mf.sum()), 1.0)

    def mmean(x):
        return torch.where(m, x.detach().double(), torch.zeros_like(mf)).sum() / n

    metrics = {
        "clip_frac_low": mmean(((ratio < 1 - eps_low) & (A < 0)).double()),
        "clip_frac_high": mmean(((ratio > 1 + eps_high) & (A > 0)).double()),
        "ratio_mean": mmean(ratio),
        "entropy": mmean(ent),
        "logp_mean": mmean(logp),
    }
    if k3 is not None:
        metrics["kl"] = mmean(k3)
    return loss, metrics
