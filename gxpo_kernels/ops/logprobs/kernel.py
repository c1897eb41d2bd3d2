"""Per-token log-probs and entropies from logits in one streaming pass over the vocabulary.

For every position (b, t) with z = logits[b, t] / T (temperature T) and target y = tokens[b, t]:

    lse = logsumexp(z),   logp = z_y - lse,   H = lse - sum_v p_v z_v   (p = softmax(z))

Backward (recomputes p from the saved ``lse``; nothing of size V is kept between the passes):

    dlogits_v = ( dlogp * (1[v = y] - p_v) - dH * p_v * (log p_v + H) ) / T

Shapes: logits (B, T, V) fp32/bf16/fp16 (last dim contiguous; other strides free, e.g. ``logits[:, :-1]``),
tokens (B, T) int64/int32, mask (B, T) bool or None. Outputs logp, entropy are fp32 (B, T), the saved lse is
float64 (B, T); dlogits has the logits dtype. All arithmetic is fp32 (inputs are upcast right after loading),
except the few per-row float64 operations that carry the log-sum-exp from the forward to the backward.

Low temperatures: lse ~ max(x) / T is large (3e4 at T = 1e-3), so lse rounded to fp32 would be off by ~1e-3
in absolute terms, an error every recomputed p_v would inherit relatively. The Triton kernels therefore work
with exponents x * c - M (c = log2(e) / T, M the row max of x * c, both fp32), each computed by one fma (one
rounding: exact near the max, where p is large), and save lse in float64; the backward splits it into the
nearest fp32 and a small remainder, and so recomputes the forward's own softmax.

Two backends share one API: Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``) and a chunked
PyTorch path (CPU). Reference: ``reference.token_logprobs_ref``. The ``torch.library`` registrations
(compile support, autograd) live in ``_library.py``, the public function in ``op.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._utils import autocast_off, resolved, triton_interpret

# Row counts, the batch row stride and the temperature change from call to call: never specialise on them, so a
# new sequence length or temperature reuses the compiled kernel. stride_t (normally V) stays specialised so the
# compiler can prove 16-byte alignment of every row and vectorise the loads.
_DNS = ["N", "T", "rows_b", "inv_temp"]


_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _f64(value: tl.constexpr):
    """A float64 constant at full precision (Triton 3.6 rounds a Python float to fp32 first, even next to a
    float64 operand)."""
    return tl.full([], value, tl.float64)


@triton.jit
def _exponent(x, c, m):
    """x * c - m with one rounding: exact where x * c is close to m (near the row max, where p is large). On a
    GPU the compiler would contract x * c - m into this fma anyway; the interpreter (Triton 3.9's) needs it
    spelled out, and the forward's sums and the backward's recomputation must round the same way."""
    return tl.fma(x, c, -m)


@triton.jit
def _row_out_of_range(M):
    """True when a row's base-2 shift M = fl(max(x) c) is 2^31 or more in magnitude (|max logit| / T >= 2^31 ln 2,
    about 1.49e9). The exponent x c - M of a logit next to the max is then M's own rounding error, which can reach
    2^8 (half the fp32 spacing there and beyond): 2^(x c - M) overflows, or underflows to an inexact subnormal
    that gives finite but wrong log-probs. Such a row is reported as NaN (log-prob, entropy, lse, so d(logits))."""
    return tl.abs(M) >= 2147483648.0


@triton.jit
def _logp_lse(x_y, c, M, s):
    """From a row's base-2 shift M and sum s = sum 2^(x c - M): the log-prob of the raw target logit x_y (fp32)
    and the natural-log lse (float64: M + log2 s exactly enough for the backward to split it back); both NaN for
    a row out of range (``_row_out_of_range``)."""
    log2_s = tl.log2(s)
    logp = (_exponent(x_y, c, M) - log2_s) * _LN2
    lse = (M.to(tl.float64) + log2_s.to(tl.float64)) * _f64(_LN2)
    bad = _row_out_of_range(M)
    return tl.where(bad, float("nan"), logp), tl.where(bad, float("nan"), lse)


@triton.jit
def _lse_group_step(x, m_g, s_g, a_g, c, COMPUTE_ENTROPY: tl.constexpr):
    """Online log-sum-exp (base 2) over one (groups, VEC) tile of raw logits x; every group is VEC contiguous
    elements held by one thread, so the group max and sums need no cross-thread traffic. Per group: m_g the
    running max of z2 = x * c (c = log2(e) / T), s_g = sum 2^(z2 - m_g), a_g = sum 2^(z2 - m_g) (z2 - m_g)."""
    m_new = tl.maximum(m_g, tl.max(x, axis=1) * c)          # c > 0: max commutes with the scaling
    # 2^(z2 - m_new) per element: one MUFU; the finite clamp keeps 0 * -inf out of the entropy sum. A plain max
    # drops a NaN operand (maxNum, on the GPU too; m_new above does), the clamp propagates it (max.NaN, same
    # cost): a NaN logit makes its row's sums NaN, as in the PyTorch path, instead of leaving the log-sum-exp
    d = tl.maximum(_exponent(x, c, m_new[:, None]), -1.0e30, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    shift = m_g - m_new
    alpha = tl.exp2(shift)
    if COMPUTE_ENTROPY:
        # rescale a to the new max: sum e'(z - m') = alpha * (a + (m - m') * s)
        a_g = alpha * (a_g + shift * s_g) + tl.sum(e * d, axis=1)
    s_g = alpha * s_g + tl.sum(e, axis=1)
    return m_new, s_g, a_g


@triton.jit(do_not_specialize=_DNS)
def _token_logprobs_fwd_kernel(
    p_logits,      # (B, T, V) any float dtype; row (b, t) starts at (b * rows_b + t) * stride_t
    p_tokens,      # (N,) int
    p_mask,        # (N,) int8 or dummy
    p_logp,        # (N,) fp32 out
    p_entropy,     # (N,) fp32 out (untouched when COMPUTE_ENTROPY is False)
    p_lse,         # (N,) float64 out
    N, T, rows_b, stride_t, V, inv_temp,
    HAS_MASK: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(p_mask + i_row) == 0:
            # masked rows cost one load: zeros keep downstream sums finite
            tl.store(p_logp + i_row, 0.0)
            tl.store(p_lse + i_row, 0.0)
            if COMPUTE_ENTROPY:
                tl.store(p_entropy + i_row, 0.0)
            return
    i_b = i_row // T
    i_t = i_row - i_b * T
    p_row = p_logits + (i_b * rows_b + i_t) * stride_t

    # The row is walked as (BLOCK_V / VEC, VEC) tiles, VEC = 16 bytes of logits per group. Each group keeps its
    # own running statistics across the whole row (base-2 online log-sum-exp); groups are combined once, after
    # the loop. A finite start (not -inf) keeps (m_old - m_new) * s at 0 before the first tile instead of NaN.
    G: tl.constexpr = BLOCK_V // VEC
    o_g = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    c = inv_temp * _LOG2E
    m_g = tl.full([G], -1.0e30, tl.float32)
    s_g = tl.zeros([G], tl.float32)
    a_g = tl.zeros([G], tl.float32)
    v_full = V - V % BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):                     # full tiles: no bounds mask
        x = tl.load(p_row + v0 + o_g).to(tl.float32)
        m_g, s_g, a_g = _lse_group_step(x, m_g, s_g, a_g, c, COMPUTE_ENTROPY)
    if v_full < V:                                           # ragged tail; padding reads as -inf (adds 0)
        x = tl.load(p_row + v_full + o_g, mask=v_full + o_g < V, other=float("-inf")).to(tl.float32)
        m_g, s_g, a_g = _lse_group_step(x, m_g, s_g, a_g, c, COMPUTE_ENTROPY)
    # the one cross-thread combine of the row: rebase every group to the row max M
    M = tl.max(m_g, axis=0)
    f = tl.exp2(m_g - M)
    s = tl.sum(f * s_g, axis=0)

    y = tl.load(p_tokens + i_row).to(tl.int64)
    logp, lse = _logp_lse(tl.load(p_row + y).to(tl.float32), c, M, s)
    tl.store(p_logp + i_row, logp)
    tl.store(p_lse + i_row, lse)
    if COMPUTE_ENTROPY:
        # H = lse - E[z] = (log2 s - E[z2 - M]) * ln 2, with sum e (z2 - M) = sum f (a_g + (m_g - M) s_g)
        a = tl.sum(f * (a_g + (m_g - M) * s_g), axis=0)
        tl.store(p_entropy + i_row, tl.where(_row_out_of_range(M), float("nan"), (tl.log2(s) - a / s) * _LN2))


@triton.jit(do_not_specialize=_DNS + ["rows_b_out"])
def _token_logprobs_bwd_kernel(
    p_logits,      # (B, T, V) input logits (same layout rule as the forward)
    p_dlogits,     # (B, T, V) out, logits dtype; may alias p_logits (in-place backward)
    p_tokens, p_mask, p_lse, p_entropy, p_dlogp, p_dentropy,
    N, T, rows_b, stride_t, rows_b_out, stride_t_out, V, inv_temp,
    HAS_MASK: tl.constexpr, HAS_DENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_b = i_row // T
    i_t = i_row - i_b * T
    p_row = p_logits + (i_b * rows_b + i_t) * stride_t
    p_out = p_dlogits + (i_b * rows_b_out + i_t) * stride_t_out
    skip = False
    if HAS_MASK:
        skip = tl.load(p_mask + i_row) == 0
    if skip:
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            tl.store(p_out + o_v, tl.zeros([BLOCK_V], dtype=tl.float32).to(p_dlogits.dtype.element_ty),
                     mask=o_v < V)
        return

    # dz_v = (1[v = y] dlogp - p_v (dlogp + dH (log p_v + H))) / T, in base 2: with l2 = log2 p_v = x_v c - lse2
    # (c = log2(e) / T, lse2 = lse log2(e)) and log p_v = l2 ln 2, the non-target part is p_v * (k0 + k1 * l2).
    # lse2 = hi + lo: hi the fp32 nearest (the forward's shift M plus log2 of its sum), lo the small rest. With
    # t = fma(x_v, c, -hi) (one rounding, as in the forward), p_v = 2^t 2^-lo and l2 = t - lo, so the
    # non-target part is 2^t (k0' + k1' t), k0' = 2^-lo (k0 - k1 lo), k1' = 2^-lo k1: one MUFU and three FMAs
    # per element. The target's 1[v = y] dlogp / T is added afterwards by one scalar store.
    lse2 = tl.load(p_lse + i_row) * _f64(_LOG2E)
    hi = lse2.to(tl.float32)
    lo = (lse2 - hi.to(tl.float64)).to(tl.float32)
    dlogp = tl.load(p_dlogp + i_row)
    y = tl.load(p_tokens + i_row).to(tl.int64)
    c = inv_temp * _LOG2E
    r = tl.exp2(-lo)
    k0 = -dlogp * inv_temp
    k1 = 0.0
    if HAS_DENTROPY:
        dh = tl.load(p_dentropy + i_row)
        k0 -= dh * tl.load(p_entropy + i_row) * inv_temp
        k1 = -dh * _LN2 * inv_temp
        k0 -= k1 * lo
        k1 *= r
    k0 *= r
    x_y = tl.load(p_row + y).to(tl.float32)     # read before the loop: the in-place backward overwrites it
    # every warp holds its x_y before any warp stores (in place, another warp's tile may hold the target)
    tl.debug_barrier()
    o_v = tl.arange(0, BLOCK_V)
    v_full = V - V % BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):         # full tiles: no bounds mask
        x = tl.load(p_row + v0 + o_v).to(tl.float32)
        tl.store(p_out + v0 + o_v, _dlogits_block(x, c, hi, k0, k1, HAS_DENTROPY).to(p_dlogits.dtype.element_ty))
    if v_full < V:
        m_v = v_full + o_v < V
        x = tl.load(p_row + v_full + o_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(p_out + v_full + o_v, _dlogits_block(x, c, hi, k0, k1, HAS_DENTROPY).to(p_dlogits.dtype.element_ty),
                 mask=m_v)
    # the target element: every thread's stores above are ordered before this one by the barrier
    tl.debug_barrier()
    g_y = _dlogits_block(x_y, c, hi, k0, k1, HAS_DENTROPY) + dlogp * inv_temp
    tl.store(p_out + y, g_y.to(p_dlogits.dtype.element_ty))


@triton.jit
def _dlogits_block(x, c, hi, k0, k1, HAS_DENTROPY: tl.constexpr):
    """Non-target part of dz / T for raw logits x (any shape): 2^t * (k0 + k1 * t), t = x * c - hi."""
    t = _exponent(x, c, hi)
    e = tl.exp2(t)
    if HAS_DENTROPY:
        # a -inf logit has p = 0 and log p = -inf: the finite clamp makes its gradient 0, not 0 * inf = NaN
        return e * (k0 + k1 * tl.maximum(t, -1.0e30))
    return e * k0


# --------------------------------------------------------------------------------------------- launch helpers
def _launch_config(V: int, block_v: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) from the vocabulary size; one config only (no autotune under the interpreter)."""
    if block_v is None:
        # interpreter: big blocks mean fewer numpy steps; 2048 still exercises the multi-block online path.
        cap = 2048 if triton_interpret() else 4096
        block_v = min(triton.next_power_of_2(V), cap)
    return block_v, _num_warps(block_v)


def _num_warps(block_v: int) -> int:
    """Warps for a streaming tile: at least 8 elements (one 16-byte bf16 group) per thread, so the per-group
    statistics never straddle threads (sm_90 sweep, bench/SM90.md: 9.4 SASS instructions per element from 8
    elements per thread on, 12-20 below), and at most 8 warps."""
    return max(1, min(8, block_v // 256))


def _vec(x: torch.Tensor, block_v: int) -> int:
    """Elements per 16-byte group: the unit a thread owns (one vector load) in the streaming kernels."""
    return min(16 // x.element_size(), block_v)


def _row_layout(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(tensor, rows_b, stride_t) such that row (b, t) starts at (b * rows_b + t) * stride_t.

    Any layout with a contiguous last dim and stride(0) a multiple of stride(1) is used as is (contiguous,
    or a time slice such as ``logits[:, :-1]``); anything else is copied once.
    """
    B, T, V = x.shape
    if x.stride(-1) != 1 and V > 1:
        x = x.contiguous()
    s0, s1 = x.stride(0), x.stride(1)
    if s1 > 0 and s0 % s1 == 0:
        return x, s0 // s1, s1
    if T == 1:
        return x, 1, s0
    if B == 1:
        return x, 0, s1
    x = x.contiguous()
    return x, T, V


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    if mask is None:
        return like, False  # dummy pointer, never read
    return mask.reshape(-1).to(torch.int8).contiguous(), True


# --------------------------------------------------------------------------------------------- torch path
_TORCH_CHUNK_ELEMS = 1 << 20  # ~4 MiB fp32 per temporary: stays in cache and is reused by malloc (no page faults)


def _chunks(B: int, T: int, V: int):
    """Yield (b-slice, t-slice) blocks of at most ~_TORCH_CHUNK_ELEMS / V rows (at least one) of a (B, T) grid."""
    rows = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
    tt = max(1, min(T, rows))
    bb = max(1, rows // max(tt, 1))
    for b0 in range(0, B, bb):
        for t0 in range(0, T, tt):
            yield slice(b0, min(b0 + bb, B)), slice(t0, min(t0 + tt, T))


def _log_probs_chunk(logits, sb, st, temperature, lse=None):
    """fp32 log-probs z - lse of one chunk (a fresh buffer, safe to modify) and the chunk's float64 lse.

    z - logsumexp(z) rather than torch.log_softmax/softmax: on CPU their vectorised kernels lose ~4e-6
    relative precision in the entropy at V = 32k, this form stays at fp32 rounding. The logits are shifted by
    their row max m before the division by T, as the Triton kernels' fma exponents are: x - m is exact next to
    the max, so the large probabilities keep fp32 precision at any temperature (x / T - lse would round both
    terms to ~6e-8 |x| / T: 2e-2 relative in p at T = 1e-4 for near-tied top logits). The saved "lse" of this
    path is that small logsumexp of (x - m) / T alone (float64, the Triton path's dtype), which the backward
    (``lse`` given) reads back exactly: m / T + it in float64 lost it once |m| / T neared 1e16 (four equal logits
    of 1e20 got p = 1 each in the backward, a wrong gradient).
    """
    x = logits[sb, st].float()
    m = x.amax(-1, keepdim=True)
    # an all -inf row: no shift (its log-probs are NaN); a +inf logit: x - m is NaN there, so the row's log-probs
    # are NaN, as in the Triton kernels (torch.logsumexp alone would give -inf to the finite logits)
    m = m.masked_fill(m == float("-inf"), 0.0)
    z = torch.sub(x, m)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    if lse is None:
        c_lse = torch.logsumexp(z, dim=-1)
    else:
        c_lse = lse[sb, st].float()
    return z.sub_(c_lse.unsqueeze(-1)), c_lse.double()


def _fwd_torch(logits, tokens, mask, temperature, compute_entropy):
    B, T, V = logits.shape
    logp = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    ent = torch.zeros_like(logp)
    lse = torch.zeros_like(logp, dtype=torch.float64)   # logsumexp((x - row max) / T): see _log_probs_chunk
    for sb, st in _chunks(B, T, V):
        lp, c_lse = _log_probs_chunk(logits, sb, st, temperature)
        y = tokens[sb, st].long().clamp(0, V - 1).unsqueeze(-1)  # masked positions may hold any id
        logp[sb, st] = lp.gather(-1, y).squeeze(-1)
        lse[sb, st] = c_lse
        if compute_entropy:
            # -sum p log p; clamping log p = -inf (a -inf logit) to the lowest finite float makes those
            # lanes 0 * finite = 0 instead of NaN (torch.special.xlogy would too, but is ~4x slower on CPU)
            lp.clamp_(min=torch.finfo(torch.float32).min)
            ent[sb, st] = -torch.linalg.vecdot(torch.exp(lp), lp)
    if mask is not None:
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        logp, ent, lse = (torch.where(mask, t, zero) for t in (logp, ent, lse))
    return logp, ent, lse


def _bwd_torch(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, out):
    # dz = onehot*dlogp - p*(dlogp + dH*(log p + H)): one exp, one fused multiply-add, one multiply per chunk
    B, T, V = logits.shape
    for sb, st in _chunks(B, T, V):
        lp, _ = _log_probs_chunk(logits, sb, st, temperature, lse)
        p = torch.exp(lp)
        g_lp = dlogp[sb, st]
        if dentropy is not None:
            dh = dentropy[sb, st]
            # log p = -inf where p = 0 (a -inf logit): any finite coefficient gives p * coef = 0
            coef = lp.nan_to_num_(neginf=0.0).mul_(-dh.unsqueeze(-1)).sub_((g_lp + dh * entropy[sb, st]).unsqueeze(-1))
            g = p.mul_(coef)
        else:
            g = p.mul_(-g_lp.unsqueeze(-1))
        y = tokens[sb, st].long().clamp(0, V - 1).unsqueeze(-1)
        g.scatter_add_(-1, y, g_lp.unsqueeze(-1))
        if temperature != 1.0:
            g.mul_(1.0 / temperature)
        if mask is not None:
            g.masked_fill_(~mask[sb, st, None], 0.0)  # masked rows: zero gradient even if their logits are garbage
        out[sb, st] = g
    return out


# --------------------------------------------------------------------------------------------- host launchers
@autocast_off
def token_logprobs_fwd(
    logits: torch.Tensor,            # (B, T, V) float, last dim contiguous
    tokens: torch.Tensor,            # (B, T) int
    mask: Optional[torch.Tensor],    # (B, T) bool or None
    temperature: float = 1.0,
    compute_entropy: bool = True,
    backend: str = "triton",         # "triton" or "torch" (already resolved)
    block_v: Optional[int] = None,   # test hook: force the vocabulary block
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (logp, entropy, lse), (B, T) each, fp32 but lse float64; zeros at masked rows (and entropy when not
    computed)."""
    if backend == "torch":
        return _fwd_torch(logits, tokens, mask, temperature, compute_entropy)
    B, T, V = logits.shape
    N = B * T
    logits, tokens, mask = resolved(logits, tokens, mask)   # the kernel reads raw memory: no pending negation
    logp = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp, dtype=torch.float64)
    ent = torch.empty_like(logp) if compute_entropy else torch.zeros_like(logp)
    if N == 0:
        return logp, ent, lse
    x, rows_b, stride_t = _row_layout(logits)
    tok = tokens.reshape(-1).contiguous()
    m, has_mask = _mask_arg(mask, tok)
    BLOCK_V, num_warps = _launch_config(V, block_v)
    _token_logprobs_fwd_kernel[(N,)](
        x, tok, m, logp, ent, lse, N, T, rows_b, stride_t, V, 1.0 / float(temperature),
        HAS_MASK=has_mask, COMPUTE_ENTROPY=compute_entropy, BLOCK_V=BLOCK_V, VEC=_vec(x, BLOCK_V),
        num_warps=num_warps)
    return logp, ent, lse


@autocast_off
def token_logprobs_bwd(
    logits: torch.Tensor,                # (B, T, V)
    tokens: torch.Tensor,                # (B, T)
    mask: Optional[torch.Tensor],        # (B, T) bool or None
    lse: torch.Tensor,                   # (B, T) float64 from the forward
    entropy: torch.Tensor,               # (B, T) fp32 from the forward (read only when dentropy is given)
    dlogp: torch.Tensor,                 # (B, T) fp32
    dentropy: Optional[torch.Tensor],    # (B, T) fp32 or None (entropy term skipped)
    temperature: float = 1.0,
    inplace: bool = False,               # write dlogits into ``logits`` (modified in place)
    backend: str = "triton",
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Return dlogits (B, T, V) in the logits dtype; it is ``logits`` itself when ``inplace``."""
    B, T, V = logits.shape
    out = logits if inplace else torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    dlogp = dlogp.float().contiguous()
    dentropy = None if dentropy is None else dentropy.float().contiguous()
    if backend == "torch":
        return _bwd_torch(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, out)
    N = B * T
    if N == 0:
        return out
    # raw memory reads; a negated in-place ``logits`` is read from a copy and written there (the caller copies
    # the result back with torch, which honours the bit)
    x, tokens, mask, lse, entropy, dlogp, dentropy = resolved(logits, tokens, mask, lse, entropy, dlogp, dentropy)
    x, rows_b, stride_t = _row_layout(x)
    if inplace and x.data_ptr() != logits.data_ptr():
        out = x  # odd layout was copied: write into the copy (still no extra V-sized buffer)
    o, rows_b_o, stride_t_o = _row_layout(out)
    tok = tokens.reshape(-1).contiguous()
    m, has_mask = _mask_arg(mask, tok)
    BLOCK_V, num_warps = _launch_config(V, block_v)
    _token_logprobs_bwd_kernel[(N,)](
        x, o, tok, m, lse.contiguous(), entropy.contiguous(), dlogp,
        dlogp if dentropy is None else dentropy,
        N, T, rows_b, stride_t, rows_b_o, stride_t_o, V, 1.0 / float(temperature),
        HAS_MASK=has_mask, HAS_DENTROPY=dentropy is not None, BLOCK_V=BLOCK_V, num_warps=num_warps)
    return o
