"""Adversarial cases for the update rules' prepared extrapolation plan (``ExtrapolationRule._extrapolate``), keyed
on the memory of the params, θ0 and a copied ĝ0 (``_plan_key``): whatever the parameters go through between steps,
a run that keeps its plan ends bit for bit where the same run ends when the plan is built anew on every step."""
import gc
import math
import weakref

import pytest
import torch

from gxpo_kernels.update import GXPO, SFPO
from gxpo_kernels.ops.extrapolate.op import _record_reader
from tests._utils import count_plan_builds

pytestmark = pytest.mark.skipif(_record_reader() is None, reason="no C++ compiler: no prepared plan on the CPU")

X = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
Y = [torch.randn(16, 1, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]


def _model():
    torch.manual_seed(0)   # two square weights: their memory can be swapped
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1))


def _run(change, rule_cls, opt_name, fresh_plans, steps=5, at=3):
    """``steps`` active steps with ``change(model, opt)`` before step ``at``; ``fresh_plans``: the plan is built
    anew on every step (the reference). Returns the final parameters and the number of plan builds."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if opt_name == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)   # (ĝ0 copied: a static g0)
    rule = GXPO(opt, K=5, alpha=0.5, gate=None, backend="cpp") if rule_cls is GXPO else \
        SFPO(opt, K=3, alpha=0.8, gate=None, backend="cpp")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = ((model(X[s % 2]) - Y[s % 2]) ** 2).mean()
        loss.backward()
        return loss
    with count_plan_builds() as builds:
        for s in range(steps):
            if s == at:
                change(model, opt)
            if fresh_plans:
                rule._xplan_key = None
            info = rule.step(closure if rule_cls is GXPO else [closure] * 4)
            assert info["active"] and not info["fell_back"], info
    return [p.detach().clone() for p in model.parameters()], builds[0]


def _swap_memory(model, opt):
    """Two parameters trade their memory: the same addresses in the other order."""
    a, b = model[0].weight, model[2].weight
    a.data, b.data = b.data, a.data


def _leave_and_return(model, opt):
    """Each parameter moves to new memory and back to its first address with new values (what a caching
    allocator does when a buffer is freed and one of the same size allocated), without a step in between."""
    with torch.no_grad():
        for p in model.parameters():
            home = p.data
            p.data = p.data.clone()
            p.data = home.copy_(p.data * 1.01)


def _storage_freed_and_reallocated(model, opt):
    """FSDP's pattern for unsharded parameters: the storage resized to 0 bytes (freed) and back, refilled."""
    with torch.no_grad():
        for p in model.parameters():
            v, st = p.detach().clone(), p.untyped_storage()
            n = st.nbytes()
            st.resize_(0)
            st.resize_(n)
            p.copy_(v)


def _param_group_added(model, opt):
    """A new layer and its param group, mid-run: more tensors, new θ0 buffers."""
    extra = torch.nn.Linear(6, 6)
    model.insert(0, extra)
    opt.add_param_group({"params": list(extra.parameters())})


def _half_and_back(model, opt):
    model.half()
    model.float()


@pytest.mark.parametrize("change, builds", [(_swap_memory, 2), (_leave_and_return, 1),
                                            (_storage_freed_and_reallocated, None), (_param_group_added, 2),
                                            (_half_and_back, 2)])
@pytest.mark.parametrize("rule_cls, opt_name", [(GXPO, "adamw"), (GXPO, "sgd"), (SFPO, "adamw")])
def test_prepared_plan_after_memory_changes_equals_fresh_plans(change, builds, rule_cls, opt_name):
    got, n = _run(change, rule_cls, opt_name, fresh_plans=False)
    want, n_ref = _run(change, rule_cls, opt_name, fresh_plans=True)
    assert n_ref == 5
    if builds is not None:   # (after a resize the storage may or may not be at its old address)
        assert n == builds
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_prepared_plan_frees_what_it_was_built_for():
    """The plan holds its tensors until it is rebuilt or the rule goes: after a param group is added the old θ0
    buffers are freed at the next step's rebuild, and deleting the rule frees the current ones."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rule = GXPO(opt, K=5, alpha=0.5, gate=None, backend="cpp")

    def step(rule):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = ((model(X[0]) - Y[0]) ** 2).mean()
            loss.backward()
            return loss
        rule.step(closure)
    step(rule)
    old = weakref.ref(rule._theta0[0])
    _param_group_added(model, opt)
    step(rule)
    gc.collect()
    assert old() is None
    now = weakref.ref(rule._theta0[0])
    del rule
    gc.collect()
    assert now() is None


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_prepared_plan_writes_the_memory_passed_now_when_its_own_views_moved(backend):
    """A sharded rule hands the plan new views of the same memory every step (DeepSpeed's flat shards), and the
    plan keeps the views it was built with. When the storage under those views moves in place (``share_memory_``,
    a storage ``resize_``) and the memory passed now is at the old addresses (here a second storage over the same
    NumPy buffer; after a resize, an allocator handing the freed block out again), the key matches: the CPU op was
    handed the plan's old views and wrote the moved storage, leaving the memory passed now as it was (no error).
    It is handed this call's tensors now (against the float64 reference). The Triton plan launches on the views it
    holds and raised ValueError ("a parameter or buffer the plan was built for moved"); the rule rebuilds it now
    (a second build), from the tensors passed now."""
    if backend == "triton":
        pytest.importorskip("triton")
    np = pytest.importorskip("numpy")
    from gxpo_kernels.ops.extrapolate.reference import extrapolate_ref_
    shapes, gen = [(13, 7), (301,), (5, 3)], torch.Generator().manual_seed(0)
    n = sum(map(math.prod, shapes))
    arr = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    flat0 = torch.randn(n, generator=gen)
    rule = GXPO(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), K=5, alpha=0.5, gate=None,
                backend=backend)

    def views(buf):
        out, o = [], 0
        for s in shapes:
            out.append(buf[o:o + math.prod(s)].view(s))
            o += math.prod(s)
        return out

    def call(flat):
        params = views(flat)
        rule._theta0 = views(flat0)
        g0 = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
        g1 = [x + torch.randn(x.shape, generator=gen) * 1e-3 for x in g0]
        want = [p.double() for p in params]
        extrapolate_ref_(want, [t.double() for t in rule._theta0], [x.double() for x in g0],
                         [x.double() for x in g1], alpha=0.5, K=5)
        rule._extrapolate(params, g0, g1, alpha=0.5, K=5, g0_kept=True)
        for p, w in zip(views(flat), want):
            assert torch.allclose(p.double(), w, rtol=1e-5, atol=1e-7)
    with count_plan_builds() as builds:
        first = torch.from_numpy(arr)
        call(first)
        first.untyped_storage().share_memory_()      # the plan's views now see other memory
        assert first.data_ptr() != arr.ctypes.data
        call(torch.from_numpy(arr))                  # the old memory, in another storage: the same records
        assert builds[0] == (1 if backend == "cpp" else 2)
        call(torch.from_numpy(arr))                  # (new views of the same memory: the plan is kept)
        assert builds[0] == (1 if backend == "cpp" else 2)
