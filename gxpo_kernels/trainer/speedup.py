"""Speedup-to-peak runner: every method x seed from one shared warm start, then the report.

Layout of the output folder::

    <out>/runs.json                       what ran (methods, seeds, lr multiplier, warm start, wall time)
    <out>/<method>/seed<k>/records.jsonl  per-step records (method names kept as given, e.g. gxpo+fade) (schema: docs/readme/10-quickstart-trainer.md)
    <out>/<method>/seed<k>/config.json
    <out>/results.json, speedup.png       written by ``report.build_report``

The control ``grpo_lr`` runs after GXPO/SFPO: its learning-rate multiplier is the *measured* effective step
multiplier of the GXPO runs (else SFPO's), ``stats.effective_step_multiplier`` -- the one place that formula
lives (GXPO: 1 + 2*alpha*mean(scale_mean) per active step; SFPO: 1 + alpha*K).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

from .config import SpeedupConfig, parse_method
from .loop import train
from .stats import effective_step_multiplier

from .report import build_report, format_table  # noqa: F401  (format_table: re-exported for the CLI)


def _order(methods) -> List[str]:
    """grpo_lr needs the GXPO/SFPO multiplier, so it runs after every other method."""
    for m in methods:
        parse_method(m)
    return [m for m in methods if parse_method(m)[0] != "grpo_lr"] + \
           [m for m in methods if parse_method(m)[0] == "grpo_lr"]


def measured_multiplier(runs: Dict[str, Dict[int, list]]) -> Optional[tuple]:
    """(multiplier, source method) from the plain GXPO runs, else any GXPO/SFPO runs; None if none ran."""
    for want in ("gxpo", "sfpo"):
        cands = [m for m in runs if parse_method(m) == (want, "grpo")] + \
                [m for m in runs if parse_method(m)[0] == want and parse_method(m)[1] != "grpo"]
        for m in cands:
            vals = [effective_step_multiplier(recs, want) for recs in runs[m].values() if recs]
            if vals:
                return sum(vals) / len(vals), m
    return None


def default_out_dir() -> str:
    return os.path.join("runs", "speedup-" + time.strftime("%Y%m%d-%H%M%S"))


def run_speedup(cfg: SpeedupConfig, *, progress: bool = True, log=print, report_flags: Optional[dict] = None) -> dict:
    """Run all methods x seeds; return ``{"results", "out_dir", "runs", "lr_mult", "seconds"}``."""
    from tqdm.auto import tqdm

    order = _order(cfg.methods)
    if "grpo" not in order:
        raise ValueError(f"methods must include 'grpo' (the report's baseline), got {list(cfg.methods)}")
    if not cfg.seeds:
        raise ValueError("seeds must not be empty")
    out_dir = os.path.abspath(cfg.out_dir or default_out_dir())
    os.makedirs(out_dir, exist_ok=True)
    base = cfg.train
    cache = base.cache_dir or os.path.join(os.path.dirname(out_dir), ".warmstart-cache")
    base = base.replace(cache_dir=cache, quiet=base.quiet)
    t_start = time.perf_counter()
    runs: Dict[str, Dict[int, list]] = {}
    index = {"methods": list(cfg.methods), "seeds": list(cfg.seeds), "train": dataclasses.asdict(base),
             "runs": {}, "lr_mult": None, "lr_mult_source": None}

    for method in order:
        algo, adv = parse_method(method)
        extra = {}
        if algo == "grpo_lr":
            if cfg.lr_mult is not None:
                mult, src = cfg.lr_mult, "given"
            else:
                got = measured_multiplier(runs)
                mult, src = got if got is not None else (1.0, "none (no GXPO/SFPO run; lr x 1)")
            index["lr_mult"], index["lr_mult_source"] = mult, src
            extra["lr_mult"] = mult
            log(f"grpo_lr: lr x {mult:.3f} (effective step multiplier from {src})")
        runs[method] = {}
        for seed in cfg.seeds:
            tc = base.replace(algo=algo, advantage=adv, seed=seed,
                              out_dir=os.path.join(out_dir, method, f"seed{seed}"), **extra)
            bar = tqdm(total=tc.steps, desc=f"{method:>12s} seed {seed}", disable=not progress, leave=True,
                       dynamic_ncols=True)
            state = {"acc": None}

            def on_record(rec, bar=bar, state=state):
                if rec.get("val"):
                    state["acc"] = rec["val"]["greedy_acc"]
                if rec["step"] > 0:
                    bar.set_postfix(acc=state["acc"], bp=rec["backward_passes"], refresh=False)
                    bar.update(1)

            t0 = time.perf_counter()
            try:
                records = train(tc, progress=on_record, log=(lambda s: bar.write(s)) if progress else log)
            finally:
                bar.close()
            runs[method][seed] = records
            index["runs"].setdefault(method, {})[str(seed)] = {
                "dir": tc.out_dir, "seconds": time.perf_counter() - t0,
                "warm_start": records[0].get("warm_start") if records else None}
        with open(os.path.join(out_dir, "runs.json"), "w") as f:
            json.dump(index, f, indent=1, default=str)

    seconds = time.perf_counter() - t_start
    index["seconds"] = seconds
    with open(os.path.join(out_dir, "runs.json"), "w") as f:
        json.dump(index, f, indent=1, default=str)
    results = build_report(runs, out_dir, **(report_flags or {}))
    return {"results": results, "out_dir": out_dir, "runs": runs, "lr_mult": index["lr_mult"], "seconds": seconds}
