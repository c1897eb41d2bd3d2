"""Assemble README.md from docs/readme/*.md fragments (sorted by name). Run: python docs/build_readme.py

The speedup table between the ``speedup:begin``/``speedup:end`` markers is regenerated from the committed
default run (docs/results/speedup-default-results.json), so README numbers are never typed by hand.
"""
import json
import pathlib
import re

from gxpo_kernels.trainer.report import markdown_table

root = pathlib.Path(__file__).resolve().parents[1]
parts = [p.read_text().strip() for p in sorted((root / "docs" / "readme").glob("*.md"))]
text = "\n\n".join(parts) + "\n"
results = json.loads((root / "docs" / "results" / "speedup-default-results.json").read_text())
text, n = re.subn(r"^<!-- speedup:begin -->$.*?^<!-- speedup:end -->$",
                  lambda _: "<!-- speedup:begin -->\n" + markdown_table(results) + "\n<!-- speedup:end -->",
                  text, flags=re.M | re.S)
(root / "README.md").write_text(text)
print(f"README.md: {len(parts)} sections, {n} generated speedup table(s)")
