"""Optimizer state kept in the param groups (Prodigy's / D-Adaptation's ``d`` and ``k``): rewound with the
per-parameter state on an exception, a fallback and the transactional restore; LR schedulers, which write the
groups between the rule's steps, run as they do around plain steps."""
import copy
import math

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO
from tests.update._models import closure_for, loss_fn, mlp, plain_step


class Boom(RuntimeError):
    pass


class _GroupStateSGD(torch.optim.Optimizer):
    """SGD whose step size lives in its param groups, in Prodigy's style: ``d`` grows at every step by the step's
    gradient norm and scales the update, ``k`` counts the steps, ``dsum`` is a tensor updated in place and
    ``late`` a key added from the third step on. Momentum keeps per-parameter state too."""

    def __init__(self, params, lr=0.5, mu=0.5):
        super().__init__(params, dict(lr=lr, mu=mu, d=1e-2, k=0))
        for g in self.param_groups:
            g["dsum"] = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            grads = [p.grad for p in g["params"] if p.grad is not None]
            sq = sum(float(x.double().square().sum()) for x in grads)
            g["d"] = g["d"] + 0.1 * math.sqrt(sq)
            g["k"] += 1
            g["dsum"].add_(g["d"])
            if g["k"] >= 3:
                g["late"] = g["k"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.setdefault("m", torch.zeros_like(p))
                buf.mul_(g["mu"]).add_(p.grad)
                p.add_(buf, alpha=-float(g["lr"]) * g["d"])


def _setup(seed=0):
    m = mlp(torch.float64, seed=seed)
    w = list(m.parameters())
    opt = _GroupStateSGD([{"params": w[:2]}, {"params": w[2:], "lr": 0.3}])   # two groups: awkward split
    return m, opt


def _groups(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
            for g in opt.param_groups]


def _assert_groups(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert (torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]), (k, x[k], y[k])


def _state(m, opt):
    return [p.detach().clone() for p in m.parameters()], [opt.state[p]["m"].clone() for p in m.parameters()]


def _assert_state(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _raising(m, opt, raise_at):
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        if calls[0] == raise_at:
            raise Boom("injected")
        loss = loss_fn(m, 2)
        loss.backward()
        return loss
    return closure


_RULES = {"gxpo": lambda o: GXPO(o, gate=None), "gxpo_tx": lambda o: GXPO(o, gate=None, transactional_state=True),
          "sfpo": lambda o: SFPO(o, K=2, gate=None)}


@pytest.mark.parametrize("name", list(_RULES))
def test_an_exception_rewinds_the_group_state(name):
    """The group entries the rewound optimizer steps advanced (d, k, the tensor dsum in place, the key 'late'
    added on the third step) stayed advanced: the retried step then ran from a larger step size."""
    m, opt = _setup()
    rule = _RULES[name](opt)
    rule.step(closure_for(m, opt, rule, batch=1))   # k = 3 (gxpo) / 1 (gxpo_tx) / 3 (sfpo): state exists
    before, state, dsum = _groups(opt), _state(m, opt), [g["dsum"] for g in opt.param_groups]
    with pytest.raises(Boom):
        rule.step(_raising(m, opt, raise_at=3))      # after two optimizer steps
    _assert_groups(_groups(opt), before)
    _assert_state(_state(m, opt), state)
    assert all(g["dsum"] is t for g, t in zip(opt.param_groups, dsum))   # restored in place


@pytest.mark.parametrize("name,nan_pass,rule_kw", [("gxpo", 1, {}), ("gxpo", 2, {}),
                                                    ("gxpo", 1, {"fallback_grad": "recompute"}),
                                                    ("gxpo", 2, {"fallback_grad": "recompute"}),
                                                    ("sfpo", 1, {}), ("sfpo", 2, {})])
def test_a_fallback_is_one_plain_step_group_state_included(name, nan_pass, rule_kw):
    """A fallback rewinds to θ0 and takes one plain step: d and k advance once, as in a plain GRPO step (they
    advanced by the fast steps too: k ended 1 or 2 ahead, d larger, the parameters off the plain step's)."""
    m, opt = _setup(seed=3)
    plain_step(m, opt, batch=1)
    ref_m = copy.deepcopy(m)
    ref_o = _GroupStateSGD([{"params": list(ref_m.parameters())[:2]}, {"params": list(ref_m.parameters())[2:]}])
    ref_o.load_state_dict(copy.deepcopy(opt.state_dict()))
    rule = GXPO(opt, gate=None, **rule_kw) if name == "gxpo" else SFPO(opt, K=3, gate=None, **rule_kw)
    info = rule.step(closure_for(m, opt, rule, nan_pass=nan_pass))
    assert info["fell_back"] and not info["skipped"]
    plain_step(ref_m, ref_o)
    _assert_groups(_groups(opt), _groups(ref_o))
    _assert_state(_state(m, opt), _state(ref_m, ref_o))


def test_keep_leaves_the_group_state_advanced_and_transactional_restores_it():
    """fallback_state='keep' keeps what the probe steps wrote, the group entries too (as the moments); the
    transactional restore before the corrective pass rewinds them, so k advances once per active step."""
    m, opt = _setup()
    rule = GXPO(opt, gate=None, fallback_state="keep")
    rule.step(closure_for(m, opt, rule, nan_pass=2))     # two probe steps, then the fallback's plain step
    assert [g["k"] for g in opt.param_groups] == [3, 3]
    m, opt = _setup()
    rule = GXPO(opt, gate=None, transactional_state=True)
    for _ in range(3):
        assert rule.step(closure_for(m, opt, rule))["active"]
    assert [g["k"] for g in opt.param_groups] == [3, 3] and "late" in opt.param_groups[0]


def _make_sched(kind, opt):
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 1e-2], total_steps=12, cycle_momentum=True,
                                                   base_momentum=0.8, max_momentum=0.95)
    if kind == "cosine":   # chainable: each step computes the new lr from the group's current one
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)


def _sched_step(sched, t):
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(float(t % 3))   # a metric that stops improving every third step
    else:
        sched.step()


def _seen(opt):
    """The group entries every optimizer step sees (a pre-hook): lr and betas per group."""
    log = []
    opt.register_step_pre_hook(lambda o, a, k: log.append([(float(g["lr"]), g["betas"]) for g in o.param_groups]))
    return log


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "lambda", "plateau"])
@pytest.mark.parametrize("rule_name", ["gxpo", "sfpo"])
def test_lr_schedulers_step_between_rule_steps_as_around_plain_steps(kind, rule_name):
    """A scheduler stepped once per training step (after ``rule.step``, as after ``optimizer.step()``) writes the
    groups outside the rule's steps. Equal here means: every optimizer step inside rule step t (fast, corrective,
    fallback) sees the lr and betas that the single optimizer step of step t of a plain GRPO run sees, and the
    scheduler ends in the same state; an exception (retried without a scheduler step) and fallbacks change
    neither. The parameters differ, as the runs do."""
    def run(use_rule):
        m = mlp(torch.float64, seed=5)
        w = list(m.parameters())
        opt = torch.optim.AdamW([{"params": w[:3]}, {"params": w[3:], "lr": 5e-3}], lr=1e-2, betas=(0.9, 0.99))
        sched = _make_sched(kind, opt)
        log = _seen(opt)
        rule = (GXPO(opt, gate=None) if rule_name == "gxpo" else SFPO(opt, K=2, gate=None)) if use_rule else None
        per_step = []
        for t in range(8):
            n = len(log)
            if rule is None:
                plain_step(m, opt, batch=t % 4)
            else:
                if t == 3:   # an exception after the first optimizer steps: rewound, then the step is retried
                    with pytest.raises(Boom):
                        rule.step(_raising(m, opt, raise_at=3))
                    del log[n:]
                rule.step(closure_for(m, opt, rule, batch=t % 4, nan_pass=2 if t in (2, 5) else None))
            per_step.append(log[n:])
            _sched_step(sched, t)
        sd = sched.state_dict()
        return per_step, sd, _groups(opt)

    plain, plain_sd, plain_groups = run(False)
    ruled, ruled_sd, ruled_groups = run(True)
    for t, (p, r) in enumerate(zip(plain, ruled)):
        assert len(p) == 1 and len(r) >= 2, t
        assert all(x == p[0] for x in r), (t, r, p[0])
    assert ruled_sd == plain_sd
    _assert_groups(ruled_groups, plain_groups)


def test_a_tensor_lr_is_restored_in_place():
    """A tensor ``lr`` (torch's capturable / fused optimizers take one; schedulers fill_ it in place) stays the
    same tensor through a rewind, with its value."""
    m, opt = _setup()
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
    lrs = [g["lr"] for g in opt.param_groups]
    rule = GXPO(opt, gate=None)
    rule.step(closure_for(m, opt, rule, batch=1))
    before = _groups(opt)

    def closure():   # writes the lr inside the step (as no scheduler does), then raises
        opt.zero_grad()
        loss_fn(m, 1).backward()
        if rule.pass_index == 1:
            for g in opt.param_groups:
                g["lr"].mul_(3.0)
            raise Boom("injected")
        return loss_fn(m, 1)
    with pytest.raises(Boom):
        rule.step(closure)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs))
    _assert_groups(_groups(opt), before)


class _ShiftingGroupSGD(torch.optim.SGD):
    """SGD whose param groups gain and change entries mid-run: ``hist`` is a float for two steps, then a list the
    step appends to in place; ``scale`` a float, then a tensor updated in place; ``extra`` appears at step 3."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        for g in self.param_groups:
            g.update(hist=0.0, scale=1.0, n=0)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            g["n"] += 1
            if g["n"] <= 2:
                g["hist"] += 1.0
                g["scale"] = g["scale"] * 1.5
            else:
                if not isinstance(g["hist"], list):
                    g["hist"], g["scale"] = [g["hist"]], torch.tensor(g["scale"], dtype=torch.float64)
                g["hist"].append(float(g["n"]))
                g["scale"].mul_(1.5)
            if g["n"] >= 3:
                g["extra"] = ("n", g["n"])
        super().step()


@pytest.mark.parametrize("raise_at", [2, 3])
def test_group_entries_that_change_type_or_appear_mid_run_are_rewound(raise_at):
    """The group snapshot keeps entries of the number / string types by reference and copies any other (a list the
    step appends to, a tensor it updates in place, a tuple): after entries changed type and new ones appeared over
    active steps, an exception after the first optimizer steps leaves every entry as the step found it (keeping
    the list or the tensor by reference would keep the rewound steps' writes)."""
    for rule_kw in ({}, {"transactional_state": True}):
        m = mlp(torch.float64, seed=2)
        w = list(m.parameters())
        opt = _ShiftingGroupSGD([{"params": w[:1]}, {"params": w[1:]}])
        rule = GXPO(opt, gate=None, **rule_kw)
        for t in range(4 if rule_kw else 2):   # n = 6 (3 optimizer steps per active step; 1 when transactional)
            rule.step(closure_for(m, opt, rule, batch=t % 4))
        assert all(isinstance(g["hist"], list) and torch.is_tensor(g["scale"]) for g in opt.param_groups)
        before = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        objs = [(g["hist"], g["scale"]) for g in opt.param_groups]
        with pytest.raises(Boom):
            rule.step(_raising(m, opt, raise_at=raise_at))
        _assert_groups([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], before)
        assert all(g["scale"] is s for g, (_, s) in zip(opt.param_groups, objs))   # the tensor restored in place
        assert rule.step(closure_for(m, opt, rule))["active"]   # and the next step runs from there
        assert [g["n"] for g in opt.param_groups] == ([9, 9] if not rule_kw else [5, 5])
