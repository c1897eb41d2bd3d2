"""GXPO update rule.

Guards: the plain-GD surrogate (virtual K-step point == true K-step SGD iterate in float64; GXPO.step lands on
the corrective step from θ0 + α(θ_K − θ0)), overshooting r < 0 against the clamps, GXPO(K=2) == SFPO(K=2)
bitwise, every FALLBACK path (NaN on pass 1 / pass 2, ‖g0‖ ≤ 1e-8, non-finite g0, non-finite reduced stats)
with params and optimizer state checked against a plain torch step, the EMA and window gates on scripted
norms, state_dict resume bit-exactness, the transactional-state and optimizer-aware options, inactive
coordinates, bf16 parameters, the distributed hooks, validation.
"""
import copy
import math
import statistics
from fractions import Fraction

import pytest
import torch

from gxpo_kernels.ops.extrapolate.op import extrapolate_
from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_
from gxpo_kernels.update import GXPO, SFPO
from tests.update._models import clone_setup, closure_for, loss_fn, mlp, params_equal, plain_step


def _quad(h, c, theta, lr):
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.SGD([p], lr=lr)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (h * (p - c) ** 2).sum()
        loss.backward()
        return loss
    return p, opt, closure


def _sgd_iterates(h, c, theta, lr, K):
    th = [theta.clone()]
    for _ in range(K):
        th.append(th[-1] - lr * h * (th[-1] - c))
    return th


def _exact_scale(r, K):
    r = Fraction(max(-2.0, min(3.0, r)))
    s2 = 1 + r
    v = math.inf if s2 == 0 and K % 2 else (K / 2 if s2 == 0 else float(sum(r ** i for i in range(K)) / s2))
    return max(1.0, min(K / 2 + 1, v))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("K", [3, 5, 10])
def test_plain_gd_surrogate_exact(backend, K):
    d = torch.float64
    lr = 0.1
    h = torch.linspace(0.5, 9.5, 23, dtype=d)             # r = 1 − lr·h in [0.05, 0.95]: no clamp binds
    c = torch.linspace(-1, 1, 23, dtype=d)
    theta = torch.randn(23, dtype=d) + 2.0
    th = _sgd_iterates(h, c, theta, lr, K)
    # the op alone: α = 1 gives the virtual K-step point, which is the true K-step iterate
    p2 = th[2].clone()
    g0, g1 = [h * (th[0] - c)], [h * (th[1] - c)]
    extrapolate_([p2], [th[0]], g0, g1, alpha=1.0, K=K, backend=backend)
    torch.testing.assert_close(p2, th[K], rtol=1e-12, atol=1e-13)
    # GXPO.step: corrective SGD step from θ0 + α(θ_K − θ0)
    alpha = 0.5
    p, opt, closure = _quad(h, c, theta, lr)
    info = GXPO(opt, K=K, alpha=alpha, max_grad_norm=None, gate=None, corrective_cosine=True,
                backend=backend).step(closure)
    tt = theta + alpha * (th[K] - theta)
    expected = tt - lr * h * (tt - c)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-13)
    assert info["active"] and not info["fell_back"] and info["backward_passes"] == 3
    assert 1.0 <= info["scale_mean"] <= K / 2
    gt = h * (tt - c)                                       # diagnostics against their definitions
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert info["cos_g0_g1"] == pytest.approx(cos(g0[0], g1[0]), rel=1e-9)
    assert info["cos_g0_gcorr"] == pytest.approx(cos(g0[0], gt), rel=1e-9)
    assert info["grad_norm_corr"] == pytest.approx(float(gt.norm()), rel=1e-12)
    assert info["disp_norm"] == pytest.approx(float((th[2] - theta).norm()), rel=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("K", [4, 5])
def test_overshooting_coordinates_hit_the_clamps(backend, K):
    d = torch.float64
    lr = 0.1
    r_true = [0.5, -0.5, -1.5, -2.5, 2.0, 4.0, -3.0] + ([-1.0] if K % 2 == 0 else [])
    h = torch.tensor([(1 - r) / lr for r in r_true], dtype=d)
    c = torch.zeros(len(r_true), dtype=d)
    theta = torch.linspace(1, 2, len(r_true), dtype=d)
    th = _sgd_iterates(h, c, theta, lr, 2)
    alpha = 0.7
    scale = torch.tensor([_exact_scale(r, K) for r in r_true], dtype=d)
    tt = theta + alpha * scale * (th[2] - theta)
    expected = tt - lr * h * (tt - c)
    p, opt, closure = _quad(h, c, theta, lr)
    info = GXPO(opt, K=K, alpha=alpha, max_grad_norm=None, gate=None, backend=backend).step(closure)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-9)
    assert info["scale_max"] == pytest.approx(K / 2 + 1)  # r = 3 (clamped from 4) hits the upper clamp
    assert info["retention_mean"] == pytest.approx(
        sum(max(-2.0, min(3.0, r)) for r in r_true) / len(r_true), rel=1e-9)


@pytest.mark.parametrize("max_norm", [1.0, 0.05])
def test_k2_equals_sfpo_k2(max_norm):
    runs = []
    for cls in (GXPO, SFPO):
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
        rule = cls(opt, K=2, alpha=0.6, max_grad_norm=max_norm, gate=None)
        infos = [rule.step(closure_for(m, opt, rule, batch=t)) for t in range(4)]
        runs.append((m, infos, rule))
    assert params_equal(runs[0][0], runs[1][0])
    assert [i["disp_norm"] for i in runs[0][1]] == [i["disp_norm"] for i in runs[1][1]]
    assert runs[0][2].total_backward_passes == runs[1][2].total_backward_passes == 12


@pytest.mark.parametrize("nan_pass,reason", [(1, "nonfinite_g1"), (2, "nonfinite_gcorr")])
def test_fallback_sgd_bit_identical(nan_pass, reason):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.0)
    ref_m, ref_o = clone_setup(m, torch.optim.SGD, opt, lr=0.05)
    rule = GXPO(opt, K=5, alpha=0.5)
    info = rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    plain_step(ref_m, ref_o)
    assert params_equal(m, ref_m)
    assert info["fell_back"] and info["fallback_reason"] == reason and not info["skipped"]
    assert info["backward_passes"] == nan_pass + 1 and rule.total_optimizer_steps == nan_pass + 1
    assert rule.gate.n_observed == 0 and not rule.gate.fired and rule.fallbacks == 1


@pytest.mark.parametrize("nan_pass", [1, 2])
def test_fallback_adamw_transactional_state_consistent(nan_pass):
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    plain_step(m, opt, batch=3)                            # the optimizer state exists before the step
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2)
    rule = GXPO(opt, K=5, alpha=0.5, transactional_state=True)
    rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    plain_step(ref_m, ref_o)
    assert params_equal(m, ref_m)
    for p, q in zip(m.parameters(), ref_m.parameters()):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], ref_o.state[q][k]), k


@pytest.mark.parametrize("nan_pass", [1, 2])
@pytest.mark.parametrize("fresh_state", [True, False])
def test_fallback_adamw_default_equals_a_plain_step(nan_pass, fresh_state):
    # without transactional_state: the atomic snapshot rewinds the optimizer state, so the fallback is exactly
    # one plain step (parameters, moments and step count), also when the state did not exist before the step
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    if not fresh_state:
        plain_step(m, opt, batch=3)
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2)
    rule = GXPO(opt)
    rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    plain_step(ref_m, ref_o)
    assert params_equal(m, ref_m)
    for p, q in zip(m.parameters(), ref_o.state):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], ref_o.state[q][k]), k


def test_fallback_adamw_keep_state_is_the_authors_light_fallback():
    # fallback_state="keep": θ0 restored, the probe steps' moment updates stay (step count 3 after pass 2 fails)
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, fallback_state="keep")
    rule.step(closure_for(m, opt, rule, nan_pass=2))
    for p in m.parameters():
        st = opt.state[p]
        assert float(st["step"]) == 3 and torch.isfinite(st["exp_avg"]).all() and torch.isfinite(p).all()


def test_fallback_small_and_nonfinite_g0():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = copy.deepcopy(m)
    rule = GXPO(opt)

    def zero_closure():
        opt.zero_grad()
        loss = loss_fn(m) * 0.0
        loss.backward()
        return loss
    info = rule.step(zero_closure)
    assert info["fallback_reason"] == "small_g0" and info["backward_passes"] == 1
    assert rule.total_optimizer_steps == 1 and params_equal(m, before)
    info = rule.step(closure_for(m, opt, rule, nan_pass=0))
    assert info["fallback_reason"] == "nonfinite_g0" and info["skipped"] and rule.total_optimizer_steps == 1
    assert params_equal(m, before) and rule.outer_steps == 2 and rule.fallbacks == 2


def test_fallback_optimizer_aware_recomputes_g0():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref_m, ref_o = clone_setup(m, torch.optim.SGD, opt, lr=0.05)
    rule = GXPO(opt, optimizer_aware=True)
    info = rule.step(closure_for(m, opt, rule, nan_pass=2))
    plain_step(ref_m, ref_o)
    assert params_equal(m, ref_m) and info["backward_passes"] == 4


class _InjectNonfinite(GXPO):
    """A 'distributed' subclass: another rank saw a non-finite value; the reduced stats must decide."""
    calls = 0

    def _all_reduce_(self, stats):
        type(self).calls += 1
        if stats.numel() == 12:
            stats[9] += 1.0
        return stats

    def _global_grad_norm(self, grads):
        type(self).calls += 100
        return super()._global_grad_norm(grads)


def test_decisions_use_reduced_stats():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref_m, ref_o = clone_setup(m, torch.optim.SGD, opt, lr=0.05)
    rule = _InjectNonfinite(opt)
    info = rule.step(closure_for(m, opt, rule))
    plain_step(ref_m, ref_o)
    assert info["fallback_reason"] == "nonfinite_extrapolation" and params_equal(m, ref_m)
    assert _InjectNonfinite.calls == 201                   # two clip norms + one stats reduction


def _norm_closure(param, opt, rule, seq):
    """loss = c·Σw/2 on a 4-vector: the corrective gradient norm is exactly seq[outer step]."""
    def closure():
        opt.zero_grad()
        c = seq[rule.outer_steps] if rule.pass_index == 2 or rule.gate.fired else 1.0
        loss = c * param.sum() / 2
        loss.backward()
        return loss
    return closure


def _run_gate(gate, seq, **kw):
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1e-3)
    rule = GXPO(opt, K=5, alpha=0.5, max_grad_norm=None, gate=gate, **kw)
    closure = _norm_closure(w, opt, rule, seq)
    return rule, [rule.step(closure) for _ in range(len(seq))]


def test_ema_gate_scripted_norms():
    seq = [1.0, 1.0, 1.0, 1.0, 1.4, 1.45, 3.0, 3.0]
    rule, infos = _run_gate("ema", seq, tau=0.5)
    sig4 = 0.81                                            # σ after four H = μ = 1: sqrt(0.9)^4
    assert infos[4]["gate_z"] == pytest.approx(0.4 / (sig4 + 1e-8), rel=1e-12)   # 0.494 < τ: no fire
    sig5 = math.sqrt(0.9 * sig4 ** 2 + 0.1 * 0.4 ** 2)
    assert infos[5]["gate_z"] == pytest.approx((1.45 - 1.04) / (sig5 + 1e-8), rel=1e-12)  # 0.526 >= τ
    assert rule.gate.fired_step == 5 and [i["active"] for i in infos] == [True] * 6 + [False] * 2
    assert [i["backward_passes"] for i in infos] == [3] * 6 + [1] * 2
    assert rule.total_backward_passes == 20 and infos[7]["gate_fired_step"] == 5


def test_window_gate_scripted_norms():
    seq = [1.0, 100.0, 1.0, 100.0, 1.0, 50.5, 200.0, 1.0]
    rule, infos = _run_gate("window", seq, tau=0.5, window=5)
    assert all(math.isnan(i["gate_z"]) for i in infos[:5])  # no decision until the window is full
    z5 = (50.5 - statistics.mean(seq[:5])) / (statistics.pstdev(seq[:5]) + 1e-8)
    assert infos[5]["gate_z"] == pytest.approx(z5, rel=1e-12) and abs(z5) < 0.5
    z6 = (200.0 - statistics.mean(seq[1:6])) / (statistics.pstdev(seq[1:6]) + 1e-8)
    assert infos[6]["gate_z"] == pytest.approx(z6, rel=1e-12)
    assert rule.gate.fired_step == 6 and infos[7]["backward_passes"] == 1 and not infos[7]["active"]


def test_gate_none_never_fires_and_clipped_norm_observed():
    rule, infos = _run_gate(None, [1.0, 50.0, 0.01, 80.0])
    assert not rule.gate.fired and all(i["active"] for i in infos)
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1e-3)
    rule = GXPO(opt, max_grad_norm=1.0, gate="ema")
    info = rule.step(_norm_closure(w, opt, rule, [3.0]))
    assert info["grad_norm_corr"] == pytest.approx(3.0) and info["grad_norm_corr_clipped"] == pytest.approx(1.0)
    assert info["gate_z"] == pytest.approx(0.0, abs=1e-5)  # the gate sees ‖ĝ̃‖ = c = μ0


def _resume_run(split, total, **kw):
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate="window", window=3, tau=0.8, **kw)
    for t in range(split):
        rule.step(closure_for(m, opt, rule, batch=t))
    ck = copy.deepcopy((m.state_dict(), opt.state_dict(), rule.state_dict()))
    m2 = mlp(seed=7)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    rule2 = GXPO(opt2, gate="window", window=3, tau=0.8, **kw)
    m2.load_state_dict(ck[0])
    opt2.load_state_dict(ck[1])
    rule2.load_state_dict(ck[2])
    a = [rule.step(closure_for(m, opt, rule, batch=t)) for t in range(split, total)]
    b = [rule2.step(closure_for(m2, opt2, rule2, batch=t)) for t in range(split, total)]
    return m, m2, rule, rule2, a, b


@pytest.mark.parametrize("transactional", [False, True])
def test_state_dict_resume_bit_exact(transactional):
    m, m2, rule, rule2, a, b = _resume_run(4, 9, transactional_state=transactional)
    assert params_equal(m, m2)
    assert [i["gate_z"] for i in a] == pytest.approx([i["gate_z"] for i in b], nan_ok=True, rel=0, abs=0)
    assert rule.state_dict() == rule2.state_dict()
    assert rule2.total_backward_passes == rule.total_backward_passes


def test_transactional_state_advances_once_per_minibatch():
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, transactional_state=True, gate=None)
    rule.step(closure_for(m, opt, rule, batch=0))
    assert all(float(opt.state[p]["step"]) == 1 for p in m.parameters())
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2)
    rec = {}
    rule.step(closure_for(m, opt, rule, batch=1, record=rec))
    with torch.no_grad():                                  # reference: one AdamW step at θ̃ from the saved state
        for q, t in zip(ref_m.parameters(), rec[2]):
            q.copy_(t)
    plain_step(ref_m, ref_o, batch=1)
    assert params_equal(m, ref_m)
    for p, q in zip(m.parameters(), ref_m.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_o.state[q]["exp_avg_sq"])
        assert float(opt.state[p]["step"]) == 2


def test_optimizer_aware_retention_float64():
    lr, wd, alpha, K = 1e-2, 0.1, 0.5, 5
    m = mlp(torch.float64)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=lr, weight_decay=wd)
    rule = GXPO(opt, K=K, alpha=alpha, optimizer_aware=True, gate=None)
    rec = {}
    rule.step(closure_for(m, opt, rule, record=rec))
    th0 = [p.detach().clone() for p in ref_m.parameters()]
    plain_step(ref_m, ref_o)
    th1 = [p.detach().clone() for p in ref_m.parameters()]
    plain_step(ref_m, ref_o)
    th2 = [p.detach().clone() for p in ref_m.parameters()]
    for a, b in zip(th1, rec[1]):
        assert torch.equal(a, b)
    d0 = [((1 - lr * wd) * a - b) / lr for a, b in zip(th0, th1)]
    d1 = [((1 - lr * wd) * a - b) / lr for a, b in zip(th1, th2)]
    expected = [t.clone() for t in th2]
    extrapolate_ref_(expected, th0, d0, d1, alpha=alpha, K=K)
    for e, t in zip(expected, rec[2]):
        torch.testing.assert_close(t, e, rtol=1e-9, atol=1e-11)
    m3 = mlp(torch.float64)                                 # the option changes the result (Adam: d ≠ g)
    opt3 = torch.optim.AdamW(m3.parameters(), lr=lr, weight_decay=wd)
    rule3 = GXPO(opt3, K=K, alpha=alpha, gate=None)
    rec3 = {}
    rule3.step(closure_for(m3, opt3, rule3, record=rec3))
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(rec3[2], rec[2]))


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_aware_param_without_grad_on_one_pass_has_no_displacement(opt_cls):
    """The optimizer does not step a parameter without a gradient, so its displacement on that pass is 0, not the
    inversion's −wd·θ (which made up a retention ratio and stretched the parameter by up to K/2 + 1): ``a`` has a
    gradient on pass 0 only, ``b`` on pass 1 only (e.g. an MoE expert no token is routed to)."""
    lr, wd, alpha, K = 1e-2, 0.1, 0.5, 5
    g = torch.Generator().manual_seed(7)
    x, ya, yb = (torch.randn(n, generator=g, dtype=torch.float64) for n in (5, 3, 4))
    init = [torch.randn(5, generator=g, dtype=torch.float64), 3 + torch.rand(3, generator=g, dtype=torch.float64),
            -3 - torch.rand(4, generator=g, dtype=torch.float64)]

    def setup():
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        return ps, opt_cls(ps, lr=lr, weight_decay=wd)

    def closure_at(ps, opt, pass_index):
        opt.zero_grad()
        w, a, b = ps
        loss = ((w * x).sum() - 1) ** 2
        loss = loss + (((a - ya) ** 2).sum() if pass_index == 0 else ((b - yb) ** 2).sum() if pass_index == 1 else 0)
        loss.backward()
        return loss

    ps, opt = setup()
    rule = GXPO(opt, K=K, alpha=alpha, max_grad_norm=None, optimizer_aware=True, skip_corrective=True, gate=None)
    rule.step(lambda: closure_at(ps, opt, rule.pass_index))
    # float64 replay of the documented rule: d_t = ((1 − lr·wd)θ_t − θ_{t+1})/lr where the pass left a grad,
    # else 0
    ref, ref_o = setup()
    th = [[p.detach().clone() for p in ref]]
    had = []
    for k in (0, 1):
        closure_at(ref, ref_o, k)
        had.append([p.grad is not None for p in ref])
        ref_o.step()
        th.append([p.detach().clone() for p in ref])
    d = [[((1 - lr * wd) * t0 - t1) / lr if h else torch.zeros_like(t0) for t0, t1, h in zip(th[k], th[k + 1], had[k])]
         for k in (0, 1)]
    expected = [t.clone() for t in th[2]]
    extrapolate_ref_(expected, th[0], d[0], d[1], alpha=alpha, K=K)
    for e, p in zip(expected, ps):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    # a (moved on pass 0 only) keeps its one-step displacement (r = 0, scale 1)
    torch.testing.assert_close(ps[1].detach(), th[0][1] + alpha * (th[1][1] - th[0][1]), rtol=1e-12, atol=1e-12)


def test_inactive_coordinates_reported():
    emb = torch.nn.Embedding(50, 8)                       # rows never looked up get zero gradients
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    idx = torch.arange(10)
    fracs = []
    for thr in (None, 1e-3):
        rule = GXPO(opt, inactive_threshold=thr, gate=None)

        def closure():
            opt.zero_grad()
            loss = emb(idx).pow(2).sum()
            loss.backward()
            return loss
        fracs.append(rule.step(closure)["inactive_frac"])
    assert fracs[0] == 0.0 and fracs[1] == pytest.approx(40 / 50)


def test_bf16_params_fp32_buffers():
    m = mlp(torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate=None)
    infos = [rule.step(closure_for(m, opt, rule, batch=t)) for t in range(2)]
    assert all(b.dtype == torch.float32 for b in rule._theta0)
    assert rule._g0 is None    # AdamW on plain params: ĝ0 was pass 0's (bf16) gradient, released after the step
    assert all(torch.isfinite(p).all() for p in m.parameters()) and all(i["active"] for i in infos)
    keys = {"loss", "grad_norm_0", "grad_norm_1", "grad_norm_corr", "retention_mean", "retention_std",
            "scale_mean", "scale_max", "disp_norm", "scaled_disp_norm", "cos_g0_g1", "cos_g0_gcorr",
            "inactive_frac", "gate_z", "active", "fell_back", "gate_fired_step", "backward_passes"}
    assert keys <= set(infos[0])


def test_pass_index_seen_by_closure():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    rule = GXPO(opt, gate=None)
    rec = {}
    rule.step(closure_for(m, opt, rule, record=rec))
    assert sorted(rec) == [0, 1, 2]


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_pass1_grads_released_before_the_corrective_backward(opt_cls):
    """Once the corrective closure has zeroed the grads (set_to_none), nothing of the rule keeps pass 1's gradient
    tensors alive: the corrective backward does not hold a third gradient's worth of memory beside ĝ0 and its
    own. The grads are watched through weak references."""
    import weakref
    m = mlp()
    opt = opt_cls(m.parameters(), lr=0.01)
    rule = GXPO(opt, gate=None)
    seen, alive = {}, {}

    def closure():
        if rule.pass_index == 2:
            seen[1] = [weakref.ref(p.grad) for p in m.parameters()]
        opt.zero_grad(set_to_none=True)
        if rule.pass_index == 2:
            alive[1] = sum(r() is not None for r in seen[1])
        loss = loss_fn(m)
        loss.backward()
        return loss
    for _ in range(2):
        info = rule.step(closure)
        assert info["active"] and not info["fell_back"] and info["backward_passes"] == 3
        assert alive[1] == 0



@pytest.mark.parametrize("rule_cls", [GXPO, SFPO])
def test_a_gate_that_fired_for_good_releases_the_step_buffers(rule_cls):
    """After the gate fires (no re-arming) every step is a single-pass one: θ0, GXPO's ĝ0 and the snapshot of the
    optimizer state are dead memory (two Adam-state copies and θ0: three model-sized fp32 buffers) and are
    released, as the authors' code does. A rule given an unfired gate state again allocates them afresh and
    continues bit for bit like a fresh rule."""
    import gc
    import weakref
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    kw = dict(gate="window", window=2, tau=1e-6) if rule_cls is GXPO else dict(K=2, gate="window", window=2, tau=1e-6)
    rule = rule_cls(opt, **kw)
    early = None
    for t in range(6):
        if t == 1:
            early = copy.deepcopy((m.state_dict(), opt.state_dict(), rule.state_dict()))
        rule.step(closure_for(m, opt, rule, batch=t))
        if rule.gate.fired and not rule.gate.state_dict()["plain_steps"]:   # the step that fired it
            bufs = list(rule._theta0) + list(rule._opt_snap_pairs[0]) + list(getattr(rule, "_g0", None) or [])
            held = [weakref.ref(b) for b in bufs]
            del bufs
    assert rule.gate.fired and rule.gate.fired_step < 5
    gc.collect()
    assert sum(r() is not None for r in held) == 0
    # the same rule resumed from before the gate fired: buffers come back, steps equal a fresh rule's
    m2, o2 = mlp(seed=3), None
    m2.load_state_dict(early[0])
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    o2.load_state_dict(copy.deepcopy(early[1]))
    fresh = rule_cls(o2, **kw)
    fresh.load_state_dict(early[2])
    m.load_state_dict(early[0])
    opt.load_state_dict(copy.deepcopy(early[1]))
    rule.load_state_dict(early[2])
    for t in range(1, 4):
        a = rule.step(closure_for(m, opt, rule, batch=t))
        b = fresh.step(closure_for(m2, o2, fresh, batch=t))
        assert a["active"] == b["active"]
    assert params_equal(m, m2)


def test_validation():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    for kw, match in [(dict(K=1), "K"), (dict(alpha=0.0), "alpha"), (dict(gate="bogus"), "gate"),
                      (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(scale_formula="x"), "scale_formula"),
                      (dict(backend="cuda"), "backend")]:
        with pytest.raises(ValueError, match=match):
            GXPO(opt, **kw)
    with pytest.raises(TypeError, match="optimizer"):
        GXPO(object())
    with pytest.raises(TypeError, match="closure"):
        GXPO(opt).step(None)


@pytest.mark.parametrize("nan_pass", [None, 1])
def test_param_without_grad(nan_pass):
    m = mlp()
    extra = torch.nn.Parameter(torch.ones(3))               # in the optimizer, never used by the loss
    opt = torch.optim.SGD(list(m.parameters()) + [extra], lr=0.05)
    ref_m = copy.deepcopy(m)
    ref_o = torch.optim.SGD(ref_m.parameters(), lr=0.05)
    rule = GXPO(opt, gate=None)
    info = rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    assert torch.equal(extra.detach(), torch.ones(3)) and extra.grad is None  # SGD skips a grad-less param
    if nan_pass is not None:
        plain_step(ref_m, ref_o)
        assert info["fell_back"] and params_equal(m, ref_m)
    else:
        assert info["active"] and not info["fell_back"] and info["n_nonfinite"] == 0


# ---- ĝ0 kept as pass 0's gradient tensors vs copied into a buffer -------------------------------------------
class _AdamWCopy(torch.optim.AdamW):
    """An optimizer type GXPO does not trust to leave ``.grad`` alone: it copies ĝ0 into its own buffer."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nan_pass", [None, 1, 2])
@pytest.mark.parametrize("zero", ["none", "in_place", "bucket_view"])
def test_kept_g0_equals_copied_g0(dtype, nan_pass, zero):
    """AdamW keeps pass 0's gradients as ĝ0 (no copy); an AdamW subclass makes the rule copy them. Both give the
    same parameters, optimizer state, grads and diagnostics bit for bit over 3 steps (the second falls back on
    ``nan_pass``), also when the closure zeroes grads in place. Gradients that are views of one bucket are
    never kept: the next backward would overwrite them."""
    m1 = mlp(dtype)
    m2 = copy.deepcopy(m1)
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), _AdamWCopy(m2.parameters(), lr=1e-2)
    r1 = GXPO(o1, gate=None, corrective_cosine=True)
    r2 = GXPO(o2, gate=None, corrective_cosine=True)
    n = sum(p.numel() for p in m1.parameters())
    b1 = torch.zeros(n, dtype=dtype) if zero == "bucket_view" else None
    b2 = torch.zeros(n, dtype=dtype) if zero == "bucket_view" else None
    for t in range(3):
        nan = nan_pass if t == 1 else None
        kw = dict(batch=t, nan_pass=nan, set_to_none=zero == "none")
        i1 = r1.step(closure_for(m1, o1, r1, bucket=b1, **kw))
        i2 = r2.step(closure_for(m2, o2, r2, bucket=b2, **kw))
        assert r1._g0_kept is False and (r1._g0 is None) == (zero != "bucket_view")   # released after the step
        assert r2._g0 is not None
        assert i1["fell_back"] == i2["fell_back"] == (nan is not None)
        for k in i1:
            a, b = i1[k], i2[k]
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), k
        assert params_equal(m1, m2)
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p.grad, q.grad)
            for k in o1.state[p]:
                assert torch.equal(o1.state[p][k], o2.state[q][k])


def test_kept_g0_only_for_plain_grads_and_trusted_optimizers():
    m = mlp()
    rule = GXPO(torch.optim.AdamW(m.parameters()), gate=None)
    loss_fn(m).backward()
    grads = [p.grad for p in m.parameters()]
    assert rule._can_keep_grads(grads)
    assert not rule._can_keep_grads([grads[0][:1]] + grads[1:])          # a view
    assert not rule._can_keep_grads([None] + grads[1:])                  # a param without grad
    assert not rule._can_keep_grads([grads[0].t()] + grads[1:])          # not contiguous
    assert not GXPO(_AdamWCopy(m.parameters()), gate=None)._can_keep_grads(grads)
    assert not GXPO(torch.optim.AdamW(m.parameters(), fused=True), gate=None)._can_keep_grads(grads)
    # SGD's foreach path with Nesterov momentum adds the momentum buffer into the grads in place
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    assert not GXPO(sgd, gate=None)._can_keep_grads(grads)


def test_nesterov_sgd_writes_grads_so_g0_is_copied(monkeypatch):
    """Why SGD is not among the optimizers whose grads GXPO keeps: its foreach step with Nesterov momentum adds the
    momentum buffer into .grad in place. Forcing the kept path changes the result; the default (copy) equals
    an SGD subclass (always copied) bit for bit."""
    from gxpo_kernels.update import base

    class _SGDSub(torch.optim.SGD):
        pass

    def run(opt_cls, force_keep):
        m = mlp()
        opt = opt_cls(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
        if force_keep:
            monkeypatch.setattr(base, "_KEEPS_GRADS", (torch.optim.SGD,))
        rule = GXPO(opt, gate=None)
        for t in range(3):
            assert rule.step(closure_for(m, opt, rule, batch=t))["active"]
        monkeypatch.undo()
        return m
    default, copied, forced = run(torch.optim.SGD, False), run(_SGDSub, False), run(torch.optim.SGD, True)
    assert params_equal(default, copied)
    assert not params_equal(forced, copied)


@pytest.mark.parametrize("optimizer_aware", [False, True])
def test_nesterov_sgd_writes_grads_so_g1_is_copied(optimizer_aware):
    """ĝ1 (pass 1's clipped gradient) is what the retention ratio reads, not what SGD's foreach step with Nesterov
    momentum leaves in .grad after pass 1's optimizer step (ĝ1 + momentum·buf). The foreach step must give the
    single-tensor step's result (which never writes into the grads) up to rounding; it was 0.3 off (found by
    fuzzing)."""
    def run(foreach):
        m = mlp()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=foreach)
        rule = GXPO(opt, gate=None, optimizer_aware=optimizer_aware)
        for t in range(3):
            info = rule.step(closure_for(m, opt, rule, batch=t))
            assert info["active"] and not info["fell_back"]
        return m
    for a, b in zip(run(True).parameters(), run(False).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_gradients_assigned_with_another_layout(backend, opt_cls):
    """A closure may assign ``p.grad`` itself, e.g. from ``torch.autograd.grad``, in a transposed layout (the same
    values). Every backend must give what contiguous gradients give: the Triton plan (the CUDA default) read ĝ1 in
    memory order, parameters silently 2.5e-2 off, and the C++ op and the reference refused it after two optimizer
    steps (found by fuzzing)."""
    def run(transposed):
        m = mlp()
        opt = opt_cls(m.parameters(), lr=0.05)
        rule = GXPO(opt, gate=None, backend=backend)

        def closure():
            opt.zero_grad()
            loss = loss_fn(m)
            for p, g in zip(m.parameters(), torch.autograd.grad(loss, list(m.parameters()))):
                p.grad = g.t().contiguous().t() if transposed and g.dim() == 2 else g
            return loss
        for _ in range(2):
            info = rule.step(closure)
            assert info["active"] and not info["fell_back"]
        return m
    assert params_equal(run(True), run(False))


def test_corrective_cosine_is_opt_in():
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate=None)
    assert math.isnan(rule.step(closure_for(m, opt, rule))["cos_g0_gcorr"])
    m2 = mlp()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    rule2 = GXPO(opt2, gate=None, gate_signal="cosine")
    assert -1.0 <= rule2.step(closure_for(m2, opt2, rule2))["cos_g0_gcorr"] <= 1.0


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_prepared_extrapolation_plan_follows_a_param_resized_at_the_same_address(backend):
    """The rule's prepared plan was keyed on the params' addresses and dtypes only: a param whose numel changed at
    the same address and dtype (``p.data = p.data[:k]``) kept the stale plan (on the Triton path, tables of the old
    numel: read and written past the view's end, no error). The key now holds each param's numel, contiguity,
    neg bit and device too: a new plan, whose validation refuses the θ0 buffer of the old size."""
    from gxpo_kernels.ops.extrapolate.op import _record_reader
    if _record_reader() is None:
        pytest.skip("no C++ compiler: the key is the addresses and dtypes")
    model = mlp()
    rule = GXPO(torch.optim.AdamW(model.parameters(), lr=1e-2), K=5, alpha=0.5, gate=None, backend=backend)
    params = list(model.parameters())
    rule._theta0 = [p.detach().clone() for p in params]
    g = [torch.randn_like(p) for p in params]
    rule._extrapolate(params, [x.clone() for x in g], g, alpha=0.5, K=5, g0_kept=True)
    plan = rule._xplan
    rule._extrapolate(params, [x.clone() for x in g], g, alpha=0.5, K=5, g0_kept=True)
    assert rule._xplan is plan                       # nothing changed: the same plan
    params[1].data = params[1].data[:-1]             # not the first tensor of its dtype group (plan.moved())
    with pytest.raises(ValueError, match=r"theta0\[1\] has 12 elements but params\[1\] has 11"):
        rule._extrapolate(params, [x.clone() for x in g], g, alpha=0.5, K=5, g0_kept=True)


@pytest.mark.parametrize("setup, backend", [(s, "cpp") for s in ("adamw", "adamw_bf16", "param_groups",
                                                                  "sgd_nesterov", "optimizer_aware", "sfpo",
                                                                  "sfpo_bf16")]
                         + [("adamw_bf16", "triton"), ("sgd_nesterov", "triton")])   # (the interpreter is slow)
def test_prepared_extrapolation_plan_is_built_once(setup, backend):
    """Five active steps build the rule's prepared extrapolation plan once: AdamW keeping pass 0's gradients (a
    per-call g0, fp32 and bf16 params), param groups, SGD with Nesterov momentum (ĝ0 copied into a buffer),
    optimizer-aware retention (the buffer holds displacements) and SFPO. Then the parameters moved to new memory
    of the same sizes and dtypes (``p.data = p.data.clone()``) build one more, and the step equals, bit for bit,
    that of the same run without the move."""
    from tests._utils import count_plan_builds
    dtype = torch.bfloat16 if setup.endswith("bf16") else torch.float32

    def build(model):
        ps = model.parameters()
        if setup == "param_groups":
            ps = [{"params": [model[0].weight, model[2].weight]},
                  {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 2e-2}]
        opt = torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True) if setup == "sgd_nesterov" else \
            torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01)
        if setup.startswith("sfpo"):
            return opt, SFPO(opt, K=3, alpha=0.8, gate=None, backend=backend)
        return opt, GXPO(opt, K=5, alpha=0.5, gate=None, backend=backend, optimizer_aware=setup == "optimizer_aware")

    def step(model, opt, rule, batch):
        c = closure_for(model, opt, rule, batch=batch)
        info = rule.step(c if isinstance(rule, GXPO) else [c] * 4)
        assert info["active"] and not info["fell_back"], info
    model, ref = mlp(dtype), mlp(dtype)
    (opt, rule), (ref_opt, ref_rule) = build(model), build(ref)
    for batch in range(5):
        step(ref, ref_opt, ref_rule, batch % 2)
    with count_plan_builds() as builds:
        for batch in range(5):
            step(model, opt, rule, batch % 2)
        assert builds[0] == 1
        for p in model.parameters():                 # new memory (the old one is freed): the plan must follow
            p.data = p.data.clone()
        step(model, opt, rule, 1)
        assert builds[0] == 2
    step(ref, ref_opt, ref_rule, 1)
    assert params_equal(model, ref)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_prepared_extrapolation_plan_follows_memory_not_tensor_objects(backend):
    """What DeepSpeed hands the rule: the parameters and θ0 as views of flat buffers, new view objects every step.
    The plan was keyed on the tensors' ids, so it was built again on every call; it is keyed on their memory
    (addresses, numels, dtypes, layout) now: the same memory in new views reuses it, and other memory (the flat
    buffer swapped for a new one, as ``engine.offload_states()`` does, or views at other offsets) builds a new
    one, whose results land in the new memory (against the float64 reference)."""
    from tests._utils import count_plan_builds
    shapes, g = [(13, 7), (1,), (301,), (5, 3)], torch.Generator().manual_seed(5)
    n = sum(math.prod(s) for s in shapes)
    flat, flat0 = torch.randn(n + 9, generator=g), torch.randn(n + 9, generator=g)
    rule = GXPO(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), K=5, alpha=0.5, gate=None,
                backend=backend)

    def views(buf, skip=0):
        out, o = [], skip
        for s in shapes:
            out.append(buf[o:o + math.prod(s)].view(s))
            o += math.prod(s)
        return out

    def call(skip=0):
        params = views(flat, skip)
        rule._theta0 = views(flat0, skip)
        g0 = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
        g1 = [x + torch.randn(x.shape, generator=g) * 1e-3 for x in g0]
        want = [p.double() for p in params]
        want_stats = extrapolate_ref_(want, [t.double() for t in rule._theta0], [x.double() for x in g0],
                                      [x.double() for x in g1], alpha=0.5, K=5)
        stats = rule._extrapolate(params, g0, g1, alpha=0.5, K=5, g0_kept=True)
        for p, w in zip(views(flat, skip), want):    # the memory the caller sees now
            assert torch.allclose(p.double(), w, rtol=1e-5, atol=1e-7)
        assert torch.allclose(stats.double(), want_stats.double(), rtol=1e-4)
    with count_plan_builds() as builds:
        for _ in range(4):
            call()
        assert builds[0] == 1
        flat.data = flat.data.clone()                # the same tensor object, new memory
        call()
        assert builds[0] == 2
        call(skip=3)                                 # views at other offsets
        assert builds[0] == 3
        call(skip=3)
        assert builds[0] == 3


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_is_torchs_clip_grad_norm_bit_for_bit(dtypes, max_norm, monkeypatch):
    """The rule's clip (its own single-group foreach path where the gradients are plain tensors of one dtype on one
    device, torch's ``get_total_norm`` and the grouped multiply otherwise) gives the norm and the clipped gradients
    of ``torch.nn.utils.clip_grad_norm_`` bit for bit: awkward sizes, a parameter without a grad, an empty one."""
    g = torch.Generator().manual_seed(len(dtypes) * 7 + int(max_norm))
    shapes = [(13, 7), (1,), (0, 5), (3, 1, 9), (257,), (31, 3)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)]
    for i, p in enumerate(params):
        if i != 4:   # (257,) has no grad
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 3).to(p.dtype)
    ref = [None if p.grad is None else p.grad.clone() for p in params]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for q, r in zip(ref_params, ref):
        q.grad = r
    want = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    if len(dtypes) == 1:   # one foreach group: the rule's own path, not torch's function
        monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: pytest.fail("not the one-group path"))
    rule = GXPO(torch.optim.SGD(params, lr=0.1), max_grad_norm=max_norm, gate=None)
    _, norm, clipped = rule._clip(params)
    assert norm == float(want) and clipped == float(want) * min(1.0, max_norm / (float(want) + 1e-6))
    for p, q in zip(params, ref_params):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad)
