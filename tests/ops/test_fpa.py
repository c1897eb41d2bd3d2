"""FPA: fused log-probs (Triton under the interpreter + PyTorch path), hidden-state variant, offline objectives.

Guards: values of log pi_theta / log pi_ref / log pi_hat against a float64 reference and against the product
form pi_hat ∝ pi_theta^(1+lam) pi_ref^(-lam); lam = 0 gives logp exactly; gradient flows only through logp and
equals the analytic stop-gradient form; bf16/fp32, awkward V, masks (with padding ids), temperature != 1,
non-contiguous input; hidden-state variant vs materialised logits (values, d hidden, d weight); every offline
objective vs a float64 reference (lam > 0, both fpa_side) and vs its base method at lam = 0 (value and grad);
bad input.
"""
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_close

from gxpo_kernels.ops.fpa.logprobs import fpa_logprobs
from gxpo_kernels.ops.fpa.reference import fpa_logprobs_ref, fpa_probs_ref
from gxpo_kernels.ops.fpa.objectives import (FPALogProbs, fpa_dpo_loss, fpa_kto_loss, fpa_offline_pg_loss,
                                             fpa_rpo_loss, fpa_simper_loss)
from gxpo_kernels.ops.fpa.linear import linear_fpa_logprobs

BACKENDS = ["triton", "torch"]


def _inputs(B, T, V, dtype, ref_dtype=None, masked=True, pad_id=-100):
    logits = (torch.randn(B, T, V) * 2).to(dtype)
    # the reference is close to the policy, as in practice
    ref_logits = (logits.float() + 0.5 * torch.randn(B, T, V)).to(ref_dtype or dtype)
    tokens = torch.randint(0, V, (B, T))
    mask = None
    if masked:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        lengths[-1] = max(1, T // 2) if B > 1 else lengths[-1]     # at least one padded row when B > 1
        mask = torch.arange(T)[None, :] < lengths[:, None]
        tokens = torch.where(mask, tokens, torch.full_like(tokens, pad_id))  # padding ids never read
    return logits, ref_logits, tokens, mask


CASES = [
    pytest.param(2, 7, 1000, torch.float32, None, 1.0, 1.0, id="B2-T7-V1000-fp32"),
    pytest.param(2, 5, 4099, torch.float32, None, 1.5, 0.7, id="B2-T5-V4099-fp32-T0.7"),
    pytest.param(3, 4, 1000, torch.bfloat16, None, 0.5, 1.3, id="B3-T4-V1000-bf16-T1.3"),
    pytest.param(1, 6, 4099, torch.bfloat16, torch.float32, 2.0, 1.0, id="B1-T6-V4099-bf16-ref_fp32"),
    # Triton: two full (unmasked) 8192-wide tiles + a ragged tail; an exact multiple (no tail); V below one
    # 16-byte group
    pytest.param(2, 3, 16389, torch.bfloat16, None, 1.0, 0.9, id="B2-T3-V16389-bf16-full-tiles"),
    pytest.param(1, 3, 8192, torch.float32, None, 0.5, 1.0, id="B1-T3-V8192-fp32-no-tail"),
    pytest.param(2, 2, 3, torch.bfloat16, None, 1.0, 1.0, id="B2-T2-V3-bf16-tiny"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,V,dtype,ref_dtype,lam,temp", CASES)
def test_fwd_bwd_vs_ref(backend, B, T, V, dtype, ref_dtype, lam, temp):
    logits, ref_logits, tokens, mask = _inputs(B, T, V, dtype, ref_dtype)
    logits.requires_grad_(True)
    out = fpa_logprobs(logits, ref_logits, tokens, lam, temp, mask=mask, backend=backend)
    ref = fpa_logprobs_ref(logits, ref_logits, tokens, lam, temp, mask=mask)
    for name, a, b in zip(("logp", "ref_logp", "fpa_logp"), out, ref):
        assert a.dtype == torch.float32 and a.shape == (B, T)
        assert_close(name, b.detach(), a.detach(), 1e-5)
        assert bool((a[~mask] == 0).all()), f"{name}: masked positions must be 0"
    g = torch.randn(B, T)
    (d_tri,) = torch.autograd.grad((out[0] * g).sum(), logits)
    (d_ref,) = torch.autograd.grad((ref[0] * g.double()).sum(), logits)
    assert d_tri.dtype == dtype
    assert_close("dlogits", d_ref, d_tri, 1e-5 if dtype == torch.float32 else 1e-2)
    assert bool((d_tri[~mask] == 0).all()), "masked rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_product_form_identity_and_lam_zero(backend):
    logits, ref_logits, tokens, _ = _inputs(2, 6, 1000, torch.float32, masked=False)
    lam, temp = 1.3, 0.9
    _, _, fpa = fpa_logprobs(logits, ref_logits, tokens, lam, temp, backend=backend)
    probs = fpa_probs_ref(logits, ref_logits, lam, temp)            # pi_theta^(1+lam) pi_ref^(-lam), renormalised
    assert_close("fpa_logp vs product form", probs.gather(-1, tokens[..., None]).squeeze(-1).log(), fpa, 1e-5)
    logp, _, fpa0 = fpa_logprobs(logits, ref_logits, tokens, 0.0, temp, backend=backend)
    assert torch.equal(logp, fpa0), "lam=0 must give pi_hat == pi_theta exactly"


def _ref_only_banned(V=11, H=6, seed=3):
    """Rows where the reference alone bans a token (-inf), the policy alone, both, or neither (hidden-state form:
    the bans are -inf biases)."""
    g = torch.Generator().manual_seed(seed)
    hidden, ref_hidden = torch.randn(4, H, generator=g), torch.randn(4, H, generator=g)
    weight, ref_weight = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    bias, ref_bias = torch.zeros(4, V), torch.zeros(4, V)
    ref_bias[0, 3] = float("-inf")                                # reference only
    bias[1, 3] = float("-inf")                                    # policy only
    bias[2, 3] = ref_bias[2, 3] = float("-inf")                   # both
    logits, ref_logits = hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias
    tokens = torch.tensor([0, 5, 4, 7])
    return logits, ref_logits, tokens, (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_only_minus_inf_logit(backend, linear):
    """lam = 0 is pi_theta exactly even where the reference logit is -inf (found by review: (1 + 0) h - 0 * (-inf)
    made fpa_logp NaN on every path). With lam > 0, pi_hat ∝ pi_theta^(1+lam) pi_ref^(-lam) is undefined where the
    reference alone gives probability 0: that row's fpa_logp is NaN on every path (the PyTorch paths returned
    -inf or NaN depending on the target, the Triton paths NaN)."""
    logits, ref_logits, tokens, head = _ref_only_banned()
    for lam in (0.0, 1.0):
        if linear:
            h, w, b, hr, wr, br = head
            # one row at a time: a bias is per vocabulary entry, shared by the rows of a call
            outs = [linear_fpa_logprobs(h[i:i + 1], w, hr[i:i + 1], wr, tokens[i:i + 1], lam, bias=b[i],
                                        ref_bias=br[i], backend=backend) for i in range(4)]
            logp, ref_logp, fpa = (torch.cat(t) for t in zip(*outs))
        else:
            logp, ref_logp, fpa = fpa_logprobs(logits, ref_logits, tokens, lam, backend=backend)
        want = fpa_logprobs_ref(logits, ref_logits, tokens, lam)
        assert_close("logp", want[0], logp, 1e-5)
        assert_close("ref_logp", want[1], ref_logp, 1e-5)
        if lam == 0:
            assert torch.equal(fpa, logp), "lam=0 must give pi_hat == pi_theta exactly"
        else:
            assert bool(fpa[0].isnan()), "pi_hat is undefined where only the reference bans a token"
            assert_close("fpa_logp", want[2][1:], fpa[1:], 1e-5)
    assert bool(want[2][0].isnan()) and bool(torch.isfinite(want[2][1:]).all())   # the reference agrees


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_logp(backend):
    logits, ref_logits, tokens, mask = _inputs(2, 5, 1000, torch.float32)
    logits[~mask] = 200.0     # padding rows with huge logits: exp overflows there unless they are skipped
    logits.requires_grad_(True)
    ref_logits.requires_grad_(True)
    temp = 0.8
    logp, ref_logp, fpa = fpa_logprobs(logits, ref_logits, tokens, 1.0, temp, mask=mask, backend=backend)
    assert logp.requires_grad and not fpa.requires_grad and not ref_logp.requires_grad
    a, b, c = torch.randn(3, 2, 5)
    (a * logp + b * fpa + c * ref_logp).sum().backward()
    assert ref_logits.grad is None
    # analytic stop-gradient form: d/dh_v = a * (onehot(y)_v - softmax(h/T)_v) / T at unmasked rows only
    p = torch.softmax(logits.detach().double() / temp, -1)
    onehot = F.one_hot(tokens.clamp(min=0), 1000).double()
    expect = (a.double() * mask)[..., None] * (onehot - p) / temp
    assert_close("dlogits", expect, logits.grad, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_shifted_logits(backend):
    full = torch.randn(2, 6, 1000)      # (B, T+1, V): the usual next-token shift gives a strided view
    ref_full = torch.randn(2, 6, 1000)
    tokens = torch.randint(0, 1000, (2, 5))
    logits, ref_logits = full[:, :-1], ref_full[:, 1:]
    out = fpa_logprobs(logits, ref_logits, tokens, 0.5, backend=backend)
    ref = fpa_logprobs_ref(logits, ref_logits, tokens, 0.5)
    for name, a, b in zip(("logp", "ref_logp", "fpa_logp"), out, ref):
        assert_close(name, b, a, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0, 7), (2, 3, 0, 7), (0, 4, 7), (0, 7)], ids=str)
def test_no_tokens(backend, shape):
    """Logits without a token (T = 0: an empty completion window) give empty log-probs and a zero-size gradient;
    merging the leading dims of such a tensor with reshape(-1, 0, V) raised instead (the -1 is ambiguous)."""
    logits = torch.randn(shape, requires_grad=True)
    tokens = torch.randint(0, shape[-1], shape[:-1])
    out = fpa_logprobs(logits, torch.randn(shape), tokens, 0.5, backend=backend)
    assert [tuple(x.shape) for x in out] == [shape[:-1]] * 3
    out[0].sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.filterwarnings("ignore:temperature=")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_fp32_accuracy_at_low_temperature(backend):
    """Found by fuzzing: the torch forward divided the logits by T while the backward it shares with
    token_logprobs multiplies by 1/T; at T = 1e-3 the two roundings of z put the saved lse out of step with
    the recomputed logits and d(logits) was 1e-3 off (1e-2 at T = 1e-4), where plain fp32 PyTorch is 1e-7.
    The Triton backward had the same error from its fp32 lse ~ max(x) / T (now float64, with the forward's
    c = log2(e) / T and fma exponents)."""
    g = torch.Generator().manual_seed(5)
    for V, T in ((3, 1e-3), (37, 1e-4), (300, 1e-3), (2053, 1e-5)):
        logits = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 1.5
        tokens, up = torch.randint(0, V, (2, 3), generator=g), torch.randn(2, 3, generator=g, dtype=torch.float64)
        x = logits.float().requires_grad_()
        (fpa_logprobs(x, x.detach(), tokens, 0.5, T, backend=backend)[0] * up.float()).sum().backward()
        xr = logits.requires_grad_()
        (torch.log_softmax(xr / T, -1).gather(-1, tokens[..., None]).squeeze(-1) * up).sum().backward()
        err = float((x.grad.double() - xr.grad).abs().max() / xr.grad.abs().max())
        assert err < 1e-5, (V, T, err)


LINEAR_CASES = [  # (H, H_ref, V, policy dtype, ref dtype, bias, deterministic, fp32_head, chunk_size)
    pytest.param(32, 24, 1000, torch.float32, torch.float32, False, False, False, 3, id="fp32"),
    pytest.param(37, 21, 203, torch.bfloat16, torch.bfloat16, True, True, False, None, id="bf16-bias-det"),
    pytest.param(20, 33, 517, torch.bfloat16, torch.float32, True, False, True, 4, id="bf16-ref_fp32-fp32_head"),
    pytest.param(19, 19, 300, torch.float16, torch.float16, False, True, False, 2, id="fp16-det"),
]


def _linear_inputs(H, H_ref, V, dtype, ref_dtype, bias, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(V, generator=g)).to(dtype).requires_grad_(True) if bias else None
    ref_hidden = torch.randn(B, T, H_ref, generator=g).to(ref_dtype)
    ref_weight = (torch.randn(V, H_ref, generator=g) / H_ref ** 0.5).to(ref_dtype)
    ref_b = (0.3 * torch.randn(V, generator=g)).to(ref_dtype) if bias else None
    return hidden, weight, b, ref_hidden, ref_weight, ref_b


def _materialised_ref(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tokens, lam, temp, mask):
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    leaves = [t.detach().double().requires_grad_(True) for t in params]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)
    ref_logits = ref_hidden.double() @ ref_weight.double().T + (ref_bias.double() if ref_bias is not None else 0)
    return fpa_logprobs_ref(logits, ref_logits, tokens, lam, temp, mask=mask), leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,H_ref,V,dtype,ref_dtype,bias,det,fp32_head,chunk", LINEAR_CASES)
def test_linear_vs_materialised(backend, H, H_ref, V, dtype, ref_dtype, bias, det, fp32_head, chunk):
    # H, V not multiples of the tiles (interpreter tiles 16 x 32 x 16), ragged mask with padding ids
    hidden, weight, b, ref_hidden, ref_weight, ref_b = _linear_inputs(H, H_ref, V, dtype, ref_dtype, bias)
    _, _, tokens, mask = _inputs(2, 5, V, torch.float32)
    lam, temp = 1.3, 0.9
    out = linear_fpa_logprobs(hidden, weight, ref_hidden, ref_weight, tokens, lam, temp, bias=b, ref_bias=ref_b,
                              mask=mask, fp32_head=fp32_head, deterministic=det, chunk_size=chunk, backend=backend)
    ref, leaves = _materialised_ref(hidden, weight, b, ref_hidden, ref_weight, ref_b, tokens, lam, temp, mask)
    for name, a, r in zip(("logp", "ref_logp", "fpa_logp"), out, ref):
        assert a.dtype == torch.float32 and a.shape == tokens.shape
        assert_close(name, r.detach(), a.detach(), 1e-5)      # fp32 accumulation of the rounded inputs
    assert out[0].requires_grad and not out[1].requires_grad and not out[2].requires_grad
    g = torch.randn(2, 5)
    ours = torch.autograd.grad((out[0] * g).sum(), [t for t in (hidden, weight, b) if t is not None])
    theirs = torch.autograd.grad((ref[0] * g.double()).sum(), leaves)
    tol = 1e-5 if dtype == torch.float32 else 1e-2          # gradients come back in the input dtype
    for name, a, r, x in zip(("dhidden", "dweight", "dbias"), ours, theirs, (hidden, weight, b)):
        assert a.dtype == x.dtype
        assert_close(name, r, a, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_lam_zero_and_no_grad(backend):
    hidden, weight, b, ref_hidden, ref_weight, ref_b = _linear_inputs(24, 16, 301, torch.float32, torch.float32, True)
    tokens = torch.randint(0, 301, (2, 5))
    logp, _, fpa0 = linear_fpa_logprobs(hidden, weight, ref_hidden, ref_weight, tokens, 0.0, bias=b, ref_bias=ref_b,
                                        backend=backend)
    assert torch.equal(logp.detach(), fpa0), "lam=0 must give pi_hat == pi_theta exactly"
    with torch.no_grad():    # the old/ref log-prob fast path: same numbers, nothing differentiable
        again = linear_fpa_logprobs(hidden, weight, ref_hidden, ref_weight, tokens, 0.0, bias=b, ref_bias=ref_b,
                                    backend=backend)
    assert not again[0].requires_grad and torch.equal(again[0], logp.detach())


def test_linear_triton_vocab_splits(monkeypatch):
    # the epilogue merges three online log-sum-exps across 3 vocab splits (the last one ragged)
    lfl = importlib.import_module("gxpo_kernels.ops.fpa.linear")  # the package re-exports the function
    real = lfl.make_head_config
    monkeypatch.setattr(lfl, "make_head_config", lambda *a: dataclasses.replace(real(*a), num_splits=3))
    hidden, weight, b, ref_hidden, ref_weight, ref_b = _linear_inputs(24, 16, 150, torch.float32, torch.float32, True)
    tokens = torch.randint(0, 150, (2, 5))
    out = linear_fpa_logprobs(hidden, weight, ref_hidden, ref_weight, tokens, 0.7, bias=b, ref_bias=ref_b,
                              backend="triton")
    ref, _ = _materialised_ref(hidden, weight, b, ref_hidden, ref_weight, ref_b, tokens, 0.7, 1.0, None)
    for name, a, r in zip(("logp", "ref_logp", "fpa_logp"), out, ref):
        assert_close(name, r.detach(), a.detach(), 1e-6)


# ------------------------------------------------------------------------------------------ objectives
def _side(B, T, V, lam, seed):
    """float64 per-token (logp, ref_logp, fpa_logp, mask) from leaf logits; pi_hat from the product form."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_logits = logits.detach() + 0.7 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    fpa = fpa_probs_ref(logits.detach(), ref_logits, lam).gather(-1, tokens[..., None]).squeeze(-1).log()
    return logits, FPALogProbs(logp, ref_logp, fpa, mask)


def _sums(x: FPALogProbs):
    m = x.mask.double()
    n = m.sum(-1).clamp(min=1)
    return (x.logp * m).sum(-1), (x.ref_logp * m).sum(-1), (x.fpa_logp * m).sum(-1), n


def _dpo_ref(w, l, beta, side, hat):
    """Spec section 4 in float64: base loss (differentiable) or the FPA surrogate sum_i sg(C) * S."""
    Sw, Rw, Hw, nw = _sums(w)
    Sl, Rl, Hl, nl = _sums(l)
    if not hat:
        return -F.logsigmoid(beta * ((Sw - Rw) - (Sl - Rl))).mean()
    with torch.no_grad():
        c_hat = beta * torch.sigmoid(-beta * ((Hw - Rw) - (Hl - Rl)))
        c_cur = beta * torch.sigmoid(-beta * ((Sw - Rw) - (Sl - Rl)))
        c_w = c_hat if side == "both" else c_cur
    return -(c_w * Sw - c_hat * Sl).mean()


def _rpo_ref(w, l, beta, side, hat, alpha=0.7):
    Sw, _, _, nw = _sums(w)
    return _dpo_ref(w, l, beta, side, hat) - alpha * (Sw / nw).mean()


def _simper_ref(w, l, beta, side, hat):
    Sw, _, Hw, nw = _sums(w)
    Sl, _, Hl, nl = _sums(l)
    if not hat:
        return (-torch.exp(Sw / nw) + torch.exp(Sl / nl)).mean()
    with torch.no_grad():
        c_w = torch.exp((Hw if side == "both" else Sw) / nw) / nw
        c_l = torch.exp(Hl / nl) / nl
    return -(c_w * Sw - c_l * Sl).mean()


def _kto_ref(x, desirable, beta, side, hat, kl=0.3):
    S, R, Hs, _ = _sums(x)
    losses, coefs = [], []
    for i in range(S.shape[0]):
        s = -1.0 if desirable[i] else 1.0
        losses.append(1 - torch.sigmoid(-s * beta * (S[i] - R[i] - kl)))
        use_hat = hat and (side == "both" or not desirable[i])
        zi = -s * beta * ((Hs[i] if use_hat else S[i]).detach() - R[i] - kl)
        coefs.append(s * beta * torch.sigmoid(zi) * (1 - torch.sigmoid(zi)))
    if not hat:
        return torch.stack(losses).mean()
    return (torch.stack(coefs) * S).mean()


def _pg_ref(x, A, side, hat):
    S, _, Hs, n = _sums(x)
    if not hat:
        return -(A * torch.exp(S / n)).mean()
    with torch.no_grad():
        use_hat = torch.ones_like(A, dtype=torch.bool) if side == "both" else A < 0
        w = torch.exp(torch.where(use_hat, Hs, S) / n)
    return -(A * w * S / n).mean()


def _run(method, lam, side, no_fpa=False):
    """(loss, metrics) of ``method``, its float64 reference (``ref_fn(hat)``) and the logits leaves; ``no_fpa``
    passes ``fpa_logp=None`` to the objective (the reference keeps the pi_hat log-probs)."""
    B, V = 4, 37
    lw, w = _side(B, 6, V, lam, 1)
    ll, l = _side(B, 9, V, lam, 2)
    w_in, l_in = (x._replace(fpa_logp=None) for x in (w, l)) if no_fpa else (w, l)
    leaves = (lw, ll)
    if method == "dpo":
        loss, met = fpa_dpo_loss(w_in, l_in, beta=0.5, fpa_side=side)
        ref_fn = lambda hat: _dpo_ref(w, l, 0.5, side, hat)  # noqa: E731
    elif method == "rpo":
        loss, met = fpa_rpo_loss(w_in, l_in, beta=0.5, alpha=0.7, fpa_side=side)
        ref_fn = lambda hat: _rpo_ref(w, l, 0.5, side, hat)  # noqa: E731
    elif method == "simper":
        loss, met = fpa_simper_loss(w_in, l_in, fpa_side=side)
        ref_fn = lambda hat: _simper_ref(w, l, None, side, hat)  # noqa: E731
    elif method == "kto":
        desirable = torch.tensor([True, False, True, False])
        loss, met = fpa_kto_loss(w_in, desirable, beta=0.5, kl=0.3, fpa_side=side)
        ref_fn = lambda hat: _kto_ref(w, desirable, 0.5, side, hat)  # noqa: E731
        leaves = (lw,)
    else:
        A = torch.tensor([1.0, -0.5, 0.25, -2.0], dtype=torch.float64)
        loss, met = fpa_offline_pg_loss(w_in, A, fpa_side=side)
        ref_fn = lambda hat: _pg_ref(w, A, side, hat)  # noqa: E731
        leaves = (lw,)
    return loss, met, ref_fn, leaves


METHODS = ["dpo", "rpo", "simper", "kto", "pg"]


@pytest.mark.parametrize("side", ["both", "rejected"])
@pytest.mark.parametrize("method", METHODS)
def test_objective_vs_float64_ref(method, side):
    loss, met, ref_fn, leaves = _run(method, 1.0, side)
    base = ref_fn(False)
    torch.testing.assert_close(loss, base.detach(), rtol=1e-12, atol=1e-12)   # value = base loss at pi_theta
    torch.testing.assert_close(met["base_loss"], base.detach(), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, leaves, retain_graph=True)
    want = torch.autograd.grad(ref_fn(True), leaves, retain_graph=True)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{method} grad {i}")
    # FPA must actually move the gradient away from the base method's at lam > 0
    base_grad = torch.autograd.grad(base, leaves)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(got, base_grad))
    assert met["c_w"].shape == met["c_l"].shape == (4,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_objective_sums_16bit_log_probs_in_float32(dtype):
    """bf16/fp16 log-probs are summed in float32: the same values upcast to float64 give the loss, coefficients
    and gradient to float32 precision (summed in bf16 over 512 tokens the loss was off by 0.65, c_w by 57%)."""
    g = torch.Generator().manual_seed(0)
    parts = [(-torch.rand(2, 512, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(6)]

    def run(dt):
        lw, ll = (t.detach().to(dt).requires_grad_() for t in parts[:2])
        c = FPALogProbs(lw, parts[2].to(dt), parts[4].to(dt), None)
        r = FPALogProbs(ll, parts[3].to(dt), parts[5].to(dt), None)
        loss, m = fpa_dpo_loss(c, r, beta=0.5)
        loss.backward()
        return loss.double(), m["c_w"].double(), lw.grad.double()
    got, want = run(dtype), run(torch.float64)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got[2], want[2].to(dtype).double(), rtol=1e-2, atol=1e-9)   # returned in dtype


@pytest.mark.parametrize("side", ["both", "rejected"])
@pytest.mark.parametrize("method", METHODS)
def test_objective_lam_zero_is_base(method, side):
    loss, met, ref_fn, leaves = _run(method, 0.0, side)
    base = ref_fn(False)
    torch.testing.assert_close(loss, base.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(met["fpa_loss"], base.detach(), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(loss, leaves, retain_graph=True)
    want = torch.autograd.grad(base, leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("side", ["both", "rejected"])
@pytest.mark.parametrize("method", METHODS)
def test_objective_second_derivative(method, side):
    """create_graph=True. With fpa_logp=None the loss is the base loss: a Hessian-vector product through it is
    the base method's (it was the surrogate's, whose detached coefficients dropped a term of the Hessian without
    an error). With fpa_logp given the coefficients sit under stop-gradient at pi_hat and have no derivative:
    the backward raises instead of returning that incomplete graph."""
    loss, _, ref_fn, leaves = _run(method, 1.0, side, no_fpa=True)
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in leaves]

    def hvp(f):
        grads = torch.autograd.grad(f, leaves, create_graph=True)
        return torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, vs)), leaves, retain_graph=True)
    for a, b in zip(hvp(loss), hvp(ref_fn(False))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    loss, _, _, leaves = _run(method, 1.0, side)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    assert all(x.abs().sum() > 0 for x in torch.autograd.grad(loss, leaves))   # first order unaffected


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_pipeline_fp32_and_no_fpa(backend):
    """fpa_logprobs (fp32) -> fpa_dpo_loss end to end; fpa_logp=None is the plain DPO gradient."""
    V = 1000
    lw, rw, tw, mw = _inputs(2, 5, V, torch.float32)
    ll, rl, tl_, ml = _inputs(2, 4, V, torch.float32)
    lw.requires_grad_(True)
    ll.requires_grad_(True)
    cw = FPALogProbs(*fpa_logprobs(lw, rw, tw, 0.0, mask=mw, backend=backend), mw)
    cl = FPALogProbs(*fpa_logprobs(ll, rl, tl_, 0.0, mask=ml, backend=backend), ml)
    loss, _ = fpa_dpo_loss(cw, cl, beta=0.1)
    g = torch.autograd.grad(loss, (lw, ll), retain_graph=True)
    plain, _ = fpa_dpo_loss(cw._replace(fpa_logp=None), cl._replace(fpa_logp=None), beta=0.1)
    g2 = torch.autograd.grad(plain, (lw, ll))
    ref_w = fpa_logprobs_ref(lw, rw, tw, 0.0, mask=mw)
    ref_l = fpa_logprobs_ref(ll, rl, tl_, 0.0, mask=ml)
    u = 0.1 * ((ref_w[0].sum(-1) - ref_w[1].sum(-1)) - (ref_l[0].sum(-1) - ref_l[1].sum(-1)))
    want = torch.autograd.grad(-F.logsigmoid(u).mean(), (lw, ll))
    for a, b, c in zip(g, g2, want):
        assert_close("dlogits", c, a, 1e-5)
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    logits, ref_logits, tokens, mask = _inputs(2, 3, 50, torch.float32)
    with pytest.raises(ValueError, match="ref_logits"):
        fpa_logprobs(logits, ref_logits[:, :2], tokens[:, :3], mask=mask)
    with pytest.raises(ValueError, match="ref_logits"):
        fpa_logprobs(logits, torch.randn(2, 3, 51), tokens, mask=mask)
    with pytest.raises(ValueError, match="tokens"):
        fpa_logprobs(logits, ref_logits, tokens)                 # padding ids are out of range without the mask
    with pytest.raises(ValueError, match="tokens"):
        fpa_logprobs(logits, ref_logits, tokens[:, :2], mask=mask)
    with pytest.raises(TypeError, match="tokens"):
        fpa_logprobs(logits, ref_logits, tokens.float(), mask=mask)
    with pytest.raises(TypeError, match="logits"):
        fpa_logprobs(logits.double(), ref_logits, tokens, mask=mask)
    with pytest.raises(TypeError, match="ref_logits"):
        fpa_logprobs(logits, ref_logits.long(), tokens, mask=mask)
    with pytest.raises(ValueError, match="lam"):
        fpa_logprobs(logits, ref_logits, tokens, -1.0, mask=mask)
    with pytest.raises(ValueError, match="temperature"):
        fpa_logprobs(logits, ref_logits, tokens, 1.0, 0.0, mask=mask)
    with pytest.raises(ValueError, match="backend"):
        fpa_logprobs(logits, ref_logits, tokens, mask=mask, backend="cuda")
    with pytest.raises(ValueError, match="mask"):
        fpa_logprobs(logits, ref_logits, tokens, mask=mask[:, :2])
    h, w = torch.randn(2, 3, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="ref_weight"):
        linear_fpa_logprobs(h, w, h, torch.randn(49, 8), tokens, mask=mask)
    with pytest.raises(ValueError, match="hidden"):
        linear_fpa_logprobs(torch.randn(2, 3, 7), w, h, w, tokens, mask=mask)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_fpa_logprobs(h, w, h, w, tokens, mask=mask, chunk_size=0)
    with pytest.raises(ValueError, match="ref_bias"):
        linear_fpa_logprobs(h, w, h, w, tokens, mask=mask, ref_bias=torch.randn(49))
    with pytest.raises(TypeError, match="fp32_head"):
        linear_fpa_logprobs(h.bfloat16(), w, h, w, tokens, mask=mask)
    with pytest.raises(ValueError, match="ref_hidden"):
        linear_fpa_logprobs(h, w, h[:, :2], w, tokens, mask=mask)
    with pytest.raises(ValueError, match="tokens"):
        linear_fpa_logprobs(h, w, h, w, tokens)                  # padding ids are out of range without the mask
    x = FPALogProbs(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), mask)
    with pytest.raises(ValueError, match="fpa_side"):
        fpa_dpo_loss(x, x, fpa_side="chosen")
    with pytest.raises(ValueError, match="ref_logp"):
        fpa_dpo_loss(x._replace(ref_logp=None), x)
    with pytest.raises(ValueError, match="batch size"):
        fpa_dpo_loss(x, FPALogProbs(torch.randn(3, 3), torch.randn(3, 3)))
    with pytest.raises(ValueError, match="fpa_logp"):
        fpa_simper_loss(x._replace(fpa_logp=torch.randn(2, 4)), x)
    with pytest.raises(ValueError, match="beta"):
        fpa_dpo_loss(x, x, beta=0.0)
    with pytest.raises(TypeError, match="desirable"):
        fpa_kto_loss(x, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="advantages"):
        fpa_offline_pg_loss(x, torch.randn(3))


@pytest.mark.parametrize("field", ("ref_logp", "fpa_logp", "mask", "desirable", "advantages"))
def test_objective_inputs_on_another_device_are_named(field):
    """A tensor of an FPALogProbs (or KTO's ``desirable``, the offline PG's ``advantages``) on another device than
    ``logp`` used to fail inside ``torch.where`` with a message naming no argument; the meta device stands in for
    a second device on a CPU-only machine."""
    B, T = 3, 4
    x = FPALogProbs(torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) > 0.3)
    desirable, adv = torch.tensor([True, False, True]), torch.randn(B)
    if field in FPALogProbs._fields:
        x = x._replace(**{field: getattr(x, field).to("meta")})
    elif field == "desirable":
        desirable = desirable.to("meta")
    else:
        adv = adv.to("meta")
    with pytest.raises(ValueError, match=field):
        if field == "desirable":
            fpa_kto_loss(x, desirable)
        elif field == "advantages":
            fpa_offline_pg_loss(x, adv)
        else:
            fpa_dpo_loss(x, FPALogProbs(torch.randn(B, T), torch.randn(B, T)))


def test_objectives_refuse_an_empty_batch():
    """Each objective is a mean over the batch: a batch of 0 sequences returned a NaN loss without an error
    (grpo_loss returns 0 for no tokens, which is a sum's identity, not a mean's)."""
    empty = FPALogProbs(torch.randn(0, 5), torch.randn(0, 5))
    for fn in (lambda: fpa_dpo_loss(empty, empty), lambda: fpa_rpo_loss(empty, empty),
               lambda: fpa_simper_loss(empty, empty),
               lambda: fpa_kto_loss(empty, torch.zeros(0, dtype=torch.bool), kl=0.0),
               lambda: fpa_offline_pg_loss(empty, torch.zeros(0))):
        with pytest.raises(ValueError, match="holds no sequence"):
            fn()
