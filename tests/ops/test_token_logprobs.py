"""token_logprobs (the streaming vocabulary pass under grpo_loss): Triton (interpreter) and torch backends.

Guards: logp / entropy / dlogits against the float64 reference for V not a power of two, multi-block online
softmax, strided logits slices, ragged masks with a fully masked row, fp32 and bf16, temperature != 1; the
entropy term of the backward is skipped when unused; in-place backward reuses the logits buffer; no_grad
saves nothing; a new T or temperature never re-specialises the kernels; the torch.library ops pass opcheck;
-inf logits are probability 0 and a NaN logit makes its row NaN (masked rows untouched), as in the torch path.
"""
import importlib
import math

import pytest
import torch
from _utils import FailOnUse, assert_close

from gxpo_kernels.ops import token_logprobs
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref

TL = importlib.import_module("gxpo_kernels.ops.logprobs.kernel")
BACKENDS = ("triton", "torch")

CASES = [
    # B, T, V, dtype, temperature, block_v (None = launch default), strided slice
    pytest.param(2, 7, 1000, torch.float32, 1.0, None, False, id="B2-T7-V1000-fp32"),
    pytest.param(3, 5, 4099, torch.float32, 0.7, 1024, True, id="B3-T5-V4099-fp32-blk1024-slice-temp0.7"),
    pytest.param(2, 6, 4099, torch.bfloat16, 1.3, None, True, id="B2-T6-V4099-bf16-slice-temp1.3"),
    pytest.param(3, 4, 1000, torch.bfloat16, 1.0, 256, False, id="B3-T4-V1000-bf16-blk256"),
    pytest.param(1, 2, 32003, torch.float32, 0.9, None, False, id="B1-T2-V32003-fp32"),
    pytest.param(4, 1, 777, torch.float16, 1.0, 128, True, id="B4-T1-V777-fp16-slice"),
    pytest.param(2, 3, 1024, torch.float32, 1.1, 256, False, id="B2-T3-V1024-fp32-blk256-no-tail"),
    pytest.param(2, 2, 3, torch.bfloat16, 0.8, None, False, id="B2-T2-V3-bf16-below-one-group"),
]


def _inputs(B, T, V, dtype, sliced):
    full = torch.randn(B, T + 1, V) * 3
    x = full.to(dtype)[:, :-1] if sliced else full[:, :T].contiguous().to(dtype)
    assert x.is_contiguous() != sliced or T == 1
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    mask[0, 0] = True
    if B > 1:
        mask[-1] = False                      # one fully masked row
        tokens[-1] = -5                       # out-of-range ids at masked positions are allowed
    return x, tokens, mask


def _ref(x, tokens, mask, temperature, dlogp, dent):
    xd = x.detach().double().requires_grad_()
    logp, ent = token_logprobs_ref(xd, tokens, temperature)
    zero = torch.zeros((), dtype=torch.float64)
    logp, ent = torch.where(mask, logp, zero), torch.where(mask, ent, zero)
    (logp * dlogp).sum().add((ent * dent).sum()).backward()
    return logp.detach(), ent.detach(), xd.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,V,dtype,temperature,block_v,sliced", CASES)
def test_fwd_bwd_vs_reference(B, T, V, dtype, temperature, block_v, sliced, backend):
    x, tokens, mask = _inputs(B, T, V, dtype, sliced)
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    logp, ent, lse = TL.token_logprobs_fwd(x, tokens, mask, temperature, True, backend, block_v=block_v)
    dlogits = TL.token_logprobs_bwd(x, tokens, mask, lse, ent, dlogp, dent, temperature, False, backend,
                                    block_v=block_v)
    r_logp, r_ent, r_grad = _ref(x, tokens, mask, temperature, dlogp, dent)
    assert logp.dtype == ent.dtype == torch.float32 and dlogits.dtype == dtype
    assert_close("logp", r_logp, logp, 1e-6, atol=2e-5)
    assert_close("entropy", r_ent, ent, 1e-6, atol=2e-5)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 8e-3)   # half types: the output rounding
    assert_close("dlogits", r_grad, dlogits, tol)
    assert torch.all(dlogits[~mask] == 0), "masked rows must get exactly zero gradient"
    assert torch.all(logp[~mask] == 0) and torch.all(ent[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_autograd_and_entropy_flag(backend):
    B, T, V = 3, 5, 1000
    x, tokens, mask = _inputs(B, T, V, torch.float32, sliced=True)
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    xg = x.detach().clone().requires_grad_()
    logp, ent = token_logprobs(xg, tokens, 0.8, mask=mask, backend=backend)
    ((logp * dlogp).sum() + (ent * dent).sum()).backward()
    r_logp, r_ent, r_grad = _ref(x, tokens, mask, 0.8, dlogp, dent)
    assert_close("logp", r_logp, logp.detach(), 1e-6, atol=2e-5)
    assert_close("dlogits", r_grad, xg.grad, 1e-5)

    # compute_entropy=False: entropy is None and the gradient is the logp-only one
    xg.grad = None
    logp, ent = token_logprobs(xg, tokens, 0.8, mask=mask, compute_entropy=False, backend=backend)
    assert ent is None
    (logp * dlogp).sum().backward()
    _, _, r_grad = _ref(x, tokens, mask, 0.8, dlogp, torch.zeros(B, T))
    assert_close("dlogits(no entropy)", r_grad, xg.grad, 1e-5)


def test_unused_entropy_skips_entropy_backward(monkeypatch):
    """An entropy output that feeds nothing reaches the backward as None (no wasted entropy term)."""
    seen = []
    lib = importlib.import_module("gxpo_kernels.ops.logprobs._library")
    orig = lib.token_logprobs_bwd

    def spy(*args, **kw):
        seen.append(args[6] is None)  # dentropy
        return orig(*args, **kw)

    monkeypatch.setattr(lib, "token_logprobs_bwd", spy)
    x = torch.randn(2, 3, 300, requires_grad=True)
    tokens = torch.randint(0, 300, (2, 3))
    logp, ent = token_logprobs(x, tokens)
    logp.sum().backward()
    logp, ent = token_logprobs(x, tokens)
    (logp.sum() + ent.sum()).backward()
    assert seen == [True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_reuses_buffer(backend):
    B, T, V = 2, 6, 1000
    x, tokens, mask = _inputs(B, T, V, torch.float32, sliced=False)
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    grads = {}
    for inplace in (False, True):
        leaf = x.detach().clone().requires_grad_()
        logits = leaf * 1.0                    # non-leaf buffer the in-place backward may overwrite
        ptrs = []
        logits.register_hook(lambda g: ptrs.append(g.data_ptr()))
        logp, ent = token_logprobs(logits, tokens, 1.2, mask=mask, inplace_backward=inplace, backend=backend)
        ((logp * dlogp).sum() + (ent * dent).sum()).backward()
        grads[inplace] = leaf.grad
        assert (ptrs[0] == logits.data_ptr()) == inplace
        if inplace:
            assert torch.equal(logits.detach(), leaf.grad), "logits buffer must now hold dlogits"
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_leaves_a_leaf_intact(backend):
    """Found by fuzzing: with a leaf (or a view of a leaf, e.g. ``leaf[:, :-1]``) as logits, the in-place
    backward overwrote the user's tensor with dlogits although autograd copies a leaf's gradient anyway (no
    memory saved); the leaf now keeps its values and gets the out-of-place gradient."""
    x, tokens, mask = _inputs(2, 5, 300, torch.float32, sliced=False)
    for base, view in ((x, lambda t: t), (torch.cat([x, x[:, :1]], 1), lambda t: t[:, :-1])):
        grads = []
        for inplace in (False, True):
            leaf = base.detach().clone().requires_grad_()
            before = leaf.detach().clone()
            logits = view(leaf)
            logp, ent = token_logprobs(logits, tokens, 0.9, mask=mask, inplace_backward=inplace, backend=backend)
            (logp.sum() + ent.sum()).backward()
            assert torch.equal(leaf.detach(), before)
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(2, 0, 300, requires_grad=True)
    logp, ent = token_logprobs(x, torch.zeros(2, 0, dtype=torch.long), backend=backend)
    assert logp.shape == ent.shape == (2, 0)
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape


def test_no_grad_saves_nothing():
    x = torch.randn(2, 3, 500, requires_grad=True)
    with torch.no_grad():
        logp, ent = token_logprobs(x, torch.randint(0, 500, (2, 3)))
    assert not logp.requires_grad and logp.grad_fn is None and ent.grad_fn is None


def test_kernels_do_not_respecialise_on_T_or_temperature(monkeypatch):
    """Every launch for different T / temperature / B must map to one JIT cache key.

    The interpreter has no compile cache, so the key is computed with Triton's own binder (the function
    ``JITFunction.run`` uses to build its cache key) on the exact arguments the launchers pass.
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    keys = {"fwd": set(), "bwd": set()}
    seen = set()
    for name, tag in (("_token_logprobs_fwd_kernel", "fwd"), ("_token_logprobs_bwd_kernel", "bwd")):
        kernel = getattr(TL, name)
        fn = getattr(kernel, "fn", kernel)
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize", getattr(kernel, "do_not_specialize", None))
        jf = JITFunction(fn, do_not_specialize=dns)
        binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)

        class Recorder:
            def __init__(self, real, binder, tag):
                self.real, self.binder, self.tag = real, binder, tag

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    params, spec, opts = self.binder(*args, **kw)
                    keys[self.tag].add((str(spec), str(sorted(opts.items()))))
                    seen.add((self.tag, params["T"], params["inv_temp"]))
                    return self.real[grid](*args, **kw)
                return launch

        monkeypatch.setattr(TL, name, Recorder(kernel, binder, tag))

    V = 320
    for B, T, temp in ((2, 1, 1.0), (3, 5, 0.7), (1, 16, 1.0), (2, 33, 2.5), (4, 64, 0.9)):
        x = torch.randn(B, T + 1, V)[:, :-1].requires_grad_()
        tokens = torch.randint(0, V, (B, T))
        logp, ent = token_logprobs(x, tokens, temp, mask=torch.rand(B, T) > 0.2, backend="triton")
        (logp.sum() + ent.sum()).backward()
    assert len(keys["fwd"]) == 1, keys["fwd"]
    assert len(keys["bwd"]) == 1, keys["bwd"]
    # the recorder saw every launch, with T and temperature really changing (the check is not vacuous)
    assert len({(t, it) for tag, t, it in seen if tag == "fwd"}) == 5
    assert len({(t, it) for tag, t, it in seen if tag == "bwd"}) == 5


def test_opcheck():
    x = torch.randn(2, 3, 257, requires_grad=True)
    tokens = torch.randint(0, 257, (2, 3))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for args in ((x, tokens, mask, 0.8, True, False, "torch"), (x, tokens, None, 1.0, False, False, "triton")):
        torch.library.opcheck(torch.ops.gxpo.token_logprobs_fwd.default, args)
    with torch.no_grad():
        _, ent, lse = torch.ops.gxpo.token_logprobs_fwd(x, tokens, mask, 0.8, True, False, "torch")
    bwd_args = (x.detach(), tokens, mask, lse, ent, torch.randn(2, 3), torch.randn(2, 3), 0.8, "torch")
    torch.library.opcheck(torch.ops.gxpo.token_logprobs_bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.gxpo.token_logprobs_bwd_.default,
                          (x.detach().clone(),) + bwd_args[1:])


@pytest.mark.parametrize("bad,exc,match", [
    pytest.param(dict(logits=torch.zeros(2, 3, 5, dtype=torch.int64)), TypeError, "logits", id="int-logits"),
    pytest.param(dict(logits=torch.zeros(6, 5)), ValueError, "logits", id="2d-logits"),
    pytest.param(dict(tokens=torch.zeros(2, 3)), TypeError, "tokens", id="float-tokens"),
    pytest.param(dict(tokens=torch.zeros(2, 4, dtype=torch.long)), ValueError, "tokens", id="tokens-shape"),
    pytest.param(dict(tokens=torch.full((2, 3), 5)), ValueError, "tokens", id="tokens-out-of-range"),
    pytest.param(dict(temperature=0.0), ValueError, "temperature", id="temperature-0"),
    pytest.param(dict(mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask", id="mask-shape"),
    pytest.param(dict(tokens=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "tokens",
                 id="device-mix"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="unknown-backend"),
])
def test_bad_inputs(bad, exc, match):
    kw = dict(logits=torch.randn(2, 3, 5), tokens=torch.zeros(2, 3, dtype=torch.long), temperature=1.0)
    kw.update(bad)
    extra = {k: kw.pop(k) for k in ("mask", "backend") if k in kw}
    with pytest.raises(exc, match=match):
        token_logprobs(kw["logits"], kw["tokens"], kw["temperature"], **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_minus_inf_logits(backend, dtype):
    """-inf logits (a banned vocabulary slice) give p = 0 there: finite entropy, zero gradient, no NaN, in the
    full tiles and in the tail alike (the reference sees a finite -1e4, whose probability is exactly 0)."""
    B, T, V = 2, 3, 1100
    x, tokens, mask = _inputs(B, T, V, dtype, sliced=False)
    x[..., 5:300] = float("-inf")           # inside the first 256-wide tiles
    x[..., 1050:] = float("-inf")           # in the ragged tail
    tokens = tokens.clamp(min=300, max=1049)
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    logp, ent, lse = TL.token_logprobs_fwd(x, tokens, mask, 0.9, True, backend, block_v=256)
    dx = TL.token_logprobs_bwd(x, tokens, mask, lse, ent, dlogp, dent, 0.9, False, backend, block_v=256)
    r_logp, r_ent, r_grad = _ref(x.clamp(min=-1e4), tokens, mask, 0.9, dlogp, dent)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(dx.float()).all()
    assert_close("logp", r_logp, logp, 1e-6, atol=2e-5)
    assert_close("entropy", r_ent, ent, 1e-6, atol=2e-5)
    assert_close("dlogits", r_grad, dx, 1e-5 if dtype == torch.float32 else 8e-3)
    assert torch.all(dx[..., 5:300] == 0) and torch.all(dx[..., 1050:] == 0)


def test_reference_entropy_of_minus_inf_logits():
    """The float64 reference (and grpo_loss_ref on it) gives a -inf logit probability 0 and a finite entropy and
    gradient, as the ops do; it returned a NaN entropy (0 * -inf), so the losses' entropy term read NaN there."""
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    x[..., 4:] = float("-inf")
    tokens = torch.randint(0, 4, (2, 3))
    xg = x.clone().requires_grad_()
    logp, ent = token_logprobs_ref(xg, tokens)
    (logp + ent).sum().backward()
    yg = x[..., :4].clone().requires_grad_()
    want_logp, want_ent = token_logprobs_ref(yg, tokens)
    (want_logp + want_ent).sum().backward()
    torch.testing.assert_close(ent, want_ent)
    torch.testing.assert_close(xg.grad[..., :4], yg.grad)
    assert torch.all(xg.grad[..., 4:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_logits(backend, dtype):
    """A NaN logit anywhere in an unmasked row (never the target) makes that row's logp, entropy, lse and whole
    gradient NaN on both backends: in a full tile, in the ragged tail, alone among -inf logits; a NaN in a
    masked row changes nothing, and the -inf logits of the clean rows stay probability 0. (Max and min on the
    GPU and in the interpreter return the other operand of a NaN: a clamp of the kernels must not drop it.)"""
    B, T, V = 3, 3, 1100
    x, tokens, mask = _inputs(B, T, V, dtype, sliced=False)   # batch 2 fully masked
    mask[0] = True
    x[..., 5:300] = float("-inf")
    tokens = tokens.clamp(min=300, max=1049)
    x[0, 0, 700] = float("nan")             # a full 256-wide tile
    x[0, 1, 1090] = float("nan")            # the ragged tail
    x[0, 2, 37] = float("nan")              # a group whose other logits are all -inf (its max is the -1e30 start)
    x[2, 0, 11] = float("nan")              # masked rows
    x[2, 1] = float("nan")
    dlogp, dent = torch.randn(B, T), torch.randn(B, T)
    logp, ent, lse = TL.token_logprobs_fwd(x, tokens, mask, 0.9, True, backend, block_v=256)
    dx = TL.token_logprobs_bwd(x, tokens, mask, lse, ent, dlogp, dent, 0.9, False, backend, block_v=256)
    for name, t in (("logp", logp), ("entropy", ent), ("lse", lse)):
        assert torch.isnan(t[0]).all(), name
        assert torch.all(t[2] == 0), name
    assert torch.isnan(dx[0].float()).all() and torch.all(dx[2] == 0)
    r_logp, r_ent, r_grad = _ref(x[1:2].clamp(min=-1e4), tokens[1:2], mask[1:2], 0.9, dlogp[1:2], dent[1:2])
    assert_close("logp", r_logp, logp[1:2], 1e-6, atol=2e-5)
    assert_close("entropy", r_ent, ent[1:2], 1e-6, atol=2e-5)
    assert_close("dlogits", r_grad, dx[1:2], 1e-5 if dtype == torch.float32 else 8e-3)
    assert torch.all(dx[1, :, 5:300] == 0)
    # the public op (no entropy: the other forward kernel) and its autograd
    xg = x.detach().clone().requires_grad_()
    lp, _ = token_logprobs(xg, tokens, 0.9, mask=mask, compute_entropy=False, backend=backend)
    lp.sum().backward()
    assert torch.isnan(lp[0]).all() and torch.all(lp[2] == 0) and torch.isfinite(lp[1]).all()
    assert torch.isnan(xg.grad[0]).all() and torch.all(xg.grad[2] == 0) and torch.isfinite(xg.grad[1]).all()


def _row_rel_err(got, ref):
    """Largest per-row ||got - ref|| / ||ref|| over the rows with a nonzero reference (masked rows excluded)."""
    got, ref = got.double().flatten(0, -2), ref.double().flatten(0, -2)
    d, n = (got - ref).norm(dim=-1), ref.norm(dim=-1)
    return float((d[n > 0] / n[n > 0]).max())


LOW_T = [1.0, 0.3, 1e-3, 1e-4, 1e-5]


@pytest.mark.filterwarnings("ignore:temperature=")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", LOW_T)
@pytest.mark.parametrize("masked_entropy", [True, False], ids=["mask+dH", "nomask"])
def test_low_temperature_vs_float64(temperature, dtype, backend, masked_entropy):
    """Forward and backward against float64 of the same inputs down to T = 1e-5, with and without a mask and the
    entropy term: d(logits) within 1e-5 per row in fp32 on both backends. The Triton backward used to
    recompute p from an fp32 lse ~ max(x) / T, whose rounding put 1e-3 (T = 1e-3) to 7e-2 (T = 1e-5) relative
    error into d(logits). The log-prob keeps the fp32 rounding of logits / T (about 2.4e-7 max|x| / T)."""
    B, T, V = 3, 5, 2053                                      # V > the interpreter's 2048 block: ragged tail
    x = (torch.randn(B, T, V) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T))
    mask = None
    if masked_entropy:
        mask = torch.rand(B, T) > 0.3
        mask[0, 0], mask[-1, -1] = True, False
    dlogp = torch.randn(B, T)
    dent = torch.randn(B, T) if masked_entropy else None
    logp, ent, lse = TL.token_logprobs_fwd(x, tokens, mask, temperature, True, backend)
    dx = TL.token_logprobs_bwd(x, tokens, mask, lse, ent, dlogp, dent, temperature, False, backend)
    on = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    r_logp, r_ent, r_grad = _ref(x, tokens, on, temperature, dlogp, torch.zeros(B, T) if dent is None else dent)
    atol_logp = 2e-5 + 2.4e-7 * float(x.float().abs().max()) / temperature
    assert float((logp.double() - r_logp).abs().max()) <= atol_logp
    assert float((ent.double() - r_ent).abs().max()) <= 2e-5
    # bf16: the dlogits output itself is rounded to bf16 (the interpreter's conversion up to 1 ulp, 2^-7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _row_rel_err(dx, r_grad) <= tol
    assert torch.all(dx[~on] == 0)


@pytest.mark.filterwarnings("ignore:temperature=")
def test_triton_backward_low_temperature_regression():
    """The bench's case (bench/temperature_precision.py: 64 rows, V = 4,099, logits ~ N(0, 10^2)) at T = 1e-4:
    the Triton d(logits) was 1.4e-2 off in norm and 8e-2 in its worst row; now 1.4e-7 in its worst row under
    Triton 3.9's interpreter (true fma) and 5e-8 under 3.6's (which rounds the product of tl.fma, as its
    forward then does too)."""
    g = torch.Generator().manual_seed(0)
    N, V, temperature = 64, 4099, 1e-4
    x = torch.randn(1, N, V, generator=g) * 10
    tokens = torch.randint(0, V, (1, N), generator=g)
    dlogp, dent = torch.randn(1, N, generator=g), torch.randn(1, N, generator=g)
    xg = x.clone().requires_grad_()
    logp, ent = token_logprobs(xg, tokens, temperature, backend="triton")
    ((logp * dlogp).sum() + (ent * dent).sum()).backward()
    _, _, r_grad = _ref(x, tokens, torch.ones(1, N, dtype=torch.bool), temperature, dlogp, dent)
    assert _row_rel_err(xg.grad, r_grad) <= 1e-5


@pytest.mark.filterwarnings("ignore:temperature=")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_logp_of_the_row_max_at_low_temperature(dtype):
    """The usual sample at a low temperature is the row's top token, whose log-prob is about 0: the Triton
    forward computes it as fma(x_y, c, -M) - log2 s (exact x_y c - M), within 1e-6 of float64 at any T; it
    used to subtract two fp32 numbers of magnitude max(x) / T (5e-4 off at T = 0.01, 3e-2 at T = 1e-4). Holds
    under Triton 3.6's interpreter too: its rounded x_y c is the very value the row max M was rounded to."""
    x = (torch.randn(2, 7, 3001) * 10).to(dtype)
    tokens = x.float().argmax(-1)
    for temperature in (1e-2, 1e-3, 1e-4, 1e-5):
        logp, _, _ = TL.token_logprobs_fwd(x, tokens, None, temperature, False, "triton")
        r_logp, _ = token_logprobs_ref(x, tokens, temperature)
        assert float((logp.double() - r_logp).abs().max()) <= 1e-6, temperature


@pytest.mark.filterwarnings("ignore:temperature=")
def test_triton_row_beyond_the_scaled_logit_range_is_nan():
    """|max logit| / T >= 2^31 ln 2 (about 1.49e9, docs/validation.md): the rounding error of the row max's
    product x * log2(e) / T reaches 2^8, so 2^(x c - M) can overflow or underflow. Such a row must be NaN, never a
    finite wrong number: 8 equal logits of 3000.1152 at T = 1e-6 (rounding error -144: a subnormal 2^-144) gave
    logp -2.0709 and entropy 2.0682 instead of -+log 8 = 2.0794, under Triton 3.9's interpreter. Rows just inside
    the range, in the same batch, stay exact; fpa_logprobs shares the forward's finish."""
    from gxpo_kernels.ops import fpa_logprobs
    T = 1e-6
    x = torch.empty(3, 1, 8)
    x[0] = 3000.1152                        # out of range
    x[1] = 1.4e9 * T                        # in range: 2^31 ln 2 T = 1488.5
    x[2] = -1.4e9 * T
    x[1, 0, 3] -= 2 * T                     # a near tie: p of logit 3 is e^-2 of the others'
    tokens = torch.tensor([[0], [3], [5]])
    xg = x.clone().requires_grad_()
    logp, ent = token_logprobs(xg, tokens, T, backend="triton")
    (logp.sum() + ent.sum()).backward()
    assert torch.isnan(logp[0]).all() and torch.isnan(ent[0]).all() and torch.isnan(xg.grad[0]).all()
    r_logp, r_ent, r_grad = _ref(x[1:], tokens[1:], torch.ones(2, 1, dtype=torch.bool), T, torch.ones(2, 1),
                                 torch.ones(2, 1))
    assert float((logp[1:].detach().double() - r_logp).abs().max()) <= 1e-6
    assert float((ent[1:].detach().double() - r_ent).abs().max()) <= 1e-6
    assert _row_rel_err(xg.grad[1:], r_grad) <= 1e-5
    out = fpa_logprobs(x, x, tokens, 1.0, T, backend="triton")
    for t in out:
        assert torch.isnan(t[0]).all() and float((t[1:].double() - r_logp).abs().max()) <= 1e-6


@pytest.mark.filterwarnings("ignore:temperature=")
def test_torch_path_beyond_the_triton_range_is_finite_and_exact_for_a_tie():
    """docs/validation.md: the PyTorch path shifts by the row max before dividing by T, so the row that the
    Triton kernels turn into NaN (8 equal logits of 3000.1152 at T = 1e-6) gets -log 8 and entropy log 8 there,
    in token_logprobs and fpa_logprobs alike (the docs used to say log-prob 0 and entropy 0)."""
    from gxpo_kernels.ops import fpa_logprobs
    x = torch.full((1, 1, 8), 3000.1152)
    tokens = torch.zeros(1, 1, dtype=torch.long)
    logp, ent = token_logprobs(x, tokens, 1e-6, backend="torch")
    log8 = torch.tensor([[math.log(8)]])
    torch.testing.assert_close(logp, -log8, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, log8, rtol=0, atol=1e-6)
    for t in fpa_logprobs(x, x, tokens, 1.0, 1e-6, backend="torch"):
        torch.testing.assert_close(t, -log8, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:temperature=")
@pytest.mark.parametrize("logit, temperature", [(1e20, 1.0), (-1e20, 1.0), (1e10, 1e-6)])
def test_torch_path_backward_far_beyond_the_triton_range(logit, temperature):
    """The PyTorch path's backward recovers the forward's softmax from the saved lse. It saved m / T plus the
    small logsumexp of (x - m) / T in float64, which drops the latter once |m| / T nears 1e16: four equal logits
    of 1e20 got p = 1 each, so d(logp)/d(logits) = 0 instead of (3/4, -1/4, -1/4, -1/4) / T, in token_logprobs
    and fpa_logprobs alike, with a correct forward."""
    from gxpo_kernels.ops import fpa_logprobs
    x = torch.full((1, 1, 4), logit)
    tokens = torch.zeros(1, 1, dtype=torch.long)
    want = torch.tensor([[[0.75, -0.25, -0.25, -0.25]]]) / temperature   # d(entropy) is 0 at a uniform row
    xg = x.clone().requires_grad_()
    logp, ent = token_logprobs(xg, tokens, temperature, backend="torch")
    (logp + ent).sum().backward()
    torch.testing.assert_close(xg.grad, want, rtol=1e-6, atol=0)
    xg.grad = None
    fpa_logprobs(xg, x, tokens, 1.0, temperature, backend="torch")[0].sum().backward()
    torch.testing.assert_close(xg.grad, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logit_makes_its_row_nan(backend):
    """A +inf logit leaves the softmax undefined (inf - inf): that row's logp, entropy and gradient are NaN on
    every path, as for a NaN logit, and the other rows are untouched. The PyTorch paths (token_logprobs,
    fpa_logprobs, linear_token_logprobs, linear_fpa_logprobs) gave the finite targets logp = -inf
    (torch.logsumexp's convention) where the Triton kernels gave NaN."""
    from gxpo_kernels.ops import fpa_logprobs, linear_fpa_logprobs, linear_token_logprobs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, generator=g)
    tokens = torch.randint(0, 37, (2, 3), generator=g)
    x[0, 1, (tokens[0, 1] + 1) % 37] = float("inf")   # never the target
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = True
    r_logp, r_ent = token_logprobs_ref(x[~bad][None], tokens[~bad][None])
    xg = x.clone().requires_grad_()
    logp, ent = token_logprobs(xg, tokens, backend=backend)
    (logp + ent).sum().backward()
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all() and torch.isnan(xg.grad[bad]).all()
    assert_close("logp", r_logp[0], logp[~bad], 1e-5)
    assert_close("entropy", r_ent[0], ent[~bad], 1e-5)
    assert torch.isfinite(xg.grad[~bad]).all()
    for t in fpa_logprobs(x, x, tokens, 1.0, backend=backend):
        assert torch.isnan(t[bad]).all() and torch.isfinite(t[~bad]).all()
    # the fused head: a +inf bias entry is a +inf logit in every row
    h, w, b = torch.randn(5, 8, generator=g), torch.randn(37, 8, generator=g), torch.zeros(37)
    b[3] = float("inf")
    y = torch.tensor([0, 1, 2, 4, 5])
    lp, en = linear_token_logprobs(h, w, y, bias=b, backend=backend)
    assert torch.isnan(lp).all() and torch.isnan(en).all()
    lp, ref_lp, fpa_lp = linear_fpa_logprobs(h, w, h, w, y, 1.0, bias=b, ref_bias=torch.zeros(37), backend=backend)
    assert torch.isnan(lp).all() and torch.isnan(fpa_lp).all() and torch.isfinite(ref_lp).all()
    lp, ref_lp, _ = linear_fpa_logprobs(h, w, h, w, y, 1.0, bias=torch.zeros(37), ref_bias=b, backend=backend)
    assert torch.isnan(ref_lp).all() and torch.isfinite(lp).all()


@pytest.mark.filterwarnings("ignore:temperature=")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_near_tied_top_logits_at_low_temperature(dtype):
    """Rows whose top logits tie (common in bf16) or lie within T of each other keep several large probabilities
    at any temperature: their log-probs, entropy and d(logits) must stay at fp32 precision. The PyTorch path
    used to divide by T before its log-sum-exp, rounding every term to ~6e-8 |x| / T: at T = 1e-5 the top
    token's log-prob was 3e-2 off, the entropy 1.6e-2 and d(logits) 0.23 relative (fp32 logits of scale 3).
    (The Triton kernels meet these bounds under Triton 3.9's interpreter; 3.6's rounds the product of tl.fma, so
    a logit T below the max is off by 6e-8 |x| / T there, which no GPU does.)"""
    backend = "torch"
    torch.manual_seed(0)
    B, T, V = 2, 4, 1000
    for temperature in (1e-2, 1e-3, 1e-5):
        x = (torch.randn(B, T, V) * 3).to(dtype)
        top = x.float().amax(-1)
        x[..., 1] = x[..., 2] = top.to(dtype)
        x[..., 3] = (top - temperature).to(dtype)
        tokens = torch.ones(B, T, dtype=torch.long)
        dlogp, dent = torch.randn(B, T), torch.randn(B, T)
        logp, ent, lse = TL.token_logprobs_fwd(x, tokens, None, temperature, True, backend)
        dx = TL.token_logprobs_bwd(x, tokens, None, lse, ent, dlogp, dent, temperature, False, backend)
        r_logp, r_ent, r_grad = _ref(x, tokens, torch.ones(B, T, dtype=torch.bool), temperature, dlogp, dent)
        assert float((logp.double() - r_logp).abs().max()) <= 1e-6, temperature
        assert float((ent.double() - r_ent).abs().max()) <= 1e-6, temperature
        tol = 1e-5 if dtype == torch.float32 else 1e-2                      # bf16: the dlogits output's rounding
        assert _row_rel_err(dx, r_grad) <= tol, temperature


def test_inplace_backward_failing_part_way_is_detected_on_retry(monkeypatch):
    """inplace_backward=True overwrites the logits chunk by chunk (PyTorch path). A backward that fails part way
    (an allocation) leaves them partly overwritten: no gradient reaches the parameters, a retried backward raises
    autograd's in-place error rather than reading them, and the next step gives the fresh result."""
    from gxpo_kernels.ops.logprobs import kernel as K
    monkeypatch.setattr(K, "_TORCH_CHUNK_ELEMS", 4 * 1001)   # several chunks
    g = torch.Generator().manual_seed(21)
    lin = torch.nn.Linear(7, 1001)
    x, tok = torch.randn(2, 9, 7, generator=g), torch.randint(0, 1001, (2, 9), generator=g)

    def step():
        logp, ent = token_logprobs(lin(x), tok, inplace_backward=True, temperature=0.7, backend="torch")
        return logp.sum() + 0.1 * ent.sum()
    loss = step()
    real = K._log_probs_chunk
    monkeypatch.setattr(K, "_log_probs_chunk", FailOnUse(real, 2))
    with pytest.raises(torch.OutOfMemoryError):
        loss.backward(retain_graph=True)
    monkeypatch.setattr(K, "_log_probs_chunk", real)
    assert lin.weight.grad is None and lin.bias.grad is None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    step().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad(set_to_none=True)
    step().backward()
    assert torch.equal(gw, lin.weight.grad) and torch.equal(gb, lin.bias.grad)
