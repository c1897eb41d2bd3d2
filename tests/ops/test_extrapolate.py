"""extrapolate_: Triton (interpreter) and C++ kernels vs the PyTorch reference.

Guards: mixed shapes incl. 0-numel and non-multiples of the block, fp32/bf16/fp64 params, mixed dtypes in one
list, lowp_out (entries may be None), horner vs closed, inactive coordinates, the plain move (g = None), r
clamps / NaN / sgn(0), the scale polynomial against exact rationals, the stats vector, the metadata cache,
non-finite counting, input validation.
"""
import math
from fractions import Fraction

import pytest
import torch

from gxpo_kernels.ops.extrapolate.op import STAT_INDEX, extrapolate_, stats_to_dict
from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_, retention_scale
from tests._utils import assert_close

SHAPES = [(37,), (0,), (5, 301), (1,), (2049,), (3, 0, 2), (7, 9)]
BACKENDS = ["triton", "cpp"]


def _make(dtype, shapes=SHAPES, g1_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=g)  # noqa: E731
    p = [rnd(s).to(dtype) for s in shapes]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    t0 = [(x.to(cdt) + 0.05 * rnd(s).to(cdt)) for x, s in zip(p, shapes)]
    g0 = [rnd(s).to(cdt) for s in shapes]
    g1 = [(0.6 * a + 0.5 * rnd(s).to(cdt)).to(g1_dtype or dtype) for a, s in zip(g0, shapes)]
    for a in g0:  # exact zeros (sgn 0 = +1) and tiny entries (inactive candidates)
        if a.numel() > 20:
            a.view(-1)[:5] = 0.0
            a.view(-1)[5:15] *= 1e-4
    return p, t0, g0, g1


def _clone(xs):
    return [x.clone() for x in xs]


def _check(name, ref_p, out_p, ref_s, out_s, dtype):
    ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float64: 0.0}[dtype]
    for i, (a, b) in enumerate(zip(ref_p, out_p)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            tol = ulp * a.float().abs().clamp(min=1) + 1e-6 * (dtype == torch.float32)
            assert bool(((a.double() - b.double()).abs() <= tol.double()).all()), f"{name}[{i}]"
    rs, os_ = stats_to_dict(ref_s), stats_to_dict(out_s)
    for k in rs:
        assert math.isclose(rs[k], os_[k], rel_tol=2e-5, abs_tol=1e-6), f"{name} stat {k}: {rs[k]} vs {os_[k]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("formula", ["horner", "closed"])
@pytest.mark.parametrize("K,inactive", [(5, None), (4, 1e-2), (3, None), (10, 1e-2)])
def test_kernel_matches_reference(backend, dtype, formula, K, inactive):
    p, t0, g0, g1 = _make(dtype)
    lowp = [torch.empty(s, dtype=torch.bfloat16) if i % 2 == 0 else None for i, s in enumerate(SHAPES)]
    rp, rl = _clone(p), _clone([x if x is not None else torch.empty(0) for x in lowp])
    kw = dict(alpha=0.5, K=K, clip_coef0=0.7, clip_coef1=0.9, scale_formula=formula)
    out = extrapolate_(p, t0, g0, g1, inactive_threshold=inactive, lowp_out=lowp, backend=backend, **kw)
    ref = extrapolate_(rp, t0, g0, g1, inactive_threshold=inactive,
                       lowp_out=[rl[i] if lowp[i] is not None else None for i in range(len(lowp))],
                       backend="torch", **kw)
    _check("params", rp, p, ref, out, dtype)
    _check("lowp", [rl[i] for i in range(len(lowp)) if lowp[i] is not None],
           [x for x in lowp if x is not None], ref, out, torch.bfloat16)
    if inactive is not None:
        assert stats_to_dict(out)["n_inactive"] >= 5 * 3   # the zeroed g0 entries are inactive
    assert stats_to_dict(out)["numel"] == sum(math.prod(s) for s in SHAPES)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_mixed_dtypes_and_plain_move(backend):
    shapes = [(33,), (0,), (1030,), (4, 5)]
    p = [torch.randn(s) for s in shapes]
    p[1], p[2] = p[1].bfloat16(), p[2].bfloat16()
    t0 = [x.float() + 0.1 for x in p]
    low = [None, None, torch.empty(1030, dtype=torch.float16), torch.empty((4, 5), dtype=torch.bfloat16)]
    q = _clone(p)
    st = extrapolate_(p, t0, None, None, alpha=0.8, K=2, lowp_out=low, backend=backend)
    for a, b, t in zip(q, p, t0):   # plain move θ0 + α(θ2 − θ0) computed in fp32
        exp = (t + 0.8 * (a.float() - t)).to(a.dtype)
        assert torch.equal(b, exp) or backend == "triton" and torch.allclose(  # interpreter: bf16 cast truncates
            b.float(), exp.float(), rtol=2 ** -7, atol=1e-3)
    assert torch.allclose(low[2].float(), p[2].float(), rtol=2 ** -7, atol=1e-3)
    d = stats_to_dict(st)
    assert d["sum_scale"] == d["numel"] == 33 + 1030 + 20 and d["max_scale"] == 1.0
    assert math.isclose(d["sq_disp"], sum(float(((a.float() - t) ** 2).sum()) for a, t in zip(q, t0)), rel_tol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_float64_exact(backend):
    p, t0, g0, g1 = _make(torch.float64)
    rp = _clone(p)
    kw = dict(alpha=0.3, K=5, clip_coef0=1.0, clip_coef1=0.5)
    out = extrapolate_(p, t0, g0, g1, backend=backend, **kw)
    ref = extrapolate_ref_(rp, t0, g0, g1, **kw)
    for a, b in zip(rp, p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_ratio_clamps_nan_and_sign(backend, K):
    # r per coordinate: g0 = 0 (sgn +1, |g0| -> δ), r = −5 (-> −2), r = 7 (-> 3), r = −1 (pole of odd K), NaN -> 1
    g0 = torch.tensor([0.0, 1.0, -1.0, 2.0, 1.0, 1.0, -0.5, 1.0])
    g1 = torch.tensor([1.0, -5.0, -7.0, -2.0, float("nan"), 0.5, 0.25, 1.0])
    r_exp = torch.tensor([3.0, -2.0, 3.0, -1.0, 1.0, 0.5, -0.5, 1.0])
    t0 = torch.zeros(8)
    p = torch.ones(8)
    extrapolate_([p], [t0], [g0], [g1], alpha=1.0, K=K, backend=backend)
    scale = [max(1.0, min(K / 2 + 1, _exact_ratio(float(r), K))) for r in r_exp]
    torch.testing.assert_close(p, torch.tensor(scale), rtol=1e-6, atol=1e-6)


def _exact_ratio(r, K):
    r = Fraction(r)
    s2 = 1 + r
    sk = sum(r ** i for i in range(K))
    if s2 == 0:
        return K / 2 if K % 2 == 0 else math.inf
    return float(sk / s2)


@pytest.mark.parametrize("K", [2, 3, 5, 6, 10])
def test_scale_polynomial_vs_exact_rationals(K):
    r = torch.linspace(-2, 3, 501, dtype=torch.float64)
    s = retention_scale(r, K, "horner")
    exp = torch.tensor([max(1.0, min(K / 2 + 1, _exact_ratio(float(x), K))) for x in r], dtype=torch.float64)
    torch.testing.assert_close(s, exp, rtol=1e-12, atol=1e-12)
    # the authors' closed form: r = 1 gives 1 (not K/2); away from 1 it agrees
    c = retention_scale(torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64), K, "closed")
    assert c[0] == 1.0
    torch.testing.assert_close(c[1:], s[[250, 220]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_nonfinite_counted(backend):
    p = [torch.ones(10), torch.ones(3)]
    t0 = [torch.zeros(10), torch.zeros(3)]
    g0 = [torch.ones(10), torch.ones(3)]
    g1 = [torch.ones(10), torch.ones(3)]
    p[0][2] = float("inf")
    g1[1][0] = float("nan")
    st = stats_to_dict(extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend=backend))
    assert st["n_nonfinite"] == 2


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_empty_lists_and_tensors(backend):
    st = extrapolate_([], [], [], [], alpha=0.5, K=5, backend=backend)
    assert st.tolist() == [0.0] * 11 + [1.0]
    z = torch.empty(0)
    st = extrapolate_([z], [z.clone()], [z.clone()], [z.clone()], alpha=0.5, K=5, backend=backend)
    assert stats_to_dict(st)["numel"] == 0


def test_triton_metadata_cache_sees_new_values():
    p, t0, g0, g1 = _make(torch.float32, shapes=[(100,), (1500,)])
    q = _clone(p)
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
    for x, y in zip(p, q):       # same addresses, new contents: the cached table must still be right
        x.copy_(y)
    torch._foreach_mul_(g1, 2.0)
    out = extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
    ref = extrapolate_(q, t0, g0, g1, alpha=0.5, K=5, backend="torch")
    for a, b in zip(q, p):
        assert_close("p", a, b, 1e-6)
    assert math.isclose(float(out[STAT_INDEX["sum_r"]]), float(ref[STAT_INDEX["sum_r"]]), rel_tol=1e-5)


def test_validation_errors():
    p, t0, g0, g1 = _make(torch.float32, shapes=[(4,)])
    with pytest.raises(ValueError, match="theta0"):
        extrapolate_(p, [torch.zeros(5)], g0, g1, alpha=0.5, K=5)
    with pytest.raises(ValueError, match="K"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=1)
    with pytest.raises(ValueError, match="g0 and g1"):
        extrapolate_(p, t0, g0, None, alpha=0.5, K=5)
    with pytest.raises(ValueError, match="backend"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="cuda")
    with pytest.raises(ValueError, match="scale_formula"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, scale_formula="exact")
    with pytest.raises(TypeError, match="params"):
        extrapolate_(p[0], t0, g0, g1, alpha=0.5, K=5)
    with pytest.raises(ValueError, match="contiguous"):
        extrapolate_([torch.zeros(4, 4).t()], [torch.zeros(16)], None, None, alpha=0.5, K=5)
    with pytest.raises(TypeError, match="g1"):
        extrapolate_(p, t0, g0, [torch.zeros(4, dtype=torch.int64)], alpha=0.5, K=5)


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_int64_offsets_cuda():
    n = 2 ** 31 + 1000
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    t0 = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    p[-1] = 3.0
    st = extrapolate_([p], [t0], None, None, alpha=0.5, K=2, backend="triton")
    assert float(p[-1]) == 1.5 and float(p[0]) == 0.5 and stats_to_dict(st)["numel"] == n


def test_cpp_build_failure_falls_back_with_one_warning(monkeypatch):
    from torch.utils import cpp_extension

    from gxpo_kernels.ops.extrapolate import _cpp

    def boom(*a, **k):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(_cpp, "_MODULE", None)
    monkeypatch.setattr(_cpp, "_FAILED", False)
    monkeypatch.setattr(cpp_extension, "load", boom)
    p, t0, g0, g1 = _make(torch.float32, shapes=[(40,)])
    q = _clone(p)
    with pytest.warns(RuntimeWarning, match="falling back"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="cpp")
    extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5)
    assert torch.equal(p[0], q[0]) and _cpp.load_extension() is None   # second call: no rebuild, no warning
