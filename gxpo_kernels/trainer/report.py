"""Speedup-to-peak report: results.json, speedup.png and a terminal table from per-step training records.

``runs = {method: {seed: [record, ...]}}``; each record is one update step (``step`` >= 1) or the warm start
(``step`` 0). Keys read (others are ignored):

* ``step`` (int), ``backward_passes``, ``optimizer_steps`` (cumulative), ``wall_clock`` (cumulative training
  seconds, validation excluded);
* ``t_rollout``, ``t_backward``, ``t_optimizer`` (this step's seconds) - for the cost model only;
* ``val`` on validation steps: ``{score_key: float, "per_prompt": optional [0/1 per validation prompt]}``;
* ``update`` (dict): ``active``, ``fallback``, ``alpha``, ``scale_mean`` (gxpo), ``K`` (sfpo) for the effective
  step multiplier; ``gate``, ``gate_fired_step`` for the gate summary; optional ``rule`` in
  {"gxpo", "sfpo", "grpo"} names the method kind (else it is read from the method name's prefix).

The maths (thresholds, ratios, bootstrap, multiplier, cost model) is in ``stats.py``; the figure in ``plot.py``.
Rebuild a report from disk with ``python -m gxpo_kernels.trainer.report <folder>``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import stats
from .stats import THRESHOLDS

RATIO_KEYS = ("ratio_steps", "ratio_bp", "ratio_cost", "ratio_wall")
THRESHOLD_TEXT = {
    "strict": "first validation score >= {b}'s peak (no smoothing)",
    "eps": "first validation score >= {b}'s peak - {eps:g}",
    "gain90": "first validation score >= v0 + {gf:g} x ({b}'s peak - v0), v0 = warm-start score",
}
HEADLINE_NAME = {"strict": "{b}'s peak", "eps": "within {eps:g} of {b}'s peak",
                 "gain90": "{pct:g}% of {b}'s gain"}


def _share_key(share: float) -> str:
    return f"{share:g}"


def _f(x) -> Optional[float]:
    """JSON-safe float: NaN/inf -> None."""
    return float(x) if x is not None and np.isfinite(x) else None


def _nan(x) -> float:
    """None (a degenerate ratio in JSON) -> NaN, so it is dropped from the aggregates."""
    return np.nan if x is None else float(x)


def _method_kind(name: str, seeds: Mapping, method_kinds: Optional[Mapping]) -> Optional[str]:
    if method_kinds and name in method_kinds:
        return method_kinds[name]
    for recs in seeds.values():
        for r in recs:
            u = r.get("update") or {}
            for rule in (u.get("rule"), u.get("algo")):
                if rule in stats.METHOD_KINDS:
                    return rule
    low = name.lower()
    return next((k for k in stats.METHOD_KINDS if low.startswith(k)), None)


def _gate_info(records: Sequence[Mapping]) -> Optional[dict]:
    """Which gate ran and when it fired, from ``update['gate']`` / ``update['gate_fired_step']`` / ``active``."""
    gate = fired = first_inactive = None
    for r in sorted(records, key=lambda r: int(r["step"])):
        u = r.get("update") or {}
        if int(r["step"]) < 1:
            continue
        gate = u.get("gate", gate)
        at = u.get("gate_fired_step", r.get("gate_fired_at"))
        if fired is None and at is not None:
            fired = int(at)
        if first_inactive is None and "active" in u and not u["active"]:
            first_inactive = int(r["step"])
    if gate is None and fired is None and first_inactive is None:
        return None
    return {"gate": gate, "fired_step": fired, "first_inactive_step": first_inactive}


def _cost(c: stats.Curve) -> np.ndarray:
    return c.wall if c.cost is None else c.cost


def _ratios(base: stats.Curve, b_scores, cur: stats.Curve, m_scores, *, eps, gain_frac, shares,
            cm_base, cm_m) -> dict:
    """Vectorised over B resampled curves: scores are [B, T]. Returns {threshold: {field: array [B]}}."""
    out = {}
    for name, target in stats.threshold_targets(b_scores, eps=eps, gain_frac=gain_frac).items():
        ib = stats.first_reach(b_scores, target)   # always >= 0: every target <= the baseline's peak
        im = stats.first_reach(m_scores, target)
        ok = im >= 0
        bfig = (base.step[ib], base.bp[ib], base.opt[ib])
        mfig = (cur.step[im], cur.bp[im], cur.opt[im])
        d = {"target": target, "ib": ib, "im": im, "reached": ok,
             "degenerate": (base.step[ib] <= 0) | (ok & (cur.step[im] <= 0)),
             "ratio_steps": stats.speedup(bfig[0], mfig[0], ok),
             "ratio_bp": stats.speedup(bfig[1], mfig[1], ok),
             "ratio_cost": stats.speedup(_cost(base)[ib], _cost(cur)[im], ok),
             "ratio_wall": stats.speedup(base.wall[ib], cur.wall[im], ok), "projected": {}}
        if cm_base is not None and cm_m is not None:
            for s in shares:
                d["projected"][_share_key(s)] = stats.projected_ratio(bfig, mfig, s, cm_base, cm_m, ok)
        out[name] = d
    return out


def _seed_entry(cur: stats.Curve, r: Optional[dict]) -> dict:
    """JSON entry of one seed from the point-estimate ratios ``r`` (B = 1) of ``_ratios``."""
    entry = {"curve": cur.rows(), "peak": float(cur.score.max()),
             "peak_step": int(cur.step[int(np.argmax(cur.score))]),
             "last_mean": float(cur.score[-3:].mean()),
             "v0": float(cur.score[0]) if cur.step[0] == 0 else None, "thresholds": None}
    if r is None:
        return entry
    entry["thresholds"] = {}
    for name, d in r.items():
        ok, im = bool(d["reached"][0]), int(d["im"][0])
        entry["thresholds"][name] = {
            "target": float(d["target"][0]), "reached": ok, "degenerate": bool(d["degenerate"][0]),
            "step": int(cur.step[im]) if ok else None, "bp": float(cur.bp[im]) if ok else None,
            "optimizer_steps": float(cur.opt[im]) if ok else None, "wall": float(cur.wall[im]) if ok else None,
            "cost": float(_cost(cur)[im]) if ok else None,
            **{k: (_f(d[k][0]) if ok else None) for k in RATIO_KEYS},
            "projected": {s: (_f(v[0]) if ok else None) for s, v in d["projected"].items()} or None}
    return entry


def _median(v: np.ndarray) -> float:
    """``stats.median_ratio`` of per-seed ratios (a not-reached and a reached middle seed are not averaged)."""
    return stats.median_ratio(v)


def _summary(vals, *, n_boot, seed, level) -> dict:
    """median/min/max and seed-bootstrap CI of per-seed ratios (0 = not reached, NaN = degenerate dropped). One
    seed has no CI over seeds (None): resampling one value gives a zero-width interval that says nothing of the
    seed-to-seed spread."""
    v = np.asarray(vals, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"median": None, "min": None, "max": None, "ci_seeds": None, "ci_prompts": None}
    return {"median": _median(v), "min": float(v.min()), "max": float(v.max()),
            "ci_seeds": stats.bootstrap_ci(v, n_boot=n_boot, seed=seed, level=level) if v.size > 1 else None,
            "ci_prompts": None}


def _prompt_ci(per_seed_draws: list, level: float) -> Optional[list]:
    """CI of the median over seeds from per-seed bootstrap ratio draws (each [B]; NaN = degenerate)."""
    # the point estimate's median rule in every draw (all-NaN draws -> NaN, dropped by percentile_ci)
    return stats.percentile_ci(stats.median_ratio(np.stack(per_seed_draws), axis=0), level)   # [S, B] -> [B]


def _index_summary(index: Optional[Mapping]) -> Optional[dict]:
    """What ran, from runs.json: workers, threads, the train config, environment, lr multiplier, warm start,
    per-run status and seconds."""
    if not index:
        return None
    keys = ("status", "steps_recorded", "steps_configured", "seconds", "cpu_seconds", "cpu_capability",
            "torch_threads")
    per = {m: {s: {k: e.get(k) for k in keys} for s, e in seeds.items()} for m, seeds in index.get("runs", {}).items()}
    ws = index.get("warm_start") or {}
    return {"code": index.get("code"), "workers": index.get("workers"), "threads": index.get("threads"),
            "train": index.get("train"),
            "env": index.get("env"), "status": index.get("status"),
            "seconds": index.get("seconds"), "cpu_seconds": index.get("cpu_seconds"),
            "lr_mult": index.get("lr_mult"), "lr_mult_source": index.get("lr_mult_source"),
            "warm_start": {k: ws.get(k) for k in ("sft_steps", "sft_acc", "bundled", "cached")} if ws else None,
            "runs": per}


def _headline_medians(results: Mapping) -> dict:
    h = results["meta"]["headline"]
    return {m: {k: r["aggregate"][h][k]["median"] for k in ("ratio_steps", "ratio_cost")}
            for m, r in results["methods"].items() if m != results["meta"]["baseline"]}


def _run_difference(here: Optional[Mapping], there: Optional[Mapping]) -> str:
    """What the compared run changed, from the two runs.json indexes: e.g. "a rerun with threads 1 -> 2,
    workers 2 -> 1"."""
    if not here or not there:
        return "another run's results.json"
    diffs = [f"{k} {here.get(k)} -> {there.get(k)}" for k in ("threads", "workers") if here.get(k) != there.get(k)]
    ht, tt = here.get("train") or {}, there.get("train") or {}
    diffs += [f"{k} {ht.get(k)} -> {tt.get(k)}" for k in sorted(set(ht) | set(tt))
              if k not in ("out_dir", "cache_dir", "quiet") and ht.get(k) != tt.get(k)]
    return "a rerun with " + (", ".join(diffs) if diffs else "the same settings")


def _sensitivity(results: Mapping, compare) -> dict:
    """How far the headline medians move: leaving one seed out (always), and against each run of ``compare``
    (other runs' results.json, e.g. with a perturbed thread count, CPU kernel set or warm-start draw)."""
    h = results["meta"]["headline"]
    out = {"leave_one_seed_out": {}}
    for m, r in results["methods"].items():
        if m == results["meta"]["baseline"]:
            continue
        ents = [e["thresholds"][h] for e in r["seeds"].values() if e.get("thresholds")]
        d = {}
        for k in ("ratio_steps", "ratio_cost"):
            v = np.array([_nan(e[k]) if e["reached"] else 0.0 for e in ents if not e["degenerate"]])
            meds = [_median(np.delete(v, i)) for i in range(v.size)] if v.size > 1 else []
            meds = [x for x in meds if np.isfinite(x)]
            d[k] = [min(meds), max(meds)] if meds else None
        out["leave_one_seed_out"][m] = d
    if compare is not None:
        here = _headline_medians(results)
        out["compare"] = []
        for other in ([compare] if isinstance(compare, Mapping) else compare):
            there = _headline_medians(other)
            out["compare"].append({
                "note": other["meta"].get("sensitivity_label")
                or _run_difference(results["meta"].get("runs"), other["meta"].get("runs")),
                "methods": {m: {k: {"here": here[m][k], "there": there[m][k],
                                    "shift": (None if here[m][k] is None or there[m][k] is None
                                              else there[m][k] - here[m][k])}
                                for k in here[m]} for m in here if m in there}})
    return out


def build_report(runs: Mapping, out_dir, *, baseline: str = "grpo", eps: float = 0.01, gain_frac: float = 0.9,
                 rollout_shares: Sequence[float] = (0.3, 0.5, 0.7), n_boot: int = 2000, seed: int = 0,
                 score_key: str = "greedy_acc", method_kinds: Optional[Mapping[str, str]] = None,
                 ci_level: float = 0.95, headline: str = "eps", plot: bool = True,
                 index: Optional[Mapping] = None, problems: Sequence[str] = (),
                 compare=None) -> dict:
    """Compute speedup-to-peak statistics for every method against ``baseline``; write results.json (and
    speedup.png when ``plot``) into ``out_dir``; return the results dict (the JSON content).

    Args:
        runs: ``{method: {seed (int): [record, ...]}}`` (record keys: see the module docstring).
        baseline: method the thresholds and ratios refer to (must be in ``runs``).
        eps: margin of the ``eps`` threshold (first v >= peak - eps).
        gain_frac: fraction of the baseline's gain over the warm start for ``gain90``, in (0, 1].
        rollout_shares: rollout fractions of the baseline's step time for the projected wall-clock, in [0, 1].
        n_boot / seed / ci_level: percentile bootstrap (over seeds, and over validation prompts when every
            validation point logs ``per_prompt``).
        score_key: key of ``val`` used as the validation score.
        method_kinds: optional ``{method: "gxpo"|"sfpo"|"grpo"}`` overriding kind inference.
        headline: threshold variant used for the conclusion lines.
        index: the run's ``runs.json`` content (config, per-run status, lr multiplier, environment), summarised
            into ``meta["runs"]``.
        problems: integrity notes from ``load_index_runs`` (incomplete runs, foreign folders), kept in
            ``meta["problems"]`` and printed with the table.
        compare: another run's results dict, or a list of them (perturbed reruns): the shifts of the headline
            medians go into ``meta["sensitivity"]["compare"]`` (one entry per run) and the table's notes.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty {method: {seed: [records]}} mapping")
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} not in runs (methods: {sorted(runs)})")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not 0 < gain_frac <= 1:
        raise ValueError(f"gain_frac must be in (0, 1], got {gain_frac}")
    if any(not 0 <= s <= 1 for s in rollout_shares):
        raise ValueError(f"rollout_shares must lie in [0, 1], got {tuple(rollout_shares)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if headline not in THRESHOLDS:
        raise ValueError(f"headline must be one of {THRESHOLDS}, got {headline!r}")
    for m, seeds in runs.items():
        if not isinstance(seeds, Mapping) or not seeds:
            raise ValueError(f"runs[{m!r}] must be a non-empty {{seed: [records]}} mapping")
    shares = tuple(float(s) for s in rollout_shares)
    methods = [baseline] + [m for m in runs if m != baseline]
    every = [recs for m in methods for recs in runs[m].values()]
    clock = stats.cost_clock(every)
    t_roll = stats.shared_rollout_time(every, clock) if clock else None
    curves = {}
    for m in methods:
        curves[m] = {}
        for s, recs in sorted(runs[m].items()):
            c = stats.curve_from_records(recs, score_key)
            c.cost = stats.cost_curve(recs, c.step, clock, t_roll)
            curves[m][int(s)] = c
    cms = {m: stats.cost_model(runs[m].values(), clock, t_roll) if clock else None for m in methods}
    kw = dict(eps=eps, gain_frac=gain_frac, shares=shares, cm_base=cms[baseline])
    base_curves = curves[baseline]

    # point estimates per method and seed
    point = {m: {s: (_ratios(base_curves[s], base_curves[s].score[None], c, c.score[None], cm_m=cms[m], **kw)
                     if s in base_curves else None) for s, c in curves[m].items()} for m in methods}

    # prompt bootstrap: one resample of the validation prompts, applied to every method's curves of every seed. The
    # seeds validate on the same prompts (the val set does not depend on the RL seed), so another draw of them would
    # move every seed at once; independent draws per seed averaged that variation away in the median over seeds
    boot, boot_note, draws = {m: {} for m in methods}, None, {}
    for s, bc in base_curves.items():
        users = [m for m in methods if s in curves[m]]
        pp = [curves[m][s].per_prompt for m in users]
        if any(p is None for p in pp) or len({p.shape[1] for p in pp}) != 1:
            boot_note = f"seed {s}: per_prompt missing or of unequal length"
            continue
        if any(np.abs(curves[m][s].per_prompt.mean(1) - curves[m][s].score).max() > 1e-6 for m in users):
            boot_note = f"seed {s}: mean(per_prompt) != val[{score_key!r}] (per_prompt is another metric)"
            continue
        P = pp[0].shape[1]
        if P not in draws:   # (seeds validated on another number of prompts: another draw)
            draws[P] = stats.resample_counts(P, n_boot, np.random.default_rng([seed % 2**32, P]))
        W = draws[P]
        b_scores = W @ bc.per_prompt.T / P
        for m in users:
            c = curves[m][s]
            boot[m][s] = _ratios(bc, b_scores, c, W @ c.per_prompt.T / P, cm_m=cms[m], **kw)

    t_proj = ({_share_key(s): _f(stats.projected_rollout_time(s, cms[baseline])) for s in shares}
              if cms[baseline] else None)
    cb = cms[baseline]
    rising = {str(s): {**stats.still_rising(c.step, c.score, tol=eps / 2),
                       "second_half": stats.late_trend(c.step, c.score, 0.5),
                       "last_quarter": stats.late_trend(c.step, c.score, 0.25)} for s, c in base_curves.items()}
    n_rising = sum(r["rising"] for r in rising.values())
    results = {"meta": {
        "baseline": baseline, "score_key": score_key, "thresholds": {
            k: v.format(b=baseline, eps=eps, gf=gain_frac) for k, v in THRESHOLD_TEXT.items()},
        "eps": eps, "gain_frac": gain_frac, "rollout_shares": list(shares), "n_boot": n_boot, "seed": seed,
        "ci_level": ci_level, "tie_tol": stats.TIE_TOL, "headline": headline,
        "seeds": sorted({s for m in methods for s in curves[m]}),
        "n_seeds": len({s for m in methods for s in curves[m]}), "methods": methods,
        "speedup": f"{baseline}'s figure / method's figure at the threshold (> 1 = faster); not reached = 0",
        "prompt_bootstrap": boot_note or "ok",
        "clocks": {
            "ratio_steps": "update steps", "ratio_bp": "backward passes",
            "ratio_cost": ("measured cost: " + stats.CLOCK_TEXT[clock] + "; rollout = the shared median per step "
                           "over all runs, update = the run's own") if clock else "wall_clock of the records",
            "ratio_wall": "measured wall-clock of each run (" + stats.CLOCK_TEXT["wall"] + "); informational",
            "projected": ("cost model on " + stats.CLOCK_TEXT[clock]) if clock else None},
        "cost_clock": clock,
        "shared_rollout_time": _f(t_roll) if t_roll is not None else None,
        "shared_rollout_time_note": "median rollout time per step over every update step of every run and method "
                                    "(the same work for every method)",
        "baseline_measured_rollout_share": (_f(cb["t_roll"] / (cb["t_roll"] + cb["t_bp"] + cb["t_opt"]))
                                            if cb else None),
        "projected_t_roll": t_proj,
        "baseline_peaked": {"all": n_rising == 0, "n_rising": n_rising, "seeds": rising,
                            "rule": "still rising = best score first reached in the last 3 validations and their "
                                    f"mean above the 3 before by more than eps/2 = {eps / 2:g}",
                            "second_half": "least-squares gain over the last half of the validations, its share "
                                           "of the seed's whole gain (best - first) and the slope's t statistic",
                            "last_quarter": "the same over the last quarter of the validations (at least 4)"},
        "problems": list(problems),
        "runs": _index_summary(index),
    }, "methods": {}}

    for m in methods:
        kind = _method_kind(m, runs[m], method_kinds)
        seeds_out, mults = {}, []
        for s, c in curves[m].items():
            e = _seed_entry(c, point[m][s])
            if point[m][s] is None:
                e["note"] = f"no {baseline} run for seed {s}: no thresholds"
            e["effective_multiplier"] = None
            if kind and any(int(r["step"]) >= 1 for r in runs[m][s]):
                try:
                    e["effective_multiplier"] = stats.effective_step_multiplier(runs[m][s], kind)
                except ValueError as err:   # diagnostics not logged: say so instead of failing the report
                    e["effective_multiplier_note"] = str(err)
            if e["effective_multiplier"] is not None:
                mults.append(e["effective_multiplier"])
            e["gate"] = _gate_info(runs[m][s]) if kind in ("gxpo", "sfpo") else None
            seeds_out[str(s)] = e
        agg = {}
        cmp_seeds = [s for s in curves[m] if point[m][s] is not None]
        for name in THRESHOLDS:
            ents = [seeds_out[str(s)]["thresholds"][name] for s in cmp_seeds]
            valid = [(s, t) for s, t in zip(cmp_seeds, ents) if not t["degenerate"]]
            a = {"n_seeds": len(valid), "n_degenerate": len(ents) - len(valid),
                 "n_reached": sum(t["reached"] for _, t in valid)}
            a["reached"] = f"{a['n_reached']}/{a['n_seeds']}"
            for fig in ("step", "bp", "cost", "wall"):   # median cost with not-reached = infinite
                v = [t[fig] if t["reached"] else np.inf for _, t in valid]
                a[fig] = _f(np.median(v)) if v else None
            has_boot = bool(valid) and all(s in boot[m] for s, _ in valid)
            for k in RATIO_KEYS:
                a[k] = _summary([_nan(t[k]) if t["reached"] else 0.0 for _, t in valid],
                                n_boot=n_boot, seed=seed, level=ci_level)
                if has_boot:
                    a[k]["ci_prompts"] = _prompt_ci([boot[m][s][name][k] for s, _ in valid], ci_level)
            a["projected"] = None
            if valid and valid[0][1]["projected"] is not None:
                a["projected"] = {}
                for sk in valid[0][1]["projected"]:
                    a["projected"][sk] = _summary([_nan(t["projected"][sk]) if t["reached"] else 0.0 for _, t in valid],
                                                  n_boot=n_boot, seed=seed, level=ci_level)
                    if has_boot:
                        a["projected"][sk]["ci_prompts"] = _prompt_ci(
                            [boot[m][s][name]["projected"][sk] for s, _ in valid], ci_level)
            agg[name] = a
        peaks = [e["peak"] for e in seeds_out.values()]
        lasts = [e["last_mean"] for e in seeds_out.values()]
        gates = {s: e["gate"] for s, e in seeds_out.items() if e["gate"]}
        results["methods"][m] = {
            "kind": kind, "seeds": seeds_out, "aggregate": agg,
            "peak": {"median": float(np.median(peaks)), "min": min(peaks), "max": max(peaks)},
            "last_mean": {"median": float(np.median(lasts)), "min": min(lasts), "max": max(lasts)},
            "effective_multiplier": float(np.mean(mults)) if mults else None,
            "cost_model": cms[m], "gate": gates or None}
    results["meta"]["sensitivity"] = _sensitivity(results, compare)
    results["conclusion"] = conclusion_lines(results)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"results.json.tmp{os.getpid()}"   # whole or not at all: a failed dump keeps the old file
    try:
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1, allow_nan=False)
        os.replace(tmp, out / "results.json")
    finally:
        tmp.unlink(missing_ok=True)
    if plot:
        from .plot import plot_speedup
        plot_speedup(results, out / "speedup.png")
    return results


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------
def _frac(ratio) -> str:
    """Cost as a multiple of the baseline's (1/speedup)."""
    if ratio is None:
        return "n/a"
    return "not reached" if ratio == 0 else f"{1.0 / ratio:.2f}x"


def conclusion_lines(results: Mapping) -> list:
    """Plain-language lines: per method, its cost to the headline threshold as a multiple of the baseline's."""
    meta = results["meta"]
    b, h = meta["baseline"], meta["headline"]
    what = HEADLINE_NAME[h].format(b=b, eps=meta["eps"], pct=100 * meta["gain_frac"])
    lines = [peak_warning(meta)] if peak_warning(meta) else []
    if meta.get("problems"):
        lines.append(f"INTEGRITY: {len(meta['problems'])} problem(s): " + "; ".join(meta["problems"]))
    clock = {"cpu": "CPU time", "wall": "wall-clock"}.get(meta.get("cost_clock"), "wall-clock")
    for m in meta["methods"]:
        if m == b:
            continue
        r = results["methods"][m]
        a = r["aggregate"][h]
        if a["n_seeds"] == 0:
            lines.append(f"{m}: no comparable seed with {b} (missing baseline seeds or degenerate thresholds).")
            continue
        med = {k: a[k]["median"] for k in RATIO_KEYS}
        head = f"{m} vs {b}, to reach {what} (median of {a['n_seeds']} seed(s), reached {a['reached']}): "
        if med["ratio_steps"] == 0:
            lines.append(head + f"NOT REACHED in at least half the seeds (not reached in "
                         f"{a['n_seeds'] - a['n_reached']}/{a['n_seeds']}).")
            continue
        s = (head + f"needs {_frac(med['ratio_steps'])} {b}'s steps, {_frac(med['ratio_bp'])} its backward passes, "
             f"{_frac(med['ratio_cost'])} its measured {clock}")
        if a["projected"]:
            proj = "/".join(_frac(v["median"]) for v in a["projected"].values())
            pct = "/".join(f"{100 * float(k):g}%" for k in a["projected"])
            s += f" (projected {clock} at {pct} rollout share: {proj})"
        verdict = ("faster" if (med["ratio_cost"] or 0) > 1 else "not faster") + f" than {b} in measured {clock}"
        ci = a["ratio_cost"]["ci_seeds"]
        if ci is not None and ci[0] <= 1.0 <= ci[1]:   # the seeds do not tell the two apart
            verdict += (f" (but its {100 * meta['ci_level']:g}% CI over seeds, {_ci(ci)}, includes 1x: "
                        "no difference shown)")
        if a["projected"]:
            fast = [k for k, v in a["projected"].items() if (v["median"] or 0) > 1]
            verdict += (f"; projected faster at rollout share {', '.join(f'{100 * float(k):g}%' for k in fast)}"
                        if fast else "; not faster at any projected rollout share")
        s += f" -> {verdict}."
        if r["effective_multiplier"] is not None:
            mult, sp = r["effective_multiplier"], med["ratio_steps"]
            s += (f" Each update moves ~{mult:.2f} {b} steps (effective multiplier) vs a {sp:.2f}x step speedup"
                  + (": consistent with a larger step size alone." if sp <= mult else "."))
        lines.append(s)
    return lines


def peak_warning(meta: Mapping) -> Optional[str]:
    """One line when the baseline was still rising at its last validation in some seed, else None."""
    bp = meta.get("baseline_peaked")
    if not bp or bp["all"]:
        return None
    seeds = [s for s, r in bp["seeds"].items() if r["rising"]]
    return (f"WARNING: {meta['baseline']} was still rising at its last step in {bp['n_rising']}/{len(bp['seeds'])} "
            f"seed(s) ({', '.join(seeds)}): its 'peak' is where the horizon ended, so the ratios measure the time "
            f"to {meta['baseline']}'s score at the horizon, not to its peak (train longer).")


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _ci(c) -> str:
    return f"[{c[0]:.2f},{c[1]:.2f}]" if c else ""


def _cell(summary, ci: bool = True) -> str:
    if summary is None or summary["median"] is None:
        return "n/a"
    return f"{summary['median']:.2f}x {_ci(summary['ci_seeds']) if ci else ''}".strip()


def _gate_text(gates: Optional[Mapping]) -> str:
    if not gates:
        return ""
    names = sorted({str(g["gate"]) for g in gates.values()})
    fired = [g["fired_step"] if g["fired_step"] is not None else g["first_inactive_step"] for g in gates.values()]
    when = "/".join("never" if f is None else str(f) for f in fired)
    return f"  gate {'/'.join(names)} fired at step {when} (seeds {'/'.join(gates)})"


def format_table(results: Mapping) -> str:
    """Terminal rendering: conclusion lines first, then one block per threshold variant."""
    meta = results["meta"]
    b = meta["baseline"]
    shares = list(next(iter(results["methods"].values()))["aggregate"]["strict"]["projected"] or {})
    out = ["CONCLUSION"] + [f"  {ln}" for ln in results.get("conclusion") or conclusion_lines(results)]
    out += ["", f"speedup = {b}'s figure / method's figure at the threshold (> 1 = faster); median over "
            f"{meta['n_seeds']} seed(s) [{100 * meta['ci_level']:g}% bootstrap CI over seeds]; not reached counts "
            "as 0x. steps/BP/cost[s] = median figure at the threshold. x cost = measured cost "
            f"({meta.get('cost_clock') or 'wall'} clock: shared rollout median + own update); x wall = each run's "
            f"own wall-clock (moves with other load); x proj s = projected speedup if rollout took s of {b}'s "
            "step time (cost model, medians)."]
    hdr = (["method", "reached", "steps", "BP", "cost[s]", "x steps", "x BP", "x cost", "x wall"]
           + [f"x proj {100 * float(s):g}%" for s in shares])
    for name in THRESHOLDS:
        rows, notes = [hdr], []
        for m, r in results["methods"].items():
            a = r["aggregate"][name]
            nr = "not reached"
            rows.append([m, a["reached"] + (f" ({a['n_degenerate']} degen.)" if a["n_degenerate"] else ""),
                         f"{a['step']:g}" if a["step"] is not None else nr,
                         f"{a['bp']:g}" if a["bp"] is not None else nr,
                         f"{a['cost']:.1f}" if a["cost"] is not None else nr]
                        + [_cell(a[k]) for k in RATIO_KEYS]
                        + [_cell((a["projected"] or {}).get(s), ci=False) for s in shares])
            if a["n_reached"] < a["n_seeds"]:
                notes.append(f"  {m}: not reached in {a['n_seeds'] - a['n_reached']}/{a['n_seeds']} seed(s)")
            pci = [(k, a[k]["ci_prompts"]) for k in RATIO_KEYS if a[k]["ci_prompts"]]
            if pci and m != b:
                notes.append(f"  {m}: CI over validation prompts: "
                             + ", ".join(f"{k[6:]} {_ci(c)}" for k, c in pci))
        widths = [max(len(row[i]) for row in rows) for i in range(len(hdr))]
        out += ["", f"== {name}: {meta['thresholds'][name]} =="]
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows] + notes
    out += ["", "per method: peak / last-3 mean (median [min,max]); effective step multiplier; cost model "
            "t_roll/t_bp/t_opt [s]; gate"]
    for m, r in results["methods"].items():
        cm = r["cost_model"]
        out.append(f"  {m}: peak {r['peak']['median']:.4f} [{r['peak']['min']:.4f},{r['peak']['max']:.4f}]  "
                   f"last {r['last_mean']['median']:.4f}  mult "
                   + (f"{r['effective_multiplier']:.2f}" if r["effective_multiplier"] is not None else "n/a")
                   + ("  cost " + "/".join(f"{cm[k]:.4f}" for k in ("t_roll", "t_bp", "t_opt")) if cm else "")
                   + _gate_text(r["gate"]))
    if meta.get("baseline_measured_rollout_share") is not None:
        out.append(f"  measured rollout share of {b}'s step time: {meta['baseline_measured_rollout_share']:.2f} "
                   f"(shared rollout {meta['shared_rollout_time']:.4f} s/step, {meta.get('cost_clock')} clock)")
    sens = (meta.get("sensitivity") or {}).get("leave_one_seed_out")
    if sens:
        out.append("  sensitivity, headline median when one seed is left out [min, max]: " + "; ".join(
            f"{m} steps {_ci(d['ratio_steps']) or 'n/a'} cost {_ci(d['ratio_cost']) or 'n/a'}"
            for m, d in sens.items()))
    for cmp_ in (meta.get("sensitivity") or {}).get("compare") or []:
        out.append(f"  sensitivity vs {cmp_['note']}: " + "; ".join(
            f"{m} steps {_x(d['ratio_steps']['here'])} -> {_x(d['ratio_steps']['there'])}"
            for m, d in cmp_["methods"].items()))
    for p in meta.get("problems") or []:
        out.append(f"  PROBLEM: {p}")
    return "\n".join(out)


def markdown_table(results: Mapping, threshold: Optional[str] = None) -> str:
    """Markdown table of one threshold variant (default: the headline one), for README/issue reports.

    Speedups are the baseline's cost / the method's cost (> 1 = faster), median over seeds with the bootstrap
    CI over seeds; projected columns come from the cost model; "not reached" counts as 0x.
    """
    meta = results["meta"]
    name = threshold or meta["headline"]
    shares = list(next(iter(results["methods"].values()))["aggregate"][name]["projected"] or {})
    clock = {"cpu": "CPU time", "wall": "wall-clock"}.get(meta.get("cost_clock"), "wall-clock")
    hdr = (["method", "reached", "steps", "backward passes", f"{clock} (measured)"]
           + [f"{clock} (projected, rollout {100 * float(s):g}%)" for s in shares]
           + ["effective step multiplier", "peak score", "gate fired at step"])
    rows = []
    for m, r in results["methods"].items():
        a = r["aggregate"][name]
        mult = r["effective_multiplier"]
        gates = r.get("gate") or {}
        fired = "/".join("never" if g["fired_step"] is None else str(g["fired_step"]) for g in gates.values())
        rows.append([m, a["reached"]] + [_cell(a[k]).replace(",", ", ") for k in RATIO_KEYS[:3]]
                    + [_cell((a["projected"] or {}).get(s), ci=False) for s in shares]
                    + [f"{mult:.2f}" if mult is not None else "n/a", f"{r['peak']['median']:.3f}", fired or "-"])
    lines = [f"Threshold: {meta['thresholds'][name]}; median over {meta['n_seeds']} seed(s) "
             f"[{100 * meta['ci_level']:g}% bootstrap CI over seeds]; speedup = {meta['baseline']}'s cost / "
             "method's cost (> 1 = faster).", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [n for n in (peak_warning(meta),) if n]
    bp = meta.get("baseline_peaked")
    if bp and bp["all"]:
        notes.append(f"{meta['baseline']} levelled off before its last step in every seed (best score not in "
                     "its last 3 validations, or no upward trend over them).")
    for key, span in (("second_half", "second half"), ("last_quarter", "last quarter")):
        parts = {s: r.get(key) for s, r in (bp or {}).get("seeds", {}).items()}
        if parts and all(h and h["gain"] is not None for h in parts.values()):
            notes.append(f"{meta['baseline']}'s climb over the {span} of the run (least-squares gain; share of "
                         "the seed's whole gain; slope t): " + "; ".join(
                             f"seed {s} {h['gain']:+.3f} from step {h['from_step']}; "
                             + ("n/a" if h["share"] is None else f"{round(100 * h['share'])}%")  # (no "-0%")
                             + ("" if h["t"] is None else f"; t = {h['t']:.1f}") for s, h in parts.items()) + ".")
    if meta.get("cost_clock"):
        notes.append(f"Measured and projected {clock}: {meta['clocks']['ratio_cost']}.")
    sens = meta.get("sensitivity") or {}
    loo = {m: d for m, d in (sens.get("leave_one_seed_out") or {}).items() if d.get("ratio_steps")}
    if loo:
        notes.append("Sensitivity, the median when one seed is left out [min, max]: " + "; ".join(
            f"{m} steps {_ci(d['ratio_steps'])}, {clock} {_ci(d['ratio_cost']) or 'n/a'}" for m, d in loo.items())
            + ".")
    def shift(d):
        return "n/a" if d["here"] is None or d["there"] is None else f"{d['here']:.2f}x -> {d['there']:.2f}x"
    for cmp_ in sens.get("compare") or []:
        if cmp_["methods"]:
            notes.append(f"Sensitivity against {cmp_['note']}: " + "; ".join(
                f"{m} steps {shift(d['ratio_steps'])}, {clock} {shift(d['ratio_cost'])}"
                for m, d in cmp_["methods"].items()) + ".")
    notes += [f"PROBLEM: {p}" for p in meta.get("problems") or []]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Disk
# ----------------------------------------------------------------------------------------------------------
_SEED_FILE = re.compile(r"seed(-?\d+)\.jsonl")
_SEED_DIR = re.compile(r"seed(-?\d+)")


def _read_jsonl(f: Path) -> list:
    lines = f.read_text().splitlines()
    recs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{f}: skipping truncated last line")
                continue
            raise ValueError(f"{f}:{i + 1}: invalid JSON record") from None
    return recs


def load_runs(folder) -> dict:
    """Read ``<folder>/<method>/seed<k>.jsonl`` (one JSON record per line) into ``{method: {k: [records]}}``.

    Also accepts ``<folder>/<method>/seed<k>/records.jsonl`` (the trainer loop's own file name). A truncated
    last line (a run killed mid-write) is skipped with a warning; any other bad line raises ValueError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    runs = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        seeds = {}
        for f in sorted(d.iterdir()):
            if f.is_file() and _SEED_FILE.fullmatch(f.name):
                k, path = int(_SEED_FILE.fullmatch(f.name).group(1)), f
            elif f.is_dir() and _SEED_DIR.fullmatch(f.name) and (f / "records.jsonl").is_file():
                k, path = int(_SEED_DIR.fullmatch(f.name).group(1)), f / "records.jsonl"
            else:
                continue
            if k in seeds:
                raise ValueError(f"{d}: seed {k} found twice (seed{k}.jsonl and seed{k}/records.jsonl)")
            recs = _read_jsonl(path)
            if recs:
                seeds[k] = recs
        if seeds:
            runs[d.name] = seeds
    if not runs:
        raise FileNotFoundError(f"no <method>/seed<k>.jsonl files under {folder}")
    return runs


def load_index_runs(folder, *, strict: bool = True, methods: Optional[Sequence[str]] = None) -> tuple:
    """Read the runs a ``speedup`` run lists in ``<folder>/runs.json``: ``({method: {seed: [records]}}, problems)``.

    Only the listed methods x seeds are read (a later run into the same folder with other methods or seeds
    never mixes in stale ones). Problems (also returned as one-line strings): a listed run whose records are
    missing or hold fewer update steps than configured (interrupted), a run not marked complete, a subfolder
    runs.json does not list. With ``strict`` a problem with a listed run raises ValueError; foreign subfolders
    are only reported. ``methods``: report only these of the listed methods (the others are named in the
    problems as left out, with how many of their runs were complete).
    """
    folder = Path(folder)
    path = folder / "runs.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (rebuild a folder without one with --no-index)")
    try:
        index = json.loads(path.read_text())
        listed = {m: {int(s): e for s, e in seeds.items()} for m, seeds in index["runs"].items()}
        steps = int(index["train"]["steps"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a runs.json written by gxpo-kernels speedup ({e})") from None
    runs, problems = {}, []
    if methods is not None:
        unknown = [m for m in methods if m not in listed]
        if unknown:
            raise ValueError(f"{path}: methods {unknown} are not in this run (it has {sorted(listed)})")
        for m in listed:
            if m not in methods:
                done = sum(e.get("status") == "complete" for e in listed[m].values())
                problems.append(f"{m}: left out of the report ({done}/{len(listed[m])} runs complete)")
    for m, seeds in listed.items():
        if methods is not None and m not in methods:
            continue
        for s, e in sorted(seeds.items()):
            d = folder / m / f"seed{s}"
            f = d / "records.jsonl"
            recs = _read_jsonl(f) if f.is_file() else []
            n = sum(1 for r in recs if int(r.get("step", 0)) >= 1)
            want = int(e.get("steps_configured", steps))
            if not recs:
                problems.append(f"{m} seed {s}: no records ({f} missing or empty)")
                continue
            if n < want or e.get("status") not in (None, "complete"):
                problems.append(f"{m} seed {s}: incomplete ({n} of {want} steps recorded, status "
                                f"{e.get('status')!r})")
            runs.setdefault(m, {})[s] = recs
    bad = [p for p in problems if "left out of the report" not in p]
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name not in listed:
            problems.append(f"folder {d.name}/ is not listed in runs.json: ignored")
        else:
            extra = sorted(x.name for x in d.iterdir() if x.is_dir() and x.name not in
                           {f"seed{s}" for s in listed[d.name]})
            if extra:
                problems.append(f"{d.name}/: {', '.join(extra)} not listed in runs.json: ignored")
    if strict and bad:
        raise ValueError(f"{folder}: {len(bad)} incomplete run(s): " + "; ".join(bad)
                         + " (rerun with speedup --resume, or pass --allow-incomplete to report anyway)")
    return runs, problems


def _read_results(path) -> dict:
    """A results.json given to ``--compare``; a ValueError naming the file when it is not one."""
    try:
        results = json.loads(Path(path).read_text())
        _headline_medians(results)   # what the comparison reads of it
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--compare {path}: not a results.json written by this report "
                         f"({type(e).__name__}: {e})") from None
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gxpo_kernels.trainer.report",
                                description="Rebuild results.json, speedup.png and the speedup table from "
                                            "<folder>/<method>/seed<k>.jsonl records.")
    p.add_argument("folder")
    p.add_argument("--out", default=None, help="output folder (default: the input folder)")
    p.add_argument("--baseline", default="grpo")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--gain-frac", type=float, default=0.9)
    p.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-key", default="greedy_acc")
    p.add_argument("--headline", default="eps", choices=THRESHOLDS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="report runs with fewer steps than configured (flagged in results.json and the table)")
    p.add_argument("--no-index", action="store_true",
                   help="no runs.json: read every <method>/seed<k> subfolder (flagged in results.json)")
    p.add_argument("--methods", help="comma list: report only these methods of runs.json (the others are "
                   "named as left out)")
    p.add_argument("--compare", metavar="RESULTS_JSON", action="append",
                   help="a perturbed run's results.json (repeatable): the headline ratios' shifts go into "
                        "meta.sensitivity.compare")
    a = p.parse_args(argv)
    try:
        index = None
        if a.no_index:
            runs, problems = load_runs(a.folder), ["no runs.json: every <method>/seed<k> subfolder was read, "
                                                   "without checking that the runs are complete or belong together"]
        else:
            runs, problems = load_index_runs(a.folder, strict=not a.allow_incomplete,
                                             methods=a.methods.split(",") if a.methods else None)
            index = json.loads((Path(a.folder) / "runs.json").read_text())
        other = [_read_results(c) for c in a.compare] if a.compare else None
        res = build_report(runs, a.out or a.folder, baseline=a.baseline, eps=a.eps, gain_frac=a.gain_frac,
                           rollout_shares=a.shares, n_boot=a.n_boot, seed=a.seed, score_key=a.score_key,
                           headline=a.headline, plot=not a.no_plot, index=index, problems=problems,
                           compare=other)
    except (ValueError, FileNotFoundError, OSError, json.JSONDecodeError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
