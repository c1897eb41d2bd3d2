"""``token_logprobs``: the public function (validation, backend choice) over the op registered in ``_library.py``.

The math, shapes and kernels are described in ``kernel.py``; the float64 reference is ``reference.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._utils import (check_bools, check_same_device, check_temperature, check_tensor, checked_mask,
                       compiled_safe_tokens, has_internal_overlap, nan_at, resolve_backend, saved_tensor_hooks_active)
from . import _library


def validate_logits(logits, name: str = "logits") -> None:
    check_tensor(logits, name, ndim=3)
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: Optional[torch.Tensor] = None,
    compute_entropy: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probability of each target token and the entropy of each position's distribution, at temperature T.

    Args:
        logits: (B, T, V) fp32/bf16/fp16 scores, already aligned with ``tokens`` (for causal LM output
            ``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]``; the slice is read in place, not copied).
        tokens: (B, T) int64/int32 target ids in [0, V) at unmasked positions (Hugging Face's -100 label
            padding is not ignored: mask it, ``mask=tokens != -100``).
        temperature: divides the logits before the softmax (> 0). Runtime value: no recompilation.
        mask: (B, T) bool or 0/1, or None. Masked positions get logp = entropy = 0 and zero gradient, and
            cost no pass over the vocabulary.
        compute_entropy: also return the entropy (almost free: same pass); ``False`` returns ``None``.
        inplace_backward: the backward writes dlogits into the ``logits`` buffer (saves B*T*V memory). The
            logits' values are destroyed by the backward; do not reuse them. Ignored under ``torch.compile``
            and for a leaf tensor or a view of one (nothing to save: autograd copies a leaf's gradient), and
            for a lazily negated view (``logits.is_neg()``).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton" or "torch".

    Returns:
        (logp, entropy): fp32 (B, T) each, differentiable w.r.t. ``logits``; ``entropy`` is None when not
        computed. Under ``torch.no_grad`` nothing is saved for backward.

    Example:
        >>> logits = torch.randn(2, 5, 1000)
        >>> tokens = torch.randint(0, 1000, (2, 5))
        >>> logp, ent = token_logprobs(logits, tokens, temperature=0.7, mask=tokens > 10)
        >>> logp.shape, ent.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    check_bools(compute_entropy=compute_entropy, inplace_backward=inplace_backward)
    validate_logits(logits)
    B, T, V = logits.shape
    check_tensor(tokens, "tokens", ndim=2)
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must have shape {(B, T)}, got {tuple(tokens.shape)}")
    check_same_device(logits, "logits", tokens=tokens, mask=mask)
    temperature = check_temperature(temperature)
    m = checked_mask(mask, (B, T), logits.device, tokens, V, none_is_all=False)
    bk = resolve_backend(backend, logits.device)
    tokens, bad = compiled_safe_tokens(tokens, V, m)
    logp, ent = _token_logprobs(logits, tokens, m, float(temperature), compute_entropy, inplace_backward, bk)
    return nan_at(bad, logp), ent


def _token_logprobs(logits, tokens, mask, temperature, compute_entropy, inplace_backward, backend):
    """Validated entry shared by ``token_logprobs`` and ``grpo_loss`` (mask: bool (B, T) or None)."""
    if torch.compiler.is_compiling():
        inplace_backward = False  # a mutation inside a compiled backward graph is not worth the risk
    elif inplace_backward and has_internal_overlap(logits):
        # rows sharing memory (stride-0 expand, unfold windows) would overwrite each other's gradient
        raise ValueError(f"inplace_backward=True needs logits whose elements do not overlap in memory; got shape "
                         f"{tuple(logits.shape)} with strides {logits.stride()} (pass inplace_backward=False, "
                         "or a contiguous copy)")
    if inplace_backward and (logits.is_leaf or (logits._base is not None and logits._base.is_leaf)):
        # the memory of a leaf (or a view of one) is the caller's tensor, and autograd copies a leaf's gradient
        # anyway: overwriting it would destroy the caller's values and save nothing
        inplace_backward = False
    if inplace_backward and saved_tensor_hooks_active():
        # saved-tensor hooks (a non-reentrant checkpoint, save_on_cpu) skip autograd's version check: another node
        # that saved these logits, a second backward or a checkpoint's recomputation would silently read d(logits)
        inplace_backward = False
    if inplace_backward and logits.is_neg():
        # a negated view (its memory holds -logits) cannot be the registered in-place op's mutated argument (the
        # dispatcher's negation fallback fails on it) and would have to be written through a copy anyway
        inplace_backward = False
    logp, ent = _library.token_logprobs_op(logits, tokens, mask, temperature, compute_entropy,
                                           inplace_backward, backend)
    return logp, (ent if compute_entropy else None)

