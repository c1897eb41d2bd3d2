"""FPA log-probs kernels: log pi_theta(y), log pi_ref(y) and log pi_hat(y) in one streaming pass.

With h = logits / temperature, the future policy is pi_hat = softmax((1 + lam) * h_theta - lam * h_ref), i.e.
pi_hat ∝ pi_theta^(1+lam) * pi_ref^(-lam). One program per token row walks the vocabulary once over both
logits and keeps three online log-sum-exps, so the extrapolated logits are never materialised.

Shapes: logits, ref_logits (*, V) -> three (*,) fp32 tensors; tokens (*). Dtype policy: load fp32/bf16/fp16
(each its own), upcast to fp32 on load, fp32 math, fp32 outputs; dlogits in the logits dtype. Gradient reaches
``logits`` through ``logp`` only, by ``token_logprobs``' backward (the softmax recomputed from the saved float64
lse, which this forward computes as token_logprobs' does: same c = log2(e) / T, same fma exponents);
``ref_logp`` and ``fpa_logp`` are non-differentiable by construction. Reference: ``reference.py``. Registration:
``_library.py``; public function: ``logprobs.py``. Paper: arXiv 2509.19893.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._utils import autocast_off, resolved, triton_interpret
from ..logprobs.kernel import _LOG2E, _log_probs_chunk, _logp_lse, _lse_group_step, _num_warps, _row_layout, _vec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32,) * 3 + (torch.float64,)   # logp, ref_logp, fpa_logp, lse (as token_logprobs saves it)
# rows per chunk of the PyTorch path (bounds its fp32 temporaries to ~rows * V * 4 bytes each)
_TORCH_CHUNK_ELEMS = 1 << 20  # ~4 MiB temporaries: cache-resident and reused by malloc


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fpa_step(p_l, p_r, o_g, c, lam, m1, s1, m2, s2, m3, s3, mask, MASKED: tl.constexpr):
    """One (groups, VEC) tile of both logits rows into the three per-group online log-sum-exps (base 2)."""
    if MASKED:   # ragged tail: padding reads as -inf and adds nothing
        x_h = tl.load(p_l + o_g, mask=mask, other=float("-inf")).to(tl.float32)
        x_r = tl.load(p_r + o_g, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        x_h = tl.load(p_l + o_g).to(tl.float32)
        x_r = tl.load(p_r + o_g).to(tl.float32)
    x_f = _fpa_x(x_h, x_r, lam)
    m1, s1, _ = _lse_group_step(x_h, m1, s1, s1, c, False)
    m2, s2, _ = _lse_group_step(x_r, m2, s2, s2, c, False)
    m3, s3, _ = _lse_group_step(x_f, m3, s3, s3, c, False)
    return m1, s1, m2, s2, m3, s3


@triton.jit
def _fpa_x(x_h, x_r, lam):
    """Raw logits of pi_hat (the one Triton definition; ``fpa_logits`` is the PyTorch one): lam = 0 gives x_h
    itself (no 0 * -inf = NaN from a -inf reference logit); a -inf policy logit (and padding) stays probability 0
    under pi_hat, not -inf + inf = NaN when ref is -inf; a -inf reference logit under a finite policy one gives
    +inf, which makes the row's log pi_hat NaN (pi_hat is undefined there)."""
    x_f = tl.where(x_h == float("-inf"), float("-inf"), (1.0 + lam) * x_h - lam * x_r)
    return tl.where(lam == 0.0, x_h, x_f)


@triton.jit
def _logp_finish(m_g, s_g, x_y, c):
    """(log-prob of the raw target logit x_y, float64 lse) of a row from its per-group base-2 statistics (the
    one cross-thread combine)."""
    m = tl.max(m_g, axis=0)
    return _logp_lse(x_y, c, m, tl.sum(s_g * tl.exp2(m_g - m), axis=0))


# as in token_logprobs: the row counts and batch row strides change from call to call (never specialised); the
# time strides stay specialised so that the compiler can prove 16-byte alignment of every row
@triton.jit(do_not_specialize=["T", "rows_b_l", "rows_b_r", "V", "lam", "inv_temp"])
def _fpa_logprobs_fwd_kernel(p_logits, p_ref, p_tokens, p_mask, p_logp, p_ref_logp, p_fpa_logp, p_lse,
                             T, rows_b_l, stride_l, rows_b_r, stride_r, V, lam, inv_temp,
                             HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # (B, T, V) logits and reference logits: row (b, t) of each starts at (b * rows_b + t) * stride
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(p_mask + i_row) != 0
    if valid:
        i_b = i_row // T
        i_t = i_row - i_b * T
        p_l = p_logits + (i_b * rows_b_l + i_t) * stride_l
        p_r = p_ref + (i_b * rows_b_r + i_t) * stride_r
        # (BLOCK_V / VEC, VEC) tiles: each group of VEC contiguous logits belongs to one thread and keeps its
        # own running statistics for the whole row; the finite start avoids exp(-inf - (-inf)) = NaN
        G: tl.constexpr = BLOCK_V // VEC
        o_g = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        c = inv_temp * _LOG2E              # as token_logprobs' backward computes it
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
        tok = tl.load(p_tokens + i_row).to(tl.int64)
        t_h = tl.load(p_l + tok).to(tl.float32)
        t_r = tl.load(p_r + tok).to(tl.float32)
        logp, lse = _logp_finish(m1, s1, t_h, c)
        ref_logp, _ = _logp_finish(m2, s2, t_r, c)
        fpa_logp, _ = _logp_finish(m3, s3, _fpa_x(t_h, t_r, lam), c)
        tl.store(p_logp + i_row, logp)
        tl.store(p_ref_logp + i_row, ref_logp)
        tl.store(p_fpa_logp + i_row, fpa_logp)
        tl.store(p_lse + i_row, lse)
    else:
        tl.store(p_logp + i_row, 0.0)
        tl.store(p_ref_logp + i_row, 0.0)
        tl.store(p_fpa_logp + i_row, 0.0)
        tl.store(p_lse + i_row, 0.0)


# ------------------------------------------------------------------------------------------ host launchers
def _launch_cfg(V: int):
    # interpreter: wider blocks mean fewer (slow, serial) loop iterations; GPU: 4096 lanes fit registers
    cap = 8192 if triton_interpret() else 4096
    block_v = min(triton.next_power_of_2(V), cap)
    return block_v, _num_warps(block_v)


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """(*, V) -> (B, T, V): (N, V) becomes (1, N, V); more leading dims are merged into B (a view when possible)."""
    # (flatten, not reshape(-1, T, V): with T = 0 the -1 would be ambiguous for a tensor of no elements)
    return x.unsqueeze(0) if x.dim() == 2 else x.flatten(0, -3)


def _row_blocks(logits3d: torch.Tensor, ref3d: torch.Tensor):
    """The PyTorch path's cover of the B * T rows of two (B, T, V) tensors with (first row, (rows, V) logits,
    (rows, V) ref) blocks of evenly spaced rows, read in place: one block when both tensors' rows are evenly
    spaced (contiguous, B or T of 1), else one block per batch row (a time slice such as ``logits[:, :-1]``,
    whose flattening would copy both tensors). Only a last dim that is not contiguous is copied."""
    B, T, V = logits3d.shape
    xs = [x if x.stride(-1) == 1 or V == 1 else x.contiguous() for x in (logits3d, ref3d)]
    if all(B == 1 or T == 1 or x.stride(0) == T * x.stride(1) for x in xs):
        return [(0, xs[0].reshape(B * T, V), xs[1].reshape(B * T, V))]
    return [(b * T, xs[0][b], xs[1][b]) for b in range(B)]


@autocast_off
def fpa_logprobs_fwd(logits3d: torch.Tensor, ref3d: torch.Tensor, tokens1d: torch.Tensor,
                     mask1d: Optional[torch.Tensor], lam: float, temperature: float, backend: str):
    """(B, T, V), (B, T, V) (any layouts; a time slice such as ``logits[:, :-1]`` is read in place), (N,),
    (N,) bool or None, N = B * T -> logp, ref_logp, fpa_logp, lse (each (N,); fp32, lse float64)."""
    B, T, V = logits3d.shape
    N = B * T
    if backend == "torch":
        # four separate buffers (not views of one) so autograd never sees outputs that alias each other
        out = [torch.zeros(N, dtype=dt, device=logits3d.device) for dt in _OUT_DTYPES]
        for r0, l2, r2 in _row_blocks(logits3d, ref3d):
            r1 = r0 + l2.shape[0]
            m = None if mask1d is None else mask1d[r0:r1]
            for o, x in zip(out, _fpa_fwd_torch(l2, r2, tokens1d[r0:r1], m, lam, temperature)):
                o[r0:r1] = x
        return out[0], out[1], out[2], out[3]
    out = [torch.empty(N, dtype=dt, device=logits3d.device) for dt in _OUT_DTYPES]
    if N == 0:
        return out[0], out[1], out[2], out[3]
    logits3d, ref3d, tokens1d, mask1d = resolved(logits3d, ref3d, tokens1d, mask1d)   # raw memory reads
    (x, rows_b_l, stride_l), (r, rows_b_r, stride_r) = _row_layout(logits3d), _row_layout(ref3d)
    block_v, warps = _launch_cfg(V)
    _fpa_logprobs_fwd_kernel[(N,)](
        x, r, tokens1d, mask1d if mask1d is not None else tokens1d, out[0], out[1], out[2], out[3],
        T, rows_b_l, stride_l, rows_b_r, stride_r, V, float(lam), 1.0 / float(temperature),
        HAS_MASK=mask1d is not None, BLOCK_V=block_v, VEC=min(_vec(x, block_v), _vec(r, block_v)), num_warps=warps)
    return out[0], out[1], out[2], out[3]


def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(V, 1))


def fpa_logits(h: torch.Tensor, r: torch.Tensor, lam: float, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Raw logits of pi_hat, (1 + lam) h - lam r, for fp32 (rows, V) policy and reference logits (the PyTorch
    paths' one definition; ``_fpa_x`` is the Triton one). lam = 0 gives ``h`` exactly; a -inf policy logit stays
    -inf (probability 0); a -inf reference logit under a finite policy one (pi_ref^(-lam) = inf: pi_hat undefined)
    makes the whole row NaN, as in the Triton kernels. ``out`` (may be ``h``): write the result there."""
    if lam == 0:
        return h if out is None else out.copy_(h)
    ban = h == float("-inf")
    x = torch.mul(h, 1.0 + lam, out=out).sub_(r, alpha=lam).masked_fill_(ban, float("-inf"))
    undefined = (x == float("inf")).any(-1, keepdim=True)
    return x.masked_fill_(undefined, float("nan"))


def _fpa_fwd_torch(logits2d, ref2d, tokens1d, mask1d, lam, temperature):
    # same math as the kernel, chunked over rows so fp32 temporaries stay bounded
    N, V = logits2d.shape
    out = [torch.zeros(N, dtype=dt, device=logits2d.device) for dt in _OUT_DTYPES]
    idx = tokens1d.long().clamp(0, max(V - 1, 0)).unsqueeze(-1)
    step = _chunk_rows(V)
    for r0 in range(0, N, step):
        sl = slice(r0, r0 + step)
        # all three as token_logprobs' PyTorch path computes log-probs (its backward recomputes logp from lse1):
        # shifted by the row max before the scaling by 1 / T, so large probabilities keep fp32 precision at any T;
        # pi_hat's logits are formed from the raw logits, as the kernel does (lam = 0 gives logp exactly)
        h, r = logits2d[sl].float(), ref2d[sl].float()
        x = fpa_logits(h, r, lam)
        i = idx[sl]
        for k, z in enumerate((h, r, x)):
            lp, lse = _log_probs_chunk(z.unsqueeze(0), slice(None), slice(None), temperature)
            out[k][sl] = lp[0].gather(-1, i).squeeze(-1)
            if k == 0:
                out[3][sl] = lse[0]
    if mask1d is not None:
        for o in out:
            o.masked_fill_(~mask1d, 0.0)
    return tuple(out)
