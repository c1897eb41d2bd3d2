"""Shared plumbing: backend selection and input validation used by every op.

Dispatch rule (one place for the whole library): CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch path, unless ``TRITON_INTERPRET=1`` is set, in which case Triton kernels run on the CPU through the
interpreter (how the test suite exercises them). ``backend=`` forces a path.
"""
from __future__ import annotations

import functools
import importlib
import math
import numbers
import os
import re
import warnings
from typing import Optional, Union

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "triton", "torch")

# Optional dependencies: import name -> (distribution, the extra of pyproject.toml that installs it). The core
# (ops, update rules, advantages) imports none of them.
OPTIONAL_DEPS = {
    "transformers": ("transformers", "train"), "tqdm": ("tqdm", "train"), "matplotlib": ("matplotlib", "train"),
    "safetensors": ("safetensors", "train"), "math_verify": ("math-verify", "math"),
    "deepspeed": ("deepspeed", "deepspeed"), "trl": ("trl", "trl"),
}


def missing_extra(error: ImportError, what: str = "this") -> Optional[str]:
    """For an ImportError of a missing optional dependency: a one-line message naming the extra to install;
    None when ``error`` is about another module (a genuine bug or a broken install, to be re-raised as is)."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or name not in OPTIONAL_DEPS:
        return None
    dist, extra = OPTIONAL_DEPS[name]
    return f"{what} needs {dist}, which is not installed: pip install 'gxpo-kernels[{extra}]'"


def require(module: str, what: str):
    """Import and return the optional dependency ``module`` (a key of ``OPTIONAL_DEPS``) that ``what`` needs; an
    ImportError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = missing_extra(e, what)
        if message is None:
            raise
        raise ImportError(message) from e


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_index_compat() -> None:
    """Let Triton's interpreter use a runtime scalar as an index (``range(0, n, BLOCK)`` with ``n`` a kernel
    argument) under NumPy >= 2.4. The interpreter of Triton 3.6 and older converts such a scalar, a shape-(1,)
    array, with ``int(array)``, which NumPy 2.4 turned from a deprecation warning into a TypeError; later Triton
    squeezes the array first (triton-lang/triton#9171). This applies that fix to an interpreter that lacks it.
    Interpreter only: compiled kernels never reach this code."""
    import numpy as np
    try:
        int(np.zeros(1))
        return                                   # NumPy still converts a size-1 array: nothing to do
    except TypeError:
        pass
    import inspect

    from triton.runtime import interpreter
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or list(inspect.signature(orig).parameters) != ["tensor", "scope"] or getattr(
            orig, "_gxpo_index_compat", False):
        return                                   # another interpreter layout (or already wrapped): leave it alone

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._gxpo_index_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


if triton_interpret():
    _interpreter_index_compat()


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


def autocast_off(fn):
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    The kernels' host code picks its own precision (fp32 statistics and epilogues, fp32 GEMMs for fp32 or
    ``fp32_head`` operands); an enclosing ``torch.autocast`` region would otherwise reach the torch ops inside
    (matmul, vecdot) and silently round them to bf16/fp16, or crash on an fp32-only constant."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        # (meta tensors, as the sm_90 compile check passes, have no autocast state to ask about)
        if dev is None or not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def check_no_forward_ad(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """Raise if a differentiable input of ``op`` carries a forward-mode tangent (``torch.func.jvp`` / ``jacfwd``,
    ``torch.autograd.forward_ad`` dual tensors). The registered ops have a backward formula only, and PyTorch
    drops such a tangent: the directional derivative would be 0 without an error. Skipped while compiling."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError(f"{op} does not support forward-mode AD (torch.func.jvp / jacfwd, forward_ad dual "
                               "tensors): it has a backward formula only; use reverse mode (backward, "
                               "torch.autograd.grad)")


def refuse_second_derivative(op_name: str, ops: str) -> None:
    """Register, as the autograd formula of the backward op ``op_name``, an error naming the public ``ops``: their
    backward is itself not differentiable, and PyTorch's own message for an op without a formula ("no autograd
    formula was registered. Please use register_autograd to add one") points the user at our internals."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{ops} are differentiable once: a second derivative (create_graph=True followed by a "
                           f"backward through the gradient, torch.autograd.functional.hessian) would go through "
                           f"their backward op {op_name}, which has no derivative")
    torch.library.register_autograd(op_name, backward)


def resolved(*tensors: Optional[torch.Tensor]) -> tuple:
    """The tensors with a pending negation materialised (``resolve_neg``: the tensor itself when its neg bit is
    unset, a C-level check). A lazily negated view (``torch._neg_view(x)``, ``z.conj().imag``) keeps the
    un-negated values in memory: code that hands ``data_ptr()`` to a Triton kernel or C++ would read the sign
    wrong. Torch ops honour the bit (so do ``torch.library`` ops, whose inputs the dispatcher resolves)."""
    return tuple(None if t is None else t.resolve_neg() for t in tensors)


def check_tensor(x, name: str, *, ndim=None, dtypes=None, floating: bool = False) -> None:
    """Raise TypeError/ValueError naming ``name`` if ``x`` is not a tensor of the expected kind."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:   # the kernels read strided memory ("Cannot access storage of SparseTensorImpl")
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; pass {name}.to_dense()")
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


_INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


def check_scalar(value, name: str, interval: str = "(-inf, inf)", *, optional: bool = False,
                 integer: bool = False) -> Union[float, int, None]:
    """Validate a hyperparameter and return it as a Python ``float`` (``int`` when ``integer``).

    Accepts Python/numpy real numbers and 0-d tensors (read once, on the host: pass host scalars on the hot
    path; a tensor that requires grad is refused outside ``no_grad``, since no gradient would reach it).
    Rejects booleans, NaN/inf, non-numbers and values outside ``interval``, a string in interval notation such
    as ``"[0, 1)"`` or ``"(0, inf)"``; the error names the argument and the interval.
    ``optional=True`` lets ``None`` through unchanged.
    """
    if value is None and optional:
        return None
    what = "an integer" if integer else "a finite real number"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be {what} in {interval}, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        if torch.compiler.is_compiling():  # its value is data: no guard or range check can be traced on it
            raise TypeError(f"{name} must be a Python number inside torch.compile, got a tensor")
        if value.requires_grad and torch.is_grad_enabled():
            # read as a constant: a learnable temperature or coefficient would silently get no gradient
            raise TypeError(f"{name} is a tensor that requires grad, but it is read as a constant and gets no "
                            f"gradient; pass a number or {name}.detach()")
        value = value.item()
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what} in {interval}{' or None' if optional else ''}, "
                        f"got {value!r} ({type(value).__name__})")
    if integer:
        if not isinstance(value, numbers.Integral):
            if not (math.isfinite(float(value)) and float(value) == int(value)):
                raise TypeError(f"{name} must be {what} in {interval}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not -math.inf < value < math.inf:  # not math.isfinite: torch.compile traces a float as a SymFloat
            raise ValueError(f"{name} must be {what} in {interval}, got {value!r}")
    m = _INTERVAL.match(interval)
    if m is None:  # pragma: no cover - programming error
        raise AssertionError(f"bad interval {interval!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    ok_lo = value >= lo if m.group(1) == "[" else value > lo
    ok_hi = value <= hi if m.group(4) == "]" else value < hi
    if not (ok_lo and ok_hi):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    """A flag as a Python ``bool``: ``True`` / ``False`` or a numpy bool (``np.bool_``). Anything else raises
    TypeError naming ``name``: a string such as ``"no"`` or ``"false"`` is truthy and read as True, and the ints 0
    and 1 are refused too, as ``check_scalar`` refuses a bool where a number is expected (one rule each way; a
    0-d tensor is refused, since reading it would sync with a GPU)."""
    t = type(value)
    if isinstance(value, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_")):   # np.bool_
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")


def check_bools(**flags) -> None:
    """``check_bool`` for each keyword: ``check_bools(compute_entropy=compute_entropy, ...)``."""
    for name, value in flags.items():
        check_bool(value, name)


# logits / temperature and its reciprocal stay finite and well-scaled in fp32 over this range
TEMPERATURE_RANGE = "[1e-6, 1e6]"


LOW_TEMPERATURE = 0.01   # below: fp32 log-probs of logits / T lose about 4e-6 / T (docs/validation.md)


def check_temperature(temperature, *, warn: bool = True) -> float:
    """The sampling temperature as a float in ``TEMPERATURE_RANGE`` (one rule for every op). Below
    ``LOW_TEMPERATURE`` a ``UserWarning`` (once per process, Python's default filter) gives the log-prob error to
    expect; ``warn=False`` for a temperature that only samples."""
    t = check_scalar(temperature, "temperature", TEMPERATURE_RANGE)
    if warn and t < LOW_TEMPERATURE and not torch.compiler.is_compiling():
        warnings.warn(f"temperature={t:g}: log-probs of logits / temperature computed in fp32 are off by about "
                      f"{4e-6 / t:.0e} (absolute, for logits up to ~30; the gradients stay at fp32 precision); "
                      "see docs/validation.md", UserWarning, stacklevel=3)
    return t


VALIDATE_LEVELS = ("cheap", "full")


def check_validate(validate: str) -> str:
    """``"cheap"``: shapes, dtypes, devices and host scalars only (no host sync); ``"full"``: also the
    checks that read tensor values (ids in range, 0/1 mask), which synchronise with a GPU."""
    check_choice(validate, "validate", VALIDATE_LEVELS)
    return validate


def host_sync_free(device: torch.device) -> bool:
    """True where reading a tensor's value on the host would stall the device (CUDA), or under
    ``torch.compile``: the ops then pick paths that never do (e.g. no masked-row compaction)."""
    return device.type in ("cuda", "meta") or torch.compiler.is_compiling()   # (meta: no values to read)


def masked_row_index(mask1d: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the True rows of a flat bool mask, or None for "use every row".

    Compacting the rows saves the work of masked rows but needs their count on the host, a sync on CUDA;
    where ``host_sync_free`` the answer is None and callers neutralise masked rows instead."""
    if host_sync_free(mask1d.device) or bool(mask1d.all()):
        return None
    return mask1d.nonzero().squeeze(1)


def safe_tokens(tokens: torch.Tensor, vocab_size: int, mask: torch.Tensor):
    """Device-side id check: (ids clamped into [0, V) so kernels never read out of bounds, bool (B, T) of the
    unmasked positions whose id was out of range). Callers turn those positions' log-probs into NaN, so a bad
    id poisons the loss loudly instead of reading memory it does not own; no host sync."""
    bad = mask & ((tokens < 0) | (tokens >= vocab_size))
    return torch.where(bad | ~mask, torch.zeros((), dtype=tokens.dtype, device=tokens.device), tokens), bad


def compiled_safe_tokens(tokens: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor]):
    """``safe_tokens`` where ``checked_mask`` could not read the ids (under ``torch.compile``), else
    ``(tokens, None)``: eager calls of the log-prob ops have already raised on a bad id. With the clamped ids
    the kernels never read outside a row, and the caller makes the bad positions' log-probs NaN (``nan_at``),
    as ``grpo_loss`` does, instead of returning another token's log-prob."""
    if not torch.compiler.is_compiling():
        return tokens, None
    m = mask if mask is not None else torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    return safe_tokens(tokens, vocab_size, m)


def nan_at(bad: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN where ``bad`` (from ``safe_tokens`` / ``compiled_safe_tokens``) is True, in value and in
    gradient: ``x * (NaN or 1)``, where ``torch.where(bad, nan, x)`` gave the bad positions a zero gradient, so a
    NaN loss came with a finite gradient (the other tokens', the bad ones left out) that an optimizer step would
    take; ``x`` itself when ``bad`` is None."""
    if bad is None:
        return x
    return x * torch.where(bad.reshape(x.shape), float("nan"), 1.0).to(x.dtype)


def has_internal_overlap(x: torch.Tensor) -> bool:
    """True if two indices of ``x`` may share memory (stride 0 broadcasts, ``unfold`` windows). Conservative:
    a layout it cannot prove overlap-free counts as overlapping. Reads strides only (no sync)."""
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1)
    extent = 1  # 1 + the largest offset reachable through the faster dims
    for st, sz in dims:
        if st < extent:
            return True
        extent += st * (sz - 1)
    return False


def saved_tensor_hooks_active() -> bool:
    """True inside ``torch.autograd.graph.saved_tensors_hooks`` (a non-reentrant ``torch.utils.checkpoint``,
    ``save_on_cpu``, activation offloading). Tensors saved there skip autograd's version check, so an op that
    overwrites a saved input in its backward must not rely on that check. Where torch no longer has the query,
    it answers True (the safe choice)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


def check_tokens_in_range(tokens: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor] = None,
                          name: str = "tokens") -> None:
    """Token ids at unmasked positions must lie in [0, vocab_size); masked positions may hold anything."""
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {tokens.dtype}")
    if tokens.is_meta:
        return   # shapes only (e.g. shape inference on the meta device): no ids to check
    t = tokens if mask is None else tokens[mask.bool()]
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        # a negative id is most often a label padding (Hugging Face's ignore_index -100): say how to ignore it
        hint = (f"; a padding id such as Hugging Face's ignore_index -100 is not ignored here: mask those positions "
                f"(mask={name} != -100; a masked position's id is never read)") if lo < 0 else ""
        raise ValueError(f"{name} must lie in [0, {vocab_size}) at unmasked positions; found ids in [{lo}, {hi}]"
                         + hint)


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


def check_finite(x: torch.Tensor, name: str, mask: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError if ``x`` holds NaN/inf; with a bool ``mask`` (broadcast over x's leading dims) only
    unmasked entries count, since the ops ignore the rest. Reads the data: a host sync on CUDA. Skipped under
    ``torch.compile`` (a traced graph cannot branch on data), for every op alike, and for meta tensors."""
    if torch.compiler.is_compiling() or x.is_meta:
        return
    ok = torch.isfinite(x)
    if mask is not None:
        ok = ok | ~mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    if not bool(ok.all()):
        raise ValueError(f"{name} contains NaN or inf" + (" at unmasked positions" if mask is not None else ""))


def check_bias_finite(bias: Optional[torch.Tensor]) -> None:
    """``check_finite`` for an lm_head bias: NaN or +inf is refused, -inf is allowed (a banned token, probability
    0). Reads the data: a host sync on CUDA; skipped under ``torch.compile``, as ``check_finite``."""
    if bias is None or torch.compiler.is_compiling() or bias.is_meta:
        return
    if bool((torch.isnan(bias) | (bias == float("inf"))).any()):
        raise ValueError("bias contains NaN or +inf (-inf entries, banned tokens, are allowed)")


def normalize_mask(mask: Optional[torch.Tensor], shape, device, check_values: bool = True) -> torch.Tensor:
    """Return a bool mask of ``shape`` (all True when ``mask`` is None), validating dtype and shape.

    A numeric mask must hold only 0/1; ``check_values=False`` skips reading it (no host sync) and treats
    every non-zero entry as True."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    check_tensor(mask, "mask")   # a tensor, dense (a sparse mask failed inside PyTorch's indexing)
    check_shape(mask, "mask", shape)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if check_values and not mask.is_meta and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0/1 (or be bool)")
        return mask != 0
    raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
