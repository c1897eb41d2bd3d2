"""Sweep the (BLOCK_V, num_warps) launch configuration of the streaming kernels by static SASS size:
``python -m bench.sm90.sweep [--ops token_logprobs_fwd ...] [--blocks 1024 2048 4096 8192] [--warps 4 8 16]
[--json OUT]`` (committed: ``bench/results/sm90-sweep-<triton>.json``, rendered in bench/SM90.md).

For each configuration the launcher's ``_launch_config`` is replaced, the op's scenarios are compiled for sm_90
and the hot loop's SASS instructions per element, registers and spills are printed (predictions, no GPU).
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from unittest import mock  # noqa: E402

# op -> module whose _launch_config picks (BLOCK_V, num_warps)
LAUNCHERS = {"token_logprobs_fwd": "logprobs.kernel", "token_logprobs_bwd": "logprobs.kernel",
             "fpa_logprobs_fwd": "fpa.kernel"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sm90.sweep")
    ap.add_argument("--ops", nargs="*", default=["token_logprobs_fwd", "token_logprobs_bwd"])
    ap.add_argument("--blocks", nargs="*", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--warps", nargs="*", type=int, default=[4, 8, 16])
    ap.add_argument("--cases", nargs="*", default=["bf16", "mask=False", "entropy=True"],
                    help="scenario label filter (default: the bf16, unmasked, entropy case)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.ops) - set(LAUNCHERS))
    if unknown:
        ap.error(f"unknown op(s) {unknown}: the sweep knows {sorted(LAUNCHERS)}")
    import triton

    from . import _git_commit, run
    rows = []
    print(f"{'op':<22} {'BLOCK_V':>7} {'warps':>5} {'elem/thr':>8} {'instr/elem':>10} {'regs':>4} {'local':>5}  case")
    for op in args.ops:
        mod = importlib.import_module(f"gxpo_kernels.ops.{LAUNCHERS[op]}")
        for bv in args.blocks:
            for nw in args.warps:
                if bv < 32 * nw:
                    continue
                with mock.patch.object(mod, "_launch_config", lambda *a, bv=bv, nw=nw, **k: (bv, nw)):
                    doc = run([op], args.jobs, cases=args.cases)
                for k in doc["kernels"]:
                    hl = k.get("hot_loop") or {}
                    rows.append(dict(op=op, block_v=bv, num_warps=nw, elems_per_thread=hl.get("elems_per_thread"),
                                     instr_per_elem=hl.get("instr_per_elem"), registers=k.get("registers"),
                                     local_bytes=k.get("local_bytes"), case=k["cases"][0], error=k.get("error")))
                    print(f"{op:<22} {bv:>7} {nw:>5} {hl.get('elems_per_thread', 0):>8.0f} "
                          f"{hl.get('instr_per_elem', float('nan')):>10} {k.get('registers', '-'):>4} "
                          f"{k.get('local_bytes', '-'):>5}  {k['cases'][0][:60]}", flush=True)
    if args.json:
        doc = {"kind": "prediction: static sm_90 compile figures (no GPU run)", "triton": triton.__version__,
               "git_commit": _git_commit(), "python": platform.python_version(), "cases": args.cases,
               "command": "python -m bench.sm90.sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
