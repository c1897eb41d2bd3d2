"""Shared plumbing: backend selection and input validation used by every op.

Dispatch rule (one place for the whole library): CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch path, unless ``TRITON_INTERPRET=1`` is set, in which case Triton kernels run on the CPU through the
interpreter (how the test suite exercises them). ``backend=`` forces a path.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device, *, choices=BACKENDS, cpu: str = "torch", interpret: bool = True) -> str:
    """The backend that runs on ``device`` (the one dispatch rule of the library).

    ``backend="auto"`` gives "triton" for CUDA tensors, and on the CPU ``cpu`` ("torch" for the loss ops,
    "cpp" for ``extrapolate_``), or "triton" when ``interpret`` and ``TRITON_INTERPRET=1`` (how the tests run
    the kernels on the CPU). A forced backend is checked against the device; ``choices`` lists the allowed names.
    """
    if backend not in choices:
        raise ValueError(f"backend must be one of {tuple(choices)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" or (interpret and triton_interpret()):
            return "triton"
        return cpu
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import to run the "
            f"kernels on the CPU); got a tensor on {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got {device}")
    return backend


def check_tensor(x, name: str, *, ndim=None, dtypes=None, floating: bool = False) -> None:
    """Raise TypeError/ValueError naming ``name`` if ``x`` is not a tensor of the expected kind."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_shape(x: Optional[torch.Tensor], name: str, shape) -> None:
    if x is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tokens_in_range(tokens: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor] = None,
                          name: str = "tokens") -> None:
    """Token ids at unmasked positions must lie in [0, vocab_size); masked positions may hold anything."""
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {tokens.dtype}")
    t = tokens if mask is None else tokens[mask.bool()]
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}) at unmasked positions; found ids in [{lo}, {hi}]")


def checked_mask(mask: Optional[torch.Tensor], shape, device, tokens: torch.Tensor, vocab_size: int, *,
                 none_is_all: bool = True) -> Optional[torch.Tensor]:
    """The validated bool mask of ``shape`` for an op's ``mask`` and ``tokens`` arguments.

    ``None`` gives all True (or stays None when not ``none_is_all``). Checks 0/1 values and ``tokens`` in
    [0, vocab_size) at unmasked positions, except under ``torch.compile``: a traced graph cannot branch on
    tensor values, so only the checks that need no data (shape, dtype) run there.
    """
    shape = tuple(shape)
    if torch.compiler.is_compiling():
        check_shape(mask, "mask", shape)
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 (or int32), got {tokens.dtype}")
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device) if none_is_all else None
        return mask if mask.dtype == torch.bool else mask != 0
    m = normalize_mask(mask, shape, device) if (mask is not None or none_is_all) else None
    check_tokens_in_range(tokens, vocab_size, m)
    return m


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def normalize_mask(mask: Optional[torch.Tensor], shape, device) -> torch.Tensor:
    """Return a bool mask of ``shape`` (all True when ``mask`` is None), validating dtype and shape."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_shape(mask, "mask", shape)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0/1 (or be bool)")
        return mask != 0
    raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
