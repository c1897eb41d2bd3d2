"""Rows that start past the 2^31-th element of the logits buffer, on the CPU.

A kernel that forms a row's address in 32-bit integers (program id times row stride) reads the wrong row once
the offset passes 2^31 elements, which on a GPU happens from N x V > 2^31 logits (e.g. 14,135 rows at
V = 151,936). The Triton interpreter keeps Triton's integer types (an int32 product wraps around, as on the
GPU), so the address arithmetic can be checked here without a GPU and without the memory: the logits are a
strided view of an allocation that is never touched except at its three rows (the OS commits only the pages
that are written), row t starting at t * (2^30 + 64) elements, so the last row starts at 2^31 + 128. The view
itself starts 2^31 elements into the allocation, so that a wrapped-around row address (2^32 elements too low)
still points into it and the op returns wrong numbers rather than crashing the test process. That is 8 GiB of
address space for a 2-byte dtype (16 GiB for fp32, more than some machines grant, so fp32 is not run: the
address arithmetic is the same code, in elements, for every dtype).
Each op must give what it gives on a compact copy of the same rows; the GPU check repeats this at real sizes
(bench/gpu/correctness.py)."""
import pytest
import torch

from gxpo_kernels.ops import fpa_logprobs, grpo_loss, token_logprobs
from gxpo_kernels.ops.logprobs.kernel import token_logprobs_bwd, token_logprobs_fwd
from gxpo_kernels._utils import triton_interpret

pytestmark = pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1 (CPU) for Triton")

V = 1000
ROW = 2 ** 30 + 64            # row stride in elements: row 2 starts at 2^31 + 128
LEAD = 2 ** 31                # elements before the view (see the module docstring)
DTYPES = [torch.bfloat16, torch.float16]


def _far_rows(dtype, seed):
    """(1, 3, V) logits whose rows lie ROW elements apart in one large, mostly untouched allocation, and a compact
    copy of the same values."""
    g = torch.Generator().manual_seed(seed)
    vals = (torch.randn(1, 3, V, generator=g) * 3).to(dtype)
    base = torch.empty(LEAD + 2 * ROW + V, dtype=dtype)
    far = base.as_strided((1, 3, V), (3 * ROW, ROW, 1), LEAD)
    far.copy_(vals)
    assert far.stride(1) * 2 >= 2 ** 31
    return far, vals.clone(), g


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_rows_past_2_31(dtype):
    far, near, g = _far_rows(dtype, 0)
    tok = torch.randint(0, V, (1, 3), generator=g)
    mask = torch.tensor([[True, False, True]])
    for m in (None, mask):
        lp, ent, lse = token_logprobs_fwd(far, tok, m, 0.9, True, "triton")
        lp0, ent0, lse0 = token_logprobs_fwd(near, tok, m, 0.9, True, "triton")
        assert torch.equal(lp, lp0) and torch.equal(ent, ent0) and torch.equal(lse, lse0)
        dlogp, dent = torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g)
        want = token_logprobs_bwd(near, tok, m, lse0, ent0, dlogp, dent, 0.9, False, "triton")
        got = token_logprobs_bwd(far, tok, m, lse, ent, dlogp, dent, 0.9, False, "triton")
        assert torch.equal(got, want)
        # in place: d(logits) is written through the same far row addresses
        out = token_logprobs_bwd(far, tok, m, lse, ent, dlogp, dent, 0.9, True, "triton")
        assert out.data_ptr() == far.data_ptr() and torch.equal(far, want)
        far.copy_(near)   # restore the logits for the next mask case


@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_loss_rows_past_2_31(dtype):
    far, near, g = _far_rows(dtype, 1)
    tok = torch.randint(0, V, (1, 3), generator=g)
    adv = torch.randn(1, generator=g)
    old = -torch.rand(1, 3, generator=g) * 5
    res = []
    for x in (far, near):
        x.requires_grad_(True)
        loss, metrics = grpo_loss(x, tok, adv, None, old, backend="triton", beta=0.0)
        loss.backward()
        res.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}, x.grad))
    (l1, m1, g1), (l0, m0, g0) = res
    assert torch.equal(l1, l0) and torch.equal(g1, g0)
    assert m1.keys() == m0.keys() and all(torch.equal(m1[k], m0[k]) for k in m0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fpa_logprobs_rows_past_2_31(dtype):
    far, near, g = _far_rows(dtype, 2)
    ref_far, ref_near, _ = _far_rows(dtype, 3)
    tok = torch.randint(0, V, (1, 3), generator=g)
    dlogp = torch.randn(1, 3, generator=g)
    _assert_fpa_same(((far, ref_far), (near, ref_near)), tok, dlogp)


def _assert_fpa_same(inputs, tok, dlogp):
    """``fpa_logprobs``' outputs and d(logits) are bit for bit the same on the two (logits, ref) pairs."""
    res = []
    for x, r in inputs:
        x.requires_grad_(True)
        out = fpa_logprobs(x, r, tok, 0.7, 0.9, backend="triton")
        (out[0] * dlogp).sum().backward()
        res.append(([o.detach() for o in out], x.grad))
    (o1, g1), (o0, g0) = res
    assert all(torch.equal(a, b) for a, b in zip(o1, o0)) and torch.equal(g1, g0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fpa_logprobs_time_slice_batch_rows_past_2_31(dtype):
    """The Triton forward reads a time slice such as ``logits[:, :-1]`` in place, in one launch: row (b, t) of
    each tensor at (b * rows_b + t) * stride. Here batch row 1 of the policy slice starts past the 2^31-th element
    (rows_b * stride > 2^31, each factor below it) and the reference logits are contiguous (other row strides):
    the outputs and d(logits) must be those of a compact copy (an int32 batch index wraps around)."""
    g = torch.Generator().manual_seed(7)
    vals = (torch.randn(2, 2, V, generator=g) * 3).to(dtype)
    ref = (torch.randn(2, 2, V, generator=g) * 3).to(dtype)
    tok = torch.randint(0, V, (2, 2), generator=g)
    dlogp = torch.randn(2, 2, generator=g)
    rows_b = 2 ** 31 // V + 1
    base = torch.empty(LEAD + rows_b * V + 3 * V, dtype=dtype)
    full = base.as_strided((2, 3, V), (rows_b * V, V, 1), LEAD)
    far = full[:, :-1]
    far.copy_(vals)
    assert far.stride(0) >= 2 ** 31 and not far.is_contiguous()
    _assert_fpa_same(((far, ref), (vals.clone(), ref)), tok, dlogp)


def test_token_logprobs_public_op_rows_past_2_31():
    far, near, g = _far_rows(torch.bfloat16, 4)
    tok = torch.randint(0, V, (1, 3), generator=g)
    a = token_logprobs(far, tok, 1.3, backend="triton")
    b = token_logprobs(near, tok, 1.3, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _far_matrix(vals):
    """A (rows, H) view of ``vals`` whose rows lie ROW elements apart, starting LEAD elements into an allocation."""
    rows, H = vals.shape
    base = torch.empty(LEAD + (rows - 1) * ROW + H, dtype=vals.dtype)
    far = base.as_strided((rows, H), (ROW, 1), LEAD)
    far.copy_(vals)
    return far


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_fused_head_rows_past_2_31(which):
    # the fused-linear kernels address hidden rows as row * stride_h and weight rows as row * stride_w
    from gxpo_kernels.ops.fused_head.engine import linear_token_stats_bwd, linear_token_stats_fwd, make_head_config
    g = torch.Generator().manual_seed(5)
    H, N, Vh = 40, 3, 3
    h = (torch.randn(N, H, generator=g)).to(torch.bfloat16)
    w = (torch.randn(Vh, H, generator=g) * 0.5).to(torch.bfloat16)
    y = torch.randint(0, Vh, (N,), generator=g)
    dlogp, dent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    cfg = make_head_config(h.device, "triton", False, False, None)
    far_h, far_w = (_far_matrix(h), w) if which == "hidden" else (h, _far_matrix(w))
    assert (far_h if which == "hidden" else far_w).stride(0) * 2 >= 2 ** 31
    want = linear_token_stats_fwd(h, w, None, y, 1 / 0.9, cfg)
    got = linear_token_stats_fwd(far_h, far_w, None, y, 1 / 0.9, cfg)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    lse, ent, _ = want
    need = (True, True, False)
    gw = linear_token_stats_bwd(h, w, None, y, lse, ent, dlogp, dent, 1 / 0.9, cfg, need)
    gg = linear_token_stats_bwd(far_h, far_w, None, y, lse, ent, dlogp, dent, 1 / 0.9, cfg, need)
    assert torch.equal(gg[0], gw[0]) and torch.equal(gg[1], gw[1])


def test_extrapolate_tensors_past_2_31():
    # extrapolate_'s Triton kernel reads each tensor of a dtype group at an element offset from the group's first
    # tensor: here params[1] lies 2^31 + 64 elements after params[0] in one allocation
    from gxpo_kernels.ops import extrapolate_
    g = torch.Generator().manual_seed(6)
    n0, n1 = 1000, 2048
    D = 2 ** 31 + 64
    base = torch.empty(LEAD + D + n1, dtype=torch.bfloat16)
    far = [base[LEAD:LEAD + n0], base[LEAD + D:LEAD + D + n1]]
    vals = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (n0, n1)]
    near = [v.clone() for v in vals]
    for f, v in zip(far, vals):
        f.copy_(v)
    theta0 = [v.float() + 0.05 * torch.randn(v.numel(), generator=g) for v in vals]
    g0 = [torch.randn(v.numel(), generator=g).to(torch.bfloat16) for v in vals]
    g1 = [(0.5 * x.float() + 0.3 * torch.randn(x.numel(), generator=g)).to(torch.bfloat16) for x in g0]
    kw = dict(alpha=0.5, K=5, backend="triton")
    s_far = extrapolate_(far, theta0, g0, g1, **kw)
    s_near = extrapolate_(near, theta0, g0, g1, **kw)
    assert torch.equal(s_far, s_near)
    assert all(torch.equal(f, m) for f, m in zip(far, near)) and not torch.equal(near[1], vals[1])
