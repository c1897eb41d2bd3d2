"""Fused GRPO loss from logits.

    loss = agg_{mask}( -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)  [dual clip, delta]
                       + beta * k3(ref, logp) - entropy_coef * H )

Two stages: one streaming pass over the vocabulary (``token_logprobs``: fp32 per-token log pi and entropy,
nothing of size V saved) and the O(tokens) loss math of ``gxpo_kernels.losses.grpo_token_loss``. The backward runs
one more pass that writes dlogits (optionally into the logits buffer). Shapes: logits (B, T, V), everything
else (B, T) (advantages also (B,)). Reference: ``reference.grpo_loss_ref`` (float64).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..._utils import check_finite as _check_finite
from ..._utils import BACKENDS, check_bools, check_choice, check_validate, nan_at, resolve_backend, safe_tokens
from ...losses import GRPOLossOptions, grpo_token_loss, validate_loss_inputs
from ..logprobs.op import _token_logprobs, validate_logits


def grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    options: Optional[GRPOLossOptions] = None,
    num_items_in_batch: Union[None, int, float, torch.Tensor] = None,
    compute_entropy: bool = True,
    inplace_backward: bool = False,
    check_finite: bool = False,
    validate: str = "cheap",
    backend: str = "auto",
    **loss_options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO / DAPO / Dr.GRPO / GSPO / CISPO / SAPO / VESPO policy loss on logits, fused over the vocabulary.

    Args:
        logits: (B, T, V) fp32, bf16 or fp16 scores aligned with ``tokens`` (for a causal LM pass
            ``logits[:, :-1]``; strided slices are read in place). Math is fp32 whatever the dtype. A -inf
            logit is a token of probability 0 (no NaN in the loss, the entropy or the gradient).
        tokens: (B, T) int64/int32 sampled token ids, in [0, V) at unmasked positions (an id out of range
            makes the loss NaN; ``validate="full"`` raises instead). Hugging Face's -100 label padding is such
            an id: mask it (``mask=tokens != -100``).
        advantages: (B,) or (B, 1) per sequence, or (B, T) per token, any float dtype.
        mask: (B, T) bool or 0/1 (None = all valid). Masked positions cost nothing and get zero gradient.
        old_logprobs: (B, T) log-probs of the behaviour policy; None = on-policy (ratio 1, gradient kept).
        ref_logprobs: (B, T) reference-policy log-probs for the k3 KL; required when ``beta > 0``.
            ``advantages``, ``old_logprobs`` and ``ref_logprobs`` are treated as constants (detached).
        options: a :class:`gxpo_kernels.losses.GRPOLossOptions`; keyword arguments named like its fields
            (``temperature``, ``eps_low``, ``eps_high``, ``dual_clip``, ``delta``, ``beta``, ``entropy_coef``,
            ``importance_sampling``, ``loss_agg_mode``, ``max_length``, ``policy_loss``, ``kl_clamp``,
            ``log_ratio_clamp``, ``use_bias_correction_kl``, ``empty_sequences``, ``reduce``, ...) override it.
        num_items_in_batch: token count that divides the masked sum (``loss_agg_mode="token-mean"`` only),
            e.g. for a DAPO step the loss tokens over all ranks and accumulation steps, divided by the number
            of ranks when gradients are averaged over ranks (DDP, FSDP; docs/losses.md); int, float or a 0-d
            tensor (kept on the device).
        compute_entropy: compute the entropy metric (same pass, nearly free); forced on if entropy_coef != 0.
        inplace_backward: write dlogits into the logits buffer during backward (saves a (B, T, V) buffer;
            the logits' values are destroyed). Logits whose elements overlap in memory (stride-0 or
            ``unfold`` views) are refused. Ignored under ``torch.compile``, for a leaf (or a view of one), for
            a lazily negated view (``logits.is_neg()``) and inside saved-tensor hooks (a non-reentrant
            ``torch.utils.checkpoint``, ``save_on_cpu``), which skip autograd's check that saved tensors are
            unchanged.
        check_finite: raise ValueError if logits hold NaN/inf at unmasked positions (reads the logits once
            more and synchronises with the GPU).
        validate: "cheap" (shapes, dtypes, devices, hyperparameters; no host sync) or "full" (also ids in
            range and 0/1 mask values; one host sync). See docs/validation.md.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton" or "torch".

    Returns:
        (loss, metrics): ``loss`` is a 0-d fp32 tensor ((B, T) with ``reduce=False``); ``metrics`` maps
        "clip_frac_low", "clip_frac_high", "ratio_mean", "logp_mean", "entropy" (if computed) and "kl" (if
        ``ref_logprobs`` given) to detached 0-d fp32 tensors (means over unmasked tokens).

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
    check_bools(compute_entropy=compute_entropy, inplace_backward=inplace_backward, check_finite=check_finite)
    validate_logits(logits)
    B, T, V = logits.shape
    opts = GRPOLossOptions.build(options, **loss_options)
    bk = resolve_backend(backend, logits.device)
    m = validate_loss_inputs(B, T, V, logits.device, tokens, advantages, mask, old_logprobs, ref_logprobs, opts,
                             validate=validate)
    if check_finite:
        _check_finite(logits, "logits", m)
    tok, bad = safe_tokens(tokens, V, m)
    want_entropy = bool(compute_entropy) or opts.needs_entropy_grad
    logp, entropy = _token_logprobs(logits, tok, m, opts.temperature, want_entropy, inplace_backward, bk)
    logp = nan_at(bad, logp)   # NaN loss and gradient at an unmasked id out of range
    return grpo_token_loss(logp, entropy, advantages, m, old_logprobs, ref_logprobs, opts,
                           num_items_in_batch=num_items_in_batch)


class GRPOLoss(nn.Module):
    """Module form of :func:`grpo_loss`: the options are fixed (and validated) at construction.

    ``GRPOLoss(options=None, *, compute_entropy, inplace_backward, check_finite, validate, backend,
    **loss_options)``; ``forward(logits, tokens, advantages, mask=None, old_logprobs=None,
    ref_logprobs=None, num_items_in_batch=None)`` returns ``(loss, metrics)``. ``self.options`` is the
    :class:`GRPOLossOptions`. Tensors as in :func:`grpo_loss`: ``logits`` (B, T, V) fp32, bf16 or fp16;
    ``tokens`` (B, T) int64/int32; ``advantages`` (B,), (B, 1) or (B, T); ``mask`` (B, T) bool or 0/1;
    ``old_logprobs`` / ``ref_logprobs`` (B, T) or None. ``loss`` is a 0-d fp32 tensor (``(B, T)`` per token
    with ``reduce=False``).

    Example:
        >>> crit = GRPOLoss(eps_high=0.28, loss_agg_mode="token-mean")
        >>> loss, metrics = crit(logits, tokens, advantages, mask, old_logprobs)
    """

    def __init__(self, options: Optional[GRPOLossOptions] = None, *, compute_entropy: bool = True,
                 inplace_backward: bool = False, check_finite: bool = False, validate: str = "cheap",
                 backend: str = "auto", **loss_options):
        super().__init__()
        self.options = GRPOLossOptions.build(options, **loss_options)  # validate now, not at the first forward
        check_bools(compute_entropy=compute_entropy, inplace_backward=inplace_backward, check_finite=check_finite)
        check_choice(backend, "backend", BACKENDS)
        check_validate(validate)
        self.call_options = dict(compute_entropy=compute_entropy, inplace_backward=inplace_backward,
                                 check_finite=check_finite, validate=validate, backend=backend)

    def forward(self, logits, tokens, advantages, mask=None, old_logprobs=None, ref_logprobs=None,
                num_items_in_batch=None):
        return grpo_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs, options=self.options,
                         num_items_in_batch=num_items_in_batch, **self.call_options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**vars(self.options), **self.call_options}.items())
