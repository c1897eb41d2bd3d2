"""Benchmark set-up: device / library versions / commit go into every pytest-benchmark record.

Benchmarks run real kernels: Triton on CUDA, the PyTorch path on CPU (never the interpreter, whose timings
mean nothing). Caches point into the workspace.
"""
import os
import pathlib
import subprocess

_root = pathlib.Path(__file__).resolve().parents[1]
for _var, _sub in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(_var, str(_root / ".cache" / _sub))

import pytest  # noqa: E402
import torch  # noqa: E402


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{os.cpu_count()}cores"


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    machine_info.update(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                        commit=_commit(), triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def bench_meta(benchmark):
    """Per-record metadata (device, commit) on top of the machine-wide info."""
    benchmark.extra_info.update(device=device_name(), commit=_commit())
    return benchmark.extra_info
