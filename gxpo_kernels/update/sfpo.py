"""SFPO: slow-fast policy optimisation (spec §3; arXiv 2510.04072), around any torch optimizer.

    θ0 ← θ;  K fast steps θ_{k+1} = Opt(θ_k, clip(∇L(θ_k)))  (passes 0..K−1)
    reposition θ̃ = θ0 + α(θ_K − θ0)                          (one fused pass: ``extrapolate_`` with g = None)
    slow step θ_next = Opt(θ̃, clip(∇L(θ̃)))                   (pass K)
    gate: after each step append the mean token entropy H (``step(closure, entropy=H)``); once ≥ w values,
          z = (H_last − mean)/(pop-std + 1e-9) over the last w; z ≥ τ → plain single-pass GRPO from then on.
Cost K + 1 backward passes per active step. A non-finite gradient falls back to θ0 plus one plain step
(the gradient at θ0 is recomputed when it is not the one that failed).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..ops.extrapolate.op import stats_to_dict
from .base import ExtrapolationRule, _to_float
from .gates import Gate, make_gate


class SFPO(ExtrapolationRule):
    """SFPO update rule wrapping ``optimizer``.

    Args:
        optimizer: any torch.optim.Optimizer. K: fast steps (int >= 1; 3). alpha: reposition fraction (0.8).
        max_grad_norm: global clip norm (1.0) or None. gate: "entropy" (default), "ema", "window", None or a
            Gate; tau (1.0) and window (30) parameterise it. backend: extrapolation backend.
    Memory: one fp32 buffer of the model's size (θ0). ``self.pass_index`` runs 0..K during a step.
    Call ``scheduler.step()`` once after each ``step()``.
    """
    _rule_name = "SFPO"

    def __init__(self, optimizer: torch.optim.Optimizer, K: int = 3, alpha: float = 0.8,
                 max_grad_norm: Optional[float] = 1.0, *, gate="entropy", tau: float = 1.0, window: int = 30,
                 omega: float = 0.1, backend: str = "auto"):
        super().__init__(optimizer, max_grad_norm=max_grad_norm, backend=backend)
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be an int >= 1, got {K!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.K, self.alpha = K, float(alpha)
        self.gate: Gate = make_gate(gate, tau=tau, omega=omega, window=window)

    def _fallback(self, closure: Callable, params, reason: str, info: dict) -> dict:
        with torch.no_grad():
            self._restore_params_()
        return self._end_fallback(self._fresh_grads_finite(closure, params), reason, info)

    def step(self, closure: Callable, entropy=None) -> dict:
        """One SFPO outer update. Returns a diagnostics dict (loss, grad norms, displacement, gate z, costs)."""
        gated = self._begin(closure)
        if gated is not None:
            return gated
        params = self._param_list()
        info = {"active": True, "fell_back": False, "fallback_reason": None, "skipped": False,
                "gate_z": math.nan, "grad_norms": []}
        with torch.no_grad():
            self._snapshot_params_()
        for k in range(self.K):
            loss = _to_float(self._run_closure(closure, k))
            if k == 0:
                info["loss"] = loss
            _, norm, _ = self._clip(params)
            info["grad_norms"].append(norm)
            if not math.isfinite(norm):
                if k == 0:                                # θ = θ0 still: nothing to step with
                    self._zero_grad()
                    self.fallbacks += 1
                    info.update(fell_back=True, fallback_reason="nonfinite_g0", skipped=True)
                    return self._finish(info)
                return self._finish(self._fallback(closure, params, f"nonfinite_g{k}", info))
            self._optimizer_step()
        stats = self._all_reduce_(self._extrapolate(params, None, None, alpha=self.alpha, K=2))
        sd = stats_to_dict(stats)
        info["disp_norm"] = math.sqrt(sd["sq_disp"])
        if sd["n_nonfinite"] > 0:
            return self._finish(self._fallback(closure, params, "nonfinite_extrapolation", info))
        info["loss_slow"] = _to_float(self._run_closure(closure, self.K))
        _, norm, normc = self._clip(params)
        info["grad_norm_slow"] = norm
        if not math.isfinite(norm):
            return self._finish(self._fallback(closure, params, "nonfinite_gslow", info))
        self._optimizer_step()
        info["gate_z"] = self._observe_gate(normc, entropy)
        return self._finish(info)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(K=self.K, alpha=self.alpha)
        return sd
