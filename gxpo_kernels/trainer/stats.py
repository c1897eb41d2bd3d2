"""Pure numerics behind the speedup report: curves, thresholds, first reach, bootstrap, multiplier, cost model.

Everything here is NumPy on small arrays and has no I/O; ``report.py`` assembles it into results.json.

Speedup to a threshold: a method's *figure* is its step / backward-pass count /
wall-clock at the first validation point whose score reaches the threshold; the *speedup ratio* is
``GRPO's figure / method's figure`` (> 1 means the method is faster). Three threshold variants, all from the
baseline's curve of the same seed (peak = max of that curve, v0 = its warm-start score):

* ``strict``  first v >= peak (the papers' definition, no smoothing);
* ``eps``     first v >= peak - eps;
* ``gain90``  first v >= v0 + gain_frac * (peak - v0).

Scores are compared with a tolerance of ``TIE_TOL`` so that a value equal to the target up to float rounding
(e.g. ``0.6 - 0.01`` vs ``0.59``) counts as reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

THRESHOLDS = ("strict", "eps", "gain90")
TIE_TOL = 1e-9
METHOD_KINDS = ("gxpo", "sfpo", "grpo")


@dataclass
class Curve:
    """A validation curve: one entry per validation record, sorted by step (arrays of length T)."""
    step: np.ndarray          # int64 [T]  update index (0 = warm start)
    bp: np.ndarray            # float64 [T] cumulative backward passes
    opt: np.ndarray           # float64 [T] cumulative optimizer steps
    wall: np.ndarray          # float64 [T] cumulative training seconds (validation excluded)
    score: np.ndarray         # float64 [T] the score_key value
    per_prompt: Optional[np.ndarray] = None   # float64 [T, P] 0/1 correctness, when every point logs it
    cost: Optional[np.ndarray] = None         # float64 [T] measured cost (``cost_curve``); None = wall

    def rows(self) -> list:
        """[step, backward passes, optimizer steps, wall, score, cost] per validation point."""
        cost = self.wall if self.cost is None else self.cost
        return [[int(s), float(b), float(o), float(w), float(v), float(c)]
                for s, b, o, w, v, c in zip(self.step, self.bp, self.opt, self.wall, self.score, cost)]


def curve_from_records(records: Sequence[Mapping], score_key: str = "greedy_acc") -> Curve:
    """Extract the validation curve from per-step records (those carrying ``val``), sorted by ``step``."""
    pts = sorted((r for r in records if r.get("val") is not None), key=lambda r: int(r["step"]))
    if not pts:
        raise ValueError("records hold no validation point (no record has a 'val' dict)")
    for r in pts:
        if score_key not in r["val"]:
            raise ValueError(f"validation record at step {r['step']} has no score_key {score_key!r}")
        if r["val"][score_key] is None or not np.isfinite(float(r["val"][score_key])):
            raise ValueError(f"validation record at step {r['step']}: {score_key!r} is not a finite number")
    pp = [r["val"].get("per_prompt") for r in pts]
    per_prompt = None
    if all(p is not None for p in pp) and len({len(p) for p in pp}) == 1 and len(pp[0]) > 0:
        per_prompt = np.asarray(pp, dtype=np.float64)
    return Curve(
        step=np.array([int(r["step"]) for r in pts], dtype=np.int64),
        bp=np.array([float(r.get("backward_passes", 0)) for r in pts]),
        opt=np.array([float(r.get("optimizer_steps", 0)) for r in pts]),
        wall=np.array([float(r.get("wall_clock", 0.0)) for r in pts]),
        score=np.array([float(r["val"][score_key]) for r in pts]),
        per_prompt=per_prompt,
    )


def threshold_targets(base_scores: np.ndarray, *, eps: float, gain_frac: float) -> dict:
    """Targets of the three variants from baseline scores ``[..., T]`` (index 0 = warm start) -> ``{name: [...]}``."""
    peak = base_scores.max(axis=-1)
    v0 = base_scores[..., 0]
    return {"strict": peak, "eps": peak - eps, "gain90": v0 + gain_frac * (peak - v0)}


def first_reach(scores: np.ndarray, target) -> np.ndarray:
    """Index of the first point with ``score >= target`` (up to TIE_TOL) along the last axis; -1 if never.

    scores: [..., T]; target: scalar or [...] broadcastable to scores[..., 0].
    """
    hit = scores >= np.asarray(target, dtype=np.float64)[..., None] - TIE_TOL
    idx = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), idx, -1)


def speedup(base_fig, m_fig, reached) -> np.ndarray:
    """``base_fig / m_fig`` elementwise (arrays broadcast); 0 where not reached; NaN where degenerate.

    Degenerate = the baseline's figure is 0 (its threshold was already met at the warm start: nothing to
    speed up) or a reached method's figure is 0. ``m_fig`` is ignored where not reached.
    """
    b, m, ok = np.broadcast_arrays(np.asarray(base_fig, np.float64), np.asarray(m_fig, np.float64),
                                   np.asarray(reached, bool))
    r = np.where(ok, b / np.where(m > 0, m, 1.0), 0.0)
    return np.where((b <= 0) | (ok & (m <= 0)), np.nan, r)


def median_ratio(ratios, axis: int = -1):
    """The median of speedup ratios along ``axis`` (0 = not reached; NaN = degenerate, left out), except that an
    even count whose two middle values are a not-reached 0 and a reached ratio gives 0 (not reached): their
    average is a ratio no seed had (0 and 2.0x gave 1.00x). All NaN gives NaN. The one median of the report's
    ratios: the point estimate, both bootstraps and the leave-one-seed-out range use it."""
    s = np.sort(np.moveaxis(np.asarray(ratios, dtype=np.float64), axis, -1), axis=-1)   # NaN sorts last
    n = np.sum(~np.isnan(s), axis=-1)
    pick = lambda i: np.take_along_axis(s, np.maximum(i, 0)[..., None], axis=-1)[..., 0]   # noqa: E731
    lo, hi = pick((n - 1) // 2), pick(n // 2)
    med = np.where((n % 2 == 0) & (lo == 0) & (hi > 0), 0.0, (lo + hi) / 2)
    med = np.where(n == 0, np.nan, med)
    return float(med) if med.ndim == 0 else med


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 stat=median_ratio) -> list:
    """Percentile bootstrap CI ``[lo, hi]`` of ``stat`` (``stat(samples, axis=1)``; default ``median_ratio``)
    over ``values`` (resampled with replacement).

    Deterministic given ``seed``; one value (or identical values) gives a zero-width interval.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    boot = stat(v[idx], axis=1)
    return percentile_ci(boot, level)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> Optional[list]:
    """``[lo, hi]`` percentiles of the finite bootstrap samples, or None when none is finite."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    a = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(s, [a, 100.0 - a])
    return [float(lo), float(hi)]


def resample_counts(n_points: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities ``[n_boot, n_points]`` of one with-replacement index draw per bootstrap replicate."""
    idx = rng.integers(0, n_points, size=(n_boot, n_points))
    flat = idx + np.arange(n_boot)[:, None] * n_points
    return np.bincount(flat.ravel(), minlength=n_boot * n_points).reshape(n_boot, n_points).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Effective step multiplier
# ----------------------------------------------------------------------------------------------------------
def _step_multiplier(upd: Mapping, kind: str, step: int) -> float:
    if upd.get("skipped", False):   # non-finite gradients: θ did not move
        return 0.0
    if not upd.get("active", False) or upd.get("fallback", False) or upd.get("fell_back", False):
        return 1.0
    if kind == "gxpo":
        need = ("alpha", "scale_mean")
    else:
        need = ("alpha", "K")
    missing = [k for k in need if upd.get(k) is None]
    if missing:
        raise ValueError(f"records: active {kind} step {step} has no update[{missing[0]!r}]")
    if kind == "gxpo":
        # θ̃ − θ0 = α·scale⊙(θ2 − θ0) with θ2 − θ0 ≈ 2 GRPO steps, then one corrective step.
        return 2.0 * float(upd["alpha"]) * float(upd["scale_mean"]) + 1.0
    # SFPO: θ̃ − θ0 = α(θ_K − θ0) ≈ α·K GRPO steps, then one slow step.
    return float(upd["alpha"]) * float(upd["K"]) + 1.0


def effective_step_multiplier(records: Sequence[Mapping], method_kind: str) -> float:
    """Mean over update steps (step >= 1) of how many GRPO-sized steps each update moves θ.

    * ``grpo``: 1 per step; 0 for a step that took no optimizer step (``skipped``: every pass's gradient was
      not finite, θ unchanged), as for the other kinds.
    * ``gxpo``: an active step moves θ0 → θ0 + α·scale⊙(θ2 − θ0); θ2 − θ0 is two optimizer steps, so the
      move is ≈ 2·α·scale_mean GRPO steps, plus one corrective step: ``2·α·scale_mean + 1``. Inactive
      (gate fired) or fallback steps count 1, skipped ones (``skipped``: non-finite gradients, θ unchanged) 0. ``scale_mean`` is the coordinate mean of the scale, so this is
      an approximation when scale varies across coordinates.
    * ``sfpo``: ``α·K + 1`` while active, 1 after its gate fired.

    Keys read from each record's ``update`` dict: ``active`` (bool; missing = False), ``fallback`` or
    ``fell_back`` (optional bool: the step fell back to one GRPO step), ``alpha``, and ``scale_mean`` (gxpo)
    or ``K`` (sfpo) on active steps. Raises ValueError if a needed key is missing (never a silent 1.0).
    """
    if method_kind not in METHOD_KINDS:
        raise ValueError(f"method_kind must be one of {METHOD_KINDS}, got {method_kind!r}")
    steps = [r for r in records if int(r.get("step", 0)) >= 1]
    if not steps:
        raise ValueError("records hold no update step (step >= 1)")
    if method_kind == "grpo":
        return float(np.mean([0.0 if (r.get("update") or {}).get("skipped", False) else 1.0 for r in steps]))
    if not any("active" in (r.get("update") or {}) for r in steps):
        raise ValueError(f"records log no update['active']: cannot tell active {method_kind} steps")
    vals = [_step_multiplier(r.get("update") or {}, method_kind, int(r["step"])) for r in steps]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------------------
# Record keys of each clock: (rollout, backward passes, whole update). "cpu" = process CPU time of the run (what
# it computed, not inflated by other work on a shared machine); "wall" = perf_counter seconds.
CLOCK_KEYS = {"cpu": ("cpu_rollout", "cpu_backward", "cpu_update"), "wall": ("t_rollout", "t_backward", None)}
CLOCK_TEXT = {"cpu": "process CPU time (time.process_time of the run's own process)",
              "wall": "wall-clock (time.perf_counter; includes waiting for other work on the machine)"}


def _update_steps(records: Iterable[Mapping]):
    return [r for r in records if int(r.get("step", 0)) >= 1]


def _has(r: Mapping, keys) -> bool:
    return all(r.get(k) is not None for k in keys if k is not None)


def cost_clock(all_records: Iterable[Sequence[Mapping]]) -> Optional[str]:
    """``"cpu"`` when every update step of every run logs the CPU keys, else ``"wall"`` when every one logs the
    wall keys (``t_rollout``, ``t_backward``, ``t_optimizer``), else None (no cost model). A run on CUDA (its
    records carry ``gpu_update``) is costed on the wall clock: process CPU time does not see the GPU's work
    (a pass's kernels cost the host a launch), and the wall-clock phases end with a device sync."""
    steps = [r for recs in all_records for r in _update_steps(recs)]
    on_gpu = any(r.get("gpu_update") is not None for r in steps)
    if steps and not on_gpu and all(_has(r, CLOCK_KEYS["cpu"]) for r in steps):
        return "cpu"
    if steps and all(_has(r, ("t_rollout", "t_backward", "t_optimizer")) for r in steps):
        return "wall"
    return None


def _phase_times(r: Mapping, clock: str) -> tuple:
    """(rollout, backward, rest of the update) seconds of one step record on ``clock``."""
    if clock == "cpu":
        bwd = float(r["cpu_backward"])
        return float(r["cpu_rollout"]), bwd, max(float(r["cpu_update"]) - bwd, 0.0)
    return float(r["t_rollout"]), float(r["t_backward"]), float(r["t_optimizer"])


def shared_rollout_time(all_records: Iterable[Sequence[Mapping]], clock: str) -> float:
    """Median rollout time per step over every update step of every run (all methods, all seeds).

    A rollout is the same work for every method (same batch shape, same generation), so one shared figure is
    used for all of them instead of each method's own sample, which another process on the machine can skew."""
    vals = [_phase_times(r, clock)[0] for recs in all_records for r in _update_steps(recs)]
    if not vals:
        raise ValueError("records hold no update step with timing")
    return float(np.median(vals))


def cost_model(records_by_seed: Iterable[Sequence[Mapping]], clock: Optional[str] = None,
               t_roll: Optional[float] = None) -> Optional[dict]:
    """Per-unit times of one method, medians over all its update steps of all seeds, on ``clock``.

    t_bp = median of backward time / backward passes this step; t_opt = median of the rest of the update
    (optimizer steps, clipping, the rule's arithmetic) / optimizer steps this step; t_roll = ``t_roll`` when
    given (the shared figure of ``shared_rollout_time``), else this method's own median rollout time.
    ``clock`` None picks ``cost_clock`` of these records. Returns None when the timing keys are absent.
    """
    records_by_seed = [list(r) for r in records_by_seed]
    clock = clock or cost_clock(records_by_seed)
    if clock is None:
        return None
    roll, bp, opt, n = [], [], [], 0
    for records in records_by_seed:
        prev_bp, prev_opt = 0.0, 0.0
        for r in sorted(records, key=lambda r: int(r["step"])):
            d_bp = float(r.get("backward_passes", 0)) - prev_bp
            d_opt = float(r.get("optimizer_steps", 0)) - prev_opt
            prev_bp, prev_opt = float(r.get("backward_passes", 0)), float(r.get("optimizer_steps", 0))
            if int(r["step"]) < 1:
                continue
            try:
                t_r, t_b, t_o = _phase_times(r, clock)
            except (KeyError, TypeError):
                continue
            n += 1
            roll.append(t_r)
            if d_bp > 0:
                bp.append(t_b / d_bp)
            if d_opt > 0:
                opt.append(t_o / d_opt)
    if not roll or not bp:
        return None
    return {"t_roll": float(np.median(roll)) if t_roll is None else float(t_roll), "t_bp": float(np.median(bp)),
            "t_opt": float(np.median(opt)) if opt else 0.0, "n_steps": n, "clock": clock,
            "t_roll_own": float(np.median(roll))}


def cost_curve(records: Sequence[Mapping], steps: np.ndarray, clock: Optional[str],
               t_roll: Optional[float]) -> np.ndarray:
    """Measured cost up to each step in ``steps``: ``step * t_roll`` (the shared rollout figure) plus the run's
    own measured update time (backward passes + the rest) summed over steps 1..step. ``clock`` None: the
    records' ``wall_clock``."""
    recs = sorted(_update_steps(records), key=lambda r: int(r["step"]))
    if clock is None or t_roll is None:
        by_step = {int(r["step"]): float(r.get("wall_clock", 0.0)) for r in recs}
        return np.array([by_step.get(int(s), 0.0) for s in steps], dtype=np.float64)
    upd = np.cumsum([0.0] + [sum(_phase_times(r, clock)[1:]) for r in recs])
    idx = np.searchsorted([int(r["step"]) for r in recs], np.asarray(steps), side="right")
    return np.asarray(steps, np.float64) * t_roll + upd[idx]


def still_rising(step: np.ndarray, score: np.ndarray, window: int = 3, tol: float = 0.0) -> dict:
    """Whether a validation curve is still rising at its end, i.e. its peak measures the horizon.

    Rising = the best score is first reached in the last ``window`` validation points *and* the mean of those points
    exceeds the mean of the ``window`` points before them by more than ``tol``. A curve with fewer than
    ``2 * window`` points is reported as rising (too short to tell)."""
    step, score = np.asarray(step), np.asarray(score, np.float64)
    if score.size < 2 * window:
        return {"rising": True, "reason": f"fewer than {2 * window} validation points", "peak_step": None,
                "trend": None}
    last, prev = score[-window:].mean(), score[-2 * window:-window].mean()
    peak_i = int(np.argmax(score))
    # the peak's *first* reach, the baseline's figure for the strict target: a tie with an earlier best is not a
    # peak at the horizon (a curve level at its best since before the last window would be flagged otherwise)
    rising = bool(peak_i >= score.size - window and last - prev > tol)
    return {"rising": rising, "peak_step": int(step[peak_i]), "last_step": int(step[-1]),
            "trend": float(last - prev),
            "reason": ("peak in the last {w} validations and their mean above the {w} before by {d:+.4f}"
                       if rising else "peak earlier or no upward trend over the last {w} validations "
                       "(mean change {d:+.4f})").format(w=window, d=last - prev)}


def late_trend(step: np.ndarray, score: np.ndarray, frac: float = 0.5) -> dict:
    """How much a validation curve still climbs over its last ``frac`` of validations (at least 4 points): the
    least-squares line's gain across them, that gain as a share of the curve's whole gain (best − first), and the
    slope's t statistic (about 2 or more: a climb the validation noise does not explain; None for points exactly
    on a line). A levelled-off curve has a gain near 0 and a small t; a slow creep has a small share but a large
    t."""
    step, score = np.asarray(step, np.float64), np.asarray(score, np.float64)
    k = max(4, int(np.ceil(frac * score.size)))
    if score.size < k:
        return {"points": int(score.size), "gain": None, "share": None, "t": None}
    x, y = step[-k:] - step[-k:].mean(), score[-k:]
    sxx = float(x @ x)
    slope = float(x @ (y - y.mean())) / sxx
    resid = y - y.mean() - slope * x
    # residuals at float-rounding level are points exactly on a line: no t (not 0.0 or ~1e15 from the rounding)
    on_line = float(np.abs(resid).max()) <= 1e-12 * max(1.0, float(np.abs(y).max()))
    se = 0.0 if on_line else math.sqrt(float(resid @ resid) / (k - 2) / sxx)
    total = float(score.max() - score[0])
    gain = slope * float(step[-1] - step[-k])
    return {"points": k, "from_step": int(step[-k]), "gain": gain,
            "share": gain / total if total > 0 else None, "t": slope / se if se > 0 else None}


def projected_rollout_time(share: float, base_cm: Mapping) -> float:
    """Rollout time t_roll' per step such that for the baseline (1 pass + 1 optimizer step per step)
    ``t_roll' / (t_roll' + t_bp + t_opt) = share``. ``share = 1`` gives ``inf`` (rollout-bound limit)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"rollout share must be in [0, 1], got {share}")
    if share == 1.0:
        return float("inf")
    return share / (1.0 - share) * (float(base_cm["t_bp"]) + float(base_cm["t_opt"]))


def projected_time(steps, bp, opt, t_roll: float, cm: Mapping):
    """Projected time-to-threshold ``steps·t_roll' + bp·t_bp + opt·t_opt`` (arrays broadcast)."""
    return (np.asarray(steps, np.float64) * t_roll + np.asarray(bp, np.float64) * cm["t_bp"]
            + np.asarray(opt, np.float64) * cm["t_opt"])


def projected_ratio(base_fig: Sequence, m_fig: Sequence, share: float, base_cm: Mapping, m_cm: Mapping,
                    reached=True):
    """Projected wall-clock speedup at rollout share ``share`` of the baseline's step time.

    ``base_fig`` / ``m_fig`` = (steps, backward passes, optimizer steps) at the threshold (arrays allowed).
    Rollout time is the same per step for every method (same batch); each method keeps its own t_bp, t_opt.
    Share 0 with t_opt = 0 gives (BP_G·t_bp,G)/(BP_M·t_bp,M), i.e. BP_G/BP_M for equal pass costs; share 1
    gives the step ratio exactly (the limit).
    """
    t_roll = projected_rollout_time(share, base_cm)
    if np.isinf(t_roll):
        return speedup(base_fig[0], m_fig[0], reached)
    return speedup(projected_time(*base_fig, t_roll, base_cm), projected_time(*m_fig, t_roll, m_cm), reached)
