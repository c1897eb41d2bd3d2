"""The C++ CPU op's first-use build: announced, keyed by source + flags, and never hung by a killed build."""
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Builds the op in a fresh extension cache and checks it against the PyTorch reference.
USE_OP = """
import torch
from gxpo_kernels.ops import extrapolate_
from gxpo_kernels.ops.extrapolate import _cpp
from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_
g = torch.Generator().manual_seed(0)
mk = lambda: [torch.randn(37, generator=g), torch.randn(5, 3, generator=g)]
p, t0, g0, g1 = mk(), mk(), mk(), mk()
q = [x.clone() for x in p]
extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="cpp")
extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5)
assert _cpp.load_extension() is not None, "C++ op not built"
assert all(torch.equal(a, b) for a, b in zip(p, q))
print("CPP-OK")
"""


def _env(ext_dir):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("GXPO_CPP_CFLAGS", None)
    return env


@pytest.mark.slow
def test_killed_build_leaves_no_hang(tmp_path):
    """Kill a first-use build midway (its process group, compiler included), then use the op again: the next
    process removes torch's stale lock file, rebuilds and runs, instead of waiting on the lock forever."""
    env = _env(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", USE_OP], env=env, cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    locks = []
    while not locks and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
        locks = list(tmp_path.glob("gxpo_extrapolate_cpu_*/lock"))
    assert locks, f"the build never took torch's lock: {child.communicate()[1].decode()[-2000:]}"
    time.sleep(1.0)   # let the compiler start
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert locks[0].exists()   # what an interrupted build leaves behind
    r = subprocess.run([sys.executable, "-c", USE_OP], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "CPP-OK" in r.stdout, r.stderr[-3000:]
    assert "stale build lock" in r.stderr and "building the C++ CPU op" in r.stderr
    assert not locks[0].exists()
    # A third use finds the build in the cache: no build message, no rebuild.
    r = subprocess.run([sys.executable, "-c", USE_OP], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "CPP-OK" in r.stdout and "building" not in r.stderr, r.stderr[-3000:]


def test_cache_key_follows_source_and_flags(tmp_path, monkeypatch):
    """Another source or other flags get another build folder; the same ones share it."""
    from gxpo_kernels.ops.extrapolate import _cpp
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a = _cpp.build_directory(b"int x;", ["-O3"])
    assert a == _cpp.build_directory(b"int x;", ["-O3"]) and a.parent == tmp_path
    assert a != _cpp.build_directory(b"int y;", ["-O3"])
    assert a != _cpp.build_directory(b"int x;", ["-O2"])


def test_native_builds_are_keyed_by_the_host_cpu(tmp_path, monkeypatch):
    """``-march=native`` code runs only on CPUs with the builder's features: a cache that machines with other
    CPUs share (a home directory on a network file system) must give each CPU its own build, or a machine
    loads another's build and dies of an illegal instruction. Portable flags keep one shared build."""
    from gxpo_kernels.ops.extrapolate import _cpp
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dirs = []
    for cpu in ("vendor_id=AuthenticAMD\nflags=avx2", "vendor_id=AuthenticAMD\nflags=avx2 avx512f"):
        monkeypatch.setattr(_cpp, "_host_cpu", lambda cpu=cpu: cpu, raising=False)
        dirs.append([_cpp.build_directory(b"int x;", flags) for flags in
                     (_cpp._DEFAULT_FLAGS.split(), ["-O3", "-mcpu=native"], ["-O3", "-mavx2"])])
    (native_a, mcpu_a, portable_a), (native_b, mcpu_b, portable_b) = dirs
    assert native_a != native_b and mcpu_a != mcpu_b
    assert portable_a == portable_b


def test_host_cpu_names_the_cpu_features():
    from gxpo_kernels.ops.extrapolate import _cpp
    desc = _cpp._host_cpu()
    assert platform.machine() in desc
    if pathlib.Path("/proc/cpuinfo").is_file():   # Linux: the feature flags (x86 "flags", Arm "Features")
        assert "flags=" in desc or "features=" in desc, desc
        assert "MHz" not in desc   # nothing that changes while the machine runs
