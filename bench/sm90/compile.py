"""Ahead-of-time sm_90 compilation of recorded kernel launches, and what the binary says about them.

``record_launches(fn)`` runs host code with every ``JITFunction`` launch intercepted (nothing executes); each
launch becomes a ``Launch`` (kernel, positional args, keyword args incl. constexprs and num_warps).
``compile_launch`` turns one into the exact compile request a real launch on an sm_90 device would make
(Triton's own binder computes the signature and the 16-byte divisibility specialisations from the arguments),
compiles it for ``GPUTarget("cuda", 90, 32)`` and reads the cubin with the ``cuobjdump`` / ``nvdisasm`` that ship
in the Triton wheel: registers, shared memory, local memory (spills), and the SASS of each loop.
Works with Triton 3.6 and 3.9 (same binder / ``_pack_args`` / ``ASTSource`` API).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import triton
from triton.runtime.jit import JITFunction

ARCH = 90
WARP = 32


@dataclass
class Launch:
    fn: Any                      # the JITFunction
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.fn.__name__ if hasattr(self.fn, "__name__") else self.fn.fn.__name__


@contextlib.contextmanager
def record_launches():
    """Intercept ``kernel[grid](...)`` for every Triton JIT kernel; yields the list the launches go into."""
    rec: List[Launch] = []
    orig = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        rec.append(Launch(self, args, dict(kwargs)))

    JITFunction.run = fake_run
    try:
        yield rec
    finally:
        JITFunction.run = orig


def _tool(name: str) -> str:
    """A CUDA binary tool shipped with Triton (falls back to PATH)."""
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return d if os.path.isfile(d) else name


def _target_and_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    target = GPUTarget("cuda", ARCH, WARP)
    return target, make_backend(target)


def compile_request(launch: Launch):
    """(ASTSource, options dict) exactly as ``JITFunction.run`` would build them on an sm_90 device."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    target, backend = _target_and_backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target


def request_key(launch: Launch) -> str:
    src, options, _ = compile_request(launch)
    keep = {k: options[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in options}
    return f"{src.hash()}-{sorted(keep.items())}"


# ------------------------------------------------------------------------------------------------ SASS
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    start: int          # index of the first instruction of the loop body
    end: int            # index of the backward branch
    n_instr: int
    innermost: bool = True
    counts: Dict[str, int] = field(default_factory=dict)


def parse_sass(text: str):
    """(instructions [(addr, text)], loops) of one kernel's ``nvdisasm -c`` output. A loop is a backward branch
    to a label; its static size is the instruction count from the label to the branch."""
    instrs: List[Tuple[int, str]] = []
    labels: Dict[str, int] = {}
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for i, (_, ins) in enumerate(instrs):
        m = _BRA.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            s = labels[m.group(1)]
            loops.append(Loop(s, i, i - s + 1))
    for lp in loops:
        lp.innermost = not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)
        lp.counts = op_counts([ins for _, ins in instrs[lp.start:lp.end + 1]])
    return instrs, loops


def _opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins)
    return ins.split()[0] if ins else ""


def op_counts(instrs: List[str]) -> Dict[str, int]:
    """Counts of the instruction classes that matter for these kernels."""
    c = {"MUFU": 0, "SHFL": 0, "BAR": 0, "LDG": 0, "STG": 0, "RED_ATOM": 0, "MMA": 0, "LDL_STL": 0, "MEMBAR": 0,
         "LDGSTS_TMA": 0}
    for ins in instrs:
        op = _opcode(ins)
        base = op.split(".")[0]
        if base == "MUFU":
            c["MUFU"] += 1
        elif base == "SHFL":
            c["SHFL"] += 1
        elif base == "BAR":
            c["BAR"] += 1
        elif base in ("LDG",):
            c["LDG"] += 1
        elif base in ("STG",):
            c["STG"] += 1
        elif base in ("RED", "REDG", "ATOM", "ATOMG"):
            c["RED_ATOM"] += 1
        elif base in ("HGMMA", "HMMA", "WGMMA"):
            c["MMA"] += 1
        elif base in ("LDL", "STL"):
            c["LDL_STL"] += 1
        elif base in ("MEMBAR", "FENCE", "CCTL"):
            c["MEMBAR"] += 1
        elif base in ("LDGSTS", "UTMALDG", "UBLKCP"):
            c["LDGSTS_TMA"] += 1
    return c


def mma_shapes(instrs: List[Tuple[int, str]]) -> List[str]:
    return sorted({_opcode(ins) for _, ins in instrs if _opcode(ins).split(".")[0] in ("HGMMA", "HMMA")})


def atomic_kinds(instrs: List[Tuple[int, str]]) -> List[str]:
    return sorted({_opcode(ins) for _, ins in instrs if _opcode(ins).split(".")[0] in ("RED", "REDG", "ATOM", "ATOMG")})


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def analyse_cubin(cubin: bytes) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    m = _RES.search(res)
    if not m:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{res}")
    regs, stack, shared, local = map(int, m.groups())
    instrs, loops = parse_sass(sass)
    n_spill_instr = sum(1 for _, ins in instrs if _opcode(ins).split(".")[0] in ("LDL", "STL"))
    return {"registers": regs, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local,
            "spill_instructions": n_spill_instr, "n_instructions": len(instrs), "loops": loops,
            "mma": mma_shapes(instrs), "atomics": atomic_kinds(instrs),
            # instruction indices of the BARs, as loop starts are given
            "barriers": [i for i, (_, ins) in enumerate(instrs) if _opcode(ins).split(".")[0] == "BAR"],
            "sass": sass}


def compile_launch(launch: Launch) -> Dict[str, Any]:
    """Compile one launch for sm_90; resource usage, loops and timing (raises on a compile error)."""
    src, options, target = compile_request(launch)
    t0 = time.process_time()
    k = triton.compile(src, target=target, options=options)
    cpu_s = time.process_time() - t0
    out = analyse_cubin(k.asm["cubin"])
    out["shared_bytes"] = int(getattr(k.metadata, "shared", 0) or 0)   # static + dynamic, what a launch asks for
    out["num_warps"] = int(options.get("num_warps", 4))
    out["num_stages"] = int(options.get("num_stages", 0))
    out["compile_cpu_s"] = round(cpu_s, 2)
    out["signature"] = {k: str(v) for k, v in src.signature.items()}
    out["constexprs"] = {launch.fn.arg_names[p[0]]: _plain(v) for p, v in src.constants.items()}
    return out


def _plain(v):
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    return str(v)
