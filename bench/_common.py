"""Shared bits of the bench files: device, smoke switch, and the timed-record helper.

``BENCH_SMOKE=1`` makes every bench file use tiny sizes (the CI smoke test runs the suite with
``--benchmark-disable``: each benchmark once, as a correctness check).
"""
from __future__ import annotations

import os
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
