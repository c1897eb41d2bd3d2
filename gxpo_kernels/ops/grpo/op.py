"""Fused GRPO loss from logits (spec algorithms.md section 1).

    loss = agg_{mask}( -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)  [dual clip, delta]
                       + beta * k3(ref, logp) - entropy_coef * H )

Two stages: one streaming pass over the vocabulary (``token_logprobs``: fp32 per-token log pi and entropy,
nothing of size V saved) and the O(tokens) loss math of ``_loss_math.grpo_token_loss``. The backward runs
one more pass that writes dlogits (optionally into the logits buffer). Shapes: logits (B, T, V), everything
else (B, T) (advantages also (B,)). Reference: ``reference.grpo_loss_ref`` (float64).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..._utils import check_finite as _check_finite
from ..._utils import BACKENDS, check_choice, resolve_backend
from .._loss_math import GRPOLossOptions, grpo_token_loss, validate_loss_inputs
from ..logprobs.op import _token_logprobs, validate_logits


def grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    delta: Optional[float] = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    importance_sampling: str = "token",
    loss_agg_mode: str = "token-mean",
    max_length: Optional[int] = None,
    compute_entropy: bool = True,
    inplace_backward: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO / DAPO / Dr.GRPO / GSPO policy loss on logits, fused over the vocabulary.

    Args:
        logits: (B, T, V) fp32, bf16 or fp16 scores aligned with ``tokens`` (for a causal LM pass
            ``logits[:, :-1]``; strided slices are read in place). Math is fp32 whatever the dtype.
        tokens: (B, T) int64/int32 sampled token ids, in [0, V) at unmasked positions.
        advantages: (B,) per sequence or (B, T) per token, any float dtype.
        mask: (B, T) bool or 0/1 (None = all valid). Masked positions cost nothing and get zero gradient.
        old_logprobs: (B, T) log-probs of the behaviour policy; None = on-policy (ratio 1, gradient kept).
        ref_logprobs: (B, T) reference-policy log-probs for the k3 KL; required when ``beta > 0``.
        temperature: logits are divided by it before the softmax (> 0).
        eps_low, eps_high: PPO clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2 / 0.28).
        dual_clip: verl's ``clip_ratio_c`` (e.g. 3.0): caps the loss of negative-advantage tokens; None = off.
        delta: INTELLECT-2 two-sided clip, the unclipped ratio is capped at ``delta``; None = off.
        beta: weight of the k3 KL to ``ref_logprobs`` (clamped to [-10, 10] per token).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        importance_sampling: "token" (PPO/GRPO) or "sequence" (GSPO: one ratio per sequence from the mean
            token log-ratio).
        loss_agg_mode: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or "seq-mean-token-sum-norm"
            (Dr.GRPO, divides by B * max_length).
        max_length: T_max for "seq-mean-token-sum-norm" (default: T).
        compute_entropy: compute the entropy metric (same pass, nearly free); forced on if entropy_coef != 0.
        inplace_backward: write dlogits into the logits buffer during backward (saves a (B, T, V) buffer;
            the logits' values are destroyed). Ignored under ``torch.compile``.
        check_finite: raise ValueError if logits hold NaN/inf (costs one extra read of the logits).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton" or "torch".

    Returns:
        (loss, metrics): ``loss`` is a 0-d fp32 tensor; ``metrics`` maps "clip_frac_low", "clip_frac_high",
        "ratio_mean", "logp_mean", "entropy" (if computed) and "kl" (if ``ref_logprobs`` given) to detached 0-d
        fp32 tensors (means over unmasked tokens).

    Example:
        >>> B, T, V = 2, 6, 1000
        >>> out = torch.randn(B, T + 1, V, requires_grad=True)      # causal LM logits
        >>> ids = torch.randint(0, V, (B, T + 1))
        >>> loss, m = grpo_loss(out[:, :-1], ids[:, 1:], torch.tensor([1.0, -1.0]),
        ...                     mask=torch.ones(B, T, dtype=torch.bool), old_logprobs=torch.full((B, T), -7.0),
        ...                     eps_high=0.28, loss_agg_mode="seq-mean-token-mean")
        >>> loss.backward()
        >>> sorted(m)
        ['clip_frac_high', 'clip_frac_low', 'entropy', 'logp_mean', 'ratio_mean']
    """
    validate_logits(logits)
    B, T, V = logits.shape
    opts = GRPOLossOptions(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                           delta=delta, beta=beta, entropy_coef=entropy_coef,
                           importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode,
                           max_length=max_length)
    bk = resolve_backend(backend, logits.device)
    if torch.compiler.is_compiling():
        m = validate_loss_inputs(B, T, V, logits.device, tokens, advantages, mask, old_logprobs, ref_logprobs,
                                 opts, data_checks=False)
    else:
        m = validate_loss_inputs(B, T, V, logits.device, tokens, advantages, mask, old_logprobs, ref_logprobs,
                                 opts)
        if check_finite:
            _check_finite(logits, "logits")
    want_entropy = bool(compute_entropy) or opts.needs_entropy_grad
    logp, entropy = _token_logprobs(logits, tokens, m, float(temperature), want_entropy, inplace_backward, bk)
    loss, metrics = grpo_token_loss(logp, entropy, advantages, m, old_logprobs, ref_logprobs, opts)
    return loss, metrics


class GRPOLoss(nn.Module):
    """Module form of :func:`grpo_loss`: the options are fixed at construction (validated there).

    Example:
        >>> crit = GRPOLoss(eps_high=0.28, loss_agg_mode="token-mean")
        >>> loss, metrics = crit(logits, tokens, advantages, mask, old_logprobs)
    """

    def __init__(self, *, temperature: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.2,
                 dual_clip: Optional[float] = None, delta: Optional[float] = None, beta: float = 0.0,
                 entropy_coef: float = 0.0, importance_sampling: str = "token", loss_agg_mode: str = "token-mean",
                 max_length: Optional[int] = None, compute_entropy: bool = True, inplace_backward: bool = False,
                 check_finite: bool = False, backend: str = "auto"):
        super().__init__()
        # validate now, not at the first forward
        GRPOLossOptions(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                        delta=delta, beta=beta, entropy_coef=entropy_coef, importance_sampling=importance_sampling,
                        loss_agg_mode=loss_agg_mode, max_length=max_length)
        check_choice(backend, "backend", BACKENDS)
        self.options = dict(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                            delta=delta, beta=beta, entropy_coef=entropy_coef,
                            importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode,
                            max_length=max_length, compute_entropy=compute_entropy,
                            inplace_backward=inplace_backward, check_finite=check_finite, backend=backend)

    def forward(self, logits, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None):
        return grpo_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
