"""Loader of the C++/OpenMP CPU extension (``extrapolate_cpu.cpp``, beside this file), built on first use and cached.

``torch.utils.cpp_extension.load`` compiles into ``$TORCH_EXTENSIONS_DIR`` (its default when unset) and
reuses the build while the source is unchanged. When no compiler is available (or the build fails)
the callers fall back to the PyTorch reference after a one-time warning. ``GXPO_CPP_CFLAGS`` replaces the
default flags (``-O3 -march=native -ffp-contract=off -fopenmp``: no FMA contraction, so results match the
reference bit for bit; the extension is built on the machine that runs it).
"""
from __future__ import annotations

import os
import pathlib
import threading
import warnings
from typing import Optional

import torch

_LOCK = threading.Lock()
_MODULE = None
_FAILED = False


def _source() -> Optional[pathlib.Path]:
    cand = pathlib.Path(__file__).resolve().parent / "extrapolate_cpu.cpp"
    return cand if cand.is_file() else None


def load_extension():
    """Return the compiled module, or None (after one warning) when it cannot be built."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED:
        return _MODULE
    with _LOCK:
        if _MODULE is not None or _FAILED:
            return _MODULE
        src = _source()
        try:
            if src is None:
                raise FileNotFoundError("gxpo_kernels/ops/extrapolate/extrapolate_cpu.cpp not found")
            from torch.utils import cpp_extension
            flags = os.environ.get("GXPO_CPP_CFLAGS", "-O3 -march=native -ffp-contract=off -fopenmp").split()
            _MODULE = cpp_extension.load(name="gxpo_extrapolate_cpu", sources=[str(src)], extra_cflags=flags,
                                         extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no OpenMP, read-only cache, ...
            _FAILED = True
            warnings.warn(f"gxpo_kernels: could not build the C++ extrapolation extension ({type(e).__name__}: "
                          f"{str(e)[:300]}); falling back to the PyTorch reference (slower).", RuntimeWarning)
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
