"""Fused-linear GRPO loss from final hidden states: the (tokens x vocab) logits never exist.

    logits = hidden @ weight.T + bias   (streamed tile by tile, see ``linear_token_logprobs``)
    loss   = GRPO(logp, entropy)        (spec algorithms.md section 1, the shared ``_loss_math``)

Shapes: hidden (B, T, H), weight (V, H), bias (V,), tokens / mask / old / ref log-probs (B, T), advantages
(B,) or (B, T). The per-token stage streams over the vocabulary once forward and once (recomputing) backward;
the loss math runs on O(B*T) values, so every GRPO option and aggregation mode is available at no extra pass,
and ``grpo_loss`` (logits input) and this op share one definition of the loss.
Reference: ``reference.grpo_loss_ref`` on explicitly materialised ``hidden @ weight.T + bias``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..._utils import check_finite as _check_finite  # the public kwarg `check_finite` shadows it
from .._loss_math import GRPOLossOptions, grpo_token_loss, validate_loss_inputs
from ..fused_head._library import token_stats_rows
from ..fused_head.engine import (MaskedRows, linear_token_stats_bwd, linear_token_stats_fwd, make_head_config,
                                 validate_head)


class _PrecomputedGrads(torch.autograd.Function):
    """Return ``loss``; its backward hands out gradients computed during forward, scaled by grad_output."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, gh, gw, gb):
        ctx.save_for_backward(gh, gw, gb)
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        gh, gw, gb = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g.to(t.dtype)  # noqa: E731
        return None, scale(gh), scale(gw), scale(gb), None, None, None


def _loss_with_grads_in_forward(h2, weight, bias, y1, m1, inv_t, cfg, B, T, loss_fn, entropy_needed):
    """Forward statistics, the loss on detached per-token leaves, then the head's backward at once."""
    rows = MaskedRows(m1)
    h, y = rows.take(h2), rows.take(y1)
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    lse, ent, logp = linear_token_stats_fwd(h, w, b, y, inv_t, cfg)
    with torch.enable_grad():
        lp_leaf = logp.requires_grad_(True)
        ent_leaf = ent.requires_grad_(entropy_needed)
        loss, metrics = loss_fn(rows.put(lp_leaf).view(B, T), rows.put(ent_leaf).view(B, T))
        grads = torch.autograd.grad(loss, [lp_leaf] + ([ent_leaf] if entropy_needed else []), allow_unused=True)
    dlogp = grads[0] if grads[0] is not None else torch.zeros_like(lse)
    need = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad)
    gh, gw, gb = linear_token_stats_bwd(h, w, b, y, lse, ent.detach(), dlogp, grads[1] if entropy_needed else None,
                                        inv_t, cfg, need)
    if not any(need):
        return loss.detach(), metrics
    cast = lambda g, t: None if g is None else g.to(t.dtype)  # noqa: E731
    return _PrecomputedGrads.apply(loss.detach(), h, w, b, cast(gh, h), cast(gw, w), cast(gb, b)), metrics


def linear_grpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None, *, bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: Optional[float] = None,
    delta: Optional[float] = None, beta: float = 0.0, entropy_coef: float = 0.0,
    importance_sampling: str = "token", loss_agg_mode: str = "token-mean", max_length: Optional[int] = None,
    compute_entropy: bool = True, inplace_backward: bool = False, check_finite: bool = False,
    fp32_head: bool = False, deterministic: bool = False, chunk_size: Optional[int] = None,
    grad_in_forward: bool = False, backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss (spec algorithms.md section 1) from final hidden states and the lm_head, fused.

    Args:
        hidden: (B, T, H) final hidden states; ``hidden[:, t]`` scores ``tokens[:, t]`` (already shifted:
            see ``gxpo_kernels.integrations.hf`` for the causal-LM alignment).
        weight: (V, H) lm_head weight, same dtype as ``hidden`` unless ``fp32_head``.
        tokens: (B, T) int64/int32 ids in [0, V) at unmasked positions (masked ones may hold anything).
        advantages: (B,) or (B, T). mask: (B, T) bool or 0/1 (default all ones); masked rows cost no GEMM.
        old_logprobs, ref_logprobs: (B, T) or None (on-policy: old = logp.detach()); ref needed if beta > 0.
        bias: (V,) lm_head bias or None.
        temperature, eps_low, eps_high, dual_clip, delta, beta, entropy_coef, importance_sampling,
        loss_agg_mode, max_length: as ``grpo_loss`` (``GRPOLossOptions``).
        compute_entropy: report the mean-entropy metric (forced on when ``entropy_coef != 0``).
        inplace_backward: accepted for signature compatibility with ``grpo_loss``; there is no logits
            buffer to overwrite here, so it changes nothing.
        check_finite: raise ValueError if hidden/weight or the per-token log-probs are NaN/inf.
        fp32_head: fp32 GEMM operands for bf16/fp16 inputs (and allows a bf16 hidden with an fp32 weight).
        deterministic: bitwise reproducible gradients (always the case: no atomics). chunk_size: token rows
            per chunk of the torch backend and of the Triton backward's d(logits) buffer.
        grad_in_forward: run the head's backward during forward and keep d(hidden), d(weight), d(bias) (O(N*H +
            V*H)) until ``backward`` hands them out. The weight is then not read in backward; note that autograd
            still accumulates the full-size d(weight) into the parameter then (under ZeRO-3 that must happen
            while the parameter is gathered, e.g. inside a module forward whose hooks re-gather it for backward,
            which is what ``integrations.hf.causal_lm_grpo_loss`` arranges). Ignored under ``torch.compile``.
        backend: "auto" | "triton" | "torch".
    Returns:
        (loss, metrics): 0-d fp32 loss; dict of 0-d detached fp32 metrics ``clip_frac_low``,
        ``clip_frac_high``, ``ratio_mean``, ``logp_mean``, ``entropy`` (if computed), ``kl`` (if ref given).

    Example::

        h = model.model(input_ids, attention_mask=am).last_hidden_state[:, -K - 1:-1]
        loss, m = linear_grpo_loss(h, model.lm_head.weight, input_ids[:, -K:], adv, completion_mask,
                                   old_logp, temperature=0.7, eps_high=0.28)
        loss.backward()
    """
    del inplace_backward  # no logits buffer exists
    opts = GRPOLossOptions(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                           delta=delta, beta=beta, entropy_coef=entropy_coef,
                           importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode,
                           max_length=max_length)
    validate_head(hidden, weight, bias, fp32_head, hidden_ndim=3)
    B, T, H = hidden.shape
    m = validate_loss_inputs(B, T, weight.shape[0], hidden.device, tokens, advantages, mask, old_logprobs,
                             ref_logprobs, opts, data_checks=not torch.compiler.is_compiling())
    cfg = make_head_config(hidden.device, backend, fp32_head, deterministic, chunk_size)
    if check_finite:
        _check_finite(hidden, "hidden")
        _check_finite(weight, "weight")
    keep_entropy = compute_entropy or opts.needs_entropy_grad
    if grad_in_forward and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        def loss_fn(lp, en):
            if check_finite:
                _check_finite(torch.where(m, lp.detach(), 0.0), "per-token log-probs")
            return grpo_token_loss(lp, en if keep_entropy else None, advantages, m, old_logprobs, ref_logprobs, opts)
        return _loss_with_grads_in_forward(hidden.reshape(B * T, H), weight, bias, tokens.reshape(-1), m.reshape(-1),
                                           1.0 / float(temperature), cfg, B, T, loss_fn, opts.needs_entropy_grad)
    logp, ent = token_stats_rows(hidden.reshape(B * T, H), weight, bias, tokens.reshape(-1), m.reshape(-1),
                                 1.0 / float(temperature), cfg)
    logp, ent = logp.view(B, T), ent.view(B, T)
    if check_finite:
        _check_finite(torch.where(m, logp.detach(), 0.0), "per-token log-probs")
    return grpo_token_loss(logp, ent if keep_entropy else None, advantages, m, old_logprobs, ref_logprobs, opts)


class LinearGRPOLoss(nn.Module):
    """Module form of ``linear_grpo_loss``: options fixed at construction, tensors per call.

    ``forward(hidden, weight, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None, bias=None)``
    returns ``(loss, metrics)``.

    Example::

        loss_fn = LinearGRPOLoss(temperature=0.7, eps_high=0.28, loss_agg_mode="token-mean")
        loss, metrics = loss_fn(hidden, model.lm_head.weight, tokens, advantages, mask, old_logprobs)
    """

    def __init__(self, *, temperature: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.2,
                 dual_clip: Optional[float] = None, delta: Optional[float] = None, beta: float = 0.0,
                 entropy_coef: float = 0.0, importance_sampling: str = "token", loss_agg_mode: str = "token-mean",
                 max_length: Optional[int] = None, compute_entropy: bool = True, check_finite: bool = False,
                 fp32_head: bool = False, deterministic: bool = False, chunk_size: Optional[int] = None,
                 grad_in_forward: bool = False, backend: str = "auto"):
        super().__init__()
        # validate now so a bad option fails at construction, not at the first step
        GRPOLossOptions(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                        delta=delta, beta=beta, entropy_coef=entropy_coef, importance_sampling=importance_sampling,
                        loss_agg_mode=loss_agg_mode, max_length=max_length)
        self.options = dict(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                            delta=delta, beta=beta, entropy_coef=entropy_coef,
                            importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode,
                            max_length=max_length, compute_entropy=compute_entropy, check_finite=check_finite,
                            fp32_head=fp32_head, deterministic=deterministic, chunk_size=chunk_size,
                            grad_in_forward=grad_in_forward, backend=backend)

    def forward(self, hidden, weight, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None,
                bias=None):
        return linear_grpo_loss(hidden, weight, tokens, advantages, mask, old_logprobs, ref_logprobs,
                                bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
