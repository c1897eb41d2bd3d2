"""docs/losses.md's side-by-side claims against verl and Liger-Kernel on awkward batches: an all-masked row,
length-1 rows, log-ratios past both PPO clips and past the +-20 clamp, ref - logp past the k3 clamps, zero and
negative advantages, per-sequence and per-token advantages.

* verl (not a dependency): an independent float64 transcription of ``compute_policy_loss_vanilla`` (clamped
  log-ratio, dual clip ``clip_ratio_c`` on A < 0), ``kl_penalty("low_var_kl")`` and ``agg_loss`` (empty rows
  skipped in the seq-mean modes, ``seq-mean-token-sum-norm`` divided by T only), with the KL and entropy terms
  aggregated by the same mode as verl's actor does. Our options ``dual_clip=c, empty_sequences="skip"`` must
  reproduce it (x B for the sum-norm mode), value and gradients, and our metrics must equal verl's logged ones
  where the docs say so.
* Liger 0.8.5: ``LigerFusedLinearGRPOLoss`` (chunked, pure torch) and ``triton_grpo_loss`` (interpreter) with
  our clamps off: loss, gradients, the clip-fraction metric (also for cispo / sapo / vespo) and the KL metric.
"""
import itertools

import pytest
import torch

from gxpo_kernels import grpo_loss
from gxpo_kernels.losses import GRPOLossOptions, grpo_token_loss
from gxpo_kernels.ops import linear_grpo_loss
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref
from tests._utils import assert_close

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _awkward_mask(B, T, g):
    """Row 0 full, row 1 empty, row 2 only its first token, row 3 a prefix, row 4 only its last token, the
    rest random."""
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0], mask[1], mask[2], mask[4] = True, False, False, False
    mask[2, 0] = mask[4, -1] = True
    mask[3] = torch.arange(T) < T - 2
    return mask


def _pick(values, shape, g):
    v = torch.tensor(values, dtype=torch.float64)
    return v[torch.randint(0, len(values), shape, generator=g)] + 0.01 * torch.randn(shape, generator=g,
                                                                                   dtype=torch.float64)


# log-ratios inside the clip range, past eps (0.5, 3) and past the +-20 clamp; ref - logp small, past the
# k3 value clamp (+3, -15) and past the argument clamp (+-30)
LOG_RATIOS = (0.0, 0.05, -0.05, 0.5, -0.5, 3.0, -3.0, 25.0, -25.0)
REF_GAPS = (0.0, 1e-3, 0.3, -0.3, 3.0, -3.0, -15.0, 30.0, -30.0)


def _advantages(B, T, g, per_token):
    if per_token:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
        adv[torch.rand(B, T, generator=g) < 0.2] = 0.0
        return adv
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2], adv[3] = 0.0, -abs(float(adv[3])) - 0.2
    return adv


def verl_reference(logp, old, ref, adv, mask, entropy, *, clip_low, clip_high, clip_c, mode, kl_coef, ent_coef):
    """verl's actor loss (vanilla policy loss + kl_loss_coef * low_var_kl - entropy_coeff * entropy), each term
    aggregated with ``mode``, and the metrics verl logs. Float64, written from the formulas."""
    T = logp.shape[1]
    A = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)
    zero = torch.zeros_like(logp)
    log_ratio = (logp - old).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    surr = -A * ratio
    surr_clipped = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    ppo = torch.maximum(surr, surr_clipped)
    pg = torch.where(A < 0, torch.minimum(ppo, -A * clip_c), ppo)

    def agg(x):
        x = torch.where(mask, x, zero)
        n = mask.sum(-1)
        if mode == "token-mean":
            return x.sum() / mask.sum()
        if mode == "seq-mean-token-sum-norm":
            return x.sum() / T
        per_seq = x.sum(-1) if mode == "seq-mean-token-sum" else x.sum(-1) / n.clamp(min=1)
        return per_seq[n > 0].sum() / (n > 0).sum()

    gap = (ref - logp).clamp(-20.0, 20.0)
    low_var_kl = (gap.exp() - gap - 1.0).clamp(-10.0, 10.0)
    loss = agg(pg) + kl_coef * agg(low_var_kl) - ent_coef * agg(entropy)

    def token_mean(x):
        return torch.where(mask, x.double(), zero).sum() / mask.sum()
    metrics = {"pg_clipfrac": token_mean(surr_clipped > surr), "kl_loss": agg(low_var_kl),
               "entropy": agg(entropy), "pg_clipfrac_lower": token_mean((ppo > -A * clip_c) & (A < 0))}
    return loss, {k: v.detach() for k, v in metrics.items()}


CASES = list(itertools.product((False, True), MODES, ((0.2, 0.2), (0.2, 0.28)), (3.0, 1.5), (0.0, 0.1), (0.0, 0.01)))


@pytest.mark.parametrize("seed", (0, 1))
def test_verl_vanilla_actor_loss_equals_the_documented_options(seed):
    """dual_clip=clip_ratio_c and empty_sequences="skip" give verl's loss, d(logp), d(entropy) to float64
    rounding in every mode (seq-mean-token-sum-norm: ours x B, verl divides by T only); verl's pg_clipfrac is
    clip_frac_low + clip_frac_high, and its kl_loss / entropy (aggregated by the loss mode) are our token-mean
    kl / entropy under token-mean. Without dual_clip, or with empty rows counted, the loss differs."""
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 9
    worst = 0.0
    for per_token, mode, (cl, ch), c, beta, ec in CASES:
        mask = _awkward_mask(B, T, g)
        logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
        old, ref = logp - _pick(LOG_RATIOS, (B, T), g), logp + _pick(REF_GAPS, (B, T), g)
        adv, ent = _advantages(B, T, g, per_token), torch.rand(B, T, generator=g, dtype=torch.float64) * 3

        x, h = logp.clone().requires_grad_(), ent.clone().requires_grad_()
        want, verl_metrics = verl_reference(x, old, ref, adv, mask, h, clip_low=cl, clip_high=ch, clip_c=c, mode=mode,
                                            kl_coef=beta, ent_coef=ec)
        want_grads = torch.autograd.grad(want, (x, h), allow_unused=True, materialize_grads=True)

        opts = GRPOLossOptions(eps_low=cl, eps_high=ch, dual_clip=c, beta=beta, entropy_coef=ec, loss_agg_mode=mode,
                               empty_sequences="skip")
        x, h = logp.clone().requires_grad_(), ent.clone().requires_grad_()
        got, metrics = grpo_token_loss(x, h, adv, mask, old, ref, opts)
        got = got * B if mode == "seq-mean-token-sum-norm" else got
        got_grads = torch.autograd.grad(got, (x, h), allow_unused=True, materialize_grads=True)

        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            worst = max(worst, float((a - b).abs().max()))
        torch.testing.assert_close(metrics["clip_frac_low"] + metrics["clip_frac_high"], verl_metrics["pg_clipfrac"])
        if mode == "token-mean":
            torch.testing.assert_close(metrics["kl"], verl_metrics["kl_loss"])
            torch.testing.assert_close(metrics["entropy"], verl_metrics["entropy"])

        if mode != "seq-mean-token-sum-norm":  # the two options are what makes the difference
            for other in (dict(dual_clip=None), dict(empty_sequences="count")):
                if other.get("dual_clip", c) is None and not bool(verl_metrics["pg_clipfrac_lower"]):
                    continue  # the dual clip binds nowhere in this batch
                if other.get("empty_sequences") == "count" and mode == "token-mean":
                    continue  # no seq-mean
                alt, _ = grpo_token_loss(logp, ent, adv, mask, old, ref, GRPOLossOptions.build(opts, **other))
                assert not torch.allclose(alt, want, rtol=1e-9, atol=1e-12), (mode, other)
    assert worst < 1e-12


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("mode", MODES)
def test_verl_actor_loss_on_the_ops(backend, mode, dtype):
    """The same equality through ``grpo_loss`` on fp32 and bf16 logits (loss, d(logits), metrics), per-token
    advantages, dual clip 2.0, DAPO clip range, KL and entropy terms."""
    g = torch.Generator().manual_seed(11 + MODES.index(mode))
    B, T, V = 7, 6, 301
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = _awkward_mask(B, T, g)
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits.double(), tokens)
    old, ref = (lp - _pick(LOG_RATIOS, (B, T), g)).float(), (lp + _pick(REF_GAPS, (B, T), g)).float()
    adv = _advantages(B, T, g, True).float()

    x64 = logits.double().requires_grad_()
    logp, ent = token_logprobs_ref(x64, tokens)
    want, verl_metrics = verl_reference(logp, old.double(), ref.double(), adv.double(), mask, ent, clip_low=0.2,
                                        clip_high=0.28, clip_c=2.0, mode=mode, kl_coef=0.05, ent_coef=0.01)
    want_grad, = torch.autograd.grad(want, x64)

    x = logits.clone().requires_grad_()
    loss, metrics = grpo_loss(x, tokens, adv, mask, old, ref, eps_high=0.28, dual_clip=2.0, beta=0.05,
                              entropy_coef=0.01, loss_agg_mode=mode, empty_sequences="skip", backend=backend)
    loss = loss * B if mode == "seq-mean-token-sum-norm" else loss
    loss.backward()
    assert_close("loss", want.detach(), loss.detach(), 1e-6, atol=1e-6)
    assert_close("dlogits", want_grad, x.grad, 1e-5 if dtype == torch.float32 else 8e-3, atol=1e-7)
    assert_close("pg_clipfrac", verl_metrics["pg_clipfrac"], metrics["clip_frac_low"] + metrics["clip_frac_high"],
                 1e-6)


# ------------------------------------------------------------------------------------------------ Liger
LIGER_CASES = [  # (liger loss_type, our policy_loss, options, our loss_agg_mode)
    pytest.param("grpo", "clip", dict(), "seq-mean-token-mean", id="grpo"),
    pytest.param("bnpo", "clip", dict(beta=0.1, use_bias_correction_kl=True), "token-mean", id="bnpo-kl-bias"),
    pytest.param("dr_grpo", "clip", dict(delta=1.6), "seq-mean-token-sum-norm", id="drgrpo-delta"),
    pytest.param("dapo", "clip", dict(importance_sampling="sequence", beta=0.1, use_bias_correction_kl=True),
                 "token-mean", id="gspo-kl-bias"),
    pytest.param("grpo", "clip", dict(importance_sampling="sequence", delta=1.5), "seq-mean-token-mean",
                 id="gspo-grpo-delta"),
    pytest.param("cispo", "cispo", dict(eps_high=3.0, beta=0.05), "token-mean", id="cispo-kl"),
    pytest.param("sapo", "sapo", dict(), "seq-mean-token-mean", id="sapo"),
    pytest.param("vespo", "vespo", dict(), "token-mean", id="vespo"),
]


def _liger_batch(seed=3, B=6, T=5, V=37, H=16):
    g = torch.Generator().manual_seed(seed)
    mask = _awkward_mask(B, T, g)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp, _ = token_logprobs_ref((hidden @ weight.T).double(), tokens, 0.8)
    ratios = (0.0, 0.05, -0.05, 0.5, -0.5, 2.0, -2.0, 6.0, -6.0)  # no clamp here: keep exp in fp32 range
    old, ref = (lp - _pick(ratios, (B, T), g)).float(), (lp + 1.5 * _pick(ratios, (B, T), g)).float()
    adv = _advantages(B, T, g, False).float()
    return hidden, weight, tokens, mask, adv, old, ref


def _our_options(policy_loss, kw, mode, T):
    kw = dict(kw)
    return kw.pop("eps_high", 0.28), dict(temperature=0.8, eps_low=0.2, policy_loss=policy_loss, loss_agg_mode=mode,
                                          max_length=T, log_ratio_clamp=None, kl_clamp=None, **kw)


@pytest.mark.parametrize("liger_type, policy_loss, kw, mode", LIGER_CASES)
def test_liger_chunked_loss_and_metrics_on_an_awkward_batch(liger_type, policy_loss, kw, mode):
    """LigerFusedLinearGRPOLoss (chunked, torch): loss, d(hidden), d(weight), its clip-ratio metric (our
    clip_frac_low + clip_frac_high: 0 for sapo / vespo, the upper cap only for cispo) and its KL metric."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, tokens, mask, adv, old, ref = _liger_batch()
    B, T = tokens.shape
    eps_high, opts = _our_options(policy_loss, kw, mode, T)
    beta = opts.get("beta", 0.0)
    lig = chunked.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0, epsilon_low=0.2,
        epsilon_high=eps_high + 1.0 if policy_loss == "cispo" else eps_high, loss_type=liger_type,
        max_completion_length=T, importance_sampling_level=opts.get("importance_sampling", "token"), temperature=0.8,
        delta=opts.get("delta"), use_bias_correction_kl=opts.get("use_bias_correction_kl", False))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    l_loss, l_metrics = lig(h1, w1, tokens, mask.float(), adv, ref_per_token_logps=ref if beta else None,
                            old_per_token_logps=old)
    l_loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    token_sum = liger_type in ("dapo", "cispo", "vespo")
    loss, metrics = linear_grpo_loss(h2, w2, tokens, adv, mask, old, ref if beta else None, eps_high=eps_high,
                                     backend="torch", num_items_in_batch=int(mask.sum()) if token_sum else None,
                                     **opts)
    loss.backward()
    assert_close("loss", l_loss.detach(), loss.detach(), 1e-5, atol=1e-6)
    assert_close("d_hidden", h1.grad, h2.grad, 1e-4)
    assert_close("d_weight", w1.grad, w2.grad, 1e-4)
    assert_close("clip ratio", l_metrics[-1].detach(), metrics["clip_frac_low"] + metrics["clip_frac_high"], 1e-6)
    if beta:
        assert_close("kl", l_metrics[0].detach(), metrics["kl"], 1e-5)


@pytest.mark.parametrize("liger_type, policy_loss, kw, mode", LIGER_CASES)
def test_liger_triton_loss_and_metrics_on_an_awkward_batch(liger_type, policy_loss, kw, mode):
    """triton_grpo_loss (interpreter) on the same batch as logits: loss, d(logits), clip ratio and KL."""
    pytest.importorskip("liger_kernel.ops")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    hidden, weight, tokens, mask, adv, old, ref = _liger_batch()
    B, T = tokens.shape
    eps_high, opts = _our_options(policy_loss, kw, mode, T)
    beta = opts.get("beta", 0.0)
    full = torch.cat([hidden @ weight.T, torch.zeros(B, 1, weight.shape[0])], 1)  # Liger reads (B, T + 1, V)
    xl = full.clone().requires_grad_()
    l_loss, l_metrics = triton_grpo_loss(
        xl, old, ref if beta else None, tokens, adv, mask.float(), temperature=0.8, beta=beta, eps_low=0.2,
        eps_high=eps_high + 1.0 if policy_loss == "cispo" else eps_high, inplace=False, loss_type=liger_type,
        max_completion_length=T, importance_sampling_level=opts.get("importance_sampling", "token"), reduce=True,
        delta=opts.get("delta"), use_bias_correction_kl=opts.get("use_bias_correction_kl", False))
    l_loss.backward()
    xo = full.clone().requires_grad_()
    token_sum = liger_type in ("dapo", "cispo", "vespo")
    loss, metrics = grpo_loss(xo[:, :-1], tokens, adv, mask, old, ref if beta else None, eps_high=eps_high,
                              backend="triton", num_items_in_batch=int(mask.sum()) if token_sum else None, **opts)
    loss.backward()
    assert_close("loss", l_loss.detach(), loss.detach(), 1e-5, atol=1e-6)
    assert_close("dlogits", xl.grad[:, :-1], xo.grad[:, :-1], 1e-5, atol=1e-7)
    assert_close("clip ratio", l_metrics[-1].detach(), metrics["clip_frac_low"] + metrics["clip_frac_high"], 1e-6)
    if beta:
        assert_close("kl", l_metrics[0].detach(), metrics["kl"], 1e-5)


def verl_gspo_reference(logp, old, adv, mask, *, clip_low, clip_high):
    """verl's ``loss_mode="gspo"``: token ratio exp(logp - sg(logp) + sg(mean_t log-ratio)), its log clamped
    above at 10, PPO clip, always seq-mean-token-mean over the non-empty rows."""
    A = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)
    n = mask.sum(-1)
    seq = (torch.where(mask, logp - old, torch.zeros_like(logp)).sum(-1) / n.clamp(min=1))[:, None]
    ratio = (logp - logp.detach() + seq.detach()).clamp(max=10.0).exp()
    surr, surr_clipped = -A * ratio, -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(surr, surr_clipped)
    per_seq = torch.where(mask, pg, torch.zeros_like(pg)).sum(-1) / n.clamp(min=1)
    pg_clipfrac = torch.where(mask, (surr_clipped > surr).double(), 0.0).sum() / mask.sum()
    return per_seq[n > 0].sum() / (n > 0).sum(), pg_clipfrac


@pytest.mark.parametrize("per_token", (False, True))
def test_verl_gspo_equals_sequence_is_only_for_per_sequence_advantages(per_token):
    """verl's GSPO gives each token the gradient of its own log-prob; ours (and TRL's, Liger's) differentiates
    the sequence mean. The values agree, and so do the gradients while the advantage is constant within a row
    (every token of a row shares the ratio and the clip state); with per-token advantages they differ."""
    g = torch.Generator().manual_seed(5)
    B, T = 7, 9
    mask = _awkward_mask(B, T, g)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    old = logp - _pick((0.0, 0.5, -0.5, 1.5, -1.5), (B, T), g)   # sequence log-ratios well under verl's 10
    adv = _advantages(B, T, g, per_token)
    x = logp.clone().requires_grad_()
    want, pg_clipfrac = verl_gspo_reference(x, old, adv, mask, clip_low=0.2, clip_high=0.28)
    want_grad, = torch.autograd.grad(want, x)
    opts = GRPOLossOptions(eps_high=0.28, importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean",
                           empty_sequences="skip")
    x = logp.clone().requires_grad_()
    got, metrics = grpo_token_loss(x, None, adv, mask, old, None, opts)
    got_grad, = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(pg_clipfrac) > 0
    torch.testing.assert_close(metrics["clip_frac_low"] + metrics["clip_frac_high"], pg_clipfrac)
    if per_token:
        assert not torch.allclose(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    else:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_vespo_lambda_below_trl_floor_is_refused_and_the_floor_matches_liger():
    """TRL and Liger compute VESPO's gamma weight with max(lambda, 1e-4): a smaller lambda used as given would
    silently differ from them (phi off by e^(lambda' - lambda)(w - 1), 9x at w = e^10), so it is refused; at
    the floor our weight equals theirs for a lambda below it."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        with pytest.raises(ValueError, match=rf"{name} must be in \[0.0001, inf\)"):
            GRPOLossOptions(policy_loss="vespo", **{name: 1e-6})
    g = torch.Generator().manual_seed(2)
    B, T = 5, 4
    mask = _awkward_mask(B, T, g)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() - _pick((0.0, 2.0, -2.0, 4.0), (B, T), g)
    adv = _advantages(B, T, g, False)
    loss, _ = grpo_token_loss(logp, None, adv, mask, old, None,
                              GRPOLossOptions(policy_loss="vespo", vespo_lambda_pos=1e-4, vespo_lambda_neg=1e-4,
                                              loss_agg_mode="seq-mean-token-sum"))
    phi = chunked.get_gamma_weights(adv, (logp - old).detach(), mask.double(), lambda_pos=1e-6, lambda_neg=1e-6)
    want = (torch.where(mask, -phi * adv[:, None] * logp, 0.0)).sum() / B
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*[torch.autograd.grad(x, logp)[0] for x in (loss, want)], rtol=1e-12, atol=1e-12)


def test_liger_minus_inf_logit_gives_the_same_finite_loss_and_gradients():
    """docs/losses.md's '-inf logit' row for Liger: with a banned token (a -inf logit, or a -inf lm_head bias
    entry) never sampled, both Liger paths give a finite loss and gradient, equal to ours."""
    pytest.importorskip("liger_kernel.ops")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    hidden, weight, tokens, mask, adv, old, ref = _liger_batch(seed=8)
    B, T = tokens.shape
    banned = 5
    tokens = torch.where(tokens == banned, banned + 1, tokens)
    bias = torch.zeros(weight.shape[0])
    bias[banned] = float("-inf")
    kw = dict(temperature=0.8, beta=0.04, eps_high=0.28, log_ratio_clamp=None, kl_clamp=None)

    full = torch.cat([hidden @ weight.T + bias, torch.zeros(B, 1, weight.shape[0])], 1)
    xl, xo = full.clone().requires_grad_(), full.clone().requires_grad_()
    l_loss, _ = triton_grpo_loss(xl, old, ref, tokens, adv, mask.float(), temperature=0.8, beta=0.04, eps_low=0.2,
                                 eps_high=0.28, inplace=False, loss_type="bnpo", reduce=True)
    l_loss.backward()
    loss, _ = grpo_loss(xo[:, :-1], tokens, adv, mask, old, ref, backend="triton", **kw)
    loss.backward()
    assert torch.isfinite(l_loss) and torch.isfinite(xl.grad[:, :-1]).all()
    assert_close("loss", l_loss.detach(), loss.detach(), 1e-5, atol=1e-6)
    assert_close("dlogits", xl.grad[:, :-1], xo.grad[:, :-1], 1e-5, atol=1e-7)

    lig = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo",
                                   temperature=0.8)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    c_loss, _ = lig(h1, weight, tokens, mask.float(), adv, bias=bias, ref_per_token_logps=ref, old_per_token_logps=old)
    c_loss.backward()
    loss, _ = linear_grpo_loss(h2, weight, tokens, adv, mask, old, ref, bias=bias, backend="torch", **kw)
    loss.backward()
    assert torch.isfinite(c_loss) and torch.isfinite(h1.grad).all()
    assert_close("loss", c_loss.detach(), loss.detach(), 1e-5, atol=1e-6)
    assert_close("d_hidden", h1.grad, h2.grad, 1e-4)


def test_num_items_over_ranks_divided_by_ranks_gives_the_global_token_mean():
    """docs/losses.md: with gradients summed over accumulation steps and averaged over P ranks (DDP/FSDP),
    num_items_in_batch = (loss tokens of all ranks and steps) / P makes the step's gradient that of the token
    mean over the whole batch (TRL's dapo normaliser, verl's agg_loss * dp_size); the global count itself
    would scale it by 1 / P. A shared parameter theta shifts every shard's log-probs."""
    g = torch.Generator().manual_seed(4)
    P, steps, B, T = 3, 2, 4, 5
    shards = []
    for _ in range(P * steps):
        mask = torch.rand(B, T, generator=g) > 0.5
        base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        shards.append((base, base - _pick(LOG_RATIOS[:7], (B, T), g), _advantages(B, T, g, True), mask))
    n_global = sum(int(s[3].sum()) for s in shards)
    theta0 = 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)

    def ddp_step_grad(num_items):
        per_rank = []
        for r in range(P):
            theta = theta0.clone().requires_grad_()
            loss = sum(grpo_token_loss(base + theta, None, adv, mask, old, None, GRPOLossOptions(eps_high=0.28),
                                       num_items_in_batch=num_items)[0]
                       for base, old, adv, mask in shards[r * steps:(r + 1) * steps])
            per_rank.append(torch.autograd.grad(loss, theta)[0])
        return sum(per_rank) / P  # the averaging all-reduce

    theta = theta0.clone().requires_grad_()
    token_sum = sum(grpo_token_loss(base + theta, None, adv, mask, old, None,
                                    GRPOLossOptions(eps_high=0.28, reduce=False))[0].sum()
                    for base, old, adv, mask in shards)
    want, = torch.autograd.grad(token_sum / n_global, theta)
    torch.testing.assert_close(ddp_step_grad(torch.tensor(n_global / P, dtype=torch.float64)), want,
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ddp_step_grad(n_global) * P, want, rtol=1e-12, atol=1e-15)
