"""Offline objectives with FPA gradient coefficients.

Each offline method's gradient has the form  -[C_w * grad log pi(y_w) - C_l * grad log pi(y_l)]  with
coefficients that depend on the current policy. FPA evaluates those coefficients at the future policy pi_hat
(from ``fpa_logprobs``) instead, under stop-gradient:

    L_FPA = -E[ sg(C_w(pi_hat)) * log pi_theta(y_w) - sg(C_l(pi_hat)) * log pi_theta(y_l) ]   (+ RPO's NLL)

Every function here returns ``(loss, metrics)``. ``loss`` is a 0-d tensor whose *value* is the base method's
loss at the current policy (for logging) and whose *gradient* is the FPA gradient above: it is built as
``base.detach() + (surrogate - surrogate.detach())``. With lam = 0 (pi_hat = pi_theta), or ``fpa_logp=None``,
the gradient is exactly the base method's autograd gradient. That loss is differentiable once: its coefficients
sit under stop-gradient, so autograd's second derivative of the surrogate would lack their derivative (a wrong
Hessian without an error); ``create_graph=True`` through it raises instead. With ``fpa_logp=None`` on every side
(pi_hat = pi_theta) the loss is the base loss itself, whose first and second derivatives are the base method's.
``metrics`` holds per-sample coefficients ``c_w``/``c_l`` (B,), ``base_loss`` and ``fpa_loss`` (the base loss
evaluated at pi_hat), all detached.

``fpa_side``: "both" evaluates C_w and C_l at pi_hat; "rejected" (the paper's ablation) evaluates only C_l at
pi_hat and keeps C_w at pi_theta [our choice: a coefficient "at pi_hat" uses pi_hat for every policy
log-prob inside it, e.g. both margins of DPO's u]. For unpaired methods (KTO, offline PG) "rejected" means
undesirable / negative-advantage samples.

Sequence log-probs: summed for DPO, RPO's DPO term and KTO; length-normalised (mean over the mask) for SimPER,
RPO's NLL and the offline policy gradient, as each base method defines. Lengths use max(count, 1).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..._utils import check_choice, check_same_device, check_scalar, check_shape, check_tensor, normalize_mask

FPA_SIDES = ("both", "rejected")
Metrics = Dict[str, torch.Tensor]


class FPALogProbs(NamedTuple):
    """Per-token log-probs of one batch of sequences, as returned by ``fpa_logprobs`` (plus its mask).

    logp: (B, T) log pi_theta(y_t), differentiable. ref_logp: (B, T) log pi_ref(y_t) or None (SimPER, PG).
    fpa_logp: (B, T) log pi_hat(y_t) or None (then pi_hat = pi_theta: the base method). mask: (B, T) or None.
    """
    logp: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    fpa_logp: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


class _Seq(NamedTuple):
    s: torch.Tensor       # (B,) differentiable sum_t m * logp (fp32; fp64 for fp64 log-probs)
    s_hat: torch.Tensor   # (B,) detached sum over log pi_hat
    ref: Optional[torch.Tensor]  # (B,) detached sum over log pi_ref
    n: torch.Tensor       # (B,) lengths, max(count, 1)
    no_fpa: bool          # fpa_logp is None: pi_hat = pi_theta


def _seq(x: FPALogProbs, name: str, need_ref: bool) -> _Seq:
    if not isinstance(x, FPALogProbs):
        if isinstance(x, tuple):
            x = FPALogProbs(*x)
        else:
            raise TypeError(f"{name} must be an FPALogProbs(logp, ref_logp, fpa_logp, mask), got {type(x).__name__}")
    check_tensor(x.logp, f"{name}.logp", ndim=2, floating=True)
    shape = x.logp.shape
    if shape[0] == 0:   # every objective is a mean over the batch: an empty one gave a NaN loss without an error
        raise ValueError(f"{name}.logp holds no sequence (shape {tuple(shape)}): the loss is a mean over the batch")
    # (torch.where would refuse a mix only with a message that names no argument)
    check_same_device(x.logp, f"{name}.logp", **{f"{name}.{f}": t for f, t in
                                                 (("ref_logp", x.ref_logp), ("fpa_logp", x.fpa_logp),
                                                  ("mask", x.mask)) if isinstance(t, torch.Tensor)})
    m = normalize_mask(x.mask, shape, x.logp.device)
    # sums in float32 (float64 for float64 log-probs): a bf16 sum over 512 tokens is off by whole units
    cdt = torch.float64 if x.logp.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=cdt, device=x.logp.device)

    def ssum(t, field):
        check_tensor(t, f"{name}.{field}", floating=True)
        check_shape(t, f"{name}.{field}", shape)
        return torch.where(m, t.to(cdt), zero).sum(-1)

    s = torch.where(m, x.logp.to(cdt), zero).sum(-1)
    s_hat = s.detach() if x.fpa_logp is None else ssum(x.fpa_logp.detach(), "fpa_logp")
    if x.ref_logp is None and need_ref:
        raise ValueError(f"{name}.ref_logp is required by this objective")
    ref = None if x.ref_logp is None else ssum(x.ref_logp.detach(), "ref_logp")
    n = m.sum(-1).clamp(min=1).to(cdt)
    return _Seq(s, s_hat, ref, n, x.fpa_logp is None)


def _check_pair(w: _Seq, l: _Seq):
    if w.s.shape != l.s.shape:
        raise ValueError(f"chosen and rejected must have the same batch size, got {w.s.shape[0]} and {l.s.shape[0]}")
    if w.s.device != l.s.device:
        raise ValueError("chosen and rejected must be on one device")


# beta and the loss weights multiply fp32 sums of log-ratios: past ~3.4e38 the coefficient itself is inf in fp32 and
# inf * 0 (a zero margin, a zero NLL, a saturated sigmoid) made the loss NaN (beta = 1e39 or 1e300: NaN; a weight
# of 1e300: an internal "cannot be converted to type float without overflow"). Up to 1e6 beta * margin stays
# finite for any summed margin below 3e32, far past real sequence log-probs (as LAM_RANGE bounds lam).
BETA_RANGE = "(0, 1e6]"
WEIGHT_RANGE = "[0, 1e6]"


def _check_beta(value):
    return check_scalar(value, "beta", BETA_RANGE)


def _check_weight(value, name):
    return check_scalar(value, name, WEIGHT_RANGE)


class _DifferentiableOnce(torch.autograd.Function):
    """Identity whose backward refuses to build a graph (``create_graph=True``, ``torch.func.grad``): the FPA
    surrogate's coefficients are constants to autograd, so its second derivative would silently lack theirs."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("the FPA objectives (fpa_*_loss) with fpa_logp given are differentiable once: their "
                               "gradient evaluates its coefficients at pi_hat under stop-gradient, so it has no "
                               "second derivative (create_graph=True, torch.func.grad); with fpa_logp=None the "
                               "loss is the base method's, twice differentiable")
        return g


def _finish(base: torch.Tensor, surrogate: torch.Tensor, fpa_base: torch.Tensor, c_w, c_l,
            no_fpa: bool) -> Tuple[torch.Tensor, Metrics]:
    """``base``: the base loss at pi_theta, differentiable. Value = ``base``; gradient = the FPA surrogate's, which
    is the base loss's own when pi_hat = pi_theta (``no_fpa``: then the loss is ``base``, twice differentiable)."""
    loss = base if no_fpa else base.detach() + _DifferentiableOnce.apply(surrogate - surrogate.detach())
    metrics = {"base_loss": base.detach(), "fpa_loss": fpa_base.detach(), "c_w": c_w.detach(), "c_l": c_l.detach()}
    return loss, metrics


# ------------------------------------------------------------------------------------------- paired methods
def _dpo_parts(w: _Seq, l: _Seq, beta: float, fpa_side: str):
    def margin(sw, sl):
        return beta * ((sw - w.ref) - (sl - l.ref))

    u_theta = margin(w.s, l.s)
    u_hat = margin(w.s_hat, l.s_hat)
    c_hat = beta * torch.sigmoid(-u_hat)
    c_w = c_hat if fpa_side == "both" else beta * torch.sigmoid(-u_theta.detach())
    c_l = c_hat
    surrogate = -(c_w * w.s - c_l * l.s).mean()
    return surrogate, -F.logsigmoid(u_theta).mean(), -F.logsigmoid(u_hat).mean(), c_w, c_l


def fpa_dpo_loss(chosen: FPALogProbs, rejected: FPALogProbs, *, beta: float = 0.1,
                 fpa_side: str = "both") -> Tuple[torch.Tensor, Metrics]:
    """DPO with FPA coefficients: base loss -log sigmoid(u), u = beta[(S_w - R_w) - (S_l - R_l)] (sums).

    C_w = C_l = beta * sigmoid(-u) evaluated at pi_hat. ``chosen``/``rejected``: FPALogProbs with (B, T_w) and
    (B, T_l) float tensors (ref_logp required). ``beta`` in (0, 1e6] (0.1; ``BETA_RANGE``). ``fpa_side``: "both"
    (default) or "rejected" (see the module docstring). Returns (loss (0-d), metrics).
    """
    beta = _check_beta(beta)
    check_choice(fpa_side, "fpa_side", FPA_SIDES)
    w, l = _seq(chosen, "chosen", True), _seq(rejected, "rejected", True)
    _check_pair(w, l)
    surrogate, base, fpa_base, c_w, c_l = _dpo_parts(w, l, beta, fpa_side)
    return _finish(base, surrogate, fpa_base, c_w, c_l, w.no_fpa and l.no_fpa)


def fpa_rpo_loss(chosen: FPALogProbs, rejected: FPALogProbs, *, beta: float = 0.1, alpha: float = 1.0,
                 fpa_side: str = "both") -> Tuple[torch.Tensor, Metrics]:
    """RPO: the FPA-DPO term plus ``alpha`` * NLL(y_w) / |y_w| (the NLL gradient is the plain autograd one).

    ``chosen``/``rejected``: FPALogProbs with (B, T_w) and (B, T_l) float tensors (ref_logp required).
    ``beta`` in (0, 1e6] (0.1) and ``fpa_side`` as in :func:`fpa_dpo_loss`; ``alpha`` in [0, 1e6] (1.0).
    Returns (loss (0-d), metrics), the metrics of :func:`fpa_dpo_loss` plus ``nll``.
    """
    beta = _check_beta(beta)
    alpha = _check_weight(alpha, "alpha")
    check_choice(fpa_side, "fpa_side", FPA_SIDES)
    w, l = _seq(chosen, "chosen", True), _seq(rejected, "rejected", True)
    _check_pair(w, l)
    surrogate, base, fpa_base, c_w, c_l = _dpo_parts(w, l, beta, fpa_side)
    nll = -(w.s / w.n).mean()
    loss, metrics = _finish(base + alpha * nll, surrogate + alpha * nll, fpa_base + alpha * nll, c_w, c_l,
                            w.no_fpa and l.no_fpa)
    metrics["nll"] = nll.detach()
    return loss, metrics


def fpa_simper_loss(chosen: FPALogProbs, rejected: FPALogProbs, *,
                    fpa_side: str = "both") -> Tuple[torch.Tensor, Metrics]:
    """SimPER: base loss -pi(y_w)^(1/|y_w|) + pi(y_l)^(1/|y_l|); C = pi(y)^(1/|y|) / |y| per side, at pi_hat.

    ``chosen``/``rejected``: FPALogProbs with (B, T_w) and (B, T_l) float tensors; no reference model is needed
    (``ref_logp`` may be None). ``fpa_side``: "both" (default) or "rejected" (see the module docstring).
    Returns (loss (0-d), metrics).
    """
    check_choice(fpa_side, "fpa_side", FPA_SIDES)
    w, l = _seq(chosen, "chosen", False), _seq(rejected, "rejected", False)
    _check_pair(w, l)
    pw, pl = torch.exp(w.s / w.n), torch.exp(l.s / l.n)
    pw_hat, pl_hat = torch.exp(w.s_hat / w.n), torch.exp(l.s_hat / l.n)
    c_w = (pw_hat if fpa_side == "both" else pw.detach()) / w.n
    c_l = pl_hat / l.n
    surrogate = -(c_w * w.s - c_l * l.s).mean()
    return _finish((pl - pw).mean(), surrogate, (pl_hat - pw_hat).mean(), c_w, c_l, w.no_fpa and l.no_fpa)


# ----------------------------------------------------------------------------------------- unpaired methods
def _as_scalar_tensor(x, name, like):
    """A number (checked by ``check_scalar``) or a one-element real tensor (kept on its device: its value is not
    read) as a 0-d tensor like ``like``."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-d or one-element tensor), got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            # as check_scalar refuses them: a bool tensor was read as 1.0, a complex one lost its imaginary part
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got dtype {x.dtype}")
        return x.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.tensor(check_scalar(x, name), dtype=like.dtype, device=like.device)


def fpa_kto_loss(batch: FPALogProbs, desirable: torch.Tensor, *, beta: float = 0.1,
                 kl: Union[float, torch.Tensor] = 0.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, fpa_side: str = "both") -> Tuple[torch.Tensor, Metrics]:
    """KTO with FPA coefficients on an unpaired batch.

    r = S - R (summed log-ratio), z_ref = ``kl`` (the detached KL estimate, e.g. TRL's clamped mismatched-pair
    estimate; taken as given). Desirable: loss w_D (1 - sigmoid(beta (r - z_ref))); undesirable:
    w_U (1 - sigmoid(beta (z_ref - r))). Coefficient w * beta * sigmoid(z)(1 - sigmoid(z)), evaluated at pi_hat.
    ``batch``: FPALogProbs with (B, T) float tensors (ref_logp required). ``desirable``: (B,) bool.
    ``beta`` in (0, 1e6] (0.1); ``kl``: a float or a one-element tensor (0.0); ``desirable_weight`` (w_D)
    and ``undesirable_weight`` (w_U) in [0, 1e6] (1.0 each); ``fpa_side``: "both" (default) or "rejected" (pi_hat
    for the undesirable samples only). Returns (loss (0-d), metrics); metrics ``c_w`` / ``c_l`` are zero on the other
    kind of sample.
    """
    beta = _check_beta(beta)
    desirable_weight = _check_weight(desirable_weight, "desirable_weight")
    undesirable_weight = _check_weight(undesirable_weight, "undesirable_weight")
    check_choice(fpa_side, "fpa_side", FPA_SIDES)
    x = _seq(batch, "batch", True)
    check_tensor(desirable, "desirable", ndim=1)
    check_shape(desirable, "desirable", x.s.shape)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    check_same_device(x.s, "batch.logp", desirable=desirable)
    z_ref = _as_scalar_tensor(kl, "kl", x.s)
    sign = torch.where(desirable, 1.0, -1.0).to(x.s.dtype)         # +1 desirable, -1 undesirable
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(x.s.dtype)

    def parts(s):
        z = beta * sign * ((s - x.ref) - z_ref)
        sig = torch.sigmoid(z)
        return weight * (1 - sig), weight * beta * sig * (1 - sig)

    loss_theta, c_theta = parts(x.s)
    loss_hat, c_hat = parts(x.s_hat)
    c = torch.where(desirable, c_hat if fpa_side == "both" else c_theta.detach(), c_hat)
    surrogate = -(sign * c * x.s).mean()
    zero = torch.zeros_like(c)
    return _finish(loss_theta.mean(), surrogate, loss_hat.mean(), torch.where(desirable, c, zero),
                   torch.where(desirable, zero, c), x.no_fpa)


def fpa_offline_pg_loss(batch: FPALogProbs, advantages: torch.Tensor, *,
                        fpa_side: str = "both") -> Tuple[torch.Tensor, Metrics]:
    """Offline policy gradient (our choice): base loss -mean_i A_i * pi(y_i)^(1/|y_i|).

    Its gradient is -A_i * w_i * grad(S_i / |y_i|) with w = pi(y)^(1/|y|) (length-normalised likelihood);
    FPA evaluates w at pi_hat. ``batch``: FPALogProbs with (B, T) float tensors (ref_logp may be None).
    ``advantages``: (B,) float. ``fpa_side``: "both" (default) or "rejected" (pi_hat for A_i < 0 samples only).
    Returns (loss (0-d), metrics); metrics ``c_w`` / ``c_l`` hold |A_i| * w_i / |y_i| on positive / negative
    samples (zero elsewhere).
    """
    check_choice(fpa_side, "fpa_side", FPA_SIDES)
    x = _seq(batch, "batch", False)
    check_tensor(advantages, "advantages", ndim=1, floating=True)
    check_shape(advantages, "advantages", x.s.shape)
    check_same_device(x.s, "batch.logp", advantages=advantages)
    A = advantages.detach().to(x.s.dtype)
    w_theta = torch.exp(x.s / x.n)
    w_hat = torch.exp(x.s_hat / x.n)
    neg = A < 0
    w = w_hat if fpa_side == "both" else torch.where(neg, w_hat, w_theta.detach())
    coef = A * w / x.n                                        # d(-loss)/dS_i up to the 1/B of the mean
    surrogate = -(coef * x.s).mean()
    zero = torch.zeros_like(coef)
    return _finish(-(A * w_theta).mean(), surrogate, -(A * w_hat).mean(), torch.where(neg, zero, coef),
                   torch.where(neg, -coef, zero), x.no_fpa)
