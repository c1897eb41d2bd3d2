"""Benchmark driver: measure the device ceilings, run the bench files, write one results file per device and day.

    python -m bench                       # the whole suite (~8 min on one GPU; the CPU-meaningful parts on a CPU)
    python -m bench --files bench_fpa.py  # a subset
    python -m bench --smoke --out /tmp/b  # tiny sizes (BENCH_SMOKE=1), seconds: checks the plumbing

Steps: detect the device (CUDA name, or the CPU model from /proc/cpuinfo + core count); measure the copy
bandwidth and the matmul rate in this process (``roofline.measure_*``) before and after the suite, keeping the
higher; run each bench file with pytest-benchmark
in a subprocess (``--benchmark-json`` to a temp file, a per-file time limit out of a total budget); turn every
record into a figure (op, provider, mode, sizes, p50 and p20/p80, bytes, FLOPs, GB/s or TFLOP/s, % of the
measured ceiling, peak memory where measured); write ``<out>/<device-slug>-<YYYY-MM-DD>.json`` and ``.md``
(``...-smoke.json`` for a smoke run, so it never replaces a real run's file).
A file that fails or runs out of time is recorded with its status and the tail of its output; the others stand.
A file that runs out of time is interrupted (SIGINT) first, so pytest-benchmark still writes the records of the
tests that finished, and those figures are kept.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import json
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from . import roofline as rl

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA_VERSION = 1
# run order = priority: a budget that runs out drops the last files first
FILES = ["bench_grpo_loss.py", "bench_fpa.py", "bench_extrapolate.py", "bench_update_throughput.py",
         "bench_linear_grpo_loss.py", "bench_linear_fpa.py"]
RESERVE_S = 60.0   # time kept back for each file still to run, so one slow file cannot starve the rest
FINAL_S = 15.0     # kept back from the files for the closing ceilings measurement and the results files
GRACE_S = 20.0     # a timed-out file gets SIGINT this long before its limit, to write the records it has
# op name for records whose extra_info does not carry one: "file::test function", then "file"
DEFAULT_OPS = {"bench_extrapolate.py::test_extrapolate_bandwidth": "extrapolate_",
               "bench_extrapolate.py::test_extrapolate_cpu_interleaved": "extrapolate_",
               "bench_extrapolate.py::test_gxpo_step_overhead": "gxpo_step_overhead",
               "bench_grpo_loss.py": "grpo_loss", "bench_linear_grpo_loss.py": "linear_grpo_loss",
               "bench_linear_fpa.py": "linear_fpa_logprobs",
               "bench_fpa.py": "fpa_logprobs", "bench_update_throughput.py": "update_step"}
# tests left out by default on the CPU: bench_extrapolate's step-overhead test takes minutes on 2 shared cores
# and bench_update_throughput measures the same overhead (two estimates); ``--deselect ''`` keeps everything
CPU_DESELECT = ["bench/bench_extrapolate.py::test_gxpo_step_overhead"]
# tests left out by default on CUDA: the CPU measurements of the linear benches (minutes of CPU GEMMs at their
# CPU sizes, and not what a GPU run is for)
CUDA_DESELECT = ["bench/bench_linear_grpo_loss.py::test_cpu_fwd_bwd", "bench/bench_linear_fpa.py::test_cpu_fwd_bwd",
                 "bench/bench_extrapolate.py::test_extrapolate_cpu_interleaved"]
SIZE_KEYS = ("name", "B", "T", "N", "N_valid", "H", "H_ref", "V", "hidden", "layers", "numel")
VERSION_PACKAGES = {"torch": "torch", "triton": "triton", "transformers": "transformers", "deepspeed": "deepspeed",
                    "liger_kernel": "liger-kernel", "pytest_benchmark": "pytest-benchmark",
                    "gxpo_kernels": "gxpo-kernels"}
FIGURE_KEYS = ("op", "provider", "mode", "sizes", "dtype", "test", "p50_ms", "p20_ms", "p80_ms", "timer", "bytes",
               "flops", "gbps", "tflops", "pct_copy_bw", "pct_matmul", "peak_mem_mib", "extra")
_ITEMSIZE = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


# ----------------------------------------------------------------------------------------- environment
def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def detect_device() -> Dict[str, object]:
    """{"kind": "cuda"|"cpu", "name", "slug", "cores", ...} of the device the suite runs on."""
    import torch
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": name, "slug": slugify(name), "cores": cores,
                "memory_gib": round(props.total_memory / 2 ** 30, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    model = _cpu_model()
    return {"kind": "cpu", "name": f"{model} ({cores} cores)", "slug": f"cpu-{slugify(model)}-{cores}c",
            "cores": cores, "torch_threads": torch.get_num_threads()}


def library_versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for key, dist in VERSION_PACKAGES.items():
        try:
            out[key] = _md.version(dist)
        except _md.PackageNotFoundError:
            out[key] = None
    return out


def git_info() -> Dict[str, object]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    try:
        # untracked (not ignored) files count: a bench or op file not committed yet changes what ran
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def measure_ceilings(device: str, smoke: bool = False) -> Dict[str, dict]:
    """Copy bandwidth and matmul rate of this device, measured now (tiny sizes when ``smoke``)."""
    if smoke:
        copy = rl.measure_copy_bandwidth(device, nbytes=8 << 20, budget_s=0.2)
        mm = rl.measure_matmul_flops(device, n=256, budget_s=0.2)
    else:
        copy = rl.measure_copy_bandwidth(device, nbytes=(1 << 30) if device == "cuda" else (256 << 20))
        mm = rl.measure_matmul_flops(device)
    return {"copy": copy, "matmul": mm}


def best_ceilings(start: Dict[str, dict], end: Dict[str, dict]) -> Dict[str, dict]:
    """Ceilings are measured before and after the suite; the higher of the two counts (so % of ceiling is not
    flattered by a slow moment of a shared machine), and both values are kept."""
    copy = max(start["copy"], end["copy"], key=lambda c: c["gbps"])
    mm = max(start["matmul"], end["matmul"], key=lambda c: c["tflops"])
    return {"copy": dict(copy, measured_gbps=[start["copy"]["gbps"], end["copy"]["gbps"]]),
            "matmul": dict(mm, measured_tflops=[start["matmul"]["tflops"], end["matmul"]["tflops"]])}


# -------------------------------------------------------------------------------------------- records
def _itemsize(dtype: Optional[str]) -> Optional[int]:
    if not dtype:
        return None
    return _ITEMSIZE.get(str(dtype).replace("torch.", "").split("-")[0])


def roofline_for(op: str, mode: str, sizes: dict, dtype: Optional[str]) -> Dict[str, Optional[int]]:
    """Bytes / FLOPs from the shapes when a record does not carry them (None where the op has no model)."""
    isz = _itemsize(dtype)
    # all rows (N, or B * T), and the unmasked ones when the record has them: the ops skip masked rows
    N = sizes.get("N")
    if N is None and "B" in sizes and "T" in sizes:
        N = sizes["B"] * sizes["T"]
    n_valid = sizes.get("N_valid")
    if N is None:
        N = n_valid
    m = mode if mode in rl.MODES else None
    out = {"bytes": None, "flops": None}
    if N is None or isz is None or m is None:
        return out
    if op == "linear_grpo_loss" and "H" in sizes and "V" in sizes:
        out["flops"] = rl.linear_grpo_loss_flops(N, sizes["H"], sizes["V"], m, n_valid=n_valid)
        out["bytes"] = rl.linear_grpo_loss_bytes(N, sizes["H"], sizes["V"], isz, m, n_valid=n_valid)
    elif op == "linear_fpa_logprobs" and "H" in sizes and "H_ref" in sizes and "V" in sizes:
        out["flops"] = rl.linear_fpa_logprobs_flops(N, sizes["H"], sizes["H_ref"], sizes["V"], m, n_valid=n_valid)
    elif op == "grpo_loss" and "V" in sizes:
        out["bytes"] = rl.grpo_loss_bytes(N, sizes["V"], isz, m, n_valid=n_valid)
    elif op == "fpa_logprobs" and "V" in sizes:
        out["bytes"] = rl.fpa_logprobs_bytes(N, sizes["V"], isz, m, n_valid=n_valid)
    return out


def _timing(rec: dict) -> Dict[str, object]:
    """p50 / p20 / p80 (ms): the bench's own quantiles in extra_info when present, else pytest-benchmark's data."""
    ei = rec.get("extra_info") or {}
    stats = rec.get("stats") or {}
    data = stats.get("data") or []
    from_data = rl.quantiles_ms(data) if data else {}
    if not from_data and stats.get("median") is not None:
        m = stats["median"] * 1e3
        from_data = {"p50_ms": m, "p20_ms": m, "p80_ms": m}
    out = {}
    for k in ("p50_ms", "p20_ms", "p80_ms"):
        v = ei.get(k)
        out[k] = float(v) if isinstance(v, (int, float)) else from_data.get(k)
    out["timer"] = ei.get("timer") or ("pytest-benchmark" if from_data else None)
    return out


def figure_from_record(rec: dict, file: str, ceilings: Optional[dict]) -> dict:
    """One normalised figure from a pytest-benchmark JSON record of ``file``."""
    ei = dict(rec.get("extra_info") or {})
    params = rec.get("params") or {}
    func = rec.get("name", "").split("[")[0]
    op = ei.get("op") or DEFAULT_OPS.get(f"{file}::{func}") or DEFAULT_OPS.get(file) or file[:-3]
    provider = ei.get("provider") or params.get("provider") or params.get("rule") or "-"
    mode = ei.get("mode") or ei.get("metric") or "-"
    sizes = {k: ei[k] for k in SIZE_KEYS if k in ei}
    dtype = ei.get("dtype")
    fig = {"op": op, "provider": str(provider), "mode": mode, "sizes": sizes, "dtype": dtype,
           "test": f"{file}::{rec.get('name', '?')}"}
    fig.update(_timing(rec))
    model = roofline_for(op, mode, sizes, dtype)
    fig["bytes"] = ei.get("bytes", model["bytes"])
    fig["flops"] = ei.get("flops", model["flops"])
    p50 = fig["p50_ms"]
    fig["gbps"] = rl.gbps(fig["bytes"], p50) if fig["bytes"] and p50 else None
    fig["tflops"] = rl.tflops(fig["flops"], p50) if fig["flops"] and p50 else None
    fig["pct_copy_bw"] = fig["pct_matmul"] = None
    if ceilings and fig["gbps"] is not None:
        fig["pct_copy_bw"] = rl.pct_of_ceiling(fig["gbps"], ceilings["copy"]["gbps"])
    if ceilings and fig["tflops"] is not None:
        fig["pct_matmul"] = rl.pct_of_ceiling(fig["tflops"], ceilings["matmul"]["tflops"])
    peak = ei.get("peak_mem_mib", ei.get("peak_extra_mib"))
    fig["peak_mem_mib"] = float(peak) if isinstance(peak, (int, float)) else None
    fig["extra"] = {k: v for k, v in ei.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return fig


# ---------------------------------------------------------------------------------------------- schema
def validate_results(doc: dict) -> None:
    """Raise ValueError naming every missing / mistyped field of a results document."""
    errs: List[str] = []

    def need(obj, key, types, where):
        if not isinstance(obj, dict) or key not in obj:
            errs.append(f"{where}.{key} missing")
            return None
        if not isinstance(obj[key], types):
            errs.append(f"{where}.{key} has type {type(obj[key]).__name__}")
        return obj[key]

    num = (int, float)
    opt_num = (int, float, type(None))
    if need(doc, "schema_version", int, "doc") not in (None, SCHEMA_VERSION):
        errs.append(f"doc.schema_version must be {SCHEMA_VERSION}")
    need(doc, "date", str, "doc")
    need(doc, "timestamp", str, "doc")
    dev = need(doc, "device", dict, "doc") or {}
    for k in ("kind", "name", "slug"):
        need(dev, k, str, "device")
    vers = need(doc, "versions", dict, "doc") or {}
    for k in ("torch", "triton", "transformers", "deepspeed", "liger_kernel"):
        need(vers, k, (str, type(None)), "versions")
    git = need(doc, "git", dict, "doc") or {}
    need(git, "commit", (str, type(None)), "git")
    ceil = need(doc, "ceilings", dict, "doc") or {}
    copy = need(ceil, "copy", dict, "ceilings") or {}
    mm = need(ceil, "matmul", dict, "ceilings") or {}
    for k in ("gbps", "p50_ms", "p20_ms", "p80_ms", "nbytes"):
        need(copy, k, num, "ceilings.copy")
    for k in ("tflops", "p50_ms", "p20_ms", "p80_ms", "flops"):
        need(mm, k, num, "ceilings.matmul")
    need(mm, "dtype", str, "ceilings.matmul")
    runs = need(doc, "runs", list, "doc") or []
    for i, r in enumerate(runs):
        need(r, "file", str, f"runs[{i}]")
        st = need(r, "status", str, f"runs[{i}]")
        if st is not None and st not in ("passed", "failed", "timeout", "missing", "skipped-budget"):
            errs.append(f"runs[{i}].status {st!r} unknown")
    figs = need(doc, "figures", list, "doc") or []
    for i, f in enumerate(figs):
        w = f"figures[{i}]"
        for k in ("op", "provider", "mode", "test"):
            need(f, k, str, w)
        need(f, "sizes", dict, w)
        need(f, "extra", dict, w)
        for k in ("p50_ms", "p20_ms", "p80_ms", "bytes", "flops", "gbps", "tflops", "pct_copy_bw", "pct_matmul",
                  "peak_mem_mib"):
            need(f, k, opt_num, w)
        if isinstance(f, dict) and all(isinstance(f.get(k), num) for k in ("p20_ms", "p50_ms", "p80_ms")):
            if not f["p20_ms"] <= f["p50_ms"] * (1 + 1e-9) or not f["p50_ms"] <= f["p80_ms"] * (1 + 1e-9):
                errs.append(f"{w}: expected p20 <= p50 <= p80")
    if errs:
        raise ValueError("invalid results document: " + "; ".join(errs))


# ---------------------------------------------------------------------------------------------- running
def _bench_env(smoke: bool, kind: str, threads: Optional[int] = None) -> Dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("DS_ACCELERATOR", "cpu" if kind == "cpu" else "cuda")
    for var, sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TRITON_CACHE_DIR", "triton"),
                     ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("HF_HOME", "hf")):
        env.setdefault(var, str(ROOT / ".cache" / sub))
    env["TRITON_INTERPRET"] = "0"      # time the real paths: Triton on CUDA, the PyTorch/C++ paths on the CPU
    env["BENCH_SMOKE"] = "1" if smoke else "0"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_file(file: str, timeout_s: float, smoke: bool, kind: str, disable: bool = False,
             deselect: Optional[List[str]] = None, threads: Optional[int] = None) -> Dict[str, object]:
    """Run one bench file under pytest-benchmark; returns {"run": status record, "records": [...]}."""
    path = BENCH_DIR / file
    if not path.is_file():
        return {"run": {"file": file, "status": "missing", "wall_s": 0.0}, "records": []}
    with tempfile.TemporaryDirectory() as tmp:
        js = pathlib.Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
               "-o", "python_files=bench_*.py", f"--benchmark-json={js}"]
        if disable:
            cmd.append("--benchmark-disable")
        for d in deselect or []:
            if d.startswith(f"bench/{file}::"):
                cmd += ["--deselect", d]
        t0 = time.perf_counter()
        timeout_s = max(1.0, timeout_s)
        grace = min(GRACE_S, timeout_s / 4)
        # (the driver's own process group: a time limit on the driver, gpu_check.sh's ``timeout``, reaches it too)
        p = subprocess.Popen(cmd, cwd=ROOT, env=_bench_env(smoke, kind, threads), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            out, _ = p.communicate(timeout=timeout_s - grace)
            status, rc = ("passed" if p.returncode == 0 else "failed"), p.returncode
        except subprocess.TimeoutExpired:
            # SIGINT: pytest stops the running test and still runs pytest-benchmark's session end, which writes
            # the records of the tests that finished (a SIGKILL alone would lose the whole file's figures)
            p.send_signal(signal.SIGINT)
            try:
                out, _ = p.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    out, _ = p.communicate(timeout=10)
                except subprocess.TimeoutExpired:    # a grandchild still holds the pipe
                    out = ""
            status, rc = "timeout", None
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
        tail = (out or "")[-3000:]
        wall = time.perf_counter() - t0
        try:
            records = json.loads(js.read_text())["benchmarks"] if js.is_file() else []
        except (ValueError, KeyError):   # cut off while writing
            records = []
    run = {"file": file, "status": status, "returncode": rc, "wall_s": round(wall, 2),
           "n_records": len(records), "timeout_s": round(timeout_s, 1)}
    if status != "passed":
        run["output_tail"] = tail
    return {"run": run, "records": records}


def file_time_limit(remaining_s: float, files_after: int) -> float:
    """Seconds the next file may run when ``remaining_s`` of the budget is left and ``files_after`` files follow.

    ``RESERVE_S`` is kept back for each later file, so one slow file cannot starve the rest, and ``FINAL_S`` for
    the end of the suite; but never at the cost of this file's own ``RESERVE_S``: run order is priority, so a
    short budget drops the last files first (a reserve taken from the first file would skip it to keep time
    for files after it)."""
    remaining_s -= FINAL_S
    return max(remaining_s - RESERVE_S * files_after, min(remaining_s, RESERVE_S))


def run_suite(files: List[str], budget_s: float, smoke: bool = False, out_dir: pathlib.Path = RESULTS_DIR,
              today: Optional[str] = None, deselect: Optional[List[str]] = None,
              threads: Optional[int] = None) -> pathlib.Path:
    """Measure ceilings, run ``files`` within ``budget_s`` seconds, write the .json and .md; returns the json path.

    ``threads``: CPU intra-op threads for the ceilings and every bench (OMP_NUM_THREADS / MKL_NUM_THREADS in the
    subprocesses); None keeps the machine's default."""
    t_start = time.perf_counter()
    if threads:
        import torch
        torch.set_num_threads(threads)
    device = detect_device()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    ceilings = measure_ceilings(str(device["kind"]), smoke=smoke)
    if deselect is None:
        deselect = CPU_DESELECT if device["kind"] == "cpu" else CUDA_DESELECT
    runs, records = [], []
    for i, file in enumerate(files):
        left = file_time_limit(budget_s - (time.perf_counter() - t_start), len(files) - 1 - i)
        if left < 10:
            runs.append({"file": file, "status": "skipped-budget", "wall_s": 0.0})
            continue
        res = run_file(file, left, smoke, str(device["kind"]), deselect=deselect, threads=threads)
        runs.append(res["run"])
        records += [(file, r) for r in res["records"]]
        print(f"[bench] {file}: {res['run']['status']} in {res['run']['wall_s']} s, "
              f"{len(res['records'])} records", file=sys.stderr)
    ceilings = best_ceilings(ceilings, measure_ceilings(str(device["kind"]), smoke=smoke))
    figures = [figure_from_record(r, file, ceilings) for file, r in records]
    now = _dt.datetime.now(_dt.timezone.utc)
    date = today or now.strftime("%Y-%m-%d")
    doc = {"schema_version": SCHEMA_VERSION, "date": date, "timestamp": now.isoformat(timespec="seconds"),
           "device": device, "versions": library_versions(), "git": git_info(), "ceilings": ceilings,
           "suite": {"files": files, "smoke": smoke, "budget_s": budget_s, "deselected": list(deselect),
                     "threads": threads,
                     "wall_s": round(time.perf_counter() - t_start, 1),
                     "load_avg_before": list(load_before) if load_before else None,
                     "load_avg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
           "runs": runs, "figures": figures}
    validate_results(doc)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a smoke run is named apart: with the default --out it would overwrite that day's real results of the device
    # (and the README table ignores it: the name does not end in the date)
    stem = f"{device['slug']}-{date}" + ("-smoke" if smoke else "")
    jp = out_dir / f"{stem}.json"
    jp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    from .report import render_markdown
    (out_dir / f"{stem}.md").write_text(render_markdown(doc))
    return jp


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="*", default=None, help=f"bench files to run (default: {' '.join(FILES)})")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total wall-clock budget in seconds (480)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (BENCH_SMOKE=1) and tiny ceilings")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="output folder (bench/results)")
    ap.add_argument("--deselect", nargs="*", default=None,
                    help=f"pytest node ids to leave out (default on the CPU: {' '.join(CPU_DESELECT)}; on CUDA: "
                         f"{' '.join(CUDA_DESELECT)})")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for the ceilings and the benches (default: the machine's default); 1 gives "
                         "stable figures on a shared, oversubscribed machine")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    files = args.files or FILES
    deselect = None if args.deselect is None else [d for d in args.deselect if d]
    path = run_suite(files, args.budget_s, smoke=args.smoke, out_dir=args.out, deselect=deselect,
                     threads=args.threads)
    doc = json.loads(path.read_text())
    bad = [r for r in doc["runs"] if r["status"] not in ("passed",)]
    print(f"wrote {path} and {path.with_suffix('.md')} ({len(doc['figures'])} figures)")
    for r in bad:
        print(f"  {r['file']}: {r['status']}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
