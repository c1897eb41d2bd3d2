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
from .reference import N_STATS, SCALE_FORMULAS, STAT_INDEX, STAT_NAMES, extrapolate_ref_

__all__ = ["extrapolate_", "ExtrapolationPlan", "STAT_NAMES", "STAT_INDEX", "stats_to_dict"]

EXTRAPOLATE_BACKENDS = ("auto", "triton", "cpp", "torch")
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}
_MAX_PER_PROGRAM = 1 << 22  # keeps the fp32 per-program counts exact


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
    b_cnt = tl.zeros([BLOCK], C_DT)
    b_max = tl.full([BLOCK], 1.0, C_DT)
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
            if HAS_LOWP:   # L_MID_DT: float32 for a 16-bit copy of float64 params (torch's double -> half), else C_DT
                tl.store(p_l + o, b_new.to(L_MID_DT).to(L_DT), mask=m)
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

_PLAN_CACHE: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def _launch_config(device: torch.device):
    if triton_interpret() or device.type != "cuda":
        return 1024, 1024, 64          # BLOCK, CHUNK, max programs (interpreter: few big numpy ops)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 512, 16384, 8 * sms         # 512 x 4 warps: 4 fp32 per thread (one 16-byte access per list)


class _Plan:
    """The validated launch state of one (params, theta0, g0, lowp_out) layout: per dtype group the base tensors,
    the element-offset table, numels and chunk map on the device. Only g1's offsets change from call to call
    (gradients are fresh tensors every pass), and g0's too with ``g0_per_call`` (a rule that keeps pass 0's
    gradient tensors instead of copying them); everything else is built once."""

    def __init__(self, params, theta0, g0, lowp_out, has_grad: bool, g0_per_call: bool = False):
        self.device = params[0].device
        self.block, self.chunk, self.max_prog = _launch_config(self.device)
        self.lib_pow = not triton_interpret()
        self.g0_per_call = g0_per_call
        groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
        for i, p in enumerate(params):
            if p.numel() == 0:
                continue
            ldt = lowp_out[i].dtype if lowp_out is not None and lowp_out[i] is not None else None
            # a gradient has its parameter's dtype (torch enforces it), so per-call g0 groups by p.dtype
            g0dt = (p.dtype if g0_per_call else g0[i].dtype) if has_grad else None
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
            self.groups.append(dict(
                idx=idx, whole=idx == list(range(len(params))), dtypes=(pdt, t0dt, g0dt, ldt), bases=bases,
                idx_t=torch.tensor(idx, dtype=torch.int64).to(dev),   # gathers thresholds without a host copy
                numel_sum=sum(numels),
                off_tab=torch.tensor(list(zip(*offs)), dtype=torch.int64).to(dev),
                g0=(g0s[0], torch.tensor([_elem_offset(t, g0s[0]) for t in g0s], dtype=torch.int64).to(dev))
                if g0s is not None else None,
                numel_tab=torch.tensor(numels, dtype=torch.int64).to(dev),
                c_t=torch.tensor(c_t, dtype=torch.int32).to(dev), c_s=torch.tensor(c_s, dtype=torch.int64).to(dev),
                n_chunks=len(c_t), align=align))

    def _call_offsets(self, grp, slot: str, ts, check_dtypes: str = "on_change") -> tuple:
        """(base tensor, device element offsets, ALIGN, copies) of a list read on every call (gradients). The
        offsets are rebuilt only when the addresses change; ALIGN drops to 1 when a tensor is not 16-byte aligned.

        The kernel reads the whole list in the base tensor's dtype. Gradients of one dtype group share their
        params' dtype, but a list may mix dtypes (the public op accepts any float dtype per tensor): such a list
        is read from copies in the compute dtype, the value the kernel's load would upcast each element to. The
        copies are returned so that the caller keeps them alive until the launch. ``check_dtypes``: "always"
        (the caller saw mixed dtypes), "on_change" (check when the addresses change) or "never" (gradients of
        the params, which have their dtypes)."""
        if check_dtypes == "always" and len(set(map(_DTYPE, ts))) > 1:
            return self._mixed_offsets(grp, slot, ts)
        base = ts[0]
        esz = base.element_size()
        # list(map(...)) is one C-level pass; array("q", map(...)) measured twice as slow (per-item appends)
        ptrs = list(map(torch.Tensor.data_ptr, ts))
        last = grp.get(slot)
        if last is not None and last[0] == ptrs and last[1] == esz:
            return base, last[2], last[3], None   # the allocator handed out the same addresses again
        if check_dtypes == "on_change" and len(set(map(_DTYPE, ts))) > 1:
            return self._mixed_offsets(grp, slot, ts)
        addr = np.array(ptrs, dtype=np.int64)
        low = int(np.bitwise_or.reduce(addr))   # low bits of any address: alignment of all at once
        align = grp["align"]
        if low & 15:
            align = 1
            if low % esz:
                raise ValueError(f"extrapolate_: {slot} tensors must be aligned to their element size")
        # element offsets from ts[0], vectorised (ptrs stays intact for the next comparison)
        off = torch.from_numpy((addr - ptrs[0]) // esz).to(self.device, non_blocking=True)
        grp[slot] = (ptrs, esz, off, align)
        return base, off, align, None

    def _mixed_offsets(self, grp, slot: str, ts) -> tuple:
        cdt = torch.float64 if grp["dtypes"][0] == torch.float64 else torch.float32
        copies = [t.to(cdt) for t in ts]
        grp.pop(slot, None)   # the copies die after this call: a later list at their addresses is not them
        base, off, align, _ = self._call_offsets(grp, slot, copies, "never")
        grp.pop(slot, None)
        return base, off, align, copies

    def run(self, g1, thr, *, g0=None, alpha, K, clip_coef0, clip_coef1, scale_formula, delta, r_min, r_max,
            check_dtypes: str = "on_change"):
        parts = []
        for grp in self.groups:
            idx = grp["idx"]
            pdt, t0dt, g0dt, ldt = grp["dtypes"]
            align = grp["align"]
            bp, bt0, bl = grp["bases"]
            if g1 is not None:   # keep1, keep0: copies of a mixed-dtype list, alive until the launch below
                base_g1, g1_off, a1, keep1 = self._call_offsets(grp, "g1", g1 if grp["whole"] else
                                                                [g1[i] for i in idx], check_dtypes)
                if self.g0_per_call:
                    base_g0, g0_off, a0, keep0 = self._call_offsets(grp, "g0", g0 if grp["whole"] else
                                                                    [g0[i] for i in idx], check_dtypes)
                else:
                    (base_g0, g0_off), a0 = grp["g0"], align
                align = min(align, a0, a1)
                g0dt, g1dt = base_g0.dtype, base_g1.dtype
            else:   # unused by the kernel
                base_g0 = base_g1 = bp
                g1dt, g0_off, g1_off = None, grp["numel_tab"], grp["numel_tab"]
            n_chunks = grp["n_chunks"]
            grid = min(max(min(n_chunks, self.max_prog), -(-grp["numel_sum"] // _MAX_PER_PROGRAM)), n_chunks)
            cdt = torch.float64 if pdt == torch.float64 else torch.float32
            out = torch.empty((grid, 12), dtype=torch.float64, device=self.device)  # the store upcasts
            thr_tab = grp["numel_tab"] if thr is None else thr if grp["whole"] else thr.index_select(0, grp["idx_t"])
            _extrapolate_kernel[(grid,)](
                bp, bt0, base_g0, base_g1, bl, grp["off_tab"], g0_off, g1_off, grp["numel_tab"], thr_tab,
                grp["c_t"], grp["c_s"], n_chunks, out,
                float(alpha), float(clip_coef0), float(clip_coef1), float(delta), float(r_min), float(r_max),
                K / 2 + 1.0, K=int(K),
                P_DT=_TL_DTYPES[pdt], T0_DT=_TL_DTYPES[t0dt], G0_DT=_TL_DTYPES[g0dt or torch.float32],
                G1_DT=_TL_DTYPES[g1dt or torch.float32], L_DT=_TL_DTYPES[ldt or bl.dtype],
                L_MID_DT=tl.float32 if cdt == torch.float64 and ldt in (torch.bfloat16, torch.float16)
                else _TL_DTYPES[cdt], C_DT=_TL_DTYPES[cdt], HAS_GRAD=g1 is not None, HAS_LOWP=ldt is not None,
                USE_INACTIVE=thr is not None, CLOSED=scale_formula == "closed",
                LIB_POW=self.lib_pow, ALIGN=align, CHUNK=self.chunk, BLOCK=self.block,
                num_warps=4)
            parts.append(out)
        return _combine(parts, self.device)


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


def _plan_for(params, theta0, g0, lowp_out, key=None) -> "_Plan":
    """The cached plan of this layout: keyed by the identity and address of every tensor of the static lists,
    and dropped as soon as one of them is freed (a new tensor may inherit both). ``key``: the ``_layout_key``
    of these lists when the caller already has it."""
    if key is None:
        key = _layout_key(params, theta0, g0, lowp_out)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _Plan(params, theta0, g0, lowp_out, g0 is not None)
        plan.watch = _forget_when_freed(key, params, theta0, g0, lowp_out)
        _PLAN_CACHE[key] = plan
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return plan


def _extrapolate_triton(params, theta0, g0, g1, lowp_out, thr, key=None, check_dtypes="on_change",
                        **kw) -> torch.Tensor:
    return _plan_for(params, theta0, g0, lowp_out, key).run(g1, thr, check_dtypes=check_dtypes, **kw)


class ExtrapolationPlan:
    """``extrapolate_`` prepared for repeated calls over the same params / theta0 / g0 / lowp_out (an update rule's
    parameters and buffers): everything about these lists is validated and tabulated once, so a call only reads
    g1's addresses (fresh gradient tensors every pass) and launches.

    ``plan(g1, alpha=..., K=..., ...)`` takes the remaining arguments of ``extrapolate_`` and returns its stats.
    ``g0="per_call"``: g0 is not fixed either (a rule that keeps pass 0's gradient tensors rather than copying
    them): pass it on every call, ``plan(g1, g0=..., ...)``; its addresses are read per call like g1's.
    Contract: the static lists and their tensors stay as they were (same objects, same storage; rebuild the
    plan after ``model.to(...)``, reallocated buffers, a changed parameter set), and g1[i] (and a per-call g0[i])
    is the gradient of params[i] (same numel, contiguous; only the count and the addresses are checked per
    call). Gradients whose dtypes differ within a list are read right (from copies, see ``_Plan._call_offsets``):
    the plan scans their dtypes whenever their addresses change (one attribute read per tensor), unless
    ``grads_are_param_dtype=True`` promises that g1[i] (and a per-call g0[i]) has params[i]'s dtype, as
    ``p.grad`` always has (the update rules pass it). On the CPU the plan calls the C++ op directly (it checks
    every tensor's device, contiguity and numel itself at negligible cost); with ``backend="torch"`` it forwards
    to ``extrapolate_``.
    """

    def __init__(self, params, theta0, g0=None, lowp_out=None, *, backend: str = "auto",
                 grads_are_param_dtype: bool = False):
        self._check_dtypes = "never" if grads_are_param_dtype else "on_change"
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

    def __call__(self, g1, *, g0=None, alpha: float, K: int, clip_coef0: float = 1.0, clip_coef1: float = 1.0,
                 scale_formula: str = "horner", inactive_threshold: Optional[float] = None, delta: float = 1e-8,
                 r_min: float = -2.0, r_max: float = 3.0) -> torch.Tensor:
        if (g0 is not None) != self.g0_per_call:
            raise ValueError("ExtrapolationPlan: pass g0 on every call exactly when the plan was built with "
                             "g0='per_call'")
        g0 = g0 if self.g0_per_call else self.g0
        kw = dict(alpha=alpha, K=K, clip_coef0=clip_coef0, clip_coef1=clip_coef1, scale_formula=scale_formula,
                  inactive_threshold=inactive_threshold, delta=delta, r_min=r_min, r_max=r_max)
        if self._plan is None and self.backend != "cpp":
            return extrapolate_(self.params, self.theta0, g0, g1, lowp_out=self.lowp_out, backend=self.backend, **kw)
        n = len(self.params)
        if (g1 is None) != (not self.has_grad) or (g1 is not None and len(g1) != n) or \
                (self.g0_per_call and len(g0) != n):
            raise ValueError("ExtrapolationPlan: g1 (and a per-call g0) must have one tensor per param (None iff "
                             "the plan has no g0)")
        if isinstance(K, bool) or not isinstance(K, int) or K < 2 or scale_formula not in SCALE_FORMULAS:
            raise ValueError(f"K must be an int >= 2 and scale_formula one of {SCALE_FORMULAS}")
        if not math.isfinite(float(alpha)):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
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
        return self._plan.run(g1, thr, g0=g0, check_dtypes=self._check_dtypes, **kw)


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
    """Name the entries of a stats vector (host floats)."""
    if not (stats.dtype is torch.float64 and stats.is_cpu):   # (what the CPU op returns: read it as it is)
        stats = stats.double().cpu()
    return dict(zip(STAT_NAMES, stats.tolist()))


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
    _check_no_alias(params, theta0, g0, g1, lowp_out)


_VALIDATED: "OrderedDict[tuple, tuple]" = OrderedDict()
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")


def _validate_cached(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula) -> tuple:
    """``_validate`` once per layout of the static lists (params, theta0, g0, lowp_out: identity and address of
    every tensor, see ``_plan_for``); on later calls with the same layout only g1 (fresh gradients every pass)
    is checked: count, numel, contiguity, dtype, device. Returns the layout key (None for unkeyable input) so
    that the plan cache does not compute it again, and whether g1 mixes dtypes."""
    if isinstance(params, (list, tuple)) and isinstance(theta0, (list, tuple)) and \
            (g0 is None or isinstance(g0, (list, tuple))) and (lowp_out is None or isinstance(lowp_out, (list, tuple))):
        key = _layout_key(params, theta0, g0, lowp_out)
        hit = _VALIDATED.get(key)
        if hit is not None and (g0 is None) == (g1 is None):
            numels, dev, _ = hit
            if isinstance(K, bool) or not isinstance(K, int) or K < 2 or not math.isfinite(float(alpha)) or \
                    scale_formula not in SCALE_FORMULAS:
                _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula)   # raises, naming the value
            if g1 is None:
                return key, False
            if isinstance(g1, (list, tuple)) and len(g1) == len(numels) and \
                    list(map(torch.Tensor.numel, g1)) == numels and all(map(torch.Tensor.is_contiguous, g1)):
                dts = set(map(_DTYPE, g1))
                if dts <= _TL_DTYPES.keys() and set(map(_DEVICE, g1)) == {dev}:
                    return key, len(dts) > 1
    else:
        key = None
    _validate(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula)
    if key is not None and len(params):
        _VALIDATED[key] = ([p.numel() for p in params], params[0].device,
                           _forget_when_freed(key, params, theta0, g0, lowp_out))
        if len(_VALIDATED) > _PLAN_CACHE_SIZE:
            _VALIDATED.popitem(last=False)
    return key, g1 is not None and len(set(map(_DTYPE, g1))) > 1


def _forget_when_freed(key, *lists) -> list:
    """Weak references whose callbacks drop ``key`` from both layout caches once any tensor of ``lists`` is
    freed. A key is made of ids and addresses, which a new tensor can inherit (CPython reuses the object's memory,
    the allocator the data's); the stale entry would describe the freed tensor's numel, dtype and alignment.
    The cache entry holds the references (a reference that is itself freed never calls back)."""
    def drop(_ref):
        _VALIDATED.pop(key, None)
        _PLAN_CACHE.pop(key, None)
    return [weakref.ref(t, drop) for ts in lists if ts is not None for t in ts if t is not None]


def _layout_key(params, theta0, g0, lowp_out) -> tuple:
    lists = [params, theta0] + ([g0] if g0 is not None else [])
    key = (g0 is not None, lowp_out is not None) + tuple(
        (tuple(map(id, ts)), tuple(map(torch.Tensor.data_ptr, ts))) for ts in lists)
    if lowp_out is not None:
        key += ((tuple(map(id, lowp_out)), tuple(t.data_ptr() if t is not None else 0 for t in lowp_out)),)
    return key


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
    Returns:
        float64 tensor [len(STAT_NAMES)] on the params' device: sums over all coordinates (r, r², scale,
        ‖θ2−θ0‖², ‖scale⊙(θ2−θ0)‖², ĝ0·ĝ1, ‖ĝ0‖², ‖ĝ1‖², inactive count, non-finite count, numel) and, last,
        max scale. Reduce [:-1] with SUM and [-1] with MAX across ranks.
    Example:
        >>> stats = extrapolate_(params, theta0_bufs, g0_bufs, [p.grad for p in params], alpha=0.5, K=5)
        >>> stats_to_dict(stats)["max_scale"]
    """
    key, mixed = _validate_cached(params, theta0, g0, g1, lowp_out, alpha, K, scale_formula)
    if len(params) == 0:
        return _combine([], torch.device("cpu"))
    device = params[0].device
    be = extrapolate_backend(backend, device)
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
        return _extrapolate_triton(params, theta0, g0, g1, lowp_out, thr, key,
                                   check_dtypes="always" if mixed else "never", **kw)
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
