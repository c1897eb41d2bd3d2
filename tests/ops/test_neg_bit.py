"""Inputs with a pending negation (``is_neg()``: ``torch._neg_view(x)``, ``z.conj().imag``) are contiguous tensors
whose memory holds the un-negated values. Ops that hand raw memory to Triton or C++ must resolve them (read-only
inputs: the same results as on ``resolve_neg()``'d inputs) or refuse them (tensors written in place)."""
import pytest
import torch

from gxpo_kernels.ops.extrapolate import op as xop
from gxpo_kernels.ops.extrapolate._cpp import load_extension
from gxpo_kernels.ops.extrapolate.op import ExtrapolationPlan, extrapolate_
from gxpo_kernels.ops.fpa.kernel import fpa_logprobs_fwd
from gxpo_kernels.ops.fpa.linear import linear_fpa_logprobs, linear_fpa_stats_fwd
from gxpo_kernels.ops.fused_head.engine import linear_token_stats_bwd, linear_token_stats_fwd, make_head_config
from gxpo_kernels.ops.fpa.logprobs import fpa_logprobs
from gxpo_kernels.ops.grpo.linear import linear_grpo_loss
from gxpo_kernels.ops.grpo.op import grpo_loss
from gxpo_kernels.ops.logprobs.kernel import token_logprobs_bwd, token_logprobs_fwd
from gxpo_kernels.ops.logprobs.linear import linear_token_logprobs
from gxpo_kernels.ops.logprobs.op import token_logprobs
from gxpo_kernels.update.base import _copy_all_

B, T, V, H = 2, 5, 37, 24
DTYPES = [torch.float32, torch.bfloat16]


def neg_view(x: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``x`` whose memory holds ``-x`` and whose neg bit is set (contiguous, like ``x``)."""
    v = torch._neg_view(x.detach().neg())
    assert v.is_neg() and v.is_contiguous() and torch.equal(v, x.detach())
    return v.requires_grad_(x.requires_grad)


def _inputs(dtype):
    g = lambda *s, dt=dtype: torch.randn(*s, dtype=dt)  # noqa: E731
    return dict(
        logits=g(B, T, V), ref_logits=g(B, T, V), tokens=torch.randint(0, V, (B, T)),
        mask=(torch.rand(B, T) > 0.3).float(), advantages=g(B, dt=torch.float32),
        old_logprobs=-torch.rand(B, T) * 3, ref_logprobs=-torch.rand(B, T) * 3,
        hidden=g(B, T, H), weight=g(V, H) / 4, bias=g(V), ref_hidden=g(B, T, H), ref_weight=g(V, H) / 4,
        ref_bias=g(V))


_GRAD = ("logits", "hidden", "weight", "bias")
_CASES = {
    "token_logprobs": (lambda a, bk: token_logprobs(a["logits"], a["tokens"], 0.9, mask=a["mask"], backend=bk),
                       ("logits", "tokens", "mask")),
    "grpo_loss": (lambda a, bk: grpo_loss(a["logits"], a["tokens"], a["advantages"], a["mask"], a["old_logprobs"],
                                          a["ref_logprobs"], beta=0.1, entropy_coef=0.01, backend=bk),
                  ("logits", "tokens", "advantages", "mask", "old_logprobs", "ref_logprobs")),
    "linear_token_logprobs": (lambda a, bk: linear_token_logprobs(a["hidden"], a["weight"], a["tokens"], 0.9,
                                                                  bias=a["bias"], mask=a["mask"], backend=bk),
                              ("hidden", "weight", "bias", "tokens", "mask")),
    "linear_grpo_loss": (lambda a, bk: linear_grpo_loss(a["hidden"], a["weight"], a["tokens"], a["advantages"],
                                                        a["mask"], a["old_logprobs"], bias=a["bias"],
                                                        entropy_coef=0.01, backend=bk),
                         ("hidden", "weight", "bias", "advantages", "old_logprobs")),
    "linear_grpo_loss_gif": (lambda a, bk: linear_grpo_loss(a["hidden"], a["weight"], a["tokens"], a["advantages"],
                                                            a["mask"], bias=a["bias"], grad_in_forward=True,
                                                            backend=bk),
                             ("hidden", "weight", "bias", "tokens")),
    "fpa_logprobs": (lambda a, bk: fpa_logprobs(a["logits"], a["ref_logits"], a["tokens"], 0.7, 0.9,
                                                mask=a["mask"] > 0, backend=bk),
                     ("logits", "ref_logits", "tokens")),
    "linear_fpa_logprobs": (lambda a, bk: linear_fpa_logprobs(a["hidden"], a["weight"], a["ref_hidden"],
                                                              a["ref_weight"], a["tokens"], 0.7, bias=a["bias"],
                                                              ref_bias=a["ref_bias"], mask=a["mask"] > 0,
                                                              backend=bk),
                            ("hidden", "weight", "ref_hidden", "ref_weight", "bias", "ref_bias", "tokens")),
}
_PARAMS = [(op, arg) for op, (_, args) in _CASES.items() for arg in args]


def _run(op, inputs, backend):
    """The op's outputs (flattened to tensors) and the gradients of its differentiable inputs."""
    out = _CASES[op][0](inputs, backend)
    flat = [t for t in out if isinstance(t, torch.Tensor)] + \
           [v for t in out if isinstance(t, dict) for v in t.values()]
    leaves = [inputs[k] for k in _GRAD if k in inputs and inputs[k].requires_grad]
    loss = sum((t.float() * (k + 1)).sum() for k, t in enumerate(flat) if t.requires_grad)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if torch.is_tensor(loss) else []
    return [t.detach() for t in flat] + [g for g in grads if g is not None]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,arg", _PARAMS)
def test_negated_input_reads_its_values(op, arg, dtype, backend):
    """Forward outputs and gradients with ``arg`` a negated view equal those with the same values resolved."""
    base = _inputs(dtype)
    for k in _GRAD:
        base[k].requires_grad_(True)
    ref = _run(op, dict(base), backend)
    got = _run(op, {**base, arg: neg_view(base[arg])}, backend)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_launchers_resolve_negated_inputs(dtype):
    """The host launchers themselves (reached without the registered op's dispatcher) read the values."""
    a = _inputs(dtype)
    m = a["mask"] > 0
    logp, ent, lse = token_logprobs_fwd(a["logits"], a["tokens"], m, 0.9)
    got = token_logprobs_fwd(neg_view(a["logits"]), neg_view(a["tokens"]), m, 0.9)
    for g, r in zip(got, (logp, ent, lse)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    ref = token_logprobs_bwd(a["logits"], a["tokens"], m, lse, ent, dlogp, dent, 0.9)
    got = token_logprobs_bwd(neg_view(a["logits"]), a["tokens"], m, neg_view(lse), neg_view(ent), neg_view(dlogp),
                             neg_view(dent), 0.9)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # in place into a negated logits: the launcher writes into a copy (returned) rather than the raw memory
    x = neg_view(a["logits"])
    out = token_logprobs_bwd(x, a["tokens"], m, lse, ent, dlogp, dent, 0.9, inplace=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_and_fpa_launchers_resolve_negated_inputs(dtype):
    """The fused-head and FPA host launchers read values, whatever calls them."""
    a = _inputs(dtype)
    h, hr, y = a["hidden"].flatten(0, 1), a["ref_hidden"].flatten(0, 1), a["tokens"].flatten()
    cfg = make_head_config(h.device, "triton", False, False, None)
    heads = (h, a["weight"], a["bias"], hr, a["ref_weight"], a["ref_bias"], y)
    ref = linear_fpa_stats_fwd(*heads, 1.1, 0.7, cfg)
    got = linear_fpa_stats_fwd(*map(neg_view, heads), 1.1, 0.7, cfg)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    lse, ent, logp = linear_token_stats_fwd(*heads[:3], y, 1.1, cfg)
    got = linear_token_stats_fwd(*map(neg_view, heads[:3]), neg_view(y), 1.1, cfg)
    for g, r in zip(got, (lse, ent, logp)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    dlogp, dent = torch.randn_like(lse), torch.randn_like(lse)
    ref = linear_token_stats_bwd(*heads[:3], y, lse, ent, dlogp, dent, 1.1, cfg, (True, True, True))
    got = linear_token_stats_bwd(*map(neg_view, (*heads[:3], y, lse, ent, dlogp, dent)), 1.1, cfg,
                                 (True, True, True))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    x, r3 = a["logits"], a["ref_logits"]
    m = (a["mask"] > 0).flatten()
    ref = fpa_logprobs_fwd(x, r3, y, m, 0.7, 0.9, "triton")
    got = fpa_logprobs_fwd(neg_view(x), neg_view(r3), neg_view(y), m, 0.7, 0.9, "triton")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_inplace_backward_of_negated_logits(dtype):
    """``inplace_backward`` on a negated (non-leaf) logits view: the gradient of the leaf is right."""
    leaf = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    grads = []
    for neg in (False, True):
        x = leaf * 1
        x = torch._neg_view(torch._neg_view(x).resolve_neg()) if neg else x   # the values of x, neg bit set
        assert x.is_neg() == neg
        logp, ent = token_logprobs(x, tokens, inplace_backward=True, backend="triton")
        grads.append(torch.autograd.grad((logp + 0.3 * ent).sum(), leaf)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ extrapolate_
_XARGS = ("params", "theta0", "g0", "g1", "lowp_out")
_XBACKENDS = ["torch", "triton"] + (["cpp"] if load_extension() is not None else [])


def _xlists(dtype, sizes=(7, 1, 33)):
    mk = lambda: [torch.randn(n, dtype=dtype) for n in sizes]  # noqa: E731
    return dict(params=mk(), theta0=mk(), g0=mk(), g1=mk(), lowp_out=[torch.empty(n, dtype=torch.bfloat16)
                                                                      for n in sizes])


def _xcall(lists, backend):
    return extrapolate_(lists["params"], lists["theta0"], lists["g0"], lists["g1"], lowp_out=lists["lowp_out"],
                        alpha=0.5, K=5, backend=backend)


def test_extrapolate_reported_case():
    """A one-element contiguous negated view (``z.conj().imag``) as g1: refused, not read as +2."""
    v = torch.tensor([1 + 2j]).conj().imag
    assert v.is_neg() and v.is_contiguous()
    for bk in _XBACKENDS:
        p = [torch.zeros(1)]
        with pytest.raises(ValueError, match=r"g1\[0\] is a lazily negated view"):
            extrapolate_(p, [torch.zeros(1)], [torch.zeros(1)], [v], alpha=0.5, K=5, backend=bk)
        assert torch.equal(p[0], torch.zeros(1))


@pytest.mark.parametrize("backend", _XBACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arg", _XARGS)
def test_extrapolate_refuses_negated_views(arg, dtype, backend):
    """Any list entry with a neg bit is refused by name and nothing is written, whether the layout is new or
    cached (the same tensor becoming a negated view at the same id and address: ``t.data = _neg_view(...)``),
    with the compiled records and with the Python-level checks."""
    for records in (True, False):
        xop._LAYOUTS.clear()
        lists = _xlists(dtype)
        saved = (xop._record_reader, xop._CODES, xop._CODE_OF)
        if not records:
            xop._record_reader = lambda: None
        try:
            _xcall(lists, backend)   # caches the layout
            _xcall(lists, backend)   # (g0/g1 seen twice: watched)
            _xcall(lists, backend)
            t = lists[arg][2]
            addr, ident = t.data_ptr(), id(t)
            t.data.neg_()
            t.data = torch._neg_view(t.data)   # same values, same object, same address, neg bit set
            assert t.is_neg() and t.data_ptr() == addr and id(lists[arg][2]) == ident
            before = [p.clone() for p in lists["params"]] + [x.clone() for x in lists["lowp_out"]]
            with pytest.raises(ValueError, match=rf"{arg}\[2\] is a lazily negated view"):
                _xcall(lists, backend)
            after = lists["params"] + lists["lowp_out"]
            assert all(torch.equal(a, b) for a, b in zip(after, before))
        finally:
            xop._record_reader, xop._CODES, xop._CODE_OF = saved
            xop._LAYOUTS.clear()


@pytest.mark.parametrize("arg", ["params", "theta0", "g0", "lowp_out"])
def test_extrapolation_plan_refuses_negated_views(arg):
    lists = _xlists(torch.float32)
    lists[arg][1] = neg_view(lists[arg][1])
    with pytest.raises(ValueError, match=rf"{arg}\[1\] is a lazily negated view"):
        ExtrapolationPlan(lists["params"], lists["theta0"], lists["g0"], lowp_out=lists["lowp_out"])


@pytest.mark.skipif(load_extension() is None, reason="needs the C++ extension")
def test_extrapolation_plan_cpu_refuses_negated_gradient():
    """The CPU plan calls the C++ op, which checks each tensor per call: a negated g1 is refused."""
    lists = _xlists(torch.float32)
    plan = ExtrapolationPlan(lists["params"], lists["theta0"], lists["g0"], lowp_out=lists["lowp_out"],
                             backend="cpp")
    g1 = list(lists["g1"])
    plan(g1, alpha=0.5, K=5)
    g1[0] = neg_view(g1[0])
    with pytest.raises(RuntimeError, match=r"g1\[0\] is a lazily negated view"):
        plan(g1, alpha=0.5, K=5)


def test_extrapolation_plan_triton_notices_negated_static():
    """The Triton plan's per-call check of its static tensors (``moved``) sees a param turned into a negated view."""
    lists = _xlists(torch.float32)
    plan = ExtrapolationPlan(lists["params"], lists["theta0"], lists["g0"], lowp_out=lists["lowp_out"],
                             backend="triton")
    plan(lists["g1"], alpha=0.5, K=5)
    p = lists["params"][0]
    p.data.neg_()
    p.data = torch._neg_view(p.data)
    with pytest.raises(ValueError, match="moved or changed"):
        plan(lists["g1"], alpha=0.5, K=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["src", "dst"])
def test_snapshot_copy_of_negated_views(side, dtype):
    """The rules' snapshot copy (non-temporal stores in C++ on the CPU) copies a negated source's values, not its
    memory; a negated destination is left to torch's copy, which refuses it (rather than storing raw values)."""
    src = [torch.randn(n, dtype=dtype) for n in (3, 4097, 1)]
    dst = [torch.empty_like(s) for s in src]
    if side == "src":
        src[1] = neg_view(src[1])
        _copy_all_(dst, src, stream=True)
        for d, s in zip(dst, src):
            assert torch.equal(d, s)
    else:
        dst[1] = torch._neg_view(dst[1])
        with pytest.raises(RuntimeError, match="negation"):
            _copy_all_(dst, src, stream=True)
