"""The built wheel, installed into a fresh virtual environment outside the checkout, with the core dependencies
only (torch, triton, numpy, ninja): the core imports without the [train] extra, and extrapolate_ on CPU tensors
runs the C++ op built from the source shipped inside the wheel."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHECK = """
import importlib.util, pathlib, sys
import torch
import gxpo_kernels, gxpo_kernels.ops, gxpo_kernels.update, gxpo_kernels.advantages
assert "site-packages" in gxpo_kernels.__file__, gxpo_kernels.__file__
for extra in ("transformers", "matplotlib", "tqdm", "deepspeed", "trl"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is installed in the core-only environment"
from gxpo_kernels.ops import extrapolate_
from gxpo_kernels.ops.extrapolate import _cpp
from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_
assert pathlib.Path(_cpp._source()).is_relative_to(pathlib.Path(gxpo_kernels.__file__).parent), _cpp._source()
p, t0, g0, g1 = ([torch.full((129,), float(i + 1))] for i in range(4))
q = [x.clone() for x in p]
extrapolate_(p, t0, g0, g1, alpha=0.5, K=5)           # backend "auto" on CPU -> the C++ op
extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5)
assert _cpp._MODULE is not None and not _cpp._FAILED, "C++ op not used"
assert torch.equal(p[0], q[0])
import json
from gxpo_kernels.examples import CONFIGS, config_path
assert all(json.loads(config_path(c).read_text()) for c in CONFIGS)   # shipped configs
print("WHEEL-OK")
"""


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_core_with_cpp_op(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(ROOT)], env=env, timeout=600)
    wheel = next(dist.glob("gxpo_kernels-*.whl"))
    try:
        _run([sys.executable, "-m", "venv", str(venv)], env=env, timeout=300)
        py = str(venv / "bin" / "python")
        torch_pin = "torch==" + __import__("torch").__version__.split("+")[0]
        _run([py, "-m", "pip", "install", "-q", torch_pin, str(wheel)], env=env, timeout=1200)
        r = _run([py, "-c", CHECK], env=env, cwd=work, timeout=900)
        assert "WHEEL-OK" in r.stdout
    finally:
        # the venv holds a torch install (~1 GB); pytest keeps the last runs' temporary folders, so drop it now
        shutil.rmtree(venv, ignore_errors=True)
