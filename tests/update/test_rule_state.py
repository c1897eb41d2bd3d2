"""The public rules' ``state_dict`` / ``load_state_dict`` outside any trainer.

- GXPO and SFPO with every gate: the state after a few steps (a fallback included) round-trips through a file
  with ``torch.save`` / ``torch.load(weights_only=True)``, and a fresh model + optimizer + rule loaded from
  it continue bit for bit like the uninterrupted one;
- a state is refused (ValueError naming the entry, the rule unchanged) by a rule of the other kind with the
  same K and alpha, around another optimizer class, or around a model with another number or size of
  trainable parameters; a state without these entries (an older version's) still loads;
- ``state_dict`` / ``load_state_dict`` called from inside a step (the closure) raise RuntimeError: the
  counters and the gate are mid-update there, and the step itself still completes like an untouched one.
"""
import copy
import math

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO

from tests.update._models import closure_for, mlp

GATES = ["ema", "window", "entropy", None]


def _rule(cls, model, gate, opt_cls=torch.optim.AdamW, **kw):
    opt = opt_cls(model.parameters(), lr=1e-2)
    kw = dict(kw, gate=gate) if gate is not None else dict(kw, gate=None)
    if gate in ("window", "entropy"):
        kw.update(window=2, tau=0.3)
    return opt, cls(opt, K=2, alpha=0.5, **kw)


def _steps(model, opt, rule, batches, nan_at=None):
    out = []
    for t in batches:
        ent = 1.0 + 0.1 * math.sin(t)
        nan = 1 if t == nan_at else None   # a NaN on pass 1: the step falls back (counted in ``fallbacks``)
        out.append(rule.step(closure_for(model, opt, rule, batch=t, nan_pass=nan), entropy=ent))
    return out


@pytest.mark.parametrize("cls", [GXPO, SFPO])
@pytest.mark.parametrize("gate", GATES)
def test_round_trip_through_a_file_resumes_bit_exactly(tmp_path, cls, gate):
    torch.manual_seed(0)
    m = mlp()
    opt, rule = _rule(cls, m, gate)
    _steps(m, opt, rule, range(4), nan_at=2)
    assert rule.fallbacks >= 1 or gate in ("window", "entropy")   # (a gate that fired takes plain steps)
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "rule": rule.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["rule"] == rule.state_dict()
    m2 = mlp(seed=5)
    opt2, rule2 = _rule(cls, m2, gate)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    rule2.load_state_dict(ck["rule"])
    a = _steps(m, opt, rule, range(4, 9))
    b = _steps(m2, opt2, rule2, range(4, 9))
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert rule.state_dict() == rule2.state_dict()
    assert [i["active"] for i in a] == [i["active"] for i in b]


def test_state_of_another_rule_model_or_optimizer_is_refused():
    m = mlp()
    _, g = _rule(GXPO, m, "ema")
    _steps(m, g.optimizer, g, range(2))
    sd = g.state_dict()
    assert sd["rule"] == "GXPO" and sd["optimizer"] == "AdamW" and sd["params"] == [4, 6 * 12 + 12 + 12 + 1]
    _, s = _rule(SFPO, mlp(), "ema")          # same K, alpha and gate: only the rule's name tells them apart
    before = s.state_dict()
    with pytest.raises(ValueError, match="rule: checkpoint 'GXPO' vs rule 'SFPO'"):
        s.load_state_dict(sd)
    assert s.state_dict() == before
    with pytest.raises(ValueError, match="optimizer: checkpoint 'AdamW' vs rule 'SGD'"):
        _rule(GXPO, mlp(), "ema", opt_cls=torch.optim.SGD)[1].load_state_dict(sd)
    wider = torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1))
    with pytest.raises(ValueError, match=r"params: checkpoint \[4, 97\] vs rule \[4, 105\]"):
        _rule(GXPO, wider, "ema")[1].load_state_dict(sd)
    frozen = mlp()
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params: checkpoint \[4, 97\] vs rule \[3, 85\]"):
        _rule(GXPO, frozen, "ema")[1].load_state_dict(sd)
    with pytest.raises(ValueError, match="expected the dict"):
        _rule(GXPO, mlp(), "ema")[1].load_state_dict([sd])
    old = {k: v for k, v in sd.items() if k not in ("rule", "optimizer", "params")}   # an older version's state
    r = _rule(GXPO, mlp(), "ema")[1]
    r.load_state_dict(copy.deepcopy(old))
    assert r.outer_steps == 2 and r.state_dict() == sd


@pytest.mark.parametrize("cls", [GXPO, SFPO])
@pytest.mark.parametrize("call", ["state_dict", "load_state_dict"])
def test_state_calls_inside_a_step_are_refused(cls, call):
    m, m_ref = mlp(), mlp()
    opt, rule = _rule(cls, m, "ema")
    opt_ref, ref = _rule(cls, m_ref, "ema")
    saved = rule.state_dict()
    errors = []
    inner = closure_for(m, opt, rule, batch=0)

    def closure():
        if rule.pass_index == 1:
            try:
                rule.state_dict() if call == "state_dict" else rule.load_state_dict(saved)
            except RuntimeError as e:
                errors.append(str(e))
        return inner()
    rule.step(closure, entropy=1.0)
    ref.step(closure_for(m_ref, opt_ref, ref, batch=0), entropy=1.0)
    assert len(errors) == 1 and f"{call} called during a step" in errors[0]
    for p, q in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(p, q)
    assert rule.state_dict() == ref.state_dict()   # and it works again between steps
