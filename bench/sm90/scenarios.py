"""The launches to compile: every Triton kernel of the library, driven through its own host launcher at the
target sizes (V = 151,936; H = 1,536 and 4,096; N = 16,384 tokens) with ``meta`` tensors (no memory, no data),
so the block sizes, warps and constexpr branches are the ones the launchers choose on an sm_90 GPU.

A scenario is ``(op, case, sizes, call, elems_per_iter, loads_per_iter)``: ``call()`` invokes the launcher;
``elems_per_iter(constexprs)`` is how many elements one iteration of the hot loop handles (None for GEMM
kernels), so the SASS count of that loop can be given per element and thread. ``loads_per_iter(constexprs,
elems_per_thread)``: for a kernel with a masked and an unmasked copy of its loop body, the global loads (``LDG``)
of one body; the hot loop is then the cheapest such loop per element, and a loop the compiler unrolled counts
as that many iterations.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from unittest import mock

import torch

V = 151_936
N = 16_384
B, T = 8, 2_048          # N = B * T
HS = (1_536, 4_096)
META = torch.device("meta")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STREAM_DTYPES = {**DTYPES, "fp16": torch.float16}   # the streaming log-prob kernels also take fp16 logits


@dataclass
class Scenario:
    op: str
    case: str
    sizes: Dict[str, int]
    call: Callable[[], Any]
    elems_per_iter: Optional[Callable[[Dict[str, Any]], int]] = None
    loads_per_iter: Optional[Callable[[Dict[str, Any], float], int]] = None
    budget: bool = True   # False: no hot-loop budget (a configuration other than the default one)


def _mod(name: str):
    return importlib.import_module(f"gxpo_kernels.ops.{name}")   # e.g. "logprobs.kernel"


def _e(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


@contextlib.contextmanager
def as_sm90():
    """Host code sees an sm_90 GPU (compute capability 9.0, 132 SMs): only the launch configuration depends on it."""
    props = mock.Mock(multi_processor_count=132, total_memory=80 << 30, major=9, minor=0)
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch("torch.cuda.get_device_properties", return_value=props):
        yield


def _per_block_v(c):
    return c["BLOCK_V"]


def token_logprobs_scenarios() -> List[Scenario]:
    m = _mod("logprobs.kernel")
    out = []
    for dn, dt in STREAM_DTYPES.items():
        logits = _e(B, T, V, dtype=dt)
        tok = _e(B, T, dtype=torch.int64)
        msk = _e(B, T, dtype=torch.bool)
        stat = _e(B, T)
        for has_mask in (False, True):
            for ent in (True, False):
                out.append(Scenario("token_logprobs_fwd", f"{dn} mask={has_mask} entropy={ent}",
                                    {"N": N, "V": V}, lambda lg=logits, mk=has_mask, e=ent:
                                    m.token_logprobs_fwd(lg, tok, msk if mk else None, 0.9, e, "triton"),
                                    _per_block_v))
            for dent in (True, False):
                out.append(Scenario("token_logprobs_bwd", f"{dn} mask={has_mask} dentropy={dent}",
                                    {"N": N, "V": V}, lambda lg=logits, mk=has_mask, d=dent:
                                    m.token_logprobs_bwd(lg, tok, msk if mk else None, stat, stat, stat,
                                                         stat if d else None, 0.9, False, "triton"),
                                    _per_block_v))
    return out


def fpa_scenarios() -> List[Scenario]:
    m = _mod("fpa.kernel")
    out = []
    for dn, dt in STREAM_DTYPES.items():
        lg = _e(1, N, V, dtype=dt)         # (B, T, V) with B = 1: one launch over N rows
        tok = _e(N, dtype=torch.int64)
        msk = _e(N, dtype=torch.bool)
        for has_mask in (False, True):     # (its backward is token_logprobs' backward)
            mk = msk if has_mask else None
            out.append(Scenario("fpa_logprobs_fwd", f"{dn} mask={has_mask}", {"N": N, "V": V},
                                lambda lg=lg, mk=mk: m.fpa_logprobs_fwd(lg, lg, tok, mk, 1.0, 0.9, "triton"),
                                _per_block_v))
    return out


# (label, hidden dtype, weight dtype, fp32_head)
HEADS = [("bf16", torch.bfloat16, torch.bfloat16, False), ("bf16+fp32_head", torch.bfloat16, torch.bfloat16, True),
         ("fp32", torch.float32, torch.float32, False),
         ("bf16 hidden+fp32 weight", torch.bfloat16, torch.float32, True)]   # mixed inputs need fp32_head


def linear_head_scenarios() -> List[Scenario]:
    m = _mod("fused_head.engine")
    out = []
    for H in HS:
        for label, hdt, wdt, f32 in HEADS:
            h, w, y = _e(N, H, dtype=hdt), _e(V, H, dtype=wdt), _e(N, dtype=torch.int64)
            b = _e(V, dtype=wdt)
            st = _e(N)
            sizes = {"N": N, "H": H, "V": V}
            for det in (False, True):
                cfg = m._HeadConfig("triton", f32, det, None)
                for has_bias in (False, True):
                    bb = b if has_bias else None
                    if not det:
                        out.append(Scenario("linear_head_fwd", f"{label} bias={has_bias}", sizes,
                                            lambda h=h, w=w, bb=bb, cfg=cfg: m._fwd_triton(h, w, bb, y, 1.1, cfg)))
                    # backward: full training (dh, dw, db), with and without the entropy term
                    for dent in (True, False):
                        out.append(Scenario(
                            "linear_head_bwd", f"{label} deterministic={det} bias={has_bias} dentropy={dent}", sizes,
                            lambda h=h, w=w, bb=bb, cfg=cfg, d=dent: m._bwd_triton(
                                h, w, bb, y, st, st, st, st if d else None, 1.1, cfg, (True, True, bb is not None))))
                # frozen head (LoRA): grad_hidden only
                out.append(Scenario("linear_head_bwd", f"{label} deterministic={det} hidden-only", sizes,
                                    lambda h=h, w=w, cfg=cfg: m._bwd_triton(h, w, None, y, st, st, st, st, 1.1, cfg,
                                                                            (True, False, False))))
    return out


def linear_fpa_scenarios() -> List[Scenario]:
    m = _mod("fpa.linear")
    lt = _mod("fused_head.engine")
    out = []
    for H in HS:
        for label, hdt, wdt, f32 in HEADS:
            h, w, y = _e(N, H, dtype=hdt), _e(V, H, dtype=wdt), _e(N, dtype=torch.int64)
            cfg = lt._HeadConfig("triton", f32, False, None)
            for has_bias in (False, True):
                b = _e(V, dtype=wdt) if has_bias else None
                out.append(Scenario("linear_fpa_fwd", f"{label} bias={has_bias}", {"N": N, "H": H, "V": V},
                                    lambda h=h, w=w, b=b, cfg=cfg: m._fwd_triton(h, w, b, h, w, b, y, 1.1, 1.0, cfg)))
    return out


@contextlib.contextmanager
def _cuda_launch_config(mod):
    """``mod._launch_config(device)`` answers as for a CUDA device (when the launcher has one)."""
    orig = getattr(mod, "_launch_config", None)
    if orig is None:
        yield
        return
    with mock.patch.object(mod, "_launch_config", lambda *a, **k: orig(torch.device("cuda", 0))):
        yield


_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def _extrapolate_loads(c: Dict[str, Any], elems_per_thread: float) -> int:
    """LDGs of one extrapolation loop body: theta0 and the params, and g0 and g1 with gradients; 16-byte vectors
    when ALIGN > 1, else one load per element. (Full chunks run an unmasked copy of the body, every chunk but each
    tensor's last: that copy is the hot loop.)"""
    names = ["P_DT", "T0_DT"] + (["G0_DT", "G1_DT"] if c["HAS_GRAD"] else [])
    nbytes = [_BYTES[str(c[n])] for n in names]   # (Triton dtypes print as "fp32", "bf16", ...)
    return sum(-(-int(elems_per_thread * b) // (16 if c["ALIGN"] > 1 else b)) for b in nbytes)


def extrapolate_scenarios() -> List[Scenario]:
    m = _mod("extrapolate.op")
    out = []
    # a small layout is enough: the kernel's configuration does not depend on the sizes, only on the dtypes, the
    # options and ALIGN (16-byte accesses when every tensor is 16-byte aligned and every numel a multiple of
    # 16 bytes; an odd numel gives ALIGN = 1, the general path)
    shapes = [(1536, 1536), (8960, 1536), (1536,)]
    odd = [(1536, 1536), (8960, 1536), (1535,)]
    for label, pdt, use_grad, inactive, lowp, formula, shp in (
            ("fp32 master + bf16 copy", torch.float32, True, True, True, "horner", shapes),
            ("fp32 plain move", torch.float32, False, False, False, "horner", shapes),
            ("bf16 params", torch.bfloat16, True, False, False, "horner", shapes),
            ("fp32 closed form", torch.float32, True, False, True, "closed", shapes),      # libdevice pow (K = 5)
            ("fp32 master + bf16 copy, odd numel", torch.float32, True, True, True, "horner", odd),   # ALIGN = 1
            ("fp64 params", torch.float64, True, True, False, "horner", shapes)):
        ps = [_e(*s, dtype=pdt) for s in shp]
        t0 = [_e(*s) for s in shp]
        g = [_e(*s, dtype=pdt) for s in shp] if use_grad else None
        lp = [_e(*s, dtype=torch.bfloat16) for s in shp] if lowp else None
        thr = _e(len(shp)) if inactive else None

        def call(ps=ps, t0=t0, g=g, lp=lp, thr=thr, formula=formula):
            # the launcher picks its GPU configuration for a CUDA device; the tensors here live on "meta"
            with _cuda_launch_config(m):
                m._extrapolate_triton(ps, t0, g, g, lp, thr, alpha=0.5, K=5, clip_coef0=1.0, clip_coef1=1.0,
                                      scale_formula=formula, delta=1e-8, r_min=-2.0, r_max=3.0)
        out.append(Scenario("extrapolate_", label, {"numel": sum(int(torch.Size(s).numel()) for s in shp)},
                            call, lambda c: c["BLOCK"], loads_per_iter=_extrapolate_loads,
                            # the budget is for the default configuration: Horner's scale, aligned fp32 / bf16
                            budget=formula == "horner" and shp is shapes and pdt != torch.float64))
    return out


def all_scenarios() -> List[Scenario]:
    return (token_logprobs_scenarios() + fpa_scenarios() + linear_head_scenarios() + linear_fpa_scenarios()
            + extrapolate_scenarios())


def _is_jit(dec: ast.expr) -> bool:
    """``@triton.jit`` / ``@triton.jit(...)`` (also ``@jit`` imported from triton)."""
    f = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(f, ast.Attribute) and f.attr == "jit") or (isinstance(f, ast.Name) and f.id == "jit")


def library_kernels(root=None) -> Set[Tuple[str, str]]:
    """(module, name) of every Triton kernel in the library's source: the ``@triton.jit`` functions that no
    ``@triton.jit`` function calls (those are device helpers, compiled into their callers). Read from the source,
    so a kernel counts even if nothing launches it yet."""
    root = pathlib.Path(root or pathlib.Path(importlib.import_module("gxpo_kernels").__file__).parent)
    jits, called = [], set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        mod = ".".join(("gxpo_kernels",) + path.relative_to(root).with_suffix("").parts)
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any(map(_is_jit, fn.decorator_list)):
                jits.append((mod, fn.name))
                called |= {c.func.id if isinstance(c.func, ast.Name) else c.func.attr for c in ast.walk(fn)
                           if isinstance(c, ast.Call) and isinstance(c.func, (ast.Name, ast.Attribute))}
    return {(mod, name) for mod, name in jits if name not in called}
