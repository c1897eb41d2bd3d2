"""Fused in-place GXPO extrapolation over a whole list of tensors (reference: ``reference.py``).

    θ̃ = θ0 + α·clamp(S_K(r)/S_2(r), 1, K/2+1)·(θ2 − θ0),   r = ĝ1 / (sgn(ĝ0)·max(|ĝ0|, δ)) clamped to [−2, 3]

written into ``params`` (θ2 on entry) and optionally into a lower-precision copy, with the diagnostic partial
sums of the same pass returned as one float64 vector (layout ``STAT_NAMES``, one all-reduce suffices).

Backends: CUDA -> one Triton launch per dtype group over ALL tensors (a pointer table of int64 addresses per
tensor plus a chunk -> (tensor, start) map; int64 offsets; empty tensors get no chunk). CPU -> the C++/OpenMP
extension in ``extrapolate_cpu.cpp`` (built on first use; the PyTorch reference with a one-time warning
when it cannot be built). Unlike the loss ops, ``backend="auto"`` on CPU tensors picks C++ even under
``TRITON_INTERPRET=1``: the interpreter is for tests; force ``backend="triton"`` to run the kernel there.
Dtype policy, per tensor: loads upcast to float32 (float64 when the param is float64), stores cast to each tensor's
dtype (a 16-bit copy of a float64 param through float32, as torch converts a double).
"""
import itertools
import math
import operator
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..._utils import resolve_backend, triton_interpret
from .reference import MAX_K, N_STATS, SCALE_FORMULAS, STAT_INDEX, STAT_NAMES, extrapolate_ref_

__all__ = ["extrapolate_", "ExtrapolationPlan", "STAT_NAMES", "STAT_INDEX", "stats_to_dict"]

EXTRAPOLATE_BACKENDS = ("auto", "triton", "cpp", "torch")
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}
_MAX_PER_PROGRAM = 1 << 22  # keeps the fp32 per-program counts exact


# the smallest float32 magnitude a round-to-nearest-even store rounds to inf: the largest finite value plus half
# an ulp (a tie rounds to the even neighbour, inf)
_F16_INF_AT = tl.constexpr(65520.0)
_BF16_INF_AT = tl.constexpr(3.39617752923046e+38)      # float32 bits 0x7F7F8000


@triton.jit
def _stores_finite(b_new, P_DT: tl.constexpr, L_DT: tl.constexpr, L_MID_DT: tl.constexpr, C_DT: tl.constexpr,
                   HAS_LOWP: tl.constexpr):
    # θ̃ as written is finite: in the param's dtype and in lowp_out's (a 16-bit store can overflow to inf). One
    # compare of |θ̃| against the narrowest store's bound, false for NaN and inf too (x·0 == 0 exactly when x is
    # finite covers 32-bit stores); float64 params convert as their stores do (a cold path)
    if C_DT == tl.float64:
        b_fin = (b_new.to(P_DT).to(C_DT) * 0.0) == 0.0
        if HAS_LOWP:
            b_fin = b_fin & ((b_new.to(L_MID_DT).to(L_DT).to(C_DT) * 0.0) == 0.0)
    elif P_DT == tl.float16 or (HAS_LOWP and L_DT == tl.float16):
        b_fin = tl.abs(b_new) < _F16_INF_AT
    elif P_DT == tl.bfloat16 or (HAS_LOWP and L_DT == tl.bfloat16):
        b_fin = tl.abs(b_new) < _BF16_INF_AT
    else:
        b_fin = (b_new * 0.0) == 0.0
    return b_fin


@triton.jit
def _extrapolate_tile(p_p, p_t0, p_l, p_g0, p_g1, o, n, thr, b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01, b_g00, b_g11,
                      b_ina, b_bad, b_max, alpha, coef0, coef1, delta, r_min, r_max, scale_hi, K: tl.constexpr,
                      P_DT: tl.constexpr, L_DT: tl.constexpr, L_MID_DT: tl.constexpr, C_DT: tl.constexpr,
                      HAS_GRAD: tl.constexpr, HAS_LOWP: tl.constexpr, USE_INACTIVE: tl.constexpr,
                      CLOSED: tl.constexpr, LIB_POW: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    # One BLOCK of one tensor at element offsets o, added to the running stats. MASKED: the block may run past the
    # tensor's end (lanes at o >= n load 0 and are kept out of the sums); a full block needs neither the bounds
    # test nor those selects.
    m = o < n   # (unused by a full block)
    if MASKED:
        b_t0 = tl.load(p_t0 + o, mask=m, other=0).to(C_DT)
        b_t2 = tl.load(p_p + o, mask=m, other=0).to(C_DT)
    else:
        b_t0 = tl.load(p_t0 + o).to(C_DT)
        b_t2 = tl.load(p_p + o).to(C_DT)
    b_d = b_t2 - b_t0
    if HAS_GRAD:
        if MASKED:
            b_g0 = tl.load(p_g0 + o, mask=m, other=0).to(C_DT)
            b_a1 = tl.load(p_g1 + o, mask=m, other=0).to(C_DT) * coef1
        else:
            b_g0 = tl.load(p_g0 + o).to(C_DT)
            b_a1 = tl.load(p_g1 + o).to(C_DT) * coef1
        b_a0 = b_g0 * coef0
        b_ab = tl.abs(b_a0)  # explicit where: a NaN stays NaN (tl.maximum may drop it on GPU)
        b_den = tl.where(b_a0 >= 0, 1.0, -1.0) * tl.where(b_ab < delta, delta, b_ab)
        b_r = b_a1 / b_den
        if USE_INACTIVE:
            b_in = tl.abs(b_g0) <= thr
            b_r = tl.where(b_in, 1.0, b_r)
            if MASKED:
                b_ina += tl.where(b_in & m, 1.0, 0.0)
            else:
                b_ina += tl.where(b_in, 1.0, 0.0)
        b_r = tl.where(b_r != b_r, 1.0, b_r)
        b_r = tl.minimum(tl.maximum(b_r, r_min), r_max)
        if CLOSED:
            # r^K as torch.pow computes it on CUDA: x·x, x·x·x for K = 2, 3, else pow (libdevice)
            if K == 2:
                b_rk = b_r * b_r
            elif K == 3:
                b_rk = b_r * b_r * b_r
            elif LIB_POW:
                b_rk = libdevice.pow(b_r, tl.full([BLOCK], K, C_DT))
            else:  # the interpreter has no libdevice: repeated products (last-bit differences)
                b_rk = b_r
                for _ in tl.static_range(K - 1):
                    b_rk = b_rk * b_r
            b_den2 = (1.0 - b_r) + delta
            b_s = ((1.0 - b_rk) / b_den2) / ((1.0 - b_r * b_r) / b_den2 + delta)
        else:
            if K % 2 == 0:  # S_K/S_2 = S_{K/2}(r^2)
                b_q = b_r * b_r
                b_s = tl.full([BLOCK], 1.0, C_DT)
                for _ in tl.static_range(K // 2 - 1):
                    b_s = b_s * b_q + 1.0
            else:
                b_s = tl.full([BLOCK], 1.0, C_DT)
                for _ in tl.static_range(K - 1):
                    b_s = b_s * b_r + 1.0
                b_s = b_s / (b_r + 1.0)
        b_s = tl.where(b_s != b_s, 1.0, b_s)
        b_s = tl.minimum(tl.maximum(b_s, 1.0), scale_hi)
        if USE_INACTIVE:
            b_s = tl.where(b_in, 1.0, b_s)  # neutral retention
        b_new = b_t0 + (alpha * b_s) * b_d
        # x·0 == 0 exactly when x is finite (no inf constant needed)
        b_fin = ((b_a0 * 0.0 + b_a1 * 0.0) == 0.0) & _stores_finite(b_new, P_DT, L_DT, L_MID_DT, C_DT, HAS_LOWP)
        if MASKED:   # a masked lane (loads of 0) may have r = 1 (inactive); its ĝ products below are 0
            b_sr += tl.where(m, b_r, 0.0)
            b_sr2 += tl.where(m, b_r * b_r, 0.0)
        else:
            b_sr += b_r
            b_sr2 += b_r * b_r
        b_g01 += b_a0 * b_a1
        b_g00 += b_a0 * b_a0
        b_g11 += b_a1 * b_a1
    else:
        b_s = tl.full([BLOCK], 1.0, C_DT)
        b_new = b_t0 + alpha * b_d
        b_fin = _stores_finite(b_new, P_DT, L_DT, L_MID_DT, C_DT, HAS_LOWP)
    b_sd_ = b_s * b_d
    if MASKED:
        b_ss += tl.where(m, b_s, 0.0)
        b_max = tl.maximum(b_max, tl.where(m, b_s, 1.0))
    else:
        b_ss += b_s
        b_max = tl.maximum(b_max, b_s)
    b_dd += b_d * b_d
    b_sd += b_sd_ * b_sd_
    if MASKED:
        b_bad += tl.where(m & (b_fin == 0), 1.0, 0.0)
        tl.store(p_p + o, b_new.to(P_DT), mask=m)
        if HAS_LOWP:   # L_MID_DT: float32 for a 16-bit copy of float64 params (torch's double -> half), else C_DT
            tl.store(p_l + o, b_new.to(L_MID_DT).to(L_DT), mask=m)
    else:
        b_bad += tl.where(b_fin == 0, 1.0, 0.0)
        tl.store(p_p + o, b_new.to(P_DT))
        if HAS_LOWP:
            tl.store(p_l + o, b_new.to(L_MID_DT).to(L_DT))
    return b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01, b_g00, b_g11, b_ina, b_bad, b_max


@triton.jit
def _extrapolate_kernel(base_p, base_t0, base_g0, base_g1, base_l, off_tab, g0_off, g1_off, numel_tab, thr_tab,
                        chunk_tensor, chunk_start, n_chunks, stats_out,
                        alpha: tl.float64, coef0: tl.float64, coef1: tl.float64, delta: tl.float64,
                        r_min: tl.float64, r_max: tl.float64, scale_hi: tl.float64, K: tl.constexpr,
                        P_DT: tl.constexpr, T0_DT: tl.constexpr, G0_DT: tl.constexpr, G1_DT: tl.constexpr,
                        L_DT: tl.constexpr, L_MID_DT: tl.constexpr, C_DT: tl.constexpr, HAS_GRAD: tl.constexpr,
                        HAS_LOWP: tl.constexpr, USE_INACTIVE: tl.constexpr, CLOSED: tl.constexpr, LIB_POW: tl.constexpr,
                        ALIGN: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks chunks pid, pid + G, ...; a chunk is CHUNK elements of one tensor. A tensor is addressed
    # as base pointer of its list (a kernel argument, so Triton knows its 16-byte alignment) + an int64 element
    # offset from the table (row: param, theta0, lowp); g0's and g1's offsets come in their own vectors (gradients
    # may sit at new addresses on every call).
    # ALIGN > 1: every offset and numel of this launch is a multiple of ALIGN elements (checked on the host),
    # which lets the compiler emit 16-byte accesses; ALIGN = 1 is the general path.
    # The float arguments are annotated float64 (a plain Python float reaches a GPU kernel as float32) and rounded
    # once here to the compute dtype: float64 params get unrounded hyper-parameters, float32 the same values as
    # a float32 argument would carry. tl.full, not .to(): the interpreter passes the Python floats themselves.
    # (This module has no ``from __future__ import annotations``: Triton reads the annotations as dtypes.)
    alpha, coef0, coef1 = tl.full((), alpha, C_DT), tl.full((), coef0, C_DT), tl.full((), coef1, C_DT)
    delta, r_min, r_max = tl.full((), delta, C_DT), tl.full((), r_min, C_DT), tl.full((), r_max, C_DT)
    scale_hi = tl.full((), scale_hi, C_DT)
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
    b_max = tl.full([BLOCK], 1.0, C_DT)
    n_el = tl.zeros([], tl.int64)   # elements walked: a chunk's length, no per-lane count
    o_b = tl.arange(0, BLOCK).to(tl.int64)
    for i_c in range(i_p, n_chunks, n_prog):
        i_t = tl.load(chunk_tensor + i_c).to(tl.int64)
        start = tl.multiple_of(tl.load(chunk_start + i_c), ALIGN)
        n = tl.multiple_of(tl.load(numel_tab + i_t), ALIGN)
        p_p = base_p + tl.multiple_of(tl.load(off_tab + i_t * 3), ALIGN)
        p_t0 = base_t0 + tl.multiple_of(tl.load(off_tab + i_t * 3 + 1), ALIGN)
        p_l = base_l + tl.multiple_of(tl.load(off_tab + i_t * 3 + 2), ALIGN)
        p_g0 = base_g0 + tl.multiple_of(tl.load(g0_off + i_t), ALIGN)
        p_g1 = base_g1 + tl.multiple_of(tl.load(g1_off + i_t), ALIGN)
        thr = tl.load(thr_tab + i_t).to(C_DT) if USE_INACTIVE else 0.0
        n_el += tl.minimum(n - start, CHUNK)
        # every chunk but a tensor's last is full: its blocks skip the bounds mask (see _extrapolate_tile)
        if start + CHUNK <= n:
            for off in range(0, CHUNK, BLOCK):
                b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01, b_g00, b_g11, b_ina, b_bad, b_max = _extrapolate_tile(
                    p_p, p_t0, p_l, p_g0, p_g1, start + off + o_b, n, thr, b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01,
                    b_g00, b_g11, b_ina, b_bad, b_max, alpha, coef0, coef1, delta, r_min, r_max, scale_hi, K, P_DT,
                    L_DT, L_MID_DT, C_DT, HAS_GRAD, HAS_LOWP, USE_INACTIVE, CLOSED, LIB_POW, BLOCK, False)
        else:
            for off in range(0, CHUNK, BLOCK):
                b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01, b_g00, b_g11, b_ina, b_bad, b_max = _extrapolate_tile(
                    p_p, p_t0, p_l, p_g0, p_g1, start + off + o_b, n, thr, b_sr, b_sr2, b_ss, b_dd, b_sd, b_g01,
                    b_g00, b_g11, b_ina, b_bad, b_max, alpha, coef0, coef1, delta, r_min, r_max, scale_hi, K, P_DT,
                    L_DT, L_MID_DT, C_DT, HAS_GRAD, HAS_LOWP, USE_INACTIVE, CLOSED, LIB_POW, BLOCK, True)
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
    tl.store(p_o + 10, n_el.to(tl.float64))
    tl.store(p_o + 11, tl.max(b_max, 0))


# Host side ---------------------------------------------------------------------------------------------------

_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")
_PTR, _NUMEL, _CONTIG = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous
_IS_NEG = torch.Tensor.is_neg
_ESIZE = torch.Tensor.element_size


def _launch_config(device: torch.device):
    if triton_interpret() or device.type != "cuda":
        return 1024, 1024, 64          # BLOCK, CHUNK, max programs (interpreter: few big numpy ops)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 512, 16384, 8 * sms         # 512 x 4 warps: 4 fp32 per thread (one 16-byte access per list)


def _addresses(*lists) -> list:
    """The data_ptrs of tensor lists, one after the other, in one C-level pass (a flat Python list: comparing it
    with the previous call's is cheaper than building an array, which only a change needs; filling an array
    straight from the iterator cost more than the list)."""
    return list(map(_PTR, lists[0] if len(lists) == 1 else itertools.chain(*lists)))


def _as_array(ptrs, k: int) -> np.ndarray:
    """int64 [k, n] (C order) of ``k`` lists' addresses: a list from ``_addresses``, or their int64 bytes (the
    public op's ``tensor_records``, read without a copy)."""
    a = np.frombuffer(ptrs, np.int64) if isinstance(ptrs, bytes) else np.array(ptrs, dtype=np.int64)
    return a.reshape(k, -1)


class _Plan:
    """The validated launch state of one (params, theta0, g0, lowp_out) layout: per dtype group the base tensors,
    the element-offset table, numels and chunk map on the device. Only g1's offsets change from call to call
    (gradients are fresh tensors every pass), and g0's too with ``g0_per_call`` (a rule that keeps pass 0's
    gradient tensors instead of copying them; the public op, which takes any g0 per call); everything else is
    built once. ``g0_dtypes``: with ``g0_per_call``, the dtype of each g0 tensor the plan will be run with (the
    groups split by it, as a static g0's do); None: each param's dtype (a gradient has it)."""

    def __init__(self, params, theta0, g0, lowp_out, has_grad: bool, g0_per_call: bool = False,
                 g0_dtypes: Optional[Sequence[torch.dtype]] = None):
        self.device = params[0].device
        self.block, self.chunk, self.max_prog = _launch_config(self.device)
        self.lib_pow = not triton_interpret()
        self.g0_per_call = g0_per_call
        self.names = ("g0", "g1") if g0_per_call else ("g1",)
        groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
        for i, p in enumerate(params):
            if p.numel() == 0:
                continue
            ldt = lowp_out[i].dtype if lowp_out is not None and lowp_out[i] is not None else None
            if not has_grad:
                g0dt = None
            elif g0_per_call:
                g0dt = p.dtype if g0_dtypes is None else g0_dtypes[i]
            else:
                g0dt = g0[i].dtype
            groups.setdefault((p.dtype, theta0[i].dtype, g0dt, ldt), []).append(i)
        self.groups = []
        for (pdt, t0dt, g0dt, ldt), idx in groups.items():
            # static columns: params, theta0, lowp (the table) and g0 unless it comes per call
            cols = [[params[i] for i in idx], [theta0[i] for i in idx],
                    [lowp_out[i] for i in idx] if ldt is not None else None]
            g0s = [g0[i] for i in idx] if has_grad and not g0_per_call else None
            bases = [c[0] if c is not None else params[idx[0]] for c in cols]
            offs = [[_elem_offset(t, b) for t in c] if c is not None else [0] * len(idx)
                    for c, b in zip(cols, bases)]
            numels = [params[i].numel() for i in idx]
            c_t, c_s = [], []
            for j, n in enumerate(numels):
                nc = -(-n // self.chunk)  # empty tensors contribute no chunk
                c_t.extend([j] * nc)
                c_s.extend(range(0, nc * self.chunk, self.chunk))
            tensors = [t for c in cols + [g0s] if c is not None for t in c]
            align = _alignment(tensors, numels, min(t.element_size() for t in tensors))
            dev = self.device
            n_chunks = len(c_t)
            cdt = torch.float64 if pdt == torch.float64 else torch.float32
            firsts = bases + ([g0s[0]] if g0s is not None else [])
            self.groups.append(dict(
                idx=idx, whole=idx == list(range(len(params))),
                # weak: a cached layout's plan must not keep its tensors alive (the layout is dropped when one of
                # them is freed, see ``_Layout``; a layout of one tensor per group holds nothing else)
                dtypes=(pdt, t0dt, g0dt, ldt), bases=[weakref.ref(b) for b in bases],
                firsts=[(weakref.ref(t), t.data_ptr(), t.dtype, t.numel()) for t in firsts],   # see ``moved``
                idx_t=torch.tensor(idx, dtype=torch.int64).to(dev),   # gathers thresholds without a host copy
                off_tab=torch.tensor(list(zip(*offs)), dtype=torch.int64).to(dev),
                g0=(g0s[0], torch.tensor([_elem_offset(t, g0s[0]) for t in g0s], dtype=torch.int64).to(dev))
                if g0s is not None else None,
                numel_tab=torch.tensor(numels, dtype=torch.int64).to(dev),
                c_t=torch.tensor(c_t, dtype=torch.int32).to(dev), c_s=torch.tensor(c_s, dtype=torch.int64).to(dev),
                n_chunks=n_chunks, align=align,
                grid=min(max(min(n_chunks, self.max_prog), -(-sum(numels) // _MAX_PER_PROGRAM)), n_chunks),
                # the launch arguments that do not change from call to call
                const=dict(P_DT=_TL_DTYPES[pdt], T0_DT=_TL_DTYPES[t0dt], L_DT=_TL_DTYPES[ldt or bases[2].dtype],
                           L_MID_DT=tl.float32 if cdt == torch.float64 and ldt in (torch.bfloat16, torch.float16)
                           else _TL_DTYPES[cdt], C_DT=_TL_DTYPES[cdt], HAS_LOWP=ldt is not None,
                           LIB_POW=self.lib_pow, CHUNK=self.chunk, BLOCK=self.block, num_warps=4)))
        self.numels = list(map(_NUMEL, params))
        # the per-call lists' checks: with the C++ extension, one compiled pass per list (``tensor_records``) whose
        # numels and metas columns must equal these bytes (its params' numels, contiguous, no neg bit, the params'
        # device, the dtype each group reads: the param's for g1, g0's planned dtype for g0): one bytes compare
        self.records = _record_reader() if has_grad else None
        self.tails = None
        if self.records is not None:
            meta = int(np.frombuffer(self.records(params[:1], False), np.int64)[2]) >> 8   # params[0]: valid
            pdts = list(map(_DTYPE, params))
            dts = {"g1": pdts, "g0": pdts if g0_dtypes is None else list(g0_dtypes)}
            numels = np.array(self.numels, dtype=np.int64).tobytes()
            self.tails = [numels + np.array([meta << 8 | _CODE_OF[dt] for dt in dts[name]], np.int64).tobytes()
                          for name in self.names]
        # one dtype group over all params (the usual model): the checks and the offsets in one compiled call
        self.grad_offsets = None
        if self.tails is not None and len(self.groups) == 1 and self.groups[0]["whole"]:
            from ._cpp import load_extension
            self.grad_offsets = getattr(load_extension(), "grad_offsets", None)
            self.scratch = torch.empty((len(self.names), len(params)), dtype=torch.int64)

    def moved(self) -> bool:
        """Whether the first static tensor of a dtype group (its base; g0's too when static) no longer has the
        address, dtype or numel the plan was built with (``model.to(...)``, ``p.data = ...``): a few attribute
        reads per group, not a pass over the tensors."""
        for grp in self.groups:
            for ref, a, dt, n in grp["firsts"]:
                t = ref()
                if t is None or t.data_ptr() != a or t.dtype != dt or t.numel() != n or t.is_neg():
                    return True
        return False

    def _call_offsets(self, grp, lists, ptrs, modes) -> tuple:
        """The per-call lists of one dtype group (g1, or g0 then g1) with their addresses (``_addresses(*lists)``):
        per list (base tensor, device element offsets, ALIGN), and the copies the launch reads (or None). The
        offsets of all lists come from one NumPy expression and reach the device in one copy; they are rebuilt
        only when an address or an element size changes. ALIGN drops to 1 when a tensor is not 16-byte aligned.

        The kernel reads a whole list in its base tensor's dtype. Gradients of one dtype group share their
        params' dtype, but a list may mix dtypes (the public op accepts any float dtype per tensor): such a list
        is read from copies in the compute dtype, the value the kernel's load would upcast each element to. The
        caller keeps the copies alive until the launch. ``modes``, per list: "always" (scan the dtypes: the
        caller saw mixed dtypes, or cannot promise one dtype) or "never" (one dtype per group, as gradients of the
        params have). (Scanning only when the addresses change is not enough: tensors of other dtypes can come back
        at the same addresses, and the cached offsets would read them in the base tensor's dtype.)"""
        if "always" in modes and self._mixed(lists, modes, ("always",)):
            return self._mixed_offsets(grp, lists, modes)
        bases = [ts[0] for ts in lists]
        eszs = tuple(map(_ESIZE, bases))
        last = grp.get("call")
        if last is not None and last[0] == ptrs and last[1] == eszs:
            # the allocator handed out the same addresses again
            return [(b, off, al) for b, (off, al) in zip(bases, last[2])], None
        res = self._offsets(grp, _as_array(ptrs, len(lists)), eszs)
        grp["call"] = (ptrs, eszs, res)
        return [(b, off, al) for b, (off, al) in zip(bases, res)], None

    @staticmethod
    def _mixed(lists, modes, which) -> bool:
        return any(m in which and len(set(map(_DTYPE, ts))) > 1 for ts, m in zip(lists, modes))

    def _offsets(self, grp, a: np.ndarray, eszs: tuple) -> list:
        """(device element offsets, ALIGN) per list of the addresses ``a`` (int64 [k, m], C order), offsets from
        each list's first tensor; as few NumPy / torch calls as the job allows (a call costs microseconds once the
        caches are cold)."""
        low = int(np.bitwise_or.reduce(a, axis=None))   # low bits of every address: alignment of all at once
        if low % max(eszs):   # (element sizes are powers of two) a list is off its element grid: name it
            for row, esz, name in zip(a, eszs, self.names):
                if int(np.bitwise_or.reduce(row)) % esz:
                    raise ValueError(f"extrapolate_: {name} tensors must be aligned to their element size")
        align = grp["align"] if low & 15 == 0 else 1   # the launch takes the smallest ALIGN of its lists anyway
        d = a - a[:, :1]
        if eszs.count(eszs[0]) == len(eszs):
            d >>= eszs[0].bit_length() - 1    # exact: every difference is a multiple of the element size
        else:
            d //= np.array(eszs, dtype=np.int64)[:, None]
        if len(d) == 1:
            return [(torch.from_numpy(d[0]).to(self.device, non_blocking=True), align)]
        return [(off, align) for off in torch.from_numpy(d).to(self.device, non_blocking=True).unbind(0)]

    def _mixed_offsets(self, grp, lists, modes) -> tuple:
        cdt = torch.float64 if grp["dtypes"][0] == torch.float64 else torch.float32
        keep = [[t.to(cdt) for t in ts] if m != "never" and len(set(map(_DTYPE, ts))) > 1 else ts
                for ts, m in zip(lists, modes)]
        grp.pop("call", None)   # the copies die after this call: a later list at their addresses is not them
        res = self._offsets(grp, _as_array(_addresses(*keep), len(keep)), tuple(ts[0].element_size() for ts in keep))
        return [(ts[0], off, al) for ts, (off, al) in zip(keep, res)], keep

    def _fast_offsets(self, lists) -> Optional[list]:
        """``_call_offsets`` of a plan with one dtype group over all params, for lists that pass the per-call checks
        (``self.tails``), from one call of the C++ extension's ``grad_offsets`` (the checks, the addresses, their
        bitwise OR and the element offsets in one pass); None when a list fails a check (the caller then runs the
        general path, which names the offender)."""
        r = self.grad_offsets(lists, self.tails, self.scratch)
        if r is None:
            return None
        ptrs, low = r
        grp = self.groups[0]
        bases = [ts[0] for ts in lists]
        eszs = tuple(map(_ESIZE, bases))
        last = grp.get("call")
        if last is None or last[0] != ptrs or last[1] != eszs:
            if low % max(eszs):   # a list off its element grid: the general computation names it
                self._offsets(grp, _as_array(ptrs, len(lists)), eszs)
            align = grp["align"] if low & 15 == 0 else 1
            # a copy: the scratch is rewritten by the next call, the cached offsets must not be
            off = self.scratch.to(self.device, non_blocking=True, copy=True)
            last = grp["call"] = (ptrs, eszs, [(o, align) for o in off.unbind(0)])
        return [(b, off, al) for b, (off, al) in zip(bases, last[2])]

    def _checked_addresses(self, lists) -> Optional[bytes]:
        """The addresses of the per-call lists (int64 bytes, one list after the other) when every tensor passes the
        checks in one compiled pass per list (``tensor_records``: numel, contiguity, neg bit, device and dtype
        against ``self.tails``); else None after the Python-level checks (``_check_call_lists``), which raise
        naming a tensor that fails one, and let one in another float dtype through (the caller reads it from a
        copy)."""
        n8 = 8 * len(self.numels)
        out = []
        for ts, tail in zip(lists, self.tails):
            rec = self.records(ts, False)
            if rec is None or rec[n8:] != tail:
                self._check_call_lists(lists)
                return None
            out.append(rec[:n8])
        return out[0] if len(out) == 1 else b"".join(out)

    def _check_call_lists(self, lists) -> None:
        for name, ts in zip(self.names, lists):
            for i, (t, n) in enumerate(zip(ts, self.numels)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"extrapolate_: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
                if t.dtype not in _TL_DTYPES:
                    raise TypeError(f"extrapolate_: {name}[{i}] must be float16/bfloat16/float32/float64, got "
                                    f"{t.dtype}")
                if t.numel() != n:
                    raise ValueError(f"extrapolate_: {name}[{i}] has {t.numel()} elements but params[{i}] has {n}")
                if t.device != self.device:
                    raise ValueError(f"extrapolate_: {name}[{i}] is on {t.device} but the params are on "
                                     f"{self.device}")
                if not t.is_contiguous() or t.is_neg():
                    raise ValueError(f"extrapolate_: {name}[{i}] must be contiguous and not a lazily negated view "
                                     "(is_neg())")

    def run(self, lists, thr, *, ptrs=None, modes=("never",), alpha, K, clip_coef0,
            clip_coef1, scale_formula, delta, r_min, r_max) -> torch.Tensor:
        """Launch over the per-call gradient lists ``lists`` (each one tensor per param: (g1,), or (g0, g1) with a
        per-call g0; None for the plain move). ``ptrs``: their addresses when the caller already read them
        (``_addresses(*lists)``, or their int64 bytes: see ``_as_array``); ``modes``: the dtype handling of each
        list (see ``_call_offsets``)."""
        # every group's launch is prepared (its per-call checks, offsets, copies and output buffer) before the
        # first launch writes: an exception there (an allocation failing, a misaligned list) leaves every
        # tensor as it was, rather than some dtype groups moved and others not
        launches, keep = [], []
        fast = None
        if lists is not None and ptrs is None and self.grad_offsets is not None:
            fast = self._fast_offsets(lists)
        if lists is not None and ptrs is None and fast is None and self.tails is not None:
            ptrs = self._checked_addresses(lists)
            # every tensor has the dtype its group reads (checked): no dtype scan; else the Python-level checks,
            # and each list's dtypes scanned (a gradient in another dtype is read from a copy, never misread)
            modes = ("never",) * len(lists) if ptrs is not None else ("always",) * len(lists)
        for grp in self.groups:
            align = grp["align"]
            bp, bt0, bl = (ref() for ref in grp["bases"])
            if bp is None or bt0 is None or bl is None:   # (the owner of the plan holds them: never expected)
                raise RuntimeError("extrapolate_: a tensor the launch plan was built for has been freed")
            if fast is not None:
                per, copies = fast, None
            elif lists is not None:
                if grp["whole"]:
                    gl, gp = lists, ptrs if ptrs is not None else _addresses(*lists)
                else:
                    idx = grp["idx"]
                    gl = [[ts[i] for i in idx] for ts in lists]
                    gp = _as_array(ptrs, len(lists))[:, idx].tobytes() if isinstance(ptrs, bytes) \
                        else _addresses(*gl)
                per, copies = self._call_offsets(grp, gl, gp, modes)
            if lists is not None:
                if copies is not None:
                    keep.append(copies)   # alive until the launch below
                if self.g0_per_call:
                    (base_g0, g0_off, a0), (base_g1, g1_off, a1) = per
                else:
                    ((base_g1, g1_off, a1),), ((base_g0, g0_off), a0) = per, (grp["g0"], align)
                align = min(align, a0, a1)
                g0dt, g1dt = base_g0.dtype, base_g1.dtype
            else:   # unused by the kernel
                base_g0 = base_g1 = bp
                g0dt = g1dt = torch.float32
                g0_off = g1_off = grp["numel_tab"]
            n_chunks, grid = grp["n_chunks"], grp["grid"]
            out = torch.empty((grid, 12), dtype=torch.float64, device=self.device)  # the store upcasts
            thr_tab = grp["numel_tab"] if thr is None else thr if grp["whole"] else thr.index_select(0, grp["idx_t"])
            launches.append((grp, grid, out,
                             (bp, bt0, base_g0, base_g1, bl, grp["off_tab"], g0_off, g1_off, grp["numel_tab"], thr_tab,
                              grp["c_t"], grp["c_s"], n_chunks, out, float(alpha), float(clip_coef0),
                              float(clip_coef1), float(delta), float(r_min), float(r_max), K / 2 + 1.0),
                             dict(K=int(K), G0_DT=_TL_DTYPES[g0dt], G1_DT=_TL_DTYPES[g1dt], HAS_GRAD=lists is not None,
                                  USE_INACTIVE=thr is not None, CLOSED=scale_formula == "closed", ALIGN=align,
                                  **grp["const"])))
        done = []
        for grp, grid, out, args, kw in launches:
            try:
                _extrapolate_kernel[(grid,)](*args, **kw)
            except BaseException as e:
                # a launch that fails (a compile error, an interrupt during the first call's JIT compilation)
                # after another group's launch cannot be undone without a copy of θ2: say which tensors moved
                if done:
                    e.add_note(f"extrapolate_: the launch of the dtype group {grp['dtypes'][0]} failed after the "
                               f"params (and lowp_out) at indices {sorted(i for g in done for i in g['idx'])} were "
                               "already overwritten with θ̃; the others still hold θ2")
                raise
            done.append(grp)
        return _combine([out for _, _, out, _, _ in launches], self.device)


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    d = t.data_ptr() - base.data_ptr()
    if d % t.element_size():
        raise ValueError("extrapolate_: tensors of one dtype group are not element-aligned to each other")
    return d // t.element_size()


def _alignment(tensors, numels, min_elsize) -> int:
    """ALIGN in elements: 16 bytes of the smallest dtype when every tensor starts on a 16-byte boundary and every
    numel is a multiple of it (then each list's accesses can be 16 bytes wide), else 1. For a wider dtype in the
    same launch the hint claims more than 16 bytes (8 fp32 elements of a bf16 group are 32), but no access is
    wider than 16 bytes (4 elements per thread, split into 16-byte pieces), so 16-byte alignment is all it uses."""
    a = 16 // min_elsize
    if all(t.data_ptr() % 16 == 0 for t in tensors) and all(n % a == 0 for n in numels):
        return a
    return 1


def _extrapolate_triton(params, theta0, g0, g1, lowp_out, thr, **kw) -> torch.Tensor:
    """The Triton launch of already validated lists, planned for this call only (the public op caches its plans
    per layout, ``_Layout``)."""
    has_grad = g1 is not None
    plan = _Plan(params, theta0, None, lowp_out, has_grad, g0_per_call=True,
                 g0_dtypes=list(map(_DTYPE, g0)) if has_grad else None)
    return plan.run((g0, g1) if has_grad else None, thr, modes=("never", "always"), **kw)


class ExtrapolationPlan:
    """``extrapolate_`` prepared for repeated calls over the same params / theta0 / g0 / lowp_out (an update rule's
    parameters and buffers): everything about these lists is validated and tabulated once, so a call only reads
    g1's addresses (fresh gradient tensors every pass) and launches.

    ``plan(g1, alpha=..., K=..., ...)`` takes the remaining arguments of ``extrapolate_`` and returns its stats.
    ``g0="per_call"``: g0 is not fixed either (a rule that keeps pass 0's gradient tensors rather than copying
    them): pass it on every call, ``plan(g1, g0=..., ...)``; its addresses are read per call like g1's (one pass
    over both lists, one offsets copy to the device).
    Contract: the static lists and their tensors stay as they were (same objects, same storage; rebuild the
    plan after ``model.to(...)``, reallocated buffers, a changed parameter set: on CUDA a call raises
    ``ValueError`` when the first tensor of a dtype group has moved or changed dtype or size, which
    ``model.to(...)`` does; a change to another tensor alone goes unnoticed), and g1[i] (and a per-call g0[i])
    is the gradient of params[i]. On CUDA every call checks each gradient's numel, contiguity, neg bit
    (``is_neg()``), device and dtype, with the C++ extension in one compiled pass per list (``tensor_records``, a
    few µs for hundreds of tensors, compared with the bytes a valid list has): ``ValueError`` (``TypeError`` for
    a non-tensor or a non-float dtype) naming a tensor that fails, before anything is written (overlap with the params is not checked: ``extrapolate_`` does that).
    Without the extension only the count and the addresses are checked per call. Gradients whose dtypes differ
    within a list are read right (from copies, see ``_Plan._call_offsets``); without the extension the plan scans
    their dtypes on every call (one attribute read per tensor) unless ``grads_are_param_dtype=True`` promises that
    g1[i] (and a per-call g0[i]) has params[i]'s dtype, as ``p.grad`` always has (the update rules pass it). On
    the CPU the plan calls the C++ op directly (it checks every tensor's device, contiguity, numel and neg bit
    itself at negligible cost); with ``backend="torch"`` it forwards to ``extrapolate_``.
    """

    def __init__(self, params, theta0, g0=None, lowp_out=None, *, backend: str = "auto",
                 grads_are_param_dtype: bool = False):
        self._check_dtypes = "never" if grads_are_param_dtype else "always"
        self.g0_per_call = isinstance(g0, str)
        if self.g0_per_call and g0 != "per_call":
            raise ValueError(f"g0 must be a list of tensors, None or 'per_call', got {g0!r}")
        g0_fixed = None if self.g0_per_call else g0
        _validate(params, theta0, g0_fixed, g0_fixed, lowp_out, 0.5, 2, "horner")
        self.params, self.theta0, self.g0, self.lowp_out = list(params), list(theta0), g0_fixed, lowp_out
        self.has_grad = g0 is not None
        self.backend = extrapolate_backend(backend, params[0].device) if len(params) else "torch"
        self._plan = _Plan(params, theta0, g0_fixed, lowp_out, self.has_grad, self.g0_per_call) \
            if self.backend == "triton" and len(params) else None
        self._modes = (self._check_dtypes,) * (2 if self.g0_per_call else 1)

    def _take_lists_(self, params, theta0, g0=None) -> bool:
        """Take a call's tensor objects for the static lists where the plan reads them per call (the C++ op, the
        PyTorch paths), when the caller has checked that they are the memory the plan was built for (the update
        rules' key on their records): the op then works on the memory passed now even when the storage under the
        tensors the plan was built with has moved in place since (``share_memory_``, a storage ``resize_``) and
        other memory came at the old addresses. ``g0``: a static g0's tensors, None to keep them. The Triton plan
        launches on the base tensors it holds: nothing to take there, and when they moved (``_Plan.moved``, a few
        attribute reads) it returns False, as the plan cannot write the memory passed now: build a new one (a
        call would raise ValueError). True otherwise."""
        if self._plan is None:
            self.params, self.theta0 = list(params), list(theta0)
            if g0 is not None and not self.g0_per_call:
                self.g0 = list(g0)
            return True
        return not self._plan.moved()

    def __call__(self, g1, *, g0=None, alpha: float, K: int, clip_coef0: float = 1.0, clip_coef1: float = 1.0,
                 scale_formula: str = "horner", inactive_threshold: Optional[float] = None, delta: float = 1e-8,
                 r_min: float = -2.0, r_max: float = 3.0) -> torch.Tensor:
        if (g0 is not None) != self.g0_per_call:
            raise ValueError("ExtrapolationPlan: pass g0 on every call exactly when the plan was built with "
                             "g0='per_call'")
        g0 = g0 if self.g0_per_call else self.g0
        if self._plan is None and self.backend != "cpp":
            return extrapolate_(self.params, self.theta0, g0, g1, lowp_out=self.lowp_out, backend=self.backend,
                                alpha=alpha, K=K, clip_coef0=clip_coef0, clip_coef1=clip_coef1,
                                scale_formula=scale_formula, inactive_threshold=inactive_threshold, delta=delta,
                                r_min=r_min, r_max=r_max)
        n = len(self.params)
        if (g1 is None) != (not self.has_grad) or (g1 is not None and len(g1) != n) or \
                (self.g0_per_call and len(g0) != n):
            raise ValueError("ExtrapolationPlan: g1 (and a per-call g0) must have one tensor per param (None iff "
                             "the plan has no g0)")
        _check_scalars(alpha, K, scale_formula, delta, r_min, r_max, clip_coef0, clip_coef1)
        thr = None
        if inactive_threshold is not None and g0 is not None:
            if not float(inactive_threshold) >= 0:
                raise ValueError(f"inactive_threshold must be >= 0, got {inactive_threshold!r}")
            thr = _thresholds(g0, float(inactive_threshold))
        kw = dict(alpha=float(alpha), K=K, clip_coef0=float(clip_coef0), clip_coef1=float(clip_coef1),
                  scale_formula=scale_formula, delta=float(delta), r_min=float(r_min), r_max=float(r_max))
        if self._plan is None:   # C++: the op checks every tensor's device, contiguity and numel itself
            from ._cpp import extrapolate_cpp_
            out = extrapolate_cpp_(self.params, self.theta0, g0, g1, self.lowp_out, thr, **kw)
            if out is not None:
                return out
            return extrapolate_ref_(self.params, self.theta0, g0, g1, lowp_out=self.lowp_out,
                                    thresholds=None if thr is None else thr.tolist(), **kw)
        if self._plan.moved():
            raise ValueError("ExtrapolationPlan: a parameter or buffer the plan was built for moved or changed "
                             "dtype or size since (model.to(...), p.data = ...); build a new plan")
        lists = None if g1 is None else (g0, g1) if self.g0_per_call else (g1,)
        return self._plan.run(lists, thr, modes=self._modes, **kw)


def _combine(parts: Sequence[torch.Tensor], device) -> torch.Tensor:
    if not parts:
        st = torch.zeros(N_STATS, dtype=torch.float64, device=device)
        st[-1] = 1.0
        return st
    allp = parts[0] if len(parts) == 1 else torch.cat(list(parts), 0)
    st = allp.sum(0)                # the last column's sum is overwritten by its max (fewer ops than a cat)
    st[-1] = allp[:, -1].max()
    return st


def stats_to_dict(stats: torch.Tensor) -> dict:
    """Name the entries of a stats vector (host floats). ``stats``: the (len(STAT_NAMES),) vector ``extrapolate_``
    returns (or its reduction across ranks)."""
    if not isinstance(stats, torch.Tensor) or stats.shape != (N_STATS,):
        # zip would silently drop the names past a shorter vector (or pair them with rows of a 2-D one)
        raise ValueError(f"stats must be a ({N_STATS},) tensor ({', '.join(STAT_NAMES)}), got "
                         f"{tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__}")
    if not (stats.dtype is torch.float64 and stats.is_cpu):   # (what the CPU op returns: read it as it is)
        stats = stats.double().cpu()
    return dict(zip(STAT_NAMES, stats.tolist()))


def _check_list(x, name, n):
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(x).__name__}")
    if len(x) != n:
        raise ValueError(f"{name} must have {n} tensors (one per param), got {len(x)}")


def _check_scalars(alpha, K, scale_formula, delta=1e-8, r_min=-2.0, r_max=3.0, clip_coef0=1.0,
                   clip_coef1=1.0) -> None:
    if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= MAX_K:
        raise ValueError(f"K must be an int in [2, {MAX_K}], got {K!r}")
    for name, c in (("clip_coef0", clip_coef0), ("clip_coef1", clip_coef1)):
        # a negative coefficient flips ĝ's sign, and so r's, without an error
        if isinstance(c, bool):
            raise TypeError(f"{name} must be a number, got {c!r}")
        if not 0 <= float(c) < math.inf:
            raise ValueError(f"{name} must be finite and >= 0 (a clip coefficient min(1, c / ‖g‖)), got {c!r}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if scale_formula not in SCALE_FORMULAS:
        raise ValueError(f"scale_formula must be one of {SCALE_FORMULAS}, got {scale_formula!r}")
    # a NaN guard or clamp would not even be NaN alike: the reference's max(|g0|, NaN) is NaN, the kernels'
    # comparison with NaN keeps |g0|
    if not (math.isfinite(float(delta)) and float(delta) >= 0):
        raise ValueError(f"delta must be finite and >= 0, got {delta!r}")
    if not float(r_min) <= float(r_max):   # (False for a NaN too)
        raise ValueError(f"r_min <= r_max is required (either may be infinite, neither NaN), got r_min={r_min!r}, "
                         f"r_max={r_max!r}")


def _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula, guards=()):
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
    _check_scalars(alpha, K, scale_formula, *guards)
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
            if t.is_neg():   # its memory holds the un-negated values, which the kernels would read or write
                raise ValueError(f"{name}[{i}] is a lazily negated view (is_neg(), e.g. from z.conj().imag); pass "
                                 "a tensor without a pending negation (x.resolve_neg() for a read-only input)")
    _check_no_alias(params, theta0, g0, g1, lowp_out)


def _check_no_alias(params, theta0, g0, g1, lowp_out) -> None:
    """Refuse a written tensor (params, lowp_out) whose memory overlaps any other tensor of the call: the move
    would be applied twice, or read after it was written (e.g. one tensor passed twice, params[i] a view of
    theta0[j], two params sharing storage). Read-only inputs may share memory with each other."""
    spans = []   # (start, end, written, name) byte ranges; every tensor is contiguous here
    lists = [("params", params, True), ("theta0", theta0, False), ("g0", g0, False), ("g1", g1, False),
             ("lowp_out", lowp_out, True)]
    for name, ts, written in lists:
        if ts is None:
            continue
        for i, t in enumerate(ts):
            if t is not None and t.numel():
                a = t.data_ptr()
                spans.append((a, a + t.numel() * t.element_size(), written, f"{name}[{i}]"))
    spans.sort()
    reach, owner = -1, None   # furthest end so far and the span that reaches it
    for a, e, w, nm in spans:
        if owner is not None and a < reach and (w or owner[1]):
            raise ValueError(f"extrapolate_: {nm} overlaps {owner[0]} in memory; the in-place move needs "
                             "distinct, non-overlapping tensors (pass a copy)")
        if e > reach:
            reach, owner = e, (nm, w)


# The public op's layout cache ----------------------------------------------------------------------------------

_LAYOUTS: "OrderedDict[tuple, _Layout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 8


_NONE_ID = id(None)
_CODES: dict = {}   # the records' dtype codes (c10's scalar type numbers) -> the float dtypes the op takes
_CODE_OF: dict = {}   # and back


def _record_reader():
    """``tensor_records`` of the C++ extension (``extrapolate_cpu.cpp``): the id, data_ptr, numel, dtype,
    contiguity and device of every tensor of a list in one compiled pass, as one bytes object. None when the
    extension cannot be built: the checks then read each attribute with a Python-level pass (the same checks,
    slower). Asked when a layout is cached (building the extension on first use, as the CPU op does)."""
    from ._cpp import load_extension
    fn = getattr(load_extension(), "tensor_records", None)
    if fn is not None and not _CODES:
        # (the codes are c10's enum, read here rather than written down); both tables are filled at once, after
        # every code was read: a table left half-filled by an exception would refuse the other dtypes for good
        code_of = {dt: int(np.frombuffer(fn([torch.empty(0, dtype=dt)], False), np.int64)[2]) & 255
                   for dt in _TL_DTYPES}
        _CODE_OF.update(code_of)
        _CODES.update({code: dt for dt, code in code_of.items()})
    return fn


def _ids_ptrs(ts) -> tuple:
    """ids and data_ptrs of a list whose entries may be None (lowp_out): one C-level pass each when none is."""
    ids = list(map(id, ts))
    if _NONE_ID in ids:
        return ids, [0 if t is None else t.data_ptr() for t in ts]
    return ids, list(map(_PTR, ts))


def _static_meta(ts, ids: list) -> tuple:
    """The dtypes, the numels, whether all are contiguous and whether any is a negated view, of a list whose entries
    may be None (their ``ids``), in C-level passes: what the full validation checked of a tensor that it can
    change in place."""
    if _NONE_ID in ids:
        ts = [t for t in ts if t is not None]
    return list(map(_DTYPE, ts)), list(map(_NUMEL, ts)), all(map(_CONTIG, ts)), any(map(_IS_NEG, ts))


def _same_grads_meta(ts, numels: list, dt) -> bool:
    """Whether a watched gradient list still has the numels, contiguity, no neg bit and dtype pattern ``dt`` (one
    dtype or a tuple of one per tensor) it passed the checks with: a live tensor can change them at the same
    address."""
    if list(map(_NUMEL, ts)) != numels or not all(map(_CONTIG, ts)) or any(map(_IS_NEG, ts)):
        return False
    return tuple(map(_DTYPE, ts)) == dt if isinstance(dt, tuple) else set(map(_DTYPE, ts)) == {dt}


class _Layout:
    """The validated static lists of ``extrapolate_`` calls: params, theta0 and lowp_out (an optimizer's
    parameters and snapshot buffers; g0 and g1 come per call). A later call is served from here when the ids
    and addresses of all their tensors are the ones validated (``matches``); the entry leaves the cache as soon
    as one of those tensors is freed (a new tensor can inherit an id and an address, with other numel, dtype or
    alignment). It holds the numels and device the gradients are checked against, the byte spans of the written
    tensors (a gradient must not overlap them), the Triton plans (one per g0 dtype pattern, ``plan``), and per
    gradient list the last one that passed the checks (``seen``, see ``_check_grads``). A live tensor can also
    change in place while keeping its id and address (``resize_``, ``p.data = p.data.view(torch.bfloat16)``,
    ``set_`` onto the same storage offset, a new storage the allocator placed where the old one was): each
    static tensor's dtype, numel and contiguity are compared too (``_static_meta``), or the plans would read
    and write it in its old dtype and length. With the C++ extension all of it (ids, addresses, dtypes, numels,
    contiguity, devices) is read in one compiled pass per list (``tensor_records``) and compared as one bytes
    object (``recs``); without it, with Python-level passes (``lists``, ``metas``)."""

    def __init__(self, key, params, theta0, lowp_out):
        statics = (params, theta0) if lowp_out is None else (params, theta0, lowp_out)
        self.records = _record_reader()
        recs = None if self.records is None else [self.records(ts, True) for ts in statics]
        if recs is not None and None not in recs:   # compiled: one pass per list reads all of it
            self.recs, self.lists, self.metas = recs, None, None
            # a gradient's meta without its dtype: contiguous, no neg bit, on the params' device (params[0] is one)
            self.grad_meta = int(np.frombuffer(recs[0], np.int64)[3 * len(params)]) >> 8
            self.grad_tails = {}   # dtype -> the numels and metas columns of a gradient list of that dtype
        else:
            self.recs = self.records = None
            self.lists = [_ids_ptrs(ts) for ts in statics]
            self.metas = [_static_meta(ts, ids) for (ids, _), ts in zip(self.lists, statics)]
        self.numels = list(map(_NUMEL, params))
        self.numel_np = np.array(self.numels, dtype=np.int64)
        self.device = params[0].device
        spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
                       for ts in (params, lowp_out or ()) for p in ts if p is not None and p.numel())
        self.w_lo = np.array([s for s, _ in spans], dtype=np.int64)   # disjoint (validated): ends sorted too
        self.w_hi_before = np.array([-1] + [e for _, e in spans], dtype=np.int64)   # [i]: the end of span i - 1
        self.nonempty = None if all(self.numels) else self.numel_np > 0
        self.plans = {}
        self.seen = {"g0": None, "g1": None}
        self.seen_records = {"g0": None, "g1": None}   # (records, addresses, dtype pattern): _check_grad_records

        # the callback knows this entry by a token, not by itself: no reference cycle keeps an evicted entry (and
        # the tensors its plans hold) alive until the next garbage collection
        self.token = token = object()

        def drop(_ref, key=key, token=token, cache=_LAYOUTS):
            if getattr(cache.get(key), "token", None) is token:
                del cache[key]
        self.watch = [weakref.ref(t, drop) for ts in (params, theta0, lowp_out) if ts is not None
                      for t in ts if t is not None]

    def matches(self, params, theta0, lowp_out) -> bool:
        if self.recs is not None:   # ids, addresses and what they hold, read in one compiled pass per list
            rd = self.records
            return all(rd(ts, True) == r for r, ts in zip(self.recs, (params, theta0, lowp_out)))
        for (ids, ptrs), ts in zip(self.lists, (params, theta0, lowp_out)):
            if list(map(id, ts)) != ids:
                return False
        # the same live objects (ids of freed tensors drop the entry), now their storage: no None unless validated
        for (ids, ptrs), ts in zip(self.lists, (params, theta0, lowp_out)):
            if (list(map(_PTR, ts)) if _NONE_ID not in ids else _ids_ptrs(ts)[1]) != ptrs:
                return False
        # and what they hold there (changed in place at the same address: see the class docstring)
        for (ids, _), meta, ts in zip(self.lists, self.metas, (params, theta0, lowp_out)):
            if _static_meta(ts, ids) != meta:
                return False
        return True

    def plan(self, has_grad: bool, g0_dtypes, params, theta0, lowp_out) -> _Plan:
        """The plan for gradients whose g0 has ``g0_dtypes`` (one dtype, or a tuple of one per tensor)."""
        key = (has_grad, g0_dtypes)
        plan = self.plans.get(key)
        if plan is None:
            dts = None if not has_grad else g0_dtypes if isinstance(g0_dtypes, tuple) else \
                [g0_dtypes] * len(params)
            plan = self.plans[key] = _Plan(params, theta0, None, lowp_out, has_grad, g0_per_call=True,
                                           g0_dtypes=dts)
        return plan

    def overlaps_written(self, a: np.ndarray, nbytes: np.ndarray) -> bool:
        """Whether any span [a, a + nbytes) (one per param: nbytes > 0 where its numel is) overlaps a written
        tensor: the last written span that starts before the end reaches past the start."""
        if not self.w_lo.size:
            return False
        hit = self.w_hi_before[np.searchsorted(self.w_lo, a + nbytes, side="left")] > a
        return bool(hit.any() if self.nonempty is None else hit[self.nonempty].any())

    def grad_tail(self, dt: torch.dtype) -> tuple:
        """The numels and metas columns of ``tensor_records`` for a valid gradient list of dtype ``dt`` (bytes),
        and its tensors' byte sizes."""
        tail = self.grad_tails.get(dt)
        if tail is None:
            meta = self.grad_meta << 8 | _CODE_OF[dt]
            tail = self.grad_tails[dt] = (self.numel_np.tobytes() + np.full(len(self.numels), meta, np.int64).tobytes(),
                                          self.numel_np * dt.itemsize)
        return tail


def _check_grads(lay: _Layout, name: str, ts) -> Optional[tuple]:
    """The per-call checks of a gradient list (g0 or g1) of a validated layout, as C-level passes: one tensor per
    param, same numels, contiguous, float dtypes, the params' device, no overlap with a written tensor. Returns
    (addresses: a list, or int64 bytes from the records; dtype pattern: one dtype or a tuple of one per tensor),
    or None when a check fails (the caller then runs the per-tensor validation, which names the offender). With
    the C++ extension the attributes come from one compiled pass (``_check_grad_records``); what follows is the
    Python-level path.

    A list that passed stays in ``lay.seen[name]`` (addresses; ids once they repeat); a later list with the same
    ids and addresses is that one, unchanged, once it is watched: when it comes back, it is checked once more
    and weak references are taken whose callbacks forget it when any of its tensors is freed; from then on its
    ids and addresses are read, and its numels, contiguity and dtypes compared (a live tensor can change them in
    place at the same address, as the layout's can: ``_same_grads_meta``). Gradient tensors at new addresses on
    every call cost no ids pass and no weak references."""
    if not isinstance(ts, (list, tuple)) or isinstance(ts, torch.Tensor) or len(ts) != len(lay.numels):
        return None
    if lay.records is not None:
        rec = lay.records(ts, False)
        if rec is not None:
            return _check_grad_records(lay, name, ts, rec)
    try:
        ptrs = _addresses(ts)
    except TypeError:   # not a tensor
        return None
    seen = lay.seen[name]
    ids = None
    if seen is not None and seen[1] == ptrs:   # (ids only where the addresses repeat)
        ids = list(map(id, ts))
        if seen[0] == ids:
            if seen[3] is not None and _same_grads_meta(ts, lay.numels, seen[2]):
                return ptrs, seen[2]   # watched: these very tensors passed, none was freed or changed since
            # second appearance: check again (the first objects may have died and left their ids), then watch;
            # or a watched tensor changed in place: check again
            found = _check_grads_now(lay, ts, ptrs)
            if found is not None:
                seen[2] = found
                if seen[3] is None:
                    _watch_seen(lay, name, ts, seen)
            return None if found is None else (ptrs, found)
    found = _check_grads_now(lay, ts, ptrs)
    lay.seen[name] = None if found is None else [ids, ptrs, found, None]
    return None if found is None else (ptrs, found)


def _check_grad_records(lay: _Layout, name: str, ts, rec: bytes) -> Optional[tuple]:
    """``_check_grads`` from a list's records (``tensor_records``: addresses, numels, metas): the same checks on
    what one compiled pass read. Their outcome depends on nothing else of the tensors, so a list whose records
    equal those of the last list that passed (``lay.seen_records[name]``) passes as it is: the same tensors, or
    others at the same addresses with the same numels, dtypes, contiguity and device (no ids, no weak
    references). The addresses returned are the records' first column (int64 bytes, see ``_as_array``)."""
    seen = lay.seen_records[name]
    if seen is not None and seen[0] == rec:
        return seen[1], seen[2]
    n = len(lay.numels)
    a = np.frombuffer(rec, np.int64)
    dt = _CODES.get(int(a[2 * n]) & 255)
    tail = None if dt is None else lay.grad_tail(dt)
    if tail is not None and rec[8 * n:] == tail[0]:   # one dtype, every numel and meta as they must be
        nbytes = tail[1]
    else:   # a check fails, or (rarely) the list mixes dtypes
        metas = a[2 * n:]
        if not (np.array_equal(a[n:2 * n], lay.numel_np) and ((metas >> 8) == lay.grad_meta).all()):
            return None   # a numel, the contiguity or the device differs
        dt = tuple(map(_CODES.get, (metas & 255).tolist()))
        if None in dt:
            return None
        nbytes = lay.numel_np * np.fromiter((d.itemsize for d in dt), np.int64, n)
    if lay.overlaps_written(a[:n], nbytes):
        return None
    ptrs = rec[:8 * n]
    lay.seen_records[name] = (rec, ptrs, dt)
    return ptrs, dt


def _check_grads_now(lay: _Layout, ts, ptrs: list):
    if list(map(_NUMEL, ts)) != lay.numels or not all(map(_CONTIG, ts)) or any(map(_IS_NEG, ts)):
        return None
    kinds = set(map(_DTYPE, ts))
    if not kinds <= _TL_DTYPES.keys() or set(map(_DEVICE, ts)) != {lay.device}:
        return None
    if len(kinds) == 1:
        dt = kinds.pop()
        nbytes = lay.numel_np * dt.itemsize
    else:   # (a second pass, for the rare list that mixes dtypes)
        dt = tuple(map(_DTYPE, ts))
        nbytes = lay.numel_np * np.fromiter((d.itemsize for d in dt), np.int64, len(dt))
    return None if lay.overlaps_written(np.array(ptrs, dtype=np.int64), nbytes) else dt


def _watch_seen(lay: _Layout, name: str, ts, seen: list) -> None:
    def forget(_ref, slots=lay.seen, name=name, seen=seen):   # (not the layout: see _Layout's token)
        if slots[name] is seen:
            slots[name] = None
    seen[3] = list(map(weakref.ref, ts, itertools.repeat(forget)))


def _layout_for(params, theta0, lowp_out) -> Optional[_Layout]:
    """The cached layout of these static lists, or None (not seen, or not the same tensors and addresses)."""
    if not (isinstance(params, (list, tuple)) and isinstance(theta0, (list, tuple)) and
            (lowp_out is None or isinstance(lowp_out, (list, tuple)))) or not len(params) or not len(theta0):
        return None
    key = (len(params), id(params[0]), id(theta0[0]), lowp_out is not None)
    lay = _LAYOUTS.get(key)
    if lay is None or not lay.matches(params, theta0, lowp_out):
        return None
    _LAYOUTS.move_to_end(key)   # least recently used first out: a layout in use outlives passing ones
    return lay


def _new_layout(params, theta0, lowp_out) -> _Layout:
    key = (len(params), id(params[0]), id(theta0[0]), lowp_out is not None)
    lay = _LAYOUTS[key] = _Layout(key, params, theta0, lowp_out)
    _LAYOUTS.move_to_end(key)
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return lay


def _validated(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula, guards=()) -> tuple:
    """Validate a call; returns (layout or None for no params, per-call gradient info: None for the plain move,
    else ((addresses g0, dtype pattern of g0), (addresses g1, dtype pattern of g1))).

    A call whose static lists are a cached layout's (same tensors at the same addresses, see ``_Layout``) checks
    only the scalars and the gradient lists (``_check_grads``: C-level passes, or ids and addresses for a list
    seen before); anything else, or any failed check, runs the full per-tensor validation, which raises naming
    the offending tensor or value, and caches the layout."""
    lay = _layout_for(params, theta0, lowp_out)
    if lay is not None and (g0 is None) == (g1 is None):
        _check_scalars(alpha, K, scale_formula, *guards)
        if g1 is None:
            return lay, None
        c0 = _check_grads(lay, "g0", g0)
        c1 = _check_grads(lay, "g1", g1) if c0 is not None else None
        if c1 is not None:
            return lay, (c0, c1)
    _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula, guards)
    if not len(params):
        return None, None
    lay = _new_layout(params, theta0, lowp_out)
    if g1 is None:
        return lay, None
    c0, c1 = _check_grads(lay, "g0", g0), _check_grads(lay, "g1", g1)
    if c0 is None or c1 is None:   # an internal inconsistency, never a reason to launch on unchecked lists
        raise RuntimeError("extrapolate_: the per-call gradient checks refused lists that the full validation "
                           "accepted")
    return lay, (c0, c1)


def extrapolate_backend(backend: str, device) -> str:
    """The backend ``extrapolate_`` runs for ``backend`` on ``device`` ("auto": CUDA -> triton, CPU -> cpp)."""
    return resolve_backend(backend, device, choices=EXTRAPOLATE_BACKENDS, cpu="cpp", interpret=False)


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
        delta, r_min, r_max: δ of the denominator guard and the clamp of r (defaults 1e-8, −2, 3).
        backend: "auto" (CUDA -> triton, CPU -> cpp), "triton", "cpp" or "torch" (the reference loop).
        Every tensor must be contiguous, of a float dtype, on one device and not a lazily negated view
        (``is_neg()``; pass ``x.resolve_neg()``), and a written tensor (params, lowp_out) must not overlap any
        other: ``ValueError`` naming it otherwise (``TypeError`` for a dtype), before anything is written.
    Returns:
        float64 tensor [len(STAT_NAMES)] on the params' device: sums over all coordinates (r, r², scale,
        ‖θ2−θ0‖², ‖scale⊙(θ2−θ0)‖², ĝ0·ĝ1, ‖ĝ0‖², ‖ĝ1‖², inactive count, non-finite count, numel) and, last,
        max scale. Reduce [:-1] with SUM and [-1] with MAX across ranks. The non-finite count: coordinates where
        ĝ0, ĝ1 or θ̃ as written (in the param's and lowp_out's dtype: a 16-bit store may overflow) is not finite.
    Example:
        >>> stats = extrapolate_(params, theta0_bufs, g0_bufs, [p.grad for p in params], alpha=0.5, K=5)
        >>> stats_to_dict(stats)["max_scale"]
    """
    lay, grads = _validated(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula,
                            (delta, r_min, r_max, clip_coef0, clip_coef1))
    if lay is None:
        return _combine([], torch.device("cpu"))
    be = extrapolate_backend(backend, lay.device)
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
        if grads is None:
            return lay.plan(False, None, params, theta0, lowp_out).run(None, thr, **kw)
        (p0, dt0), (p1, dt1) = grads
        # g0's dtype pattern picks the plan (its groups split by it, so each reads one dtype); g1 may mix
        # dtypes within a group (read from copies then)
        plan = lay.plan(True, dt0, params, theta0, lowp_out)
        # (addresses as records' bytes or as lists; one of each when one list was read in Python: read again)
        return plan.run((g0, g1), thr, ptrs=p0 + p1 if type(p0) is type(p1) else None,
                        modes=("never", "always" if isinstance(dt1, tuple) else "never"), **kw)
    return extrapolate_ref_(params, theta0, g0, g1, lowp_out=lowp_out,
                            thresholds=None if thr is None else thr.tolist(), **kw)


def _thresholds(g0: Sequence[torch.Tensor], rel: float) -> torch.Tensor:
    """Absolute per-tensor inactive thresholds rel·‖g0_t‖/sqrt(n_t) (0 for an empty tensor), [n] on the device
    without a host sync: float32, or float64 when a g0 tensor is float64 (its norm then taken in float64, as its
    coordinates are compared in float64). A handful of device ops whatever the number of tensors."""
    dt = torch.float64 if any(g.dtype == torch.float64 for g in g0) else torch.float32
    norms = torch._foreach_norm([g if g.dtype in (torch.float32, torch.float64) else g.float() for g in g0])
    scale = torch.tensor([rel / math.sqrt(g.numel()) if g.numel() else 0.0 for g in g0], dtype=torch.float64)
    return (torch.stack(norms).double() * scale.to(g0[0].device, non_blocking=True)).to(dt)
