"""Write docs/cli.md, the command-line reference, from the parser.

    python docs/build_cli_doc.py            # rewrite docs/cli.md
    python docs/build_cli_doc.py --check    # exit 1 if docs/cli.md differs from what the parser gives
"""
import argparse
import pathlib
import sys

from gxpo_kernels.cli import markdown_reference

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--check", action="store_true", help="only check that docs/cli.md is up to date")
args = ap.parse_args()
path = pathlib.Path(__file__).resolve().parent / "cli.md"
text = markdown_reference()
if args.check:
    ok = path.read_text() == text
    print(f"{path}: {'up to date' if ok else 'stale: run python docs/build_cli_doc.py'}")
    sys.exit(0 if ok else 1)
path.write_text(text)
print(f"wrote {path}")
