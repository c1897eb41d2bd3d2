"""The one place for loss aggregation over a token mask (verl's mode names).

``token-mean``               sum(m*l) / max(sum(m), 1)
``seq-mean-token-mean``      mean_i( sum_t(m*l) / max(sum_t m, 1) )
``seq-mean-token-sum``       mean_i sum_t(m*l)
``seq-mean-token-sum-norm``  sum(m*l) / (B * T_max)   (Dr.GRPO; TRL's B*max_completion_length; verl divides
                             by T_max only -- we follow TRL). T_max = ``max_length`` or the tensor's T.
"""
from __future__ import annotations

from typing import Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # where (not multiply) so NaN/inf at masked positions never leaks into the sum or its gradient
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              max_length: Optional[int] = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over a bool (B, T) mask to a scalar."""
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    B, T = per_token.shape
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).sum() / max(B, 1)
    if mode == "seq-mean-token-sum":
        return masked_sum(per_token, mask, dim=-1).sum() / max(B, 1)
    if mode == "seq-mean-token-sum-norm":
        t_max = T if max_length is None else max_length
        return masked_sum(per_token, mask) / max(B * t_max, 1)
    raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
