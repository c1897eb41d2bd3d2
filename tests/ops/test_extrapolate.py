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
from gxpo_kernels._utils import triton_interpret
from tests._utils import FailOnUse, assert_close

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


@pytest.fixture(params=["compiled", "python"])
def checks(request, monkeypatch):
    """How the public op re-checks a cached layout and its gradient lists: from one compiled pass per list (the
    C++ extension's ``tensor_records``) or, where the extension cannot be built, with Python-level passes. A
    fresh layout cache, so that every layout of the test is cached in that mode."""
    from collections import OrderedDict

    from gxpo_kernels.ops.extrapolate import op
    monkeypatch.setattr(op, "_LAYOUTS", OrderedDict())
    if request.param == "python":
        monkeypatch.setattr(op, "_record_reader", lambda: None)
    elif op._record_reader() is None:
        pytest.skip("no C++ compiler: the checks run in Python")
    return request.param


def _assert_checks(checks, p, t0, lowp_out=None):
    """The cached layout of these lists runs the checks ``checks`` names."""
    from gxpo_kernels.ops.extrapolate import op
    lay = op._layout_for(p, t0, lowp_out)
    assert lay is not None and (lay.recs is not None) == (checks == "compiled")


def _check(name, ref_p, out_p, ref_s, out_s, dtype, atol=1e-6):
    ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float64: 0.0}[dtype]
    for i, (a, b) in enumerate(zip(ref_p, out_p)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            tol = ulp * a.float().abs().clamp(min=1) + atol * (dtype == torch.float32)
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
    # the interpreter has no libdevice pow: its closed form multiplies r K−1 times, and (1 − r^K)/(1 − r + δ)
    # amplifies that last-bit difference near r = 1
    _check("params", rp, p, ref, out, dtype, atol=1e-4 if (backend, formula) == ("triton", "closed") else 1e-6)
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


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_gradient_lists_that_mix_dtypes(backend, checks):
    """g1 (and g0) of one param dtype in different dtypes (fp32, fp64, bf16, fp16): the public op reads each
    tensor in its own dtype. Triton reads a list in one dtype: a mixed list must not be read as its first
    tensor's dtype (wrong values; past the end of a narrower tensor on a GPU)."""
    shapes = [(33,), (1030,), (4, 5), (300,)]
    p, t0, g0, g1 = _make(torch.float32, shapes=shapes)
    g1 = [g1[0], g1[1].double(), g1[2].bfloat16(), g1[3].half()]
    g0 = [g0[0].double(), g0[1], g0[2], g0[3]]
    for call in range(2):                 # the second call hits the layout caches
        q = _clone(p)
        st = extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, clip_coef1=0.8, backend=backend)
        ref = extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5, clip_coef1=0.8)
        _check(f"call {call}", q, p, ref, st, torch.float32)
        p = q
    if backend == "triton":               # the prepared plan: a mixed list at new addresses is read right too
        from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
        plan = ExtrapolationPlan(p, t0, g0, backend=backend)
        for call in range(2):
            q = _clone(p)
            st = plan([g1[0].clone(), g1[1], g1[2], g1[3]] if call else g1, alpha=0.5, K=5)
            ref = extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5)
            _check(f"plan call {call}", q, p, ref, st, torch.float32)
            torch._foreach_copy_(p, q)    # the plan keeps its params: both on the same θ2 for the next call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_cpp_results_are_bit_identical_to_the_reference(dtype):
    """README and docs/extrapolate.md: the C++ op's parameters (and bf16 lowp_out copies) equal the PyTorch
    reference bit for bit, in fp32 as in fp64, for both scale formulas, inactive coordinates and several K
    (test_kernel_matches_reference allows 1e-6 in fp32, so it would not notice a lost bit). The statistics
    are sums, whose order may differ."""
    from gxpo_kernels.ops.extrapolate import _cpp
    if _cpp.load_extension() is None:
        pytest.skip("no C++ compiler: the op falls back to the reference")
    shapes = [(0,), (1,), (37,), (5, 301), (2049,)]
    for formula in ("horner", "closed"):
        for K, inactive in [(5, None), (4, 1e-2), (10, 1e-2)]:
            p, t0, g0, g1 = _make(dtype, shapes=shapes, seed=K)
            q = _clone(p)
            low = [[torch.empty(s, dtype=torch.bfloat16) for s in shapes] for _ in range(2)] \
                if dtype != torch.bfloat16 else [None, None]
            kw = dict(alpha=0.5, K=K, clip_coef0=0.7, clip_coef1=0.9, scale_formula=formula,
                      inactive_threshold=inactive)
            extrapolate_(p, t0, g0, g1, backend="cpp", lowp_out=low[0], **kw)
            extrapolate_(q, t0, g0, g1, backend="torch", lowp_out=low[1], **kw)
            case = (formula, K, inactive)
            assert all(torch.equal(a, b) for a, b in zip(p, q)), case
            assert low[0] is None or all(torch.equal(a, b) for a, b in zip(*low)), case


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_params_next_to_float32_ones(backend):
    """The compute dtype is per tensor: an fp32 param gets the same bits whether or not an fp64 param shares the
    call (the C++ op used to run a whole list in double as soon as one param was fp64)."""
    p, t0, g0, g1 = _make(torch.float32, shapes=[(1030,), (37,)])
    p64, t64, g064, g164 = _make(torch.float64, shapes=[(300,)], seed=3)
    alone, mixed, ref = _clone(p), _clone(p) + _clone(p64), _clone(p) + _clone(p64)
    kw = dict(alpha=0.5, K=5, clip_coef0=0.7)
    extrapolate_(alone, t0, g0, g1, backend=backend, **kw)
    st = extrapolate_(mixed, t0 + t64, g0 + g064, g1 + g164, backend=backend, **kw)
    st_ref = extrapolate_ref_(ref, t0 + t64, g0 + g064, g1 + g164, **kw)
    for a, b in zip(alone, mixed):
        assert torch.equal(a, b)
    _check("fp32 params", ref[:2], mixed[:2], st_ref, st, torch.float32)
    torch.testing.assert_close(mixed[2], ref[2], rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("ldt", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_low_precision_copy_of_float64_params(backend, ldt):
    """lowp_out of float64 params is θ̃ converted as torch converts a double (through float32 for the 16-bit
    types). The interpreter's own float64 -> bf16 cast produced zeros and NaN."""
    p, t0, g0, g1 = _make(torch.float64, shapes=[(1030,), (37,)])
    low = [torch.empty(1030, dtype=ldt), torch.empty(37, dtype=ldt)]
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, lowp_out=low, backend=backend)
    for x, lo in zip(p, low):
        want = x.to(ldt)
        if backend == "triton" and ldt == torch.bfloat16:   # the interpreter truncates float32 -> bf16
            torch.testing.assert_close(lo.float(), want.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(lo, want)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_inactive_threshold_of_float64_gradients(backend):
    """float64 gradients get float64 thresholds: at 1e25 their float32 norm overflowed to inf and made every
    coordinate inactive."""
    p, t0, g0, g1 = _make(torch.float64, shapes=[(1030,), (37,)])
    g0, g1 = [g * 1e25 for g in g0], [g * 1e25 for g in g1]
    q = _clone(p)
    st = extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=0.1, backend=backend)
    ref = extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=0.1)
    assert 0 < stats_to_dict(ref)["n_inactive"] < 1067 / 2
    assert stats_to_dict(st)["n_inactive"] == stats_to_dict(ref)["n_inactive"]
    for a, b in zip(q, p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_triton_float_arguments_reach_the_kernel_as_float64():
    """A Python float reaches a GPU kernel as float32 unless the parameter is annotated: float64 params would get
    hyper-parameters rounded to float32 (about 1e-8 relative). The interpreter passes Python floats as they are,
    so this is checked on the kernel's signature (it breaks if the module postpones its annotations)."""
    from triton.runtime.jit import JITFunction

    from gxpo_kernels.ops.extrapolate.op import _extrapolate_kernel
    k = _extrapolate_kernel   # under TRITON_INTERPRET=1 an interpreter wrapper: its function as a GPU run sees it
    k = k if isinstance(k, JITFunction) else JITFunction(k.fn)
    floats = {"alpha", "coef0", "coef1", "delta", "r_min", "r_max", "scale_hi"}
    kinds = {kp.name: kp.annotation_type for kp in k.params if kp.name in floats}
    assert kinds == dict.fromkeys(floats, "fp64")


def test_layout_cache_forgets_a_freed_tensor(checks):
    """The layout cache is keyed by ids and addresses, which a new tensor can inherit once the old one is freed
    (CPython reuses the object, the allocator the memory): freeing any tensor of a layout drops its entry, so a
    later tensor at the same id and address is validated afresh."""
    from gxpo_kernels.ops.extrapolate import op
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,), (100,)])
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
    lay = op._layout_for(p, t0, None)
    assert lay is not None and lay in op._LAYOUTS.values()
    del t0[1]                                               # the last reference to one theta0 tensor
    assert lay not in op._LAYOUTS.values()
    t0.append(torch.zeros(50))                              # a new tensor (maybe at the old id and address)
    with pytest.raises(ValueError, match="theta0"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")


def test_layout_cache_holds_no_tensor_beyond_its_layout():
    """A dropped layout (one of its tensors freed) frees the tensors its plans hold at once, not at the next
    garbage collection (no reference cycle through the weak-reference callbacks)."""
    import gc
    import weakref
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,), (100,)])
    gc.collect()
    gc.disable()
    try:
        for _ in range(4):
            extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
        refs = [weakref.ref(t) for t in p + t0 + g0 + g1]
        del p, t0, g0, g1
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_layout_of_one_tensor_per_list_does_not_keep_it_alive():
    """A plan held its dtype groups' first tensors (params[0], theta0[0]) strongly, and the layout is dropped only
    when one of its tensors is freed: a layout of one tensor per list (a flat parameter buffer) kept its
    tensors alive after the caller let them go, until eight other layouts pushed it out of the cache."""
    import gc
    import weakref
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,)])
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
    refs = [weakref.ref(t) for t in p + t0]
    del p, t0, g0, g1
    gc.collect()
    assert all(r() is None for r in refs)


def test_layout_cache_evicts_the_least_recently_used():
    """The cache evicted its oldest entry whatever its use: a layout called every step was rebuilt (validated and
    planned again) each time eight other layouts had been seen since it was first cached."""
    from gxpo_kernels.ops.extrapolate import op
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,), (100,)])
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="cpp")
    lay = op._layout_for(p, t0, None)
    others = [_make(torch.float32, shapes=[(8,), (9,)], seed=s) for s in range(op._LAYOUT_CACHE_SIZE + 2)]
    for q in others:
        extrapolate_(*q, alpha=0.5, K=5, backend="cpp")
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="cpp")
    assert op._layout_for(p, t0, None) is lay
    assert op._layout_for(others[0][0], others[0][1], None) is None   # evicted instead


def _views(buf, sizes):
    """Consecutive views of one buffer (their addresses are known: another view can take one's place)."""
    out, o = [], 0
    for n in sizes:
        out.append(buf[o:o + n])
        o += n
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_layout_still_checks_every_gradient(backend, checks):
    """Once a layout is cached, a call checks g0 and g1 with C-level passes instead of per tensor; a wrong numel,
    dtype, device, a non-contiguous tensor or a gradient overlapping a param must still raise, naming it, before
    anything is written; repeated and new gradients at the same addresses pass the checks again (a gradient
    list seen before is trusted only while none of its tensors was freed)."""
    g = torch.Generator().manual_seed(3)
    sizes = [64, 40, 24]
    p = [torch.randn(n, generator=g) for n in sizes]
    t0 = [x + 0.1 for x in p]
    gbuf = torch.randn(2 * sum(sizes), generator=g)
    g0, g1 = _views(gbuf[:sum(sizes)], sizes), _views(gbuf[sum(sizes):], sizes)
    kw = dict(alpha=0.5, K=5, backend=backend)
    for _ in range(4):   # cache the layout, see the gradients twice, then hit the watched lists
        extrapolate_(p, t0, g0, g1, **kw)
    _assert_checks(checks, p, t0)
    before = _clone(p)
    bad = {"numel": ([torch.randn(41) if i == 1 else x for i, x in enumerate(g1)], ValueError, r"g1\[1\] has 41"),
           "dtype": ([x.to(torch.int32) if i == 2 else x for i, x in enumerate(g1)], TypeError, r"g1\[2\] must be"),
           "device": ([x.to("meta") if i == 0 else x for i, x in enumerate(g1)], ValueError, r"g1\[0\] is on meta"),
           "strided": ([torch.randn(80)[::2] if i == 1 else x for i, x in enumerate(g1)], ValueError,
                       r"g1\[1\] must be contiguous"),
           "overlap": ([p[0][:64] if i == 0 else x for i, x in enumerate(g1)], ValueError, r"overlaps"),
           "overlap part": ([p[1][16:] if i == 2 else x for i, x in enumerate(g1)], ValueError, r"overlaps"),
           "not a tensor": ([x if i else 1.0 for i, x in enumerate(g1)], TypeError, r"g1\[0\] must be a torch"),
           "count": (g1[:2], ValueError, r"g1 must have 3")}
    for what, (g1_bad, exc, msg) in bad.items():
        with pytest.raises(exc, match=msg):
            extrapolate_(p, t0, g0, g1_bad, **kw)
        with pytest.raises(exc, match=msg.replace("g1", "g0")):     # the same checks for g0
            extrapolate_(p, t0, g1_bad, g1, **kw)
        assert all(torch.equal(a, b) for a, b in zip(p, before)), what
        # the valid lists still pass after a refused call (and their cache entries were not replaced by it)
        extrapolate_(p, t0, g0, g1, **kw)
        before = _clone(p)
    # a new tensor at a seen gradient's address, of another dtype / numel: checked, refused
    for other in (gbuf[sum(sizes) + 64:].view(torch.int32)[:40], gbuf[sum(sizes) + 64:sum(sizes) + 84]):
        with pytest.raises((TypeError, ValueError), match=r"g1\[1\]"):
            extrapolate_(p, t0, g0, [g1[0], other, g1[2]], **kw)
    assert all(torch.equal(a, b) for a, b in zip(p, before))


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_layout_with_new_gradients_every_call(pdt, checks):
    """One layout, new g0 and g1 tensors on every call (new addresses, one off the 16-byte grid, g0's dtypes
    changing between calls so that another plan serves them, then the first lists again): each call equals the
    reference."""
    shapes = [(37,), (0,), (64, 3), (5,), (1030,)]
    p, t0, _, _ = _make(pdt, shapes=shapes)
    dts = [[torch.float32] * 5, [torch.float32, torch.float32, pdt, torch.float64, torch.float32], [pdt] * 5]
    first = None
    for call in range(5):
        _, _, g0, g1 = _make(pdt, shapes=shapes, seed=call + 1)
        g0 = [g.to(d) for g, d in zip(g0, dts[call % 3])]
        if call == 1:
            g1[4] = torch.randn(1031).to(pdt)[1:]            # off the 16-byte grid
        if call == 0:
            first = g0, g1
        if call == 4:
            g0, g1 = first                                   # the first lists again (their addresses too)
        before = _clone(p)
        st = extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend="triton")
        ref = extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend="torch")
        _check(f"call {call}", before, p, ref, st, pdt)


def test_seen_gradients_are_forgotten_when_freed(monkeypatch):
    """A gradient list that passed the Python-level checks twice is watched: freeing one of its tensors forgets
    it, so a new tensor inheriting its id and address is checked. (The compiled checks compare every attribute
    the checks read, whatever the objects: see test_cached_layout_sees_a_tensor_changed_in_place_at_the_same_
    address.)"""
    from collections import OrderedDict

    from gxpo_kernels.ops.extrapolate import op
    monkeypatch.setattr(op, "_LAYOUTS", OrderedDict())
    monkeypatch.setattr(op, "_record_reader", lambda: None)
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,), (100,)])
    for _ in range(4):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
    lay = op._layout_for(p, t0, None)
    assert lay.seen["g1"] is not None and lay.seen["g1"][3] is not None    # watched
    del g1[1]
    assert lay.seen["g1"] is None
    g1.append(torch.zeros(50))
    with pytest.raises(ValueError, match=r"g1\[1\] has 50"):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_layout_follows_a_param_moved_to_new_storage(backend, checks):
    """A param whose storage is swapped in place (same tensor object, new address: ``p.data = ...``, ``set_``)
    no longer matches the cached layout: the call validates again and writes into the new storage; a param
    replaced by a same-address view of another dtype or numel is refused."""
    p, t0, g0, g1 = _make(torch.float32, shapes=[(64,), (100,), (48,)])
    kw = dict(alpha=0.5, K=5, backend=backend)
    for _ in range(2):
        extrapolate_(p, t0, g0, g1, **kw)
    old = p[1]
    p[1].data = p[1].clone()
    q = _clone(p)
    extrapolate_(p, t0, g0, g1, **kw)
    extrapolate_(q, t0, g0, g1, alpha=0.5, K=5, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(p, q))
    for other in (p[2].view(torch.int32), p[2].view(torch.bfloat16)):   # same address, other dtype / numel
        with pytest.raises((TypeError, ValueError), match=r"params\[2\]|\[2\]"):
            extrapolate_([p[0], p[1], other], t0, g0, g1, **kw)
    del old


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_layout_sees_a_tensor_changed_in_place_at_the_same_address(backend, checks):
    """The same tensor object, at the same address, holding another dtype (``p.data = <a bf16 view>``, or what
    a caching allocator hands back after ``model.to(...)``), another numel (``resize_``) or a non-contiguous
    layout (``p.data = p.data.t()``): the cached layout used to match on ids and addresses alone, and Triton read
    and wrote the bf16 param as float32 and the shrunk one at its old length. Each call equals a fresh one, or
    raises as a fresh one does."""
    kw = dict(alpha=0.5, K=5, backend=backend)
    p, t0, g0, g1 = _make(torch.float32, shapes=[(37,), (8, 8)])
    raw = p[1].view(-1)
    for _ in range(2):
        extrapolate_(p, t0, g0, g1, **kw)
    _assert_checks(checks, p, t0)
    p[1].data = raw.view(torch.bfloat16)[:64].view(8, 8)   # same address, now bf16
    p[1].copy_(torch.randn(8, 8))
    g1b = [g1[0], g1[1].bfloat16()]
    for g in (g1, g1b):                                     # gradients of the old and of the new dtype
        before = _clone(p)
        st = extrapolate_(p, t0, g0, g, **kw)
        ref = extrapolate_(before, t0, g0, g, alpha=0.5, K=5, backend="torch")
        _check("bf16 at the old address", before, p, ref, st, torch.bfloat16)
    p[1].data = raw.view(8, 8).t()                          # same address, not contiguous
    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous"):
        extrapolate_(p, t0, g0, g1, **kw)
    p[1].data = raw.view(8, 8)
    extrapolate_(p, t0, g0, g1, **kw)
    p[1].resize_(32)                                        # same address, fewer elements
    with pytest.raises(ValueError, match=r"theta0\[1\] has 64 elements but params\[1\] has 32"):
        extrapolate_(p, t0, g0, g1, **kw)
    # a watched gradient list (passed three times) whose tensor changes dtype or numel in place
    p[1].data = raw.view(8, 8)
    for _ in range(3):
        extrapolate_(p, t0, g0, g1, **kw)
    g0[1].data = g0[1].view(-1).view(torch.bfloat16)[:64].view(8, 8)
    g0[1].copy_(torch.randn(8, 8))
    before = _clone(p)
    st = extrapolate_(p, t0, g0, g1, **kw)
    ref = extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, backend="torch")
    _check("watched g0 now bf16", before, p, ref, st, torch.float32)
    g0[1].resize_(32)
    with pytest.raises(ValueError, match=r"g0\[1\] has 32 elements"):
        extrapolate_(p, t0, g0, g1, **kw)


def _same_address_changes():
    """Ways a live tensor of a cached list changes what it holds while keeping its id and its address: each
    takes the tensor (64 elements, shape (8, 8)) and returns what a fresh call must make of it."""
    import numpy as np

    def other(x):   # a 16-bit dtype other than x's
        return torch.float16 if x.dtype == torch.bfloat16 else torch.bfloat16

    def view_dtype(x):        # p.data = <a view in another dtype> (new values: finite ones in the new dtype)
        x.data = x.data.view(-1).view(torch.uint8)[:128].view(other(x)).view(8, 8)
        x.copy_(torch.randn(8, 8))

    def resize(x):            # resize_: fewer elements
        x.resize_(32)

    def set_strides(x):       # set_ onto the same storage and offset, transposed strides: not contiguous
        x.set_(x.untyped_storage(), x.storage_offset(), (8, 8), (1, 8))

    def new_storage(x):       # a new storage the allocator put at the old address, of another dtype
        x.data = torch.from_numpy(x.data.view(-1).view(torch.uint8).numpy()[:128].view(np.float16)).view(8, 8)
        x.copy_(torch.randn(8, 8))
    return {"view_dtype": view_dtype, "resize_": resize, "set_": set_strides, "new_storage": new_storage}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_lists_changed_in_place_at_the_same_address_every_way(backend, checks):
    """Each way of changing a tensor in place at its address (``_same_address_changes``), applied to a tensor of
    each list (params, theta0, lowp_out, g0, g1) after the layout is cached and the gradient lists were seen
    three times: the call equals a fresh call (a cleared cache: full validation) bit for bit, or raises as it
    does. The cache used to match on ids and addresses alone, and Triton read and wrote a changed tensor in its
    old dtype and length."""
    from gxpo_kernels.ops.extrapolate import op
    kw = dict(alpha=0.5, K=5, backend=backend)
    names = ("params", "theta0", "lowp_out", "g0", "g1")
    for how, change in _same_address_changes().items():
        for which in names:
            p, t0, g0, g1 = _make(torch.float32, shapes=[(37,), (8, 8)], seed=len(how) + len(which))
            lp = [None, torch.zeros(8, 8, dtype=torch.bfloat16)]   # (an entry may be None)
            lists = dict(zip(names, (p, t0, lp, g0, g1)))
            for _ in range(3):
                extrapolate_(p, t0, g0, g1, lowp_out=lp, **kw)
            _assert_checks(checks, p, t0, lp)
            change(lists[which][1])
            fresh = {k: [x if x is None or k not in ("params", "lowp_out") else x.clone() for x in v]
                     for k, v in lists.items()}
            try:
                st, err = extrapolate_(p, t0, g0, g1, lowp_out=lp, **kw), None
            except (TypeError, ValueError) as e:
                st, err = None, e
            op._LAYOUTS.clear()
            try:
                want, want_err = extrapolate_(*(fresh[k] for k in names[:1] + names[1:2] + names[3:]),
                                              lowp_out=fresh["lowp_out"], **kw), None
            except (TypeError, ValueError) as e:
                want, want_err = None, e
            what = f"{how} of {which}[1]"
            assert (type(err), str(err)) == (type(want_err), str(want_err)), what
            if err is None:
                assert torch.equal(st, want), what
                for a, b in zip(p + lp, fresh["params"] + fresh["lowp_out"]):
                    assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), what
            op._LAYOUTS.clear()


def test_tensor_records_read_what_python_reads():
    """The compiled pass behind the cached layout's checks (``tensor_records``): per entry the id, data_ptr,
    numel, dtype, contiguity and device, as Python reads them (zeros for None); None for anything it must not
    read in C++ (a tensor subclass, which may override these attributes, or not a tensor at all)."""
    import numpy as np

    from gxpo_kernels.ops.extrapolate import op
    rd = op._record_reader()
    if rd is None:
        pytest.skip("no C++ compiler: the checks run in Python")
    base = torch.randn(100)
    ts = [torch.randn(3, 5), None, torch.randn(4, 6).t(), base[10:30], torch.empty(0, dtype=torch.bfloat16),
          torch.nn.Parameter(torch.randn(7, dtype=torch.float64)), torch.zeros(3, dtype=torch.float16),
          torch.zeros(2, 3, dtype=torch.int32)]
    n = len(ts)
    for seq in (ts, tuple(ts)):
        for with_ids in (True, False):
            rec = np.frombuffer(rd(seq, with_ids), np.int64).reshape(4 if with_ids else 3, n)
            ids = rec[0] if with_ids else None
            ptrs, numels, metas = rec[-3:]
            for i, t in enumerate(ts):
                if t is None:
                    assert (ids is None or ids[i] == 0) and ptrs[i] == numels[i] == metas[i] == 0
                    continue
                assert ids is None or ids[i] == id(t)
                assert (ptrs[i], numels[i]) == (t.data_ptr(), t.numel()), i
                # CPU: device type 0, index -1 (+ 1)
                assert (metas[i] >> 8) & 255 == t.is_contiguous() and metas[i] >> 16 == 0, i
                assert op._CODES.get(int(metas[i]) & 255, torch.int32) == t.dtype, i
    codes = {t.dtype: int(m) & 255 for t, m in zip(ts, np.frombuffer(rd(ts, False), np.int64)[2 * n:]) if t is not None}
    assert len(set(codes.values())) == len(codes) == 5   # one code per dtype
    sub = type("Sub", (torch.Tensor,), {})
    for bad in ([ts[0], torch.randn(3).as_subclass(sub)], [ts[0], 1.0], ts[0], iter(ts[:1])):
        assert rd(bad, True) is None and rd(bad, False) is None


def test_prepared_plan_refuses_params_moved_since():
    """``model.to(dtype)`` keeps the parameter objects and gives them new storage: a Triton plan built before
    would launch on offsets taken from the old addresses in the old dtype (writing outside the new tensors).
    A call raises instead; a new plan equals the reference."""
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
    p, t0, g0, g1 = _make(torch.float32, shapes=[(37,), (64,)])
    plan = ExtrapolationPlan(p, t0, g0, backend="triton")
    plan(g1, alpha=0.5, K=5)
    for t in p:
        t.data = t.data.to(torch.bfloat16)
    g1 = [g.bfloat16() for g in g1]
    with pytest.raises(ValueError, match="build a new plan"):
        plan(g1, alpha=0.5, K=5)
    before = _clone(p)
    st = ExtrapolationPlan(p, t0, g0, backend="triton")(g1, alpha=0.5, K=5)
    _check("new plan", before, p, extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, backend="torch"), st,
           torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
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


_F16_LIMIT = [(torch.float16, None), (torch.float32, torch.float16), (torch.float64, torch.float16),
              (torch.bfloat16, torch.float16)]
_BF16_LIMIT = [(torch.bfloat16, None), (torch.float32, torch.bfloat16)]


# (not Triton with a bf16 limit: the interpreter's bf16 cast truncates, it never rounds a finite value up to inf)
@pytest.mark.parametrize("backend,pdt,ldt", [(b, p, low) for b in BACKENDS + ["torch"]
                                             for p, low in _F16_LIMIT + (_BF16_LIMIT if b != "triton" else [])])
@pytest.mark.parametrize("grads", [True, False], ids=["grads", "plain"])
def test_nonfinite_counts_overflow_of_the_stored_value(backend, grads, pdt, ldt):
    """A θ̃ that is finite in the compute dtype but overflows to inf where it is written (a 16-bit param or
    lowp_out) is non-finite: the count is what the rules' fallback reads ("no NaN or inf parameters"), so it
    must see the values the step leaves behind. Oracle: the non-finite entries of the outputs themselves."""
    lo = torch.finfo(ldt if ldt is not None and torch.finfo(ldt).max < torch.finfo(pdt).max else pdt).max
    g = torch.Generator().manual_seed(7)
    sizes = [1, 17, 600, 4099]
    t0 = [(torch.rand(s, generator=g, dtype=torch.float64) * 0.5 * lo).to(pdt) for s in sizes]
    # θ̃ = θ0 + α·scale·(θ2 − θ0) with α·scale up to 3.5: about half the entries land above the limit
    p = [(a.double() + torch.rand(s, generator=g, dtype=torch.float64) * 0.3 * lo).to(pdt)
         for a, s in zip(t0, sizes)]
    p[1][3] = float("nan")                                 # a NaN θ2: counted once, not twice
    g0 = [torch.randn(s, generator=g) for s in sizes] if grads else None
    g1 = [0.9 * x + 0.3 * torch.randn(s, generator=g) for x, s in zip(g0, sizes)] if grads else None
    if grads:
        g1[2][5] = float("inf")                            # an inf gradient: r -> clamp, θ̃ finite or not
    low = [torch.empty(s, dtype=ldt) for s in sizes] if ldt is not None else None
    st = stats_to_dict(extrapolate_(p, t0, g0, g1, alpha=1.0 if grads else 3.0, K=5, lowp_out=low,
                                    backend=backend))
    bad = [~torch.isfinite(x) for x in p]
    if low is not None:
        bad = [b | ~torch.isfinite(x) for b, x in zip(bad, low)]
    if grads:
        bad = [b | ~torch.isfinite(x) | ~torch.isfinite(y) for b, x, y in zip(bad, g0, g1)]
    want = sum(int(b.sum()) for b in bad)
    assert 100 < want < sum(sizes) - 100 and st["n_nonfinite"] == want


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



@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("kw,match", [(dict(delta=math.nan), "delta"), (dict(delta=-1e-8), "delta"),
                                      (dict(delta=math.inf), "delta"), (dict(r_min=math.nan), "r_min"),
                                      (dict(r_max=math.nan), "r_max"), (dict(r_min=1.0, r_max=0.5), "r_min"),
                                      (dict(clip_coef0=-1.0), "clip_coef0"), (dict(clip_coef1=-0.5), "clip_coef1"),
                                      (dict(clip_coef0=math.nan), "clip_coef0"),
                                      (dict(clip_coef1=math.inf), "clip_coef1")])
def test_guard_and_clamp_arguments_are_checked(backend, kw, match):
    """A NaN δ or r clamp reached the backends unchecked, and they disagreed: the reference's max(|ĝ0|, NaN) is
    NaN (r -> 1), the kernels' comparison with NaN keeps |ĝ0| (the C++ op and Triton moved θ̃ by up to 0.12 more
    than the reference here). A negative clip coefficient flipped ĝ's sign (and r's) without an error. Refused by
    both entry points, before anything is written."""
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
    p, t0, g0, g1 = _make(torch.float32, shapes=[(37,), (5,)])
    before = _clone(p)
    with pytest.raises(ValueError, match=match):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend=backend, **kw)
    with pytest.raises(ValueError, match=match):
        ExtrapolationPlan(p, t0, g0, backend=backend)(g1, alpha=0.5, K=5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(p, before))
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend=backend, delta=0.0, r_min=-math.inf, r_max=math.inf)


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
    # the layout cache re-checks its lists in Python then (test_cached_lists_changed_in_place_..._every_way)
    from gxpo_kernels.ops.extrapolate import op
    lay = op._layout_for(p, t0, None)
    assert lay is not None and lay.recs is None and lay.records is None
    for _ in range(2):
        extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="triton")
        extrapolate_ref_(q, t0, g0, g1, alpha=0.5, K=5)
    assert torch.equal(p[0], q[0])


def test_cpp_build_failure_warning_keeps_the_compiler_error(monkeypatch):
    """A failed compile's message starts with the compiler command line (hundreds of characters of flags and
    include paths); the warning must still show its end, where the compiler's error says what went wrong."""
    from torch.utils import cpp_extension

    from gxpo_kernels.ops.extrapolate import _cpp
    cmd = "[1/2] c++ -MMD -MF extrapolate_cpu.o.d " + " ".join(f"-isystem /site-packages/include{i}" for i in range(40))

    def boom(*a, **k):
        raise RuntimeError(f"Error building extension 'gxpo_extrapolate_cpu': {cmd}\n"
                           "extrapolate_cpu.cpp:22:10: fatal error: omp.h: No such file or directory\n"
                           "ninja: build stopped: subcommand failed.\n")
    monkeypatch.setattr(_cpp, "_MODULE", None)
    monkeypatch.setattr(_cpp, "_FAILED", False)
    monkeypatch.setattr(cpp_extension, "load", boom)
    with pytest.warns(RuntimeWarning, match="falling back") as rec:
        assert _cpp.load_extension() is None
    msg = str(rec[0].message)
    assert "Error building extension" in msg and "fatal error: omp.h: No such file or directory" in msg, msg
    assert len(msg) < 2000


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("K", [3, 5, 6])
@pytest.mark.parametrize("formula", ["horner", "closed"])
def test_inactive_coordinates_keep_the_two_step_displacement(backend, K, formula):
    # neutral retention (the authors' code): an inactive coordinate gets r = 1 in the sums AND scale 1 (not K/2)
    g = torch.Generator().manual_seed(K)
    n = 300
    g0 = torch.randn(n, generator=g)
    g0[::7] *= 1e-6                                   # inactive: |g0| <= 1e-3 · RMS(g0)
    g0[::11] = 0.0
    g1 = 0.5 * g0 + 0.3 * torch.randn(n, generator=g)
    t0 = torch.randn(n, generator=g)
    t2 = t0 + 0.1 * torch.randn(n, generator=g)
    p = t2.clone()
    st = stats_to_dict(extrapolate_([p], [t0], [g0], [g1], alpha=0.5, K=K, scale_formula=formula,
                                    inactive_threshold=1e-3, backend=backend))
    inact = g0.abs() <= 1e-3 * g0.norm() / math.sqrt(n)
    assert 40 < int(inact.sum()) == st["n_inactive"]
    assert torch.equal(p[inact], t0[inact] + 0.5 * (t2[inact] - t0[inact]))
    # the active coordinates are untouched by the option
    q = t2.clone()
    extrapolate_([q], [t0], [g0], [g1], alpha=0.5, K=K, scale_formula=formula, backend=backend)
    torch.testing.assert_close(p[~inact], q[~inact], rtol=0, atol=0 if backend != "triton" else 1e-6)


def _authors_closed_form_step(t0, t2, g0, g1, K, alpha, delta=1e-8):
    """The authors' paper-era reposition, written out from their description: r = ĝ1/(sgn·max(|ĝ0|, δ)) clamped
    to [−2, 3] then NaN -> 1; S_K = (1 − r.pow(K))/(1 − r + δ); S_2 = (1 − r·r)/(1 − r + δ);
    scale = clamp(S_K/(S_2 + δ), 1, K/2 + 1); θ̃ = (θ2 − θ0)·scale·α + θ0."""
    sgn = torch.where(g0 >= 0, 1.0, -1.0).to(g0.dtype)
    r = (g1 / (g0.abs().clamp(min=delta) * sgn)).clamp(-2.0, 3.0).nan_to_num(nan=1.0)
    omr = 1.0 - r
    s_k = (1.0 - r.pow(K)) / (omr + delta)
    s_2 = (1.0 - r * r) / (omr + delta)
    scale = (s_k / (s_2 + delta)).clamp(1.0, K / 2.0 + 1.0)
    return ((t2 - t0) * scale) * alpha + t0


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("K", [2, 3, 5, 7])
def test_closed_form_is_bit_exact_with_pow(backend, dtype, K):
    # sizes that are whole multiples of torch's vector loop (torch.pow sends loop tails through std::pow)
    g = torch.Generator().manual_seed(11 * K)
    sizes = [64, 1024, 4096]
    t0 = [torch.randn(s, generator=g, dtype=dtype) for s in sizes]
    t2 = [a + 0.01 * torch.randn(s, generator=g, dtype=dtype) for a, s in zip(t0, sizes)]
    g0 = [torch.randn(s, generator=g, dtype=dtype) for s in sizes]
    g1 = [0.7 * a + 0.4 * torch.randn(s, generator=g, dtype=dtype) for a, s in zip(g0, sizes)]
    g1[0][:8] = g0[0][:8]                             # r == 1 exactly: the closed form gives scale 1
    p = [x.clone() for x in t2]
    extrapolate_(p, t0, g0, g1, alpha=0.5, K=K, scale_formula="closed", backend=backend)
    for out, a, b, x, y in zip(p, t0, t2, g0, g1):
        # θ0 + (α·scale)·d here, (d·scale)·α + θ0 there: the same bits because α = 0.5 scales exactly
        assert torch.equal(out, _authors_closed_form_step(a, b, x, y, K, 0.5))
    assert torch.equal(p[0][:8], t0[0][:8] + 0.5 * (t2[0][:8] - t0[0][:8]))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_aliasing_tensors_are_refused(backend, checks):
    base = torch.randn(64)
    t0, g0, g1 = [torch.randn(64)], [torch.randn(64)], [torch.randn(64)]
    kw = dict(alpha=0.5, K=5, backend=backend)
    with pytest.raises(ValueError, match="overlaps"):                    # the same tensor twice
        extrapolate_([base, base], t0 * 2, g0 * 2, g1 * 2, **kw)
    with pytest.raises(ValueError, match="overlaps"):                    # overlapping views of one storage
        extrapolate_([base[:40], base[30:]], [torch.randn(40), torch.randn(34)], None, None, **kw)
    with pytest.raises(ValueError, match="overlaps"):                    # params[i] aliases theta0[j]
        extrapolate_([base[:32], torch.randn(8)], [torch.randn(32), base[16:24]], None, None, **kw)
    with pytest.raises(ValueError, match="overlaps"):                    # lowp_out aliases a param
        extrapolate_([base], t0, None, None, lowp_out=[base], **kw)
    # read-only inputs may share memory; disjoint views of one buffer are fine
    before = base.clone()
    extrapolate_([base[:32], base[32:]], [torch.zeros(32), torch.zeros(32)], [g0[0][:32], g0[0][:32]],
                 [g0[0][:32], g0[0][:32]], **kw)
    assert not torch.equal(base, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_thresholds_across_interleaved_dtype_groups(backend):
    """Params of three dtypes, interleaved, so every dtype group is a strict subset of the list (on Triton each
    group gathers its own tensors' thresholds): the masked coordinates and the result equal the reference."""
    g = torch.Generator().manual_seed(5)
    shapes, dts = [(37,), (64, 3), (5,), (1030,), (0,), (200,)], [torch.float32, torch.bfloat16, torch.float64] * 2
    t0 = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)]
    p = [(t + 0.1 * torch.randn(s, generator=g)).to(d) for t, s, d in zip(t0, shapes, dts)]
    g0 = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)]
    for i, x in enumerate(g0):                  # a tensor-dependent share of tiny entries: inactive candidates
        x.view(-1)[:: 3 + i] *= 1e-4
    g1 = [(0.5 * x.double() + 0.3 * torch.randn(s, generator=g, dtype=torch.float64)).to(d)
          for x, s, d in zip(g0, shapes, dts)]
    q = _clone(p)
    st = stats_to_dict(extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend=backend))
    ref = stats_to_dict(extrapolate_(q, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend="torch"))
    assert st["n_inactive"] == ref["n_inactive"] > 100
    for a, b in zip(p, q):
        bf = a.dtype == torch.bfloat16                # (the interpreter's bf16 cast truncates)
        torch.testing.assert_close(a.double(), b.double(), rtol=2 ** -7 if bf else 1e-6, atol=1e-3 if bf else 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_plan_matches_extrapolate_and_follows_fresh_gradients(backend):
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
    shapes = [(37,), (0,), (64, 3), (5,), (1030,)]
    p, t0, g0, _ = _make(torch.float32, shapes=shapes)
    plan = ExtrapolationPlan(p, t0, g0, backend=backend)
    for seed in range(3):                                 # new gradient tensors (new addresses) every call
        _, _, _, g1 = _make(torch.float32, shapes=shapes, seed=seed + 1)
        g1[2] = torch.randn(64 * 3 + 1)[1:].view(64, 3)   # a gradient off the 16-byte grid: general path
        q = _clone(p)
        st = plan(g1, alpha=0.5, K=5, inactive_threshold=1e-2)
        ref = extrapolate_(q, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend="torch")
        _check("plan", q, p, ref, st, torch.float32)
        p = q                                              # keep both on the same θ2 for the next round
        plan = ExtrapolationPlan(p, t0, g0, backend=backend)
    with pytest.raises(ValueError, match="one tensor per param|must have 5 tensors"):
        plan(g1[:2], alpha=0.5, K=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_plan_with_per_call_g0(backend, dtype):
    """g0="per_call" (a rule that keeps pass 0's gradients): one plan, new g0 and g1 tensors on every call (new
    addresses, one off the 16-byte grid, then the same addresses again), each call against the reference."""
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
    shapes = [(37,), (0,), (64, 3), (5,), (1030,)]
    p, t0, _, _ = _make(dtype, shapes=shapes)
    plan = ExtrapolationPlan(p, t0, "per_call", backend=backend)
    g0_same = g1_same = None
    for call in range(4):
        if call == 3:
            g0, g1 = g0_same, g1_same                        # repeated addresses: the cached offsets
        else:
            _, _, g0, g1 = _make(dtype, shapes=shapes, seed=call + 1)
            g0 = [g.to(dtype) for g in g0]                  # gradients have their parameter's dtype
        if call == 1:
            g0[4] = torch.randn(1031).to(dtype)[1:]          # off the 16-byte grid: the general path
            g0_same, g1_same = g0, g1
        before = _clone(p)
        st = plan(g1, g0=g0, alpha=0.5, K=5, inactive_threshold=1e-2)
        ref = extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, inactive_threshold=1e-2, backend="torch")
        _check(f"per-call g0, call {call}", before, p, ref, st, dtype)
    with pytest.raises(ValueError, match="per_call"):
        plan(g1, alpha=0.5, K=5)                             # g0 missing
    with pytest.raises(ValueError, match="per_call"):
        ExtrapolationPlan(p, t0, "every_call", backend=backend)
    with pytest.raises(ValueError, match="one tensor per param|one per param"):
        plan(g1, g0=g0[:2], alpha=0.5, K=5)


@pytest.mark.parametrize("per_call", [False, True])
def test_prepared_plan_reads_other_dtypes_at_the_same_addresses(per_call):
    """A plan without ``grads_are_param_dtype`` scanned the gradients' dtypes only when their addresses changed:
    a list at the same addresses that now mixed dtypes (a float32 gradient where a bfloat16 one was) reused the
    cached offsets and was read as bfloat16, silently wrong."""
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan
    n = 64
    p, t0, g0, _ = _make(torch.float32, shapes=[(n,), (n,)])
    plan = ExtrapolationPlan(p, t0, "per_call" if per_call else g0, backend="triton")
    raw = torch.zeros(4 * n, dtype=torch.uint8)           # one buffer: a bf16 view, then an fp32 view, same address
    first = torch.randn(n).bfloat16()
    b16, b32 = raw[:2 * n].view(torch.bfloat16), raw.view(torch.float32)
    for g1 in ([first, b16], [first, b32]):
        g1[1].copy_(torch.randn(n))
        before = _clone(p)
        kw = dict(g0=g0) if per_call else {}
        st = plan(g1, alpha=0.5, K=5, **kw)
        ref = extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, backend="torch")
        _check(f"g1 dtypes {[g.dtype for g in g1]}", before, p, ref, st, torch.float32)


def test_snapshot_copy_is_a_byte_copy_and_leaves_what_it_cannot_do():
    """The C++ op's non-temporal copy (the update rules' snapshots on the CPU): bit-equal for every dtype, at
    offsets that leave unaligned heads and tails, across a 1 MiB task boundary and for empty tensors; pairs of
    two dtypes, two numels or a non-contiguous side are returned untouched for the caller's copy_."""
    from gxpo_kernels.ops.extrapolate._cpp import snapshot_copy_
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2 ** 19 + 77, generator=g)
    src = [base[5:5 + 2 ** 18 + 33],                           # 4-byte offset: unaligned head
           torch.randn(1, generator=g), torch.empty(0),
           torch.randn(13, generator=g, dtype=torch.float64),
           torch.randn(3, 7, generator=g).bfloat16(), torch.randn(9, generator=g).half(),
           torch.randn(5, generator=g), torch.randn(6, generator=g), torch.randn(4, 4, generator=g).t()]
    dst = [torch.full_like(s, 7.0) for s in src[:6]] + [
        torch.full((5,), 7.0, dtype=torch.float64), torch.full((7,), 7.0), torch.full((4, 4), 7.0)]
    dst[0] = torch.full((2 ** 19 + 64,), 7.0)[3:3 + src[0].numel()]   # another unaligned destination
    left = snapshot_copy_(dst, src)
    assert left == [6, 7, 8]
    for d, s in zip(dst[:6], src[:6]):
        assert d.dtype == s.dtype and torch.equal(d.view(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8))
    assert all(bool((d == 7).all()) for d in dst[6:])   # untouched


def test_rules_snapshot_through_the_cpp_copy_only_with_the_cpp_backend(monkeypatch):
    """GXPO's snapshots use the non-temporal copy where its extrapolation runs the C++ op, and plain copy_
    with backend="torch"; both give the same step."""
    from gxpo_kernels.ops.extrapolate import _cpp
    from gxpo_kernels.update import GXPO
    calls = []
    orig = _cpp.snapshot_copy_
    monkeypatch.setattr(_cpp, "snapshot_copy_", lambda d, s: calls.append(len(d)) or orig(d, s))
    out = []
    for backend in ("cpp", "torch"):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        rule = GXPO(opt, gate=None, backend=backend)
        x = torch.randn(8, 6)
        n = len(calls)

        def closure():
            opt.zero_grad()
            loss = (m(x) ** 2).mean() * (1 + rule.pass_index)
            loss.backward()
            return loss
        for _ in range(3):
            rule.step(closure)
        out.append([p.detach().clone() for p in m.parameters()])
        assert (len(calls) > n) is (backend == "cpp")
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_triton_alignment_hint_follows_every_address(monkeypatch):
    # ALIGN > 1 lets the GPU kernel use 16-byte vector accesses on every list; a tensor that is not 16-byte aligned
    # (or a numel that is not a multiple of 16 bytes of the narrowest dtype) must make the launch use ALIGN = 1,
    # or the GPU reads misaligned addresses. The interpreter ignores the hint, so the launches are inspected.
    from gxpo_kernels.ops.extrapolate import op as X
    seen = []

    class _Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(k["ALIGN"])
    monkeypatch.setattr(X, "_extrapolate_kernel", _Spy())

    def off(t, k):   # a copy of t that starts k elements into a fresh buffer (16-byte aligned at k = 0)
        buf = torch.zeros(t.numel() + 8, dtype=t.dtype)
        return buf[k:k + t.numel()].view_as(t).copy_(t)

    for pdt, want in ((torch.bfloat16, 8), (torch.float32, 4)):
        shapes = [(64,), (8, 16)]
        mk = lambda dt: [torch.randn(s).to(dt) for s in shapes]  # noqa: E731
        p, t0, g0, g1, low = mk(pdt), mk(torch.float32), mk(pdt), mk(pdt), mk(torch.bfloat16)

        def launch(p=p, t0=t0, g0=g0, g1=g1, low=None):
            seen.clear()
            X.extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, lowp_out=low, backend="triton")
            return seen[-1]
        assert launch() == want and launch(low=low) == 8          # 16 bytes of the bf16 copies
        assert launch(p=[p[0], off(p[1], 1)]) == 1
        assert launch(t0=[off(t0[0], 1), t0[1]]) == 1
        assert launch(g0=[g0[0], off(g0[1], 1)]) == 1
        assert launch(low=[low[0], off(low[1], 1)]) == 1
        assert launch(p=[torch.randn(37).to(pdt)], t0=[torch.randn(37)], g0=[torch.randn(37).to(pdt)],
                      g1=[torch.randn(37).to(pdt)]) == 1                           # numel: no 16-byte multiple
        # the per-call lists of one plan: the hint follows each call's addresses, including back to aligned
        plan = X.ExtrapolationPlan(p, t0, "per_call", grads_are_param_dtype=True, backend="triton")
        for a0, a1, w in ((0, 0, want), (0, 1, 1), (0, 0, want), (1, 0, 1), (0, 0, want)):
            seen.clear()
            plan([off(g, a1) for g in g1], g0=[off(g, a0) for g in g0], alpha=0.5, K=5)
            assert seen == [w], (pdt, a0, a1, seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grads,inactive", [(True, None), (True, 1e-2), (False, None)])
def test_triton_chunks_of_several_blocks(monkeypatch, dtype, grads, inactive):
    """The GPU's launch shape, scaled down: chunks of several blocks and fewer programs than chunks, so a program
    walks full chunks (unmasked blocks) and each tensor's last, ragged chunk (masked blocks). The interpreter's own
    configuration (one block per chunk) never runs a second block of a chunk."""
    from gxpo_kernels.ops.extrapolate import op
    monkeypatch.setattr(op, "_launch_config", lambda device: (128, 512, 3))   # BLOCK, CHUNK, max programs
    shapes = [(1537,), (512,), (3, 170), (1,), (0,), (2, 1024), (5,)]
    p, t0, g0, g1 = _make(dtype, shapes=shapes, seed=3)
    g0[5].view(-1)[700] = float("nan")          # counted as non-finite, in a full chunk
    if not grads:
        g0 = g1 = None
    lowp = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    rp, rl = _clone(p), _clone(lowp)
    kw = dict(alpha=0.5, K=5, clip_coef0=0.7, clip_coef1=0.9, inactive_threshold=inactive)
    out = extrapolate_(p, t0, g0, g1, lowp_out=lowp, backend="triton", **kw)
    ref = extrapolate_(rp, t0, g0, g1, lowp_out=rl, backend="torch", **kw)
    ok = ~torch.isnan(ref)   # the NaN makes ĝ0's sums NaN: those are compared as NaN
    ref_s, out_s = torch.where(ok, ref, 0), torch.where(ok, out, 0)
    _check("params", rp, p, ref_s, out_s, dtype)
    _check("lowp", rl, lowp, ref_s, out_s, torch.bfloat16)
    assert torch.equal(torch.isnan(out), ~ok)
    d = stats_to_dict(out)
    assert d["numel"] == sum(math.prod(s) for s in shapes) and d["n_nonfinite"] == (1 if grads else 0)
    if inactive is not None:
        assert d["n_inactive"] == stats_to_dict(ref)["n_inactive"] > 0


def test_stats_to_dict_refuses_a_vector_of_another_length():
    """zip paired the names with whatever came: a short vector lost the last statistics (a KeyError much later,
    or a max scale read as a count), a (2, n) stack paired names with rows."""
    st = extrapolate_(*_make(torch.float32, shapes=[(37,)]), alpha=0.5, K=5, backend="torch")
    assert stats_to_dict(st)["numel"] == 37
    for bad in (st[:-1], torch.stack([st, st]), st.tolist()):
        with pytest.raises(ValueError, match="stats must be"):
            stats_to_dict(bad)


def test_huge_K_is_refused_everywhere():
    """K above MAX_K (256) is refused by extrapolate_ and by GXPO: K = 2**40 used to run for ever (the Horner
    loop runs K - 1 times per element; the Triton kernel unrolls it at compile time). K = MAX_K still runs."""
    from gxpo_kernels import GXPO
    from gxpo_kernels.ops.extrapolate.reference import MAX_K
    p = [torch.randn(5)]
    t0, g0, g1 = [p[0] + 0.1], [torch.randn(5)], [torch.randn(5)]
    for K in (MAX_K + 1, 2 ** 40):
        with pytest.raises(ValueError, match=rf"K must be an int in \[2, {MAX_K}\]"):
            extrapolate_(p, t0, g0, g1, alpha=0.5, K=K, backend="torch")
        with pytest.raises(ValueError, match=rf"K must be .*\[2, {MAX_K}\]"):
            GXPO(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), K=K)
    for backend in ("torch", "cpp"):
        q = [p[0].clone()]
        extrapolate_(q, t0, g0, g1, alpha=0.5, K=MAX_K, backend=backend)
        assert torch.isfinite(q[0]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("ldt", [torch.bfloat16, torch.float16])
def test_nonfinite_count_at_the_exact_16bit_overflow_bound(backend, ldt):
    """The largest finite value plus half an ulp rounds to inf (ties to even); one float32 ulp below it stays
    finite. A plain move with alpha=1 from θ0 = 0 writes θ2 itself, so the copies hold exactly these values."""
    top = torch.tensor(torch.finfo(ldt).max, dtype=torch.float64)
    at = top + 2.0 ** math.floor(math.log2(top)) * torch.finfo(ldt).eps / 2          # max + half an ulp
    at = at.float()
    below = torch.nextafter(at, torch.tensor(0.0))
    x = torch.stack([at, below, -at, -below, torch.tensor(1.0), torch.tensor(float("inf"))])
    p, t0 = [x.clone()], [torch.zeros_like(x)]
    low = [torch.empty(x.shape, dtype=ldt)]
    st = stats_to_dict(extrapolate_(p, t0, None, None, alpha=1.0, K=5, lowp_out=low, backend=backend))
    if not (backend == "triton" and ldt == torch.bfloat16 and triton_interpret()):  # its bf16 cast truncates
        assert torch.equal(low[0].float().isfinite(), torch.tensor([False, True, False, True, True, False]))
    assert st["n_nonfinite"] == 3          # the count is the kernel's own bound check, also in the interpreter


def _two_group_lists(seed):
    """fp32 and bf16 params (two dtype groups of the Triton launch, interleaved), lowp_out, gradients."""
    shapes, dts = [(37,), (5, 11), (301,), (1,)], [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)]
    t0 = [torch.randn(s, generator=g) for s in shapes]
    g0 = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)]
    g1 = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)]
    lowp = [torch.zeros(s, dtype=torch.float16) for s in shapes]
    return p, t0, g0, g1, lowp


@pytest.mark.parametrize("where", ["call_offsets", "out_buffer"])
def test_triton_failure_before_the_last_launch_leaves_every_tensor_as_it_was(monkeypatch, where):
    """A failure while preparing a later dtype group's launch (an allocation: torch.OutOfMemoryError caught by
    a training loop that skips the batch; a misaligned gradient list found by its offsets) used to come after the
    earlier groups' launches had moved their params: some tensors held θ̃, the others θ2. Every group is now
    prepared before the first launch; and the next call gives what a fresh process gives."""
    from collections import OrderedDict

    from gxpo_kernels.ops.extrapolate import op
    monkeypatch.setattr(op, "_LAYOUTS", OrderedDict())
    p, t0, g0, g1, lowp = _two_group_lists(5)
    before, lowp_before = _clone(p), _clone(lowp)
    kw = dict(alpha=0.5, K=5, clip_coef0=0.8, inactive_threshold=1e-2, backend="triton")
    calls = []
    if where == "call_offsets":
        real = op._Plan._call_offsets

        def fail_second(self, *a):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("injected")
            return real(self, *a)
        monkeypatch.setattr(op._Plan, "_call_offsets", fail_second)
    else:
        real = torch.empty

        def fail_second(*a, **k):
            if k.get("dtype") == torch.float64 and len(a) == 1 and len(a[0]) == 2 and a[0][1] == 12:
                calls.append(1)   # a launch's (grid, 12) statistics buffer
                if len(calls) == 2:
                    raise torch.OutOfMemoryError("injected")
            return real(*a, **k)
        monkeypatch.setattr(torch, "empty", fail_second)
    with pytest.raises(torch.OutOfMemoryError):
        extrapolate_(p, t0, g0, g1, lowp_out=lowp, **kw)
    assert len(calls) == 2
    for a, b in zip(before + lowp_before, p + lowp):
        assert torch.equal(a, b)
    monkeypatch.undo()
    out = extrapolate_(p, t0, g0, g1, lowp_out=lowp, **kw)          # the same lists, the cached layout
    fp, _, _, _, fl = _two_group_lists(5)
    monkeypatch.setattr(op, "_LAYOUTS", OrderedDict())              # as a fresh process
    ref = extrapolate_(fp, t0, g0, g1, lowp_out=fl, **kw)
    assert torch.equal(out, ref)
    for a, b in zip(fp + fl, p + lowp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_triton_failed_later_launch_names_the_moved_params(monkeypatch, exc):
    """A launch that fails after another group's launch wrote (a compile error, an interrupt during the first
    call's JIT compilation) cannot be undone without a copy of θ2: the exception keeps its type and says which
    params hold θ̃."""
    from gxpo_kernels.ops.extrapolate import op
    p, t0, g0, g1, lowp = _two_group_lists(6)
    before = _clone(p)
    monkeypatch.setattr(op, "_extrapolate_kernel", FailOnUse(op._extrapolate_kernel, 2, exc))
    with pytest.raises(exc) as info:
        extrapolate_(p, t0, g0, g1, lowp_out=lowp, alpha=0.5, K=5, backend="triton")
    moved = [i for i, (a, b) in enumerate(zip(before, p)) if not torch.equal(a, b)]
    assert moved == [0, 2]   # the fp32 group, launched first
    assert "indices [0, 2] were already overwritten" in "".join(getattr(info.value, "__notes__", []))


def test_torch_backend_failure_mid_loop_names_the_moved_params(monkeypatch):
    """The reference loop (``backend="torch"``, and the CPU fallback without a compiler) writes each tensor once
    its own temporaries exist: an allocation failing at a later tensor leaves the earlier ones moved. The
    exception keeps its type and names them; the next call gives the reference result."""
    from gxpo_kernels.ops.extrapolate import reference
    p, t0, g0, g1, lowp = _two_group_lists(7)
    before = _clone(p)
    monkeypatch.setattr(reference, "retention_scale", FailOnUse(reference.retention_scale, 3))
    with pytest.raises(torch.OutOfMemoryError) as info:
        extrapolate_(p, t0, g0, g1, lowp_out=lowp, alpha=0.5, K=5, backend="torch")
    assert [i for i, (a, b) in enumerate(zip(before, p)) if not torch.equal(a, b)] == [0, 1]
    assert "failed at params[2] after params (and lowp_out) at indices [0, 1]" in "".join(info.value.__notes__)


def test_dtype_code_table_is_not_left_half_filled(monkeypatch):
    """The records' dtype-code table is read from the C++ extension on first use. An exception while it was
    being read (an interrupt) used to leave it with the codes read so far: every later call with gradients of
    another dtype then raised "the per-call gradient checks refused lists ..." for the rest of the process."""
    from collections import OrderedDict

    from gxpo_kernels.ops.extrapolate import _cpp, op
    mod = _cpp.load_extension()
    if mod is None or getattr(mod, "tensor_records", None) is None:
        pytest.skip("no C++ compiler: no records")
    n = []

    class Failing:
        def tensor_records(self, ts, *a):
            n.append(1)
            if len(n) == 2:
                raise KeyboardInterrupt
            return mod.tensor_records(ts, *a)
    monkeypatch.setattr(op, "_CODES", {})
    monkeypatch.setattr(op, "_CODE_OF", {})
    monkeypatch.setattr(op, "_LAYOUTS", OrderedDict())
    monkeypatch.setattr(_cpp, "load_extension", lambda: Failing())
    with pytest.raises(KeyboardInterrupt):
        op._record_reader()
    monkeypatch.setattr(_cpp, "load_extension", lambda: mod)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        p, t0, g0, g1 = _make(dtype, seed=9)
        rp = _clone(p)
        for _ in range(2):   # the second call re-checks the cached layout from its records
            out = extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, backend="torch")
            ref = extrapolate_ref_(rp, t0, g0, g1, alpha=0.5, K=5)
            assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(p, rp))


def _plan_case(per_call, promise):
    """A prepared Triton plan and its lists; skipped without the C++ extension (the plan then checks only the
    count and the addresses of the per-call lists, as documented)."""
    from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan, _record_reader
    if _record_reader() is None:
        pytest.skip("no C++ compiler: the plan's per-call checks need tensor_records")
    shapes = [(37,), (0,), (64, 3), (1030,)]
    p, t0, g0, g1 = _make(torch.float32, shapes=shapes, seed=3)
    plan = ExtrapolationPlan(p, t0, "per_call" if per_call else g0, backend="triton", grads_are_param_dtype=promise)
    return plan, p, t0, g0, g1, (dict(g0=g0) if per_call else {})


@pytest.mark.parametrize("per_call", [False, True])
@pytest.mark.parametrize("bad", ["numel", "strided", "neg", "device"])
def test_prepared_plan_checks_every_gradient_on_every_call(per_call, bad):
    """A prepared (Triton) plan took only the count and the addresses of the gradients on a call: a gradient of
    another numel, a strided or lazily negated one was read as if it were its param's (silently wrong numbers or
    memory past its end). Every call now checks each gradient's numel, contiguity, neg bit and device (one compiled
    pass per list with the C++ extension): ValueError naming it, nothing written. The first call passes, so the
    plan's cached offsets exist when the bad list comes."""
    plan, p, t0, g0, g1, kw = _plan_case(per_call, True)
    plan(g1, alpha=0.5, K=5, **kw)
    bad_g1 = list(g1)
    if bad == "numel":
        bad_g1[2] = torch.randn(64 * 3 + 1)
    elif bad == "strided":
        bad_g1[2] = torch.randn(3, 64).t()
    elif bad == "neg":
        bad_g1[2] = torch._neg_view(torch.randn(64, 3))
    else:
        bad_g1[2] = torch.randn(64, 3, device="meta")
    before = _clone(p)
    with pytest.raises(ValueError, match=r"g1\[2\]"):
        plan(bad_g1, alpha=0.5, K=5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    if per_call:   # g0 read per call: checked the same way
        with pytest.raises(ValueError, match=r"g0\[2\]"):
            plan(g1, alpha=0.5, K=5, g0=bad_g1)


@pytest.mark.parametrize("per_call", [False, True])
def test_prepared_plan_reads_a_gradient_of_another_dtype_despite_the_promise(per_call):
    """``grads_are_param_dtype=True`` (the update rules' plans) skipped the dtype scan: a bfloat16 gradient of a
    float32 param, at the addresses of the previous call's float32 one (the cached offsets) or at new ones, was
    read as float32 (silently wrong). The per-call check sees every dtype; such a list is read from copies."""
    plan, p, t0, g0, g1, kw = _plan_case(per_call, True)
    raw = torch.zeros(4 * 1030, dtype=torch.uint8)         # an fp32 view, then a bf16 view at the same address
    for view in (raw.view(torch.float32), raw[:2 * 1030].view(torch.bfloat16), torch.randn(1030).bfloat16()):
        view.copy_(torch.randn(1030))
        g1 = g1[:3] + [view]
        before = _clone(p)
        st = plan(g1, alpha=0.5, K=5, **kw)
        ref = extrapolate_(before, t0, g0, g1, alpha=0.5, K=5, backend="torch")
        _check(f"g1[3] {view.dtype}", before, p, ref, st, torch.float32)


def test_grad_offsets_reads_what_tensor_records_reads():
    """The C++ extension's ``grad_offsets`` (a one-dtype-group plan's per-call checks and offsets in one pass) gives
    the addresses ``tensor_records`` gives, their bitwise OR, and offsets from each list's first tensor in its
    element size (negative ones too: tensors below the first); None for a list that fails any check, so that the
    caller's Python-level checks name it."""
    import numpy as np

    from gxpo_kernels.ops.extrapolate import _cpp, op
    mod, rd = _cpp.load_extension(), op._record_reader()
    if mod is None or rd is None:
        pytest.skip("no C++ compiler")
    for dt in (torch.float32, torch.bfloat16):
        buf = torch.zeros(4000, dtype=dt)
        shapes = [(37,), (0,), (5, 13), (1,)]
        lists = [[buf[o:o + math.prod(s)].view(s) for o, s in zip(offs, shapes)]
                 for offs in ((900, 40, 100, 3), (2000, 1500, 1210, 2999))]
        tails = [rd(ts, False)[8 * len(shapes):] for ts in lists]
        offs = torch.full((2, len(shapes)), -7, dtype=torch.int64)
        ptrs, low = mod.grad_offsets(lists, tails, offs)
        a = np.frombuffer(ptrs, np.int64).reshape(2, -1)
        assert ptrs == rd(lists[0], False)[:8 * len(shapes)] + rd(lists[1], False)[:8 * len(shapes)]
        assert low == int(np.bitwise_or.reduce(a, axis=None))
        assert offs.tolist() == ((a - a[:, :1]) // buf.element_size()).tolist()
        assert offs[0, 1] < 0
        other = torch.float64 if dt == torch.float32 else torch.float32
        for bad in (torch.zeros(38, dtype=dt), torch.zeros(74, dtype=dt)[::2], torch.zeros(37, dtype=other),
                    torch._neg_view(torch.zeros(37, dtype=dt)), torch.zeros(37, dtype=dt, device="meta"), 1.0):
            assert mod.grad_offsets([lists[0], [bad] + lists[1][1:]], tails, offs) is None
        assert mod.grad_offsets([lists[0], tuple(lists[1][:3])], tails, offs) is None   # one tensor short
