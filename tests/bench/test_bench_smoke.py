"""The benchmark suite as a correctness smoke test: every bench file that honours ``BENCH_SMOKE=1`` (tiny
sizes) runs once per benchmark with ``--benchmark-disable`` in one subprocess, and must pass (each bench checks
its outputs against the reference before timing). Files that do not honour the switch yet are listed in
PENDING_SMOKE (their full-size CPU run takes minutes); they join automatically once they read BENCH_SMOKE."""
import os
import pathlib
import re
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def honours_smoke(path: pathlib.Path) -> bool:
    src = path.read_text()
    return "BENCH_SMOKE" in src or re.search(r"from \._common import [^\n]*\bSMOKE\b", src) is not None


SMOKE_FILES = [f for f in FILES if honours_smoke(ROOT / "bench" / f)]


# files whose owners were asked to read BENCH_SMOKE (tiny sizes); until then the smoke run leaves them out
PENDING_SMOKE = set()


def test_every_bench_file_honours_smoke_or_is_pending():
    """A new bench file must read BENCH_SMOKE; the pending list only shrinks."""
    missing = [f for f in FILES if f not in SMOKE_FILES and f not in PENDING_SMOKE]
    assert not missing, f"bench files that ignore BENCH_SMOKE=1: {missing}"
    assert set(FILES) >= PENDING_SMOKE - set(SMOKE_FILES)


def test_bench_suite_smoke():
    assert "bench_fpa.py" in SMOKE_FILES and "bench_update_throughput.py" in SMOKE_FILES
    assert "bench_linear_grpo_loss.py" in SMOKE_FILES and "bench_linear_fpa.py" in SMOKE_FILES
    env = dict(os.environ, BENCH_SMOKE="1", TRITON_INTERPRET="0", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pytest", *[f"bench/{f}" for f in SMOKE_FILES], "--benchmark-disable", "-q", "-x",
           "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 7, out[-2000:]      # 4 fpa cases + 3 update rules at least
    assert " failed" not in out


def test_bookkeeping_pieces_smoke(tmp_path):
    """``bench_update_throughput --pieces`` at the smoke size: every piece is there and not negative, the shipped
    rule's snapshot goes through the C++ copy and the ``copy_`` variant's does not."""
    import json
    from gxpo_kernels.ops.extrapolate import _cpp
    if _cpp.load_extension() is None:
        import pytest
        pytest.skip("the C++ extension cannot be built here")
    env = dict(os.environ, BENCH_SMOKE="1", TRITON_INTERPRET="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = tmp_path / "pieces.json"
    p = subprocess.run([sys.executable, "-m", "bench.bench_update_throughput", str(out), "--pieces"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    doc = json.loads(out.read_text())
    (name, d), = doc["sizes"].items()
    assert name == "tiny" and d["n_params"] > 0
    g, c = d["gxpo"], d["gxpo_copy"]
    for k in ("step_ms", "snapshot_py_ms", "extrap_cpp_ms", "extrap_py_ms", "rest_ms", "grpo_rest_ms"):
        assert g[k] >= 0 and c[k] >= 0, k
    assert g["snapshot_cpp_ms"] > 0 and c["snapshot_cpp_ms"] == 0 and g["extrap_cpp_ms"] > 0


def test_grpo_loss_bench_inplace_provider_takes_the_inplace_backward():
    """bench_grpo_loss's "gxpo_inplace" (a GPU-only provider) passed a view of its leaf buffer, for which the op
    ignores inplace_backward: it timed the ordinary backward under the in-place name. Its backward must write
    dlogits into the buffer, with the same gradient as "gxpo"."""
    import torch

    from bench import bench_grpo_loss as G
    from gxpo_kernels import _utils
    if not _utils.triton_interpret():
        import pytest
        pytest.skip("needs the Triton interpreter (the in-place backward is a Triton path)")
    B, T, V = 2, 8, 64
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(B, T + 1, V, generator=g)
    args = (torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.1,
            -torch.rand(B, T, generator=g))
    grads = {}
    for provider in ("gxpo", "gxpo_inplace"):
        x = buf.clone().requires_grad_()
        G._loss_fn(provider)(x, *args)[0].backward()
        assert torch.equal(x.detach(), buf) == (provider == "gxpo"), provider   # in place: the logits are gone
        grads[provider] = x.grad
    torch.testing.assert_close(grads["gxpo_inplace"], grads["gxpo"], rtol=1e-6, atol=1e-7)


def test_gxpo_step_overhead_rounds_wait_for_the_device(monkeypatch):
    """The rounds that pytest-benchmark times (the figure the driver reports for ``gxpo_step_overhead``) end with
    a device sync: on CUDA an unsynchronised round stops the clock with the step's last kernels still queued."""
    import bench.bench_extrapolate as bx
    events = []
    monkeypatch.setattr(bx, "SMOKE", True)
    monkeypatch.setattr(bx, "_sync", lambda: events.append("sync"))

    class Bench:
        extra_info = {}

        def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
            for _ in range(rounds):
                events.append("start")
                fn()
                events.append("stop")

    bx.test_gxpo_step_overhead(Bench())
    timed = events[events.index("start"):]
    assert timed.count("start") == 3
    assert all(timed[i - 1] == "sync" for i, e in enumerate(timed) if e == "stop"), timed


def test_linear_fpa_gpu_case_survives_an_eager_reference_that_does_not_fit(monkeypatch):
    """``bench_linear_fpa``'s GPU case checks every provider against eager first. At the target size eager's fp32
    N x V tensors may not fit in GPU memory: that must skip eager only, and the fused provider is still timed
    (run on CPU tensors here, with the CUDA calls stubbed and eager made to run out of memory)."""
    import pytest
    import torch

    import bench.bench_linear_fpa as bl
    monkeypatch.setattr(bl, "GPU_CFG", dict(B=2, T=16, H=40, H_ref=24, V=501, dtype="float32"))
    real_make_step = bl.make_step

    def make_step(provider, inputs):
        step = real_make_step(provider, inputs)
        if provider != "eager":
            return step

        def oom():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        oom.out = None
        return oom
    monkeypatch.setattr(bl, "make_step", make_step)
    monkeypatch.setattr(bl, "cuda_step_peak_mib", lambda step: (step(), 0.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "stub")
    timed = []

    class Bench:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
            timed.append(rounds)
            fn()

    inputs = bl.make_inputs(bl.GPU_CFG, "cpu")
    bl._EAGER_GRAD.clear()
    with pytest.raises(pytest.skip.Exception):
        bl.test_gpu_fwd_bwd(Bench(), "eager", inputs)
    bench = Bench()
    bl.test_gpu_fwd_bwd(bench, "fused", inputs)
    assert timed == [5] and bench.extra_info["provider"] == "fused"
    assert bench.extra_info["dhidden_rel_err"] != bench.extra_info["dhidden_rel_err"]   # NaN: not checked here


def test_liger_providers_get_the_same_mask_tensor(monkeypatch):
    """Liger is timed on the inputs the other providers get, with no extra copy inside the timed step: both Liger
    providers converted the bool mask with ``mask.float()`` on every call (a copy, and an input the others do
    not get). Liger reads a bool mask as it reads a float one (same loss and gradients, bitwise)."""
    import pytest
    import torch
    pytest.importorskip("liger_kernel.chunked_loss")
    import liger_kernel.chunked_loss as lc
    import liger_kernel.transformers.grpo_loss as lg
    sys.path.insert(0, str(ROOT))
    from bench import bench_grpo_loss as G
    from bench import bench_linear_grpo_loss as L
    seen = []

    def fake_triton_grpo_loss(logits, old, ref, tok, adv, completion_mask, **kw):
        seen.append(completion_mask)
        return (logits.sum(),)

    class FakeLinear:
        def __init__(self, **kw):
            pass

        def __call__(self, hidden, weight, tokens, attention_mask, adv, **kw):
            seen.append(attention_mask)
            return ((hidden.sum() + weight.sum()),)

    monkeypatch.setattr(lg, "triton_grpo_loss", fake_triton_grpo_loss)
    monkeypatch.setattr(lc, "LigerFusedLinearGRPOLoss", FakeLinear)
    mask = torch.tensor([[True, False, True]])
    G._loss_fn("liger")(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), mask,
                        torch.zeros(1, 3))
    inputs = L.make_inputs(dict(B=1, T=3, H=4, V=5, dtype="float32"), "cpu")
    L.make_step("liger", inputs)()
    assert seen[0] is mask and seen[1] is inputs[5], [type(m) for m in seen]
    pytest.importorskip("trl")
    from bench import bench_trl_heads as TH
    inputs = TH.make_inputs(dict(B=2, T=4, H=4, V=5))
    TH.make_step("liger", inputs)()
    assert seen[2] is inputs[3], type(seen[2])
