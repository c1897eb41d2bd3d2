"""SFPO update rule.

Guards: bitwise equality with a hand-written loop (K fast AdamW steps with torch's clip_grad_norm_, the
reposition θ0 + α(θ_K − θ0), one slow step) for the C++ and Triton-interpreter reposition, the one-sided
entropy gate on a scripted entropy sequence (and the same gate inside GXPO), fallbacks, backward-pass costs,
state_dict resume, the missing-entropy warning, validation.
"""
import copy
import math
import statistics

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO, EntropyGate
from tests.update._models import clone_setup, closure_for, loss_fn, mlp, params_equal, plain_step


def _manual_sfpo(model, opt, K, alpha, batch, max_norm=1.0):
    th0 = [p.detach().clone() for p in model.parameters()]
    for _ in range(K):
        plain_step(model, opt, batch, max_norm)
    with torch.no_grad():
        for p, t in zip(model.parameters(), th0):
            p.copy_(t + alpha * (p - t))
    plain_step(model, opt, batch, max_norm)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_matches_manual_loop(backend):
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2, weight_decay=0.01)
    rule = SFPO(opt, K=3, alpha=0.8, gate=None, backend=backend)
    for t in range(3):
        info = rule.step(closure_for(m, opt, rule, batch=t))
        _manual_sfpo(ref_m, ref_o, 3, 0.8, t)
        assert info["backward_passes"] == 4 and info["active"]
    assert params_equal(m, ref_m)
    assert rule.total_backward_passes == 12 and rule.total_optimizer_steps == 12 and rule.outer_steps == 3


def _entropy_run(cls, entropies, **kw):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    rule = cls(opt, **kw)
    infos = [rule.step(closure_for(m, opt, rule, batch=t % 16), entropy=torch.tensor(h))
             for t, h in enumerate(entropies)]
    return rule, infos


def test_entropy_gate_scripted():
    ent = [1.0, 1.1, 0.9, 1.0, 1.0, 0.5, 2.0, 1.0, 1.0]
    rule, infos = _entropy_run(SFPO, ent, K=2, alpha=0.8, window=5, tau=1.0)
    assert all(math.isnan(i["gate_z"]) for i in infos[:4])         # fewer than w values: no decision
    z4 = (1.0 - statistics.mean(ent[:5])) / (statistics.pstdev(ent[:5]) + 1e-9)
    z5 = (0.5 - statistics.mean(ent[1:6])) / (statistics.pstdev(ent[1:6]) + 1e-9)
    z6 = (2.0 - statistics.mean(ent[2:7])) / (statistics.pstdev(ent[2:7]) + 1e-9)
    assert infos[4]["gate_z"] == pytest.approx(z4, abs=1e-6)  # entropies arrive as fp32 tensors
    assert infos[5]["gate_z"] == pytest.approx(z5, rel=1e-6) and z5 <= -1.0   # a drop does not fire
    assert infos[6]["gate_z"] == pytest.approx(z6, rel=1e-6) and z6 >= 1.0
    assert rule.gate.fired_step == 6
    assert [i["backward_passes"] for i in infos] == [3] * 7 + [1] * 2
    # the same gate inside GXPO (gate="entropy", value passed by the caller)
    g_rule, g_infos = _entropy_run(GXPO, ent, gate="entropy", window=5, tau=1.0)
    assert g_rule.gate.fired_step == 6 and [i["active"] for i in g_infos] == [True] * 7 + [False] * 2


def test_missing_entropy_warns_once():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    rule = SFPO(opt, K=1)
    with pytest.warns(RuntimeWarning, match="entropy"):
        rule.step(closure_for(m, opt, rule))
    rule.step(closure_for(m, opt, rule))
    assert rule.gate.n_observed == 0


@pytest.mark.parametrize("nan_pass,reason,bp", [(1, "nonfinite_g1", 3), (3, "nonfinite_gslow", 5)])
def test_fallback_restores_theta0_plus_plain_step(nan_pass, reason, bp):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref_m, ref_o = clone_setup(m, torch.optim.SGD, opt, lr=0.05)
    rule = SFPO(opt, K=3, gate=None)
    info = rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    plain_step(ref_m, ref_o)
    assert params_equal(m, ref_m)
    assert info["fell_back"] and info["fallback_reason"] == reason and info["backward_passes"] == bp


def test_fallback_nonfinite_first_pass_skips():
    m = mlp()
    before = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    rule = SFPO(opt, K=3, gate=None)
    info = rule.step(closure_for(m, opt, rule, nan_pass=0))
    assert info["skipped"] and params_equal(m, before) and rule.total_optimizer_steps == 0


def test_state_dict_resume_bit_exact():
    ent = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 3.0, 1.0]

    def make(seed=0):
        m = mlp(seed=seed)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return m, opt, SFPO(opt, K=2, window=4)
    m, opt, rule = make()
    for t in range(4):
        rule.step(closure_for(m, opt, rule, batch=t), entropy=ent[t])
    ck = copy.deepcopy((m.state_dict(), opt.state_dict(), rule.state_dict()))
    m2, opt2, rule2 = make(seed=5)
    m2.load_state_dict(ck[0])
    opt2.load_state_dict(ck[1])
    rule2.load_state_dict(ck[2])
    for t in range(4, 8):
        a = rule.step(closure_for(m, opt, rule, batch=t), entropy=ent[t])
        b = rule2.step(closure_for(m2, opt2, rule2, batch=t), entropy=ent[t])
        assert a["active"] == b["active"]
    assert params_equal(m, m2) and rule.state_dict() == rule2.state_dict() and rule.gate.fired


def test_validation():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="K"):
        SFPO(opt, K=0)
    with pytest.raises(ValueError, match="alpha"):
        SFPO(opt, alpha=math.inf)
    with pytest.raises(ValueError, match="window"):
        EntropyGate(window=1)
    with pytest.raises(ValueError, match="gate"):
        SFPO(opt).load_state_dict({**SFPO(opt, gate="ema").state_dict()})
    assert loss_fn(mlp()) > 0


@pytest.mark.parametrize("bad_mb,at_theta0", [(0, False), (0, True), (1, True), (2, True)])
def test_fallback_over_minibatches_skips_only_the_nonfinite_one(bad_mb, at_theta0):
    """A mini-batch whose gradient is non-finite at θ0 too (a bad batch, not a bad extrapolation): the step is
    θ0 plus one plain step per mini-batch, each skipped only where its own gradient is non-finite, as the
    rule's plain step over the same closures does; the other mini-batches are not dropped (also when the bad
    one is the first, on the very first pass)."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ref_m, ref_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2)
    plain_m, plain_o = clone_setup(m, torch.optim.AdamW, opt, lr=1e-2)
    rule = SFPO(opt, K=2, gate=None)
    plain_rule = SFPO(plain_o, K=2, gate=None)

    def closures(model, o, r):
        def mk(b):
            def c():
                o.zero_grad()
                loss = loss_fn(model, b)
                if b == bad_mb and (at_theta0 or r.pass_index > 0):
                    loss = loss * math.nan
                loss.backward()
                return loss
            return c
        return [mk(b) for b in range(3)]
    info = rule.step(closures(m, opt, rule))
    plain = plain_rule.step(closures(plain_m, plain_o, plain_rule), force_plain=True)
    for b in range(3):                              # θ0 + a plain step on every finite mini-batch
        if b != bad_mb or not at_theta0:
            plain_step(ref_m, ref_o, b)
    assert params_equal(plain_m, ref_m) and not plain["skipped"]
    assert params_equal(m, ref_m)
    assert info["fell_back"] and not info["skipped"]


def test_plain_steps_do_not_keep_the_entropies_closures_report():
    """Entropies that closures report as (loss, entropy) are read by active steps only; plain steps (force_plain,
    or a gate that fired for good) appended one per closure and never dropped them (a list that grew by one
    entry per plain step for the whole run)."""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    rule = SFPO(opt, K=2, gate=None)

    def closure():
        opt.zero_grad()
        loss = loss_fn(m)
        loss.backward()
        return loss, 0.5

    for _ in range(5):
        rule.step(closure, force_plain=True)
    assert len(rule._reported) <= 1
    info = rule.step(closure)                          # an active step still reads its own passes' entropies
    assert info["active"] and len(rule._reported) == 1


@pytest.mark.parametrize("gate,signal", [(None, "argument"), ("ema", "argument"), ("entropy", "argument"),
                                         (None, "slow_pass")])
def test_an_entropy_that_is_no_number_is_refused_before_anything_moves(gate, signal):
    """An active step reads the entropy argument (it reports it as ``entropy_signal``; the entropy gate observes
    it): one that is no number raised only at the step's end, after every pass (rewound; a sharded rule's other
    ranks had kept their step). Now refused before the first closure; a plain step does not read it."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = SFPO(opt, K=2, gate=gate, window=3, entropy_signal=signal)
    calls = [0]
    inner = closure_for(m, opt, rule, batch=5)

    def closure():
        calls[0] += 1
        return inner()
    before = [p.detach().clone() for p in m.parameters()]
    for bad in (torch.rand(3), torch.ones((), dtype=torch.complex64), "high", ValueError("no entropy")):
        with pytest.raises(ValueError, match="entropy must be a number or a one-element real tensor"):
            rule.step(closure, entropy=bad)
    assert calls[0] == 0 and params_equal_list(m, before) and rule.outer_steps == 0
    h = torch.rand(1, 1, dtype=torch.float64)                 # one element: read as its value
    info = rule.step(closure, entropy=h)
    assert info["active"] and info["entropy_signal"] == float(h) and calls[0] == 3
    info = rule.step(closure, entropy=torch.rand(3), force_plain=True)   # not read by a plain step
    assert not info["active"] and calls[0] == 4
    # read at the step's end, not at the check: a one-element tensor the first closure fills (the TRL trainer's way)
    filled = torch.full((), math.nan)

    def filling():
        if rule.pass_index == 0:
            filled.fill_(0.25)
        return inner()
    info = rule.step(filling, entropy=filled)
    assert info["active"] and info["entropy_signal"] == 0.25


def params_equal_list(m, ts):
    return all(torch.equal(p, t) for p, t in zip(m.parameters(), ts))
