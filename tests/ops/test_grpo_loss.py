"""grpo_loss: Triton (interpreter) and torch backends against the float64 reference and against Liger-Kernel.

Guards: loss, every metric and dlogits for every aggregation mode, token and sequence IS, dual clip, delta,
beta > 0 with ref, entropy bonus, temperature != 1, (B,) and (B, T) advantages, fp32 and bf16, V not a power
of two, ragged masks with a fully masked row, strided logits slices, both clip branches actually hit; fully
masked batch gives 0 loss and zero grad; bad input raises a clear error naming the argument; the GRPOLoss
module equals the function; torch.compile(fullgraph=True) works on CPU; Liger's triton_grpo_loss agrees.
"""
import pytest
import torch
from _utils import assert_close

from gxpo_kernels.ops import GRPOLoss, grpo_loss
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref

BACKENDS = ("triton", "torch")

CASES = [
    # B, T, V, dtype, per-token adv, options
    pytest.param(3, 8, 1000, torch.float32, False, dict(), id="token-mean-V1000-fp32"),
    pytest.param(3, 6, 4099, torch.bfloat16, True,
                 dict(loss_agg_mode="seq-mean-token-mean", temperature=0.7, eps_high=0.28),
                 id="seq-mean-token-mean-V4099-bf16-advBT-temp0.7"),
    pytest.param(3, 7, 1000, torch.float32, False,
                 dict(loss_agg_mode="seq-mean-token-sum", beta=0.05, entropy_coef=0.01, ref=True),
                 id="seq-mean-token-sum-beta-entropy"),
    pytest.param(3, 8, 1000, torch.bfloat16, True,
                 dict(loss_agg_mode="seq-mean-token-sum-norm", max_length=9, dual_clip=3.0, delta=1.5,
                      temperature=1.3), id="drgrpo-dualclip-delta-bf16"),
    pytest.param(3, 6, 1000, torch.float32, False,
                 dict(importance_sampling="sequence", entropy_coef=0.02, ref=True), id="gspo-sequence-IS"),
    pytest.param(2, 5, 4099, torch.float32, True,
                 dict(importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean", dual_clip=3.0,
                      compute_entropy=False, on_policy=True), id="gspo-on-policy-no-entropy-V4099"),
]


def _inputs(B, T, V, dtype, per_token_adv, ref=False, on_policy=False, temperature=1.0):
    full = (torch.randn(B, T + 1, V) * 2).to(dtype)
    logits = full[:, :-1]                                # strided slice, as from a causal LM
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[0, :2] = True
    mask[-1] = False                                     # fully masked row
    tokens[-1, 0] = V + 7                                # out-of-range id at a masked position is allowed
    adv = torch.randn(B, T) if per_token_adv else torch.tensor([1.0, -1.0, 0.5, -2.0][:B])
    with torch.no_grad():
        logp, _ = token_logprobs_ref(logits, tokens.clamp(0, V - 1), temperature)
    # old log-probs scattered around the current ones so ratios land below 1-eps and above 1+eps
    old = None if on_policy else (logp + 0.5 * torch.randn(B, T)).float()
    refl = (logp + 0.3 * torch.randn(B, T)).float() if ref else None
    return logits, tokens, adv, mask, old, refl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,V,dtype,per_token_adv,opts", CASES)
def test_loss_metrics_grad_vs_reference(B, T, V, dtype, per_token_adv, opts, backend):
    opts = dict(opts)
    ref_flag, on_policy = opts.pop("ref", False), opts.pop("on_policy", False)
    compute_entropy = opts.pop("compute_entropy", True)
    logits, tokens, adv, mask, old, refl = _inputs(B, T, V, dtype, per_token_adv, ref_flag, on_policy,
                                                   opts.get("temperature", 1.0))

    x = logits.detach().clone().requires_grad_()
    loss, metrics = grpo_loss(x, tokens, adv, mask, old, refl, compute_entropy=compute_entropy,
                              backend=backend, **opts)
    loss.backward()
    xd = logits.detach().double().requires_grad_()
    r_loss, r_metrics = grpo_loss_ref(xd, tokens, adv, mask, old, refl, **opts)
    r_loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", r_loss.detach(), loss.detach(), 1e-5, atol=1e-6)
    expected = set(r_metrics) - (set() if compute_entropy else {"entropy"})
    assert set(metrics) == expected
    for k in expected:
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
        assert_close(k, r_metrics[k], metrics[k], 1e-5, atol=2e-5)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert_close("dlogits", xd.grad, x.grad, tol, atol=1e-7)
    assert torch.all(x.grad[~mask] == 0)
    if not on_policy and opts.get("importance_sampling", "token") == "token":
        # the awkward inputs must actually exercise both clip branches
        assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch(backend):
    logits, tokens, adv, _, old, refl = _inputs(2, 4, 300, torch.float32, False, ref=True)
    x = logits.detach().clone().requires_grad_()
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss, metrics = grpo_loss(x, torch.full((2, 4), -1), adv, mask, old, refl, beta=0.1, entropy_coef=0.1,
                              loss_agg_mode="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.all(x.grad == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_module_matches_function_and_inplace():
    logits, tokens, adv, mask, old, _ = _inputs(2, 5, 500, torch.float32, False)
    crit = GRPOLoss(eps_high=0.28, loss_agg_mode="seq-mean-token-sum", temperature=0.9)
    assert "eps_high=0.28" in repr(crit)
    grads = []
    for inplace in (False, True):
        x = logits.detach().clone().requires_grad_()
        buf = x * 1.0
        loss_f, _ = grpo_loss(buf, tokens, adv, mask, old, eps_high=0.28, loss_agg_mode="seq-mean-token-sum",
                              temperature=0.9, inplace_backward=inplace)
        loss_f.backward()
        grads.append(x.grad)
    x = logits.detach().clone().requires_grad_()
    loss_m, _ = crit(x, tokens, adv, mask, old)
    loss_m.backward()
    assert torch.equal(loss_m, loss_f)
    torch.testing.assert_close(x.grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOLoss(loss_agg_mode="mean")


def _bad_cases():
    B, T, V = 2, 3, 7
    base = dict(logits=torch.randn(B, T, V), tokens=torch.zeros(B, T, dtype=torch.long), advantages=torch.ones(B))
    nan_logits = torch.randn(B, T, V)
    nan_logits[1, 2, 3] = float("nan")
    return base, [
        pytest.param(dict(logits=torch.zeros(B, T, V, dtype=torch.int32)), TypeError, "logits", id="int-logits"),
        pytest.param(dict(logits=torch.zeros(B, V)), ValueError, "logits", id="2d-logits"),
        pytest.param(dict(tokens=torch.zeros(B, T)), TypeError, "tokens", id="float-tokens"),
        pytest.param(dict(tokens=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "tokens", id="tokens-shape"),
        # value checks are opt-in (validate="full"); the default makes the loss NaN instead (tests/ops/test_hostile.py)
        pytest.param(dict(tokens=torch.full((B, T), V), validate="full"), ValueError, "tokens",
                     id="tokens-out-of-range"),
        pytest.param(dict(tokens=torch.full((B, T), -1), validate="full"), ValueError, "tokens", id="tokens-negative"),
        pytest.param(dict(advantages=torch.ones(B + 1)), ValueError, "advantages", id="adv-shape"),
        pytest.param(dict(advantages=torch.ones(B, T + 1)), ValueError, "advantages", id="adv-shape-2d"),
        pytest.param(dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask", id="mask-shape"),
        pytest.param(dict(old_logprobs=torch.zeros(B, T - 1)), ValueError, "old_logprobs", id="old-shape"),
        pytest.param(dict(ref_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "ref_logprobs",
                     id="ref-int"),
        pytest.param(dict(advantages=torch.ones(B, device="meta")), ValueError, "advantages", id="device-mix"),
        pytest.param(dict(logits=nan_logits, check_finite=True), ValueError, "logits", id="nan-check-finite"),
        pytest.param(dict(beta=0.1), ValueError, "ref_logprobs", id="beta-without-ref"),
        pytest.param(dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode", id="unknown-agg"),
        pytest.param(dict(importance_sampling="seq"), ValueError, "importance_sampling", id="unknown-IS"),
        pytest.param(dict(backend="cuda"), ValueError, "backend", id="unknown-backend"),
        pytest.param(dict(temperature=0.0), ValueError, "temperature", id="temperature-0"),
        pytest.param(dict(eps_low=1.0), ValueError, "eps_low", id="eps-low"),
    ]


_BASE, _BAD = _bad_cases()


@pytest.mark.parametrize("bad,exc,match", _BAD)
def test_bad_inputs(bad, exc, match):
    kw = dict(_BASE)
    kw.update(bad)
    with pytest.raises(exc, match=match):
        grpo_loss(**kw)


def test_torch_compile_fullgraph():
    """One compiled function around grpo_loss (torch backend, CPU): same loss and grad as eager."""
    B, T, V = 2, 5, 300
    logits, tokens, adv, mask, old, _ = _inputs(B, T, V, torch.float32, False)

    def step(x, tokens, adv, mask, old):
        loss, m = grpo_loss(x, tokens, adv, mask, old, entropy_coef=0.01, inplace_backward=True,
                            loss_agg_mode="seq-mean-token-mean", backend="torch")
        return 2.0 * loss, m["entropy"]

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    grads, outs = [], []
    for fn in (compiled, step):
        x = logits.detach().clone().requires_grad_()
        loss, ent = fn(x, tokens, adv, mask, old)
        loss.backward()
        grads.append(x.grad)
        outs.append((loss.detach(), ent))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("beta", [pytest.param(0.0, id="beta0"), pytest.param(0.04, id="beta0.04")])
def test_against_liger_triton_grpo_loss(dtype, beta):
    """Side by side with Liger-Kernel's triton_grpo_loss (interpreter) on options both libraries share.

    Liger takes unshifted (B, L+1, V) logits and ignores the last position; its "bnpo" reduction is our
    token-mean; its is_clipped mean is clip_frac_low + clip_frac_high.
    """
    pytest.importorskip("liger_kernel.ops")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    B, L, V = 3, 6, 1000
    full = (torch.randn(B, L + 1, V) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.25
    mask[-1, :] = False
    adv = torch.tensor([1.0, -0.5, 2.0])
    with torch.no_grad():
        logp, _ = token_logprobs_ref(full[:, :-1], tokens, 0.9)
    old = (logp + 0.4 * torch.randn(B, L)).float()
    ref = (logp + 0.2 * torch.randn(B, L)).float()  # close enough that the k3 clamp never triggers

    xl = full.detach().clone().requires_grad_()
    l_loss, l_metrics = triton_grpo_loss(xl, old, ref, tokens, adv, mask.float(), temperature=0.9, beta=beta,
                                         eps_low=0.2, eps_high=0.28, inplace=False, loss_type="bnpo", reduce=True)
    l_loss.backward()

    xo = full.detach().clone().requires_grad_()
    loss, metrics = grpo_loss(xo[:, :-1], tokens, adv, mask, old, ref, temperature=0.9, beta=beta, eps_low=0.2,
                              eps_high=0.28, loss_agg_mode="token-mean", backend="triton")
    loss.backward()

    assert_close("loss vs liger", l_loss.detach().float(), loss.detach(), 1e-5, atol=1e-6)
    assert_close("clip fraction vs liger", l_metrics[-1].detach().float(),
                 metrics["clip_frac_low"] + metrics["clip_frac_high"], 1e-6, atol=1e-6)
    if beta:
        assert_close("kl vs liger", l_metrics[0].detach().float(), metrics["kl"], 1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert_close("dlogits vs liger", xl.grad.float(), xo.grad.float(), tol, atol=1e-7)
