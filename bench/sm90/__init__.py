"""sm_90 ahead-of-time compile check of every Triton kernel (no GPU needed): ``python -m bench.sm90``.

Drives each host launcher at the target sizes with ``meta`` tensors while intercepting the launches
(``scenarios.py``), compiles each distinct launch for sm_90 with the installed Triton (``compile.py``), and
reports per kernel: registers, shared memory, local memory / spill instructions, wgmma shapes, atomics, and the
static SASS size of the hot loop (instructions per element and thread for the streaming kernels). It fails on a
compile error, a register spill, a hot loop above its budget (or a budgeted kernel whose hot loop it cannot find),
or, on a whole run, a library kernel (``@triton.jit`` function not called by another) that no scenario
launches. Method and figures: ``bench/SM90.md``.
These figures are static predictions from the compiler, not measurements on a GPU.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
import traceback
from typing import Any, Dict, List, Optional

# hot-loop budgets (SASS instructions per element and thread, sm_90); a kernel above its budget fails the check.
# The streaming kernels must stay well under the ~17 instructions per element that an H100 can issue per bf16
# element at copy bandwidth (see bench/SM90.md); the FPA forward reads two tensors per element position.
# The extrapolation moves 12 bytes per element with bf16 params and gradients, six bf16 elements' worth (about 106
# instructions at an H100's copy bandwidth, 75 at an H200's; 22 bytes with fp32 master weights and a bf16 copy). Its
# budget applies to the unmasked loop, which runs every chunk but each tensor's last.
BUDGETS = {"_token_logprobs_fwd_kernel": 12.0, "_token_logprobs_bwd_kernel": 12.0,
           "_fpa_logprobs_fwd_kernel": 26.0, "_extrapolate_kernel": 72.0}


def _hot_loop(res: Dict[str, Any], elems_per_thread: Optional[float],
              loads_per_iter: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The hot loop's counts; per element when ``elems_per_thread`` is known (``loads_per_iter``: the LDGs of one
    loop body, for a kernel with a masked and an unmasked copy of it, see ``scenarios.Scenario``)."""
    inner = [lp for lp in res["loops"] if lp.innermost]
    if not inner:
        return None
    if loads_per_iter and elems_per_thread:
        # a masked and an unmasked copy of one body: the cheapest per element is the one that runs for the bulk
        # of the data; a loop with k times the body's loads was unrolled k times by the compiler
        body = [(lp, max(1, lp.counts["LDG"] // loads_per_iter)) for lp in inner if lp.counts["LDG"]]
        hot, unroll = min(body, key=lambda b: b[0].n_instr / b[1])
        out = {"n_instr": hot.n_instr, "start": hot.start, **hot.counts, "unroll": unroll,
               "other_loops_instr_per_elem": sorted(round(lp.n_instr / (k * elems_per_thread), 2)
                                                    for lp, k in body if lp is not hot)}
        out["elems_per_thread"] = elems_per_thread * unroll
        out["instr_per_elem"] = round(hot.n_instr / out["elems_per_thread"], 2)
        return out
    # the hot loop: an innermost loop that reads (loads / MMAs) and moves the most data, then the largest
    hot = max(inner, key=lambda lp: (lp.counts["LDG"] + lp.counts["MMA"] + lp.counts["LDGSTS_TMA"] > 0,
                                     lp.counts["LDG"] + lp.counts["STG"] + lp.counts["RED_ATOM"] + lp.counts["MMA"]
                                     + lp.counts["LDGSTS_TMA"], lp.n_instr))
    out = {"n_instr": hot.n_instr, "start": hot.start, **hot.counts}
    if elems_per_thread:
        out["elems_per_thread"] = elems_per_thread
        out["instr_per_elem"] = round(hot.n_instr / elems_per_thread, 2)
    return out


_JOBS: List[Any] = []   # (launch, scenario) per distinct compile; read by forked workers


class FilterError(ValueError):
    """``--ops`` / ``--cases`` that name no scenario: the check would compile nothing and pass."""


def _work(i: int) -> Dict[str, Any]:
    from .compile import compile_launch
    launch, sc = _JOBS[i]
    try:
        res = compile_launch(launch)
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        return {"error": f"{type(e).__name__}: {e}"[:4000], "trace": traceback.format_exc()[-4000:]}
    res["loops"] = [dict(start=lp.start, n_instr=lp.n_instr, innermost=lp.innermost, **lp.counts)
                    for lp in res["loops"]]
    return res


def collect(ops: Optional[List[str]] = None, cases: Optional[List[str]] = None):
    """[(launch, scenario, [cases])] of the distinct compile requests of all scenarios; optionally only some ops,
    and only the scenarios whose case label contains every string of ``cases``. Raises FilterError on an op no
    scenario has, or on filters that leave nothing to compile (the check would pass having checked nothing)."""
    from . import scenarios as S
    from .compile import record_launches, request_key
    seen: Dict[str, list] = {}
    order = []
    scenarios = S.all_scenarios()
    unknown = sorted(set(ops or ()) - {sc.op for sc in scenarios})
    if unknown:   # a misspelt op would otherwise compile nothing and pass
        raise FilterError(f"unknown op(s) {unknown}: the scenarios' ops are {sorted({sc.op for sc in scenarios})}")
    with S.as_sm90():
        for sc in scenarios:
            if ops and sc.op not in ops:
                continue
            if cases and not all(c in sc.case for c in cases):
                continue
            with record_launches() as rec:
                try:
                    sc.call()
                except Exception as e:   # host epilogues on meta tensors may fail after the launch: fine
                    if not rec:
                        raise RuntimeError(f"{sc.op} [{sc.case}]: no launch recorded ({e})") from e
            if not rec:
                raise RuntimeError(f"{sc.op} [{sc.case}]: no launch recorded")
            for ln in rec:
                key = request_key(ln)
                if key not in seen:
                    seen[key] = [ln, sc, []]
                    order.append(key)
                seen[key][2].append(f"{sc.op} [{sc.case}] {sc.sizes}")
    if not order:
        raise FilterError(f"no scenario matches ops={ops} cases={cases}: nothing would be compiled")
    return [seen[k] for k in order]


def uncovered_kernels(items, root=None) -> List[str]:
    """A failure per library kernel (``scenarios.library_kernels``) that none of ``collect()``'s launches is."""
    from .scenarios import library_kernels
    launched = {(ln.fn.fn.__module__, ln.name) for ln, _, _ in items}
    return [f"{name} ({mod}): launched by no scenario, so never compiled; add a Scenario in bench/sm90/scenarios.py"
            for mod, name in sorted(library_kernels(root) - launched)]


def run(ops: Optional[List[str]] = None, jobs: Optional[int] = None, sass_dir: Optional[str] = None,
        cases: Optional[List[str]] = None):
    import triton
    t0 = time.time()
    items = collect(ops, cases)
    _JOBS[:] = [(ln, sc) for ln, sc, _ in items]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_work, range(len(items)), chunksize=1)
    else:
        results = [_work(i) for i in range(len(items))]
    kernels, failures = [], []
    for (ln, sc, cases), res in zip(items, results):
        rec: Dict[str, Any] = {"kernel": ln.name, "op": sc.op, "cases": cases}
        if "error" in res:
            rec["error"] = res["error"]
            failures.append(f"{ln.name} ({cases[0]}): compile error: {res['error'][:300]}")
            kernels.append(rec)
            continue
        c = res["constexprs"]
        ept = None
        if sc.elems_per_iter is not None:
            ept = sc.elems_per_iter(c) / (32 * res["num_warps"])
        sass = res.pop("sass")
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            tag = f"{len(kernels):03d}-{ln.name}"
            with open(os.path.join(sass_dir, tag + ".sass"), "w") as f:
                f.write(sass)
        rec.update({k: res[k] for k in ("constexprs", "num_warps", "num_stages", "registers", "shared_bytes",
                                        "static_shared_bytes", "local_bytes", "stack_bytes", "spill_instructions",
                                        "n_instructions", "mma", "atomics", "barriers", "compile_cpu_s")})
        loads = sc.loads_per_iter(c, ept) if sc.loads_per_iter and ept else None
        rec["hot_loop"] = _hot_loop(res_obj(res), ept, loads)
        rec["loops"] = res["loops"]
        rec["signature"] = res["signature"]
        if res["local_bytes"] or res["spill_instructions"]:
            failures.append(f"{ln.name} ({cases[0]}): register spill: {res['local_bytes']} bytes local memory, "
                            f"{res['spill_instructions']} LDL/STL, {res['registers']} registers")
        budget = BUDGETS.get(ln.name) if sc.budget else None
        hl = rec["hot_loop"]
        if budget and (not hl or "instr_per_elem" not in hl):
            failures.append(f"{ln.name} ({cases[0]}): has a budget but no hot loop measured per element")
        elif budget and hl["instr_per_elem"] > budget:
            failures.append(f"{ln.name} ({cases[0]}): hot loop {hl['instr_per_elem']} SASS instr/element > "
                            f"budget {budget}")
        kernels.append(rec)
    if not ops and not cases:   # a whole run must compile every kernel of the library
        failures += uncovered_kernels(items)
    return {"kind": "prediction: static sm_90 compile figures (no GPU run)", "target": "cuda sm_90 (sm_90a)",
            "triton": triton.__version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "n_compiles": len(items), "wall_s": round(time.time() - t0, 1), "jobs": jobs,
            "failures": failures, "kernels": kernels}


def _git_commit() -> Optional[str]:
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class _L:
    def __init__(self, d):
        self.__dict__.update(d)


def res_obj(res):
    """Loops as attribute objects again (after the trip through the worker pool)."""
    r = dict(res)
    r["loops"] = [_L({**lp, "counts": {k: v for k, v in lp.items() if k not in ("start", "n_instr", "innermost")}})
                  for lp in res["loops"]]
    return r


def summary_lines(doc: Dict[str, Any]) -> List[str]:
    lines = [f"triton {doc['triton']}, {doc['target']}: {doc['n_compiles']} compiles in {doc['wall_s']} s"]
    for k in doc["kernels"]:
        if "error" in k:
            lines.append(f"  {k['kernel']:<28} ERROR {k['error'][:120]}")
            continue
        hl = k["hot_loop"] or {}
        c = {n: v for n, v in k["constexprs"].items() if n.startswith(("BLOCK", "HAS", "NEED", "UPCAST", "PREC",
                                                                        "COMPUTE", "CHUNK"))}
        per = f"{hl['instr_per_elem']:>6}/elem" if "instr_per_elem" in hl else " " * 11
        dt = next((v[1:] for v in k["signature"].values() if v.startswith("*") and "fp" in v or "bf" in v), "?")
        lines.append(f"  {k['kernel']:<28} {dt:<4} w{k['num_warps']} regs {k['registers']:>3} smem {k['shared_bytes']:>6} "
                     f"local {k['local_bytes']:>4} loop {hl.get('n_instr', '-'):>5} {per} "
                     f"mma {','.join(m.split('.', 1)[1] if '.' in m else m for m in k['mma'])[:40]} "
                     f"{','.join(k['atomics'])} {c}")
    for f in doc["failures"]:
        lines.append(f"FAIL {f}")
    return lines
