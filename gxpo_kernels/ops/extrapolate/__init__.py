"""Fused in-place extrapolation for the GXPO/SFPO update rules: ``op.py`` (Triton kernel, dispatch),
``_cpp.py`` + ``extrapolate_cpu.cpp`` (the C++/OpenMP CPU op), ``reference.py`` (PyTorch reference)."""
from .op import STAT_NAMES, extrapolate_, stats_to_dict

__all__ = ["extrapolate_", "stats_to_dict", "STAT_NAMES"]
