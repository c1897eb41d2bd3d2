"""Write docs/cli.md, the command-line reference, from the parser. Run: python docs/build_cli_doc.py"""
import pathlib

from gxpo_kernels.cli import markdown_reference

path = pathlib.Path(__file__).resolve().parent / "cli.md"
path.write_text(markdown_reference())
print(f"wrote {path}")
