"""Test-suite set-up: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` runs (at import), so it is set here before the package is
imported. Caches point into the workspace so CI's clean clone never writes outside it.
"""
import os
import pathlib

_root = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's shared-memory all-reduce (inference only) is ~65 s of C++ compiling on a clean clone; gloo does training's
os.environ.setdefault("GXPO_DEEPSPEED_SHM", "0")
for _var, _sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TRITON_CACHE_DIR", "triton"),
                   ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("HF_HOME", "hf")):
    os.environ.setdefault(_var, str(_root / ".cache" / _sub))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
