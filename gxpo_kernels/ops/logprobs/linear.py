"""``linear_token_logprobs``: per-token log-prob and entropy from hidden states and the lm_head, through the
fused linear head engine (``fused_head/engine.py``: math, kernels, backends). Reference on materialised
logits: ``reference.token_logprobs_ref``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._utils import (check_bias_finite, check_bools, check_same_device, check_shape, check_temperature, check_tensor,
                       checked_mask, compiled_safe_tokens, nan_at)
from ..._utils import check_finite as _check_finite  # the public kwarg `check_finite` shadows it
from ..fused_head._library import token_stats_rows
from ..fused_head.engine import make_head_config, validate_head


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          temperature: float = 1.0, *, bias: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None, compute_entropy: bool = True,
                          fp32_head: bool = False, deterministic: bool = False, chunk_size: Optional[int] = None,
                          check_finite: bool = False, backend: str = "auto"
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-prob and entropy of ``tokens`` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: (N, H) or (B, T, H) final hidden states; row n scores ``tokens[n]``.
        weight: (V, H) lm_head weight (same dtype as ``hidden`` unless ``fp32_head``); bias: (V,) or None.
        tokens: (N,) or (B, T) int64/int32 ids in [0, V) at unmasked positions.
        temperature: logits are divided by it.
        mask: optional bool/0-1 of the token shape; masked rows are skipped (no GEMM work) and get 0.
        compute_entropy: return the full-distribution entropy (else ``None``).
        fp32_head: fp32 GEMM operands (the TRL ``cast_lm_head_to_fp32`` behaviour) for bf16/fp16 inputs.
        deterministic: bitwise reproducible gradients (always the case: neither backend uses atomics).
        chunk_size: token rows per chunk of the torch backend and of the Triton backward.
        check_finite: raise ValueError on NaN/inf in hidden or weight, NaN/+inf in bias (-inf: a banned token).
        backend: "auto" | "triton" | "torch".
    Returns:
        (logp, entropy), fp32 of the token shape; differentiable w.r.t. hidden, weight and bias. Under
        ``torch.no_grad()`` nothing is saved (the fast path for old/reference log-probs).

    Example::

        logp, ent = linear_token_logprobs(h, model.lm_head.weight, ids, temperature=0.7, mask=completion_mask)
    """
    check_bools(compute_entropy=compute_entropy, fp32_head=fp32_head, deterministic=deterministic,
                check_finite=check_finite)
    validate_head(hidden, weight, bias, fp32_head)
    temperature = check_temperature(temperature)
    shape = hidden.shape[:-1]
    check_tensor(tokens, "tokens", ndim=len(shape))
    check_shape(tokens, "tokens", shape)
    check_same_device(hidden, "hidden", tokens=tokens, mask=mask)
    m = checked_mask(mask, shape, hidden.device, tokens, weight.shape[0])
    if check_finite:
        _check_finite(hidden, "hidden", m)
        _check_finite(weight, "weight")
        check_bias_finite(bias)
    cfg = make_head_config(hidden.device, backend, fp32_head, deterministic, chunk_size)
    tokens, bad = compiled_safe_tokens(tokens, weight.shape[0], m)
    logp, ent = token_stats_rows(hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1),
                                 m.reshape(-1), 1.0 / float(temperature), cfg)
    logp = nan_at(bad, logp.view(shape))
    return logp, (ent.view(shape) if compute_entropy else None)
