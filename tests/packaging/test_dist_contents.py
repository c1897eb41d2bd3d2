"""What the wheel and the sdist hold, built from the tracked files of this checkout (as a clean clone has them)
by setuptools' own build backend, without a virtual environment: every file of the package (the .py modules,
the C++ source, the JSON configs, the warm-start safetensors), the license, and nothing else (no tests, bench,
docs); and the build raises no deprecation warning (setuptools turns its deprecations into errors on a date)."""
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the [test] extra brings tomli
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = "gxpo_kernels"

BUILD = """
import sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
out = sys.argv[1]
print(build_meta.build_wheel(out)); print(build_meta.build_sdist(out))
"""


def _tracked():
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def test_license_is_spdx_and_its_files_exist():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str), "project.license must be an SPDX expression (PEP 639)"
    assert project.get("license-files"), "the license text must ship with the wheel and the sdist"
    for pattern in project["license-files"]:
        assert list(ROOT.glob(pattern)), f"license-files entry {pattern!r} matches no file"


def test_wheel_and_sdist_hold_the_package_and_license_only(tmp_path):
    src, out = tmp_path / "src", tmp_path / "dist"
    tracked = _tracked()
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert "deprecat" not in log.lower(), [ln for ln in log.splitlines() if "eprecat" in ln]
    package = {p for p in tracked if p.startswith(PKG + "/")}
    assert any(p.endswith(".cpp") for p in package) and any(p.endswith(".safetensors") for p in package)

    wheel = zipfile.ZipFile(next(out.glob("*.whl"))).namelist()
    dist_info = [n for n in wheel if ".dist-info/" in n]
    assert set(wheel) - set(dist_info) == package, (
        f"missing: {sorted(package - set(wheel))}; extra: {sorted(set(wheel) - set(dist_info) - package)}")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in dist_info), dist_info
    assert any(n.endswith(".dist-info/entry_points.txt") for n in dist_info)

    with tarfile.open(next(out.glob("*.tar.gz"))) as t:
        sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert package <= sdist, f"sdist lacks {sorted(package - sdist)}"
    assert {"LICENSE", "README.md", "pyproject.toml"} <= sdist
