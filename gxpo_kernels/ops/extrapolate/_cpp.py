"""Loader of the C++/OpenMP CPU op (``extrapolate_cpu.cpp``, shipped inside the package), built on first use.

The build is ``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` (torch's default cache when
unset), in a folder named after a hash of the source, the flags, the torch and Python versions and, when a flag
says ``native``, the host CPU (``_host_cpu``): a changed source or flag never reuses a stale build, a cache
shared by machines with other CPUs (a home directory on a network file system) never hands one CPU's
``-march=native`` build to another (illegal instruction), and every checkout or installed copy with the same
source shares one build (the source is copied into that folder and compiled from there, so ninja sees the same
paths from any checkout).

The first build says so on stderr and reports its duration. Builds are serialised by an OS file
lock (``fcntl.flock``), which the kernel releases when its holder dies; torch's own lock file is not released
when a build is killed midway (timeout, Ctrl-C), and every later build would wait on it forever. Whoever holds
the OS lock knows that no build is running, so a torch lock file found then is stale and is removed.

When no compiler is available (or the build fails) the callers fall back to the PyTorch reference after a
one-time warning (and the public op's cache checks, ``tensor_records``, to Python-level passes).
``GXPO_CPP_CFLAGS`` replaces the default flags (``-O3 -march=native -ffp-contract=off
-fopenmp``: no FMA contraction, so results match the reference bit for bit; the op is built on the machine that
runs it). ``GXPO_CPP_BUILD_TIMEOUT`` (seconds, default 900) bounds the wait for another process's build.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import platform
import sys
import threading
import time
import warnings
from typing import Optional

import torch

_LOCK = threading.Lock()
_MODULE = None
_FAILED = False
_NAME = "gxpo_extrapolate_cpu"
_SOURCE_NAME = "extrapolate_cpu.cpp"
_DEFAULT_FLAGS = "-O3 -march=native -ffp-contract=off -fopenmp"


def _source() -> Optional[pathlib.Path]:
    cand = pathlib.Path(__file__).resolve().parent / _SOURCE_NAME
    return cand if cand.is_file() else None


def _flags():
    return os.environ.get("GXPO_CPP_CFLAGS", _DEFAULT_FLAGS).split()


_CPU_KEYS = ("vendor_id", "cpu family", "model", "model name", "flags", "features", "cpu implementer",
             "cpu architecture", "cpu variant", "cpu part", "isa")


def _host_cpu() -> str:
    """What ``-march=native`` compiles for: the machine type and, where ``/proc/cpuinfo`` exists, the first
    CPU's model and feature flags (the lines that do not change while the machine runs); elsewhere what
    ``platform.processor()`` says."""
    out = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break   # the first CPU's block only
                k, _, v = line.partition(":")
                if k.strip().lower() in _CPU_KEYS:
                    out.append(f"{k.strip().lower()}={v.strip()}")
    except OSError:
        out.append(platform.processor())
    return "\n".join(out)


def build_directory(src: bytes, flags) -> pathlib.Path:
    """The cache folder of this source + flags + torch and Python versions, + the host CPU when a flag targets
    the native CPU (created if missing)."""
    from torch.utils import cpp_extension
    parts = [src, " ".join(flags).encode(), torch.__version__.encode(), sys.version.encode()]
    if any("native" in f for f in flags):
        parts.append(_host_cpu().encode())
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    path = pathlib.Path(root) / f"{_NAME}_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(path: pathlib.Path):
    """Hold an OS lock on ``path.flock`` (released by the kernel if this process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    timeout = float(os.environ.get("GXPO_CPP_BUILD_TIMEOUT", "900"))
    with open(str(path) + ".flock", "a+") as fh:
        t0, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(f"gxpo_kernels: waiting for another process to finish building the C++ op in {path}",
                          file=sys.stderr, flush=True)
                    told = True
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"another process has been building the C++ op in {path} for over "
                                       f"{timeout:.0f} s (GXPO_CPP_BUILD_TIMEOUT)")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build():
    src_path = _source()
    if src_path is None:
        raise FileNotFoundError(f"{_SOURCE_NAME} is missing from the installed package")
    from torch.utils import cpp_extension
    src, flags = src_path.read_bytes(), _flags()
    path = build_directory(src, flags)
    with _build_lock(path):
        stale = path / "lock"   # torch's lock file; nobody else can be building while we hold the OS lock
        if stale.exists():
            print(f"gxpo_kernels: removing a stale build lock left by an interrupted build: {stale}",
                  file=sys.stderr, flush=True)
            stale.unlink()
        local_src = path / _SOURCE_NAME
        if not local_src.is_file() or local_src.read_bytes() != src:
            tmp = path / f".{_SOURCE_NAME}.{os.getpid()}"
            tmp.write_bytes(src)
            os.replace(tmp, local_src)
        built = any(path.glob(f"{path.name}*.so"))
        if not built:
            print(f"gxpo_kernels: building the C++ CPU op on first use (once per machine) in {path}",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        mod = cpp_extension.load(name=path.name, sources=[str(local_src)], extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], build_directory=str(path), verbose=False)
        if not built:
            print(f"gxpo_kernels: built the C++ CPU op in {time.perf_counter() - t0:.0f} s (cached for later use)",
                  file=sys.stderr, flush=True)
    return mod


def _shorten(msg: str, head: int = 200, tail: int = 1500) -> str:
    """A build error for the warning: its start and its end. A failed compile's message starts with the long
    compiler command line; the reason (the compiler's error, "ninja: build stopped") is at the end."""
    if len(msg) <= head + tail + 5:
        return msg
    return f"{msg[:head]} [...] {msg[-tail:]}"


def load_extension():
    """Return the compiled module, or None (after one warning) when it cannot be built."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED:
        return _MODULE
    with _LOCK:
        if _MODULE is not None or _FAILED:
            return _MODULE
        try:
            _MODULE = _build()
        except Exception as e:  # no compiler, no OpenMP, read-only cache, ...
            _FAILED = True
            warnings.warn(f"gxpo_kernels: could not build the C++ extrapolation extension ({type(e).__name__}: "
                          f"{_shorten(str(e))}); falling back to the PyTorch reference on the CPU (slower) and to "
                          "Python-level checks of extrapolate_'s cached tensor lists (a slower host part).",
                          RuntimeWarning)
    return _MODULE


def extrapolate_cpp_(params, theta0, g0, g1, lowp_out, thr, *, alpha, K, clip_coef0, clip_coef1,
                     scale_formula, delta, r_min, r_max) -> Optional[torch.Tensor]:
    """Run the C++ op; None when the extension is unavailable (the caller then uses the reference)."""
    mod = load_extension()
    if mod is None:
        return None
    return mod.extrapolate_cpu(list(params), list(theta0), list(g0) if g0 is not None else [],
                               list(g1) if g1 is not None else [],
                               list(lowp_out) if lowp_out is not None else [], thr,
                               float(alpha), int(K), float(clip_coef0), float(clip_coef1),
                               scale_formula == "closed", float(delta), float(r_min), float(r_max))


def snapshot_copy_(dst, src) -> Optional[list]:
    """``dst[i].copy_(src[i])`` with non-temporal stores (the C++ op's ``snapshot_copy``) for every pair that is
    CPU, contiguous, of one dtype and one numel, with no negated view (``is_neg()``) on either side; returns the
    indices of the other pairs (the caller copies those), or None when the extension is unavailable."""
    mod = load_extension()
    if mod is None:
        return None
    return mod.snapshot_copy(list(dst), list(src))
