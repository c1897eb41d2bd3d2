"""FPA log-probs from hidden states: never materialises the (N, V) policy or reference logits.

logits = hidden @ weight.T and ref_logits = ref_hidden @ ref_weight.T are formed one chunk of ``chunk_size``
token rows at a time; each chunk goes through the same host launchers as ``fpa_logprobs`` (Triton kernel on
CUDA / under the interpreter, PyTorch otherwise), so peak extra memory is O(chunk_size * V). Backward
recomputes each chunk's policy logits, turns d(logp) into d(logits) with the FPA backward launcher and
accumulates d(hidden) = dlogits @ weight and d(weight) = dlogits.T @ hidden (fp32 accumulator). The reference
side gets no gradient. Reference: ``fpa_logprobs_ref.py`` on materialised logits.

Note: this is a token-chunked PyTorch driver around the row kernel; a fused-linear Triton tiling (as in the
fused-linear GRPO loss) can replace the per-chunk matmul + kernel later without changing this API.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._utils import (check_same_device, check_shape, check_tensor, check_tokens_in_range, normalize_mask,
                      resolve_backend)
from .fpa_logprobs import FLOAT_DTYPES, check_lam_temperature, fpa_logprobs_bwd, fpa_logprobs_fwd

DEFAULT_CHUNK_SIZE = 1024


class LinearFPALogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, ref_hidden2d, ref_weight, tokens1d, mask1d, lam, temperature,
                chunk_size, backend):
        N = hidden2d.shape[0]
        out = [torch.empty(N, dtype=torch.float32, device=hidden2d.device) for _ in range(4)]
        with torch.no_grad():
            for r0 in range(0, N, chunk_size):
                sl = slice(r0, r0 + chunk_size)
                logits = hidden2d[sl] @ weight.t()
                ref_logits = ref_hidden2d[sl] @ ref_weight.t()
                m = None if mask1d is None else mask1d[sl]
                res = fpa_logprobs_fwd(logits, ref_logits, tokens1d[sl], m, lam, temperature, backend)
                for k in range(4):
                    out[k][sl] = res[k]
        ctx.save_for_backward(hidden2d, weight, tokens1d, mask1d, out[3])
        ctx.temperature, ctx.chunk_size, ctx.backend = temperature, chunk_size, backend
        ctx.mark_non_differentiable(out[1], out[2])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, dlogp, _dref, _dfpa):
        hidden2d, weight, tokens1d, mask1d, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dlogp is None or not (need_h or need_w):
            return (None,) * 10
        N, step = hidden2d.shape[0], ctx.chunk_size
        dhidden = torch.empty_like(hidden2d) if need_h else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for r0 in range(0, N, step):
            sl = slice(r0, r0 + step)
            h = hidden2d[sl]
            logits = h @ weight.t()
            m = None if mask1d is None else mask1d[sl]
            dlogits = fpa_logprobs_bwd(dlogp[sl], logits, tokens1d[sl], m, lse[sl], ctx.temperature, ctx.backend)
            if need_h:
                dhidden[sl] = (dlogits @ weight).to(hidden2d.dtype)
            if need_w:
                dweight += (dlogits.t() @ h).float()
        if need_w:
            dweight = dweight.to(weight.dtype)
        return dhidden, dweight, None, None, None, None, None, None, None, None


def linear_fpa_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                        ref_weight: torch.Tensor, tokens: torch.Tensor, lam: float = 1.0, temperature: float = 1.0,
                        *, mask: Optional[torch.Tensor] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fpa_logprobs`` on hidden states: logits = hidden @ weight.T, ref_logits = ref_hidden @ ref_weight.T.

    Args:
        hidden: (B, T, H) (any leading dims) policy last hidden states; receives a gradient.
        weight: (V, H) policy lm_head weight (no bias); receives a gradient.
        ref_hidden: (B, T, H_ref) reference hidden states (no gradient).
        ref_weight: (V, H_ref) reference lm_head weight (no gradient).
        tokens: (B, T) token ids in [0, V) where ``mask`` is set.
        lam, temperature, mask, backend: as in ``fpa_logprobs``.
        chunk_size: token rows per chunk; peak extra memory ~ 2 * chunk_size * V logits.

    Returns:
        (logp, ref_logp, fpa_logp), each (B, T) fp32; only ``logp`` is differentiable (w.r.t. hidden, weight).

    Example:
        >>> logp, ref_logp, fpa_logp = linear_fpa_logprobs(h, model.lm_head.weight, h_ref,
        ...                                                ref_model.lm_head.weight, tokens, lam=1.0, mask=mask)
    """
    for name, x in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        check_tensor(x, name, floating=True)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    check_tensor(tokens, "tokens")
    check_tensor(weight, "weight", ndim=2)
    check_tensor(ref_weight, "ref_weight", ndim=2)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (*, H) with at least 2 dims, got {tuple(hidden.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} must equal weight's H={H} (weight is (V, H))")
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight must have the policy vocabulary V={V} rows, got {tuple(ref_weight.shape)}")
    check_shape(ref_hidden, "ref_hidden", (*hidden.shape[:-1], ref_weight.shape[1]))
    if ref_hidden.dtype != ref_weight.dtype:
        raise TypeError(f"ref_hidden ({ref_hidden.dtype}) and ref_weight ({ref_weight.dtype}) must share a dtype")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    lead = hidden.shape[:-1]
    check_shape(tokens, "tokens", lead)
    check_same_device(hidden, "hidden", weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      tokens=tokens, mask=mask)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lam, temperature = check_lam_temperature(lam, temperature)
    m = None if mask is None else normalize_mask(mask, lead, hidden.device)
    check_tokens_in_range(tokens, V, m)
    be = resolve_backend(backend, hidden.device)
    logp, ref_logp, fpa_logp = LinearFPALogprobsFunction.apply(
        hidden.reshape(-1, H), weight, ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach(), ref_weight.detach(),
        tokens.reshape(-1).contiguous(), None if m is None else m.reshape(-1).contiguous(), lam, temperature,
        chunk_size, be)
    return logp.view(lead), ref_logp.view(lead), fpa_logp.view(lead)
