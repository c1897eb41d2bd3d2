"""GXPO and SFPO side by side with the authors' update on cases the other side-by-side tests do not reach.

The references below are written for these tests from the authors' described behaviour (not copied): GXPO's
paper-era mini-batch step (post-clip g0/g1, the guarded closed form with ``pow``, θ0 restored on a fallback
with the probe steps' optimizer state kept and g0 recomputed, the EMA gate on the clipped corrective norm) and
SFPO's batch step (K full passes over the mini-batches, one reposition, a slow pass). Both clip over all the
module's parameters and extrapolate / reposition the trainable ones (``requires_grad``).

Cases: several param groups with their own lr / weight_decay / betas (AdamW with amsgrad, SGD with momentum,
dampening and coupled decay), a frozen parameter inside a group, a parameter whose gradient is exactly zero,
clipping on every pass / never, K = 2, 3, 64, 256 (GXPO) and 1, 2, 7 (SFPO), α small, 1 and above 1, g1 = g0
exactly (r = 1), the small-g0 fallback at its exact threshold, the gates at their exact thresholds, θ̃ overflowing
(α = 1e308), more optimizers, bf16 parameters, a trainable parameter outside the optimizer and a gradient whose
entries are finite but whose norm overflows. Trajectories are 5 or 6 outer steps in float64. Where we differ on
purpose, update-rules.md ("Ours vs the authors' code") says so and the test pins the difference.
"""
import copy
import math

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO
from gxpo_kernels.update.gates import EMAGate, EntropyGate

_G = torch.Generator().manual_seed(2026)
_X = torch.randn(12, 20, 5, generator=_G, dtype=torch.float64)
_Y = torch.randn(12, 20, 1, generator=_G, dtype=torch.float64)


class _Net(torch.nn.Module):
    """Two trainable layers, a frozen layer (kept in the optimizer's groups by ``_groups``) and a parameter that
    enters the loss times 0 (its gradient is an exact zero tensor, so AdamW still steps it: decay, moments)."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(5, 7), torch.nn.Linear(7, 1)
        self.frozen = torch.nn.Linear(5, 7).requires_grad_(False)
        self.dead = torch.nn.Parameter(torch.randn(3))
        self.to(dtype)

    def loss(self, batch):
        x, y = _X[batch].to(self.dead.dtype), _Y[batch].to(self.dead.dtype)
        out = self.b(torch.tanh(self.a(x) + self.frozen(x)))
        return ((out - y) ** 2).mean() + 0.0 * self.dead.sum()


def _groups(m, kind, head_first=False):
    """Two param groups with their own hyperparameters, the frozen layer inside one of them; the parameters in
    the module's order (body, then head), or with ``head_first`` in another order."""
    head, body = [m.b.weight, m.b.bias], [m.dead, m.a.weight, m.a.bias, m.frozen.weight, m.frozen.bias]
    if kind == "adamw_amsgrad":
        groups = [{"params": head, "lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.95)},
                  {"params": body, "lr": 3e-3, "weight_decay": 0.01}]
        opt = lambda gs: torch.optim.AdamW(gs, amsgrad=True)                 # noqa: E731
    elif kind == "sgd_momentum":
        groups = [{"params": head, "lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
                  {"params": body, "lr": 0.02, "momentum": 0.5}]
        opt = torch.optim.SGD
    else:
        raise ValueError(kind)
    return opt(groups if head_first else groups[::-1])


def _closure(m, opt, batch, poison=None):
    """LBFGS-style closure; ``poison(call) -> factor`` multiplies the loss of the step's call-th backward."""
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = m.loss(batch)
        if poison is not None:
            loss = loss * poison(calls[0])
        loss.backward()
        return loss
    return closure


# ---- references ---------------------------------------------------------------------------------------------
class _AuthorsGXPO:
    """The authors' paper-era GXPO, one ``step`` per mini-batch (re-derived for these tests)."""

    def __init__(self, m, opt, *, K=5, alpha=0.5, clip=1.0, tau=0.5, omega=0.1, delta=1e-8, scale_dtype=None,
                 clip_over=None):
        self.m, self.opt, self.scale_dtype = m, opt, scale_dtype   # scale_dtype: r and scale upcast (bf16 tests)
        self.clip_over = clip_over                                 # None: the module's parameters (theirs)
        self.K, self.alpha, self.clip, self.tau, self.omega, self.delta = K, alpha, clip, tau, omega, delta
        self.mu, self.sigma, self.fired = 1.0, 1.0, False

    def _backward(self, closure):
        closure()
        ps = list(self.m.parameters()) if self.clip_over is None else self.clip_over
        return float(torch.nn.utils.clip_grad_norm_(ps, self.clip))

    def _plain(self, closure):
        self._backward(closure)
        self.opt.step()

    def _grads(self, ps):
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps]

    def _scale(self, g0, g1):
        if self.scale_dtype is not None:
            g0, g1 = g0.to(self.scale_dtype), g1.to(self.scale_dtype)
        one = torch.ones_like(g0)
        r = g1 / (torch.where(g0 >= 0, one, -one) * g0.abs().clamp(min=self.delta))
        r = r.clamp(-2.0, 3.0).nan_to_num(nan=1.0)
        d = (1.0 - r) + self.delta
        s = ((1.0 - r.pow(self.K)) / d) / ((1.0 - r * r) / d + self.delta)
        return s.clamp(1.0, self.K / 2 + 1.0)

    def step(self, closure):
        if self.fired:
            self._plain(closure)
            return "plain"
        ps = [p for p in self.m.parameters() if p.requires_grad]
        theta0 = [p.detach().clone() for p in ps]

        def fall_back(reason):
            with torch.no_grad():
                for p, t in zip(ps, theta0):
                    p.copy_(t)
            self._plain(closure)
            return reason
        n0 = self._backward(closure)
        if not math.isfinite(n0) or n0 <= 1e-8:
            self._plain(closure)
            return "small_g0"
        g0 = self._grads(ps)
        self.opt.step()
        if not math.isfinite(self._backward(closure)):
            return fall_back("nonfinite_g1")
        g1 = self._grads(ps)
        self.opt.step()
        self.last = {"theta0": theta0, "theta2": [p.detach().clone() for p in ps], "g0": g0, "g1": g1}
        with torch.no_grad():
            for p, t, a, b in zip(ps, theta0, g0, g1):
                p.copy_(((p - t) * self._scale(a, b)) * self.alpha + t)
        if not math.isfinite(self._backward(closure)):
            return fall_back("nonfinite_gcorr")
        h = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps if p.grad is not None))
        self.opt.step()
        z = (h - self.mu) / (self.sigma + 1e-8)
        self.sigma = max(0.01, math.sqrt((1 - self.omega) * self.sigma ** 2 + self.omega * (h - self.mu) ** 2))
        self.mu = (1 - self.omega) * self.mu + self.omega * h
        self.fired = abs(z) >= self.tau
        return None


def _authors_sfpo_batch(m, opt, closures, *, K, alpha, clip=1.0):
    """The authors' SFPO batch step (re-derived): K full passes over the mini-batches, one clipped optimizer step
    each, the trainable parameters moved to θ0 + α(θ_fast − θ0), then a slow full pass. Returns (θ0, θ_fast)."""
    def full_pass():
        for c in closures:
            c()
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), clip)
            opt.step()
    ps = [p for p in m.parameters() if p.requires_grad]
    slow = [p.detach().clone() for p in ps]
    for _ in range(K):
        full_pass()
    fast = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, s in zip(ps, slow):
            p.copy_(s + alpha * (p - s))
    full_pass()
    return slow, fast


def _assert_same(m1, o1, m2, o2, where, rtol=0.0):
    """Parameters and every optimizer-state tensor equal (rtol = 0) or within rtol (float64 rounding of sums
    taken in another order)."""
    def same(a, b):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return torch.equal(a, b) if rtol == 0.0 else torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-3)
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert same(p, q), (where, name, float((p - q).abs().max()))
        assert o1.state[p].keys() == o2.state[q].keys(), (where, name)
        for k, v in o1.state[p].items():
            assert same(v, o2.state[q][k]), (where, name, k)


# ---- GXPO -----------------------------------------------------------------------------------------------
_GXPO_CASES = {   # id: (optimizer, rule overrides, also the reference's K / alpha / clip)
    "adamw_amsgrad_groups": ("adamw_amsgrad", {}),
    "sgd_momentum_groups": ("sgd_momentum", {}),
    "clip_every_pass": ("adamw_amsgrad", {"max_grad_norm": 0.02}),
    "clip_never": ("sgd_momentum", {"max_grad_norm": 1e6}),
    "K2": ("adamw_amsgrad", {"K": 2}),
    "K3_sgd": ("sgd_momentum", {"K": 3}),
    "K64": ("adamw_amsgrad", {"K": 64}),
    "K256": ("sgd_momentum", {"K": 256}),
    "alpha_small": ("adamw_amsgrad", {"alpha": 1e-3}),
    "alpha_1": ("sgd_momentum", {"alpha": 1.0}),
    "alpha_2": ("adamw_amsgrad", {"alpha": 2.0}),
    "gate_live": ("sgd_momentum", {"tau": 0.5}),
}


@pytest.mark.parametrize("case", list(_GXPO_CASES))
def test_gxpo_paper_protocol_against_the_authors_update_six_steps_float64(case):
    """Six active outer steps in float64 (one case: the EMA gate fires after the first): parameters and every
    optimizer-state tensor (amsgrad's max_exp_avg_sq, momentum buffers, step counts) bit for bit."""
    opt_kind, over = _GXPO_CASES[case]
    m1 = _Net()
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, opt_kind), _groups(m2, opt_kind)
    over = {"tau": 1e3, **over}                           # (τ = 0.5 fires at the first step here)
    rule = GXPO.paper_protocol(o1, backend="torch", **over)
    ref = _AuthorsGXPO(m2, o2, K=over.get("K", 5), alpha=over.get("alpha", 0.5),
                       clip=over.get("max_grad_norm", 1.0), tau=over["tau"])
    actives = []
    for step in range(6):
        info = rule.step(_closure(m1, o1, step))
        assert (ref.step(_closure(m2, o2, step)) == "plain") == (not info["active"]), step
        assert rule.gate.fired == ref.fired, step
        _assert_same(m1, o1, m2, o2, step)
        assert m1.frozen.weight.grad is None and torch.equal(m1.frozen.weight, m2.frozen.weight)
        actives.append(info["active"] and not info["fell_back"])
    assert actives == ([True] + [False] * 5 if case == "gate_live" else [True] * 6)


@pytest.mark.parametrize("opt_kind", ["adamw_amsgrad", "sgd_momentum"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("head_first", [False, True], ids=["module_order", "head_first"])
def test_gxpo_group_order_only_rounds_the_clip_norm(opt_kind, backend, head_first):
    """Groups listing the parameters in the module's order: the clip norm is summed in the order of torch's
    clip_grad_norm_ over ``model.parameters()`` and the float64 trajectory is bit for bit the authors', with
    either extrapolation backend (float64 ``pow`` is the same function in both). Groups in another order: the
    norm's sum is taken in another order, and the trajectories agree to float64 rounding (the closed form's
    cancellation near r = 1 amplifies it: with K = 64 to ~2e-11 after 5 steps; K = 5 here)."""
    m1 = _Net(seed=1)
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, opt_kind, head_first), _groups(m2, opt_kind, head_first)
    rule = GXPO.paper_protocol(o1, tau=1e3, backend=backend)
    ref = _AuthorsGXPO(m2, o2, tau=1e3)
    for step in range(6):
        assert rule.step(_closure(m1, o1, step))["active"]
        ref.step(_closure(m2, o2, step))
        _assert_same(m1, o1, m2, o2, step, rtol=1e-12 if head_first else 0.0)


_MORE_OPTIMIZERS = {
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=3e-3, weight_decay=0.01),
    "radam_decoupled": lambda ps: torch.optim.RAdam(ps, lr=3e-3, weight_decay=0.01, decoupled_weight_decay=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.01),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "adam_maximize": lambda ps: torch.optim.Adam(ps, lr=3e-3, maximize=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=3e-3, fused=True),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd_nesterov_maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, maximize=True),
}


@pytest.mark.parametrize("name", list(_MORE_OPTIMIZERS))
def test_gxpo_more_optimizers_bit_exact(name):
    """Optimizers whose step may write into the gradients or read them differently (maximize negates, Nesterov
    adds the buffer, fused kernels): five float64 steps, bit for bit, the gate live."""
    m1 = _Net(seed=7)
    m2 = copy.deepcopy(m1)
    o1, o2 = _MORE_OPTIMIZERS[name](list(m1.parameters())), _MORE_OPTIMIZERS[name](list(m2.parameters()))
    rule = GXPO.paper_protocol(o1, backend="torch")
    ref = _AuthorsGXPO(m2, o2)
    for step in range(5):
        rule.step(_closure(m1, o1, step))
        ref.step(_closure(m2, o2, step))
        assert rule.gate.fired == ref.fired, step
        _assert_same(m1, o1, m2, o2, step)


@pytest.mark.parametrize("poison,reason", [(lambda c: math.inf if c == 2 else 1.0, "nonfinite_g1"),
                                           (lambda c: math.inf if c == 3 else 1.0, "nonfinite_gcorr"),
                                           (lambda c: 0.0, "small_g0")], ids=["inf_pass1", "inf_pass2", "zero"])
def test_gxpo_fallbacks_with_param_groups_and_amsgrad(poison, reason):
    """The fallbacks of the authors' code with groups, amsgrad and a frozen parameter: an infinite loss (not NaN)
    on pass 1 or 2, and a zero gradient; then four more steps."""
    m1 = _Net(seed=2)
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, "adamw_amsgrad"), _groups(m2, "adamw_amsgrad")
    rule = GXPO.paper_protocol(o1, backend="torch", gate=None)
    ref = _AuthorsGXPO(m2, o2, tau=math.inf)
    for step in range(5):
        p = poison if step == 1 else None
        info = rule.step(_closure(m1, o1, step, p))
        got = ref.step(_closure(m2, o2, step, p))
        assert info["fallback_reason"] == got, step
        _assert_same(m1, o1, m2, o2, step)
    assert rule.fallbacks == 1


def test_gxpo_alpha_whose_move_overflows_falls_back_like_the_authors():
    """α at the top of its range (1e308, float64): θ̃ overflows. We fall back at the extrapolation; the authors
    take the corrective pass at the infinite point, whose gradient is NaN, and fall back there. Same parameters
    and optimizer state (their corrective pass did not step); one backward pass less here. α = 0 is refused
    (``alpha`` is in (0, inf): tests/update/test_validation.py)."""
    m1 = _Net(seed=9)
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, "adamw_amsgrad"), _groups(m2, "adamw_amsgrad")
    rule = GXPO.paper_protocol(o1, alpha=1e308, gate=None, backend="torch")
    ref = _AuthorsGXPO(m2, o2, alpha=1e308, tau=math.inf)
    for step in range(5):
        info = rule.step(_closure(m1, o1, step))
        assert ref.step(_closure(m2, o2, step)) == "nonfinite_gcorr"
        assert info["fallback_reason"] == "nonfinite_extrapolation" and info["backward_passes"] == 3
        _assert_same(m1, o1, m2, o2, step)
    with pytest.raises(ValueError, match="alpha"):
        GXPO(o1, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        SFPO(o1, alpha=0.0)


def test_gxpo_clips_over_the_optimizer_parameters_not_the_module():
    """A trainable parameter left out of the optimizer (the head here): the authors clip over all the module's
    parameters, so its gradient enters their norm and shrinks the clip coefficient; we clip over the
    optimizer's parameters, which are all the rule knows (update-rules.md). With the reference clipping over the
    optimizer's parameters the trajectories agree bit for bit; over the module's they differ. (The closures zero
    every gradient of the module, so the head's does not accumulate.)"""
    out = {}
    for clip_over in ("optimizer", "module"):
        m1 = _Net(seed=8)
        m2 = copy.deepcopy(m1)
        o1, o2 = (torch.optim.AdamW([m.a.weight, m.a.bias, m.dead], lr=3e-3) for m in (m1, m2))
        rule = GXPO.paper_protocol(o1, gate=None, backend="torch")
        ref = _AuthorsGXPO(m2, o2, tau=math.inf,
                           clip_over=[p for g in o2.param_groups for p in g["params"]] if clip_over == "optimizer"
                           else None)
        for step in range(5):
            for m, o, r in ((m1, o1, rule), (m2, o2, ref)):
                c = _closure(m, o, step)
                r.step(lambda c=c, m=m: (m.zero_grad(), c())[1])
        out[clip_over] = all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert out == {"optimizer": True, "module": False}


@pytest.mark.parametrize("rule_cls", [GXPO, SFPO])
@pytest.mark.parametrize("opt_kind", ["adamw_amsgrad", "sgd_momentum"])
def test_default_fallback_after_active_steps_is_a_plain_step(rule_cls, opt_kind):
    """Our default fallback (optimizer state restored; the authors keep the probe steps' moments) after two
    active steps, with groups, amsgrad or momentum, a frozen and a zero-gradient parameter: a NaN on the last
    pass leaves parameters and every state tensor (max_exp_avg_sq, momentum buffers, step counts) as one plain
    clipped step from the step's start leaves them (update-rules.md)."""
    m1 = _Net(seed=11)
    o1 = _groups(m1, opt_kind)
    rule = rule_cls(o1, gate=None, backend="torch", **({"K": 2} if rule_cls is SFPO else {}))
    for step in range(2):
        assert rule.step(_closure(m1, o1, step))["active"]
    m2 = copy.deepcopy(m1)
    o2 = _groups(m2, opt_kind)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))     # (a deep copy: load_state_dict shares the tensors)
    last = 3                                               # GXPO: the corrective pass; SFPO K = 2: the slow pass
    info = rule.step(_closure(m1, o1, 5, lambda c: math.nan if c == last else 1.0))
    assert info["fell_back"] and not info["skipped"]
    _closure(m2, o2, 5)()
    torch.nn.utils.clip_grad_norm_(list(m2.parameters()), 1.0)
    o2.step()
    _assert_same(m1, o1, m2, o2, "fallback")


def _linear_closure(p, opt, c):
    def closure():
        opt.zero_grad()
        loss = (p * c).sum()                               # ∇ = c wherever p is: g1 = g0 exactly
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("K", [2, 5, 6])
def test_gxpo_pass1_gradient_equal_to_pass0(K):
    """g1 = g0 exactly (a loss linear in the parameters, SGD without momentum: the clip coefficient is the same on
    both passes), so r = 1 at every coordinate. The authors' closed form gives 0/δ → scale 1 (θ̃ = θ0 + α(θ2 −
    θ0)); our default Horner gives the true S_K(1)/S_2(1) = K/2 (update-rules.md says both)."""
    c = torch.randn(9, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    for formula, scale in (("closed", 1.0), ("horner", max(K / 2, 1.0))):
        p = torch.nn.Parameter(torch.randn(9, dtype=torch.float64))
        q = torch.nn.Parameter(p.detach().clone())
        o1, o2 = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
        seen = {}

        def closure():
            seen.setdefault(rule.pass_index, p.detach().clone())
            return _linear_closure(p, o1, c)()
        rule = GXPO(o1, K=K, scale_formula=formula, gate=None, backend="torch")
        info = rule.step(closure)
        assert info["retention_mean"] == 1.0 and info["retention_std"] == 0.0
        assert info["scale_mean"] == pytest.approx(scale, rel=1e-15)
        theta0, theta2 = q.detach().clone(), None
        for _ in range(2):                                 # the two probe steps of the reference
            _linear_closure(q, o2, c)()
            torch.nn.utils.clip_grad_norm_([q], 1.0)
            o2.step()
        theta2 = q.detach().clone()
        want = (theta2 - theta0) * scale * 0.5 + theta0
        assert torch.equal(seen[2], want), formula
        if formula == "closed":                            # the authors' whole step, bit for bit
            r = torch.nn.Parameter(theta0.clone())
            o3 = torch.optim.SGD([r], lr=0.1)
            holder = torch.nn.Module()
            holder.r = r
            _AuthorsGXPO(holder, o3, K=K, tau=math.inf).step(_linear_closure(r, o3, c))
            assert torch.equal(p, r)


def _grad_with_norm(target):
    """A one-element float64 gradient whose clip norm (as torch computes it) is exactly ``target``."""
    g = target
    for _ in range(8):
        n = float(torch.nn.utils.get_total_norm([torch.tensor([g], dtype=torch.float64)]))
        if n == target:
            return g
        g = math.nextafter(g, math.inf if n < target else -math.inf)
    raise AssertionError(target)


@pytest.mark.parametrize("fallback_grad", ["recompute", "reuse"])
def test_gxpo_small_g0_threshold_is_inclusive_like_the_authors(fallback_grad):
    """‖g0‖ = 1e-8 exactly falls back (the authors test ``≤ 1e-8``), the next float64 above does not; a custom
    ``min_grad_norm`` moves the threshold the same way."""
    for thr in (1e-8, 3e-5):
        for target, fell in ((thr, True), (math.nextafter(thr, math.inf), False),
                             (math.nextafter(thr, 0.0), True)):
            g = _grad_with_norm(target)
            p = torch.nn.Parameter(torch.tensor([0.25], dtype=torch.float64))
            opt = torch.optim.SGD([p], lr=0.1)
            rule = GXPO(opt, min_grad_norm=thr, fallback_grad=fallback_grad, gate=None, backend="torch")
            info = rule.step(_linear_closure(p, opt, torch.tensor([g], dtype=torch.float64)))
            assert info["grad_norm_0"] == target
            assert (info["fallback_reason"] == "small_g0") == fell, (thr, target)
            assert info["backward_passes"] == (1 + (fallback_grad == "recompute") if fell else 3)


@pytest.mark.parametrize("tau", [0.5, 1.25, 3.0])
def test_ema_gate_fires_at_exactly_tau_both_ways(tau):
    """The authors fire on |Z| ≥ τ with Z = (h − μ)/(σ + 1e-8): Z = τ and Z = −τ exactly fire, the next
    float64 towards 0 does not. (μ = 0 and σ = 1 − 1e-8, whose σ + 1e-8 is 1.0 in float64: Z = h exactly.)"""
    sigma0 = 1.0 - 1e-8
    assert sigma0 + 1e-8 == 1.0
    for h in (tau, -tau):
        for value, fires in ((h, True), (math.nextafter(h, 0.0), False)):
            g = EMAGate(tau=tau, mu0=0.0, sigma0=sigma0)
            assert g.observe(value) == value and g.fired == fires, value
            assert fires == (abs((value - 0.0) / (sigma0 + 1e-8)) >= tau)      # the authors' test


def test_entropy_gate_fires_at_exactly_tau_on_the_authors_window():
    """SFPO's gate (z over the last w values, the latest included, population std + 1e-9, fire on z ≥ τ): with τ
    set to the z of a window, the gate fires on it, and not with τ one float64 above. (w = 5: numpy's mean, which
    the authors call, sums fewer than 8 values in order, as this gate does.)"""
    vals = [1.0, 1.125, 0.875, 1.0, 1.75]
    mean = sum(vals) / 5
    z = (vals[-1] - mean) / (math.sqrt(sum((v - mean) ** 2 for v in vals) / 5) + 1e-9)
    for tau, fires in ((z, True), (math.nextafter(z, math.inf), False)):
        g = EntropyGate(tau=tau, window=5)
        for v in vals:
            g.observe(v)
        assert g.fired == fires


@pytest.mark.parametrize("rule_cls", [GXPO, SFPO])
def test_a_finite_gradient_whose_norm_overflows_is_skipped(rule_cls):
    """fp32 gradient entries of 1e20: each finite, the fp32 norm is inf. torch's clip_grad_norm_ then scales the
    gradient by 0 and the authors step with a zero gradient (AdamW still decays and moves the parameters); we skip
    the step (update-rules.md, non-finite gradients): parameters and optimizer state stay as they were."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    rule = rule_cls(opt, gate=None)

    def closure():
        opt.zero_grad()
        loss = (p * 1e20).sum()
        loss.backward()
        return loss
    info = rule.step(closure)
    assert info["skipped"] and math.isinf(info["grad_norm_0"] if rule_cls is GXPO else info["grad_norms"][0])
    assert torch.equal(p, torch.ones(8)) and not opt.state[p]
    q = torch.nn.Parameter(torch.ones(8))                  # the authors' step: clip to zero, then AdamW
    o2 = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    (q * 1e20).sum().backward()
    assert math.isinf(float(torch.nn.utils.clip_grad_norm_([q], 1.0))) and not q.grad.any()
    o2.step()
    assert not torch.equal(q, torch.ones(8))


def _spacing(x):
    """The bf16 spacing (one ulp) at the magnitude of x (float64)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)


def _closure_seeing(m, opt, at_call, seen, key):
    """``_closure(m, opt, 0)`` that keeps, in ``seen[key]``, copies of the trainable parameters at its
    ``at_call``-th call: the point whose gradient that call takes."""
    inner, calls = _closure(m, opt, 0), [0]

    def closure():
        calls[0] += 1
        if calls[0] == at_call:
            seen[key] = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        return inner()
    return closure


@pytest.mark.parametrize("seed", range(4))
def test_gxpo_bf16_parameters_against_the_authors(seed):
    """bf16 parameters. The authors keep θ0, g0 and g1 in the parameters' dtype and compute the ratio, the scale
    and θ̃ in it: a ratio within a bf16 step of 1 rounds to 1, where the closed form's guard gives scale 1 instead
    of ≈ K/2, so their θ̃ can be several bf16 ulps from ours (update-rules.md). Ours keeps θ0 in fp32 and
    computes in fp32: θ̃ is the float64 value of θ0 + α·scale·(θ2 − θ0) from the same bf16 θ0, θ2, g0, g1
    rounded once (to 0.5 ulp, up to fp32 rounding); with their ratio and scale computed in fp32 instead the two
    θ̃ are within 1 bf16 ulp of the parameter; with them in bf16 within what the scale's range [1, K/2 + 1]
    allows."""
    thetas = {}
    for scale_dtype in (None, torch.float32):
        m1 = _Net(torch.bfloat16, seed=seed)
        m2 = copy.deepcopy(m1)
        o1, o2 = _groups(m1, "sgd_momentum"), _groups(m2, "sgd_momentum")
        seen = {}
        rule = GXPO.paper_protocol(o1, gate=None, backend="torch")
        ref = _AuthorsGXPO(m2, o2, tau=math.inf, scale_dtype=scale_dtype)
        rule.step(_closure_seeing(m1, o1, 3, seen, "ours"))       # pass 2: at θ̃
        ref.step(_closure_seeing(m2, o2, 3, seen, "theirs"))
        thetas[scale_dtype] = seen["theirs"]
    last = ref.last
    exact = _AuthorsGXPO(torch.nn.Module(), None, scale_dtype=torch.float64)
    for i, ours in enumerate(seen["ours"]):
        t0, t2 = last["theta0"][i].double(), last["theta2"][i].double()
        want = t0 + 0.5 * exact._scale(last["g0"][i], last["g1"][i]) * (t2 - t0)
        assert float(((ours.double() - want).abs() / _spacing(want)).max()) <= 0.5 + 2 ** -15, i
        sp = _spacing(torch.maximum(t0.abs(), ours.double().abs()))
        assert float(((thetas[torch.float32][i].double() - ours.double()).abs() / sp).max()) <= 1.0, i
        bound = 0.5 * (5 / 2) * (t2 - t0).abs() + sp        # their scale anywhere in [1, 3.5] against ours
        assert bool(((thetas[None][i].double() - ours.double()).abs() <= bound).all()), i


# ---- SFPO -----------------------------------------------------------------------------------------------
_SFPO_CASES = {   # id: (optimizer, K, alpha, clip)
    "adamw_amsgrad_groups": ("adamw_amsgrad", 3, 0.8, 1.0),
    "sgd_momentum_groups": ("sgd_momentum", 2, 0.5, 1.0),
    "K1_alpha_small": ("adamw_amsgrad", 1, 1e-3, 1.0),
    "K7_alpha_1": ("sgd_momentum", 7, 1.0, 1.0),
    "alpha_1_5_clip_every_step": ("adamw_amsgrad", 2, 1.5, 0.02),
}


@pytest.mark.parametrize("case", list(_SFPO_CASES))
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sfpo_against_the_authors_batch_step_six_steps_float64(case, backend):
    """Six batches of m = 2 mini-batches in float64, groups in the module's order: bit for bit (the fast passes'
    moments / momentum carried through the reposition and the slow pass), frozen layer untouched."""
    opt_kind, K, alpha, clip = _SFPO_CASES[case]
    m1 = _Net(seed=5)
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, opt_kind), _groups(m2, opt_kind)
    rule = SFPO(o1, K=K, alpha=alpha, max_grad_norm=clip, gate=None, fallback_state="keep", backend=backend)
    for step in range(6):
        bs = [(2 * step) % 12, (2 * step + 1) % 12]
        info = rule.step([_closure(m1, o1, b) for b in bs])
        _authors_sfpo_batch(m2, o2, [_closure(m2, o2, b) for b in bs], K=K, alpha=alpha, clip=clip)
        assert info["active"] and not info["fell_back"]
        _assert_same(m1, o1, m2, o2, step)


@pytest.mark.parametrize("seed", range(4))
def test_sfpo_bf16_parameters_within_one_ulp_of_the_authors(seed):
    """bf16 parameters: the authors reposition in bf16 (θ0 + α(θ_fast − θ0), each operation rounded); we compute
    in fp32 from an fp32 θ0 and round once. One batch step: our repositioned point is the float64 value rounded
    once (0.5 ulp), theirs within 1 bf16 ulp of the larger of |θ0| and |θ̃| from it (update-rules.md)."""
    m1 = _Net(torch.bfloat16, seed=seed)
    m2 = copy.deepcopy(m1)
    o1, o2 = _groups(m1, "adamw_amsgrad"), _groups(m2, "adamw_amsgrad")
    rule = SFPO(o1, K=3, alpha=0.8, gate=None, fallback_state="keep", backend="torch")
    seen = {}
    rule.step(_closure_seeing(m1, o1, 4, seen, 1))                   # the slow pass: at the repositioned point
    slow, fast = _authors_sfpo_batch(m2, o2, [_closure_seeing(m2, o2, 4, seen, 2)], K=3, alpha=0.8)
    for ours, theirs, t0, tf in zip(seen[1], seen[2], slow, fast):
        want = t0.double() + 0.8 * (tf.double() - t0.double())
        assert float(((ours.double() - want).abs() / _spacing(want)).max()) <= 0.5 + 2 ** -15
        sp = _spacing(torch.maximum(t0.double().abs(), ours.double().abs()))
        assert float(((theirs.double() - ours.double()).abs() / sp).max()) <= 1.0
