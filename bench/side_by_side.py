"""Our extrapolation and gate against the authors' formulas, and the interpreter's closed form, on the CPU.

    python -m bench.side_by_side [OUT.json]      (bench/results/cpu-side-by-side.json)

Four measurements behind docs/update-rules.md ("Ours vs the authors' code") and docs/extrapolate.md (Precision),
each ``extrapolate_`` or ``GXPO`` against a formula re-implemented here from the docs' description:

- ``horner_vs_guarded``: for even K our scale is the polynomial S_{K/2}(r²); the authors' later code divides
  S_K(r) (Horner) by S_2(r) = 1 + r, with scale 1 where |1 + r| <= δ. fp32, 4,096 coordinates. Counted: the
  coordinates whose scale differs, the largest difference, each formula's largest error against the float64
  value of 1 + r² (the exact quotient), and the coordinates whose θ̃ differs (θ2 − θ0 ~ N(0, 1e-3²)).
- ``inactive_mask_floor``: with ``inactive_threshold=1e-3`` the mask matches the authors' later code, but an
  active coordinate's ratio keeps the floor max(|ĝ0|, δ); theirs divides by ĝ0 itself. One tensor of 4,096
  coordinates per RMS(ĝ0), K = 5. Counted: the active coordinates below δ (where the floor acts), the θ̃ that
  differ, the largest difference, θ2 − θ0 where it occurs and the largest |θ2 − θ0| of the tensor.
- ``ema_gate_z``: ``GXPO.paper_protocol`` (τ raised so that the gate never fires and every step is active) over
  20 AdamW steps of a small MLP. Our EMA gate sees ‖g̃‖·coef (the clip's own numbers); the authors' sees the
  float64 norm of the clipped fp32 gradient, read here in an optimizer pre-step hook on the corrective pass and
  fed to an EMA gate written from their formula. Reported: the largest relative difference of the two norms
  and the largest |z_ours − z_theirs|.
- ``interpreter_closed_form``: ``backend="triton"`` under ``TRITON_INTERPRET=1`` (no libdevice ``pow``: r^K by
  K − 1 multiplications) against ``backend="torch"`` (``torch.pow``), ``scale_formula="closed"``, fp64, 4,099
  elements. Counted: the elements whose scale and whose θ̃ differ, the largest differences, and r where the
  scale differs most.

Inputs (fixed seeds): θ0 ~ N(0, 1), θ2 = θ0 + 1e-3·N(0, 1), g0 = s·N(0, 1), g1 = 0.7·g0 + 0.4·s·N(0, 1) with
s the gradient RMS (1 unless stated), α = 0.5, clip coefficients 1. The scale itself is read from the op with
θ0 = 0, θ2 = 1, α = 1 (then θ̃ = scale exactly). Takes a few seconds.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # read when the kernels are defined (at import)

import math  # noqa: E402
import pathlib  # noqa: E402

import torch  # noqa: E402

from ._common import results_cli  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results" / "cpu-side-by-side.json"
DELTA = 1e-8


def _inputs(n: int, seed: int, dtype=torch.float32, rms: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    t0 = torch.randn(n, generator=g, dtype=torch.float64)
    t2 = t0 + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    g0 = rms * torch.randn(n, generator=g, dtype=torch.float64)
    g1 = 0.7 * g0 + 0.4 * rms * torch.randn(n, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (t0, t2, g0, g1)]


def _ratio(g0, g1, floor: bool):
    """r = ĝ1 / (sgn(ĝ0)·max(|ĝ0|, δ)) (sgn 0 = +1), or ĝ1 / ĝ0 without the floor; NaN -> 1, clamp [−2, 3]."""
    sgn = torch.where(g0 >= 0, 1.0, -1.0).to(g0.dtype)
    den = sgn * g0.abs().clamp(min=DELTA) if floor else g0
    return (g1 / den).nan_to_num(nan=1.0).clamp(-2.0, 3.0)


def _guarded_horner(r, K: int):
    """The authors' later scale: S_K(r) by Horner over S_2(r) = 1 + r, 1 where |1 + r| <= δ; clamp [1, K/2 + 1]."""
    s_k = torch.ones_like(r)
    for _ in range(K - 1):
        s_k = s_k * r + 1.0
    s_2 = 1.0 + r
    return torch.where(s_2.abs() <= DELTA, torch.ones_like(r), s_k / s_2).clamp(1.0, K / 2 + 1.0)


def _move(t0, t2, scale, alpha=0.5):
    """Their order of operations, (θ2 − θ0)·scale·α + θ0; ours, θ0 + (α·scale)·(θ2 − θ0), is the same at α = 0.5."""
    return ((t2 - t0) * scale) * alpha + t0


def _scale_from_op(g0, g1, K: int, **kw):
    """The op's scale per coordinate: θ0 = 0, θ2 = 1, α = 1 make θ̃ = 0 + (1·scale)·1 = scale."""
    from gxpo_kernels.ops.extrapolate import extrapolate_
    p = [torch.ones_like(g0)]
    extrapolate_(p, [torch.zeros_like(g0)], [g0], [g1], alpha=1.0, K=K, **kw)
    return p[0]


def _theta_from_op(t0, t2, g0, g1, K: int, **kw):
    from gxpo_kernels.ops.extrapolate import extrapolate_
    p = [t2.clone()]
    extrapolate_(p, [t0], [g0], [g1], alpha=0.5, K=K, **kw)
    return p[0]


def horner_vs_guarded(Ks=(4, 6, 10), n: int = 4096, seed: int = 0) -> list:
    t0, t2, g0, g1 = _inputs(n, seed)
    rows = []
    for K in Ks:
        ours = _scale_from_op(g0, g1, K, backend="torch")
        r = _ratio(g0, g1, floor=True)
        theirs = _guarded_horner(r, K)
        q, exact = r.double() ** 2, torch.ones_like(r, dtype=torch.float64)   # S_{K/2}(r²) in float64, same r
        for _ in range(K // 2 - 1):
            exact = exact * q + 1.0
        exact = exact.clamp(1.0, K / 2 + 1.0)
        ds = (ours.double() - theirs.double()).abs()
        th_ours = _theta_from_op(t0, t2, g0, g1, K, backend="torch")
        dt = (th_ours.double() - _move(t0, t2, theirs).double()).abs()
        rows.append({"K": K, "n": n, "scale_differ": int((ds > 0).sum()), "scale_max_diff": float(ds.max()),
                     "r_at_max_scale_diff": float(r[ds.argmax()]),
                     "ours_max_err_vs_fp64": float((ours.double() - exact).abs().max()),
                     "theirs_max_err_vs_fp64": float((theirs.double() - exact).abs().max()),
                     "theta_differ": int((dt > 0).sum()), "theta_max_diff": float(dt.max())})
    return rows


def inactive_mask_floor(rms_list=(1e-4, 1e-5, 1e-6, 1e-7), n: int = 4096, K: int = 5, seed: int = 1,
                        rel: float = 1e-3) -> list:
    rows = []
    for rms in rms_list:
        t0, t2, g0, g1 = _inputs(n, seed, rms=rms)
        ours = _theta_from_op(t0, t2, g0, g1, K, inactive_threshold=rel, backend="torch")
        thr = rel * float(g0.double().norm()) / math.sqrt(n)
        inactive = g0.abs() <= thr
        scale = torch.where(inactive, torch.ones_like(g0), _guarded_horner(_ratio(g0, g1, floor=False), K))
        theirs = _move(t0, t2, scale)
        dt = (ours.double() - theirs.double()).abs()
        floored = ~inactive & (g0.abs() < DELTA)
        rows.append({"rms": rms, "n": n, "K": K, "threshold": thr, "n_inactive": int(inactive.sum()),
                     "floored": int(floored.sum()), "theta_differ": int((dt > 0).sum()),
                     "theta_differ_outside_floored": int(((dt > 0) & ~floored).sum()),
                     "theta_max_diff": float(dt.max()), "displacement_at_max_diff": float((t2 - t0)[dt.argmax()]),
                     "max_abs_displacement": float((t2 - t0).abs().max())})
    return rows


def ema_gate_z(steps: int = 20, seed: int = 0) -> dict:
    from gxpo_kernels.update import GXPO
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed + 1)
    X, Y = torch.randn(16, 24, 6, generator=g), torch.randn(16, 24, 1, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rule = GXPO.paper_protocol(opt, tau=1e9)     # the paper's gate statistics, never fired: every step active
    seen = []

    def hook(optimizer, args, kwargs):            # the corrective pass's clipped gradient, as the optimizer sees it
        if rule.pass_index == 2:
            seen.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
    opt.register_step_pre_hook(hook)
    mu, sigma, omega = 1.0, 1.0, 0.1             # the authors' EMA gate: μ0 = σ0 = 1, σ >= 0.01, z over σ + 1e-8
    rows = []
    for step in range(steps):
        b = step % 16

        def closure():
            opt.zero_grad()
            loss = ((model(X[b]) - Y[b]) ** 2).mean()
            loss.backward()
            return loss
        n_seen = len(seen)
        info = rule.step(closure)
        if not info["active"] or info["fell_back"] or len(seen) != n_seen + 1:
            raise RuntimeError(f"step {step}: not a complete active step ({info['fallback_reason']})")
        h = seen[-1]
        z = (h - mu) / (sigma + 1e-8)
        sigma = max(0.01, ((1 - omega) * sigma ** 2 + omega * (h - mu) ** 2) ** 0.5)
        mu = (1 - omega) * mu + omega * h
        rows.append({"step": step, "norm_ours": info["grad_norm_corr_clipped"], "norm_theirs": h,
                     "z_ours": info["gate_z"], "z_theirs": z})
    return {"steps": steps, "active_steps": len(rows),
            "max_rel_norm_diff": max(abs(r["norm_ours"] - r["norm_theirs"]) / r["norm_theirs"] for r in rows),
            "max_abs_z_diff": max(abs(r["z_ours"] - r["z_theirs"]) for r in rows),
            "max_abs_z": max(abs(r["z_ours"]) for r in rows), "rows": rows}


def interpreter_closed_form(Ks=(3, 5, 10), n: int = 4099, seed: int = 2) -> list:
    t0, t2, g0, g1 = _inputs(n, seed, dtype=torch.float64)
    rows = []
    for K in Ks:
        kw = dict(scale_formula="closed")
        ds = (_scale_from_op(g0, g1, K, backend="triton", **kw) - _scale_from_op(g0, g1, K, backend="torch", **kw))
        dt = (_theta_from_op(t0, t2, g0, g1, K, backend="triton", **kw)
              - _theta_from_op(t0, t2, g0, g1, K, backend="torch", **kw))
        rows.append({"K": K, "n": n, "dtype": "float64", "scale_differ": int((ds != 0).sum()),
                     "scale_max_diff": float(ds.abs().max()),
                     "r_at_max_scale_diff": float(_ratio(g0, g1, floor=True)[ds.abs().argmax()]),
                     "theta_differ": int((dt != 0).sum()),
                     "theta_max_diff": float(dt.abs().max())})
    return rows


def measure() -> dict:
    return {"what": __doc__.split("\n\n")[0], "torch": torch.__version__, "delta": DELTA, "ours_backend": "torch",
            "horner_vs_guarded": horner_vs_guarded(), "inactive_mask_floor": inactive_mask_floor(),
            "ema_gate_z": ema_gate_z(), "interpreter_closed_form": interpreter_closed_form()}


def main(argv=None) -> None:
    doc = results_cli("side_by_side", __doc__, OUT, measure, argv)
    for key in ("horner_vs_guarded", "inactive_mask_floor", "interpreter_closed_form"):
        for r in doc[key]:
            print(key, r)
    print("ema_gate_z", {k: v for k, v in doc["ema_gate_z"].items() if k != "rows"})


if __name__ == "__main__":
    main()
