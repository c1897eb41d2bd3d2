"""Gates that switch an extrapolating update rule to plain single-pass GRPO, permanently.

Each gate sees one scalar per active step (``observe``), returns its z-score, and sets ``fired`` when the
rule must stop extrapolating. All statistics are Python floats (float64) so ``state_dict`` round trips are
bit-exact. Under data parallelism the observed value must already be globally reduced.

- ``EMAGate`` (GXPO default, paper era): Z = (H − μ)/(σ + 1e-8) before the update, then
  σ² ← (1−ω)σ² + ω(H − μ)², σ ← max(σ, 0.01), μ ← (1−ω)μ + ωH; start μ = σ = 1. Fires when |Z| ≥ τ.
- ``WindowGate`` (the authors' later code): the newest value scored against the preceding ``window``
  observations (population std, + 1e-8); no decision until that window is full. Fires when |Z| ≥ τ.
- ``EntropyGate`` (SFPO): append the mean token entropy; once ≥ ``window`` values, z = (H_last − mean)/
  (pop-std + 1e-9) over the last ``window`` values (the latest included). Fires when z ≥ τ (one-sided).

Options every gate takes (defaults keep the behaviour above):
- ``one_sided``: fire on z ≥ τ only (an upward excursion), not on |z| ≥ τ. The GXPO authors' later code is
  one-sided ("a low-norm observation is not evidence that extrapolation became unsafe").
- ``patience``: fire after this many consecutive violations (1). ``WindowGate`` scores the rest of a streak
  against the baseline frozen at its first violation (as the authors do), so a sustained excursion can satisfy
  patience > 1 although it enters the window.
- ``warmup``: the first ``warmup`` observations update the statistics but cannot fire.
- ``rearm_after``: None (a fired gate stays fired: permanent) or n: after n single-pass steps the gate re-arms,
  keeping its statistics (the authors' "temporary" fallback).

A non-finite value (e.g. a cosine signal whose denominator is 0) is skipped: z is NaN, the statistics and the
observation count stay as they were, and an open violation streak ends. (Folded into the EMA it made μ and σ
NaN for good, and the gate could never fire again.) ``load_state_dict`` checks the whole state before it
changes anything.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

from .._utils import check_bool, check_scalar


class Gate:
    """Base: ``observe(value) -> z`` (NaN while undecided), ``fired``, ``fired_step``, state dicts."""

    name = "none"
    needs_entropy = False

    def __init__(self, tau: float = math.inf, *, one_sided: bool = False, patience: int = 1, warmup: int = 0,
                 rearm_after: Optional[int] = None):
        if not (isinstance(tau, float) and tau == math.inf):          # inf: a gate that never fires
            tau = check_scalar(tau, "tau", "(0, inf)")
        patience = check_scalar(patience, "patience", "[1, inf)", integer=True)
        warmup = check_scalar(warmup, "warmup", "[0, inf)", integer=True)
        rearm_after = check_scalar(rearm_after, "rearm_after", "[1, inf)", integer=True, optional=True)
        one_sided = check_bool(one_sided, "one_sided")
        self.tau = float(tau)
        self.one_sided, self.patience, self.warmup, self.rearm_after = bool(one_sided), patience, warmup, rearm_after
        self.fired = False
        self.fired_step: Optional[int] = None
        self.n_observed = 0
        self.streak = 0
        self.plain_steps = 0      # single-pass steps since the gate fired (for rearm_after)

    def _z(self, value: float) -> float:
        return math.nan

    def _fires(self, z: float) -> bool:
        return z >= self.tau if self.one_sided else abs(z) >= self.tau

    def _streak_opened(self) -> None:
        """Hook: a violation streak starts (WindowGate freezes its baseline)."""

    def _streak_closed(self) -> None:
        """Hook: a violation streak ends."""

    def observe(self, value: float, step: Optional[int] = None) -> float:
        value = float(value)
        if not math.isfinite(value):
            if self.streak and not self.fired:
                self._streak_closed()
            self.streak = 0
            return math.nan
        z = self._z(value)
        self.n_observed += 1
        if self.fired:
            return z
        if math.isnan(z) or self.n_observed <= self.warmup or not self._fires(z):
            if self.streak:
                self._streak_closed()
            self.streak = 0
            return z
        if self.streak == 0:
            self._streak_opened()
        self.streak += 1
        if self.streak >= self.patience:
            self.fired, self.fired_step, self.plain_steps = True, step, 0
            self.streak = 0
            self._streak_closed()
        return z

    def count_plain_step(self) -> None:
        """Called once per single-pass step taken while the gate is fired (a forced one included, as the authors
        count steps); re-arms after ``rearm_after``."""
        self.plain_steps += 1

    def rearm_due(self) -> bool:
        return self.fired and self.rearm_after is not None and self.plain_steps >= self.rearm_after

    def rearm(self) -> None:
        self.fired, self.plain_steps = False, 0

    #: the constructor's settings that ``state_dict`` saves (a resumed run must agree on them)
    SETTINGS = ("tau", "one_sided", "patience", "warmup", "rearm_after")

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def state_dict(self) -> dict:
        return {"name": self.name, "tau": self.tau, "fired": self.fired, "fired_step": self.fired_step,
                "n_observed": self.n_observed, "one_sided": self.one_sided, "patience": self.patience,
                "warmup": self.warmup, "rearm_after": self.rearm_after, "streak": self.streak,
                "plain_steps": self.plain_steps}

    def load_state_dict(self, sd: dict) -> None:
        """Restore from ``state_dict()``; everything is read and checked first, so a bad state raises and leaves
        the gate as it was."""
        if not isinstance(sd, dict) or sd.get("name") != self.name:
            got = sd.get("name") if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"state_dict is for gate {got!r}, this gate is {self.name!r}")
        try:
            new = self._read_state(sd)
        except KeyError as e:
            raise ValueError(f"gate state_dict misses {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"gate state_dict: {e}") from None
        for k, v in new.items():
            setattr(self, k, v)

    def _read_state(self, sd: dict) -> dict:
        """The attributes ``sd`` sets, each checked (KeyError, TypeError or ValueError on the first bad one)."""
        tau = float(sd["tau"])
        return dict(tau=tau if tau == math.inf else check_scalar(tau, "tau", "(0, inf)"),
                    fired=bool(sd["fired"]), fired_step=sd["fired_step"],
                    n_observed=check_scalar(sd["n_observed"], "n_observed", "[0, inf)", integer=True),
                    one_sided=bool(sd.get("one_sided", self.one_sided)),
                    patience=check_scalar(sd.get("patience", self.patience), "patience", "[1, inf)", integer=True),
                    warmup=check_scalar(sd.get("warmup", self.warmup), "warmup", "[0, inf)", integer=True),
                    rearm_after=check_scalar(sd.get("rearm_after", self.rearm_after), "rearm_after", "[1, inf)",
                                             integer=True, optional=True),
                    streak=check_scalar(sd.get("streak", 0), "streak", "[0, inf)", integer=True),
                    plain_steps=check_scalar(sd.get("plain_steps", 0), "plain_steps", "[0, inf)", integer=True))


class NoGate(Gate):
    """Never fires (``gate=None``)."""

    def _fires(self, z: float) -> bool:
        return False


class EMAGate(Gate):
    """GXPO's paper gate (module docstring): z of each value against an EMA of mean and std.

    ``tau``: fire when |z| >= tau (0.5). ``omega``: EMA weight of the new value, in (0, 1] (0.1). ``mu0``,
    ``sigma0``: starting mean and std (1.0, 1.0). ``sigma_min``: floor of the std (0.01). ``**opts``: the
    common options (``one_sided``, ``patience``, ``warmup``, ``rearm_after``). Values are Python floats.
    """
    name = "ema"
    SETTINGS = Gate.SETTINGS + ("omega", "sigma_min")

    def __init__(self, tau: float = 0.5, omega: float = 0.1, mu0: float = 1.0, sigma0: float = 1.0,
                 sigma_min: float = 0.01, **opts):
        super().__init__(tau, **opts)
        self.omega = check_scalar(omega, "omega", "(0, 1]")
        self.sigma_min = check_scalar(sigma_min, "sigma_min", "[0, inf)")
        self.mu, self.sigma = check_scalar(mu0, "mu0"), check_scalar(sigma0, "sigma0", "[0, inf)")

    def _z(self, h: float) -> float:
        z = (h - self.mu) / (self.sigma + 1e-8)
        w = self.omega
        var = (1 - w) * self.sigma ** 2 + w * (h - self.mu) ** 2
        self.sigma = max(math.sqrt(var), self.sigma_min)
        self.mu = (1 - w) * self.mu + w * h
        return z

    def state_dict(self) -> dict:
        return {**super().state_dict(), "omega": self.omega, "mu": self.mu, "sigma": self.sigma,
                "sigma_min": self.sigma_min}

    def _read_state(self, sd: dict) -> dict:
        return {**super()._read_state(sd), "omega": check_scalar(sd["omega"], "omega", "(0, 1]"),
                "mu": check_scalar(sd["mu"], "mu"), "sigma": check_scalar(sd["sigma"], "sigma", "[0, inf)"),
                "sigma_min": check_scalar(sd["sigma_min"], "sigma_min", "[0, inf)")}


class _WindowBase(Gate):
    SETTINGS = Gate.SETTINGS + ("window",)

    def __init__(self, tau: float, window: int, **opts):
        super().__init__(tau, **opts)
        window = check_scalar(window, "window", "[2, inf)", integer=True)
        self.window = window
        self.values: deque = deque(maxlen=window + 1)

    @staticmethod
    def _mean_std(xs):
        n = len(xs)
        mean = sum(xs) / n
        return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / n)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "window": self.window, "values": list(self.values)}

    def _read_state(self, sd: dict) -> dict:
        window = check_scalar(sd["window"], "window", "[2, inf)", integer=True)
        values = deque((check_scalar(v, "values[i]") for v in sd["values"]), maxlen=window + 1)
        return {**super()._read_state(sd), "window": window, "values": values}


class WindowGate(_WindowBase):
    """The GXPO authors' later gate: z of the newest value against the preceding ``window`` values.

    ``tau``: fire when |z| >= tau (0.5). ``window``: values in the baseline, >= 2 (30); no decision until it is
    full. ``eps``: added to the std (1e-8; the authors' later code uses 1e-9). ``**opts``: the common options
    (``one_sided``, ``patience``, ``warmup``, ``rearm_after``). Values are Python floats.
    """
    name = "window"
    SETTINGS = _WindowBase.SETTINGS + ("eps",)

    def __init__(self, tau: float = 0.5, window: int = 30, *, eps: float = 1e-8, **opts):
        super().__init__(tau, window, **opts)
        self.eps = check_scalar(eps, "eps", "(0, inf)")   # 0 divides by zero on a constant window
        self.frozen: Optional[tuple] = None   # (mean, std) pinned while a violation streak is open

    def _z(self, h: float) -> float:
        prev = list(self.values)[-self.window:]
        self.values.append(h)
        if len(prev) < self.window:
            return math.nan
        mean, std = self.frozen if self.frozen is not None else self._mean_std(prev)
        self._last = (mean, std)
        return (h - mean) / (std + self.eps)

    def _streak_opened(self) -> None:
        self.frozen = self._last

    def _streak_closed(self) -> None:
        self.frozen = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "eps": self.eps, "frozen": self.frozen}

    def _read_state(self, sd: dict) -> dict:
        fr = sd.get("frozen")
        return {**super()._read_state(sd), "eps": check_scalar(sd.get("eps", self.eps), "eps", "(0, inf)"),
                "frozen": None if fr is None else tuple(check_scalar(v, "frozen") for v in fr)}


class EntropyGate(_WindowBase):
    """SFPO's gate: z of the latest mean token entropy over the last ``window`` entropies, latest included.

    ``tau``: fire when z >= tau (1.0; one-sided unless ``one_sided=False``). ``window``: entropies scored, >= 2
    (30). ``**opts``: the common options (``one_sided``, ``patience``, ``warmup``, ``rearm_after``). Values are
    Python floats (a 0-d tensor entropy is read with ``float``).
    """
    name = "entropy"
    needs_entropy = True

    def __init__(self, tau: float = 1.0, window: int = 30, **opts):
        opts.setdefault("one_sided", True)
        super().__init__(tau, window, **opts)

    def _z(self, h: float) -> float:
        self.values.append(h)
        last = list(self.values)[-self.window:]
        if len(last) < self.window:
            return math.nan
        mean, std = self._mean_std(last)
        return (h - mean) / (std + 1e-9)


def make_gate(gate, *, tau: float, omega: float = 0.1, window: int = 30, **opts) -> Gate:
    """``gate`` is a Gate instance, None (never fires), "ema", "window" or "entropy"; ``opts`` are the common
    gate options (one_sided, patience, warmup, rearm_after; None entries keep the gate's default)."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if isinstance(gate, Gate):
        if opts:
            raise ValueError(f"gate options {sorted(opts)} apply to a gate built by name; set them on the Gate")
        return gate
    if gate is None:
        return NoGate()
    if gate == "ema":
        return EMAGate(tau=tau, omega=omega, **opts)
    if gate == "window":
        return WindowGate(tau=tau, window=window, **opts)
    if gate == "entropy":
        return EntropyGate(tau=tau, window=window, **opts)
    raise ValueError(f"gate must be 'ema', 'window', 'entropy', None or a Gate instance, got {gate!r}")
