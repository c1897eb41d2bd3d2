"""The authors' semantics and atomic steps (GXPO and SFPO).

Guards: every exception (each pass of the closure, a library check, the optimizer) rewinds parameters, optimizer
state, counters and gate bit for bit; checks before the first optimizer step (non-contiguous, dtype change after
model.double(), lr = 0 in optimizer-aware mode, frozen-set change); paper_protocol against loops written from
the authors' code (GXPO over 20 AdamW steps incl. moments and step counts; SFPO with m = 2 mini-batches);
one-sided / patience / warmup / re-arming gates on scripted sequences; BP counts in fallbacks per option;
skip_corrective, force_plain, zero_lr="neutral"; load_state_dict refusing other K / alpha / formula.
"""
import copy
import math

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO
from gxpo_kernels.update.gates import EMAGate, WindowGate
from tests._utils import FailOnUse
from tests.update._models import closure_for, loss_fn, mlp, plain_step


class Boom(RuntimeError):
    pass


def _closure(model, opt, rule, batch=0, raise_at=None, entropy=None):
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        if raise_at is not None and calls[0] == raise_at:
            raise Boom("injected")
        loss = loss_fn(model, batch)
        loss.backward()
        return loss if entropy is None else (loss, entropy)
    return closure


def _state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters()) if p in opt.state})


def _assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            assert torch.equal(torch.as_tensor(a[1][i][k]), torch.as_tensor(b[1][i][k])), (i, k)


def _rules():
    return [("gxpo", lambda o: GXPO(o), 3), ("gxpo_tx", lambda o: GXPO(o, transactional_state=True), 3),
            ("gxpo_aware", lambda o: GXPO(o, optimizer_aware=True), 3),
            ("sfpo", lambda o: SFPO(o, K=2), 3), ("sfpo_tx", lambda o: SFPO(o, K=2, transactional_state=True), 3)]


@pytest.mark.parametrize("name,make,n_pass", _rules(), ids=[r[0] for r in _rules()])
@pytest.mark.parametrize("warm", [False, True])
def test_exception_on_every_pass_rewinds_everything(name, make, n_pass, warm):
    for raise_at in range(1, n_pass + 1):
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        rule = make(opt)
        if warm:                                          # optimizer state and gate history exist
            rule.step(_closure(m, opt, rule, batch=2), entropy=1.0)
        before, counters, gate = _state(m, opt), (rule.total_backward_passes, rule.total_optimizer_steps,
                                                   rule.outer_steps, rule.fallbacks), rule.gate.state_dict()
        with pytest.raises(Boom):
            rule.step(_closure(m, opt, rule, raise_at=raise_at), entropy=1.0)
        _assert_same(_state(m, opt), before)
        assert (rule.total_backward_passes, rule.total_optimizer_steps, rule.outer_steps,
                rule.fallbacks) == counters and rule.gate.state_dict() == gate
        # and the rule goes on as if the failed step never happened
        m2, o2 = copy.deepcopy(m), None
        o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
        o2.load_state_dict(copy.deepcopy(opt.state_dict()))
        r2 = make(o2)
        r2.load_state_dict(rule.state_dict())
        rule.step(_closure(m, opt, rule), entropy=1.0)
        r2.step(_closure(m2, o2, r2), entropy=1.0)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("plain", ["forced", "gated"])
@pytest.mark.parametrize("atomic", [True, False])
def test_sfpo_plain_step_over_minibatches_rewinds(plain, atomic):
    """SFPO's plain step with m = 3 mini-batch closures takes 3 optimizer steps: an exception in the third
    closure rewinds the first two (parameters always, the optimizer state when atomic), counters and gate."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    rule = SFPO(opt, K=2, atomic=atomic)
    rule.step([_closure(m, opt, rule, batch=b) for b in range(3)], entropy=1.0)
    if plain == "gated":
        rule.gate.fired = True
    before, counters = _state(m, opt), (rule.total_backward_passes, rule.total_optimizer_steps, rule.outer_steps,
                                         rule.fallbacks)
    with pytest.raises(Boom):
        rule.step([_closure(m, opt, rule, batch=0), _closure(m, opt, rule, batch=1),
                   _closure(m, opt, rule, batch=2, raise_at=1)], entropy=1.0, force_plain=plain == "forced")
    after = _state(m, opt)
    assert all(torch.equal(x, y) for x, y in zip(after[0], before[0]))
    if atomic:
        _assert_same(after, before)
    assert (rule.total_backward_passes, rule.total_optimizer_steps, rule.outer_steps, rule.fallbacks) == counters
    info = rule.step([_closure(m, opt, rule, batch=b) for b in range(3)], entropy=1.0,
                     force_plain=plain == "forced")    # and the plain step itself still works
    assert info["backward_passes"] == 3 and rule.total_optimizer_steps == counters[1] + 3


@pytest.mark.parametrize("make", [lambda o: GXPO(o), lambda o: SFPO(o, K=2)], ids=["gxpo", "sfpo"])
@pytest.mark.parametrize("call,applied", [(1, True), (2, False), (2, True), (3, True)])
def test_exception_in_an_optimizer_step_rewinds(make, call, applied):
    """The snapshot is taken just before the first optimizer step: an optimizer step that raises before or
    after it has applied its update (the first one included) still rewinds parameters and moments."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = make(opt)
    rule.step(_closure(m, opt, rule), entropy=1.0)
    before = _state(m, opt)
    orig, n = opt.step, [0]

    def flaky(*a, **k):
        n[0] += 1
        if n[0] == call:
            if applied:
                orig(*a, **k)
            raise Boom("optimizer")
        return orig(*a, **k)
    opt.step = flaky
    with pytest.raises(Boom):
        rule.step(_closure(m, opt, rule), entropy=1.0)
    del opt.step
    _assert_same(_state(m, opt), before)


@pytest.mark.parametrize("make", [lambda o: GXPO(o, gate=None), lambda o: SFPO(o, K=2, gate=None)],
                         ids=["gxpo", "sfpo"])
@pytest.mark.parametrize("add_at", [0, 1])
@pytest.mark.parametrize("then_raise", [False, True])
def test_param_group_added_inside_the_closure_raises_and_rewinds(make, add_at, then_raise):
    """θ0 and the state snapshot cover the parameters the step began with. A group added by the closure used to
    make the rewind itself fail (its copy met more parameters than θ0 holds: a RuntimeError instead of the
    closure's exception, parameters left moved), or the new parameters took unextrapolated probe steps; now the
    next optimizer step raises a ValueError, nothing is stepped with the new group, and the step rewinds."""
    m = mlp()
    ps = list(m.parameters())
    opt = torch.optim.AdamW(ps[:2], lr=1e-2, weight_decay=0.1)
    rule = make(opt)
    rule.step(_closure(m, opt, rule, batch=1), entropy=1.0)
    before = _state(m, opt)
    inner = _closure(m, opt, rule)

    def closure():
        if rule.pass_index == add_at and len(opt.param_groups) == 1:
            opt.add_param_group({"params": ps[2:], "lr": 1e-2})
            if then_raise:
                raise Boom("after add_param_group")
        return inner()
    with pytest.raises(Boom if then_raise else ValueError, match="after add_param_group" if then_raise else
                       "parameters changed during the step"):
        rule.step(closure, entropy=1.0)
    _assert_same(_state(m, opt), before)
    assert all(p.grad is None for p in ps)
    rule.step(_closure(m, opt, rule), entropy=1.0)      # between steps a new group is taken up
    assert all(not torch.equal(a, b) for a, b in zip(ps, before[0])) and all(opt.state[p] for p in ps)


def test_snapshot_is_taken_at_the_first_optimizer_step():
    """Nothing is copied before pass 0 (the copies run when the optimizer is about to read the same tensors);
    θ0 is the parameters at the step's start all the same."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate=None)
    seen = []

    def closure():
        seen.append((rule.pass_index, rule._snapped_params, rule._snapped_opt))
        opt.zero_grad()
        loss = loss_fn(m, 0)
        loss.backward()
        return loss
    rule.step(closure)
    start = [p.detach().clone() for p in m.parameters()]
    seen.clear()
    rule.step(closure)
    assert seen == [(0, False, False), (1, True, True), (2, True, True)]
    assert all(torch.equal(a, b) for a, b in zip(rule._theta0, start))


class _CountingSGD(torch.optim.SGD):
    """SGD with momentum plus a plain-int step count in its state (a non-tensor value that changes)."""

    def step(self, closure=None):
        out = super().step(closure)
        for st in self.state.values():
            st["n"] = st.get("n", 0) + 1
        return out


@pytest.mark.parametrize("change", ["none", "loaded_state_dict", "replaced_tensor", "non_tensor_value",
                                    "swapped_values"])
def test_optimizer_snapshot_reuse_follows_the_state(change):
    """Consecutive active steps over the same state objects reuse the last snapshot's buffers and copy pairs; a
    loaded state dict (new tensors, other values), a replaced state tensor, a changed non-tensor value or two
    state tensors swapped between keys (the same objects, each under the other's name: reused pairs would rewind
    each into the other) is snapshotted afresh. Each time an exception in pass 3 rewinds to the values at the
    step's start."""
    m = mlp()
    opt = (_CountingSGD(m.parameters(), lr=1e-2, momentum=0.9) if change == "non_tensor_value"
           else torch.optim.AdamW(m.parameters(), lr=1e-2))
    rule = GXPO(opt, gate=None)
    for b in range(3):                     # from the third step on the state holds the same objects
        rule.step(_closure(m, opt, rule, batch=b))
    reused = rule._opt_snap_pairs
    p0 = next(m.parameters())
    if change == "loaded_state_dict":      # new tensor objects with other values
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            st["exp_avg"].mul_(2.0)
        opt.load_state_dict(sd)
    elif change == "replaced_tensor":
        opt.state[p0]["exp_avg_sq"] = opt.state[p0]["exp_avg_sq"] * 3.0
    elif change == "swapped_values":
        st = opt.state[p0]
        st["exp_avg"].abs_()               # a valid second moment once swapped
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg_sq"], st["exp_avg"]
    before = _state(m, opt)
    with pytest.raises(Boom):
        rule.step(_closure(m, opt, rule, raise_at=3))
    _assert_same(_state(m, opt), before)
    assert (rule._opt_snap_pairs is reused) == (change == "none")
    assert all(a is b for a, b in zip(rule._opt_snap_pairs[1], (v for p in m.parameters()
                                                                 for v in opt.state[p].values()
                                                                 if torch.is_tensor(v))))


def test_snapshot_is_one_copy_call_per_active_step(monkeypatch):
    """θ0 and the optimizer state of an active step go to the C++ op's non-temporal copy in one call (one pass of
    checks and one crossing into C++ rather than one per snapshot), and the step is the same as with copy_."""
    from gxpo_kernels.ops.extrapolate import _cpp
    if _cpp.load_extension() is None:
        pytest.skip("the C++ extension cannot be built here")
    calls = []
    orig = _cpp.snapshot_copy_
    monkeypatch.setattr(_cpp, "snapshot_copy_", lambda d, s: calls.append(len(d)) or orig(d, s))
    out = []
    for backend in ("cpp", "torch"):
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        rule = GXPO(opt, gate=None, backend=backend)
        for b in range(3):
            del calls[:]
            info = rule.step(_closure(m, opt, rule, batch=b))
            assert info["active"] and not info["fell_back"]
            if backend == "cpp":   # every parameter, then step, exp_avg and exp_avg_sq of each (state from step 2)
                n = len(list(m.parameters()))
                assert calls == [n + (3 * n if b else 0)], calls
        assert backend == "cpp" or not calls
        out.append(_state(m, opt))
    _assert_same(*out)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_step_leaves_grad_mode_as_it_found_it(grad_mode):
    """The closures run with gradients on, the rule's own copies without (no snapshot buffer joins a graph), and the
    caller's grad mode is back after the step, after an exception too."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate=None, backend="torch")   # copy_ snapshots: autograd would record them under grad mode
    seen = []
    inner = _closure(m, opt, rule)

    def closure():
        seen.append(torch.is_grad_enabled())
        return inner()
    with torch.set_grad_enabled(grad_mode):
        for _ in range(2):
            rule.step(closure)
            assert torch.is_grad_enabled() is grad_mode
        with pytest.raises(Boom):
            rule.step(_closure(m, opt, rule, raise_at=2))
        assert torch.is_grad_enabled() is grad_mode
    assert seen == [True] * 6
    bufs = list(rule._theta0) + list(rule._opt_snap_pairs[0])
    assert not any(b.requires_grad or b.grad_fn is not None for b in bufs)


def test_exception_in_the_extrapolation_rewinds():
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt)
    rule.step(_closure(m, opt, rule))
    before = _state(m, opt)
    rule._extrapolate = lambda *a, **k: (_ for _ in ()).throw(Boom("kernel"))
    with pytest.raises(Boom):
        rule.step(_closure(m, opt, rule))
    _assert_same(_state(m, opt), before)


def test_checks_before_the_first_optimizer_step():
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate=None)
    rule.step(_closure(m, opt, rule))
    rule.step(_closure(m, opt, rule))
    before = _state(m, opt)
    w = m[0].weight
    w.data = w.data.t().contiguous().t()                 # same values, transposed strides
    with pytest.raises(ValueError, match="not contiguous"):
        rule.step(_closure(m, opt, rule))
    _assert_same(_state(m, opt), before)
    w.data = w.data.contiguous()
    w.data.neg_()
    w.data = torch._neg_view(w.data)                     # same values and address, memory holding -w
    with pytest.raises(ValueError, match="parameter 0 is a lazily negated view"):
        rule.step(_closure(m, opt, rule))
    _assert_same(_state(m, opt), before)
    w.data = w.data.resolve_neg()
    # optimizer-aware with a warm-up starting at lr = 0: refused before anything moves ...
    r2 = GXPO(opt, optimizer_aware=True)
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match="lr > 0"):
        r2.step(_closure(m, opt, r2))
    _assert_same(_state(m, opt), before)
    # ... or neutral: no displacement, no NaN, one AdamW step at lr 0 leaves the parameters
    r3 = GXPO(opt, optimizer_aware=True, zero_lr="neutral")
    info = r3.step(_closure(m, opt, r3))
    assert not info["fell_back"] and info["scale_max"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before[0], m.parameters()))


class _SGDCopy(torch.optim.SGD):
    """Not one of the optimizers GXPO trusts to leave .grad alone: the rule copies ĝ0 into its own buffer."""


def test_model_double_and_frozen_set_change_reallocate_buffers():
    m = mlp()
    opt = _SGDCopy(m.parameters(), lr=0.05)
    rule = GXPO(opt, gate=None)
    rule.step(_closure(m, opt, rule))
    m.double()
    info = rule.step(_closure(m, opt, rule))
    assert rule._theta0[0].dtype == torch.float64 and rule._g0[0].dtype == torch.float64 and info["active"]
    m[0].weight.requires_grad_(False)                    # another frozen set, same count of shapes differs
    m[2].bias.requires_grad_(False)
    info = rule.step(_closure(m, opt, rule))
    assert info["active"] and not info["fell_back"] and len(rule._g0) == 2


class _ListMomentum(torch.optim.Optimizer):
    """SGD with momentum keeping its buffer and step count in a list (nested state, as some third-party optimizers
    do); ``extras``: also a Python-int step count and a key added from the third step on (else the state is the
    same list object at every step, which the snapshot's fast path would take for unchanged)."""

    def __init__(self, params, lr=0.05, mu=0.9, extras=True):
        super().__init__(params, dict(lr=lr, mu=mu))
        self.extras = extras

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["bufs"] = [torch.zeros_like(p), torch.zeros(())]
                    if self.extras:
                        st["n"] = 0
                st["bufs"][0].mul_(g["mu"]).add_(p.grad)
                st["bufs"][1].add_(1)
                if self.extras:
                    st["n"] += 1
                    if st["n"] >= 3:
                        st["late"] = p.detach().clone()
                p.add_(st["bufs"][0], alpha=-g["lr"])


def _nested_state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [copy.deepcopy(dict(opt.state[p])) for p in model.parameters()])


def _assert_same_nested(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for sa, sb in zip(a[1], b[1]):
        assert sa.keys() == sb.keys() and sa.get("n") == sb.get("n")
        assert all(torch.equal(x, y) for x, y in zip(sa["bufs"], sb["bufs"]))


@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("name", ["gxpo", "gxpo_tx", "sfpo"])
def test_nested_optimizer_state_is_rewound(name, extras):
    """A state value holding tensors inside a container (a list here) was snapshotted by reference: the step's
    in-place updates reached the 'snapshot', so an exception, a fallback and the transactional restore left the
    buffer moved (and a key added during the step stayed)."""
    m = mlp(torch.float64)
    opt = _ListMomentum(m.parameters(), extras=extras)
    rule = {"gxpo": lambda: GXPO(opt, gate=None), "sfpo": lambda: SFPO(opt, K=2, gate=None),
            "gxpo_tx": lambda: GXPO(opt, gate=None, transactional_state=True, atomic=False)}[name]()
    rule.step(_closure(m, opt, rule, batch=1), entropy=1.0)          # state exists (n = 3 for GXPO)
    if name != "gxpo_tx":                                           # an exception on the last pass rewinds
        before = _nested_state(m, opt)
        with pytest.raises(Boom):
            rule.step(_closure(m, opt, rule, raise_at=3), entropy=1.0)
        _assert_same_nested(_nested_state(m, opt), before)
        rule.step(_closure(m, opt, rule, batch=2), entropy=1.0)     # a second snapshot of the same objects
        before = _nested_state(m, opt)
        with pytest.raises(Boom):
            rule.step(_closure(m, opt, rule, raise_at=3), entropy=1.0)
        _assert_same_nested(_nested_state(m, opt), before)
        return
    # transactional: the state advances by the corrective step only, from the step's start
    m2 = copy.deepcopy(m)
    o2 = _ListMomentum(m2.parameters(), extras=extras)
    o2.state.update({q: copy.deepcopy(dict(opt.state[p])) for p, q in zip(m.parameters(), m2.parameters())})
    rec = {}
    rule.step(closure_for(m, opt, rule, record=rec, batch=2))
    with torch.no_grad():
        for q, t in zip(m2.parameters(), rec[2]):                  # θ̃ as the rule computed it
            q.copy_(t)
    plain_step(m2, o2, batch=2)
    _assert_same_nested(_nested_state(m, opt), _nested_state(m2, o2))


class _DroppingSGD(torch.optim.SGD):
    """SGD whose step, once ``drop`` is set, removes the momentum buffer and adds a tensor key in its place (a
    state that loses one key and gains another: the same number of keys)."""
    drop = False

    @torch.no_grad()
    def step(self, closure=None):
        super().step()
        if self.drop:
            for st in self.state.values():
                if st.pop("momentum_buffer", None) is not None:
                    st["other"] = torch.zeros(())


@pytest.mark.parametrize("name", ["gxpo", "gxpo_tx", "sfpo"])
def test_optimizer_state_that_lost_a_key_is_rewound(name):
    """A state key the step removed made the rewind raise KeyError (in place of the step's own exception) and
    leave the counters and the rest of the state unrestored; a key added in its place stayed."""
    m = mlp(torch.float64)
    opt = _DroppingSGD(m.parameters(), lr=0.05, momentum=0.9)
    rule = {"gxpo": lambda: GXPO(opt, gate=None), "sfpo": lambda: SFPO(opt, K=2, gate=None),
            "gxpo_tx": lambda: GXPO(opt, gate=None, transactional_state=True)}[name]()
    rule.step(_closure(m, opt, rule, batch=1), entropy=1.0)          # momentum buffers exist
    opt.drop = True
    before = ([p.detach().clone() for p in m.parameters()], copy.deepcopy(opt.state_dict()["state"]))
    counters = (rule.total_backward_passes, rule.total_optimizer_steps, rule.outer_steps)
    with pytest.raises(Boom):
        rule.step(_closure(m, opt, rule, raise_at=3), entropy=1.0)
    assert (rule.total_backward_passes, rule.total_optimizer_steps, rule.outer_steps) == counters
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[0]))
    after = opt.state_dict()["state"]
    assert after.keys() == before[1].keys()
    for i in before[1]:
        assert after[i].keys() == before[1][i].keys() == {"momentum_buffer"}
        assert torch.equal(after[i]["momentum_buffer"], before[1][i]["momentum_buffer"])


@pytest.mark.parametrize("name", ["gxpo", "sfpo", "sfpo_plain_m2"])
def test_frozen_param_with_a_stale_grad_is_refused_before_anything_moves(name):
    """A layer frozen after a backward keeps its .grad when the closure zeroes with set_to_none=False; torch's
    optimizers step it (zero grad: momentum and decay) although the rule's snapshot does not cover it, so a step
    moved it several times and a rewind left it moved. The step is refused at its first optimizer step."""
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    rule = GXPO(opt, gate=None) if name == "gxpo" else SFPO(opt, K=2, gate="ema", tau=1e-9 if "plain" in name else 9)

    def closure(batch=0):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(m, batch)
        loss.backward()
        return loss
    closures = closure if name == "gxpo" else [closure, lambda: closure(1)]
    for _ in range(3 if "plain" in name else 1):
        rule.step(closures)
    assert rule.gate.fired == ("plain" in name)
    m[2].requires_grad_(False)
    before = _state(m, opt)
    with pytest.raises(ValueError, match="parameter 2 of the optimizer .* requires_grad=False but a .grad"):
        rule.step(closures)
    _assert_same(_state(m, opt), before)
    assert m[2].weight.grad is None and m[2].bias.grad is None   # the rewind cleared them: the next step runs
    info = rule.step(closures)
    assert not info["fell_back"]
    assert torch.equal(m[2].weight, before[0][2]) and torch.equal(m[2].bias, before[0][3])


def test_a_parameter_of_another_dtype_at_the_same_address_rebuilds_the_prepared_extrapolation():
    """Parameters whose storage became bf16 at the same addresses (what CUDA's caching allocator can hand back
    after ``model.to(...)``): the rule's prepared extrapolation was keyed on the addresses alone, and the Triton
    kernel went on reading and writing them as float32 (garbage). It is rebuilt: the step equals a fresh rule's
    on a bf16 copy (to 2 bf16 ulps: the interpreter's bf16 stores truncate)."""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    rule = GXPO(opt, gate=None, backend="triton")
    rule.step(_closure(m, opt, rule))
    for p in m.parameters():
        vals = p.detach().clone()
        p.data = p.data.view(-1).view(torch.bfloat16)[:p.numel()].view(p.shape)   # the same address, bf16
        p.data.copy_(vals)
    ref = copy.deepcopy(m)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_rule = GXPO(ref_opt, gate=None, backend="torch")
    info = rule.step(_closure(m, opt, rule))
    want = ref_rule.step(_closure(ref, ref_opt, ref_rule))
    assert info["active"] and not info["fell_back"]
    for key in ("disp_norm", "scaled_disp_norm", "scale_mean"):          # (read as float32: disp_norm = inf)
        assert math.isclose(info[key], want[key], rel_tol=2e-2), (key, info[key], want[key])
    for p, q in zip(m.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16
        assert bool(((p.double() - q.double()).abs() <= 2 ** -6 * q.double().abs().clamp(min=1)).all())


# ---- the authors' semantics -------------------------------------------------------------------------------
def _authors_gxpo_step(model, opt, batch, st, clip=1.0, K=5, alpha=0.5, delta=1e-8, tau=0.5, omega=0.1,
                       poison=()):
    """One mini-batch step of the authors' paper-era GXPO (their _gxpo_minibatch_step), re-derived: post-clip
    g0/g1, closed form with pow, light fallback (θ0 only, recomputed g0), EMA gate on the clipped ‖ĝ_corr‖.
    ``poison``: the backward calls of this step (1-based) whose loss is NaN, or "zero" for a zero loss."""
    params = list(model.parameters())
    calls = [0]

    def backward():
        opt.zero_grad()
        calls[0] += 1
        loss = loss_fn(model, batch)
        loss = loss * 0.0 if poison == "zero" else loss * math.nan if calls[0] in poison else loss
        loss.backward()

    def standard():
        backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    if st["fired"]:
        return standard()
    t0 = [p.detach().clone() for p in params]

    def fallback():                                # θ0 back, the probe steps' moments stay, g0 recomputed
        with torch.no_grad():
            for p, a in zip(params, t0):
                p.copy_(a)
        return standard()
    def grads():                                   # their _gxpo_capture_grads: a missing grad is zero
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    backward()
    gn0 = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(gn0) or gn0 <= 1e-8:
        return standard()
    g0 = grads()
    opt.step()
    backward()
    gn1 = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(gn1):
        return fallback()
    g1 = grads()
    opt.step()
    with torch.no_grad():
        for p, a, x, y in zip(params, t0, g0, g1):
            sgn = torch.where(x >= 0, 1.0, -1.0)
            r = (y / (x.abs().clamp(min=delta) * sgn)).clamp(-2.0, 3.0).nan_to_num(nan=1.0)
            s = (((1.0 - r.pow(K)) / ((1.0 - r) + delta)) / ((1.0 - r * r) / ((1.0 - r) + delta) + delta))
            p.copy_(((p - a) * s.clamp(1.0, K / 2 + 1.0)) * alpha + a)
    backward()
    if not math.isfinite(float(torch.nn.utils.clip_grad_norm_(params, clip))):
        return fallback()
    h = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    opt.step()
    z = (h - st["mu"]) / (st["sigma"] + 1e-8)
    st["sigma"] = max(0.01, ((1 - omega) * st["sigma"] ** 2 + omega * (h - st["mu"]) ** 2) ** 0.5)
    st["mu"] = (1 - omega) * st["mu"] + omega * h
    st["fired"] = abs(z) >= tau


# backend="torch": on the CPU torch.pow itself sends each thread's loop tail through std::pow, which the C++
# kernel (SLEEF's pow throughout) cannot mirror for tensors this small; on CUDA pow is elementwise
@pytest.mark.parametrize("backend", ["torch"])
def test_gxpo_paper_protocol_is_bit_exact_with_the_authors_update(backend):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    m2 = copy.deepcopy(m)
    o1 = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
    o2 = torch.optim.AdamW(m2.parameters(), lr=3e-3, weight_decay=0.01)
    rule = GXPO.paper_protocol(o1, backend=backend)
    st = {"mu": 1.0, "sigma": 1.0, "fired": False}
    fired_at = None
    for step in range(20):
        rule.step(_closure(m, o1, rule, batch=step % 16))
        _authors_gxpo_step(m2, o2, step % 16, st)
        assert rule.gate.fired == st["fired"]
        fired_at = step if fired_at is None and st["fired"] else fired_at
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())), step
        for p, q in zip(m.parameters(), m2.parameters()):
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(o1.state[p][k], o2.state[q][k]), (step, k)
    assert fired_at is not None          # both regimes (active, then single-pass) were compared


_OPTS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01),
         "adam": lambda ps: torch.optim.Adam(ps, lr=3e-3),
         "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)}


@pytest.mark.parametrize("opt_name,K", [("sgd_momentum", 3), ("adam", 10), ("adamw", 5)])
@pytest.mark.parametrize("poison", [(), (2,), (3,), "zero"], ids=["none", "nan_pass1", "nan_pass2", "zero_loss"])
def test_gxpo_paper_protocol_matches_the_authors_through_fallbacks(opt_name, K, poison):
    """Beyond AdamW with K = 5: other optimizers and K, and the fallbacks of the authors' code (a NaN gradient on
    pass 1 or on the corrective pass: θ0 back, the probe steps' moments kept, g0 recomputed; a zero gradient:
    a recomputed plain step). Parameters and every optimizer-state tensor agree bit for bit, before and after
    the gate fires. (A non-finite g0 is where we differ on purpose: we skip the step, see update-rules.md.)"""
    m = mlp(seed=1)
    m2 = copy.deepcopy(m)
    o1, o2 = _OPTS[opt_name](m.parameters()), _OPTS[opt_name](m2.parameters())
    rule = GXPO.paper_protocol(o1, K=K, backend="torch")
    st = {"mu": 1.0, "sigma": 1.0, "fired": False}
    reasons = []
    for step in range(8):
        calls = [0]

        def closure(b=step % 16, bad=poison if step == 2 else ()):
            o1.zero_grad()
            calls[0] += 1
            loss = loss_fn(m, b)
            loss = loss * 0.0 if bad == "zero" else loss * math.nan if calls[0] in bad else loss
            loss.backward()
            return loss
        reasons.append(rule.step(closure)["fallback_reason"])
        _authors_gxpo_step(m2, o2, step % 16, st, K=K, poison=poison if step == 2 else ())
        assert rule.gate.fired == st["fired"], step
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())), step
        for p, q in zip(m.parameters(), m2.parameters()):
            assert o1.state[p].keys() == o2.state[q].keys()
            for k, v in o1.state[p].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(o2.state[q][k])), (step, k)
    assert reasons[2] == {(): None, (2,): "nonfinite_g1", (3,): "nonfinite_gcorr", "zero": "small_g0"}[poison]


class _Branchy(torch.nn.Module):
    """A frozen layer, and a head used on every other forward only: its grad is None on alternate passes (pass 1
    of one step, passes 0 and 2 of the next)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.extra = torch.nn.Linear(6, 9), torch.nn.Linear(9, 1), torch.nn.Linear(9, 1)
        self.frozen = torch.nn.Linear(6, 9).requires_grad_(False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = torch.tanh(self.a(x) + self.frozen(x))
        return self.b(z) + (self.extra(z) if self.calls % 2 else 0.0)


# foreach SGD with Nesterov momentum and no weight decay adds the momentum buffer into p.grad in place
_MORE_OPTS = {"sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
              "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
              "adamw_groups": lambda ps: torch.optim.AdamW([{"params": ps[:2], "lr": 0.0},
                                                            {"params": ps[2:], "lr": 3e-3}], weight_decay=0.1)}


@pytest.mark.parametrize("opt_name", list(_MORE_OPTS))
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_gxpo_paper_protocol_matches_the_authors_other_optimizers_and_missing_grads(opt_name, alpha):
    """More of the authors' update, bit for bit: SGD with Nesterov momentum (whose step writes into the grads, so
    ĝ1 is copied first), RMSprop, a param group at lr = 0, α = 1, and a model whose frozen layer has no grad and
    whose head has a grad on every other pass only (the authors count a missing grad as zero)."""
    m = _Branchy()
    m2 = copy.deepcopy(m)
    params, params2 = [p for p in m.parameters() if p.requires_grad], [p for p in m2.parameters() if p.requires_grad]
    o1, o2 = _MORE_OPTS[opt_name](params), _MORE_OPTS[opt_name](params2)
    rule = GXPO.paper_protocol(o1, alpha=alpha, gate=None, backend="torch")
    st = {"mu": 1.0, "sigma": 1.0, "fired": False}
    for step in range(5):
        rule.step(_closure(m, o1, rule, batch=step))
        _authors_gxpo_step(m2, o2, step, st, alpha=alpha)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())), step
        for p, q in zip(params, params2):
            assert o1.state[p].keys() == o2.state[q].keys()
            for k, v in o1.state[p].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(o2.state[q][k])), (step, k)


class _AuthorsLaterGate:
    """The z-path of the GXPO authors' later GXPOState (rolling window), re-derived: score against the preceding
    ``w`` values (population std + 1e-9), no decision until the window is full, one-sided z ≥ τ, ``warmup``
    first steps cannot fire, a violation streak pins the baseline that scored its first violation."""

    def __init__(self, tau, w, warmup, patience):
        self.tau, self.w, self.warmup, self.patience = tau, w, warmup, patience
        self.hist, self.frozen, self.streak, self.fired = [], None, 0, None
        self.mu = self.sigma = 1.0

    def observe(self, h, step):
        history = self.hist[-self.w:]
        self.hist.append(h)
        if len(history) < self.w:
            return
        if self.frozen is not None:
            self.mu, self.sigma = self.frozen
        else:
            self.mu = sum(history) / self.w
            self.sigma = (sum((v - self.mu) ** 2 for v in history) / self.w) ** 0.5
        z = (h - self.mu) / (self.sigma + 1e-9)
        if step < self.warmup:
            self.streak, self.frozen = 0, None
        elif z >= self.tau:
            if self.streak == 0:
                self.frozen = (self.mu, self.sigma)
            self.streak += 1
            if self.streak >= self.patience:
                self.fired = step
        else:
            self.streak, self.frozen = 0, None


@pytest.mark.parametrize("w,patience,warmup", [(3, 1, 0), (5, 2, 4), (4, 3, 12)])
def test_window_gate_matches_the_authors_later_gate(w, patience, warmup):
    """WindowGate(one_sided=True, eps=1e-9) fires at the same observation as the authors' later rolling-window
    gate, on noisy sequences with spikes and steps (patience > 1 uses the frozen baseline)."""
    gen = torch.Generator().manual_seed(w * 100 + patience * 10 + warmup)
    fired = 0
    for rep in range(40):
        noise = torch.randn(40, generator=gen, dtype=torch.float64) * 0.1
        spikes = (torch.rand(40, generator=gen, dtype=torch.float64) < 0.1) * 2.0 * torch.rand(40, generator=gen,
                                                                                                 dtype=torch.float64)
        seq = (1.0 + noise + spikes).tolist()
        a = _AuthorsLaterGate(1.0, w, warmup, patience)
        g = WindowGate(tau=1.0, window=w, eps=1e-9, one_sided=True, patience=patience, warmup=warmup)
        for i, v in enumerate(seq):
            if a.fired is None:
                a.observe(v, i)
            if not g.fired:
                g.observe(v, step=i)
        assert g.fired_step == a.fired, (rep, seq)
        fired += a.fired is not None
    assert fired >= 10                                     # the firing regime is exercised


@pytest.mark.parametrize("K,alpha", [(1, 0.5), (5, 0.9), (3, 1.3)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_sfpo_matches_the_authors_loop_sgd_momentum_three_minibatches(K, alpha, backend):
    """SFPO against the authors' loop with SGD + momentum (the momentum buffers carried through the fast passes,
    the reposition and the slow pass, never reset), m = 3 mini-batches, K from 1 to 5, α below and above 1."""
    m = mlp(seed=2)
    m2 = copy.deepcopy(m)
    o1 = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    rule = SFPO(o1, K=K, alpha=alpha, gate=None, fallback_state="keep", backend=backend)
    for step in range(4):
        batches = [(3 * step + j) % 16 for j in range(3)]

        def mk(b):
            def c():
                o1.zero_grad()
                loss = loss_fn(m, b)
                loss.backward()
                return loss
            return c
        info = rule.step([mk(b) for b in batches])
        _authors_sfpo_step(m2, o2, batches, K=K, alpha=alpha)
        assert info["active"] and info["backward_passes"] == 3 * (K + 1)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())), step
        assert all(torch.equal(o1.state[p]["momentum_buffer"], o2.state[q]["momentum_buffer"])
                   for p, q in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("K", [3, 4, 5, 10])
def test_scale_at_r_minus_one_is_as_documented(K):
    """r = −1 exactly (ĝ1 = −ĝ0): Horner gives K/2 + 1 for odd K (S_K(−1)/0 → +inf, clamped) and K/2 for even K
    (S_{K/2}(1)); the paper's closed form gives K/2 + 1 for odd K and 1 for even K. (The authors' later guarded
    Horner gives 1 for every K.) update-rules.md states these values."""
    from gxpo_kernels.ops.extrapolate import extrapolate_
    g0 = torch.tensor([0.01, -0.02, 0.5], dtype=torch.float64)
    want = {"horner": K / 2 + 1 if K % 2 else K / 2, "closed": K / 2 + 1 if K % 2 else 1.0}
    for formula, scale in want.items():
        p = [torch.full((3,), 1.0, dtype=torch.float64)]
        extrapolate_(p, [torch.zeros(3, dtype=torch.float64)], [g0], [-g0], alpha=1.0, K=K,
                     scale_formula=formula, backend="torch")
        assert torch.equal(p[0], torch.full((3,), scale, dtype=torch.float64)), formula


def _authors_sfpo_step(model, opt, batches, K, alpha, clip=1.0):
    """The authors' sfpo_update_actor, re-derived: K full passes over the mini-batches (one optimizer step each),
    one reposition per batch, then a slow full pass; returns the slow pass's mean entropy stand-in (its losses)."""
    params = list(model.parameters())

    def full_pass():
        out = []
        for b in batches:
            opt.zero_grad()
            loss = loss_fn(model, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            out.append(float(loss.detach()))
        return out
    slow = [p.detach().clone() for p in params]
    for _ in range(K):
        full_pass()
    with torch.no_grad():
        for p, s in zip(params, slow):
            p.copy_(s + alpha * (p - s))
    return sum(full_pass()) / len(batches)


def test_sfpo_paper_protocol_two_minibatches_and_slow_pass_entropy():
    torch.manual_seed(1)
    m = mlp()
    m2 = copy.deepcopy(m)
    o1 = torch.optim.AdamW(m.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    rule = SFPO.paper_protocol(o1, window=3)
    fired, container = False, []
    for step in range(8):
        batches = [2 * step % 16, (2 * step + 1) % 16]
        closures = []
        for b in batches:                                 # the slow-pass entropy stand-in: the loss value
            def c(b=b):
                o1.zero_grad()
                loss = loss_fn(m, b)
                loss.backward()
                return loss, float(loss)
            closures.append(c)
        info = rule.step(closures)
        if not fired:
            h = _authors_sfpo_step(m2, o2, batches, K=3, alpha=0.8)
            assert info["active"] and info["backward_passes"] == 8 and info["entropy_signal"] == h
        else:
            for b in batches:
                o2.zero_grad()
                loss_fn(m2, b).backward()
                torch.nn.utils.clip_grad_norm_(list(m2.parameters()), 1.0)
                o2.step()
            h = None
        if h is not None:
            container.append(h)
        if len(container) >= 3 and not fired:
            last = container[-3:]
            mu = sum(last) / 3
            z = (container[-1] - mu) / ((sum((x - mu) ** 2 for x in last) / 3) ** 0.5 + 1e-9)
            fired = z >= 1.0
        assert rule.gate.fired == fired
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())), step
        assert all(torch.equal(o1.state[p]["step"], o2.state[q]["step"])
                   for p, q in zip(m.parameters(), m2.parameters()))


def test_sfpo_norm_gates_observe_the_last_slow_minibatch_clipped_norm():
    """SFPO with the EMA gate: the value observed is the clipped gradient norm of the slow pass's last mini-batch
    (update-rules.md), here below and above the clip norm."""
    for clip in (1e-3, 100.0):
        m = mlp()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        rule = SFPO(opt, K=2, gate="ema", tau=1e9, max_grad_norm=clip)
        seen, norms = [], []
        rule.gate.observe = lambda v, step=None: seen.append(v) or 0.0

        def mk(b):
            def c():
                opt.zero_grad()
                loss = loss_fn(m, b)
                loss.backward()
                if rule.pass_index == rule.K:
                    norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])))
                return loss
            return c
        rule.step([mk(0), mk(1), mk(2)])
        assert len(norms) == 3 and len(seen) == 1
        assert seen[0] == pytest.approx(min(norms[-1], clip), rel=1e-5)
        if clip > 1:                                      # unclipped: the three mini-batches' norms differ
            assert min(abs(seen[0] - n) for n in norms[:2] + [sum(norms) / 3]) > 1e-3 * seen[0]


def test_sfpo_mini_batches_reposition_once():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rule = SFPO(opt, K=2, alpha=0.5, gate=None)
    seen = []

    def mk(b):
        def c():
            opt.zero_grad()
            seen.append((rule.pass_index, rule.minibatch_index))
            loss = loss_fn(m, b)
            loss.backward()
            return loss
        return c
    info = rule.step([mk(0), mk(1)])
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert info["backward_passes"] == 6 and rule.total_optimizer_steps == 6 and rule.outer_steps == 1


def test_gate_one_sided_patience_warmup_rearm_scripted():
    seq = [1.0, 1.1, 0.9, 1.0, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0]
    fired_at = {}
    for one_sided in (False, True):
        g = WindowGate(tau=2.0, window=4, one_sided=one_sided, patience=2, eps=1e-9)
        zs = [g.observe(v, step=i) for i, v in enumerate(seq)]
        fired_at[one_sided] = g.fired_step
        # the second violation of a streak is scored against the baseline frozen at the first
        i = g.fired_step
        assert zs[i] == zs[i - 1]
    assert fired_at == {False: 5, True: 12}              # two-sided: the drop; one-sided: the second rise
    e = EMAGate(tau=0.5, warmup=3, rearm_after=2)
    e.observe(30.0)                                      # a cold-start spike inside the warm-up cannot fire
    assert not e.fired
    for v in (30.0, 30.0, 90.0):
        e.observe(v)
    assert e.fired
    e.count_plain_step()
    assert not e.rearm_due()
    e.count_plain_step()
    assert e.rearm_due()
    e.rearm()
    assert not e.fired and e.mu > 10                     # statistics kept


def test_rule_rearms_after_n_plain_steps_and_force_plain_skips_the_gate():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    rule = GXPO(opt, tau=1e-9, gate_rearm_after=2)
    actives = [rule.step(_closure(m, opt, rule, batch=i))["active"] for i in range(6)]
    assert actives == [True, False, False, True, False, False]    # fires at once, 2 plain steps, re-armed
    n = rule.gate.n_observed
    info = rule.step(_closure(m, opt, rule), force_plain=True)
    assert not info["active"] and info["fallback_reason"] == "forced" and rule.gate.n_observed == n


@pytest.mark.parametrize("rule_cls", [GXPO, SFPO])
def test_a_forced_step_counts_towards_the_rearm_window(rule_cls):
    """The authors' temporary fallback re-arms ``fallback_window`` steps after the trip, a degenerate-batch
    (forced) step included: with re-arming after 2, a forced and a plain step after the fire make the next
    step active again. (The forced step used not to count: the rule stayed plain one step longer.)"""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    kw = {"gate": "window", "window": 2} if rule_cls is SFPO else {}
    rule = rule_cls(opt, tau=1e-9, gate_rearm_after=2, **kw)
    if rule_cls is SFPO:                                  # fill the window: observations 1 and 2 decide nothing
        for b in range(2):
            rule.step(_closure(m, opt, rule, batch=b))
    assert rule.step(_closure(m, opt, rule, batch=3))["active"] and rule.gate.fired
    assert rule.step(_closure(m, opt, rule, batch=4), force_plain=True)["fallback_reason"] == "forced"
    assert not rule.step(_closure(m, opt, rule, batch=5))["active"]
    assert rule.step(_closure(m, opt, rule, batch=6))["active"]


def test_an_exception_in_the_step_that_rearms_the_gate_leaves_it_fired():
    """The re-arming at the start of a step is part of the step: an exception in its closure (or a check) puts the
    gate back as it was, fired with its plain-step count, like everything else (found by fuzzing)."""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    rule = GXPO(opt, tau=1e-9, gate_rearm_after=2)
    for i in range(3):
        rule.step(_closure(m, opt, rule, batch=i))
    assert rule.gate.rearm_due()
    before, gate, sd = _state(m, opt), rule.gate.state_dict(), rule.state_dict()
    for raise_at in (1, 2):
        with pytest.raises(Boom):
            rule.step(_closure(m, opt, rule, raise_at=raise_at))
        _assert_same(_state(m, opt), before)
        assert rule.gate.state_dict() == gate and rule.state_dict() == sd and rule.gate.fired
    assert rule.step(_closure(m, opt, rule))["active"]   # re-armed by the step that succeeds


@pytest.mark.parametrize("fallback_grad,nan_pass,bp", [("reuse", 1, 2), ("recompute", 1, 3), ("reuse", 2, 3),
                                                        ("recompute", 2, 4)])
def test_backward_passes_in_fallbacks(fallback_grad, nan_pass, bp):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m2 = copy.deepcopy(m)
    rule = GXPO(opt, fallback_grad=fallback_grad)

    def c():
        opt.zero_grad()
        loss = loss_fn(m, 0) * (math.nan if rule.pass_index == nan_pass else 1.0)
        loss.backward()
        return loss
    info = rule.step(c)
    assert info["fell_back"] and info["backward_passes"] == bp == rule.total_backward_passes
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05)           # same parameters either way: one plain step
    o2.zero_grad()
    loss_fn(m2, 0).backward()
    torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
    o2.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_skip_corrective_is_the_repositioned_point():
    m = mlp(torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m2 = copy.deepcopy(m)
    info = GXPO(opt, gate=None, skip_corrective=True, backend="torch").step(_closure(m, opt, None))
    assert info["backward_passes"] == 2
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    r2 = GXPO(o2, gate=None, backend="torch")
    rec = {}
    r2._run_closure = (lambda f: lambda c, k: (rec.setdefault("theta", [p.detach().clone() for p in
                                                                        m2.parameters()]) if k == 2 else None,
                                               f(c, k))[1])(r2._run_closure)
    r2.step(_closure(m2, o2, r2))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), rec["theta"]))


def test_load_state_dict_refuses_other_settings():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    sd = GXPO(opt, K=5, alpha=0.5).state_dict()
    for kw in (dict(K=4), dict(alpha=0.3), dict(scale_formula="closed")):
        with pytest.raises(ValueError, match="other settings"):
            GXPO(opt, **kw).load_state_dict(sd)
    GXPO(opt).load_state_dict(sd)
    with pytest.raises(ValueError, match="other settings"):
        SFPO(opt, K=2).load_state_dict(SFPO(opt, K=3).state_dict())


@pytest.mark.parametrize("make", [lambda: EMAGate(tau=2.0), lambda: WindowGate(tau=2.0, window=3)],
                         ids=["ema", "window"])
def test_a_nonfinite_observation_is_skipped(make):
    """A NaN or inf value leaves a gate's statistics as they were (the EMA folded it in and never fired again):
    the same sequence with and without the NaN gives the same z-scores and fires at the same spike."""
    seq = [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]
    clean, dirty = make(), make()
    zc = [clean.observe(v) for v in seq]
    zd = [dirty.observe(v) for v in seq[:3]] + [dirty.observe(math.nan), dirty.observe(math.inf)] + \
        [dirty.observe(v) for v in seq[3:]]
    assert math.isnan(zd[3]) and math.isnan(zd[4])
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(zd[:3] + zd[5:], zc, strict=True))
    assert clean.fired and dirty.fired and dirty.n_observed == clean.n_observed


def test_gate_settings_are_checked():
    with pytest.raises(ValueError, match="eps"):
        WindowGate(eps=0.0)                              # divided by zero on a constant window
    with pytest.raises(ValueError, match="eps"):
        WindowGate(eps=-1e-3)                           # fired on downward moves when one-sided
    with pytest.raises(ValueError, match="mu0"):
        EMAGate(mu0=math.nan)                           # never fired
    with pytest.raises(ValueError, match="sigma0"):
        EMAGate(sigma0=-1.0)


def test_a_bad_gate_or_rule_state_changes_nothing():
    g = EMAGate(tau=0.5)
    for v in (1.0, 1.2, 0.8):
        g.observe(v)
    before = g.state_dict()
    for bad in ({**before, "omega": "x"}, {k: v for k, v in before.items() if k != "omega"},
                {**before, "tau": 9.0, "mu": math.nan}, {**before, "n_observed": -1}):
        with pytest.raises(ValueError):
            g.load_state_dict(bad)
        assert g.state_dict() == before
    w = WindowGate(tau=0.5, window=3)
    for v in (1.0, 1.2):
        w.observe(v)
    wb = w.state_dict()
    with pytest.raises(ValueError):
        w.load_state_dict({**wb, "values": [1.0, "x"], "window": 7})
    assert w.state_dict() == wb
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, gate="window", tau=3.0, window=9, gate_patience=4, gate_one_sided=True)
    other = GXPO(torch.optim.AdamW(mlp().parameters(), lr=1e-2), gate="window", tau=0.5, window=5)
    before = rule.state_dict()
    with pytest.raises(ValueError, match="gate tau.*gate one_sided.*gate patience.*gate window"):
        rule.load_state_dict(other.state_dict())           # it used to take the checkpoint's gate settings
    bad = {k: v for k, v in rule.state_dict().items() if k != "fallbacks"}
    with pytest.raises(ValueError, match="fallbacks"):
        rule.load_state_dict(bad)
    assert rule.state_dict() == before


def test_extrapolation_failing_part_way_is_rewound_and_the_note_says_so(monkeypatch):
    """The "torch" extrapolation writes tensor by tensor; failing at a later tensor (an allocation) it notes which
    params it had moved. Inside a rule step the rewind puts them back, and a second note says so (the first alone
    would describe a state the rule has already undone)."""
    from gxpo_kernels.ops.extrapolate import reference
    m = mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rule = GXPO(opt, backend="torch")
    rule.step(_closure(m, opt, rule))
    before = _state(m, opt)
    fake = FailOnUse(reference.retention_scale, 2)
    monkeypatch.setattr(reference, "retention_scale", fake)
    with pytest.raises(torch.OutOfMemoryError) as info:
        rule.step(_closure(m, opt, rule))
    notes = info.value.__notes__
    assert fake.uses == 2 and "indices [0]" in notes[0] and "rewound the step" in notes[1]
    _assert_same(_state(m, opt), before)
    monkeypatch.undo()
    rule.step(_closure(m, opt, rule))   # the next step gives what a run without the failure gives
    m2 = mlp()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    rule2 = GXPO(opt2, backend="torch")
    for _ in range(2):
        rule2.step(_closure(m2, opt2, rule2))
    _assert_same(_state(m, opt), _state(m2, opt2))
