"""Gates that switch an extrapolating update rule to plain single-pass GRPO, permanently (spec §2, §3).

Each gate sees one scalar per active step (``observe``), returns its z-score, and sets ``fired`` when the
rule must stop extrapolating. All statistics are Python floats (float64) so ``state_dict`` round trips are
bit-exact. Under data parallelism the observed value must already be globally reduced.

- ``EMAGate`` (GXPO default, paper era): Z = (H − μ)/(σ + 1e-8) before the update, then
  σ² ← (1−ω)σ² + ω(H − μ)², σ ← max(σ, 0.01), μ ← (1−ω)μ + ωH; start μ = σ = 1. Fires when |Z| ≥ τ.
- ``WindowGate`` (the authors' later code): the newest value scored against the preceding ``window``
  observations (population std, + 1e-8); no decision until that window is full. Fires when |Z| ≥ τ.
- ``EntropyGate`` (SFPO): append the mean token entropy; once ≥ ``window`` values, z = (H_last − mean)/
  (pop-std + 1e-9) over the last ``window`` values (the latest included). Fires when z ≥ τ (one-sided).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional


class Gate:
    """Base: ``observe(value) -> z`` (NaN while undecided), ``fired``, ``fired_step``, state dicts."""

    name = "none"
    needs_entropy = False

    def __init__(self, tau: float = math.inf):
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.tau = float(tau)
        self.fired = False
        self.fired_step: Optional[int] = None
        self.n_observed = 0

    def _z(self, value: float) -> float:
        return math.nan

    def _fires(self, z: float) -> bool:
        return abs(z) >= self.tau

    def observe(self, value: float, step: Optional[int] = None) -> float:
        value = float(value)
        z = self._z(value)
        self.n_observed += 1
        if not self.fired and not math.isnan(z) and self._fires(z):
            self.fired = True
            self.fired_step = step
        return z

    def state_dict(self) -> dict:
        return {"name": self.name, "tau": self.tau, "fired": self.fired, "fired_step": self.fired_step,
                "n_observed": self.n_observed}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"state_dict is for gate {sd.get('name')!r}, this gate is {self.name!r}")
        self.tau, self.fired, self.fired_step = float(sd["tau"]), bool(sd["fired"]), sd["fired_step"]
        self.n_observed = int(sd["n_observed"])


class NoGate(Gate):
    """Never fires (``gate=None``)."""

    def _fires(self, z: float) -> bool:
        return False


class EMAGate(Gate):
    name = "ema"

    def __init__(self, tau: float = 0.5, omega: float = 0.1, mu0: float = 1.0, sigma0: float = 1.0,
                 sigma_min: float = 0.01):
        super().__init__(tau)
        if not 0 < omega <= 1:
            raise ValueError(f"omega must be in (0, 1], got {omega!r}")
        self.omega, self.sigma_min = float(omega), float(sigma_min)
        self.mu, self.sigma = float(mu0), float(sigma0)

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

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.omega, self.mu, self.sigma, self.sigma_min = sd["omega"], sd["mu"], sd["sigma"], sd["sigma_min"]


class _WindowBase(Gate):
    def __init__(self, tau: float, window: int):
        super().__init__(tau)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        self.window = window
        self.values: deque = deque(maxlen=window + 1)

    @staticmethod
    def _mean_std(xs):
        n = len(xs)
        mean = sum(xs) / n
        return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / n)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "window": self.window, "values": list(self.values)}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.window = int(sd["window"])
        self.values = deque(sd["values"], maxlen=self.window + 1)


class WindowGate(_WindowBase):
    name = "window"

    def __init__(self, tau: float = 0.5, window: int = 30):
        super().__init__(tau, window)

    def _z(self, h: float) -> float:
        prev = list(self.values)[-self.window:]
        self.values.append(h)
        if len(prev) < self.window:
            return math.nan
        mean, std = self._mean_std(prev)
        return (h - mean) / (std + 1e-8)


class EntropyGate(_WindowBase):
    name = "entropy"
    needs_entropy = True

    def __init__(self, tau: float = 1.0, window: int = 30):
        super().__init__(tau, window)

    def _z(self, h: float) -> float:
        self.values.append(h)
        last = list(self.values)[-self.window:]
        if len(last) < self.window:
            return math.nan
        mean, std = self._mean_std(last)
        return (h - mean) / (std + 1e-9)

    def _fires(self, z: float) -> bool:
        return z >= self.tau


def make_gate(gate, *, tau: float, omega: float = 0.1, window: int = 30) -> Gate:
    """``gate`` is a Gate instance, None (never fires), "ema", "window" or "entropy"."""
    if isinstance(gate, Gate):
        return gate
    if gate is None:
        return NoGate()
    if gate == "ema":
        return EMAGate(tau=tau, omega=omega)
    if gate == "window":
        return WindowGate(tau=tau, window=window)
    if gate == "entropy":
        return EntropyGate(tau=tau, window=window)
    raise ValueError(f"gate must be 'ema', 'window', 'entropy', None or a Gate instance, got {gate!r}")
