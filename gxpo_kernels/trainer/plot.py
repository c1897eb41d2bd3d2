"""Three-panel speedup figure: validation score vs steps, vs backward passes, vs wall-clock.

Uses matplotlib's object API with the Agg canvas (no global backend switch, no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

# curve rows: [step, backward passes, optimizer steps, wall-clock, score, measured cost]
_PANELS = (("steps", 0, "update steps"), ("backward passes", 1, "backward passes"),
           ("cost", 5, "measured cost [s]"))
_CLOCK = {"cpu": "CPU time [s]: shared rollout median + own update", "wall": "wall-clock [s] (validation excluded)"}


def _mean_curve(seed_curves: list) -> np.ndarray:
    """Mean over seeds at the validation steps every seed has: rows [step, bp, opt, wall, score]."""
    arrs = [np.asarray(c, dtype=np.float64) for c in seed_curves]
    common = set(arrs[0][:, 0].tolist())
    for a in arrs[1:]:
        common &= set(a[:, 0].tolist())
    steps = np.array(sorted(common))
    return np.stack([a[np.searchsorted(a[:, 0], steps)] for a in arrs]).mean(axis=0)


def plot_speedup(results: Mapping, path) -> Path:
    """Write the PNG for a results dict (as returned by ``build_report``) to ``path``; return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = results["meta"]
    baseline = meta["baseline"]
    methods = [baseline] + [m for m in results["methods"] if m != baseline]
    fig = Figure(figsize=(16, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    base_peaks = [s["peak"] for s in results["methods"][baseline]["seeds"].values()]
    peak = float(np.median(base_peaks))
    clock = _CLOCK.get(meta.get("cost_clock"), "wall-clock [s] (validation excluded)")
    for ax, (title, col, xlabel) in zip(axes, _PANELS):
        if col == 5:
            title, xlabel = clock.split(" [")[0], f"training {clock}"
        for m in methods:
            seeds = results["methods"][m]["seeds"]
            curves = [np.asarray(s["curve"], dtype=np.float64) for s in seeds.values()]
            for c in curves:  # light per-seed lines
                ax.plot(c[:, col], c[:, 4], color=colors[m], alpha=0.2, lw=0.8)
            mean = _mean_curve(curves)
            ax.plot(mean[:, col], mean[:, 4], color=colors[m], lw=2.0,
                    label=f"{m} (mean of {len(curves)} seed{'s' if len(curves) != 1 else ''})")
        ax.axhline(peak, color="k", ls="--", lw=1.0,
                   label=f"{baseline} peak {peak:.3f}" + (" (median over seeds)" if len(base_peaks) > 1 else ""))
        ax.axhline(peak - meta["eps"], color="k", ls=":", lw=0.8, label=f"peak − {meta['eps']:g}")
        ax.set_title(f"validation {meta['score_key']} vs {title}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(meta["score_key"])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    fig.savefig(path)
    return path
