"""bench_fpa's ``ref_compile`` provider: every (shape, grad mode) it meets gets a compiled graph."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import bench_fpa as bf  # noqa: E402


def test_ref_compile_never_falls_back_to_eager(monkeypatch):
    """On CUDA the provider meets 10 (shape, grad mode) pairs; past dynamo's default limit of 8 the compiled
    function ran eagerly, so its last figures were eager timings labelled ref_compile. (The eager backend stands
    in for inductor: the limit is dynamo's, whatever compiles the graph.)"""
    import torch._dynamo
    import torch._dynamo.config as dcfg
    from torch._dynamo.utils import counters
    # dynamo's own snapshot, restored after the test (monkeypatch's undo of an aliased config name such as
    # cache_size_limit deleted recompile_limit for every later test in the process)
    saved = dcfg.get_config_copy()
    real = torch.compile
    monkeypatch.setattr(bf.torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    monkeypatch.setattr(bf, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    try:
        fn = bf._fn("ref_compile")
        for n in range(1, 11):                   # 10 distinct shapes: one graph each
            x, r = torch.randn(n, 7), torch.randn(n, 7)
            fn(x, r, torch.zeros(n, dtype=torch.long), None)
        assert counters["frames"]["ok"] == 10, dict(counters["frames"])
    finally:
        dcfg.load_config(saved)
        torch._dynamo.reset()
