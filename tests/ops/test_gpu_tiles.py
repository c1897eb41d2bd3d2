"""The Triton kernels at the launch configuration their launchers pick on an sm_90 GPU, run on the CPU.

Under the interpreter the launchers pick small tiles (fast serial programs), so the tiles a GPU runs (BLOCK_V
4096 for the streaming log-prob kernels, 128x128x64 / 128x64x32 for the fused heads, 64x64x32 for the fused FPA
head, vocabulary splits for 132 SMs, extrapolation chunks of 16,384) were only compiled, never checked for
values. Here the launchers are made to answer as on an sm_90 GPU and the outputs and gradients are compared with
float64 references at sizes that leave partial tiles in every dimension. Two interpreter limits remain: dots on
bf16 operands run with the fp32 upcast (the interpreter has no bf16 dot), and the closed-form extrapolation uses
repeated products instead of libdevice ``pow``; bench/gpu/correctness.py checks those on a GPU.
"""
import contextlib
from unittest import mock

import pytest
import torch

import gxpo_kernels.ops.extrapolate.op as X
import gxpo_kernels.ops.fpa.kernel as FK
import gxpo_kernels.ops.fpa.linear as FL
import gxpo_kernels.ops.fused_head.engine as E
import gxpo_kernels.ops.logprobs.kernel as LK
from gxpo_kernels._utils import triton_interpret
from gxpo_kernels.ops import extrapolate_, fpa_logprobs, linear_fpa_logprobs, linear_token_logprobs, stats_to_dict
from gxpo_kernels.ops import token_logprobs
from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_
from gxpo_kernels.ops.fpa.reference import fpa_logprobs_ref
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref

pytestmark = pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1 (CPU) for Triton")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@contextlib.contextmanager
def sm90_launches():
    """Every launcher answers as on an sm_90 GPU (132 SMs); the kernels still run in the interpreter."""
    props = mock.Mock(multi_processor_count=132)
    kernel_flags, splits, xcfg = E._kernel_flags, E.vocab_splits, X._launch_config

    def flags(h, w, cfg):   # the GPU's tiles; fp32 upcast and IEEE dots: the interpreter has no bf16 dot
        _, _, blocks = kernel_flags(h, w, cfg)
        return True, "ieee", blocks

    def cuda_splits(cfg, device, n_mt, n_vt):
        return splits(cfg, torch.device("cuda", 0), n_mt, n_vt)

    def extrapolate_cfg(device):   # (lib_pow stays off: the interpreter has no libdevice)
        with mock.patch.object(X, "triton_interpret", lambda: False):
            return xcfg(torch.device("cuda", 0))

    with contextlib.ExitStack() as st:
        for mod in (E, FL, FK, LK):
            st.enter_context(mock.patch.object(mod, "triton_interpret", lambda: False))
        st.enter_context(mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)))
        st.enter_context(mock.patch("torch.cuda.get_device_properties", return_value=props))
        for mod in (E, FL):
            st.enter_context(mock.patch.object(mod, "_kernel_flags", flags))
            st.enter_context(mock.patch.object(mod, "vocab_splits", cuda_splits))
        st.enter_context(mock.patch.object(X, "_launch_config", extrapolate_cfg))
        yield


def test_the_patch_reaches_the_gpu_configuration():
    """The patched launchers pick the GPU's tiles (else the tests below would check the interpreter's again)."""
    h = torch.empty(1, 8, dtype=torch.bfloat16)
    cfg = mock.Mock(fp32_head=False)
    with sm90_launches():
        assert LK._launch_config(151_936)[0] == 4096 and FK._launch_cfg(151_936)[0] == 4096
        assert E._kernel_flags(h, h, cfg)[2] == E._GPU_BLOCKS[False]
        assert X._launch_config(torch.device("cpu")) == (512, 16384, 8 * 132)
    assert LK._launch_config(151_936)[0] != 4096 and E._kernel_flags(h, h, cfg)[2] == E._INTERP_BLOCKS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [4099, 1500])      # two blocks of 4096 (the second of 3 lanes); one partial block
def test_streaming_logprobs_at_gpu_tiles(dtype, V):
    g = torch.Generator().manual_seed(V)
    N = 5
    x = (torch.randn(1, N, V, generator=g) * 3).to(dtype).requires_grad_()
    tok = torch.randint(0, V, (1, N), generator=g)
    xr = (x.detach().float() + 0.5 * torch.randn(1, N, V, generator=g)).to(dtype)
    w1, w2 = torch.randn(1, N, generator=g, dtype=torch.float64), torch.randn(1, N, generator=g, dtype=torch.float64)
    with sm90_launches():
        lp, ent = token_logprobs(x, tok, 0.9, backend="triton")
        ((lp * w1).sum() + (ent * w2).sum()).backward()
        fpa = fpa_logprobs(x.detach(), xr, tok, 1.0, 0.9, backend="triton")
    xd = x.detach().double().requires_grad_()
    rl, re = token_logprobs_ref(xd, tok, 0.9)
    ((rl * w1).sum() + (re * w2).sum()).backward()
    assert rel(lp, rl) < 1e-6 and rel(ent, re) < 1e-6
    assert rel(x.grad, xd.grad) < (1e-6 if dtype == torch.float32 else 1e-2)
    for a, b in zip(fpa, fpa_logprobs_ref(xd.detach(), xr.double(), tok, 1.0, 0.9)):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [4099, 1500])
def test_fpa_time_slice_at_gpu_tiles(dtype, V):
    """fpa_logprobs on ``logits[:, :-1]`` of (B, T + 1, V) logits and ``ref[:, 2:]`` of (B, T + 2, V) ones (each
    tensor its own batch row stride, one launch), masked rows, at the GPU's BLOCK_V of 4096; the dropped
    position gets no gradient."""
    g = torch.Generator().manual_seed(V)
    B, T = 3, 4
    full = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype).requires_grad_()
    ref_full = (torch.randn(B, T + 2, V, generator=g) * 3).to(dtype)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    with sm90_launches():
        out = fpa_logprobs(full[:, :-1], ref_full[:, 2:], tok, 0.7, 0.9, mask=mask, backend="triton")
        (out[0] * w).sum().backward()
    xd = full.detach()[:, :-1].double().requires_grad_()
    ref = fpa_logprobs_ref(xd, ref_full[:, 2:].double(), tok, 0.7, 0.9, mask=mask)
    (ref[0] * w).sum().backward()
    for a, b in zip(out, ref):
        assert rel(a, b) < 1e-6
    assert rel(full.grad[:, :-1], xd.grad) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert not full.grad[:, -1].any()

@pytest.mark.parametrize("dtype,fp32_head", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.bfloat16, True)])
def test_fused_heads_at_gpu_tiles(dtype, fp32_head):
    """N = 130 (a second, 2-row token tile of 128), H = 200 (a partial K tile of 64 and of 32), V = 301 (a partial
    vocabulary tile), vocabulary splits as for 132 SMs."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 130, 200, 301
    h = (torch.randn(N, H, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    hr = (torch.randn(N, H, generator=g) * 0.5).to(dtype)
    wr = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    tok = torch.randint(0, V, (N,), generator=g)
    w1, w2 = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    with sm90_launches():
        lp, ent = linear_token_logprobs(h, w, tok, 0.9, fp32_head=fp32_head, backend="triton")
        ((lp * w1).sum() + (ent * w2).sum()).backward()
        fpa = linear_fpa_logprobs(h.detach(), w.detach(), hr, wr, tok, 1.0, 0.9, backend="triton")
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rl, re = token_logprobs_ref(hd @ wd.T, tok, 0.9)
    ((rl * w1).sum() + (re * w2).sum()).backward()
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-2     # bf16 gradients are returned in bf16
    assert rel(lp, rl) < 1e-6 and rel(ent, re) < 1e-6
    assert rel(h.grad, hd.grad) < grad_tol and rel(w.grad, wd.grad) < grad_tol
    ref = fpa_logprobs_ref(hd.detach() @ wd.detach().T, hr.double() @ wr.double().T, tok, 1.0, 0.9)
    for a, b in zip(fpa, ref):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("formula", ["horner", "closed"])
def test_extrapolate_at_gpu_chunks(formula):
    """Chunks of 16,384 elements walked by 8 x 132 programs: a tensor of 2 full chunks and a partial one, an odd
    size, an aligned one; against the float64 reference."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2 * 16384 + 37,), (5, 301), (64, 96)]
    p = [torch.randn(s, generator=g) for s in shapes]
    t0 = [x + 0.05 * torch.randn(x.shape, generator=g) for x in p]
    g0 = [torch.randn(s, generator=g) for s in shapes]
    g1 = [0.6 * a + 0.5 * torch.randn(a.shape, generator=g) for a in g0]
    want = [x.double() for x in p]
    extrapolate_ref_(want, [x.double() for x in t0], [x.double() for x in g0], [x.double() for x in g1],
                     alpha=0.5, K=5, scale_formula=formula)
    with sm90_launches():
        st = stats_to_dict(extrapolate_(p, t0, g0, g1, alpha=0.5, K=5, scale_formula=formula, backend="triton"))
    assert st["numel"] == sum(x.numel() for x in p)
    for got, ref in zip(p, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
