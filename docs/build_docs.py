"""Fill the generated blocks of README.md, docs/*.md and bench/*.md from committed result files.

    python docs/build_docs.py           # rewrite the blocks in place
    python docs/build_docs.py --check   # exit 1 if any block differs from what the result files give

A generated block is the text between ``<!-- gen:NAME -->`` and ``<!-- /gen:NAME -->``; NAME picks a generator
below, each of which reads one committed result file. Every table of measured figures in README and docs is such a
block; a figure quoted in the prose beside it repeats the block or names its result file.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
from typing import Callable, Dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BLOCK = re.compile(r"(<!-- gen:(?P<name>[\w.-]+) -->\n).*?(<!-- /gen:(?P=name) -->)", re.S)
GENERATORS: Dict[str, Callable[[], str]] = {}


def generator(name: str):
    def deco(fn):
        GENERATORS[name] = fn
        return fn
    return deco


def _json(rel: str):
    return json.loads((ROOT / rel).read_text())


@generator("speedup-table")
def _speedup_table() -> str:
    from gxpo_kernels.trainer.report import markdown_table
    return markdown_table(_json("docs/results/speedup-default-results.json"))


@generator("bench-table")
def _bench_table() -> str:
    from bench.readme_table import BEGIN, END, latest_per_device, render_section
    return render_section(latest_per_device()).replace(BEGIN, "").replace(END, "").strip()


def _bench_rows(rel: str, labels: Dict[str, str]) -> str:
    """A provider table (extra peak memory, its ratio to the ``fused`` provider's, median and min time) from a
    pytest-benchmark JSON file."""
    doc = _json(rel)
    rows, info, base = [], {}, None
    for b in doc["benchmarks"]:
        e = b.get("extra_info", {})
        if e.get("provider") not in labels:
            continue
        info = e
        if e["provider"] == "fused":
            base = e.get("peak_extra_mib")
        rows.append((labels[e["provider"]], e.get("peak_extra_mib"), b["stats"]["median"], b["stats"]["min"],
                     b["stats"]["rounds"]))
    out = [f"From `{rel}` ({doc['datetime'][:10]}, commit `{(doc.get('commit_info') or {}).get('id', '?')[:10]}`): "
           f"one forward + backward, N = {info.get('n_tokens', '?')} tokens, H = {info.get('H', '?')}, "
           f"V = {info.get('V', '?')}, {info.get('dtype', '?')}, CPU. Time is wall-clock on a shared 2-core machine: "
           "it does not rank the providers; memory does.", "",
           "| provider | extra peak memory (MiB) | x fused | median time (s) | min time (s) | rounds |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, mib, med, mn, rounds in rows:
        ratio = f"{mib / base:.1f}x" if mib and base else "-"
        out.append(f"| {name} | {mib:,.0f} | {ratio} | {med:.2f} | {mn:.2f} | {rounds} |" if mib is not None
                   else f"| {name} | - | - | {med:.2f} | {mn:.2f} | {rounds} |")
    return "\n".join(out)


@generator("trl-heads")
def _trl_heads() -> str:
    from bench.trl_heads_table import RESULTS, render
    return render(json.loads(RESULTS.read_text()))


@generator("linear-grpo-memory")
def _linear_grpo_memory() -> str:
    return _bench_rows("bench/results/cpu-linear-grpo-loss.json", {
        "fused": "`linear_grpo_loss` (PyTorch chunked backend)",
        "materialised": "materialised logits + `grpo_loss`",
        "eager": "eager PyTorch (logits, fp32 log_softmax, same loss math)",
        "liger": "Liger `LigerFusedLinearGRPOLoss(compiled=False)`"})


@generator("linear-fpa-memory")
def _linear_fpa_memory() -> str:
    return _bench_rows("bench/results/cpu-linear-fpa.json", {
        "fused": "`linear_fpa_logprobs` (PyTorch chunked backend)",
        "materialised": "materialised logits + `fpa_logprobs`",
        "eager": "eager PyTorch"})


@generator("extrapolate-cpu")
def _extrapolate_cpu() -> str:
    rel = "bench/results/cpu-extrapolate.json"
    doc = _json(rel)
    out = [f"From `{rel}` ({doc['datetime'][:10]}, commit `{(doc.get('commit_info') or {}).get('id', '?')[:10]}`), "
           "CPU, fp32, a Qwen2-0.5B-shaped parameter list scaled to fit (wall-clock on a shared 2-core machine):", "",
           "| provider | threads | elements | median (s) | GB/s | % of the same run's copy |", "|---|---:|---:|---:|---:|---:|"]
    for b in doc["benchmarks"]:
        e = b.get("extra_info", {})
        if b["name"].startswith("test_extrapolate_bandwidth["):
            prov = b["name"][len("test_extrapolate_bandwidth["):-1]
            out.append(f"| {prov} | {e.get('threads', '?')} | {e.get('numel', 0):,} | {b['stats']['median']:.3f} | "
                       f"{e.get('gbps', float('nan')):.2f} | {e.get('pct_of_copy', float('nan')):.0f}% |")
    for b in doc["benchmarks"]:
        e = b.get("extra_info", {})
        if b["name"].startswith("test_gxpo_step_overhead"):
            out += ["", f"GXPO bookkeeping on a {e.get('n_params', 0):,}-parameter Qwen2 (`{b['name']}`): "
                    + ", ".join(f"`{k}` = {v:.2f}" for k, v in e.items() if k.endswith("pct"))]
    return "\n".join(out + _extrapolate_host() + _gxpo_bookkeeping())


def _extrapolate_host() -> list:
    rel = "bench/results/cpu-extrapolate-host.json"
    doc = _json(rel)
    before = doc.get("before") or {}
    out = ["", f"Host part of one call on the CUDA path, {doc['layout']} layout ({doc['n_tensors']} tensors), launch "
           f"stubbed, process CPU time per call (from `{rel}`, load average {doc['load_avg'][0]:.1f} on 2 cores"
           + (f", {doc.get('rounds', 1)} interleaved rounds; before = commit `{before['commit'][:10]}`" if before
              else "") + "):", ""]
    cols = "| case | median (ms) | p10 (ms) | p90 (ms) |" + (" before: median (ms) |" if before else "")
    out += [cols, "|---|---:|---:|---:|" + ("---:|" if before else "")]
    for case, r in doc["results"].items():
        row = f"| `{case}` | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} |"
        if before:   # a case the other checkout does not time: –
            b = before["results"].get(case)
            row += f" {b['median_ms']:.3f} |" if b else " – |"
        out.append(row)
    if doc.get("passes_us"):
        out += ["", f"One C-level pass (`list(map(f, tensors))`) over the {doc['n_tensors']} tensors, metadata in cache "
                "(µs, same file): " + ", ".join(f"`{k}` {v:.0f}" for k, v in doc["passes_us"].items())
                + (" (`tensor_records`: the C++ extension's one pass that reads all of them)"
                   if "tensor_records" in doc["passes_us"] else "")]
    return out


def _gxpo_bookkeeping() -> list:
    rel = "bench/results/cpu-update-throughput-gxpo.json"
    doc = _json(rel)
    out = ["", f"GXPO bookkeeping (the θ0 and optimizer-state snapshots, the extrapolation, norms) in an active step of "
           f"`bench_update_throughput` at commit `{doc['commit_info']['id'][:10]}` (from `{rel}`, CPU, 1 thread, "
           f"process CPU time, `atomic=True`; the A/B tables below time later commits):", "",
           "| size | GXPO step p50 (ms) | GRPO step p50 (ms) | bookkeeping, timer (ms) | share, timer | share, subtraction |"
           " reps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b in doc["benchmarks"]:
        e = b["extra_info"]
        out.append(f"| {e['name']} | {e['p50_ms']:.1f} | {e['grpo_p50_ms']:.1f} | {e['overhead_timer_ms']:.2f} | "
                   f"{100 * e['overhead_timer_frac']:.1f}% | {100 * e['overhead_sub_frac']:.1f}% | {e['reps']} |")
    return out + _gxpo_bookkeeping_ab()


def _gxpo_bookkeeping_ab() -> list:
    out = []
    for rel, change in (("bench/results/cpu-update-throughput-gxpo-ab.json", "the late, non-temporal snapshots"),
                        ("bench/results/cpu-update-throughput-gxpo-ab2.json",
                         "the snapshot reuse and the cheaper per-step checks"),
                        ("bench/results/cpu-update-throughput-gxpo-ab3.json",
                         "one copy call for both snapshots and leaner host code in the step"),
                        ("bench/results/cpu-update-throughput-gxpo-ab4.json",
                         "later per-step checks: frozen and sparse gradients refused on every rank, nested optimizer "
                         "state deep-copied, the prepared extrapolation keyed on parameter dtypes"),
                        ("bench/results/cpu-update-throughput-gxpo-ab5.json",
                         "later per-step work: param-group entries snapshotted, lazily negated parameters refused, "
                         "SFPO's entropy checked up front"),
                        ("bench/results/cpu-update-throughput-gxpo-ab6.json",
                         "the clip's norm and multiply as one foreach group without torch's grouping, the param-group "
                         "snapshot as one dict copy per group")):
        doc = _json(rel)
        sizes = list(doc["rounds"][0]["after"])
        out += ["", f"Commit `{doc['after_commit'][:10]}` against `{doc['before_commit'][:10]}` ({change}), alternated "
                f"in fresh processes (from `{rel}`; share of the GXPO step, timer estimate):", "",
                "| round | " + " | ".join(f"{s}: after | {s}: before" for s in sizes) + " |",
                "|---:|" + "---:|---:|" * len(sizes)]
        rows = [[100 * r[w][s]["overhead_timer_frac"] for s in sizes for w in ("after", "before")] for r in doc["rounds"]]
        for i, r in enumerate(rows + [[statistics.median(c) for c in zip(*rows)]], 1):
            out.append(f"| {i if i <= len(rows) else 'median'} | " + " | ".join(f"{v:.1f}%" for v in r) + " |")
    return out + _gxpo_bookkeeping_pieces()


def _gxpo_bookkeeping_pieces() -> list:
    rel = "bench/results/cpu-update-throughput-gxpo-pieces.json"
    doc = _json(rel)
    out = ["", f"Where it goes: one process per size, GXPO as shipped, GXPO with `copy_` snapshots (ordinary stores) and "
           f"GRPO stepping interleaved, ms per active step, medians over {doc['reps']} steps (from `{rel}`, `python -m "
           f"bench.bench_update_throughput OUT.json --pieces`, load average {doc['load_avg'][0]:.1f} on 2 cores; the "
           "timers around the pieces add a little to every figure):", "",
           "| size | params | GXPO step | snapshot: C++ copy | snapshot: Python | extrapolation: C++ | "
           "extrapolation: Python | rest of the host code | 3 x GRPO's rest | sum (share of the step) | "
           "snapshot with `copy_` |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in doc["sizes"].items():
        g, c = d["gxpo"], d["gxpo_copy"]
        out.append(f"| {name} | {d['n_params']:,} | {g['step_ms']:.1f} | {g['snapshot_cpp_ms']:.2f} | "
                   f"{g['snapshot_py_ms']:.2f} | {g['extrap_cpp_ms']:.2f} | {g['extrap_py_ms']:.2f} | {g['rest_ms']:.2f} | "
                   f"{3 * g['grpo_rest_ms']:.2f} | {g['sum_ms']:.2f} ({100 * g['sum_ms'] / g['step_ms']:.1f}%) | "
                   f"{c['snapshot_py_ms'] + c['snapshot_cpp_ms']:.2f} |")
    return out


@generator("plateau-trials")
def _plateau_trials() -> str:
    """GRPO-only trials of the default task (and the default run itself): does GRPO level off?"""
    rows = [("docs/results/speedup-default", "the default run")] + [
        (f"docs/results/plateau-trials/{n}", f"trial `{n}`") for n in ("constant-600", "constant-1200", "linear-600",
                                                                              "beta0.5-600", "hidden64-600")]
    out = ["| run | lr schedule | beta | hidden | steps | seeds | GRPO peak (median) | flagged still rising | "
           "second-half gain per seed (share of the whole gain; t) | last-quarter gain per seed (t) | code |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    from gxpo_kernels.trainer.config import saved_setting

    def gains(bp, key, share):
        return "; ".join(f"{v[key]['gain']:+.3f} (" + (f"{100 * v[key]['share']:.0f}%; " if share else "")
                         + f"t = {v[key]['t']:.1f})" for v in bp["seeds"].values())
    for rel, name in rows:
        res, runs = _json(rel + "-results.json"), _json(rel + "-runs.json")
        tr, bp = runs["train"], res["meta"]["baseline_peaked"]
        code = runs["code"]
        out.append(f"| {name} | {saved_setting(tr, 'lr_scheduler_type')} | "
                   f"{saved_setting(tr, 'beta')} | {tr['hidden']} | {tr['steps']} | {len(bp['seeds'])} | "
                   f"{res['methods']['grpo']['peak']['median']:.3f} | {bp['n_rising']}/{len(bp['seeds'])} | "
                   f"{gains(bp, 'second_half', True)} | {gains(bp, 'last_quarter', False)} | "
                   f"`{code['git_commit'][:7]}`{' (uncommitted changes)' if code.get('git_dirty') else ''} |")
    return "\n".join(out)


@generator("temperature-precision")
def _temperature_precision() -> str:
    rel = "bench/results/cpu-temperature-precision.json"
    doc = _json(rel)
    out = [f"Errors against float64 of the same fp32 inputs (from `{rel}`; {doc['N']} rows, V = {doc['V']:,}, "
           f"logits ~ N(0, 10^2), fused head H = {doc['H']}; Triton under the interpreter, CPU):", "",
           "| T | log-prob abs. error: Triton / PyTorch | fused head: Triton / PyTorch "
           "| d(logits) rel. error: Triton / PyTorch | fused head d(hidden): Triton / PyTorch |",
           "|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        a, b = r["triton"], r["torch"]
        out.append(f"| {r['temperature']:g} | " + " | ".join(
            f"{a[k]:.1e} / {b[k]:.1e}" for k in ("logp_abs_err", "linear_logp_abs_err", "dlogits_rel_err",
                                                  "linear_dhidden_rel_err")) + " |")
    return "\n".join(out)


def _e(x: float) -> str:
    """1.2e-04 -> 1.2e-4, 0 -> 0, and a negative number with a minus sign (prose style)."""
    if x == 0:
        return "0"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}").replace("e+", "e").replace("-", "−", x < 0)


def _p10(x: float) -> str:
    """An input scale 1e-4 as written in the docs."""
    return f"{x:.0e}".replace("e-0", "e-")


@generator("side-by-side")
def _side_by_side() -> str:
    rel = "bench/results/cpu-side-by-side.json"
    doc = _json(rel)
    h = next(r for r in doc["horner_vs_guarded"] if r["K"] == 4)
    rows = {r["rms"]: r for r in doc["inactive_mask_floor"]}
    m, z = rows[1e-6], doc["ema_gate_z"]
    clean = [_p10(s) for s, r in sorted(rows.items(), reverse=True) if r["floored"] == 0 == r["theta_differ"]]
    low = [r for s, r in sorted(rows.items()) if s < 1e-6]
    r_max = f"{h['r_at_max_scale_diff']:.4f}".replace("-", "−")
    out = [f"Measured by `python -m bench.side_by_side` (from `{rel}`; CPU, fp32; one tensor of {h['n']:,} "
           "coordinates with θ0 ~ N(0, 1), θ2 − θ0 ~ N(0, 1e-3²), g0 ~ N(0, s²), g1 = 0.7·g0 + 0.4·N(0, s²), "
           "α = 0.5, no clip):", "",
           f"- Scale at K = {h['K']} (s = 1): ours and their S_K/S_2 differ at {h['scale_differ']:,} of {h['n']:,} "
           f"coordinates, by up to {_e(h['scale_max_diff'])} (at r = {r_max}); against the float64 value of "
           f"S_{{K/2}}(r²), ours is off by at most {_e(h['ours_max_err_vs_fp64'])}, theirs by "
           f"{_e(h['theirs_max_err_vs_fp64'])}. θ̃ differs at {h['theta_differ']} coordinates, by at most "
           f"{_e(h['theta_max_diff'])}.",
           f"- Inactive mask at RMS(ĝ0) = s = {_p10(m['rms'])} (K = {m['K']}): {m['floored']} of {m['n']:,} "
           f"coordinates are active with |ĝ0| < δ, where our floor acts; θ̃ differs at {m['theta_differ']} of them, "
           f"by up to {_e(m['theta_max_diff'])} where θ2 − θ0 = {_e(m['displacement_at_max_diff'])}"
           + ("; every other coordinate agrees bit for bit" if m["theta_differ_outside_floored"] == 0 else "")
           + (f". At s = {' and '.join(clean)} no coordinate is floored" if clean else "")
           + "".join(f"; at s = {_p10(r['rms'])}, {r['floored']} are, and θ̃ differs at {r['theta_differ']}, by "
                     f"up to {_e(r['theta_max_diff'])}" for r in low) + ".",
           f"- EMA gate, {z['active_steps']} active steps of `GXPO.paper_protocol` (AdamW on a 6-16-1 MLP, τ raised "
           f"so that the gate never fires): the two norms differ by at most {_e(z['max_rel_norm_diff'])} (relative), "
           f"z by at most {_e(z['max_abs_z_diff'])} (|z| up to {z['max_abs_z']:.2f})."]
    return "\n".join(out)


@generator("interpreter-closed-form")
def _interpreter_closed_form() -> str:
    rel = "bench/results/cpu-side-by-side.json"
    rows = _json(rel)["interpreter_closed_form"]
    out = [f"The interpreter's closed form against the reference (from `{rel}`, `python -m bench.side_by_side`; "
           f"{rows[0]['dtype'].replace('float', 'fp')}, {rows[0]['n']:,} elements, θ2 − θ0 ~ N(0, 1e-3²)):", "",
           "| K | scale differs | largest scale difference | r there | θ̃ differs | largest θ̃ difference |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        at = f"{r['r_at_max_scale_diff']:.4f}".replace("-", "−") if r["scale_differ"] else "–"
        out.append(f"| {r['K']} | {r['scale_differ']:,} | {_e(r['scale_max_diff'])} | {at} | {r['theta_differ']:,} | "
                   f"{_e(r['theta_max_diff'])} |")
    return "\n".join(out)


@generator("cpu-dispatch")
def _cpu_dispatch() -> str:
    rel = "bench/results/cpu-dispatch.json"
    doc = _json(rel)
    res = doc["results"]
    isa = "AVX-512" if doc.get("cpu_avx512f") else "AVX2" if doc.get("cpu_avx2") else "no AVX2"
    out = [f"From `{rel}` (`python -m bench.cpu_dispatch`; {doc['machine']} with {isa}, torch {res[0]['torch']}): the "
           f"default preset's warm start cut to {doc['steps']} steps, trained from scratch in a fresh process per "
           "setting.", "",
           f"| variables set | ATen kernels | threads | weights after {doc['steps']} warm-start steps |",
           "|---|---|---:|---|"]
    for i, r in enumerate(res):
        first = next(j for j, q in enumerate(res) if q["sha256"] == r["sha256"])
        note = "" if i == 0 else f" (same as row {first + 1})" if first < i else " (different)"
        setting = " + ".join(f"`{k}={v}`" for k, v in r["env"].items()) or "none (ATen's own dispatch)"
        out.append(f"| {setting} | {r['aten_capability']} | {r['threads']} | hash `{r['sha256'][:8]}…`{note} |")
    return "\n".join(out)


@generator("sm90-sweep")
def _sm90_sweep() -> str:
    rel = "bench/results/sm90-sweep-3.9.0.json"
    doc = _json(rel)
    out = [f"From `{rel}` (Triton {doc['triton']}, commit `{(doc.get('git_commit') or '?')[:10]}`, "
           f"`{doc['command']}`; static figures, predictions):", "",
           "| op | BLOCK_V | warps | elements/thread | instr/elem | registers |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['op']} | {r['block_v']} | {r['num_warps']} | {r['elems_per_thread']:g} | "
                   f"{r['instr_per_elem']} | {r['registers']} |")
    return "\n".join(out)


def render(text: str) -> str:
    def sub(m):
        name = m.group("name")
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r}")
        return m.group(1) + GENERATORS[name]().rstrip("\n") + "\n" + m.group(3)
    return BLOCK.sub(sub, text)


def pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "bench").glob("*.md"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a generated block is stale")
    args = ap.parse_args(argv)
    stale = []
    for page in pages():
        old = page.read_text()
        new = render(old)
        if new != old:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("stale generated blocks in: " + ", ".join(map(str, stale)) + " (run python docs/build_docs.py)")
        return 1
    print(f"{len(pages())} pages checked, {len(stale)} {'stale' if args.check else 'rewritten'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
