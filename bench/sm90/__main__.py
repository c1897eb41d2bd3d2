"""``python -m bench.sm90 [--json out.json] [--ops OP ...] [--jobs N] [--sass-dir DIR]``: compile every Triton
kernel for sm_90 at the launchers' configurations; exit 1 on a compile error, a spill or a blown budget."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"   # the kernels must be real JIT functions, not interpreter stubs

import argparse  # noqa: E402
import json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sm90", description=" ".join(__doc__.split()))
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--ops", nargs="*", help="only these ops (e.g. token_logprobs_fwd linear_head_bwd)")
    ap.add_argument("--cases", nargs="*", help="only scenarios whose case label contains all of these")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    ap.add_argument("--sass-dir", help="also write each kernel's SASS here")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    from . import FilterError, run, summary_lines
    try:
        doc = run(args.ops, args.jobs, args.sass_dir, args.cases)
    except FilterError as e:   # filters that match nothing: exit 2 with the reason, not a pass over nothing
        ap.error(str(e))
    print("\n".join(summary_lines(doc)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
