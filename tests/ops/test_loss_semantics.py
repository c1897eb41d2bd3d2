"""The loss options and the hostile inputs of ``grpo_loss`` / ``linear_grpo_loss`` (both backends; Triton
under the interpreter) against the float64 reference ``grpo_loss_ref``.

Guards: the policy losses cispo / sapo / vespo, kl_clamp=None, use_bias_correction_kl, empty_sequences,
reduce=False, num_items_in_batch, the options object and the modules; exp overflow (huge log-ratios,
-inf old log-probs, huge ref - logp) gives finite values and gradients matching verl's clamped formulas;
old/ref/advantages are detached; NaN advantages at masked rows with sequence IS; -inf logits and -inf
bias entries; a NaN logit (or hidden state) makes its row and the loss NaN, in a masked row it is ignored;
overlapping logits with inplace_backward; scalar validation (bools, NaN, inf, numpy, 0-d tensors);
check_finite ignores masked rows; out-of-range ids poison the loss (default) or raise ("full"); an enclosing
autocast region changes no op's bits; a second derivative raises (also with inplace_backward / grad_in_forward),
and so does forward-mode AD (a dropped tangent would be a silent zero); torch.vmap matches a loop.
"""
import math
import warnings
import zlib

import numpy as np
import pytest
import torch

from gxpo_kernels.losses import GRPOLossOptions
from gxpo_kernels.ops import GRPOLoss, LinearGRPOLoss, fpa_logprobs, grpo_loss, linear_grpo_loss, token_logprobs
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref, token_logprobs_ref
from gxpo_kernels.ops import linear_fpa_logprobs, linear_token_logprobs
from tests._utils import assert_close

BACKENDS = ("triton", "torch")


def _inputs(B=4, T=7, V=300, dtype=torch.float32, seed=0, spread=0.6, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    if empty_row:
        mask[-1] = False
    adv = torch.randn(B, generator=g)
    adv[1] = -abs(adv[1]) - 0.3
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits, tokens)
    old = (lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return logits, tokens, adv, mask, old, ref


def _run_ours(logits, tokens, adv, mask, old, ref, backend, grad_out=None, **opts):
    x = logits.detach().clone().requires_grad_()
    loss, metrics = grpo_loss(x, tokens, adv, mask, old, ref, backend=backend, **opts)
    loss.backward(grad_out)
    return loss.detach(), metrics, x.grad


def _run_ref(logits, tokens, adv, mask, old, ref, grad_out=None, **opts):
    x = logits.detach().double().requires_grad_()
    loss, metrics = grpo_loss_ref(x, tokens, adv, mask, old, ref, **opts)
    loss.backward(None if grad_out is None else grad_out.double())
    return loss.detach(), metrics, x.grad


def _compare(ours, ref, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close("loss", ref[0], ours[0].double(), tol, atol=1e-6)
    for k in ref[1]:
        if k in ours[1]:
            assert_close(k, ref[1][k], ours[1][k].double(), tol, atol=1e-6)
    assert_close("dlogits", ref[2], ours[2].double(), 1e-4 if dtype == torch.float32 else 2e-2, atol=1e-7)


OPTION_CASES = [
    pytest.param(dict(policy_loss="cispo", eps_high=3.0), id="cispo"),
    pytest.param(dict(policy_loss="cispo", eps_high=0.1, beta=0.05, loss_agg_mode="seq-mean-token-sum"),
                 id="cispo-cap-binds-kl"),
    pytest.param(dict(policy_loss="sapo", loss_agg_mode="seq-mean-token-mean"), id="sapo"),
    pytest.param(dict(policy_loss="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5, entropy_coef=0.02),
                 id="sapo-temps-entropy"),
    pytest.param(dict(policy_loss="vespo"), id="vespo"),
    pytest.param(dict(policy_loss="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0,
                      vespo_lambda_neg=1.5, loss_agg_mode="seq-mean-token-sum-norm", max_length=11), id="vespo-shape"),
    pytest.param(dict(beta=0.2, kl_clamp=None, use_bias_correction_kl=True), id="kl-unclamped-bias-corrected"),
    pytest.param(dict(beta=0.2, kl_clamp=0.05, importance_sampling="sequence", use_bias_correction_kl=True),
                 id="kl-clamp-binds-gspo"),
    pytest.param(dict(loss_agg_mode="seq-mean-token-mean", empty_sequences="skip"), id="empty-skip-token-mean"),
    pytest.param(dict(loss_agg_mode="seq-mean-token-sum", empty_sequences="skip", dual_clip=3.0),
                 id="empty-skip-token-sum"),
    pytest.param(dict(reduce=False, beta=0.1, entropy_coef=0.01), id="per-token"),
    pytest.param(dict(policy_loss="sapo", reduce=False), id="per-token-sapo"),
    pytest.param(dict(num_items_in_batch=37), id="num-items-int"),
    pytest.param(dict(num_items_in_batch=torch.tensor(23.0), beta=0.1), id="num-items-tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTION_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_options_vs_float64_reference(opts, backend, dtype):
    logits, tokens, adv, mask, old, ref = _inputs(dtype=dtype, seed=zlib.crc32(repr(sorted(opts.items())).encode()) % 1000)
    grad_out = torch.randn(tokens.shape) if opts.get("reduce") is False else None
    ours = _run_ours(logits, tokens, adv, mask, old, ref, backend, grad_out, **opts)
    expect = _run_ref(logits, tokens, adv, mask, old, ref, grad_out, **opts)
    _compare(ours, expect, dtype)
    if opts.get("reduce") is False:
        assert ours[0].shape == tokens.shape and bool((ours[0][~mask] == 0).all())


def test_vespo_and_cispo_differ_from_clip_and_weights_are_detached():
    """Guards that the new policy losses are not silently the clipped surrogate."""
    logits, tokens, adv, mask, old, ref = _inputs()
    out = {p: _run_ours(logits, tokens, adv, mask, old, ref, "torch", policy_loss=p)[2]
           for p in ("clip", "cispo", "sapo", "vespo")}
    for p in ("cispo", "sapo", "vespo"):
        assert (out[p] - out["clip"]).abs().max() > 1e-4, p


def test_empty_sequences_rule_matters_only_with_an_empty_row():
    logits, tokens, adv, mask, old, ref = _inputs()
    a = grpo_loss(logits, tokens, adv, mask, old, loss_agg_mode="seq-mean-token-mean", backend="torch")[0]
    b = grpo_loss(logits, tokens, adv, mask, old, loss_agg_mode="seq-mean-token-mean", empty_sequences="skip",
                  backend="torch")[0]
    B = tokens.shape[0]
    assert torch.allclose(a * B / (B - 1), b, rtol=1e-6)


def test_options_object_and_kwargs_are_one_definition():
    logits, tokens, adv, mask, old, ref = _inputs()
    opts = GRPOLossOptions(eps_high=0.28, beta=0.1, loss_agg_mode="seq-mean-token-sum")
    a = grpo_loss(logits, tokens, adv, mask, old, ref, options=opts, backend="torch")[0]
    b = grpo_loss(logits, tokens, adv, mask, old, ref, eps_high=0.28, beta=0.1, loss_agg_mode="seq-mean-token-sum",
                  backend="torch")[0]
    c = GRPOLoss(opts, backend="torch")(logits, tokens, adv, mask, old, ref)[0]
    d = grpo_loss(logits, tokens, adv, mask, old, ref, options=opts, beta=0.0, backend="torch")[0]  # override
    assert a == b == c and d != a
    with pytest.raises(TypeError, match="unknown loss option"):
        grpo_loss(logits, tokens, adv, mask, old, ref, eps=0.2)
    with pytest.raises(TypeError, match="unknown loss option"):
        LinearGRPOLoss(epsilon_high=0.2)
    assert LinearGRPOLoss(opts).options is opts


# ------------------------------------------------------------------------------------------ exp overflow
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("spread", [1e-2, 1e-3, 1e-4])
def test_k3_near_the_reference_policy_keeps_its_digits(backend, spread):
    """A policy close to its reference (early training) has |log π_ref − log π| ~ 1e-4: there e^d − d − 1 in
    float32 rounds e^d to 1 + d and the logged KL read 0 (100% off); the loss and the KL metric now follow the
    float64 reference to the precision of the float32 log-probs."""
    g = torch.Generator().manual_seed(7)
    B, T, V = 4, 8, 1000
    logits = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    adv = torch.zeros(B)                                   # only the KL term: loss = beta * mean k3
    lp, _ = token_logprobs_ref(logits, tokens)
    ref = (lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    loss, m = grpo_loss(logits, tokens, adv, None, None, ref, beta=1.0, backend=backend)
    rl, rm = grpo_loss_ref(logits.double(), tokens, adv, None, None, ref, beta=1.0)
    # d carries the float32 rounding of log π (about 5e-7 at log π ~ -8): k3 ~ d^2 / 2 inherits 2x its share
    tol = 2 * 1e-6 / spread + 1e-5
    assert abs(float(m["kl"]) - float(rm["kl"])) <= tol * float(rm["kl"])
    assert abs(float(loss) - float(rl)) <= tol * float(rl)


def test_kl_k3_against_float64():
    from gxpo_kernels.losses import kl_k3
    d = torch.tensor([1e-8, -1e-6, 1e-4, -3e-3, 0.02, 0.7, -1.5, 8.0, -25.0])
    want = torch.expm1(d.double()) - d.double()
    assert kl_k3(d).dtype == torch.float32
    torch.testing.assert_close(kl_k3(d).double(), want, rtol=1e-6, atol=0)
    dc = d.double().clamp(-20, 20)
    torch.testing.assert_close(kl_k3(d, 20.0).double(), torch.expm1(dc) - dc, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_past_the_log_ratio_clamp_is_constant(backend):
    """With kl_clamp=None (the TRL hook's setting) the clamped k3 is constant past |ref - logp| = 20, with zero
    gradient: before, only e^d's argument was clamped, so k3 = e^20 - d - 1 fell as d grew (negative for a ref
    far above logp, -inf at logp = -inf) and its gradient pushed logp away from the reference."""
    logits, tokens, adv, mask, old, _ = _inputs(empty_row=False, seed=5)
    mask[1, 0] = True
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits, tokens)
    ref = (lp.float() + 30.0).clamp(max=0.0)                      # d in [20, 30] where lp < -20, else smaller
    ref[0, 0] = lp[0, 0] + 30.0                                   # d = 30 (a log-prob above 0 is no matter here)
    ref[1, 0] = lp[1, 0] + 1e9                                    # d = 1e9: was a negative "KL" of about -1e9
    x = logits.float().requires_grad_()
    loss, metrics = grpo_loss(x, tokens, torch.zeros_like(adv), mask, old, ref, beta=1.0, kl_clamp=None,
                              reduce=False, backend=backend)
    k3_20 = math.expm1(20.0) - 20.0
    torch.testing.assert_close(loss[0, 0].double(), torch.tensor(k3_20, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss[1, 0].double(), torch.tensor(k3_20, dtype=torch.float64), rtol=1e-6, atol=0)
    (loss[0, 0] + loss[1, 0]).backward()
    assert torch.count_nonzero(x.grad[:, 0]) == 0
    rl, _ = grpo_loss_ref(logits, tokens, torch.zeros_like(adv), mask, old, ref, beta=1.0, kl_clamp=None,
                          reduce=False)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-5)


def _finite_grad_case(kind):
    logits, tokens, adv, mask, old, ref = _inputs(empty_row=False, seed=3)
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits, tokens)
    opts = {}
    if kind == "ref-minus-logp-90":
        ref = lp.float().clone()
        ref[0, 0] = lp[0, 0] + 90.0
        opts = dict(beta=0.1)
    elif kind == "ref-minus-logp-90-unclamped-kl":
        ref = lp.float().clone()
        ref[0, 0] = lp[0, 0] + 90.0
        opts = dict(beta=0.1, kl_clamp=None)
    elif kind == "logp-minus-old-95":
        old = old.clone()
        old[0, 0], old[1, 0] = lp[0, 0] - 95.0, lp[1, 0] - 95.0   # a positive and a negative advantage
    elif kind in ("old-minus-inf", "old-minus-inf-dual-clip"):
        old = old.clone()
        old[0, 0], old[1, 0] = -math.inf, -math.inf       # a positive and a negative advantage
        opts = dict(dual_clip=3.0) if kind.endswith("dual-clip") else {}
    elif kind == "old-minus-inf-gspo":
        old = old.clone()
        old[0, 1] = -math.inf
        opts = dict(importance_sampling="sequence")
    return (logits, tokens, adv, mask, old, ref), opts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ref-minus-logp-90", "ref-minus-logp-90-unclamped-kl", "logp-minus-old-95",
                                  "old-minus-inf", "old-minus-inf-dual-clip", "old-minus-inf-gspo"])
def test_exp_overflow_gives_finite_values_and_gradients(kind, backend):
    args, opts = _finite_grad_case(kind)
    ours = _run_ours(*args, backend, **opts)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[2]).all()
    _compare(ours, _run_ref(*args, **opts))


def test_log_ratio_clamp_matches_verl_formula():
    """At |log-ratio| = 30 the loss is verl's compute_policy_loss_vanilla value (clamp to [-20, 20] before exp),
    and k3 is verl's low_var_kl (argument clamped to [-20, 20], value to [-10, 10])."""
    B, T, V = 1, 2, 50
    logits = torch.randn(B, T, V, dtype=torch.float64).float()
    tokens = torch.randint(0, V, (B, T))
    lp, _ = token_logprobs_ref(logits, tokens)
    old = (lp - torch.tensor([[30.0, -30.0]], dtype=torch.float64)).float()
    ref = (lp + torch.tensor([[30.0, 1.0]], dtype=torch.float64)).float()
    adv = torch.tensor([-1.5])
    loss, m = grpo_loss(logits, tokens, adv, None, old, ref, beta=0.5, backend="torch")
    # verl, written out: negative_approx_kl clamped to +-20, pg = max(-A r, -A clip(r)); k3 as low_var_kl
    nk = (lp - old.double()).clamp(-20, 20)
    r = nk.exp()
    pg = torch.maximum(1.5 * r, 1.5 * r.clamp(0.8, 1.2))
    kl_arg = (ref.double() - lp).clamp(-20, 20)
    k3 = (kl_arg.exp() - kl_arg - 1).clamp(-10, 10)
    expect = (pg + 0.5 * k3).mean()
    assert abs(float(loss) - float(expect)) <= 1e-5 * abs(float(expect))
    assert abs(float(m["kl"]) - float(k3.mean())) <= 1e-6 * float(k3.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_exp_overflow_keeps_dhidden_dweight_finite(backend):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 5, 24, 130
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    tokens = torch.randint(0, V, (B, T), generator=g)
    z = h.double() @ w.double().T
    lp, _ = token_logprobs_ref(z, tokens)
    old = lp.float().clone()
    old[0, 2] = -math.inf
    ref = lp.float().clone()
    ref[1, 1] += 95.0
    adv = torch.tensor([0.7, -1.2])
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_grpo_loss(hh, ww, tokens, adv, None, old, ref, beta=0.1, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()
    zd = z.clone().requires_grad_()
    rl, _ = grpo_loss_ref(zd, tokens, adv, None, old, ref, beta=0.1)
    rl.backward()
    assert_close("loss", rl.detach(), loss.detach().double(), 1e-5)
    assert_close("dW", (zd.grad.transpose(1, 2) @ h.double()).sum(0), ww.grad.double(), 1e-4)


# ---------------------------------------------------------------------------- inputs that carry no gradient
@pytest.mark.parametrize("backend", BACKENDS)
def test_old_ref_advantages_are_detached(backend):
    """old log-probs computed outside no_grad from the same logits must not cancel the policy gradient."""
    logits, tokens, adv, mask, _, _ = _inputs(seed=5)
    x = logits.clone().requires_grad_()
    old, _ = token_logprobs(x, tokens, backend=backend)          # attached to x's graph
    ref = (old + 0.3).detach().requires_grad_()
    a = adv.clone().requires_grad_()
    loss, _ = grpo_loss(x, tokens, a, mask, old, ref, beta=0.1, backend=backend)
    loss.backward()
    y = logits.clone().requires_grad_()
    loss2, _ = grpo_loss(y, tokens, adv, mask, old.detach(), ref.detach(), beta=0.1, backend=backend)
    loss2.backward()
    assert y.grad.abs().max() > 1e-3
    assert_close("dlogits", y.grad.double(), x.grad.double(), 1e-6)
    assert a.grad is None and ref.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_is_with_nan_advantages_at_masked_positions(backend):
    logits, tokens, _, mask, old, ref = _inputs(seed=6)
    adv = torch.randn(tokens.shape)
    adv[~mask] = float("nan")
    adv[0, -1], mask[0, -1] = float("inf"), False
    ours = _run_ours(logits, tokens, adv, mask, old, ref, backend, importance_sampling="sequence")
    clean = torch.where(mask, adv, torch.zeros(()))
    _compare(ours, _run_ref(logits, tokens, clean, mask, old, ref, importance_sampling="sequence"))


# ------------------------------------------------------------------------------------------- -inf logits
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_minus_inf_logits_are_probability_zero(backend, dtype):
    logits, tokens, adv, mask, old, ref = _inputs(dtype=dtype, seed=7)
    banned = torch.zeros(logits.shape, dtype=torch.bool)
    banned[..., 5:40] = True
    banned[0, 0, 100:] = True
    banned &= tokens[..., None] != torch.arange(logits.shape[-1])   # never ban the sampled token
    hostile = logits.masked_fill(banned, float("-inf"))
    finite = logits.double().masked_fill(banned, -1e4)               # exp(-1e4) == 0 in float64
    opts = dict(entropy_coef=0.05, beta=0.1)
    ours = _run_ours(hostile, tokens, adv, mask, old, ref, backend, **opts)
    assert torch.isfinite(ours[2]).all() and bool((ours[2][banned] == 0).all())
    _compare(ours, _run_ref(finite, tokens, adv, mask, old, ref, **opts), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_coef", (0.0, 0.03))
def test_linear_minus_inf_bias_is_probability_zero(backend, entropy_coef):
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 2, 6, 16, 70
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g)
    tokens = torch.randint(0, V - 10, (B, T), generator=g)
    b_inf = b.clone()
    b_inf[V - 10:] = -math.inf
    adv, mask = torch.tensor([1.0, -0.5]), torch.rand(B, T, generator=g) > 0.2
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b_inf))
    loss, m = linear_grpo_loss(hh, ww, tokens, adv, mask, bias=bb, entropy_coef=entropy_coef, backend=backend)
    loss.backward()
    for t in (loss, m["entropy"], hh.grad, ww.grad, bb.grad[: V - 10]):
        assert torch.isfinite(t).all()
    zr = (h.double() @ w.double().T + b.double().masked_fill(torch.arange(V) >= V - 10, -1e4)).requires_grad_()
    rl, rm = grpo_loss_ref(zr, tokens, adv, mask, entropy_coef=entropy_coef)
    rl.backward()
    assert_close("loss", rl.detach(), loss.detach().double(), 1e-5)
    assert_close("entropy", rm["entropy"], m["entropy"].double(), 1e-5)
    assert_close("dh", (zr.grad @ w.double()), hh.grad.double(), 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fpa_minus_inf_in_policy_and_reference(backend):
    g = torch.Generator().manual_seed(9)
    B, T, V = 2, 4, 90
    logits, refl = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, 60, (B, T), generator=g)
    logits[..., 60:] = -math.inf
    refl[..., 60:] = -math.inf
    x = logits.clone().requires_grad_()
    logp, ref_logp, fpa_logp = fpa_logprobs(x, refl, tokens, lam=0.5, backend=backend)
    logp.sum().backward()
    sub = slice(0, 60)
    h, r = logits[..., sub].double(), refl[..., sub].double()
    expect = torch.log_softmax(1.5 * h - 0.5 * r, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.isfinite(x.grad).all() and torch.isfinite(fpa_logp).all()
    assert_close("fpa_logp", expect, fpa_logp.double(), 1e-5)


# -------------------------------------------------------------------------------------------- NaN logits
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_nan_logit_poisons_its_row_and_the_loss(backend, dtype):
    """A NaN logit (not the target) in an unmasked row: that row's log-prob, entropy and dlogits and the loss are
    NaN on both backends, the other rows' gradients stay finite and exact; a NaN in a masked row changes
    nothing; -inf logits next to the NaN row keep probability 0."""
    logits, tokens, adv, mask, old, ref = _inputs(dtype=dtype, seed=11)
    logits[..., 5:40] = float("-inf")
    tokens = tokens.clamp(min=40)
    clean = logits.clone()
    assert mask[0, 1] and not mask[-1].any()
    logits[0, 1, 200] = float("nan")
    logits[-1, 2, 7] = float("nan")
    opts = dict(entropy_coef=0.05, beta=0.1)
    loss, metrics, grad = _run_ours(logits, tokens, adv, mask, old, ref, backend, **opts)
    assert torch.isnan(loss) and torch.isnan(metrics["entropy"])
    assert torch.isnan(grad[0, 1].float()).all()
    rows = torch.ones(mask.shape, dtype=torch.bool)
    rows[0, 1] = False
    assert torch.isfinite(grad[rows].float()).all() and torch.all(grad[-1] == 0)
    # per-token log-probs: only the NaN row is NaN
    with torch.no_grad():
        lp, ent = token_logprobs(logits, tokens, mask=mask, backend=backend)
    assert torch.isnan(lp[0, 1]) and torch.isnan(ent[0, 1])
    assert torch.isfinite(lp[rows]).all() and torch.isfinite(ent[rows]).all()
    # with the NaN row masked as well, the loss is the one of the clean logits
    mask[0, 1] = False
    ours = _run_ours(logits, tokens, adv, mask, old, ref, backend, **opts)
    assert torch.equal(ours[0], _run_ours(clean, tokens, adv, mask, old, ref, backend, **opts)[0])
    _compare(ours, _run_ref(clean.double().clamp(min=-1e4), tokens, adv, mask, old, ref, **opts), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fpa_nan_logit_in_policy_or_reference(backend):
    """fpa_logprobs: a NaN policy logit makes logp and fpa_logp of its row NaN (and its gradient), a NaN
    reference logit ref_logp and fpa_logp; the other rows are as without the NaN; masked rows stay 0."""
    g = torch.Generator().manual_seed(12)
    B, T, V = 2, 4, 90
    logits, refl = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, 60, (B, T), generator=g)
    logits[..., 60:] = -math.inf
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    base = fpa_logprobs(logits, refl, tokens, lam=0.5, mask=mask, backend=backend)
    bad, bad_ref = logits.clone(), refl.clone()
    bad[0, 1, 70] = float("nan")            # next to the -inf policy logits
    bad_ref[1, 0, 3] = float("nan")
    bad[1, 3, 5] = bad_ref[1, 3, 6] = float("nan")      # masked
    x = bad.clone().requires_grad_()
    logp, ref_logp, fpa_logp = fpa_logprobs(x, bad_ref, tokens, lam=0.5, mask=mask, backend=backend)
    logp.sum().backward()
    nan = torch.zeros(3, B, T, dtype=torch.bool)
    nan[0, 0, 1] = nan[2, 0, 1] = True
    nan[1, 1, 0] = nan[2, 1, 0] = True
    for i, (name, t) in enumerate((("logp", logp), ("ref_logp", ref_logp), ("fpa_logp", fpa_logp))):
        assert torch.equal(torch.isnan(t), nan[i]), name
        assert torch.equal(t[~nan[i]], base[i][~nan[i]]), name
    assert torch.isnan(x.grad[0, 1]).all() and torch.all(x.grad[1, 3] == 0)
    rows = torch.ones(B, T, dtype=torch.bool)
    rows[0, 1] = False
    assert torch.isfinite(x.grad[rows]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_nan_hidden_poisons_only_its_row(backend):
    """Fused-linear ops: NaN in the hidden state of an unmasked row makes that row's log-prob, entropy and
    FPA log-probs and the loss NaN, on both backends; in a masked row it changes nothing."""
    g = torch.Generator().manual_seed(13)
    B, T, H, V = 2, 5, 16, 70
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    adv, mask = torch.tensor([1.0, -0.5]), torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    bad = h.clone()
    bad[0, 2, 3] = float("nan")
    bad[1, 4] = float("nan")                 # masked
    nan = torch.zeros(B, T, dtype=torch.bool)
    nan[0, 2] = True
    lp, ent = linear_token_logprobs(bad, w, tokens, bias=b, mask=mask, backend=backend)
    lp0, ent0 = linear_token_logprobs(h, w, tokens, bias=b, mask=mask, backend=backend)
    for name, t, t0 in (("logp", lp, lp0), ("entropy", ent, ent0)):
        assert torch.equal(torch.isnan(t), nan), name
        assert_close(name, t0[~nan].double(), t[~nan].double(), 1e-6, atol=1e-6)
    for t in linear_fpa_logprobs(bad, w, bad, w, tokens, bias=b, ref_bias=b, mask=mask, backend=backend):
        assert torch.equal(torch.isnan(t), nan)
    hh = bad.clone().requires_grad_()
    loss, _ = linear_grpo_loss(hh, w, tokens, adv, mask, bias=b, entropy_coef=0.05, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(hh.grad[0, 2]).all()
    mask[0, 2] = False
    assert torch.isfinite(linear_grpo_loss(bad, w, tokens, adv, mask, bias=b, backend=backend)[0])


# -------------------------------------------------------------------------------------- in-place backward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ("unfold", "expand"))
def test_inplace_backward_refuses_overlapping_logits(backend, layout):
    B, T, V = 2, 5, 64
    if layout == "unfold":
        base = torch.randn(B, T * 4 + V)
        logits = base.unfold(1, V, 4)[:, :T]                 # rows overlap: strides (., 4, 1)
    else:
        logits = torch.randn(1, T, V).expand(B, T, V)         # stride 0 over the batch
    tokens = torch.randint(0, V, (B, T))
    adv = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="overlap"):
        grpo_loss(logits.requires_grad_() if logits.is_leaf else logits, tokens, adv, inplace_backward=True,
                  backend=backend)
    # out of place stays exact
    leaf = logits.detach().clone().requires_grad_()
    ours = _run_ours(logits.detach(), tokens, adv, None, None, None, backend, entropy_coef=0.1)
    _compare(ours, _run_ref(logits.detach(), tokens, adv, None, None, None, entropy_coef=0.1))
    del leaf


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name,value,exc", [
    ("entropy_coef", float("nan"), ValueError), ("beta", float("inf"), ValueError), ("beta", -0.1, ValueError),
    ("max_length", True, TypeError), ("max_length", 2.5, TypeError), ("eps_high", True, TypeError),
    ("temperature", float("inf"), ValueError), ("temperature", 1e-40, ValueError), ("temperature", 0, ValueError),
    ("temperature", "1", TypeError), ("dual_clip", 1.0, ValueError), ("kl_clamp", 0.0, ValueError),
    ("sapo_temperature_neg", 0.0, ValueError), ("vespo_lambda_pos", float("nan"), ValueError),
    ("policy_loss", "ppo", ValueError), ("empty_sequences", "drop", ValueError), ("reduce", 0, TypeError),
])
def test_bad_scalars_raise_naming_the_option_and_range(name, value, exc):
    logits, tokens, adv, mask, old, ref = _inputs()
    with pytest.raises(exc, match=name):
        grpo_loss(logits, tokens, adv, mask, old, ref, **{name: value})
    with pytest.raises(exc, match=name):
        LinearGRPOLoss(**{name: value})


@pytest.mark.parametrize("linear", (False, True))
def test_num_items_in_batch_tensor_must_hold_one_real_number(linear):
    """A (k,) count used to broadcast the 0-d loss into a (k,) tensor without an error; a one-element tensor of
    any shape is the count it holds."""
    logits, tokens, adv, mask, old, ref = _inputs(V=40)
    B, T, V = logits.shape
    if linear:
        hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
        call = lambda n: linear_grpo_loss(hidden, weight, tokens, adv, mask, old, num_items_in_batch=n,  # noqa: E731
                                          backend="torch")[0]
    else:
        call = lambda n: grpo_loss(logits, tokens, adv, mask, old, num_items_in_batch=n, backend="torch")[0]  # noqa
    base = call(torch.tensor(23.0))
    assert base.shape == ()
    for n in (torch.tensor([23.0]), torch.tensor([[23]]), 23):
        assert torch.equal(call(n), base)
    for n in (torch.tensor([23.0, 5.0]), torch.zeros(0), torch.tensor(True), torch.tensor(23 + 0j)):
        with pytest.raises(TypeError, match="num_items_in_batch"):
            call(n)


def test_error_message_states_the_range():
    with pytest.raises(ValueError, match=r"eps_low must be in \[0, 1\)"):
        GRPOLossOptions(eps_low=1.0)
    with pytest.raises(ValueError, match=r"temperature must be in \[1e-6, 1e6\]"):
        GRPOLossOptions(temperature=1e-40)


def test_numpy_and_0d_tensor_scalars_and_b1_advantages_are_accepted():
    logits, tokens, adv, mask, old, ref = _inputs()
    base = grpo_loss(logits, tokens, adv, mask, old, ref, beta=0.1, temperature=0.8, backend="torch")[0]
    for beta, temp in ((np.float32(0.1), np.float64(0.8)), (torch.tensor(0.1), torch.tensor(0.8))):
        o = grpo_loss(logits, tokens, adv[:, None], mask, old, ref, beta=beta, temperature=temp, backend="torch")[0]
        assert torch.allclose(o, base, rtol=1e-6)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logits, tokens, adv[:, None].expand(-1, 2), mask, old, ref)


def test_scalar_tensor_that_requires_grad_is_refused():
    """A 0-d tensor option is read as a number, so a learnable one (temperature scaling, a tuned entropy or KL
    coefficient, FPA's lam) got no gradient without an error; it is refused, naming it, unless detached or under
    no_grad (where nothing is differentiated)."""
    logits, tokens, adv, mask, old, ref = _inputs()
    p = torch.tensor(0.8, requires_grad=True)
    calls = {
        "temperature": lambda t: token_logprobs(logits, tokens, t),
        "entropy_coef": lambda t: grpo_loss(logits, tokens, adv, mask, old, entropy_coef=t, backend="torch"),
        "beta": lambda t: grpo_loss(logits, tokens, adv, mask, old, ref, beta=t),
        "lam": lambda t: fpa_logprobs(logits, logits, tokens, lam=t),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name} is a tensor that requires grad"):
            call(p)
        call(p.detach())
        with torch.no_grad():
            call(p)


@pytest.mark.parametrize("op", ("token_logprobs", "linear_token_logprobs", "fpa_logprobs"))
@pytest.mark.parametrize("t", (float("inf"), 1e-40, float("nan"), True))
def test_temperature_rule_is_the_same_everywhere(op, t):
    logits, tokens = torch.randn(1, 3, 20), torch.randint(0, 20, (1, 3))
    with pytest.raises((ValueError, TypeError), match="temperature"):
        if op == "token_logprobs":
            token_logprobs(logits, tokens, t)
        elif op == "linear_token_logprobs":
            linear_token_logprobs(torch.randn(1, 3, 8), torch.randn(20, 8), tokens, t)
        else:
            fpa_logprobs(logits, logits, tokens, lam=1.0, temperature=t)


@pytest.mark.parametrize("op", ("grpo_loss", "linear_grpo_loss", "token_logprobs", "linear_token_logprobs",
                                "fpa_logprobs", "linear_fpa_logprobs"))
def test_low_temperature_warns_with_the_expected_error(op):
    # below 0.01 fp32 log-probs lose ~4e-6 / T (docs/validation.md): every op says so instead of staying silent
    logits, tokens, adv, mask, old, ref = _inputs()
    h, w = torch.randn(*tokens.shape, 8), torch.randn(logits.shape[-1], 8)

    def call(t):
        if op == "grpo_loss":
            grpo_loss(logits, tokens, adv, mask, old, temperature=t, backend="torch")
        elif op == "linear_grpo_loss":
            linear_grpo_loss(h, w, tokens, adv, mask, old, temperature=t, backend="torch")
        elif op == "token_logprobs":
            token_logprobs(logits, tokens, t, backend="torch")
        elif op == "linear_token_logprobs":
            linear_token_logprobs(h, w, tokens, t, backend="torch")
        elif op == "fpa_logprobs":
            fpa_logprobs(logits, logits, tokens, lam=1.0, temperature=t, backend="torch")
        else:
            linear_fpa_logprobs(h, w, h, w, tokens, lam=1.0, temperature=t, backend="torch")
    with pytest.warns(UserWarning, match=r"temperature=0\.001: .* off by about 4e-03"):
        call(1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(0.01)


def test_fpa_lam_accepts_0d_tensor():
    logits, tokens = torch.randn(1, 3, 20), torch.randint(0, 20, (1, 3))
    a = fpa_logprobs(logits, logits * 0.5, tokens, lam=torch.tensor(1.0), backend="torch")[2]
    b = fpa_logprobs(logits, logits * 0.5, tokens, lam=1.0, backend="torch")[2]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_ignores_masked_rows(backend):
    logits, tokens, adv, mask, old, ref = _inputs()
    bad = logits.clone()
    bad[~mask] = float("nan")
    a = grpo_loss(bad, tokens, adv, mask, old, check_finite=True, backend=backend)[0]
    b = grpo_loss(logits, tokens, adv, mask, old, backend=backend)[0]
    assert torch.equal(a, b)
    bad[0, 0, 3] = float("inf")                           # mask[0, 0] is True
    with pytest.raises(ValueError, match="logits"):
        grpo_loss(bad, tokens, adv, mask, old, check_finite=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear", (False, True))
def test_out_of_range_ids_poison_the_loss_or_raise_with_full_validation(backend, linear):
    B, T, V, H = 2, 4, 30, 8
    tokens = torch.randint(0, V, (B, T))
    tokens[1, 2] = V + 3
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    if linear:
        h, w = torch.randn(B, T, H), torch.randn(V, H)
        call = lambda **k: linear_grpo_loss(h, w, tokens, adv, mask, backend=backend, **k)  # noqa: E731
    else:
        logits = torch.randn(B, T, V)
        call = lambda **k: grpo_loss(logits, tokens, adv, mask, backend=backend, **k)  # noqa: E731
    assert torch.isnan(call()[0])
    with pytest.raises(ValueError, match="tokens"):
        call(validate="full")
    mask[1, 2] = False                                     # masked: ignored at both levels
    assert torch.isfinite(call()[0]) and torch.isfinite(call(validate="full")[0])
    with pytest.raises(ValueError, match="validate"):
        call(validate="none")


def test_full_validation_checks_mask_values():
    logits, tokens, adv, _, old, _ = _inputs()
    m = torch.ones(tokens.shape)
    m[0, 0] = 2.0
    with pytest.raises(ValueError, match="0/1"):
        grpo_loss(logits, tokens, adv, m, old, validate="full")
    grpo_loss(logits, tokens, adv, m, old)                 # cheap: non-zero counts as True


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_fpa_minus_inf_bias_in_policy_and_reference(backend):
    from gxpo_kernels.ops import linear_fpa_logprobs
    g = torch.Generator().manual_seed(10)
    B, T, H, V = 2, 5, 16, 80
    h, hr = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    w, wr = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, H, generator=g) * 0.3
    b, br = torch.randn(V, generator=g), torch.randn(V, generator=g)
    b[V - 15:], br[V - 15:] = -math.inf, -math.inf
    tokens = torch.randint(0, V - 15, (B, T), generator=g)
    hh = h.clone().requires_grad_()
    logp, ref_logp, fpa_logp = linear_fpa_logprobs(hh, w, hr, wr, tokens, lam=0.7, bias=b, ref_bias=br,
                                                   backend=backend)
    logp.sum().backward()
    keep = slice(0, V - 15)
    z = h.double() @ w[keep].double().T + b[keep].double()
    zr = hr.double() @ wr[keep].double().T + br[keep].double()
    expect = torch.log_softmax(1.7 * z - 0.7 * zr, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.isfinite(hh.grad).all()
    assert_close("fpa_logp", expect, fpa_logp.double(), 1e-5)


@pytest.mark.parametrize("scale", ("std", "none"))
def test_group_advantages_eps0_constant_groups_are_zero(scale):
    from gxpo_kernels import group_advantages
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, group_size=3, eps=0.0, scale=scale)
    assert torch.isfinite(a).all() and bool((a[:6] == 0).all())
    mixed = r[6:].double()
    expect = (mixed - mixed.mean()) / (mixed.std() if scale == "std" else 1.0)
    torch.testing.assert_close(a[6:].double(), expect)
    with pytest.raises(TypeError, match="eps"):
        group_advantages(r, group_size=3, eps=True)


def test_fpa_kto_rejects_nan_kl_and_bool_beta():
    from gxpo_kernels.ops import FPALogProbs, fpa_kto_loss
    lp = torch.randn(3, 4, requires_grad=True)
    batch = FPALogProbs(lp, torch.randn(3, 4), torch.randn(3, 4))
    desirable = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="kl"):
        fpa_kto_loss(batch, desirable, kl=float("nan"))
    with pytest.raises(TypeError, match="beta"):
        fpa_kto_loss(batch, desirable, beta=True)
    fpa_kto_loss(batch, desirable, kl=np.float32(0.1), beta=torch.tensor(0.2))[0].backward()
    assert torch.isfinite(lp.grad).all()


def test_fpa_objectives_detach_their_constants():
    """The FPA objectives follow the same policy: only logp carries gradient."""
    from gxpo_kernels.ops import FPALogProbs, fpa_offline_pg_loss
    lp = torch.randn(3, 4, requires_grad=True)
    fpa = (lp * 1.1).detach().requires_grad_()
    adv = torch.randn(3, requires_grad=True)
    fpa_offline_pg_loss(FPALogProbs(lp, None, fpa), adv)[0].backward()
    assert lp.grad is not None and fpa.grad is None and adv.grad is None


def _autocast_cases(backend):
    """(name, fp32 inputs, fn) for every op with a kernel; fn returns the outputs that carry a gradient."""
    g = torch.Generator().manual_seed(7)
    B, T, V, H = 2, 5, 300, 64
    logits, ref_logits = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g)
    h, w, b = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4, torch.randn(V, generator=g)
    tok, mask = torch.randint(0, V, (B, T), generator=g), torch.rand(B, T, generator=g) > 0.25
    adv, old = torch.randn(B, generator=g), -torch.rand(B, T, generator=g) * 3
    kw = dict(backend=backend)
    return [
        ("token_logprobs", [logits], lambda x: token_logprobs(x, tok, 0.7, mask=mask, **kw)),
        ("fpa_logprobs", [logits], lambda x: fpa_logprobs(x, ref_logits, tok, 0.5, 0.8, mask=mask, **kw)[:1]),
        ("linear_token_logprobs", [h, w, b],
         lambda x, y, z: linear_token_logprobs(x, y, tok, 0.7, bias=z, mask=mask, **kw)),
        ("linear_grpo_loss", [h, w, b],
         lambda x, y, z: linear_grpo_loss(x, y, tok, adv, mask, old, bias=z, entropy_coef=0.01, **kw)[:1]),
        ("linear_grpo_loss-grad_in_forward", [h, w, b],
         lambda x, y, z: linear_grpo_loss(x, y, tok, adv, mask, old, bias=z, entropy_coef=0.01,
                                          grad_in_forward=True, **kw)[:1]),
        ("linear_fpa_logprobs", [h, w, b], lambda x, y, z: linear_fpa_logprobs(x, y, h, w, tok, 0.5, 0.8, bias=z,
                                                                               mask=mask, **kw)[:1]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_region_does_not_lower_the_ops_precision(backend):
    """Found by fuzzing: an enclosing torch.autocast(cpu, bf16) leaked into the kernels' torch code (the torch
    backend's GEMMs and entropy dot, the Triton backward's d(hidden)/d(weight) GEMMs run by grad_in_forward),
    so fp32 inputs gave bf16-rounded log-probs and gradients (up to 5e-2 off) or crashed the fused head. The
    ops pick their own precision: under autocast (forward, or forward and backward) they must equal the plain
    call bit for bit."""
    for name, inputs, fn in _autocast_cases(backend):
        results = []
        for enabled, backward_inside in ((False, False), (True, False), (True, True)):
            leaves = [x.clone().requires_grad_() for x in inputs]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                outs = [o for o in fn(*leaves) if o is not None]
                total = sum((o * (k + 1)).sum() for k, o in enumerate(outs))
                if backward_inside:
                    total.backward()
            if not backward_inside:
                total.backward()
            results.append([o.detach() for o in outs] + [x.grad for x in leaves])
        for other in results[1:]:
            for a, c in zip(results[0], other):
                assert a.dtype == c.dtype and torch.equal(a, c), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_instead_of_a_wrong_second_derivative(backend):
    """Found by fuzzing: the registered backwards are not differentiable, and the out-of-place path says so
    when a second derivative is taken. The in-place backward (inplace_backward=True) returned the logits
    buffer, whose autograd history is that of the logits, so create_graph=True gave a wrong Hessian-vector
    product without an error; grad_in_forward=True handed out constant gradients, so a gradient penalty on
    them silently got no gradient. Both now raise."""
    logits, tokens, adv, mask, old, _ = _inputs(V=40)
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        lp, ent = token_logprobs(x * 1.0, tokens, 0.7, mask=mask, inplace_backward=inplace, backend=backend)
        (g,) = torch.autograd.grad((lp + ent).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="token_logprobs_bwd"):
            g.pow(2).sum().backward()
    g_ = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 7, 16, generator=g_, requires_grad=True), torch.randn(40, 16, generator=g_)
    loss, _ = linear_grpo_loss(h, w, tokens, adv, mask, old, grad_in_forward=True, backend=backend)
    with pytest.raises(RuntimeError, match="grad_in_forward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_matches_a_loop(backend):
    """torch.vmap over a leading dim gives each slice's values and gradients, as a Python loop does, for every
    op; linear_grpo_loss(grad_in_forward=True) failed inside the in-forward backward ("Cannot access storage of
    BatchedTensorImpl" / an in-place shape error) and now takes the plain path there, as under torch.compile."""
    g = torch.Generator().manual_seed(5)
    n, B, T, V, H = 3, 2, 5, 33, 8
    logits, hidden = torch.randn(n, B, T, V, generator=g), torch.randn(n, B, T, H, generator=g)
    w, tokens = torch.randn(V, H, generator=g), torch.randint(0, V, (B, T), generator=g)
    adv, old = torch.randn(B, generator=g), -3.0 - torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    cases = {
        "token_logprobs": lambda x, h, w_: sum(token_logprobs(x, tokens, 0.8, mask=mask, backend=backend)),
        "grpo_loss": lambda x, h, w_: grpo_loss(x, tokens, adv, mask, old, entropy_coef=0.1, backend=backend)[0],
        "fpa_logprobs": lambda x, h, w_: fpa_logprobs(x, x.detach() * 0.5, tokens, 0.7, mask=mask,
                                                      backend=backend)[0],
        "linear_token_logprobs": lambda x, h, w_: sum(linear_token_logprobs(h, w_, tokens, mask=mask,
                                                                            backend=backend)),
        "linear_grpo_loss": lambda x, h, w_: linear_grpo_loss(h, w_, tokens, adv, mask, old, entropy_coef=0.1,
                                                              backend=backend)[0],
        "linear_grpo_loss(grad_in_forward)": lambda x, h, w_: linear_grpo_loss(
            h, w_, tokens, adv, mask, old, entropy_coef=0.1, grad_in_forward=True, backend=backend)[0],
    }
    for name, fn in cases.items():
        x, h, w_ = logits.clone().requires_grad_(), hidden.clone().requires_grad_(), w.clone().requires_grad_()
        out = torch.vmap(fn, in_dims=(0, 0, None))(x, h, w_)
        (out * torch.arange(1.0, n + 1).view(-1, *[1] * (out.dim() - 1))).sum().backward()
        xs, hs, ws = logits.clone().requires_grad_(), hidden.clone().requires_grad_(), w.clone().requires_grad_()
        want = torch.stack([fn(xs[i], hs[i], ws) for i in range(n)])
        (want * torch.arange(1.0, n + 1).view(-1, *[1] * (want.dim() - 1))).sum().backward()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=name)
        for a, b in ((x, xs), (h, hs), (w_, ws)):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(backend):
    """Found by fuzzing: the registered ops have a backward formula only, and PyTorch dropped the tangent of a
    forward-mode input (torch.func.jvp / jacfwd, forward_ad dual tensors): a zero directional derivative
    without an error, for every op. Each differentiable input now refuses a tangent."""
    import torch.autograd.forward_ad as fwAD
    for name, inputs, fn in _autocast_cases(backend):
        for i in range(len(inputs)):
            with pytest.raises(RuntimeError, match="forward-mode"), fwAD.dual_level():
                args = list(inputs)
                args[i] = fwAD.make_dual(inputs[i], torch.randn_like(inputs[i]))
                fn(*args)
        with pytest.raises(RuntimeError, match="forward-mode"):
            torch.func.jvp(lambda x: fn(x, *inputs[1:])[0], (inputs[0],), (torch.randn_like(inputs[0]),))
    logits, tokens, adv, mask, old, _ = _inputs(V=40)                          # grpo_loss, through token_logprobs
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.jvp(lambda x: grpo_loss(x, tokens, adv, mask, old, backend=backend)[0], (logits,),
                       (torch.randn_like(logits),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_give_shapes_with_every_check_on(backend):
    """On the meta device (shape inference, FLOP counting) the checks that read values (ids in range, 0/1 mask,
    check_finite) have nothing to read and are skipped, as under torch.compile; they used to raise torch's
    ``item()`` / ``nonzero`` errors on meta tensors, which name no argument. Forward and backward give shapes."""
    B, T, H, V = 2, 3, 4, 11

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)
    tokens, mask = meta(B, T, dtype=torch.int64), meta(B, T, dtype=torch.int32)
    logits, hidden, weight = (meta(*s).requires_grad_() for s in ((B, T, V), (B, T, H), (V, H)))
    loss, _ = grpo_loss(logits, tokens, meta(B), mask, meta(B, T), validate="full", check_finite=True,
                        backend=backend)
    lp, ent = token_logprobs(logits, tokens, mask=mask, backend=backend)
    fpa = fpa_logprobs(logits, meta(B, T, V), tokens, mask=mask, backend=backend)
    (loss + lp.sum() + ent.sum() + fpa[0].sum()).backward()
    assert loss.shape == () and lp.shape == ent.shape == fpa[2].shape == (B, T)
    assert logits.grad.shape == (B, T, V) and logits.grad.is_meta
    for grad_in_forward in (False, True) if backend == "torch" else (False,):
        loss, _ = linear_grpo_loss(hidden, weight, tokens, meta(B), mask, bias=meta(V), validate="full",
                                   check_finite=True, grad_in_forward=grad_in_forward, backend=backend)
        loss.backward()
    lp, _ = linear_token_logprobs(hidden, weight, tokens, mask=mask, check_finite=True, backend=backend)
    lfpa = linear_fpa_logprobs(hidden, weight, meta(B, T, H), meta(V, H), tokens, mask=mask, backend=backend)
    (lp.sum() + lfpa[0].sum()).backward()
    assert lp.shape == lfpa[1].shape == (B, T) and hidden.grad.shape == (B, T, H) and weight.grad.shape == (V, H)
