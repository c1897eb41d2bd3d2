"""GRPO loss math on per-token log-probs and entropies (spec algorithms.md section 1).

The fused ops split the GRPO loss in two: a streaming pass over the vocabulary produces per-token
``logp`` and ``entropy`` (O(tokens) values, differentiable), and this module turns them into the loss and
its metrics. Everything here is O(tokens), so sequence-level IS and every aggregation mode cost no extra
pass over the logits; autograd through this code yields d(loss)/d(logp) and d(loss)/d(entropy), which the
kernels' backward turns into dlogits. Both ``grpo_loss`` (logits) and ``linear_grpo_loss`` (hidden states)
share it, so the two ops can never disagree on the math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._agg import AGG_MODES, aggregate, masked_mean
from .._utils import check_choice

IS_LEVELS = ("token", "sequence")
KL_CLAMP = 10.0


@dataclass(frozen=True)
class GRPOLossOptions:
    """Hyperparameters of the GRPO loss, validated once. Names follow the public ``grpo_loss`` signature."""
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    delta: Optional[float] = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    importance_sampling: str = "token"
    loss_agg_mode: str = "token-mean"
    max_length: Optional[int] = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if not self.eps_high >= 0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c, e.g. 3.0) or None, got {self.dual_clip}")
        if self.delta is not None and not self.delta > 1 + self.eps_high:
            raise ValueError(f"delta must be > 1 + eps_high (INTELLECT-2 two-sided clip) or None, got {self.delta}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        check_choice(self.importance_sampling, "importance_sampling", IS_LEVELS)
        check_choice(self.loss_agg_mode, "loss_agg_mode", AGG_MODES)
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(f"max_length must be a positive int or None, got {self.max_length!r}")

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0


def grpo_token_loss(
    logp: torch.Tensor,                    # (B, T) fp32 log pi_theta(token), differentiable
    entropy: Optional[torch.Tensor],       # (B, T) fp32 entropy of the full distribution, or None if not computed
    advantages: torch.Tensor,              # (B,) or (B, T)
    mask: torch.Tensor,                    # (B, T) bool
    old_logprobs: Optional[torch.Tensor],  # (B, T) or None (on-policy: old = logp.detach())
    ref_logprobs: Optional[torch.Tensor],  # (B, T) or None; needed when beta > 0
    opts: GRPOLossOptions,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Return the aggregated GRPO loss (0-d, fp32) and its metrics (0-d, detached)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    # sanitise masked positions first: padding may hold -inf old log-probs, and exp(inf) * 0 gives NaN grads
    log_ratio = torch.where(mask, logp - old, zero)
    if opts.importance_sampling == "sequence":
        seq = masked_mean(log_ratio, mask, dim=-1)          # (B,) mean over each sequence's tokens
        log_ratio = seq[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)

    clipped = torch.clamp(ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
    unclipped = ratio if opts.delta is None else torch.clamp(ratio, max=opts.delta)
    pg = torch.maximum(-adv * unclipped, -adv * clipped)
    if opts.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -opts.dual_clip * adv), pg)
    per_token = pg

    metrics: Dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.to(logp.dtype) - logp, zero)
        k3 = torch.clamp(torch.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)
        if opts.beta != 0.0:
            per_token = per_token + opts.beta * k3
        metrics["kl"] = masked_mean(k3.detach(), mask)
    if opts.entropy_coef != 0.0:
        per_token = per_token - opts.entropy_coef * entropy

    loss = aggregate(per_token, mask, opts.loss_agg_mode, opts.max_length)

    with torch.no_grad():
        r = ratio.detach()
        metrics["clip_frac_low"] = masked_mean(((r < 1.0 - opts.eps_low) & (adv < 0)).to(logp.dtype), mask)
        metrics["clip_frac_high"] = masked_mean(((r > 1.0 + opts.eps_high) & (adv > 0)).to(logp.dtype), mask)
        metrics["ratio_mean"] = masked_mean(r, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
        metrics["logp_mean"] = masked_mean(logp.detach(), mask)
    return loss, metrics


def validate_loss_inputs(
    B: int, T: int, vocab_size: int, device: torch.device,
    tokens, advantages, mask, old_logprobs, ref_logprobs, opts: GRPOLossOptions, *, data_checks: bool = True,
) -> torch.Tensor:
    """Check the non-logit inputs shared by ``grpo_loss`` and ``linear_grpo_loss``; return the bool mask.

    Raises ``TypeError``/``ValueError`` naming the offending argument (shape, dtype, device, ids out of
    range at unmasked positions, beta > 0 without ref_logprobs). ``data_checks=False`` skips the checks
    that read tensor values (token range, 0/1 mask values), which a ``torch.compile`` graph cannot branch on.
    """
    from .._utils import check_same_device, check_shape, check_tensor, check_tokens_in_range, normalize_mask

    check_tensor(tokens, "tokens", ndim=2, dtypes=(torch.int64, torch.int32))
    check_shape(tokens, "tokens", (B, T))
    check_tensor(advantages, "advantages", ndim=(1, 2), floating=True)
    if advantages.dim() == 1:
        check_shape(advantages, "advantages", (B,))
    else:
        check_shape(advantages, "advantages", (B, T))
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_tensor(t, name, ndim=2, floating=True)
            check_shape(t, name, (B, T))
    check_same_device(tokens.new_empty(0, device=device), "logits", tokens=tokens, advantages=advantages,
                      mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    if opts.beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if not data_checks:
        if mask is None:
            return torch.ones((B, T), dtype=torch.bool, device=device)
        check_tensor(mask, "mask", ndim=2)
        check_shape(mask, "mask", (B, T))
        return mask if mask.dtype == torch.bool else mask != 0
    m = normalize_mask(mask, (B, T), device)
    check_tokens_in_range(tokens, vocab_size, m)
    return m
