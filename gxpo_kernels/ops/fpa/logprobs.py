"""``fpa_logprobs``: the public function (validation, backend choice) over the op registered in ``_library.py``.

The math, shapes and kernels are described in ``kernel.py``; the float64 reference is ``reference.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._utils import (check_same_device, check_scalar, check_shape, check_temperature, check_tensor, checked_mask,
                       compiled_safe_tokens, nan_at, resolve_backend)
from ._library import fpa_logprobs_op
from .kernel import FLOAT_DTYPES, as_3d


# (1 + lam) * logits / temperature stays finite in fp32 (as TEMPERATURE_RANGE does for 1 / temperature); the fpa
# log-probs lose about lam * 6e-8 * |logits| / temperature anyway (0.1 at lam = 1e6 for logits of scale 2)
LAM_RANGE = "[0, 1e6]"


def check_lam_temperature(lam, temperature) -> Tuple[float, float]:
    """``lam`` in ``LAM_RANGE`` and the temperature (one rule for every FPA op and the trainer's --fpa_lam). Past
    1e6 the kernels' fp32 logits of pi_hat overflowed: lam = 1e20 gave NaN (Triton) or log-probs off by 3e13
    (PyTorch), lam = 1e300 an internal "cannot be converted to type float without overflow"."""
    return check_scalar(lam, "lam", LAM_RANGE), check_temperature(temperature)


def fpa_logprobs(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor, lam: float = 1.0,
                 temperature: float = 1.0, *, mask: Optional[torch.Tensor] = None, backend: str = "auto"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the policy, the reference and the FPA future policy, in one pass.

    Args:
        logits: (B, T, V) (any leading dims) policy logits, fp32/bf16/fp16. Receives the gradient.
        ref_logits: same shape as ``logits``, reference-model logits, fp32/bf16/fp16 (its own dtype; never
            differentiated).
        tokens: (B, T) int64/int32 token ids; must lie in [0, V) where ``mask`` is set.
        lam: extrapolation strength lambda in [0, 1e6] (default 1.0; 0 gives pi_hat = pi_theta).
        temperature: h = logits / temperature for both models (> 0).
        mask: optional (B, T) bool or 0/1; masked positions return 0 and get zero gradient.
        backend: "auto" (CUDA -> Triton, CPU -> PyTorch, unless TRITON_INTERPRET=1), "triton" or "torch".

    Returns:
        (logp, ref_logp, fpa_logp), each (B, T) fp32: log pi_theta(y), log pi_ref(y), log pi_hat(y) with
        pi_hat = softmax((1 + lam) h_theta - lam h_ref). Only ``logp`` carries a gradient (into ``logits``).

    Example:
        >>> logp, ref_logp, fpa_logp = fpa_logprobs(logits, ref_logits, tokens, lam=1.0, mask=mask)
        >>> chosen = FPALogProbs(logp, ref_logp, fpa_logp, mask)     # feed to fpa_dpo_loss & co.
    """
    check_tensor(logits, "logits", floating=True)
    check_tensor(ref_logits, "ref_logits", floating=True)
    check_tensor(tokens, "tokens")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (*, V) with at least 2 dims, got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    if ref_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"ref_logits must be float32/bfloat16/float16, got {ref_logits.dtype}")
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"ref_logits must have the policy logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    check_shape(tokens, "tokens", logits.shape[:-1])
    check_same_device(logits, "logits", ref_logits=ref_logits, tokens=tokens, mask=mask)
    lam, temperature = check_lam_temperature(lam, temperature)
    lead, V = logits.shape[:-1], logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty vocabulary dim")
    m = checked_mask(mask, lead, logits.device, tokens, V, none_is_all=False)
    be = resolve_backend(backend, logits.device)
    mask1d = None if m is None else m.reshape(-1).contiguous()
    tokens, bad = compiled_safe_tokens(tokens, V, m)
    logp, ref_logp, fpa_logp = fpa_logprobs_op(as_3d(logits), as_3d(ref_logits), tokens.reshape(-1).contiguous(),
                                               mask1d, lam, temperature, be)
    return tuple(nan_at(bad, x.view(lead)) for x in (logp, ref_logp, fpa_logp))
