"""Shared bits of the bench files: device, smoke switch, and the timed-record helper.

``BENCH_SMOKE=1`` makes every bench file use tiny sizes (the CI smoke test runs the suite with
``--benchmark-disable``: each benchmark once, as a correctness check).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from .roofline import time_fn

SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed_record(benchmark, fn: Callable[[int], object], *, n_rotate: int = 1, **timing) -> dict:
    """Time ``fn(i)`` (i cycles over ``n_rotate`` input copies) with ``roofline.time_fn`` and put p50/p20/p80
    into ``benchmark.extra_info``; then hand one call to pytest-benchmark so the record exists.

    With ``--benchmark-disable`` only that one call runs (the smoke test): no timing, no quantiles.
    """
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(lambda: fn(0), rounds=1, iterations=1)
        return {}
    t = time_fn(fn, device=DEVICE, n_rotate=n_rotate, **timing)
    benchmark.extra_info.update(p50_ms=t["p50_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], reps=t["reps"],
                                n_rotate=n_rotate, timer="do_bench" if CUDA else "perf_counter")

    def once():
        fn(0)
        sync()

    benchmark.pedantic(once, rounds=1, iterations=1)
    return t


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def step_peak_rss(step: Callable[[], object]) -> dict:
    """Reset the RSS high-water mark (Linux /proc/self/clear_refs), run ``step`` once: its extra peak RSS.

    ``torch._dynamo`` is imported first: the first call of any ``torch.library`` custom op imports it (~70 MiB
    of RSS, once per process), which would otherwise count as the step's memory for providers built on custom
    ops and not for those whose own import already loaded it (Liger's)."""
    importlib.import_module("torch._dynamo")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # resets VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    step()
    return dict(peak_extra_mib=(_rss_kb("VmHWM") - base) / 1024, base_rss_mib=base / 1024)


def cpu_peak_subprocess(module: str, provider: str, cfg: dict) -> dict:
    """``bench.<module>.measure_cpu_peak(provider, cfg)`` in a fresh interpreter, so no other provider's
    allocations (or the allocator's cache) count against this one."""
    code = (f"import json, bench.{module} as b; "
            f"print(json.dumps(b.measure_cpu_peak({provider!r}, {cfg!r})))")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_step_peak_mib(step: Callable[[], object]) -> float:
    """One warm-up ``step`` (compiles), then the CUDA memory a second one allocates above what is live, MiB."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def results_cli(prog: str, doc: str, default_out: Path, measure: Callable[[], dict], argv=None) -> dict:
    """``python -m bench.<prog> [OUT.json]`` for a script that measures once and writes one JSON result file
    (default ``default_out``): parse the arguments (``--help`` measures nothing), measure, write, return."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"python -m bench.{prog}", description=doc.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(default_out),
                    help=f"JSON output (default {default_out.name} in bench/results)")
    a = ap.parse_args(argv)
    res = measure()
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return res
