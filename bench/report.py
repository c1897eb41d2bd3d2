"""Markdown rendering of a results document (``bench/run.py`` writes it beside the .json; ``readme_table.py``
uses the compact form for the README)."""
from __future__ import annotations

from typing import Iterable, List, Optional


def _num(x, fmt="{:.3g}") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def _sizes(s: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in s.items()) or "–"


def _timing(f: dict) -> str:
    if f.get("p50_ms") is None:
        return "–"
    return f"{f['p50_ms']:.3g} [{_num(f.get('p20_ms'))}–{_num(f.get('p80_ms'))}]"


def _achieved(f: dict) -> str:
    parts = []
    if f.get("gbps") is not None:
        parts.append(f"{f['gbps']:.3g} GB/s ({_num(f.get('pct_copy_bw'), '{:.0f}')}% copy)")
    if f.get("tflops") is not None:
        parts.append(f"{f['tflops']:.3g} TFLOP/s ({_num(f.get('pct_matmul'), '{:.0f}')}% matmul)")
    tps = (f.get("extra") or {}).get("tokens_per_s")
    if isinstance(tps, (int, float)):
        parts.append(f"{tps:.4g} tok/s")
    return "; ".join(parts) or "–"


def figure_rows(figures: Iterable[dict], compact: bool = False) -> List[str]:
    head = ["op", "provider", "mode", "sizes", "dtype", "p50 ms [p20–p80]", "achieved", "peak MiB"]
    if compact:
        head = ["op", "provider", "mode", "sizes", "p50 ms", "achieved", "peak MiB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in sorted(figures, key=lambda f: (f["op"], str(f["sizes"]), f["mode"], f["provider"])):
        cells = [f["op"], f["provider"], f["mode"], _sizes(f["sizes"])]
        if compact:
            cells += [_num(f.get("p50_ms")), _achieved(f), _num(f.get("peak_mem_mib"), "{:.0f}")]
        else:
            cells += [f.get("dtype") or "–", _timing(f), _achieved(f), _num(f.get("peak_mem_mib"), "{:.0f}")]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def ceilings_line(doc: dict) -> str:
    c, m = doc["ceilings"]["copy"], doc["ceilings"]["matmul"]
    return (f"measured ceilings: copy {c['gbps']:.3g} GB/s (read+write, {c['nbytes'] / 2 ** 20:.0f} MiB moved), "
            f"{m['dtype']} matmul {m['tflops']:.3g} TFLOP/s (n={m['n']})")


def overhead_lines(figures: Iterable[dict]) -> List[str]:
    out = []
    for f in figures:
        e = f.get("extra") or {}
        if f["op"] == "update_step" and "overhead_timer_frac" in e:
            out.append(f"- GXPO bookkeeping overhead, {_sizes(f['sizes'])}: timer method "
                       f"{100 * e['overhead_timer_frac']:.1f}% of the step ({e['overhead_timer_ms']:.3g} ms), "
                       f"subtraction method {100 * e['overhead_sub_frac']:.1f}% ({e['overhead_sub_ms']:.3g} ms)")
        if f["op"] == "gxpo_step_overhead" and "overhead_pct" in e:
            out.append(f"- GXPO step vs 3x(fwd+bwd+clip+AdamW) (bench_extrapolate): {e['overhead_pct']:.1f}% "
                       f"over the baseline")
    return out


def render_markdown(doc: dict, note: Optional[str] = None) -> str:
    d, v, g = doc["device"], doc["versions"], doc["git"]
    lines = [f"# Benchmarks: {d['name']} ({doc['date']})", "",
             f"- commit `{(g.get('commit') or 'unknown')[:12]}`{' (dirty tree)' if g.get('dirty') else ''}, "
             f"generated {doc['timestamp']}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             "- " + ceilings_line(doc)]
    s = doc.get("suite") or {}
    if s.get("load_avg_before"):
        lines.append(f"- host load average before/after: {s['load_avg_before'][0]:.1f} / "
                     f"{(s.get('load_avg_after') or [float('nan')])[0]:.1f} (cores: {d.get('cores')})")
    if s.get("threads"):
        lines.append(f"- CPU threads per process: {s['threads']} (OMP_NUM_THREADS / torch.set_num_threads)")
    if s.get("smoke"):
        lines.append("- SMOKE run (tiny sizes): plumbing check only, the figures mean nothing")
    if note:
        lines.append(f"- {note}")
    lines += ["", "| file | status | wall s | records |", "|---|---|---|---|"]
    for r in doc["runs"]:
        lines.append(f"| {r['file']} | {r['status']} | {r.get('wall_s', '–')} | {r.get('n_records', 0)} |")
    lines += ["", "p50 and the p20–p80 spread in ms; GB/s = the op's minimum bytes (bench/roofline.py) / p50, as % "
              "of the measured copy bandwidth; TFLOP/s = useful FLOPs / p50, as % of the measured matmul rate.", ""]
    lines += figure_rows(doc["figures"])
    ov = overhead_lines(doc["figures"])
    if ov:
        lines += [""] + ov
    return "\n".join(lines) + "\n"
