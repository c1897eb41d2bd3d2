"""Fused in-place GXPO extrapolation over a whole list of tensors (spec §2; reference: ``extrapolate_ref.py``).

    θ̃ = θ0 + α·clamp(S_K(r)/S_2(r), 1, K/2+1)·(θ2 − θ0),   r = ĝ1 / (sgn(ĝ0)·max(|ĝ0|, δ)) clamped to [−2, 3]

written into ``params`` (θ2 on entry) and optionally into a lower-precision copy, with the diagnostic partial
sums of the same pass returned as one float64 vector (layout ``STAT_NAMES``, one all-reduce suffices).

Backends: CUDA -> one Triton launch per dtype group over ALL tensors (a pointer table of int64 addresses per
tensor plus a chunk -> (tensor, start) map; int64 offsets; empty tensors get no chunk). CPU -> the C++/OpenMP
extension in ``extrapolate_cpu.cpp`` (built on first use; the PyTorch reference with a one-time warning
when it cannot be built). Unlike the loss ops, ``backend="auto"`` on CPU tensors picks C++ even under
``TRITON_INTERPRET=1``: the interpreter is for tests; force ``backend="triton"`` to run the kernel there.
Dtype policy: loads upcast to float32 (float64 when the params are float64), stores cast to each tensor's dtype.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..._utils import triton_interpret
from .reference import N_STATS, SCALE_FORMULAS, STAT_INDEX, STAT_NAMES, extrapolate_ref_

__all__ = ["extrapolate_", "STAT_NAMES", "STAT_INDEX", "stats_to_dict"]

EXTRAPOLATE_BACKENDS = ("auto", "triton", "cpp", "torch")
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}
_MAX_PER_PROGRAM = 1 << 22  # keeps the fp32 per-program counts exact


@triton.jit
def _extrapolate_kernel(ptr_tab, numel_tab, thr_tab, chunk_tensor, chunk_start, n_chunks, stats_out,
                        alpha, K, coef0, coef1, delta, r_min, r_max, scale_hi,
                        P_DT: tl.constexpr, T0_DT: tl.constexpr, G0_DT: tl.constexpr, G1_DT: tl.constexpr,
                        L_DT: tl.constexpr, C_DT: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_LOWP: tl.constexpr,
                        USE_INACTIVE: tl.constexpr, CLOSED: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Each program walks chunks pid, pid + G, ...; a chunk is CHUNK elements of one tensor whose addresses
    # come from the int64 pointer table (row: param, theta0, g0, g1, lowp).
    i_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b_sr = tl.zeros([BLOCK], C_DT)
    b_sr2 = tl.zeros([BLOCK], C_DT)
    b_ss = tl.zeros([BLOCK], C_DT)
    b_dd = tl.zeros([BLOCK], C_DT)
    b_sd = tl.zeros([BLOCK], C_DT)
    b_g01 = tl.zeros([BLOCK], C_DT)
    b_g00 = tl.zeros([BLOCK], C_DT)
    b_g11 = tl.zeros([BLOCK], C_DT)
    b_ina = tl.zeros([BLOCK], C_DT)
    b_bad = tl.zeros([BLOCK], C_DT)
    b_cnt = tl.zeros([BLOCK], C_DT)
    b_max = tl.full([BLOCK], 1.0, C_DT)
    o_b = tl.arange(0, BLOCK).to(tl.int64)
    for i_c in range(i_p, n_chunks, n_prog):
        i_t = tl.load(chunk_tensor + i_c).to(tl.int64)
        start = tl.load(chunk_start + i_c)
        n = tl.load(numel_tab + i_t)
        p_p = tl.load(ptr_tab + i_t * 5).to(tl.pointer_type(P_DT))
        p_t0 = tl.load(ptr_tab + i_t * 5 + 1).to(tl.pointer_type(T0_DT))
        p_g0 = tl.load(ptr_tab + i_t * 5 + 2).to(tl.pointer_type(G0_DT))
        p_g1 = tl.load(ptr_tab + i_t * 5 + 3).to(tl.pointer_type(G1_DT))
        p_l = tl.load(ptr_tab + i_t * 5 + 4).to(tl.pointer_type(L_DT))
        for off in range(0, CHUNK, BLOCK):
            o = start + off + o_b
            m = o < n
            b_t0 = tl.load(p_t0 + o, mask=m, other=0).to(C_DT)
            b_t2 = tl.load(p_p + o, mask=m, other=0).to(C_DT)
            b_d = b_t2 - b_t0
            if HAS_GRAD:
                b_g0 = tl.load(p_g0 + o, mask=m, other=0).to(C_DT)
                b_a0 = b_g0 * coef0
                b_a1 = tl.load(p_g1 + o, mask=m, other=0).to(C_DT) * coef1
                b_ab = tl.abs(b_a0)  # explicit where: a NaN stays NaN (tl.maximum may drop it on GPU)
                b_den = tl.where(b_a0 >= 0, 1.0, -1.0) * tl.where(b_ab < delta, delta, b_ab)
                b_r = b_a1 / b_den
                if USE_INACTIVE:
                    thr = tl.load(thr_tab + i_t).to(C_DT)
                    b_in = tl.abs(b_g0) <= thr
                    b_r = tl.where(b_in, 1.0, b_r)
                    b_ina += tl.where(m & b_in, 1.0, 0.0)
                b_r = tl.where(b_r != b_r, 1.0, b_r)
                b_r = tl.minimum(tl.maximum(b_r, r_min), r_max)
                if CLOSED:
                    b_rk = b_r
                    for _ in range(K - 1):
                        b_rk = b_rk * b_r
                    b_den2 = (1.0 - b_r) + delta
                    b_s = ((1.0 - b_rk) / b_den2) / ((1.0 - b_r * b_r) / b_den2 + delta)
                else:
                    if K % 2 == 0:  # S_K/S_2 = S_{K/2}(r^2)
                        b_q = b_r * b_r
                        b_s = tl.full([BLOCK], 1.0, C_DT)
                        for _ in range(K // 2 - 1):
                            b_s = b_s * b_q + 1.0
                    else:
                        b_s = tl.full([BLOCK], 1.0, C_DT)
                        for _ in range(K - 1):
                            b_s = b_s * b_r + 1.0
                        b_s = b_s / (b_r + 1.0)
                b_s = tl.where(b_s != b_s, 1.0, b_s)
                b_s = tl.minimum(tl.maximum(b_s, 1.0), scale_hi)
                b_new = b_t0 + (alpha * b_s) * b_d
                # x·0 == 0 exactly when x is finite (no inf constant needed)
                b_fin = ((b_a0 * 0.0 + b_a1 * 0.0) == 0.0) & ((b_new * 0.0) == 0.0)
                b_sr += tl.where(m, b_r, 0.0)
                b_sr2 += tl.where(m, b_r * b_r, 0.0)
                b_g01 += b_a0 * b_a1
                b_g00 += b_a0 * b_a0
                b_g11 += b_a1 * b_a1
            else:
                b_s = tl.full([BLOCK], 1.0, C_DT)
                b_new = b_t0 + alpha * b_d
                b_fin = (b_new * 0.0) == 0.0
            b_sd_ = b_s * b_d
            b_ss += tl.where(m, b_s, 0.0)
            b_dd += b_d * b_d
            b_sd += b_sd_ * b_sd_
            b_bad += tl.where(m & (b_fin == 0), 1.0, 0.0)  # masked lanes load 0: finite
            b_cnt += tl.where(m, 1.0, 0.0)
            b_max = tl.maximum(b_max, tl.where(m, b_s, 1.0))
            tl.store(p_p + o, b_new.to(P_DT), mask=m)
            if HAS_LOWP:
                tl.store(p_l + o, b_new.to(L_DT), mask=m)
    p_o = stats_out + i_p * 12
    tl.store(p_o + 0, tl.sum(b_sr, 0))
    tl.store(p_o + 1, tl.sum(b_sr2, 0))
    tl.store(p_o + 2, tl.sum(b_ss, 0))
    tl.store(p_o + 3, tl.sum(b_dd, 0))
    tl.store(p_o + 4, tl.sum(b_sd, 0))
    tl.store(p_o + 5, tl.sum(b_g01, 0))
    tl.store(p_o + 6, tl.sum(b_g00, 0))
    tl.store(p_o + 7, tl.sum(b_g11, 0))
    tl.store(p_o + 8, tl.sum(b_ina, 0))
    tl.store(p_o + 9, tl.sum(b_bad, 0))
    tl.store(p_o + 10, tl.sum(b_cnt, 0))
    tl.store(p_o + 11, tl.max(b_max, 0))


# Host side ---------------------------------------------------------------------------------------------------

_META_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_META_CACHE_SIZE = 16


def _launch_config(device: torch.device):
    if triton_interpret() or device.type != "cuda":
        return 1024, 1024, 64          # BLOCK, CHUNK, max programs (interpreter: few big numpy ops)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 1024, 16384, 8 * sms


def _group_metadata(rows, numels, device, chunk):
    """Pointer table [n, 5] int64, numels [n] int64 and the chunk -> (tensor, start) map, cached by addresses."""
    key = (device, chunk, tuple(rows), tuple(numels))
    hit = _META_CACHE.get(key)
    if hit is not None:
        _META_CACHE.move_to_end(key)
        return hit
    c_t, c_s = [], []
    for i, n in enumerate(numels):
        nc = -(-n // chunk)  # empty tensors contribute no chunk
        c_t.extend([i] * nc)
        c_s.extend(range(0, nc * chunk, chunk))
    meta = (torch.tensor(rows, dtype=torch.int64).to(device), torch.tensor(numels, dtype=torch.int64).to(device),
            torch.tensor(c_t, dtype=torch.int32).to(device), torch.tensor(c_s, dtype=torch.int64).to(device))
    _META_CACHE[key] = meta
    if len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return meta


def _extrapolate_triton(params, theta0, g0, g1, lowp_out, thr, *, alpha, K, clip_coef0, clip_coef1,
                        scale_formula, delta, r_min, r_max) -> torch.Tensor:
    device = params[0].device
    block, chunk, max_prog = _launch_config(device)
    has_grad = g0 is not None
    groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        key = (p.dtype, theta0[i].dtype, g0[i].dtype if has_grad else None, g1[i].dtype if has_grad else None,
               lowp_out[i].dtype if lowp_out is not None and lowp_out[i] is not None else None)
        groups.setdefault(key, []).append(i)
    parts = []
    for (pdt, t0dt, g0dt, g1dt, ldt), idx in groups.items():
        rows = [(params[i].data_ptr(), theta0[i].data_ptr(), g0[i].data_ptr() if has_grad else 0,
                 g1[i].data_ptr() if has_grad else 0, lowp_out[i].data_ptr() if ldt is not None else 0)
                for i in idx]
        numels = [params[i].numel() for i in idx]
        ptr_tab, numel_tab, c_t, c_s = _group_metadata(rows, numels, device, chunk)
        n_chunks = c_t.numel()
        grid = max(min(n_chunks, max_prog), -(-sum(numels) // _MAX_PER_PROGRAM))
        grid = min(grid, n_chunks)
        cdt = torch.float64 if pdt == torch.float64 else torch.float32
        out = torch.empty((grid, 12), dtype=cdt, device=device)
        thr_tab = thr[idx] if thr is not None else numel_tab  # dummy pointer when unused
        _extrapolate_kernel[(grid,)](
            ptr_tab, numel_tab, thr_tab, c_t, c_s, n_chunks, out,
            float(alpha), int(K), float(clip_coef0), float(clip_coef1), float(delta), float(r_min), float(r_max),
            K / 2 + 1.0,
            P_DT=_TL_DTYPES[pdt], T0_DT=_TL_DTYPES[t0dt], G0_DT=_TL_DTYPES[g0dt or torch.float32],
            G1_DT=_TL_DTYPES[g1dt or torch.float32], L_DT=_TL_DTYPES[ldt or torch.float32],
            C_DT=_TL_DTYPES[cdt], HAS_GRAD=has_grad, HAS_LOWP=ldt is not None,
            USE_INACTIVE=thr is not None, CLOSED=scale_formula == "closed", CHUNK=chunk, BLOCK=block,
            num_warps=4)
        parts.append(out.double())
    return _combine(parts, device)


def _combine(parts: Sequence[torch.Tensor], device) -> torch.Tensor:
    if not parts:
        st = torch.zeros(N_STATS, dtype=torch.float64, device=device)
        st[-1] = 1.0
        return st
    allp = torch.cat(list(parts), 0)
    return torch.cat([allp[:, :-1].sum(0), allp[:, -1:].max(0).values])


def stats_to_dict(stats: torch.Tensor) -> dict:
    """Name the entries of a stats vector (host floats)."""
    return dict(zip(STAT_NAMES, stats.double().cpu().tolist()))


def _check_list(x, name, n):
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(x).__name__}")
    if len(x) != n:
        raise ValueError(f"{name} must have {n} tensors (one per param), got {len(x)}")


def _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula):
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple of tensors, got {type(params).__name__}")
    n = len(params)
    _check_list(theta0, "theta0", n)
    if (g0 is None) != (g1 is None):
        raise ValueError("g0 and g1 must both be given or both be None")
    if g0 is not None:
        _check_list(g0, "g0", n)
        _check_list(g1, "g1", n)
    if lowp_out is not None:
        _check_list(lowp_out, "lowp_out", n)
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"K must be an int >= 2, got {K!r}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if scale_formula not in SCALE_FORMULAS:
        raise ValueError(f"scale_formula must be one of {SCALE_FORMULAS}, got {scale_formula!r}")
    dev = params[0].device if n else None
    for i in range(n):
        p = params[i]
        named = [("params", p), ("theta0", theta0[i])]
        if g0 is not None:
            named += [("g0", g0[i]), ("g1", g1[i])]
        if lowp_out is not None and lowp_out[i] is not None:
            named.append(("lowp_out", lowp_out[i]))
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _TL_DTYPES:
                raise TypeError(f"{name}[{i}] must be float16/bfloat16/float32/float64, got {t.dtype}")
            if t.numel() != p.numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements but params[{i}] has {p.numel()}")
            if t.device != dev:
                raise ValueError(f"{name}[{i}] is on {t.device} but params[0] is on {dev}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in EXTRAPOLATE_BACKENDS:
        raise ValueError(f"backend must be one of {EXTRAPOLATE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpp"
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got {device}")
    return backend


@torch.no_grad()
def extrapolate_(params: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor],
                 g0: Optional[Sequence[torch.Tensor]], g1: Optional[Sequence[torch.Tensor]], *,
                 alpha: float, K: int, clip_coef0: float = 1.0, clip_coef1: float = 1.0,
                 scale_formula: str = "horner", inactive_threshold: Optional[float] = None,
                 lowp_out: Optional[Sequence[Optional[torch.Tensor]]] = None, delta: float = 1e-8,
                 r_min: float = -2.0, r_max: float = 3.0, backend: str = "auto") -> torch.Tensor:
    """In place θ2 -> θ̃ = θ0 + α·scale⊙(θ2 − θ0) over a list of tensors, in one pass; returns the stats vector.

    Args:
        params: list of contiguous float tensors (any shapes) holding θ2; overwritten with θ̃.
        theta0: list, same numels — the snapshot θ0 (float32 buffers usually).
        g0, g1: lists, same numels — gradients at θ0 and θ1 *before* the clip coefficients (ĝ = coef·g is formed
            in registers), or both None for the plain move θ0 + α(θ2 − θ0) (scale ≡ 1, SFPO's reposition).
        alpha, K: partial-move fraction and virtual step count (int >= 2); scale is clamped to [1, K/2 + 1].
        clip_coef0, clip_coef1: global clip coefficients min(1, c/‖g‖) of g0 and g1 (floats).
        scale_formula: "horner" (exact S_K/S_2) or "closed" (the authors' guarded closed form).
        inactive_threshold: None, or rel: coordinates with |g0| <= rel·RMS(g0 of its tensor) get r = 1.
        lowp_out: optional list (entries may be None) also receiving θ̃ in its own dtype (e.g. a bf16 model copy).
        delta, r_min, r_max: δ of the denominator guard and the clamp of r (spec: 1e-8, −2, 3).
        backend: "auto" (CUDA -> triton, CPU -> cpp), "triton", "cpp" or "torch" (the reference loop).
    Returns:
        float64 tensor [len(STAT_NAMES)] on the params' device: sums over all coordinates (r, r², scale,
        ‖θ2−θ0‖², ‖scale⊙(θ2−θ0)‖², ĝ0·ĝ1, ‖ĝ0‖², ‖ĝ1‖², inactive count, non-finite count, numel) and, last,
        max scale. Reduce [:-1] with SUM and [-1] with MAX across ranks.
    Example:
        >>> stats = extrapolate_(params, theta0_bufs, g0_bufs, [p.grad for p in params], alpha=0.5, K=5)
        >>> stats_to_dict(stats)["max_scale"]
    """
    _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula)
    if len(params) == 0:
        return _combine([], torch.device("cpu"))
    device = params[0].device
    be = _resolve(backend, device)
    thr = None
    if inactive_threshold is not None and g0 is not None:
        if not float(inactive_threshold) >= 0:
            raise ValueError(f"inactive_threshold must be >= 0, got {inactive_threshold!r}")
        thr = _thresholds(g0, float(inactive_threshold))
    kw = dict(alpha=float(alpha), K=K, clip_coef0=float(clip_coef0), clip_coef1=float(clip_coef1),
              scale_formula=scale_formula, delta=float(delta), r_min=float(r_min), r_max=float(r_max))
    if be == "cpp":
        from ._cpp import extrapolate_cpp_
        out = extrapolate_cpp_(params, theta0, g0, g1, lowp_out, thr, **kw)
        if out is not None:
            return out
        be = "torch"  # no compiler or an unsupported dtype combination
    if be == "triton":
        return _extrapolate_triton(params, theta0, g0, g1, lowp_out, thr, **kw)
    return extrapolate_ref_(params, theta0, g0, g1, lowp_out=lowp_out,
                            thresholds=None if thr is None else thr.tolist(), **kw)


def _thresholds(g0: Sequence[torch.Tensor], rel: float) -> torch.Tensor:
    """Absolute per-tensor inactive thresholds rel·‖g0_t‖/sqrt(n_t), float32 [n] on the device (no host sync)."""
    dev = g0[0].device
    ne = [g for g in g0 if g.numel()]
    norms = iter(torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in ne]) if ne else [])
    out = [next(norms) * (rel / math.sqrt(g.numel())) if g.numel() else torch.zeros((), device=dev)
           for g in g0]
    return torch.stack(out).float()
