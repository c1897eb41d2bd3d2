"""The fused linear head engine (private): per-token log-prob and entropy straight from hidden states,
z = (hidden @ weight.T + bias) / T, never materialising the (tokens x vocab) logits. Shared by the public ops
``linear_token_logprobs`` (``logprobs/linear.py``), ``linear_grpo_loss`` and ``linear_fpa_logprobs``.

    logp[n] = z[n, y_n] - lse(z[n]),   entropy[n] = lse(z[n]) - sum_v p[n, v] z[n, v],   p = softmax(z[n])

Shapes: hidden (N, H) or (B, T, H), weight (V, H), bias (V,) or None, tokens (N,) or (B, T) -> fp32 logp and
entropy of the token shape. Backward, from (dlogp, dH) per token:
    dz[n, v] = dlogp*(1[v=y] - p_v) - dH*p_v*(log p_v + H)      d(logits) = dz / T
    grad_hidden = d(logits) @ weight,  grad_weight = d(logits).T @ hidden,  grad_bias = d(logits).sum(0)

Two backends with the same memory behaviour (extra memory O(N) statistics, the O(N*H) / O(V*H) fp32
gradient accumulators and one bounded chunk of logits, independent of N*V):
  * Triton: the forward tiles (tokens x vocab) with ``tl.dot`` (operands in the input dtype, fp32
    accumulation; fp32 operands with ``fp32_head``), keeps an online log-sum-exp, the target logit and the
    entropy sum per token, optionally over vocab splits merged by a tiny torch epilogue. The backward walks
    chunks of token rows: a kernel recomputes the chunk's logits tiles and writes d(logits) in the operand
    dtype, and grad_hidden / grad_weight are two library GEMMs on it (no atomics: deterministic as is; the
    extra memory is one d(logits) chunk of ~2^28 entries, or ``chunk_size`` rows).
  * torch: chunks over tokens; per chunk fp32 logits, statistics, and in backward the recomputed chunk's
    d(logits), built in the logits' buffer, feeding two GEMMs into fp32 accumulators (one (rows, V) fp32 chunk
    live, plus 1/8 of one for element-wise temporaries). It is the reference the kernels are tested against.
Reference on materialised logits: ``logprobs/reference.py``'s ``token_logprobs_ref``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._utils import (autocast_off, check_same_device, check_shape, check_tensor, masked_row_index,
                       resolve_backend, resolved, triton_interpret)

HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# finite "minus infinity": keeps (m_old - m_new) * sum free of inf * 0 = NaN (constexpr: jit code may only
# read constexpr globals)
_NEG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, o_m, m_m, o_v, m_v, H, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_V) tile of (h @ w.T + b) / T; invalid rows/cols hold finite junk."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    r_h = o_m.to(tl.int64) * stride_h
    r_w = o_v.to(tl.int64) * stride_w
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_h = tl.load(h_ptr + r_h[:, None] + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(w_ptr + r_w[:, None] + o_k[None, :], mask=m_v[:, None] & m_k[None, :], other=0.0)
        if UPCAST:  # fp32_head, mixed dtypes, or the interpreter (whose bf16 dot is wrong)
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_h, tl.trans(b_w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _dlogits_tile(z, o_v, m_v, b_y, b_lse, b_ent, b_dlogp, b_dent, inv_t, HAS_DENT: tl.constexpr):
    """d(loss)/d(logits) tile from per-token (dlogp, dH); zero at invalid columns (rows: dlogp = dH = 0)."""
    logp_v = z - b_lse[:, None]
    p = tl.exp(logp_v)
    coef = b_dlogp[:, None] + tl.zeros_like(z)
    if HAS_DENT:
        coef += b_dent[:, None] * tl.where(p > 0, logp_v + b_ent[:, None], 0.0)  # p = 0: no 0 * inf
    dz = tl.where(o_v[None, :] == b_y[:, None], b_dlogp[:, None], 0.0) - p * coef
    return tl.where(m_v[None, :], dz * inv_t, 0.0)


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, max_ptr, sum_ptr, ent_ptr, tgt_ptr,
                N, V, H, stride_h, stride_w, inv_t, tiles_per_split,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (token tiles, vocab splits); per (token, split): running max m, s = sum e^(z-m),
    # a = sum e^(z-m) (z-m) (entropy numerator relative to m, no cancellation), target logit.
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1)
    b_max = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    b_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_vt = tl.cdiv(V, BLOCK_V)
    v_lo = i_s * tiles_per_split
    v_hi = tl.minimum(v_lo + tiles_per_split, n_vt)
    for i_v in range(v_lo, v_hi):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, o_m, m_m, o_v, m_v, H, stride_h, stride_w, inv_t,
                         HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(m_v[None, :], z, _NEG)
        b_tgt += tl.sum(tl.where(o_v[None, :] == b_y[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(b_max, tl.max(z, axis=1))
        shift = b_max - new_max
        scale = tl.exp(shift)
        d = z - new_max[:, None]
        e = tl.where(m_v[None, :], tl.exp(d), 0.0)
        # where(e > 0): a -inf logit (padded lane or -inf bias) is probability 0, not 0 * -inf
        b_a = scale * (b_a + shift * b_sum) + tl.sum(e * tl.where(e > 0, d, 0.0), axis=1)
        b_sum = scale * b_sum + tl.sum(e, axis=1)
        b_max = new_max
    off = i_s * N + o_m
    tl.store(max_ptr + off, b_max, mask=m_m)
    tl.store(sum_ptr + off, b_sum, mask=m_m)
    tl.store(ent_ptr + off, b_a, mask=m_m)
    tl.store(tgt_ptr + off, b_tgt, mask=m_m)


@triton.jit
def _load_row_stats(y_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, o_m, m_m, HAS_DENT: tl.constexpr):
    b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1)
    b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)
    b_dlogp = tl.load(dlogp_ptr + o_m, mask=m_m, other=0.0)
    b_ent = tl.zeros_like(b_lse)
    b_dent = tl.zeros_like(b_lse)
    if HAS_DENT:
        b_ent = tl.load(ent_ptr + o_m, mask=m_m, other=0.0)
        b_dent = tl.load(dent_ptr + o_m, mask=m_m, other=0.0)
    return b_y, b_lse, b_ent, b_dlogp, b_dent


@triton.jit(do_not_specialize=["N"])
def _bwd_dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, dz_ptr,
                        N, V, H, stride_h, stride_w, inv_t,
                        HAS_BIAS: tl.constexpr, HAS_DENT: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # grid (token tiles, vocab tiles) of one chunk of rows: recompute the logits tile, write d(logits) (N, V)
    # in the GEMM operand dtype; the two gradient GEMMs that consume it run on the tensor-core library
    i_m = tl.program_id(0)
    i_v = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_y, b_lse, b_ent, b_dlogp, b_dent = _load_row_stats(y_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr,
                                                         o_m, m_m, HAS_DENT)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, o_m, m_m, o_v, m_v, H, stride_h, stride_w, inv_t,
                     HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    dz = _dlogits_tile(z, o_v, m_v, b_y, b_lse, b_ent, b_dlogp, b_dent, inv_t, HAS_DENT)
    p_dz = dz_ptr + o_m.to(tl.int64)[:, None] * V + o_v[None, :]
    tl.store(p_dz, dz.to(dz_ptr.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])


# ------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class _HeadConfig:
    """Static choices of one call (not autograd inputs)."""
    backend: str              # "triton" | "torch"
    fp32_head: bool           # fp32 GEMM operands even for bf16/fp16 inputs
    deterministic: bool       # bitwise reproducible gradients (both backends already are; kept for the API)
    chunk_size: Optional[int]  # tokens per chunk: torch backend (None: ~8M logits), Triton backward (None: ~2^28)
    num_splits: Optional[int] = None  # Triton forward: vocab splits (None: enough programs to fill the GPU)


# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps). GPU sizes chosen with the sm_90 compile check (python -m bench.sm90):
# the largest wgmma tiles with no register spill on Triton 3.6 and 3.9 (bf16: 128x128 -> wgmma n128, ~190
# registers); small tiles under the interpreter (serial programs).
_INTERP_BLOCKS = (16, 32, 16, 4)
_GPU_BLOCKS = {False: (128, 128, 64, 8), True: (128, 64, 32, 8)}   # key: fp32 operands (tf32x3: wgmma n64)


def _kernel_flags(h: torch.Tensor, w: torch.Tensor, cfg: _HeadConfig):
    """(UPCAST, PRECISION, blocks) for one launch."""
    fp32_ops = cfg.fp32_head or h.dtype != w.dtype or h.dtype == torch.float32
    if triton_interpret():
        return True, "ieee", _INTERP_BLOCKS
    # fp32 operands: 3xTF32 keeps fp32-level accuracy on tensor cores (plain IEEE fp32 dots spill badly);
    # bf16/fp16 operands ignore the precision flag
    prec = "tf32" if not fp32_ops else ("tf32x3" if torch.cuda.get_device_capability(h.device)[0] >= 8 else "ieee")
    return fp32_ops, prec, _GPU_BLOCKS[fp32_ops]


def vocab_splits(cfg: _HeadConfig, device, n_mt: int, n_vt: int):
    """(splits, vocab tiles per split) of a forward grid: enough programs to fill the GPU when few token tiles."""
    if cfg.num_splits is not None:
        splits = max(1, min(cfg.num_splits, n_vt))
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(n_vt, triton.cdiv(4 * sms, n_mt)))
    else:
        splits = 1
    tps = triton.cdiv(n_vt, splits)
    return triton.cdiv(n_vt, tps), tps


def _fwd_triton(h, w, b, y, inv_t, cfg):
    h, w, b, y = resolved(h, w, b, y)   # raw memory reads: no pending negation (see ``resolved``)
    N, H = h.shape
    V = w.shape[0]
    upcast, prec, (BM, BV, BK, nw) = _kernel_flags(h, w, cfg)
    n_mt, n_vt = triton.cdiv(N, BM), triton.cdiv(V, BV)
    splits, tps = vocab_splits(cfg, h.device, n_mt, n_vt)
    stats = torch.empty(4, splits, N, dtype=torch.float32, device=h.device)
    _fwd_kernel[(n_mt, splits)](
        h, w, b if b is not None else h, y, stats[0], stats[1], stats[2], stats[3],
        N, V, H, h.stride(0), w.stride(0), inv_t, tps,
        HAS_BIAS=b is not None, UPCAST=upcast, PRECISION=prec,
        BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, num_warps=nw)
    # epilogue over the splits (O(N * splits)): rebase every split's sums to the global max
    m_k, s_k, a_k, t_k = stats.unbind(0)
    M = m_k.max(0).values
    f = torch.exp(m_k - M)
    S = (f * s_k).sum(0)
    A = (f * (a_k + (m_k - M) * s_k)).sum(0)
    log_s = torch.log(S)
    lse = M + log_s
    return lse, log_s - A / S, t_k.sum(0) - lse


def _bwd_triton(h, w, b, y, lse, ent, dlogp, dent, inv_t, cfg, need):
    """Chunks of token rows: a Triton kernel recomputes the chunk's logits and writes d(logits) (rows, V) in the
    operand dtype; then grad_hidden[chunk] = dz @ W and grad_weight += dz.T @ h[chunk] are library GEMMs.

    Gradient traffic per chunk is one write and two reads of dz (2 bytes per logit in bf16) instead of a
    read-modify-write of fp32 grad_hidden per vocabulary tile; the result is deterministic (no atomics), so
    ``deterministic`` needs no separate path. Extra memory: one dz chunk (``_bwd_chunk_rows``), and with
    bf16/fp16 operands each chunk's (V, H) d(weight) partial in that dtype before it joins the fp32 sum."""
    h, w, b, y, lse, ent, dlogp, dent = resolved(h, w, b, y, lse, ent, dlogp, dent)   # raw memory reads
    N, H = h.shape
    V = w.shape[0]
    upcast, prec, (BM, BV, BK, nw) = _kernel_flags(h, w, cfg)
    need_dh, need_dw, need_db = need
    op_dt = torch.float32 if upcast else h.dtype
    hg = h if h.dtype == op_dt else h.float()
    wg = w if w.dtype == op_dt else w.float()          # fp32 operands: one O(V*H) upcast, independent of N
    gh = torch.empty(N, H, dtype=torch.float32, device=h.device) if need_dh else None
    gw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    gb = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db else None
    has_dent = dent is not None
    step = _bwd_chunk_rows(cfg, V, BM)
    dz_buf = torch.empty(min(step, N), V, dtype=op_dt, device=h.device)
    for s in range(0, N, step):
        e = min(s + step, N)
        n = e - s
        dz = dz_buf[:n]
        _bwd_dlogits_kernel[(triton.cdiv(n, BM), triton.cdiv(V, BV))](
            h[s:e], w, b if b is not None else h, y[s:e], lse[s:e], ent[s:e] if has_dent else lse[s:e],
            dlogp[s:e], dent[s:e] if has_dent else lse[s:e], dz, n, V, H, h.stride(0), w.stride(0), inv_t,
            HAS_BIAS=b is not None, HAS_DENT=has_dent, UPCAST=upcast, PRECISION=prec,
            BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, num_warps=nw)
        if op_dt == torch.float32:   # straight into the fp32 results: no (rows, H) / (V, H) GEMM output per chunk
            if need_dh:
                torch.mm(dz, wg, out=gh[s:e])
            if need_dw:
                gw.addmm_(dz.t(), hg[s:e])
        else:                        # bf16/fp16 operands: the GEMM output has their dtype, then joins the fp32 sums
            if need_dh:
                gh[s:e] = dz @ wg                       # every row once: no accumulation across chunks
            if need_dw:
                gw += dz.t() @ hg[s:e]
        if need_db:
            gb += dz.sum(0, dtype=torch.float32)
    return gh, gw, gb


def _bwd_chunk_rows(cfg: _HeadConfig, V: int, block_m: int) -> int:
    """Token rows per backward chunk of the Triton path: ``chunk_size`` if given, else ~2^28 logits per chunk
    (512 MiB of bf16 d(logits), 1 GiB with fp32 operands), a multiple of the token tile."""
    if cfg.chunk_size is not None:
        return cfg.chunk_size
    return max(block_m, (2 ** 28 // max(V, 1)) // block_m * block_m)


def _chunk_rows(cfg: _HeadConfig, V: int) -> int:
    if cfg.chunk_size is not None:
        return cfg.chunk_size
    # ~8M fp32 logits per chunk, a power of two of rows, at least 16 rows (so more than 8M past V = 2^19)
    return max(16, 1 << max(0, (8 * 2 ** 20 // max(V, 1)).bit_length() - 1))


def _chunk_logits(h_c, wf, bf, inv_t):
    """fp32 (rows, V) logits / T of one chunk of rows."""
    z = h_c.float() @ wf.t()
    if bf is not None:
        z += bf
    return z.mul_(inv_t)


def row_logsumexp(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, NaN for a row holding +inf (a +inf logit, or logits / T past the fp32 range):
    its softmax is undefined (inf - inf), as the Triton kernels report it; torch.logsumexp alone gives +inf
    there, which read as log-prob -inf for the row's finite logits."""
    # by row blocks: torch.logsumexp allocates a temporary the size of its input (exp(z - max)), one block here
    lse = torch.cat([torch.logsumexp(blk, dim=-1) for blk in row_blocks(z)]) if z.dim() == 2 else \
        torch.logsumexp(z, dim=-1)
    return lse.masked_fill_(lse == float("inf"), float("nan"))


def row_blocks(z: torch.Tensor, parts: int = 8):
    """``z`` (rows, V) as ~``parts`` views of whole rows: an element-wise temporary built per block is 1/parts of
    a chunk, not a second chunk (every row's values are the same as computed on the whole chunk)."""
    return z.split(max(1, -(-z.shape[0] // parts)))


def _fwd_torch(h, w, b, y, inv_t, cfg):
    N = h.shape[0]
    wf = w.float()                      # one O(V*H) upcast, independent of N
    bf = None if b is None else b.float()
    lse, ent, logp = (torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(3))
    step = _chunk_rows(cfg, w.shape[0])
    for s in range(0, N, step):
        e = min(s + step, N)
        lse[s:e], ent[s:e], logp[s:e] = _fwd_torch_chunk(h[s:e], wf, bf, y[s:e], inv_t)
    return lse, ent, logp


def _fwd_torch_chunk(h_c, wf, bf, y_c, inv_t):
    """(lse, entropy, logp) of one chunk of rows. A function of its own so that the chunk's (rows, V)
    temporaries are freed when it returns, before the next chunk allocates its own (a loop body keeps them
    bound, and so alive, until the next chunk's are built: twice the chunk's memory)."""
    z = _chunk_logits(h_c, wf, bf, inv_t)
    lse = row_logsumexp(z)
    lp = z.sub_(lse[:, None])                          # log-softmax in place
    logp = lp.gather(1, y_c[:, None].long()).squeeze(1)
    lp.clamp_(min=torch.finfo(torch.float32).min)  # a -inf logit: 0 * finite, not 0 * -inf
    # -sum p log p needs p and log p at once: p is built per row block (1/8 of a chunk), not for the whole chunk
    return lse, torch.cat([-(blk.exp().mul_(blk)).sum(-1) for blk in row_blocks(lp)]), logp


def _bwd_torch(h, w, b, y, lse, ent, dlogp, dent, inv_t, cfg, need):
    N, H = h.shape
    V = w.shape[0]
    need_dh, need_dw, need_db = need
    wf = w.float()
    bf = None if b is None else b.float()
    gh = torch.empty(N, H, dtype=torch.float32, device=h.device) if need_dh else None
    gw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    gb = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db else None
    step = _chunk_rows(cfg, V)
    for s in range(0, N, step):
        e = min(s + step, N)
        _bwd_torch_chunk(h[s:e], wf, bf, y[s:e], lse[s:e], ent[s:e], dlogp[s:e], None if dent is None else dent[s:e],
                         inv_t, None if gh is None else gh[s:e], gw, gb)
    return gh, gw, gb


def _bwd_torch_chunk(h_c, wf, bf, y_c, lse_c, ent_c, dlogp_c, dent_c, inv_t, gh_c, gw, gb):
    """One chunk of rows: recompute its logits, form d(logits) and write grad_hidden rows into ``gh_c``,
    accumulate into ``gw`` / ``gb`` (each None when not needed). Its own function for the reason given in
    ``_fwd_torch_chunk``: the chunk's (rows, V) temporaries die on return."""
    h_c = h_c.float()
    lp = _chunk_logits(h_c, wf, bf, inv_t).sub_(lse_c[:, None])   # saved lse: no second reduction
    g = dlogp_c[:, None]
    # dz = dlogp (1[v=y] - p) - dH p (log p + H), built in the logits' own buffer: one (rows, V) chunk
    if dent_c is None:
        dz = lp.exp_().mul_(g).neg_()
    else:            # p and log p are both needed: p per row block (1/8 of a chunk)
        for blk, e_b, d_b, g_b in zip(row_blocks(lp), *(row_blocks(t[:, None]) for t in (ent_c, dent_c, dlogp_c))):
            p = blk.exp()
            # log p = -inf where p = 0 (a -inf logit): any finite coefficient gives p * coef = 0
            blk.nan_to_num_(neginf=0.0).add_(e_b).mul_(d_b).add_(g_b).mul_(p).neg_()
        dz = lp
    dz.scatter_add_(1, y_c[:, None].long(), g.clone())
    dz *= inv_t
    if gh_c is not None:
        torch.mm(dz, wf, out=gh_c)                     # straight into the fp32 rows: no (rows, H) temporary
    if gw is not None:
        gw.addmm_(dz.t(), h_c)
    if gb is not None:
        gb += dz.sum(0)


@torch.no_grad()
@autocast_off
def linear_token_stats_fwd(h, w, b, y, inv_t, cfg: _HeadConfig):
    """Host forward on flat, validated inputs: (lse, entropy, logp), each fp32 (N,)."""
    if h.shape[0] == 0:  # every row masked: nothing to launch
        return tuple(torch.zeros(0, dtype=torch.float32, device=h.device) for _ in range(3))
    fn = _fwd_triton if cfg.backend == "triton" else _fwd_torch
    return fn(h, w, b, y, inv_t, cfg)


@torch.no_grad()
@autocast_off
def linear_token_stats_bwd(h, w, b, y, lse, ent, dlogp, dent, inv_t, cfg: _HeadConfig, need):
    """Host backward: fp32 (grad_hidden (N,H), grad_weight (V,H), grad_bias (V,)); None where not needed."""
    fn = _bwd_triton if cfg.backend == "triton" else _bwd_torch
    if h.shape[0] == 0:
        fn = _bwd_torch  # zero-size grads without a zero-size launch
    dlogp = dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    return fn(h, w, b, y, lse, ent, dlogp, dent, inv_t, cfg, need)


def validate_head(hidden, weight, bias, fp32_head: bool, *, hidden_ndim=(2, 3), prefix: str = "") -> None:
    """Check hidden/weight/bias shapes and dtypes (TypeError/ValueError naming the argument, with ``prefix``)."""
    hn, wn, bn = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_tensor(hidden, hn, ndim=hidden_ndim, floating=True)
    check_tensor(weight, wn, floating=True)
    if weight.dim() != 2:
        hint = (" (a ZeRO-3 partitioned parameter? gather it with deepspeed.zero.GatheredParameters, or use "
                "gxpo_kernels.integrations.hf.causal_lm_grpo_loss)") if weight.numel() == 0 else ""
        raise ValueError(f"{wn} must be 2-D (vocab_size, hidden_size), got shape {tuple(weight.shape)}{hint}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wn} has hidden size {weight.shape[1]} but {hn} has {hidden.shape[-1]} "
                         f"({wn} must be (vocab_size, hidden_size) = lm_head.weight)")
    if weight.shape[0] == 0:
        raise ValueError(f"{wn} has vocab_size 0")
    for name, t in ((hn, hidden), (wn, weight)):
        if t.dtype not in HEAD_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if hidden.dtype != weight.dtype and not fp32_head:
        raise TypeError(f"{hn} ({hidden.dtype}) and {wn} ({weight.dtype}) must share a dtype; pass "
                        "fp32_head=True to run the head in fp32 with mixed inputs")
    if bias is not None:
        check_tensor(bias, bn, ndim=1, floating=True)
        check_shape(bias, bn, (weight.shape[0],))
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bn} dtype {bias.dtype} must match {wn} dtype {weight.dtype}")
    check_same_device(hidden, hn, **{wn: weight, bn: bias})


def check_chunk_size(chunk_size) -> Optional[int]:
    """``chunk_size`` as a Python int (or None); any positive integer type counts (numpy's too: ``np.int64(4)``
    was refused as "not a positive int"), a bool does not (True used to mean 1)."""
    if chunk_size is None:
        return None
    # (numbers.Integral holds numpy's integer types but not numpy's bool)
    if isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool) and chunk_size > 0:
        return int(chunk_size)
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def make_head_config(device, backend, fp32_head, deterministic, chunk_size) -> _HeadConfig:
    """The static choices of one call; its fields, in order, are the trailing arguments of the registered ops."""
    return _HeadConfig(resolve_backend(backend, device), bool(fp32_head), bool(deterministic),
                       check_chunk_size(chunk_size))


class MaskedRows:
    """The unmasked rows of a flat (N,) bool mask, so masked rows cost no GEMM work: ``take`` gathers a (N, ...)
    tensor's kept rows (contiguous), ``put`` scatters per-row results back to (N,) with 0 at masked rows
    (differentiable).

    Gathering needs the row count on the host, a sync on CUDA (``masked_row_index``). Where that is avoided,
    every row is kept: ``take`` zeroes the masked rows (so garbage there never reaches a gradient) and ``put``
    zeroes their results; masked rows then cost GEMM work but no sync."""

    def __init__(self, m1: torch.Tensor):
        self.n, self.m1 = m1.shape[0], m1
        self.idx = masked_row_index(m1)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.idx is not None:
            return x.index_select(0, self.idx).contiguous()
        keep = self.m1.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).contiguous()

    def put(self, x: torch.Tensor) -> torch.Tensor:
        if self.idx is not None:
            return x.new_zeros((self.n,) + x.shape[1:]).index_put((self.idx,), x)
        keep = self.m1.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
