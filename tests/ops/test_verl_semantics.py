"""Our loss options against what verl's current ``core_algos`` computes (policy losses ``vanilla``, ``sapo``,
``cispo``; ``kl_penalty`` in every ``kl_loss_type``; ``agg_loss`` in every mode, including its ``1e-8`` row
denominator and the ``loss_scale_factor`` constant of ``seq-mean-token-sum-norm``; the logged metrics
``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``), as docs/losses.md states them.

verl is not a dependency: ``_verl_*`` below are float64 re-derivations of its formulas, written for this file
(the legacy ``dp_actor`` path: ``agg_loss`` without global batch info, so all-masked rows are skipped by the
``seq-mean-*`` modes). Fresh random batches at awkward sizes, with fully masked rows.
"""
import pytest
import torch

from gxpo_kernels import grpo_loss
from gxpo_kernels.losses import GRPOLossOptions, grpo_token_loss
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TIGHT = dict(rtol=1e-12, atol=1e-12)
# verl's seq-mean-token-mean divides a row by (n + 1e-8): a relative 1e-8 / n from our exact n
ROW_EPS = dict(rtol=2e-8, atol=1e-12)


def _batch(seed, B=9, T=13, per_token=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[1] = False                      # fully masked row
    mask[-1] = False                     # and a second one, last
    mask[2] = False
    mask[2, -1] = True                   # a row with only its last token
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 6
    # log-ratios in and past both clips, past clip_ratio_c (3 -> log 1.1) and past the +-20 clamp
    picks = torch.tensor((0.0, 0.1, -0.1, 0.4, -0.4, 1.5, -1.5, 25.0, -25.0), dtype=torch.float64)
    old = logp - picks[torch.randint(0, len(picks), (B, T), generator=g)] - 0.01 * torch.rand(B, T, generator=g)
    gaps = torch.tensor((0.0, 1e-3, 0.5, -0.5, 3.0, -3.0, -15.0, 30.0, -30.0), dtype=torch.float64)
    ref = logp + gaps[torch.randint(0, len(gaps), (B, T), generator=g)]
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token else \
        torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[torch.rand(B, T, generator=g) < 0.1] = 0.0
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    return logp, old, ref, adv, mask, ent


# ----------------------------------------------------------------------------- verl, re-derived in float64
def _verl_masked_mean(x, mask):
    return torch.where(mask, x, 0.0).sum() / (mask.sum() + 1e-8)


def _verl_agg(x, mask, mode, loss_scale_factor=None):
    x = x * mask  # verl multiplies by the mask (our inputs are finite everywhere)
    n = mask.sum(-1).double()
    if mode == "token-mean":
        return x.sum() / mask.sum()
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    rows = x.sum(-1) if mode == "seq-mean-token-sum" else x.sum(-1) / (n + 1e-8)
    keep = n > 0
    return rows[keep].sum() / keep.sum()


def _verl_vanilla(logp, old, adv, mask, low, high, c):
    log_ratio = (logp - old).clamp(-20, 20)
    r = log_ratio.exp()
    loss1, loss2 = -adv * r, -adv * r.clamp(1 - low, 1 + high)
    ppo = torch.maximum(loss1, loss2)
    dual = torch.minimum(ppo, -adv * c)
    metrics = {"pg_clipfrac": _verl_masked_mean((loss2 > loss1).double(), mask),
               "ppo_kl": _verl_masked_mean(-log_ratio.detach(), mask),
               "pg_clipfrac_lower": _verl_masked_mean(((ppo > -adv * c) & (adv < 0)).double(), mask)}
    return torch.where(adv < 0, dual, ppo), metrics


def _verl_sapo(logp, old, adv, tau_pos, tau_neg):
    r = (logp - old).clamp(-20, 20).exp()
    tau = torch.where(adv > 0, tau_pos, tau_neg)
    return -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv


def _verl_cispo(logp, old, adv, mask, low, high):
    r = (logp - old).clamp(-20, 20).exp()
    w = r.clamp(1 - low, 1 + high)
    return -w.detach() * adv * logp, _verl_masked_mean((r != w).double(), mask)


def _verl_kl(logp, ref, kind):
    """kl_penalty(logp, ref, kind): value, and for a '+' type the k2 gradient under that value."""
    base = kind.rstrip("+")
    x = logp - ref
    if base in ("kl", "k1"):
        value = x
    elif base == "abs":
        value = x.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * x * x
    else:  # low_var_kl / k3
        d = (ref - logp).clamp(-20, 20)
        value = (d.exp() - d - 1).clamp(-10, 10)
    if kind.endswith("+") and base not in ("mse", "k2"):
        k2 = 0.5 * x * x
        value = k2 - k2.detach() + value.detach()
    return value


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
def test_vanilla_with_kl_and_entropy_matches_current_verl(mode):
    """verl's actor loss: vanilla (clip_ratio_low/high, clip_ratio_c) + kl_loss_coef * low_var_kl -
    entropy_coeff * entropy, each aggregated by agg_loss in ``mode``, is ours with dual_clip=clip_ratio_c,
    empty_sequences="skip" (x B under seq-mean-token-sum-norm), value and both gradients; pg_clipfrac is
    clip_frac_low + clip_frac_high."""
    logp, old, ref, adv, mask, ent = _batch(MODES.index(mode))
    B = logp.shape[0]
    x, h = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    pg, vm = _verl_vanilla(x, old, adv, mask, 0.2, 0.28, 3.0)
    want = (_verl_agg(pg, mask, mode) + 0.05 * _verl_agg(_verl_kl(x, ref, "low_var_kl"), mask, mode)
            - 0.01 * _verl_agg(h, mask, mode))
    want_grads = _grads(want, x, h)
    assert vm["pg_clipfrac"] > 0 and vm["pg_clipfrac_lower"] > 0

    opts = GRPOLossOptions(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05, entropy_coef=0.01,
                           loss_agg_mode=mode, empty_sequences="skip")
    x, h = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    got, metrics = grpo_token_loss(x, h, adv, mask, old, ref, opts)
    got = got * B if mode == "seq-mean-token-sum-norm" else got
    tol = ROW_EPS if mode == "seq-mean-token-mean" else TIGHT
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(_grads(got, x, h), want_grads):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(metrics["clip_frac_low"] + metrics["clip_frac_high"], vm["pg_clipfrac"], **ROW_EPS)


def test_seq_mean_token_sum_norm_constant_is_loss_scale_factor_over_b():
    """verl's ``actor.loss_scale_factor=L`` divides the masked sum by L alone; our ``max_length=L`` divides by
    B * L. So verl's loss is ours times B for any L (L unrelated to T here)."""
    logp, old, ref, adv, mask, _ = _batch(7)
    B = logp.shape[0]
    for L in (5, 37):
        x = logp.clone().requires_grad_()
        want = _verl_agg(_verl_vanilla(x, old, adv, mask, 0.2, 0.2, 3.0)[0], mask, "seq-mean-token-sum-norm", L)
        want_grad, = _grads(want, x)
        x = logp.clone().requires_grad_()
        got, _ = grpo_token_loss(x, None, adv, mask, old, None, GRPOLossOptions(
            dual_clip=3.0, loss_agg_mode="seq-mean-token-sum-norm", max_length=L))
        torch.testing.assert_close(got * B, want, **TIGHT)
        torch.testing.assert_close(_grads(got * B, x)[0], want_grad, **TIGHT)


def _verl_gspo(logp, old, adv, mask, low, high):
    n = mask.sum(-1).clamp(min=1)
    seq = (((logp - old) * mask).sum(-1) / n)[:, None]
    r = (logp - logp.detach() + seq.detach()).clamp(max=10).exp()
    loss1, loss2 = -adv * r, -adv * r.clamp(1 - low, 1 + high)
    return torch.maximum(loss1, loss2), _verl_masked_mean((loss2 > loss1).double(), mask)


def test_gspo_matches_current_verl_with_log_ratio_clamp_10():
    """verl's ``loss_mode="gspo"`` clamps the sequence log-ratio above at 10 (no lower bound) and always
    aggregates seq-mean-token-mean. With per-sequence advantages ours equals it with
    importance_sampling="sequence", log_ratio_clamp=10, empty_sequences="skip" (below -10 the ratio is clipped
    either way: same value, no gradient); the default clamp (20) differs on rows past 10."""
    g = torch.Generator().manual_seed(29)
    B, T = 11, 6
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[4] = False
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    rows = torch.tensor((0.0, 0.1, -0.1, 0.5, -0.5, 12.0, -12.0, 15.0, 12.0, -0.3, 0.25), dtype=torch.float64)
    old = logp - rows[:, None] - 0.01 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    adv = torch.where(torch.arange(B)[:, None] == 8, -adv.abs(), adv)  # a row past 10 with A < 0
    adv = torch.where(torch.arange(B)[:, None] == 5, adv.abs(), adv)   # and one with A > 0
    x = logp.clone().requires_grad_()
    pg, clipfrac = _verl_gspo(x, old, adv, mask, 0.2, 0.28)
    want = _verl_agg(pg, mask, "seq-mean-token-mean")
    want_grad, = _grads(want, x)
    opts = GRPOLossOptions(eps_high=0.28, importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean",
                           empty_sequences="skip", log_ratio_clamp=10.0)
    y = logp.clone().requires_grad_()
    got, metrics = grpo_token_loss(y, None, adv, mask, old, None, opts)
    torch.testing.assert_close(got, want, **ROW_EPS)
    torch.testing.assert_close(_grads(got, y)[0], want_grad, **ROW_EPS)
    torch.testing.assert_close(metrics["clip_frac_low"] + metrics["clip_frac_high"], clipfrac, **ROW_EPS)
    default, _ = grpo_token_loss(logp, None, adv, mask, old, None, GRPOLossOptions.build(opts, log_ratio_clamp=20.0))
    assert not torch.allclose(default, want)


def test_sapo_matches_current_verl():
    """verl's ``loss_mode="sapo"`` (tau_pos / tau_neg, log-ratio clamped to +-20, always seq-mean-token-mean
    over the non-empty rows) is ours with policy_loss="sapo", loss_agg_mode="seq-mean-token-mean",
    empty_sequences="skip": value and gradient; verl logs pg_clipfrac 0, as our clip fractions read."""
    logp, old, _, adv, mask, _ = _batch(11)
    for tau_pos, tau_neg in ((1.0, 1.05), (0.5, 2.0)):
        x = logp.clone().requires_grad_()
        want = _verl_agg(_verl_sapo(x, old, adv, tau_pos, tau_neg), mask, "seq-mean-token-mean")
        want_grad, = _grads(want, x)
        x = logp.clone().requires_grad_()
        got, metrics = grpo_token_loss(x, None, adv, mask, old, None, GRPOLossOptions(
            policy_loss="sapo", sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
            loss_agg_mode="seq-mean-token-mean", empty_sequences="skip"))
        torch.testing.assert_close(got, want, **ROW_EPS)
        torch.testing.assert_close(_grads(got, x)[0], want_grad, **ROW_EPS)
        assert float(metrics["clip_frac_low"]) == float(metrics["clip_frac_high"]) == 0.0


def test_cispo_differs_from_verl_only_by_its_lower_clip():
    """verl's ``cispo`` clips the detached weight to [1 - clip_ratio_low, 1 + clip_ratio_high]; ours caps it
    above only (docs/losses.md). Tokens with r >= 1 - clip_ratio_low get the same loss and gradient; the
    others differ. verl's pg_clipfrac counts both bounds whatever the sign of A; ours counts r > 1 + eps_high
    with A > 0."""
    logp, old, _, adv, mask, _ = _batch(13)
    x = logp.clone().requires_grad_()
    per_tok, clipfrac = _verl_cispo(x, old, adv, mask, 0.2, 0.28)
    opts = GRPOLossOptions(policy_loss="cispo", eps_high=0.28, reduce=False)
    y = logp.clone().requires_grad_()
    got, metrics = grpo_token_loss(y, None, adv, mask, old, None, opts)
    r = (logp - old).clamp(-20, 20).exp()
    same = mask & (r >= 0.8)
    differ = mask & (r < 0.8) & (adv != 0)
    assert same.any() and differ.any()
    torch.testing.assert_close(got[same], per_tok[same], **TIGHT)
    assert not torch.isclose(got[differ], per_tok[differ]).any()
    torch.testing.assert_close(_grads(got[same].sum(), y)[0], _grads(per_tok[same].sum(), x)[0], **TIGHT)
    r = torch.where(mask, r, 1.0)
    ours = _verl_masked_mean(((r > 1.28) & (adv > 0)).double(), mask)
    torch.testing.assert_close(metrics["clip_frac_high"], ours, **ROW_EPS)
    assert float(clipfrac) > float(ours)


@pytest.mark.parametrize("kind", ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2", "low_var_kl+", "k1+"))
def test_kl_estimators_against_current_verl(kind):
    """Our KL term is verl's ``low_var_kl`` / ``k3`` (both clamps, value and gradient, and the kl metric under
    token-mean); the other kl_loss_type values are not offered, and their values differ from ours; the '+'
    straight-through types keep the forward value of their base type with k2's gradient, logp - ref, so
    ``low_var_kl+`` has our value and a different gradient."""
    logp, _, ref, adv, mask, _ = _batch(17)
    x = logp.clone().requires_grad_()
    want = _verl_agg(_verl_kl(x, ref, kind), mask, "token-mean")
    want_grad, = _grads(want, x)
    y = logp.clone().requires_grad_()
    opts = GRPOLossOptions(beta=1.0, loss_agg_mode="token-mean")
    got, metrics = grpo_token_loss(y, None, torch.zeros_like(adv), mask, None, ref, opts)  # A = 0: KL only
    got_grad, = _grads(got, y)
    if kind in ("low_var_kl", "k3"):
        torch.testing.assert_close(got, want, **TIGHT)
        torch.testing.assert_close(metrics["kl"], want.detach(), **TIGHT)
        torch.testing.assert_close(got_grad, want_grad, **TIGHT)
    elif kind == "low_var_kl+":
        torch.testing.assert_close(got, want, **TIGHT)
        assert not torch.allclose(got_grad, want_grad)
    else:
        assert not torch.allclose(got, want)


def test_all_masked_batch_metrics_read_zero_like_verl():
    """verl's masked_mean divides by count + 1e-8, so an all-masked micro-batch logs pg_clipfrac and ppo_kl 0;
    our clip fractions read 0 there too (not NaN), and our token-mean loss is 0 (verl's is 0/0)."""
    logp, old, ref, adv, mask, ent = _batch(19, B=3, T=4)
    mask[:] = False
    _, vm = _verl_vanilla(logp, old, adv, mask, 0.2, 0.2, 3.0)
    loss, metrics = grpo_token_loss(logp, ent, adv, mask, old, ref, GRPOLossOptions(dual_clip=3.0))
    assert float(vm["pg_clipfrac"]) == float(metrics["clip_frac_low"] + metrics["clip_frac_high"]) == 0.0
    assert float(loss) == 0.0 and torch.isnan(_verl_agg(logp, mask, "token-mean"))


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_sapo_on_the_op_matches_current_verl(backend):
    """The SAPO equality through ``grpo_loss`` (fp32 logits, both backends; Triton under the interpreter):
    loss and d(logits) against verl's sapo on float64 log-probs of the same logits."""
    g = torch.Generator().manual_seed(23)
    B, T, V = 5, 7, 203
    logits = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[3] = False
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits.double(), tokens)
    old = (lp - torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5).float()
    adv = torch.randn(B, generator=g)
    x64 = logits.double().requires_grad_()
    logp, _ = token_logprobs_ref(x64, tokens)
    want = _verl_agg(_verl_sapo(logp, old.double(), adv.double()[:, None].expand(B, T), 1.0, 1.05), mask,
                     "seq-mean-token-mean")
    want_grad, = _grads(want, x64)
    x = logits.clone().requires_grad_()
    loss, _ = grpo_loss(x, tokens, adv, mask, old, None, policy_loss="sapo", loss_agg_mode="seq-mean-token-mean",
                        empty_sequences="skip", backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-6)
