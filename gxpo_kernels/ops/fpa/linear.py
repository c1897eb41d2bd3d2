"""FPA log-probs from hidden states: never materialises the (N, V) policy or reference logits.

With z = (hidden @ weight.T + bias) / T and z_ref = (ref_hidden @ ref_weight.T + ref_bias) / T:

    logp = log_softmax(z)[y],  ref_logp = log_softmax(z_ref)[y],  fpa_logp = log_softmax((1+lam) z - lam z_ref)[y]

It shares the tiling of the fused-linear GRPO head (``linear_token_logprobs``):
  * Triton forward: one program per (token tile, vocab split) forms the policy and the reference logits tiles
    with ``tl.dot`` (the same ``_logits_tile`` helper), keeps three online log-sum-exps and three target
    logits per token, and a tiny torch epilogue merges the vocab splits. Only O(N) fp32 statistics are kept.
  * Backward: gradient flows only through ``logp`` (into hidden, weight, bias), so it *is* the fused-linear
    head's backward with no entropy term: the registered ``gxpo::linear_token_stats_bwd`` (d(logits) chunks
    and library GEMMs).
  * torch: chunks over tokens (fp32 logits of one chunk at a time, both sides); also the path on CPU tensors.
Masked rows are dropped before any GEMM work and come back as 0. The forward is the ``torch.library`` custom
op ``gxpo::linear_fpa_stats_fwd`` (registered below; ``torch.compile`` fullgraph works). Reference:
``reference.py`` on materialised logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._utils import (autocast_off, check_bools, check_no_forward_ad, check_same_device, check_shape, check_tensor,
                       checked_mask, compiled_safe_tokens, nan_at, resolved, triton_interpret)
from ..fused_head._library import cfg_args
from ..fused_head.engine import (_NEG, MaskedRows, _HeadConfig, _chunk_logits, _chunk_rows,
                                 _kernel_flags, _logits_tile, make_head_config, row_logsumexp, validate_head,
                                 vocab_splits)
from .kernel import _fpa_x, fpa_logits
from .logprobs import check_lam_temperature


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _lse_step(b_max, b_sum, z, m_v):
    """Online log-sum-exp over one (BLOCK_M, BLOCK_V) tile; invalid columns hold _NEG and add nothing."""
    new_max = tl.maximum(b_max, tl.max(z, axis=1))
    e = tl.where(m_v[None, :], tl.exp(z - new_max[:, None]), 0.0)
    return new_max, tl.exp(b_max - new_max) * b_sum + tl.sum(e, axis=1)


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _fpa_fwd_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, y_ptr, st_ptr,
                    N, V, H, H_REF, stride_h, stride_w, stride_hr, stride_wr, inv_t, lam, tiles_per_split,
                    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    UPCAST_REF: tl.constexpr, PRECISION: tl.constexpr, PRECISION_REF: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (token tiles, vocab splits). st_ptr is (9, splits, N) fp32: (max, sum, target) for the policy,
    # the reference and the extrapolated logits, relative to this split's vocabulary range.
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    b_y = tl.load(y_ptr + o_m, mask=m_m, other=-1)
    m1 = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    m2 = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    m3 = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_vt = tl.cdiv(V, BLOCK_V)
    v_lo = i_s * tiles_per_split
    v_hi = tl.minimum(v_lo + tiles_per_split, n_vt)
    for i_v in range(v_lo, v_hi):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, o_m, m_m, o_v, m_v, H, stride_h, stride_w, inv_t,
                         HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        zr = _logits_tile(hr_ptr, wr_ptr, br_ptr, o_m, m_m, o_v, m_v, H_REF, stride_hr, stride_wr, inv_t,
                          HAS_REF_BIAS, UPCAST_REF, PRECISION_REF, BLOCK_M, BLOCK_V, BLOCK_K)
        zf = tl.where(m_v[None, :], _fpa_x(z, zr, lam), _NEG)     # pi_hat's logits, as fpa_logprobs forms them
        z = tl.where(m_v[None, :], z, _NEG)
        zr = tl.where(m_v[None, :], zr, _NEG)
        is_y = o_v[None, :] == b_y[:, None]
        t1 += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        t2 += tl.sum(tl.where(is_y, zr, 0.0), axis=1)
        t3 += tl.sum(tl.where(is_y, zf, 0.0), axis=1)
        m1, s1 = _lse_step(m1, s1, z, m_v)
        m2, s2 = _lse_step(m2, s2, zr, m_v)
        m3, s3 = _lse_step(m3, s3, zf, m_v)
    off = i_s * N + o_m
    plane = tl.num_programs(1) * N          # elements per statistic
    tl.store(st_ptr + off, m1, mask=m_m)
    tl.store(st_ptr + plane + off, s1, mask=m_m)
    tl.store(st_ptr + 2 * plane + off, t1, mask=m_m)
    tl.store(st_ptr + 3 * plane + off, m2, mask=m_m)
    tl.store(st_ptr + 4 * plane + off, s2, mask=m_m)
    tl.store(st_ptr + 5 * plane + off, t2, mask=m_m)
    tl.store(st_ptr + 6 * plane + off, m3, mask=m_m)
    tl.store(st_ptr + 7 * plane + off, s3, mask=m_m)
    tl.store(st_ptr + 8 * plane + off, t3, mask=m_m)


# ------------------------------------------------------------------------------------------- host side
def _fwd_triton(h, w, b, hr, wr, br, y, inv_t, lam, cfg: _HeadConfig):
    h, w, b, hr, wr, br, y = resolved(h, w, b, hr, wr, br, y)   # raw memory reads (see ``resolved``)
    N = h.shape[0]
    V = w.shape[0]
    upcast, prec, blocks = _kernel_flags(h, w, cfg)
    upcast_r, prec_r, _ = _kernel_flags(hr, wr, cfg)
    # two logits tiles live at once: 64x64 tiles on a GPU for any dtype (sm_90 compile check, python -m
    # bench.sm90: ~140 registers in bf16 and ~200 in fp32, no spills; 64x128 bf16 reaches 255 registers)
    BM, BV, BK, nw = blocks if triton_interpret() else (64, 64, 32, 8)
    n_mt, n_vt = triton.cdiv(N, BM), triton.cdiv(V, BV)
    splits, tps = vocab_splits(cfg, h.device, n_mt, n_vt)
    st = torch.empty(9, splits, N, dtype=torch.float32, device=h.device)
    _fpa_fwd_kernel[(n_mt, splits)](
        h, w, b if b is not None else h, hr, wr, br if br is not None else hr, y, st,
        N, V, h.shape[1], hr.shape[1], h.stride(0), w.stride(0), hr.stride(0), wr.stride(0), inv_t, lam, tps,
        HAS_BIAS=b is not None, HAS_REF_BIAS=br is not None, UPCAST=upcast, UPCAST_REF=upcast_r,
        PRECISION=prec, PRECISION_REF=prec_r, BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, num_warps=nw)
    out = []
    for m_k, s_k, t_k in st.view(3, 3, splits, N):       # epilogue over the splits, O(N * splits)
        M = m_k.max(0).values
        lse = M + torch.log((torch.exp(m_k - M) * s_k).sum(0))
        out += [t_k.sum(0) - lse, lse]
    (logp, lse), (ref_logp, _), (fpa_logp, _) = out[0:2], out[2:4], out[4:6]
    return logp, ref_logp, fpa_logp, lse


def _fwd_torch(h, w, b, hr, wr, br, y, inv_t, lam, cfg: _HeadConfig):
    N = h.shape[0]
    wf, wrf = w.float(), wr.float()            # O(V*H) upcasts, independent of N
    bf = None if b is None else b.float()
    brf = None if br is None else br.float()
    logp, ref_logp, fpa_logp, lse = (torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(4))
    # default: half the fused-linear head's chunk, since two (rows, V) logits tensors live per chunk
    step = cfg.chunk_size or max(1, _chunk_rows(cfg, w.shape[0]) // 2)
    for s in range(0, N, step):
        e = min(s + step, N)
        logp[s:e], ref_logp[s:e], fpa_logp[s:e], lse[s:e] = _fwd_torch_chunk(h[s:e], wf, bf, hr[s:e], wrf, brf,
                                                                              y[s:e], inv_t, lam)
    return logp, ref_logp, fpa_logp, lse


def _fwd_torch_chunk(h_c, wf, bf, hr_c, wrf, brf, y_c, inv_t, lam):
    """(logp, ref_logp, fpa_logp, policy lse) of one chunk of rows; its own function so that the chunk's two
    (rows, V) logits tensors are freed on return, before the next chunk's are built."""
    yc = y_c[:, None].long()
    z = _chunk_logits(h_c, wf, bf, inv_t)
    zr = _chunk_logits(hr_c, wrf, brf, inv_t)
    lse = row_logsumexp(z)
    logp = z.gather(1, yc).squeeze(1) - lse
    ref_logp = zr.gather(1, yc).squeeze(1) - row_logsumexp(zr)
    zf = fpa_logits(z, zr, lam, out=z)                    # in place: pi_hat's logits
    return logp, ref_logp, zf.gather(1, yc).squeeze(1) - row_logsumexp(zf), lse


@torch.no_grad()
@autocast_off
def linear_fpa_stats_fwd(h, w, b, hr, wr, br, y, inv_t, lam, cfg: _HeadConfig):
    """Flat, validated rows -> (logp, ref_logp, fpa_logp, policy lse), each fp32 (N,)."""
    if h.shape[0] == 0:
        return tuple(torch.zeros(0, dtype=torch.float32, device=h.device) for _ in range(4))
    fn = _fwd_triton if cfg.backend == "triton" else _fwd_torch
    return fn(h, w, b, hr, wr, br, y, inv_t, lam, cfg)


@torch.library.custom_op("gxpo::linear_fpa_stats_fwd", mutates_args=())
def _linear_fpa_stats_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                         ref_weight: Tensor, ref_bias: Optional[Tensor], tokens: Tensor, mask: Tensor, inv_t: float,
                         lam: float, backend: str, fp32_head: bool, deterministic: bool, chunk_size: Optional[int],
                         num_splits: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat rows (N, H), (V, H), (V,)|None, (N, H_ref), (V, H_ref), (V,)|None, (N,), (N,) bool -> fp32 (N,)
    (logp, ref_logp, fpa_logp, policy lse), 0 at masked rows (which cost no GEMM work)."""
    cfg = _HeadConfig(backend, fp32_head, deterministic, chunk_size, num_splits)
    rows = MaskedRows(mask)
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    out = linear_fpa_stats_fwd(rows.take(hidden), weight.contiguous(), contig(bias), rows.take(ref_hidden),
                               ref_weight.contiguous(), contig(ref_bias), rows.take(tokens), inv_t, lam, cfg)
    return tuple(rows.put(x) for x in out)


@_linear_fpa_stats_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tokens, mask, inv_t, lam, *cfg):
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=torch.float32) for _ in range(4))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, _, _, _, tokens, mask, inv_t, _, *cfg = inputs
    _, ref_logp, fpa_logp, lse = output
    ctx.save_for_backward(hidden, weight, bias, tokens, mask, lse)
    ctx.inv_t, ctx.cfg = inv_t, cfg
    ctx.mark_non_differentiable(ref_logp, fpa_logp, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dlogp, _dref, _dfpa, _dlse):
    hidden, weight, bias, tokens, mask, lse = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if dlogp is None or not any(need):
        return (None,) * 15
    # d logp / d z = onehot(y) - softmax(z): the fused-linear head backward with no entropy term (lse stands in
    # for the entropy, which is read only with a dentropy)
    grads = torch.ops.gxpo.linear_token_stats_bwd(hidden, weight, bias, tokens, mask, lse, lse, dlogp, None,
                                                  ctx.inv_t, need[0], need[1], need[2], *ctx.cfg)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 12


torch.library.register_autograd("gxpo::linear_fpa_stats_fwd", _backward, setup_context=_setup_context)


def _check_ref_head(ref_hidden, ref_weight, ref_bias, hidden, V: int, fp32_head: bool) -> None:
    validate_head(ref_hidden, ref_weight, ref_bias, fp32_head, hidden_ndim=None, prefix="ref_")
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight must have the policy vocabulary V={V} rows, got {tuple(ref_weight.shape)}")
    check_shape(ref_hidden, "ref_hidden", (*hidden.shape[:-1], ref_weight.shape[1]))


def linear_fpa_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                        ref_weight: torch.Tensor, tokens: torch.Tensor, lam: float = 1.0, temperature: float = 1.0,
                        *, bias: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, fp32_head: bool = False, deterministic: bool = False,
                        chunk_size: Optional[int] = None, backend: str = "auto"
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fpa_logprobs`` on hidden states: logits = hidden @ weight.T + bias, ref_logits = ref_hidden @ ref_weight.T
    + ref_bias, neither ever materialised for all tokens.

    Args:
        hidden: (B, T, H) (any leading dims) policy last hidden states; receives a gradient.
        weight: (V, H) policy lm_head weight; bias: (V,) or None. Both receive gradients.
        ref_hidden: (B, T, H_ref) reference hidden states (no gradient).
        ref_weight: (V, H_ref) reference lm_head weight; ref_bias: (V,) or None (no gradient).
        tokens: (B, T) token ids in [0, V) where ``mask`` is set.
        lam, temperature: as in ``fpa_logprobs``. mask: optional bool/0-1 (B, T); masked rows cost no GEMM work.
        fp32_head: fp32 GEMM operands for bf16/fp16 inputs (and allows hidden/weight dtypes to differ).
        deterministic: bitwise reproducible gradients (always the case: no atomics in either backend).
        chunk_size: token rows per chunk of the torch forward (None: ~4M logits per side and chunk) and of the
            backward (``linear_token_logprobs``'s chunks).
        backend: "auto" (Triton on CUDA / under TRITON_INTERPRET=1, else torch) | "triton" | "torch".

    Returns:
        (logp, ref_logp, fpa_logp), each (B, T) fp32, 0 at masked positions; only ``logp`` is differentiable.

    Example:
        >>> logp, ref_logp, fpa_logp = linear_fpa_logprobs(h, model.lm_head.weight, h_ref,
        ...                                                ref_model.lm_head.weight, tokens, lam=1.0, mask=mask)
    """
    if isinstance(hidden, torch.Tensor) and hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (*, H) with at least 2 dims, got {tuple(hidden.shape)}")
    check_bools(fp32_head=fp32_head, deterministic=deterministic)
    validate_head(hidden, weight, bias, fp32_head, hidden_ndim=None)
    V = weight.shape[0]
    _check_ref_head(ref_hidden, ref_weight, ref_bias, hidden, V, fp32_head)
    lead = hidden.shape[:-1]
    check_tensor(tokens, "tokens")
    check_shape(tokens, "tokens", lead)
    check_same_device(hidden, "hidden", weight=weight, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, tokens=tokens, mask=mask)
    lam, temperature = check_lam_temperature(lam, temperature)
    m = checked_mask(mask, lead, hidden.device, tokens, V).reshape(-1)
    cfg = make_head_config(hidden.device, backend, fp32_head, deterministic, chunk_size)

    check_no_forward_ad("linear_fpa_logprobs", hidden, weight, bias)
    tokens, bad = compiled_safe_tokens(tokens, V, m.view(lead))
    h2, hr2, y1 = hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1]), tokens.reshape(-1)
    logp, ref_logp, fpa_logp, _ = torch.ops.gxpo.linear_fpa_stats_fwd(
        h2, weight, bias, hr2.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), y1, m,
        1.0 / temperature, lam, *cfg_args(cfg))
    return tuple(nan_at(bad, x.view(lead)) for x in (logp, ref_logp, fpa_logp))
