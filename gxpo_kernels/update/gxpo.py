"""GXPO: one active update on a mini-batch (the authors' Algorithm 1), around any torch optimizer.

    θ0 ← θ
    pass 0: g0 = ∇L(θ0); ĝ0 = clip(g0); non-finite or ‖g0‖ ≤ 1e-8 → FALLBACK;  θ1 = Opt(θ0, ĝ0)
    pass 1: g1 = ∇L(θ1); ĝ1 = clip(g1); non-finite → FALLBACK;               θ2 = Opt(θ1, ĝ1)
    r = ĝ1 / (sgn(ĝ0)·max(|ĝ0|, δ)) ∈ [−2, 3];  scale = clamp(S_K(r)/S_2(r), 1, K/2 + 1)
    θ̃ = θ0 + α·scale⊙(θ2 − θ0)                   (one fused pass: ``ops.extrapolate.extrapolate_``)
    pass 2: g̃ = ∇L(θ̃); ĝ̃ = clip(g̃); non-finite → FALLBACK;  θ_next = Opt(θ̃, ĝ̃);  gate.observe(‖ĝ̃‖)
    FALLBACK: θ ← θ0 (and the optimizer state, by default), one plain step with ĝ0 (stored, or recomputed:
              ``fallback_grad``); with non-finite g0 the step is skipped. After the gate fires: θ_next = Opt(θ, clip(∇L(θ))) forever (1 pass).
Papers: GXPO arXiv 2605.06755; SFPO arXiv 2510.04072.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from .._utils import check_bools, check_scalar
from ..ops.extrapolate.op import MAX_K, STAT_INDEX, stats_to_dict
from .base import ExtrapolationRule, _no_grad, _to_float
from .gates import Gate, make_gate


GATE_SIGNALS = ("corr_norm_clipped", "corr_norm", "g0_norm", "cosine")


class GXPO(ExtrapolationRule):
    """GXPO update rule wrapping ``optimizer``.

    Args:
        optimizer: any torch.optim.Optimizer whose step() needs no closure (AdamW in the paper; LBFGS is refused).
        K: virtual number of fast steps (int >= 2; 5). alpha: partial-move fraction (0.5). tau: gate threshold (0.5).
        max_grad_norm: global clip norm c (1.0); None disables clipping (norms are still computed for checks).
        gate: "ema" (default, paper), "window", "entropy" (value passed as ``step(closure, entropy=...)``),
            None (never fires) or a :class:`~gxpo_kernels.update.gates.Gate`. omega, window: gate parameters.
        gate_one_sided, gate_patience, gate_warmup, gate_rearm_after: the common gate options (see
            :mod:`~gxpo_kernels.update.gates`; None keeps the gate's default: two-sided, 1, 0, permanent).
        gate_signal: what the gate observes after an active step: "corr_norm_clipped" (‖ĝ̃‖ after the clip; the
            paper), "corr_norm" (‖g̃‖ before the clip: the authors' later code, which does not saturate at c),
            "g0_norm" (‖g0‖ before the clip) or "cosine" (1 − |cos(g0, g̃)|). Ignored by the entropy gate.
        scale_formula: "horner" (exact S_K/S_2, default) or "closed" (the authors' guarded closed form with pow:
            bit-exact with their update).
        inactive_threshold: None (off) or rel (the authors' later code uses 1e-3): coordinates with
            |g0| <= rel·RMS(g0 of the tensor) keep their two-step displacement (r = 1, scale = 1).
        optimizer_aware: compute r from the optimizer's displacements d_t = ((1 − lr·wd)θ_t − θ_{t+1})/lr instead
            of the gradients (AdamW-style decoupled weight decay; lr and weight_decay read per param group; d_t = 0
            for a parameter the pass left without a gradient, which the optimizer does not step).
        zero_lr: optimizer-aware mode with a param group at lr <= 0 (a warm-up starting at 0): "raise" (default,
            checked before the first optimizer step) or "neutral" (that group's coordinates get r = 0, scale 1:
            its displacement is zero anyway; the authors' behaviour).
        skip_corrective: no pass 2: the repositioned point θ̃ is the update (the authors' ablation; 2 passes).
        transactional_state: restore the optimizer state to the step's start before pass 2, so the state
            advances once per mini-batch (the corrective step's update only).
        atomic: snapshot the optimizer state in every active step (one copy of the optimizer state, in
            preallocated buffers, taken just before the first optimizer step; the param groups' entries but
            'params' too, e.g. Prodigy's d and k) so that an exception anywhere in the step rewinds it;
            parameters are always rewound (θ0 is kept anyway).
        fallback_grad: "reuse" (default: the fallback steps with the stored ĝ0; no extra pass) or "recompute"
            (one more pass at θ0, as the authors do; same parameters, one more backward pass counted).
        fallback_state: "restore" (default when a snapshot exists: a fallback equals a plain step, optimizer
            state included) or "keep" (the authors' light fallback: only θ0 is restored).
        min_grad_norm: ‖g0‖ at or below it falls back (1e-8).
        corrective_cosine: also compute ``info["cos_g0_gcorr"]`` = cos(ĝ0, ĝ̃) (one more read of both per active
            step; NaN when off). Always computed with ``gate_signal="cosine"``.
        backend: extrapolation backend (see extrapolate_).
    Memory: an fp32 buffer of the model's size for θ0, plus a copy of the optimizer state when atomic or
    transactional. ĝ0 is pass 0's gradient itself (kept, not copied; ``p.grad`` is set to None after the first
    optimizer step) with plain params and torch's AdamW / Adam (not fused); otherwise (sharded subclasses, other
    optimizers, optimizer-aware mode) a second fp32 buffer. g1 is read from ``.grad`` after the second optimizer
    step (from a copy taken before it unless the optimizer is torch's Adam / AdamW or SGD without Nesterov
    momentum: see ``_step_keeps_grads``) and θ2 is the parameter itself.
    bf16 parameters are supported (buffers stay fp32). The closure may read ``self.pass_index`` (0, 1, 2) e.g.
    to recompute old log-probs per pass (the caller's business). The rule never steps an LR scheduler (its
    optimizer steps share one rate); the authors step theirs once per batch, i.e. after the batch's last
    mini-batch ``step()``. ``GXPO.paper_protocol(optimizer)`` builds the rule with the authors' paper settings.
    """
    _rule_name = "GXPO"
    #: the authors' paper-reproduction settings (their verl fork): see ``paper_protocol``
    PAPER_PROTOCOL = dict(K=5, alpha=0.5, tau=0.5, max_grad_norm=1.0, gate="ema", omega=0.1,
                          gate_signal="corr_norm_clipped", scale_formula="closed", inactive_threshold=None,
                          optimizer_aware=False, skip_corrective=False, transactional_state=False,
                          fallback_grad="recompute", fallback_state="keep", min_grad_norm=1e-8)

    def __init__(self, optimizer: torch.optim.Optimizer, K: int = 5, alpha: float = 0.5, tau: float = 0.5,
                 max_grad_norm: Optional[float] = 1.0, *, gate="ema", omega: float = 0.1, window: int = 30,
                 gate_one_sided: Optional[bool] = None, gate_patience: Optional[int] = None,
                 gate_warmup: Optional[int] = None, gate_rearm_after: Optional[int] = None,
                 gate_signal: str = "corr_norm_clipped", scale_formula: str = "horner",
                 transactional_state: bool = False, inactive_threshold: Optional[float] = None,
                 optimizer_aware: bool = False, zero_lr: str = "raise", skip_corrective: bool = False,
                 atomic: bool = True, fallback_grad: str = "reuse", fallback_state: Optional[str] = None,
                 min_grad_norm: float = 1e-8, corrective_cosine: bool = False, backend: str = "auto"):
        super().__init__(optimizer, max_grad_norm=max_grad_norm, transactional_state=transactional_state,
                         atomic=atomic, fallback_grad=fallback_grad, fallback_state=fallback_state,
                         backend=backend)
        K = check_scalar(K, "K", f"[2, {MAX_K}]", integer=True)
        alpha = check_scalar(alpha, "alpha", "(0, inf)")
        if scale_formula not in ("horner", "closed"):
            raise ValueError(f"scale_formula must be 'horner' or 'closed', got {scale_formula!r}")
        inactive_threshold = check_scalar(inactive_threshold, "inactive_threshold", "[0, inf)", optional=True)
        min_grad_norm = check_scalar(min_grad_norm, "min_grad_norm", "[0, inf)")
        check_bools(optimizer_aware=optimizer_aware, skip_corrective=skip_corrective,
                    corrective_cosine=corrective_cosine)
        if gate_signal not in GATE_SIGNALS:
            raise ValueError(f"gate_signal must be one of {GATE_SIGNALS}, got {gate_signal!r}")
        if zero_lr not in ("raise", "neutral"):
            raise ValueError(f"zero_lr must be 'raise' or 'neutral', got {zero_lr!r}")
        self.K, self.alpha, self.tau = K, float(alpha), float(tau)
        self.scale_formula = scale_formula
        self.inactive_threshold = inactive_threshold
        self.optimizer_aware = bool(optimizer_aware)
        self.zero_lr = zero_lr
        self.skip_corrective = bool(skip_corrective)
        self.gate_signal = gate_signal
        self.min_grad_norm = float(min_grad_norm)
        self.gate: Gate = make_gate(gate, tau=tau, omega=omega, window=window, one_sided=gate_one_sided,
                                    patience=gate_patience, warmup=gate_warmup, rearm_after=gate_rearm_after)
        self.corrective_cosine = bool(corrective_cosine)
        self._g0: Optional[List[torch.Tensor]] = None
        self._g0_kept = False

    @classmethod
    def paper_protocol(cls, optimizer: torch.optim.Optimizer, **overrides) -> "GXPO":
        """GXPO exactly as the authors ran it for the paper (``PAPER_PROTOCOL``): K = 5, α = 0.5, the EMA gate
        (τ = 0.5, ω = 0.1, |Z| ≥ τ) on the clipped corrective norm, the closed-form scale with ``pow``, no
        inactive mask, fallbacks that restore θ0 only and recompute g0. Their passes 1 and 2 also recompute the
        old log-probs at the current parameters: do that in the closure when ``pass_index > 0``.
        ``overrides`` replace single settings."""
        return cls(optimizer, **{**cls.PAPER_PROTOCOL, **overrides})

    def _hparams(self) -> dict:
        return {"K": self.K, "alpha": self.alpha, "scale_formula": self.scale_formula,
                "inactive_threshold": self.inactive_threshold, "optimizer_aware": self.optimizer_aware,
                "skip_corrective": self.skip_corrective}

    # ---- pieces ----------------------------------------------------------------------------------------
    @_no_grad
    def _save_g0_(self, grads) -> None:
        """Keep ĝ0: pass 0's gradient tensors themselves when ``_can_keep_grads`` allows it (released from the
        params after the first optimizer step; no copy, no buffer between steps), else a copy into fp32 buffers
        (sharded subclasses, optimizer-aware mode, which writes displacements into them, other optimizers)."""
        self._g0_kept = not self.optimizer_aware and self._can_keep_grads(grads)
        if self._g0_kept:
            self._g0, self._had_grad0 = list(grads), [True] * len(grads)
            return
        if self._g0 is None or len(self._g0) != len(self._theta0) or any(
                a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
                for a, b in zip(self._g0, self._theta0)):
            self._g0 = [torch.empty_like(b) for b in self._theta0]
        self._had_grad0 = [g is not None for g in grads]
        self._snapshot_copy_(self._g0, grads)

    def _group_hparams(self, params) -> List[tuple]:
        by_id = {}
        for grp in self.optimizer.param_groups:
            lr, wd = float(grp.get("lr", 0.0)), float(grp.get("weight_decay", 0.0))
            for p in grp["params"]:
                by_id[id(p)] = (lr, wd)
        return [by_id[id(p)] for p in params]

    def _validate_step(self, params) -> None:
        super()._validate_step(params)
        if self.optimizer_aware and self.zero_lr == "raise":
            bad = sorted({lr for lr, _ in self._group_hparams(params) if not lr > 0})
            if bad:
                raise ValueError(f"GXPO(optimizer_aware=True) needs lr > 0 in every param group (got lr={bad[0]}"
                                 "); pass zero_lr='neutral' to give such groups scale 1 instead")

    @torch.no_grad()
    def _save_first_move_(self, params) -> None:
        """Optimizer-aware mode: the g0 buffer takes θ1 − θ0 (exact, Sterbenz, in the buffer dtype)."""
        for b, p, t0 in zip(self._g0, params, self._theta0):
            b.copy_(p)
            b.sub_(t0)

    @torch.no_grad()
    def _displacements_(self, params, g1) -> None:
        """Optimizer-aware mode: g0 buffer (holding θ1 − θ0) -> d0, g1 -> d1, d_t = ((1 − lr·wd)θ_t − θ_{t+1})/lr.
        A group at lr <= 0 (zero_lr="neutral") gets d0 = d1 = 0: r = 0, scale 1. A parameter without a gradient
        on pass t (``_had_grad0`` / ``_had_grad1``) was not stepped by the optimizer: d_t = 0 (the inversion
        would make −wd·θ_t of it)."""
        for p, t0, b, g, (lr, wd), h0, h1 in zip(params, self._theta0, self._g0, g1, self._group_hparams(params),
                                                 self._had_grad0, self._had_grad1):
            if not lr > 0:
                b.zero_()
                g.zero_()
                continue
            th1 = t0 + b                                  # θ1 exactly (b = θ1 − θ0 was exact)
            if h1:
                g.copy_(((1 - lr * wd) * th1 - p.to(th1.dtype)) / lr)
            else:
                g.zero_()
            if h0:
                b.copy_(((1 - lr * wd) * t0 - th1) / lr)
            else:
                b.zero_()

    def _set_grads_(self, params, bufs, had) -> None:
        """p.grad = the stored ĝ0 in the param's dtype (None where pass 0 left no grad); a sharded subclass
        wraps the local buffers into its own gradient type. A copy of the rule's buffer: a grad aliasing it would
        let the next step's closure (zero_grad without set_to_none, accumulation) overwrite ĝ0 mid-step. Kept
        gradients go back as they are (the rule drops them at the end of the step)."""
        for p, b, h in zip(params, bufs, had):
            p.grad = b.to(p.dtype, copy=not self._g0_kept) if h else None

    @torch.no_grad()
    def _fallback(self, closure: Callable, params, reason: str, info: dict) -> dict:
        self._rewind_for_fallback()
        if self.optimizer_aware or self.fallback_grad == "recompute":   # (the g0 buffer may hold displacements)
            ok = self._fresh_grads_finite(closure, params)
        else:
            self._set_grads_(params, self._g0, self._had_grad0)
            ok = True
        return self._end_fallback(ok, reason, info)

    def _finish(self, info: dict) -> dict:
        if self._g0_kept:   # kept gradients are not held between steps
            self._g0, self._g0_kept = None, False
        return super()._finish(info)

    def _release_buffers_(self) -> None:
        super()._release_buffers_()
        self._g0, self._g0_kept = None, False

    def _abort_step_(self) -> None:
        super()._abort_step_()
        if self._g0_kept:
            self._g0, self._g0_kept = None, False

    # ---- the update --------------------------------------------------------------------------------------
    def _active_step(self, closure: Callable, params, entropy) -> dict:
        """One GXPO outer update (θ0 and the optimizer snapshot are taken before the first optimizer step)."""
        self._bp = 0
        info = {"active": True, "fell_back": False, "fallback_reason": None, "skipped": False,
                "gate_z": math.nan}
        info["loss"] = _to_float(self._run_closure(closure, 0))
        grads, n0, _ = self._clip(params)
        info["grad_norm_0"] = n0
        if not math.isfinite(n0):
            self._zero_grad()
            self.fallbacks += 1
            info.update(fell_back=True, fallback_reason="nonfinite_g0", skipped=True)
            return self._finish(info)
        if n0 <= self.min_grad_norm:
            if self.fallback_grad == "recompute":
                return self._finish(self._fallback(closure, params, "small_g0", info))
            self._optimizer_step()
            self.fallbacks += 1
            info.update(fell_back=True, fallback_reason="small_g0")
            return self._finish(info)
        self._take_due_snapshot_()   # θ0 first: a copied ĝ0 takes its buffers' shapes from it
        self._save_g0_(grads)
        self._optimizer_step()
        if self._g0_kept:
            self._release_grads_(params)
        if self.optimizer_aware:
            self._save_first_move_(params)
        info["loss_1"] = _to_float(self._run_closure(closure, 1))
        grads, n1, _ = self._clip(params)
        info["grad_norm_1"] = n1
        if not math.isfinite(n1):
            return self._finish(self._fallback(closure, params, "nonfinite_g1", info))
        if not (self.optimizer_aware or self._step_keeps_grads()):   # ĝ1 as clipped, not what the step leaves
            with torch.no_grad():
                grads = [None if g is None else g.clone(memory_format=torch.contiguous_format) for g in grads]
        self._optimizer_step()
        g1 = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        if not all(map(torch.Tensor.is_contiguous, g1)):   # a closure may assign grads in another layout
            g1 = [g.contiguous() for g in g1]
        if self.optimizer_aware:
            self._had_grad1 = [g is not None for g in grads]
            self._displacements_(params, g1)
        stats = self._all_reduce_(self._extrapolate(params, self._g0, g1, alpha=self.alpha, K=self.K,
                                                    scale_formula=self.scale_formula,
                                                    inactive_threshold=self.inactive_threshold,
                                                    g0_kept=self._g0_kept))
        info.update(_derive(stats_to_dict(stats)))
        # pass 1's gradients are spent: no reference of the rule keeps them alive through the corrective pass
        # (one gradient's worth less peak memory there; the closure's zero_grad frees them)
        del grads, g1
        if info["n_nonfinite"] > 0:
            return self._finish(self._fallback(closure, params, "nonfinite_extrapolation", info))
        if self.skip_corrective:                          # θ̃ is the update; the gate sees pass 1's gradient
            self._zero_grad()
            n_sig = {"corr_norm_clipped": min(n1, self.max_grad_norm or math.inf), "corr_norm": n1,
                     "g0_norm": n0, "cosine": 1.0 - abs(info["cos_g0_g1"])}[self.gate_signal]
            info["gate_z"] = self._observe_gate(n_sig, entropy)
            return self._finish(info)
        if self.transactional_state:
            self._restore_optimizer_state_()
        info["loss_2"] = _to_float(self._run_closure(closure, 2))
        grads, n2, n2c = self._clip(params)
        info["grad_norm_corr"], info["grad_norm_corr_clipped"] = n2, n2c
        if not math.isfinite(n2):
            return self._finish(self._fallback(closure, params, "nonfinite_gcorr", info))
        info["cos_g0_gcorr"] = self._cos_g0(grads, info["sq_g0"], n2c) \
            if self.corrective_cosine or self.gate_signal == "cosine" else math.nan
        self._optimizer_step()
        n_sig = {"corr_norm_clipped": n2c, "corr_norm": n2, "g0_norm": n0,
                 "cosine": 1.0 - abs(info["cos_g0_gcorr"])}[self.gate_signal]
        info["gate_z"] = self._observe_gate(n_sig, entropy)
        return self._finish(info)

    @torch.no_grad()
    def _cos_g0(self, grads, sq_g0: float, norm_corr: float) -> float:
        """cos(ĝ0, ĝ̃) from the globally reduced dot; ‖ĝ0‖² comes from the kernel's stats, ‖ĝ̃‖ from the clip."""
        def f(t):   # fp32 accumulation at least (kept bf16 gradients), float64 stays
            return t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        dots = [torch.dot(f(b), f(g)) for b, g in zip(self._g0, grads) if g is not None and g.numel()]
        dev = self._g0[0].device if self._g0 else torch.device("cpu")
        acc = torch.zeros(2, dtype=torch.float64, device=dev)
        if dots:
            acc[0] = torch.stack(dots).double().sum()
        acc = self._all_reduce_(acc)                      # last entry (0) is the MAX slot of the contract
        den = math.sqrt(sq_g0) * norm_corr
        return float(acc[0]) / den if den > 0 else math.nan


def _derive(sd: dict) -> dict:
    """Diagnostics (docs/extrapolate.md) from the reduced stats sums."""
    n = max(sd["numel"], 1.0)
    mean_r = sd["sum_r"] / n
    den = math.sqrt(sd["sq_g0"] * sd["sq_g1"])
    return {"retention_mean": mean_r, "retention_std": math.sqrt(max(sd["sum_r2"] / n - mean_r ** 2, 0.0)),
            "scale_mean": sd["sum_scale"] / n, "scale_max": sd["max_scale"],
            "disp_norm": math.sqrt(sd["sq_disp"]), "scaled_disp_norm": math.sqrt(sd["sq_scaled_disp"]),
            "cos_g0_g1": sd["dot_g0_g1"] / den if den > 0 else math.nan,
            "inactive_frac": sd["n_inactive"] / n, "n_nonfinite": sd["n_nonfinite"], "sq_g0": sd["sq_g0"]}


__all__ = ["GXPO", "STAT_INDEX", "GATE_SIGNALS"]
