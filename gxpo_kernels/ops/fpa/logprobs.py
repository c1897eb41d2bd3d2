"""FPA log-probs: log pi_theta(y), log pi_ref(y) and log pi_hat(y) in one streaming pass (spec section 4).

With h = logits / temperature, the future policy is pi_hat = softmax((1 + lam) * h_theta - lam * h_ref), i.e.
pi_hat ∝ pi_theta^(1+lam) * pi_ref^(-lam). One program per token row walks the vocabulary once over both
logits and keeps three online log-sum-exps, so the extrapolated logits are never materialised.

Shapes: logits, ref_logits (*, V) -> three (*,) fp32 tensors; tokens (*). Dtype policy: load any float dtype,
upcast to fp32 on load, fp32 math, fp32 outputs; dlogits in the logits dtype. Gradient reaches ``logits``
through ``logp`` only (backward recomputes the softmax from the saved lse); ``ref_logp`` and ``fpa_logp`` are
non-differentiable by construction. Reference: ``fpa_logprobs_ref.py``. Paper: arXiv 2509.19893.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._utils import (check_same_device, check_shape, check_tensor, check_tokens_in_range, normalize_mask,
                      resolve_backend, triton_interpret)
from ..logprobs.op import _LN2, _LOG2E, _lse_group_step, _num_warps, _vec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# rows per chunk of the PyTorch path (bounds its fp32 temporaries to ~rows * V * 4 bytes each)
_TORCH_CHUNK_ELEMS = 1 << 20  # ~4 MiB temporaries: cache-resident and reused by malloc


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fpa_step(p_l, p_r, o_g, c, lam, m1, s1, m2, s2, m3, s3, mask, MASKED: tl.constexpr):
    """One (groups, VEC) tile of both logits rows into the three per-group online log-sum-exps (base 2)."""
    if MASKED:   # ragged tail: padding reads as -inf and adds nothing
        x_h = tl.load(p_l + o_g, mask=mask, other=float("-inf")).to(tl.float32)
        x_r = tl.load(p_r + o_g, mask=mask, other=float("-inf")).to(tl.float32)
        x_f = tl.where(mask, (1.0 + lam) * x_h - lam * x_r, float("-inf"))
    else:
        x_h = tl.load(p_l + o_g).to(tl.float32)
        x_r = tl.load(p_r + o_g).to(tl.float32)
        x_f = (1.0 + lam) * x_h - lam * x_r
    m1, s1, _ = _lse_group_step(x_h, m1, s1, s1, c, False)
    m2, s2, _ = _lse_group_step(x_r, m2, s2, s2, c, False)
    m3, s3, _ = _lse_group_step(x_f, m3, s3, s3, c, False)
    return m1, s1, m2, s2, m3, s3


@triton.jit
def _lse_finish(m_g, s_g):
    """Natural-log lse of a row from its per-group base-2 statistics (the one cross-thread combine)."""
    m = tl.max(m_g, axis=0)
    return (m + tl.log2(tl.sum(s_g * tl.exp2(m_g - m), axis=0))) * _LN2


@triton.jit(do_not_specialize=["V", "lam", "temperature"])
def _fpa_logprobs_fwd_kernel(p_logits, p_ref, p_tokens, p_mask, p_logp, p_ref_logp, p_fpa_logp, p_lse,
                             stride_l, stride_r, V, lam, temperature,
                             HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(p_mask + i_row) != 0
    if valid:
        p_l = p_logits + i_row * stride_l
        p_r = p_ref + i_row * stride_r
        # (BLOCK_V / VEC, VEC) tiles: each group of VEC contiguous logits belongs to one thread and keeps its
        # own running statistics for the whole row; the finite start avoids exp(-inf - (-inf)) = NaN
        G: tl.constexpr = BLOCK_V // VEC
        o_g = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        c = _LOG2E / temperature
        m1 = tl.full([G], -1.0e30, tl.float32)
        m2 = tl.full([G], -1.0e30, tl.float32)
        m3 = tl.full([G], -1.0e30, tl.float32)
        s1 = tl.zeros([G], tl.float32)
        s2 = tl.zeros([G], tl.float32)
        s3 = tl.zeros([G], tl.float32)
        v_full = V - V % BLOCK_V
        for v0 in range(0, v_full, BLOCK_V):
            m1, s1, m2, s2, m3, s3 = _fpa_step(p_l + v0, p_r + v0, o_g, c, lam, m1, s1, m2, s2, m3, s3,
                                               None, False)
        if v_full < V:
            m1, s1, m2, s2, m3, s3 = _fpa_step(p_l + v_full, p_r + v_full, o_g, c, lam, m1, s1, m2, s2, m3, s3,
                                               v_full + o_g < V, True)
        lse1 = _lse_finish(m1, s1)
        lse2 = _lse_finish(m2, s2)
        lse3 = _lse_finish(m3, s3)
        tok = tl.load(p_tokens + i_row).to(tl.int64)
        t_h = tl.load(p_l + tok).to(tl.float32) / temperature
        t_r = tl.load(p_r + tok).to(tl.float32) / temperature
        t_x = (1.0 + lam) * t_h - lam * t_r
        tl.store(p_logp + i_row, t_h - lse1)
        tl.store(p_ref_logp + i_row, t_r - lse2)
        tl.store(p_fpa_logp + i_row, t_x - lse3)
        tl.store(p_lse + i_row, lse1)
    else:
        tl.store(p_logp + i_row, 0.0)
        tl.store(p_ref_logp + i_row, 0.0)
        tl.store(p_fpa_logp + i_row, 0.0)
        tl.store(p_lse + i_row, 0.0)


@triton.jit(do_not_specialize=["V", "temperature"])
def _fpa_logprobs_bwd_kernel(p_logits, p_tokens, p_mask, p_lse, p_dlogp, p_dlogits, stride_l, stride_d, V,
                             temperature, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    # d logp / d h_v = (onehot(y)_v - softmax(h / T)_v) / T: the non-target part -g p_v per element (one MUFU),
    # the target's +g by one scalar store at the end
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(p_mask + i_row) != 0
    p_d = p_dlogits + i_row * stride_d
    o_v = tl.arange(0, BLOCK_V)
    if valid:
        p_l = p_logits + i_row * stride_l
        lse2 = tl.load(p_lse + i_row) * _LOG2E
        g = tl.load(p_dlogp + i_row).to(tl.float32) / temperature
        c = _LOG2E / temperature
        tok = tl.load(p_tokens + i_row).to(tl.int64)
        x_y = tl.load(p_l + tok).to(tl.float32)
        v_full = V - V % BLOCK_V
        for v0 in range(0, v_full, BLOCK_V):
            x = tl.load(p_l + v0 + o_v).to(tl.float32)
            tl.store(p_d + v0 + o_v, (-g * tl.exp2(x * c - lse2)).to(p_dlogits.dtype.element_ty))
        if v_full < V:
            m_v = v_full + o_v < V
            x = tl.load(p_l + v_full + o_v, mask=m_v, other=0.0).to(tl.float32)
            tl.store(p_d + v_full + o_v, (-g * tl.exp2(x * c - lse2)).to(p_dlogits.dtype.element_ty), mask=m_v)
        tl.debug_barrier()   # orders every thread's store of the target element before the fix-up
        tl.store(p_d + tok, (g - g * tl.exp2(x_y * c - lse2)).to(p_dlogits.dtype.element_ty))
    else:
        for v0 in range(0, V, BLOCK_V):
            m_v = (v0 + o_v) < V
            tl.store(p_d + v0 + o_v, tl.zeros([BLOCK_V], tl.float32).to(p_dlogits.dtype.element_ty), mask=m_v)


# ------------------------------------------------------------------------------------------ host launchers
def _launch_cfg(V: int):
    # interpreter: wider blocks mean fewer (slow, serial) loop iterations; GPU: 4096 lanes fit registers
    cap = 8192 if triton_interpret() else 4096
    block_v = min(triton.next_power_of_2(V), cap)
    return block_v, _num_warps(block_v)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(*, V) -> (N, V) with unit stride along V (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fpa_logprobs_fwd(logits2d: torch.Tensor, ref2d: torch.Tensor, tokens1d: torch.Tensor,
                     mask1d: Optional[torch.Tensor], lam: float, temperature: float, backend: str):
    """(N, V), (N, V), (N,), (N,) bool or None -> logp, ref_logp, fpa_logp, lse (each (N,) fp32)."""
    N, V = logits2d.shape
    if backend == "torch":
        return _fpa_fwd_torch(logits2d, ref2d, tokens1d, mask1d, lam, temperature)
    # four separate buffers (not views of one) so autograd never sees outputs that alias each other
    out = [torch.empty(N, dtype=torch.float32, device=logits2d.device) for _ in range(4)]
    if N == 0:
        return tuple(out)
    block_v, warps = _launch_cfg(V)
    m = mask1d if mask1d is not None else tokens1d  # dummy pointer when HAS_MASK is False
    _fpa_logprobs_fwd_kernel[(N,)](
        logits2d, ref2d, tokens1d, m, out[0], out[1], out[2], out[3],
        logits2d.stride(0), ref2d.stride(0), V, float(lam), float(temperature),
        HAS_MASK=mask1d is not None, BLOCK_V=block_v, VEC=min(_vec(logits2d, block_v), _vec(ref2d, block_v)),
        num_warps=warps)
    return out[0], out[1], out[2], out[3]


def fpa_logprobs_bwd(dlogp: torch.Tensor, logits2d: torch.Tensor, tokens1d: torch.Tensor,
                     mask1d: Optional[torch.Tensor], lse: torch.Tensor, temperature: float, backend: str):
    """d(loss)/d(logits2d) from d(loss)/d(logp) (N,); returned in the logits dtype, shape (N, V)."""
    N, V = logits2d.shape
    if backend == "torch":
        return _fpa_bwd_torch(dlogp, logits2d, tokens1d, mask1d, lse, temperature)
    dlogits = torch.empty((N, V), dtype=logits2d.dtype, device=logits2d.device)
    if N == 0:
        return dlogits
    block_v, warps = _launch_cfg(V)
    m = mask1d if mask1d is not None else tokens1d
    _fpa_logprobs_bwd_kernel[(N,)](
        logits2d, tokens1d, m, lse, dlogp.contiguous(), dlogits, logits2d.stride(0), dlogits.stride(0), V,
        float(temperature), HAS_MASK=mask1d is not None, BLOCK_V=block_v, num_warps=warps)
    return dlogits


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(V, 1))


def _fpa_fwd_torch(logits2d, ref2d, tokens1d, mask1d, lam, temperature):
    # same math as the kernel, chunked over rows so fp32 temporaries stay bounded
    N, V = logits2d.shape
    out = [torch.zeros(N, dtype=torch.float32, device=logits2d.device) for _ in range(4)]
    idx = tokens1d.long().clamp(0, max(V - 1, 0)).unsqueeze(-1)
    step = _chunk_rows(V)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        h = logits2d[sl].float() / temperature
        r = ref2d[sl].float() / temperature
        x = (1.0 + lam) * h - lam * r
        lse1, lse2, lse3 = (torch.logsumexp(z, -1) for z in (h, r, x))
        i = idx[sl]
        out[0][sl] = h.gather(-1, i).squeeze(-1) - lse1
        out[1][sl] = r.gather(-1, i).squeeze(-1) - lse2
        out[2][sl] = x.gather(-1, i).squeeze(-1) - lse3
        out[3][sl] = lse1
    if mask1d is not None:
        for o in out:
            o.masked_fill_(~mask1d, 0.0)
    return tuple(out)


def _fpa_bwd_torch(dlogp, logits2d, tokens1d, mask1d, lse, temperature):
    N, V = logits2d.shape
    dlogits = torch.empty((N, V), dtype=logits2d.dtype, device=logits2d.device)
    g = dlogp.float() / temperature
    if mask1d is not None:
        g = torch.where(mask1d, g, torch.zeros_like(g))
    idx = tokens1d.long().clamp(0, max(V - 1, 0)).unsqueeze(-1)
    step = _chunk_rows(V)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        p = torch.exp(logits2d[sl].float() / temperature - lse[sl, None])
        d = -g[sl, None] * p
        d.scatter_add_(-1, idx[sl], g[sl, None])
        if mask1d is not None:  # masked rows may hold overflowing p: force exact zeros there
            d.masked_fill_(~mask1d[sl, None], 0.0)
        dlogits[sl] = d.to(logits2d.dtype)
    return dlogits


# ----------------------------------------------------------------------------------------------- autograd
class FPALogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, ref2d, tokens1d, mask1d, lam, temperature, backend):
        logp, ref_logp, fpa_logp, lse = fpa_logprobs_fwd(logits2d, ref2d, tokens1d, mask1d, lam, temperature,
                                                         backend)
        ctx.save_for_backward(logits2d, tokens1d, mask1d, lse)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(ref_logp, fpa_logp)
        return logp, ref_logp, fpa_logp

    @staticmethod
    def backward(ctx, dlogp, _dref, _dfpa):
        logits2d, tokens1d, mask1d, lse = ctx.saved_tensors
        dlogits = None
        if ctx.needs_input_grad[0]:
            if dlogp is None:
                dlogp = torch.zeros_like(lse)
            dlogits = fpa_logprobs_bwd(dlogp, logits2d, tokens1d, mask1d, lse, ctx.temperature, ctx.backend)
        return dlogits, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- public fn
def check_lam_temperature(lam, temperature) -> Tuple[float, float]:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return float(lam), float(temperature)


def fpa_logprobs(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor, lam: float = 1.0,
                 temperature: float = 1.0, *, mask: Optional[torch.Tensor] = None, backend: str = "auto"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the policy, the reference and the FPA future policy, in one pass.

    Args:
        logits: (B, T, V) (any leading dims) policy logits, fp32/bf16/fp16. Receives the gradient.
        ref_logits: same shape as ``logits``, reference-model logits (any float dtype; never differentiated).
        tokens: (B, T) int64/int32 token ids; must lie in [0, V) where ``mask`` is set.
        lam: extrapolation strength lambda >= 0 (default 1.0; 0 gives pi_hat = pi_theta).
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
    m = None if mask is None else normalize_mask(mask, lead, logits.device)
    check_tokens_in_range(tokens, V, m)
    be = resolve_backend(backend, logits.device)
    mask1d = None if m is None else m.reshape(-1).contiguous()
    logp, ref_logp, fpa_logp = FPALogprobsFunction.apply(
        _rows(logits), _rows(ref_logits), tokens.reshape(-1).contiguous(), mask1d, lam, temperature, be)
    return logp.view(lead), ref_logp.view(lead), fpa_logp.view(lead)
