"""SFPO: slow-fast policy optimisation (arXiv 2510.04072), around any torch optimizer.

    θ0 ← θ;  K fast passes: θ ← Opt(θ, clip(∇L_j(θ))) for each of the batch's m mini-batches j (passes 0..K−1)
    reposition θ̃ = θ0 + α(θ_fast − θ0)                (once per batch; one fused pass: ``extrapolate_``, g = None)
    slow pass: the same m mini-batch steps from θ̃       (pass K)
    gate: after each step the mean token entropy H; once ≥ w values, z = (H_last − mean)/(pop-std + 1e-9) over
          the last w; z ≥ τ → plain single-pass GRPO from then on.
``step(closure)`` takes one closure (m = 1) or a sequence of m closures, one per mini-batch: a pass is then m
optimizer steps, as in the authors' code (their fast step is a full ``update_policy`` pass). Cost (K + 1)·m
backward passes per active step. A non-finite gradient falls back to θ0 plus one plain step per mini-batch
(gradients recomputed at θ0; a mini-batch whose gradient is non-finite there skips its own step only, as in a
plain step).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .._utils import check_scalar
from ..ops.extrapolate.op import stats_to_dict
from .base import ExtrapolationRule, _to_float
from .gates import Gate, make_gate

ENTROPY_SIGNALS = ("argument", "slow_pass")


class SFPO(ExtrapolationRule):
    """SFPO update rule wrapping ``optimizer``.

    Args:
        optimizer: any torch.optim.Optimizer whose step() needs no closure (LBFGS is refused). K: fast passes
            (int >= 1; 3). alpha: reposition fraction (0.8).
        max_grad_norm: global clip norm (1.0) or None. gate: "entropy" (default), "ema", "window", None or a
            Gate; tau (1.0), window (30) and omega (0.1; the "ema" gate's) parameterise it; gate_one_sided /
            gate_patience / gate_warmup / gate_rearm_after: the common gate options (see
            :mod:`~gxpo_kernels.update.gates`).
        entropy_signal: which entropy the entropy gate sees: "argument" (default: ``step(closure, entropy=H)``,
            e.g. the rollout entropy) or "slow_pass" (the authors': the mean of the entropies the slow pass's
            closures report, i.e. at the repositioned point; a closure reports one by returning
            ``(loss, entropy)``). An active step reads the argument whatever the gate (``info["entropy_signal"]``):
            one that is no number is refused (ValueError) before anything moves.
        transactional_state: restore the optimizer state to the step's start before the slow pass, so the state
            advances by the slow pass only.
        atomic, fallback_state: as in :class:`~gxpo_kernels.update.GXPO` (an exception rewinds the step; a
            fallback rewinds the optimizer state too unless "keep"). SFPO stores no gradient, so a fallback
            always recomputes the gradient at θ0 (one plain step per mini-batch).
        backend: extrapolation backend.
    Memory: one fp32 buffer of the model's size (θ0), plus a copy of the optimizer state when atomic or
    transactional. ``self.pass_index`` runs 0..K and ``self.minibatch_index`` 0..m−1 during a step.
    Call ``scheduler.step()`` once after each ``step()`` (one batch, as the authors do). The "ema" and "window"
    gates observe the clipped gradient norm of the slow pass's last mini-batch. ``SFPO.paper_protocol(optimizer)``:
    the authors' settings.
    """
    _rule_name = "SFPO"
    #: the authors' settings (their scripts): see ``paper_protocol``
    PAPER_PROTOCOL = dict(K=3, alpha=0.8, max_grad_norm=1.0, gate="entropy", tau=1.0, window=30,
                          entropy_signal="slow_pass", transactional_state=False, fallback_state="keep")

    def __init__(self, optimizer: torch.optim.Optimizer, K: int = 3, alpha: float = 0.8,
                 max_grad_norm: Optional[float] = 1.0, *, gate="entropy", tau: float = 1.0, window: int = 30,
                 omega: float = 0.1, gate_one_sided: Optional[bool] = None, gate_patience: Optional[int] = None,
                 gate_warmup: Optional[int] = None, gate_rearm_after: Optional[int] = None,
                 entropy_signal: str = "argument", transactional_state: bool = False, atomic: bool = True,
                 fallback_state: Optional[str] = None, backend: str = "auto"):
        super().__init__(optimizer, max_grad_norm=max_grad_norm, transactional_state=transactional_state,
                         atomic=atomic, fallback_grad="recompute", fallback_state=fallback_state,
                         backend=backend)
        K = check_scalar(K, "K", "[1, inf)", integer=True)
        alpha = check_scalar(alpha, "alpha", "(0, inf)")
        if entropy_signal not in ENTROPY_SIGNALS:
            raise ValueError(f"entropy_signal must be one of {ENTROPY_SIGNALS}, got {entropy_signal!r}")
        self.K, self.alpha = K, float(alpha)
        self.entropy_signal = entropy_signal
        self.minibatch_index = 0
        self._reported: list = []
        self.gate: Gate = make_gate(gate, tau=tau, omega=omega, window=window, one_sided=gate_one_sided,
                                    patience=gate_patience, warmup=gate_warmup, rearm_after=gate_rearm_after)

    @classmethod
    def paper_protocol(cls, optimizer: torch.optim.Optimizer, **overrides) -> "SFPO":
        """SFPO as the authors run it (``PAPER_PROTOCOL``): K = 3, α = 0.8, the entropy gate (w = 30, τ = 1,
        one-sided) fed with the slow pass's entropy. Pass the batch's mini-batches as a list of closures (their
        scripts use m = 4) and do not recompute old log-probs inside the step (they compute them once per
        batch). ``overrides`` replace single settings."""
        return cls(optimizer, **{**cls.PAPER_PROTOCOL, **overrides})

    def _hparams(self) -> dict:
        return {"K": self.K, "alpha": self.alpha}

    def _check_closure(self, closure) -> None:
        closures = closure if isinstance(closure, (list, tuple)) else [closure]
        if not closures:
            raise TypeError("SFPO.step needs a closure or a non-empty sequence of closures")
        for c in closures:
            super()._check_closure(c)

    def _entropy_refusal(self, entropy) -> Optional[Exception]:
        # an active step reads the entropy argument at its end (info["entropy_signal"]; the entropy gate with
        # entropy_signal="argument"), after the step's last collective: one that is no number would raise there on
        # its rank only, the others keeping their step. Checked before anything moves instead, without reading the
        # value: a caller may fill a one-element tensor inside the first closure (the TRL trainer does)
        if entropy is None or isinstance(entropy, float) or (self.gate.needs_entropy
                                                             and self.entropy_signal == "slow_pass"):
            return None
        if isinstance(entropy, torch.Tensor):
            if entropy.numel() == 1 and not entropy.is_complex():
                return None
            why = f"a tensor of shape {tuple(entropy.shape)} and dtype {entropy.dtype}"
        elif isinstance(entropy, BaseException):
            why = f"an exception ({type(entropy).__name__})"
        else:
            try:
                float(entropy)
                return None
            except (TypeError, ValueError) as e:
                why = f"a {type(entropy).__name__} ({e})"
        return ValueError(f"SFPO.step: entropy must be a number or a one-element real tensor; got {why}")

    def _plain_step_snapshot(self, closure) -> bool:
        # m closures take m optimizer steps: an exception in a later one must rewind the earlier ones
        return isinstance(closure, (list, tuple)) and len(closure) > 1

    def _plain_step(self, closure) -> dict:
        """The single-pass regime: one plain step per mini-batch closure."""
        closures = closure if isinstance(closure, (list, tuple)) else [closure]
        self._reported = []   # (entropies the closures report are read by active steps only)
        infos = []
        for j, c in enumerate(closures):
            self.minibatch_index = j
            infos.append(super()._plain_step(c))
            if j:
                self.outer_steps -= 1                     # one outer step per batch
        info = infos[0]
        info["skipped"] = all(i["skipped"] for i in infos)
        info["backward_passes"] = sum(i["backward_passes"] for i in infos)
        return info

    def _run_closure(self, closure: Callable, pass_index: int):
        out = super()._run_closure(closure, pass_index)
        if isinstance(out, tuple):                        # (loss, entropy)
            if len(out) != 2:
                raise ValueError("an SFPO closure returns the loss or a pair (loss, entropy)")
            self._reported.append(_to_float(out[1]))
            return out[0]
        return out

    def _fallback(self, closures: Sequence[Callable], params, reason: str, info: dict, start: int = 0) -> dict:
        """θ0 back, then one plain step per mini-batch from ``start`` on (those before it are known non-finite
        at θ0), as ``_plain_step``: a mini-batch whose gradient at θ0 is non-finite skips its own step only (the
        last one's step or skip is ``_end_fallback``'s); ``skipped`` when none stepped."""
        self._rewind_for_fallback()
        oks = [False] * start
        for j in range(start, len(closures)):
            c = closures[j]
            self.minibatch_index = j
            oks.append(self._fresh_grads_finite(c, params))
            if j < len(closures) - 1:
                if oks[-1]:
                    self._optimizer_step()
                else:
                    self._zero_grad()
        info = self._end_fallback(oks[-1], reason, info)
        info["skipped"] = not any(oks)
        return info

    def _active_step(self, closure, params, entropy) -> dict:
        """One SFPO outer update (θ0 and the optimizer snapshot are taken before the first optimizer step)."""
        closures = list(closure) if isinstance(closure, (list, tuple)) else [closure]
        self._bp = 0
        self._reported = []
        info = {"active": True, "fell_back": False, "fallback_reason": None, "skipped": False,
                "gate_z": math.nan, "grad_norms": []}
        for k in range(self.K):
            for j, c in enumerate(closures):
                self.minibatch_index = j
                loss = _to_float(self._run_closure(c, k))
                if k == 0 and j == 0:
                    info["loss"] = loss
                _, norm, _ = self._clip(params)
                info["grad_norms"].append(norm)
                if not math.isfinite(norm):
                    if k == 0 and j == 0:                 # θ = θ0 still: nothing to step with on this mini-batch
                        self._zero_grad()
                        if len(closures) == 1:
                            self.fallbacks += 1
                            info.update(fell_back=True, fallback_reason="nonfinite_g0", skipped=True)
                            return self._finish(info)
                        return self._finish(self._fallback(closures, params, "nonfinite_g0", info, start=1))
                    return self._finish(self._fallback(closures, params, f"nonfinite_g{k}", info))
                self._optimizer_step()
        stats = self._all_reduce_(self._extrapolate(params, None, None, alpha=self.alpha, K=2))
        sd = stats_to_dict(stats)
        info["disp_norm"] = math.sqrt(sd["sq_disp"])
        if sd["n_nonfinite"] > 0:
            return self._finish(self._fallback(closures, params, "nonfinite_extrapolation", info))
        if self.transactional_state:
            self._restore_optimizer_state_()
        self._reported = []
        normc = math.nan
        for j, c in enumerate(closures):
            self.minibatch_index = j
            loss = _to_float(self._run_closure(c, self.K))
            if j == 0:
                info["loss_slow"] = loss
            _, norm, normc = self._clip(params)
            if j == 0:
                info["grad_norm_slow"] = norm
            if not math.isfinite(norm):
                return self._finish(self._fallback(closures, params, "nonfinite_gslow", info))
            self._optimizer_step()
        if self.entropy_signal == "slow_pass" and self.gate.needs_entropy:
            if len(self._reported) != len(closures):   # raised by _observe_entropy: on every rank when sharded
                entropy = ValueError("SFPO(entropy_signal='slow_pass') needs every slow-pass closure to return "
                                     "(loss, entropy)")
            else:
                entropy = sum(self._reported) / len(self._reported)
        info["gate_z"] = self._observe_gate(normc, entropy)
        info["entropy_signal"] = _to_float(entropy)
        return self._finish(info)
