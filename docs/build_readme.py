"""Assemble README.md from docs/readme/*.md fragments (sorted by name). Run: python docs/build_readme.py"""
import pathlib

root = pathlib.Path(__file__).resolve().parents[1]
parts = [p.read_text().strip() for p in sorted((root / "docs" / "readme").glob("*.md"))]
(root / "README.md").write_text("\n\n".join(parts) + "\n")
print(f"README.md: {len(parts)} sections")
