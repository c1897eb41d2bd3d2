"""The GRPO-family loss on per-token log-probs: the one definition every entry point uses.

The fused ops split the loss in two: a streaming pass over the vocabulary produces per-token ``logp`` and
``entropy`` (O(tokens) values, differentiable), and this module turns them into the loss and its metrics.
Everything here is O(tokens), so sequence-level IS, every policy loss and every aggregation mode costs no
extra pass over the logits; autograd through this code yields d(loss)/d(logp) and d(loss)/d(entropy), which
the kernels' backward turns into dlogits. ``grpo_loss`` (logits), ``linear_grpo_loss`` (hidden states), the
TRL hook and the benchmarks all call :func:`grpo_token_loss` with a :class:`GRPOLossOptions`, so they can
never disagree on the math. Formulas and the comparison with verl / TRL / Liger: ``docs/losses.md``.

Per token (r = exp(clamp(logp - old)), A = advantage, all at unmasked positions):

    clip   : max(-A r', -A clip(r, 1 - eps_low, 1 + eps_high))     r' = min(r, delta); dual clip for A < 0
    cispo  : -sg(min(r, 1 + eps_high)) A logp
    sapo   : -sigmoid(tau_A (r - 1)) 4 / tau_A  A                     tau_A = sapo_temperature_pos/neg
    vespo  : -sg(phi(w)) A logp                                        w = sequence ratio, gamma weight phi
    + beta * k3(ref, logp) [* r with use_bias_correction_kl]  - entropy_coef * H

then reduced with ``aggregate`` (verl's mode names), or returned per token (``reduce=False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Dict, Optional, Tuple, Union

import torch

from ._utils import (check_bool, check_choice, check_same_device, check_scalar, check_shape, check_temperature,
                     check_tensor, check_tokens_in_range, check_validate, normalize_mask)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IS_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo", "sapo", "vespo")
EMPTY_SEQUENCES = ("count", "skip")


@dataclass(frozen=True)
class GRPOLossOptions:
    """Every option of the GRPO-family loss, with its default; validated (and normalised to Python
    numbers) at construction. ``grpo_loss``, ``linear_grpo_loss``, ``GRPOLoss`` and ``LinearGRPOLoss``
    take one of these as ``options=`` and/or the same names as keyword arguments.

    Attributes:
        temperature: logits are divided by it before the softmax, in [1e-6, 1e6].
        eps_low, eps_high: PPO clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2 / 0.28).
            ``cispo`` caps the (detached) ratio at 1 + eps_high and ignores eps_low.
        dual_clip: verl's ``clip_ratio_c`` (> 1, e.g. 3.0): caps the loss of negative-advantage tokens at
            ``-dual_clip * A``; None = off. ``clip`` only.
        delta: INTELLECT-2 two-sided clip, the unclipped ratio is capped at ``delta`` (> 1 + eps_high);
            None = off. ``clip`` only.
        beta: weight of the k3 KL to the reference log-probs (>= 0).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        importance_sampling: "token" (PPO/GRPO) or "sequence" (GSPO: one ratio per sequence from the mean
            token log-ratio). "sequence" is for ``clip`` only.
        loss_agg_mode: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (Dr.GRPO: sum / (B * max_length)).
        max_length: T_max of "seq-mean-token-sum-norm" (default: the tensors' T); verl's ``loss_scale_factor``
            divides by T_max alone, so its loss is ours times B.
        policy_loss: "clip" (PPO/GRPO clipped surrogate), "cispo", "sapo" or "vespo".
        log_ratio_clamp: |log-ratio| and |ref - logp| are clamped to this before ``exp`` (verl: 20), so the
            ratio and k3 stay finite with finite gradients; None = no clamp (TRL/Liger; may overflow).
        kl_clamp: the k3 value is clamped to [-kl_clamp, kl_clamp] (verl: 10, the default); None = no
            clamp (TRL/Liger).
        use_bias_correction_kl: multiply k3 by the (differentiable) importance ratio (TRL's
            ``use_bias_correction_kl``, DeepSeek-V3.2).
        empty_sequences: how the "seq-mean-*" modes treat sequences with no unmasked token: "count" (in the
            denominator, as TRL) or "skip" (as verl).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for A > 0 / A <= 0 (> 0).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma-weight shape for
            A >= 0 / A < 0 (k >= 0, lambda >= 1e-4: TRL and Liger silently use 1e-4 for a smaller lambda).
        reduce: False returns the (B, T) per-token loss (0 at masked positions) instead of the scalar.
    """
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    delta: Optional[float] = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    importance_sampling: str = "token"
    loss_agg_mode: str = "token-mean"
    max_length: Optional[int] = None
    policy_loss: str = "clip"
    log_ratio_clamp: Optional[float] = 20.0
    kl_clamp: Optional[float] = 10.0
    use_bias_correction_kl: bool = False
    empty_sequences: str = "count"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    reduce: bool = True

    def __post_init__(self):
        def setf(name, value):
            object.__setattr__(self, name, value)

        setf("temperature", check_temperature(self.temperature))
        setf("eps_low", check_scalar(self.eps_low, "eps_low", "[0, 1)"))
        setf("eps_high", check_scalar(self.eps_high, "eps_high", "[0, inf)"))
        setf("dual_clip", check_scalar(self.dual_clip, "dual_clip", "(1, inf)", optional=True))
        setf("delta", check_scalar(self.delta, "delta", f"({1 + self.eps_high}, inf)", optional=True))
        setf("beta", check_scalar(self.beta, "beta", "[0, inf)"))
        setf("entropy_coef", check_scalar(self.entropy_coef, "entropy_coef"))
        check_choice(self.importance_sampling, "importance_sampling", IS_LEVELS)
        check_choice(self.loss_agg_mode, "loss_agg_mode", AGG_MODES)
        setf("max_length", check_scalar(self.max_length, "max_length", "[1, inf)", optional=True, integer=True))
        check_choice(self.policy_loss, "policy_loss", POLICY_LOSSES)
        setf("log_ratio_clamp", check_scalar(self.log_ratio_clamp, "log_ratio_clamp", "(0, 80]", optional=True))
        setf("kl_clamp", check_scalar(self.kl_clamp, "kl_clamp", "(0, inf)", optional=True))
        for name in ("use_bias_correction_kl", "reduce"):
            setf(name, check_bool(getattr(self, name), name))
        check_choice(self.empty_sequences, "empty_sequences", EMPTY_SEQUENCES)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            setf(name, check_scalar(getattr(self, name), name, "(0, inf)"))
        for name in ("vespo_lambda_pos", "vespo_lambda_neg"):  # TRL and Liger raise a smaller lambda to 1e-4
            setf(name, check_scalar(getattr(self, name), name, "[0.0001, inf)"))
        for name in ("vespo_k_pos", "vespo_k_neg"):
            setf(name, check_scalar(getattr(self, name), name, "[0, inf)"))
        if self.policy_loss != "clip":
            for name in ("dual_clip", "delta"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to policy_loss='clip' only, got policy_loss="
                                     f"{self.policy_loss!r} with {name}={getattr(self, name)!r}")
            if self.importance_sampling != "token":
                raise ValueError(f"policy_loss={self.policy_loss!r} needs importance_sampling='token'")

    @classmethod
    def build(cls, options: Optional["GRPOLossOptions"] = None, **overrides) -> "GRPOLossOptions":
        """``options`` (or the defaults) with ``overrides`` applied; unknown names raise TypeError."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__} or None, got {type(options).__name__}")
        unknown = sorted(set(overrides) - OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown loss option(s) {unknown}; the options are the fields of {cls.__name__}: "
                            f"{sorted(OPTION_NAMES)}")
        base = options if options is not None else cls()
        return replace(base, **overrides) if overrides else base

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0


OPTION_NAMES = frozenset(f.name for f in fields(GRPOLossOptions))


# ------------------------------------------------------------------------------------------- aggregation
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # where (not multiply) so NaN/inf at masked positions never leaks into the sum or its gradient
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              max_length: Optional[int] = None, empty_sequences: str = "count") -> torch.Tensor:
    """Reduce a (B, T) per-token loss over a bool (B, T) mask to a scalar (verl's mode names).

    ``token-mean``               sum(m*l) / max(sum(m), 1)
    ``seq-mean-token-mean``      mean_i( sum_t(m*l) / max(sum_t m, 1) )
    ``seq-mean-token-sum``       mean_i sum_t(m*l)
    ``seq-mean-token-sum-norm``  sum(m*l) / (B * T_max)   (TRL's Dr.GRPO; T_max = ``max_length`` or T)

    For the two ``seq-mean`` modes, ``empty_sequences="count"`` averages over all B sequences (TRL),
    ``"skip"`` over the sequences with at least one unmasked token (verl).
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    B, T = per_token.shape
    if mode == "seq-mean-token-sum-norm":
        t_max = T if max_length is None else max_length
        return masked_sum(per_token, mask) / max(B * t_max, 1)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_seq = masked_sum(per_token, mask, dim=-1)
    else:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    if empty_sequences == "skip":
        return masked_mean(per_seq, mask.any(-1))
    return per_seq.sum() / max(B, 1)


# ---------------------------------------------------------------------------------------------- the loss
def kl_k3(d: torch.Tensor, log_ratio_clamp: Optional[float] = None) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π || π_ref) per token, e^d − d − 1 with d = log π_ref − log π (any shape; d
    is clamped to ±``log_ratio_clamp`` first when given, as verl does: beyond the bound k3 is constant and gets
    no gradient; clamping only e^d's argument made k3 fall as d grew past it, negative past d ≈ e^20, with a
    gradient that pushed log π further from log π_ref). Computed as expm1(d) − d in float64 and returned in d's
    dtype: in float32, e^d − d − 1 rounds e^d to 1 + d and returns 0 for |d| below ~1e-4, exactly where a policy
    near its reference sits (and its gradient, 1 − e^d, cancels the same way)."""
    d64 = d.double()
    if log_ratio_clamp is not None:
        d64 = d64.clamp(-log_ratio_clamp, log_ratio_clamp)
    return (torch.expm1(d64) - d64).to(d.dtype)


def _vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
                   opts: GRPOLossOptions) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) = exp(lam + k log w - lam w), w = exp(sum_t clamp(log r_t)),
    normalised so phi(1) = 1; k, lam by the sign of A (TRL's clamps: log r_t to [-20, 20], log w to
    [log 1e-8, 20]). Shape broadcast like ``adv``."""
    with torch.no_grad():
        seq = masked_sum(log_ratio.clamp(-20.0, 20.0), mask, dim=-1)[:, None]
        log_w = seq.clamp(math.log(1e-8), 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, opts.vespo_k_pos, opts.vespo_k_neg)
        lam = torch.where(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _log_ratio_and_ratio(logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                         opts: GRPOLossOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """The token log-ratio logp - old (0 at masked positions) and the importance ratio exp(clamp(l)), l the
    token log-ratio or, with ``importance_sampling="sequence"``, its masked mean over the sequence."""
    tok_log_ratio = torch.where(mask, logp - old, torch.zeros((), dtype=logp.dtype, device=logp.device))
    log_ratio = tok_log_ratio
    if opts.importance_sampling == "sequence":
        log_ratio = masked_mean(tok_log_ratio, mask, dim=-1)[:, None].expand_as(logp)
    c = opts.log_ratio_clamp
    # clamp before exp (verl): exp never overflows, so the backward never meets 0 * inf
    return tok_log_ratio, torch.exp(log_ratio if c is None else log_ratio.clamp(-c, c))


def grpo_token_loss(
    logp: torch.Tensor,                    # (B, T) fp32 log pi_theta(token), differentiable
    entropy: Optional[torch.Tensor],       # (B, T) fp32 entropy of the full distribution, or None if not computed
    advantages: torch.Tensor,              # (B,), (B, 1) or (B, T)
    mask: torch.Tensor,                    # (B, T) bool
    old_logprobs: Optional[torch.Tensor],  # (B, T) or None (on-policy: old = logp.detach())
    ref_logprobs: Optional[torch.Tensor],  # (B, T) or None; needed when beta > 0
    opts: GRPOLossOptions,
    *,
    num_items_in_batch: Union[None, int, float, torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Return the GRPO-family loss (0-d fp32, or (B, T) with ``opts.reduce=False``) and its metrics.

    ``old_logprobs``, ``ref_logprobs`` and ``advantages`` are constants of the objective: they are
    detached, so a graph attached to them (e.g. old log-probs computed outside ``no_grad``) neither
    receives gradient nor cancels the policy's. Masked positions never reach the loss or a gradient, even
    when they hold NaN/inf. ``num_items_in_batch`` (token-mean only): divide the masked sum by this token
    count (e.g. the count across ranks and accumulation steps, divided by the number of ranks when gradients
    are averaged over ranks: TRL/Liger's dapo normaliser, clamped to >= 1) instead of the local one; a tensor
    stays on the device (no host sync).

    Metrics (detached 0-d, means over unmasked tokens): clip_frac_low (r < 1 - eps_low, A < 0; ``clip`` only),
    clip_frac_high (r > 1 + eps_high, A > 0; ``clip`` and ``cispo``), ratio_mean, logp_mean, entropy (if
    given), kl (if ref_logprobs given). sapo and vespo clip nothing: their clip fractions are 0.
    """
    dt = logp.dtype
    zero = torch.zeros((), dtype=dt, device=logp.device)
    adv = advantages.detach().to(dt)
    if adv.dim() == 1:
        adv = adv[:, None]
    # sanitise masked positions first: padding may hold NaN advantages or -inf old log-probs, and 0 * inf
    # in a backward gives NaN (sequence-level IS shares one ratio across a row, so it would spread)
    adv = torch.where(mask, adv.expand_as(logp), zero)
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().to(dt)
    tok_log_ratio, ratio = _log_ratio_and_ratio(logp, old, mask, opts)
    c = opts.log_ratio_clamp

    if opts.policy_loss == "clip":
        clipped = torch.clamp(ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
        unclipped = ratio if opts.delta is None else torch.clamp(ratio, max=opts.delta)
        per_token = torch.maximum(-adv * unclipped, -adv * clipped)
        if opts.dual_clip is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -opts.dual_clip * adv), per_token)
    elif opts.policy_loss == "cispo":
        per_token = -torch.clamp(ratio, max=1.0 + opts.eps_high).detach() * adv * logp
    elif opts.policy_loss == "sapo":
        tau = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg).to(dt)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    else:  # vespo
        per_token = -_vespo_weights(tok_log_ratio, mask, adv, opts) * adv * logp

    metrics: Dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        # float64 from logp: with use_bias_correction_kl the gradients of k3 and of r, r (1 - e^d) and k3 r, cancel
        # to -r d; summed in float32 that lost 6% at ref - logp = 16 (kl_clamp=None), 0.08% at 12
        lp64 = logp.double()
        d = torch.where(mask, ref_logprobs.detach().double() - lp64, 0.0)
        k3 = kl_k3(d, c)
        if opts.kl_clamp is not None:
            k3 = torch.clamp(k3, -opts.kl_clamp, opts.kl_clamp)
        if opts.use_bias_correction_kl:
            k3 = k3 * _log_ratio_and_ratio(lp64, old.double(), mask, opts)[1]
        k3 = k3.to(dt)
        if opts.beta != 0.0:
            per_token = per_token + opts.beta * k3
        metrics["kl"] = masked_mean(k3.detach(), mask)
    if opts.entropy_coef != 0.0:
        per_token = per_token - opts.entropy_coef * entropy

    if not opts.reduce:
        loss = torch.where(mask, per_token, zero)
    elif num_items_in_batch is not None:
        if opts.loss_agg_mode != "token-mean":
            raise ValueError("num_items_in_batch replaces the token count of loss_agg_mode='token-mean'; got "
                             f"loss_agg_mode={opts.loss_agg_mode!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            n = num_items_in_batch
            if n.numel() != 1 or n.is_complex() or n.dtype == torch.bool:
                # a (k,) count would broadcast the scalar loss into a (k,) "loss" without an error
                raise TypeError("num_items_in_batch must be a number or a one-element real tensor, got a tensor of "
                                f"shape {tuple(n.shape)} and dtype {n.dtype}")
            denom = n.detach().reshape(()).to(device=logp.device, dtype=dt).clamp(min=1.0)
        else:
            denom = max(check_scalar(num_items_in_batch, "num_items_in_batch", "[0, inf)"), 1.0)
        loss = masked_sum(per_token, mask) / denom
    else:
        loss = aggregate(per_token, mask, opts.loss_agg_mode, opts.max_length, opts.empty_sequences)

    with torch.no_grad():
        r = ratio.detach()
        # a clip fraction counts the tokens whose bound binds: cispo has only the upper cap, sapo and vespo none
        low = (r < 1.0 - opts.eps_low) & (adv < 0) & (opts.policy_loss == "clip")
        high = (r > 1.0 + opts.eps_high) & (adv > 0) & (opts.policy_loss in ("clip", "cispo"))
        metrics["clip_frac_low"] = masked_mean(low.to(dt), mask)
        metrics["clip_frac_high"] = masked_mean(high.to(dt), mask)
        metrics["ratio_mean"] = masked_mean(r, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
        metrics["logp_mean"] = masked_mean(logp.detach(), mask)
    return loss, metrics


def check_token_inputs(B: int, T: int, advantages, old_logprobs, ref_logprobs) -> None:
    """Shape and dtype checks of the per-token inputs of the loss: ``advantages`` (B,), (B, 1) or (B, T) and
    the optional ``old_logprobs`` / ``ref_logprobs`` (B, T), all floating point. Reads no values (no sync);
    without it a (1, T) or (B, 1) tensor would broadcast silently."""
    check_tensor(advantages, "advantages", ndim=(1, 2), floating=True)
    if advantages.dim() == 1:
        check_shape(advantages, "advantages", (B,))
    elif advantages.shape[1] == 1 and T != 1:
        check_shape(advantages, "advantages", (B, 1))
    else:
        check_shape(advantages, "advantages", (B, T))
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_tensor(t, name, ndim=2, floating=True)
            check_shape(t, name, (B, T))


def validate_loss_inputs(
    B: int, T: int, vocab_size: int, device: torch.device,
    tokens, advantages, mask, old_logprobs, ref_logprobs, opts: GRPOLossOptions, *, validate: str = "cheap",
) -> torch.Tensor:
    """Check the non-logit inputs shared by ``grpo_loss`` and ``linear_grpo_loss``; return the bool mask.

    Raises ``TypeError``/``ValueError`` naming the offending argument (shape, dtype, device, beta > 0
    without ref_logprobs). ``validate="full"`` also reads tensor values (ids in range at unmasked
    positions, 0/1 mask values), a host sync on CUDA; under ``torch.compile`` it is always "cheap".
    """
    check_validate(validate)
    full = validate == "full" and not torch.compiler.is_compiling()
    check_tensor(tokens, "tokens", ndim=2, dtypes=(torch.int64, torch.int32))
    check_shape(tokens, "tokens", (B, T))
    check_token_inputs(B, T, advantages, old_logprobs, ref_logprobs)
    check_same_device(tokens.new_empty(0, device=device), "logits", tokens=tokens, advantages=advantages,
                      mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    if opts.beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if mask is not None:
        check_tensor(mask, "mask", ndim=2)
    m = normalize_mask(mask, (B, T), device, check_values=full)
    if full:
        check_tokens_in_range(tokens, vocab_size, m)
    return m
