"""PyTorch reference of the GXPO in-place extrapolation: the executable reference the kernels are tested against.

Per coordinate, with ĝ0 = clip_coef0·g0 and ĝ1 = clip_coef1·g1:
    r     = ĝ1 / (sgn(ĝ0)·max(|ĝ0|, δ))        (sgn 0 = +1), NaN -> 1, clamp [r_min, r_max]
    scale = clamp(S_K(r) / S_2(r), 1, K/2 + 1)  S_n(r) = 1 + r + ... + r^(n-1)
    inactive coordinates (|g0| <= the tensor's threshold): r = 1 and scale = 1 ("neutral retention": they keep
    the observed two-step displacement, as in the authors' code)
    θ̃     = θ0 + α·scale·(θ2 − θ0)             written into ``params`` (θ2) in place, optionally into ``lowp_out``
Horner form: for even K, S_K/S_2 = S_{K/2}(r²) (a polynomial, exact, no 0/0 at r = −1); for odd K, S_K(r)/(1+r).
``scale_formula="closed"`` reproduces the authors' guarded closed form (1−r^K)/(1−r+δ) / ((1−r²)/(1−r+δ) + δ)
with r^K from ``torch.pow`` (as they call it; ``pow`` differs from repeated multiplication in the last bit), so
this form reproduces their update bit for bit; it gives 1 where r == 1 exactly (Horner: K/2).
With ``g0 = g1 = None`` the op is the plain partial move θ0 + α·(θ2 − θ0) (SFPO's reposition; scale ≡ 1).

Stats (one float64 vector, layout ``STAT_NAMES``; every entry is a SUM over all coordinates except the last,
``max_scale``, which is a MAX — a distributed caller reduces entries [:-1] with SUM and [-1] with MAX).
Gradient sums are of the clipped gradients ĝ. Computation is in float32 (float64 when ``params`` are float64).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

STAT_NAMES = ("sum_r", "sum_r2", "sum_scale", "sq_disp", "sq_scaled_disp", "dot_g0_g1", "sq_g0", "sq_g1",
              "n_inactive", "n_nonfinite", "numel", "max_scale")
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
N_STATS = len(STAT_NAMES)
SCALE_FORMULAS = ("horner", "closed")
# the largest lookahead K: the scale saturates at K/2 + 1 long before, the Triton kernel unrolls K - 1 products at
# compile time, and a huge K (2**40) ran for ever in every backend
MAX_K = 256


def _scale_horner(r: torch.Tensor, K: int) -> torch.Tensor:
    if K % 2 == 0:  # S_K / S_2 = S_{K/2}(r^2)
        q = r * r
        s = torch.ones_like(r)
        for _ in range(K // 2 - 1):
            s = s * q + 1.0
        return s
    num = torch.ones_like(r)
    for _ in range(K - 1):
        num = num * r + 1.0
    return num / (r + 1.0)


def _scale_closed(r: torch.Tensor, K: int, delta: float) -> torch.Tensor:
    rk = torch.pow(r, K)
    den = (1.0 - r) + delta
    s_k = (1.0 - rk) / den
    s_2 = (1.0 - r * r) / den
    return s_k / (s_2 + delta)


def retention_scale(r: torch.Tensor, K: int, scale_formula: str = "horner", delta: float = 1e-8) -> torch.Tensor:
    """scale = clamp(S_K(r)/S_2(r), 1, K/2+1) for an already clamped retention ratio ``r`` (NaN -> 1)."""
    s = _scale_horner(r, K) if scale_formula == "horner" else _scale_closed(r, K, delta)
    s = torch.clamp(s, 1.0, K / 2 + 1.0)
    return torch.where(torch.isnan(s), torch.ones_like(s), s)


def inactive_thresholds(g0: Sequence[torch.Tensor], rel: float) -> List[float]:
    """Per-tensor threshold rel·RMS(g0_t) (0 for an empty tensor); coordinates with |g0| <= it are inactive."""
    out = []
    for g in g0:
        n = g.numel()
        out.append(rel * float(g.double().norm()) / (n ** 0.5) if n else 0.0)
    return out


def extrapolate_ref_(params: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor],
                     g0: Optional[Sequence[torch.Tensor]], g1: Optional[Sequence[torch.Tensor]], *,
                     alpha: float, K: int, clip_coef0: float = 1.0, clip_coef1: float = 1.0,
                     scale_formula: str = "horner", inactive_threshold: Optional[float] = None,
                     lowp_out: Optional[Sequence[Optional[torch.Tensor]]] = None, delta: float = 1e-8,
                     r_min: float = -2.0, r_max: float = 3.0,
                     thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Reference for :func:`gxpo_kernels.ops.extrapolate.extrapolate_` (same arguments; a per-tensor loop).

    params[i]  : any shape, float dtype — θ2 on entry, θ̃ on exit (modified in place)
    theta0[i]  : same numel, float — θ0
    g0[i], g1[i]: same numel, float — the gradients at θ0 and θ1 (before the clip coefficients), or both None
    lowp_out[i]: same numel or None — also receives θ̃ cast to its dtype
    thresholds : per-tensor absolute inactive thresholds (overrides ``inactive_threshold``, used by tests)
    Returns a float64 tensor of ``N_STATS`` entries on the device of ``params[0]`` (CPU for an empty list).
    """
    has_grad = g0 is not None
    dev = params[0].device if len(params) else torch.device("cpu")
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=dev)
    stats[STAT_INDEX["max_scale"]] = 1.0
    if has_grad and inactive_threshold is not None and thresholds is None:
        thresholds = inactive_thresholds(g0, inactive_threshold)
    written = []
    try:
        for i, p in enumerate(params):
            if p.numel():
                _move_one_(i, p, theta0, g0, g1, lowp_out, thresholds, stats, alpha=alpha, K=K,
                           clip_coef0=clip_coef0, clip_coef1=clip_coef1, scale_formula=scale_formula, delta=delta,
                           r_min=r_min, r_max=r_max)
                written.append(i)
    except BaseException as e:
        # each tensor is written once its own temporaries exist; undoing the earlier ones would need a copy of
        # θ2 (memory as large as the params): say which tensors moved instead (the update rules rewind them)
        if written:
            e.add_note(f"extrapolate_ (torch backend): failed at params[{i}] after params (and lowp_out) at indices "
                       f"{written} were already overwritten with θ̃; the others still hold θ2")
        raise
    return stats


def _move_one_(i, p, theta0, g0, g1, lowp_out, thresholds, stats, *, alpha, K, clip_coef0, clip_coef1,
               scale_formula, delta, r_min, r_max) -> None:
    """``extrapolate_ref_``'s work on one tensor: params[i] (and lowp_out[i]) written last, stats accumulated."""
    has_grad = g0 is not None
    n = p.numel()
    cdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    t0 = theta0[i].reshape(-1).to(cdt)
    t2 = p.reshape(-1).to(cdt)
    d = t2 - t0
    bad = torch.zeros(n, dtype=torch.bool, device=p.device)
    if has_grad:
        a0 = g0[i].reshape(-1).to(cdt) * clip_coef0
        a1 = g1[i].reshape(-1).to(cdt) * clip_coef1
        sgn = torch.where(a0 >= 0, 1.0, -1.0).to(cdt)
        r = a1 / (sgn * torch.maximum(a0.abs(), torch.tensor(delta, dtype=cdt, device=p.device)))
        inact = None
        if thresholds is not None:
            inact = g0[i].reshape(-1).to(cdt).abs() <= thresholds[i]
            r = torch.where(inact, torch.ones_like(r), r)
            stats[STAT_INDEX["n_inactive"]] += inact.sum().double()
        r = torch.where(torch.isnan(r), torch.ones_like(r), r)
        r = torch.clamp(r, r_min, r_max)
        scale = retention_scale(r, K, scale_formula, delta)
        if inact is not None:                       # neutral retention
            scale = torch.where(inact, torch.ones_like(scale), scale)
        new = t0 + (alpha * scale) * d
        bad |= ~torch.isfinite(a0) | ~torch.isfinite(a1)
        stats[STAT_INDEX["sum_r"]] += r.double().sum()
        stats[STAT_INDEX["sum_r2"]] += (r * r).double().sum()
        stats[STAT_INDEX["dot_g0_g1"]] += (a0 * a1).double().sum()
        stats[STAT_INDEX["sq_g0"]] += (a0 * a0).double().sum()
        stats[STAT_INDEX["sq_g1"]] += (a1 * a1).double().sum()
    else:
        scale = torch.ones_like(d)
        new = t0 + alpha * d
    sd = scale * d
    # θ̃ as written: a finite value can overflow to inf in a 16-bit param or lowp_out (a 16-bit copy of a
    # float64 value goes through float32, as torch converts a double)
    bad |= ~torch.isfinite(new.to(p.dtype))
    if lowp_out is not None and lowp_out[i] is not None:
        bad |= ~torch.isfinite(new.to(lowp_out[i].dtype))
    stats[STAT_INDEX["sum_scale"]] += scale.double().sum()
    stats[STAT_INDEX["sq_disp"]] += (d * d).double().sum()
    stats[STAT_INDEX["sq_scaled_disp"]] += (sd * sd).double().sum()
    stats[STAT_INDEX["n_nonfinite"]] += bad.sum().double()
    stats[STAT_INDEX["numel"]] += n
    stats[STAT_INDEX["max_scale"]] = torch.maximum(stats[STAT_INDEX["max_scale"]], scale.max().double())
    p.copy_(new.view_as(p))
    if lowp_out is not None and lowp_out[i] is not None:
        lowp_out[i].copy_(new.view_as(lowp_out[i]))


def extrapolate_foreach_(params: List[torch.Tensor], theta0: List[torch.Tensor], g0: List[torch.Tensor],
                         g1: List[torch.Tensor], *, alpha: float, K: int,
                         lowp_out: Optional[List[torch.Tensor]] = None) -> None:
    """The best ``torch._foreach_*`` composition of the same update (horner, no clip coefs, no inactive mask,
    no stats): the benchmark's baseline. All lists one dtype (float32) and one device."""
    sgn = torch._foreach_sign(g0)               # {-1, 0, 1} + 0.5 -> sign -> {-1, 1, 1}: sgn 0 = +1
    torch._foreach_add_(sgn, 0.5)
    torch._foreach_sign_(sgn)
    den = torch._foreach_abs(g0)
    torch._foreach_clamp_min_(den, 1e-8)
    torch._foreach_mul_(den, sgn)
    del sgn
    r = torch._foreach_div(g1, den)
    del den
    for x in r:                                 # NaN -> 1 (no foreach nan_to_num)
        torch.nan_to_num_(x, nan=1.0)
    torch._foreach_clamp_min_(r, -2.0)
    torch._foreach_clamp_max_(r, 3.0)
    if K % 2 == 0:
        q = torch._foreach_mul(r, r)
        s = [torch.ones_like(x) for x in r]
        for _ in range(K // 2 - 1):
            torch._foreach_mul_(s, q)
            torch._foreach_add_(s, 1.0)
    else:
        s = [torch.ones_like(x) for x in r]
        for _ in range(K - 1):
            torch._foreach_mul_(s, r)
            torch._foreach_add_(s, 1.0)
        torch._foreach_add_(r, 1.0)
        torch._foreach_div_(s, r)
    torch._foreach_clamp_min_(s, 1.0)
    torch._foreach_clamp_max_(s, K / 2 + 1.0)
    torch._foreach_mul_(s, alpha)
    d = torch._foreach_sub(params, theta0)
    torch._foreach_mul_(d, s)
    torch._foreach_add_(d, theta0)
    torch._foreach_copy_(params, d)
    if lowp_out is not None:
        torch._foreach_copy_(lowp_out, d)
