"""Fused-linear GRPO loss from final hidden states: the (tokens x vocab) logits never exist.

    logits = hidden @ weight.T + bias   (streamed tile by tile, see ``linear_token_logprobs``)
    loss   = GRPO(logp, entropy)        (``gxpo_kernels.losses``, shared with ``grpo_loss``)

Shapes: hidden (B, T, H), weight (V, H), bias (V,), tokens / mask / old / ref log-probs (B, T), advantages
(B,) or (B, T). The per-token stage streams over the vocabulary once forward and once (recomputing) backward;
the loss math runs on O(B*T) values, so every GRPO option and aggregation mode is available at no extra pass,
and ``grpo_loss`` (logits input) and this op share one definition of the loss.
Reference: ``reference.grpo_loss_ref`` on explicitly materialised ``hidden @ weight.T + bias``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..._utils import check_finite as _check_finite  # the public kwarg `check_finite` shadows it
from ..._utils import (BACKENDS, check_bias_finite, check_bools, check_choice, check_no_forward_ad, check_validate,
                       nan_at, safe_tokens)
from ...losses import GRPOLossOptions, grpo_token_loss, validate_loss_inputs
from ..fused_head._library import token_stats_rows
from ..fused_head.engine import (MaskedRows, check_chunk_size, linear_token_stats_bwd, linear_token_stats_fwd,
                                 make_head_config, validate_head)


class _PrecomputedGrads(torch.autograd.Function):
    """Return ``loss``; its backward hands out gradients computed during forward, scaled by grad_output."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, gh, gw, gb):
        ctx.save_for_backward(gh, gw, gb)
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            # create_graph=True: the saved gradients are constants, so a second derivative through them would
            # silently be 0 (e.g. a gradient penalty would get no gradient)
            raise RuntimeError("linear_grpo_loss(grad_in_forward=True) computes its gradients during forward and "
                               "cannot be differentiated twice (create_graph=True); pass grad_in_forward=False")
        gh, gw, gb = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g.to(t.dtype)  # noqa: E731
        return None, scale(gh), scale(gw), scale(gb), None, None, None


def _loss_with_grads_in_forward(h2, weight, bias, y1, m1, inv_t, cfg, B, T, loss_fn, entropy_needed):
    """Forward statistics, the loss on detached per-token leaves, then the head's backward at once."""
    check_no_forward_ad("linear_grpo_loss", h2, weight, bias)
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
    options: Optional[GRPOLossOptions] = None, num_items_in_batch: Union[None, int, float, torch.Tensor] = None,
    compute_entropy: bool = True, inplace_backward: bool = False, check_finite: bool = False,
    validate: str = "cheap", fp32_head: bool = False, deterministic: bool = False,
    chunk_size: Optional[int] = None, grad_in_forward: bool = False, backend: str = "auto", **loss_options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO-family loss from final hidden states and the lm_head, fused (the logits never exist).

    Args:
        hidden: (B, T, H) final hidden states; ``hidden[:, t]`` scores ``tokens[:, t]`` (already shifted:
            see ``gxpo_kernels.integrations.hf`` for the causal-LM alignment).
        weight: (V, H) lm_head weight, same dtype as ``hidden`` unless ``fp32_head``.
        tokens: (B, T) int64/int32 ids in [0, V) at unmasked positions (masked ones may hold anything; an
            unmasked id out of range makes the loss NaN, or raises with ``validate="full"``).
        advantages: (B,), (B, 1) or (B, T). mask: (B, T) bool or 0/1 (default all ones).
        old_logprobs, ref_logprobs: (B, T) or None (on-policy: old = logp.detach()); ref needed if beta > 0.
            Advantages, old and ref log-probs are constants of the loss (detached).
        bias: (V,) lm_head bias or None (a -inf entry is a token of probability 0).
        options, num_items_in_batch, **loss_options: the loss options, as ``grpo_loss``
            (:class:`gxpo_kernels.losses.GRPOLossOptions`).
        compute_entropy: report the mean-entropy metric (forced on when ``entropy_coef != 0``).
        inplace_backward: accepted for signature compatibility with ``grpo_loss``; there is no logits
            buffer to overwrite here, so it changes nothing.
        check_finite: raise ValueError if hidden (unmasked rows), weight or the per-token log-probs are
            NaN/inf, or bias NaN/+inf (-inf: a banned token) (a host sync). validate: "cheap" | "full", as
            ``grpo_loss``.
        fp32_head: fp32 GEMM operands for bf16/fp16 inputs (and allows a bf16 hidden with an fp32 weight).
        deterministic: bitwise reproducible gradients (always the case: no atomics). chunk_size: token rows
            per chunk of the torch backend and of the Triton backward's d(logits) buffer.
        grad_in_forward: run the head's backward during forward and keep d(hidden), d(weight), d(bias) (O(N*H +
            V*H)) until ``backward`` hands them out. The weight is then not read in backward; note that autograd
            still accumulates the full-size d(weight) into the parameter then (under ZeRO-3 that must happen
            while the parameter is gathered, e.g. inside a module forward whose hooks re-gather it for backward,
            which is what ``integrations.hf.causal_lm_grpo_loss`` arranges). Needs ``reduce=True``;
            ignored under ``torch.compile`` and ``torch.vmap``.
        backend: "auto" | "triton" | "torch".

    Masked rows: on CPU they are dropped before the GEMMs (no work); on CUDA and under ``torch.compile``
    they are zeroed and computed, because dropping them needs their count on the host (a sync).
    Returns:
        (loss, metrics): 0-d fp32 loss ((B, T) with ``reduce=False``); dict of 0-d detached fp32 metrics
        ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``logp_mean``, ``entropy`` (if computed),
        ``kl`` (if ref given).

    Example::

        h = model.model(input_ids, attention_mask=am).last_hidden_state[:, -K - 1:-1]
        loss, m = linear_grpo_loss(h, model.lm_head.weight, input_ids[:, -K:], adv, completion_mask,
                                   old_logp, temperature=0.7, eps_high=0.28)
        loss.backward()
    """
    check_bools(compute_entropy=compute_entropy, inplace_backward=inplace_backward, check_finite=check_finite,
                fp32_head=fp32_head, deterministic=deterministic, grad_in_forward=grad_in_forward)
    del inplace_backward  # no logits buffer exists
    opts = GRPOLossOptions.build(options, **loss_options)
    validate_head(hidden, weight, bias, fp32_head, hidden_ndim=3)
    B, T, H = hidden.shape
    V = weight.shape[0]
    m = validate_loss_inputs(B, T, V, hidden.device, tokens, advantages, mask, old_logprobs, ref_logprobs, opts,
                             validate=validate)
    cfg = make_head_config(hidden.device, backend, fp32_head, deterministic, chunk_size)
    if check_finite:
        _check_finite(hidden, "hidden", m)
        _check_finite(weight, "weight")
        check_bias_finite(bias)
    tok, bad = safe_tokens(tokens, V, m)
    keep_entropy = compute_entropy or opts.needs_entropy_grad
    inv_t = 1.0 / opts.temperature

    def loss_fn(lp, en):
        lp = nan_at(bad, lp)   # NaN loss and gradient at an unmasked id out of range
        if check_finite:
            _check_finite(lp.detach(), "per-token log-probs", m)
        return grpo_token_loss(lp, en if keep_entropy else None, advantages, m, old_logprobs, ref_logprobs, opts,
                               num_items_in_batch=num_items_in_batch)

    # under torch.vmap / torch.func the inputs are batched wrappers without storage: the plain path handles them
    functorch = torch._C._are_functorch_transforms_active()
    if grad_in_forward and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not functorch:
        if not opts.reduce:
            raise ValueError("grad_in_forward=True needs a scalar loss (reduce=True)")
        return _loss_with_grads_in_forward(hidden.reshape(B * T, H), weight, bias, tok.reshape(-1), m.reshape(-1),
                                           inv_t, cfg, B, T, loss_fn, opts.needs_entropy_grad)
    logp, ent = token_stats_rows(hidden.reshape(B * T, H), weight, bias, tok.reshape(-1), m.reshape(-1), inv_t, cfg)
    return loss_fn(logp.view(B, T), ent.view(B, T))


class LinearGRPOLoss(nn.Module):
    """Module form of ``linear_grpo_loss``: options fixed (and validated) at construction, tensors per call.

    ``LinearGRPOLoss(options=None, *, compute_entropy, check_finite, validate, fp32_head, deterministic,
    chunk_size, grad_in_forward, backend, **loss_options)``; ``forward(hidden, weight, tokens, advantages,
    mask=None, old_logprobs=None, ref_logprobs=None, bias=None, num_items_in_batch=None)`` returns
    ``(loss, metrics)``. ``self.options`` is the :class:`GRPOLossOptions`. Tensors as in ``linear_grpo_loss``:
    ``hidden`` (B, T, H) fp32, bf16 or fp16; ``weight`` (V, H), same dtype unless ``fp32_head``; ``tokens``
    (B, T) int64/int32; ``advantages`` (B,), (B, 1) or (B, T); ``mask`` (B, T) bool or 0/1;
    ``old_logprobs`` / ``ref_logprobs`` (B, T) or None; ``bias`` (V,) or None.

    Example::

        loss_fn = LinearGRPOLoss(temperature=0.7, eps_high=0.28, loss_agg_mode="token-mean")
        loss, metrics = loss_fn(hidden, model.lm_head.weight, tokens, advantages, mask, old_logprobs)
    """

    def __init__(self, options: Optional[GRPOLossOptions] = None, *, compute_entropy: bool = True,
                 check_finite: bool = False, validate: str = "cheap", fp32_head: bool = False,
                 deterministic: bool = False, chunk_size: Optional[int] = None, grad_in_forward: bool = False,
                 backend: str = "auto", **loss_options):
        super().__init__()
        # validate now so a bad option fails at construction, not at the first step
        self.options = GRPOLossOptions.build(options, **loss_options)
        check_bools(compute_entropy=compute_entropy, check_finite=check_finite, fp32_head=fp32_head,
                    deterministic=deterministic, grad_in_forward=grad_in_forward)
        check_validate(validate)
        check_choice(backend, "backend", BACKENDS)
        check_chunk_size(chunk_size)
        if grad_in_forward and not self.options.reduce:
            raise ValueError("grad_in_forward=True needs a scalar loss (reduce=True)")
        self.call_options = dict(compute_entropy=compute_entropy, check_finite=check_finite, validate=validate,
                                 fp32_head=fp32_head, deterministic=deterministic, chunk_size=chunk_size,
                                 grad_in_forward=grad_in_forward, backend=backend)

    def forward(self, hidden, weight, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None,
                bias=None, num_items_in_batch=None):
        return linear_grpo_loss(hidden, weight, tokens, advantages, mask, old_logprobs, ref_logprobs, bias=bias,
                                options=self.options, num_items_in_batch=num_items_in_batch, **self.call_options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**vars(self.options), **self.call_options}.items())
