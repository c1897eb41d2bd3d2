"""Rank-side code of tests/integrations/test_fsdp.py (spawned with torch.multiprocessing, gloo, CPU).

Each rank shards the same tiny model with FSDP2 (``fully_shard``), trains it with the FSDP GXPO/SFPO rule on
its half of every mini-batch and records full tensors (``DTensor.full_tensor()``, gathered for the record
only), per-step diagnostics, the collectives the rule issued outside the closure and its extrapolation calls;
the parent compares them with ``single_process_reference`` (the plain rule on the whole mini-batch).
"""
import contextlib
import copy
import math
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from tests._utils import count_plan_builds
from tests.integrations import _ds_worker as DW

WORLD, ROWS, LR = DW.WORLD, DW.ROWS, DW.LR
X, Y = DW.X, DW.Y
NAN_LOCAL = (0, 0)          # rank-local index of l1.weight's grad that gets a NaN ...
NAN_GLOBAL = (7, 0)         # ... which is this row of the full (13, 7) grad on rank 1 (rows 7..12 live there)


class Net(torch.nn.Module):
    """Linear(7, 13) -> tanh -> Linear(13, 3) -> * gain; gain is (1, 3): on 2 ranks rank 1's shard is empty."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(7, 13)
        self.l2 = torch.nn.Linear(13, 3)
        self.gain = torch.nn.Parameter(1.0 + 0.1 * torch.randn(1, 3))
        self.skip_gain = False              # a branch some ranks do not take: gain gets no gradient there

    def forward(self, x):
        h = self.l2(torch.tanh(self.l1(x)))
        return h if self.skip_gain else h * self.gain


def mse(model, x, y, dtype=torch.float32):
    return ((model(x.to(dtype)).float() - y) ** 2).mean()


def make_optimizer(model, case):
    if not case.get("groups"):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    named = list(model.named_parameters())
    bias = {"weight_decay": 0.3, "lr": 3 * LR} if case.get("group_lr") else {"weight_decay": 0.0}
    return torch.optim.AdamW([{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.01},
                              {"params": [p for n, p in named if n.endswith("bias")], **bias}], lr=LR)


def sharded(case, mesh=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model = Net().to(case.get("dtype", torch.float32))
    kw = {"mesh": mesh or init_device_mesh("cpu", (WORLD,))}
    if case.get("mp"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=case.get("mp_dtype", torch.bfloat16),
                                               reduce_dtype=case.get("reduce_dtype", torch.float32))
    if "reshard_after_forward" in case:
        kw["reshard_after_forward"] = case["reshard_after_forward"]
    fully_shard(model.l1, **kw)
    fully_shard(model.l2, **kw)
    fully_shard(model, **kw)
    if case.get("unused_on_rank0"):     # rank 0 skips the gain; FSDP then reduce-scatters a zero for it there
        model.skip_gain = dist.get_rank() == 0
        model.set_reduce_scatter_unused_params(True)
    return model


def _entropy(case, step, rank):
    return case["entropy"][step][rank] if "entropy" in case else None


def fsdp_closure(model, opt, rule, step, case):
    rank = dist.get_rank()
    lo, hi = rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD

    def closure():
        opt.zero_grad(set_to_none=True)
        if case.get("micro"):         # two micro-batches, FSDP's gradient sync on the last one only
            mid = (lo + hi) // 2
            for b, (a, z) in enumerate(((lo, mid), (mid, hi))):
                model.set_requires_gradient_sync(b == 1)
                if case.get("last_backward"):
                    model.set_is_last_backward(b == 1)
                loss = mse(model, X[step, a:z], Y[step, a:z]) / 2
                loss.backward()
                _maybe_raise(case, step, rule.pass_index, key="raise_between_micro")
            return loss
        loss = mse(model, X[step, lo:hi], Y[step, lo:hi])
        # between the forward and its backward: FSDP still holds the unsharded parameters of this pass
        _maybe_raise(case, step, rule.pass_index, key="raise_before_backward")
        loss.backward()
        if rank == 1 and (step, rule.pass_index) == case.get("nan"):   # a NaN in ONE rank's local shard only
            model.l1.weight.grad.to_local()[NAN_LOCAL] = math.nan
        _maybe_raise(case, step, rule.pass_index)
        return loss
    return closure


class Injected(RuntimeError):
    pass


def _maybe_raise(case, step, pass_index, key="raise_at"):
    """Raise once (on every rank) at case[key] = (step, pass): the rule must rewind the whole step."""
    if (step, pass_index) == case.get(key) and not case.setdefault("_raised", set()) >= {step}:
        case["_raised"].add(step)
        raise Injected(f"injected at step {step}, pass {pass_index}")


def _step(rule, closure, entropy, force_plain):
    """rule.step; an injected exception is retried once (the rule rewound the step). Records the shapes of the
    rule's buffers while it has them (a gate that fired for good releases them)."""
    try:
        info = rule.step(closure, entropy=entropy, force_plain=force_plain)
    except Injected:
        info = rule.step(closure, entropy=entropy, force_plain=force_plain)
    if rule._theta0 is not None:
        rule.seen_buffer_shapes = ([tuple(b.shape) for b in rule._theta0],
                                   [tuple(b.shape) for b in getattr(rule, "_g0", None) or []])
    return info


class CollectiveCounter:
    """Counts the collectives issued outside the closure (FSDP's own all-gather / reduce-scatter run inside it),
    including DTensor's functional collectives (a redistribution would show up here)."""
    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "broadcast",
             "all_to_all_single", "reduce", "gather", "scatter", "all_gather_object")
    FUNCOL = ("all_gather_tensor", "all_reduce", "reduce_scatter_tensor", "all_to_all_single")

    def __init__(self):
        import torch.distributed._functional_collectives as fc
        self.inside, self.calls, self._orig = False, [], []
        for mod, names in ((dist, self.NAMES), (fc, self.FUNCOL)):
            for n in names:
                f = getattr(mod, n, None)
                if f is None:
                    continue
                self._orig.append((mod, n, f))
                setattr(mod, n, self._spy(f"{mod.__name__.split('.')[-1]}.{n}", f))

    def _spy(self, name, f):
        def call(*a, **k):
            if not self.inside:
                t = a[0] if a and isinstance(a[0], torch.Tensor) else (a[1] if len(a) > 1 else None)
                self.calls.append((name, int(t.numel()) if isinstance(t, torch.Tensor) else -1))
            return f(*a, **k)
        return call

    def wrap(self, closure):
        def c():
            self.inside = True
            try:
                return closure()
            finally:
                self.inside = False
        return c

    def restore(self):
        for mod, n, f in self._orig:
            setattr(mod, n, f)


def full(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().float()


def record(model, opt, rule, infos):
    ps = list(model.parameters())
    return {"params": [full(p) for p in ps],
            "exp_avg": [full(opt.state[p]["exp_avg"]) for p in ps],
            "exp_avg_sq": [full(opt.state[p]["exp_avg_sq"]) for p in ps],
            "step": [float(opt.state[p]["step"]) for p in ps], "infos": infos,
            "fired_step": rule.gate.fired_step, "fallbacks": rule.fallbacks, "rule_state": rule.state_dict(),
            "local_shapes": [tuple(p.to_local().shape) for p in rule._param_list()],   # the rule's order
            "theta0_shapes": rule.seen_buffer_shapes[0], "g0_shapes": rule.seen_buffer_shapes[1],
            "total_numel": sum(p.numel() for p in ps)}


def _info(info):
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))}


def train(case, steps=None, model=None, opt=None, rule=None, start=0, counter=None):
    from gxpo_kernels.integrations import fsdp as gf
    if model is None:
        model = sharded(case)
        opt = make_optimizer(model, case)
        rule = gf.wrap(model, opt, case.get("algo", "gxpo"), **case.get("rule", {}))
    infos = []
    for step in range(start, case.get("steps", 3) if steps is None else steps):
        c = fsdp_closure(model, opt, rule, step, case)
        n0 = len(counter.calls) if counter else 0
        info = _step(rule, counter.wrap(c) if counter else c, _entropy(case, step, dist.get_rank()),
                     step in case.get("force_plain", ()))
        if counter:
            info["collectives"] = repr(counter.calls[n0:])
        infos.append(_info(info))
    return model, opt, rule, infos


def run_case(case):
    from gxpo_kernels.ops.extrapolate import _cpp
    calls, orig = [], _cpp.extrapolate_cpp_

    def spy(params, *a, **k):
        calls.append({"numel": sum(p.numel() for p in params), "n": len(params)})
        return orig(params, *a, **k)
    _cpp.extrapolate_cpp_ = spy
    counter = CollectiveCounter()
    try:
        with count_plan_builds() as builds:
            model, opt, rule, infos = train(case, counter=counter)
    finally:
        counter.restore()
        _cpp.extrapolate_cpp_ = orig
    rec = record(model, opt, rule, infos)
    rec.update(cpp_calls=calls, plan_builds=builds[0])
    return rec



@contextlib.contextmanager
def _dcp_folder():
    """A folder rank 0 makes and every rank saves into and loads from (a DCP checkpoint), removed once every rank
    is done with it (after an exception it stays: a barrier there could wait for a rank that failed elsewhere)."""
    path = [tempfile.mkdtemp(prefix="gxpo_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0], ignore_errors=True)

def run_resume(case, k):
    """k steps, save (DCP), a fresh model / optimizer / rule, load, the remaining steps."""
    from gxpo_kernels.integrations import fsdp as gf
    with _dcp_folder() as path:
        model, opt, rule, infos = train(case, steps=k)
        saved_theta0 = [b.clone() for b in rule._theta0]
        gf.save_checkpoint(path, model, opt, rule, buffers=True, extra={"marker": torch.tensor([k + 0.5])})
        model = sharded(case)
        opt = make_optimizer(model, case)
        rule = gf.wrap(model, opt, case.get("algo", "gxpo"), **case.get("rule", {}))
        extra = {"marker": torch.zeros(1)}
        gf.load_checkpoint(path, model, opt, rule, buffers=True, extra=extra)
    loaded_theta0_equal = all(torch.equal(a, b) for a, b in zip(saved_theta0, rule._theta0))
    *_, more = train(case, model=model, opt=opt, rule=rule, start=k)
    rec = record(model, opt, rule, infos + more)
    rec["loaded_theta0_equal"] = loaded_theta0_equal
    rec["extra_marker"] = float(extra["marker"])
    return rec


def run_deepspeed_z3(case):
    """The same steps as DeepSpeed ZeRO-3 (gxpo_kernels.integrations.deepspeed) on the same model and data."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from gxpo_kernels.integrations import deepspeed as gds
    model = Net()
    cfg = DW.ds_config(3)
    kw = {case.get("algo", "gxpo"): dict(case.get("rule", {}))}
    engine, rule = gds.initialize(model=model, config=cfg, optimizer=make_optimizer(model, case), **kw)
    rank = dist.get_rank()
    lo, hi = rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD
    for step in range(case.get("steps", 3)):
        def closure(step=step):
            loss = mse(engine, X[step, lo:hi], Y[step, lo:hi])
            engine.backward(loss)
            return float(loss)
        rule.step(closure, entropy=_entropy(case, step, rank))
    ps = list(engine.module.parameters())
    return {"params": [safe_get_full_fp32_param(p).detach().clone().float() for p in ps],
            "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg").detach().clone().float() for p in ps],
            "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone().float() for p in ps],
            "fired_step": rule.gate.fired_step}


def refusals():
    """Error messages of configurations the rule must refuse."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from gxpo_kernels.integrations import fsdp as gf
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    m = sharded({})
    attempt("inactive_threshold", lambda: gf.wrap(m, torch.optim.AdamW(m.parameters()), inactive_threshold=1e-3))
    plain = Net()
    attempt("not_fsdp", lambda: gf.wrap(plain, torch.optim.AdamW(plain.parameters())))
    attempt("algo", lambda: gf.wrap(m, torch.optim.AdamW(m.parameters()), "adam"))
    attempt("foreign_param", lambda: gf.wrap(m, torch.optim.AdamW(list(m.parameters()) + list(plain.parameters()))))
    # the policy as fully_shard sets it (torch 2.13 builds it on a CPU mesh); where an older torch refuses
    # without an accelerator, give one shard group the policy it would hold
    from torch.distributed.fsdp import fully_shard
    m2 = Net()
    try:
        fully_shard(m2, offload_policy=CPUOffloadPolicy(pin_memory=False))
    except (RuntimeError, ValueError, AssertionError):
        m2 = sharded({})
        m2.l1._get_fsdp_state()._fsdp_param_group.offload_policy = CPUOffloadPolicy()
    attempt("cpu_offload", lambda: gf.wrap(m2, torch.optim.AdamW(m2.parameters())))
    # fp16 needs a loss scaler, which cannot drive the rule's several optimizer steps per update
    for name, case in (("fp16_compute", {"mp": True, "mp_dtype": torch.float16}),
                       ("fp16_reduce", {"mp": True, "reduce_dtype": torch.float16}),
                       ("fp16_params", {"dtype": torch.float16})):
        m4 = sharded(case)
        attempt(name, lambda: gf.wrap(m4, torch.optim.AdamW(m4.parameters())))
    # the model must come back resharded from the closure: the rule edits the shards between passes
    m3 = sharded({})
    m3.set_reshard_after_backward(False)
    opt = torch.optim.AdamW(m3.parameters())
    rule = gf.wrap(m3, opt)
    try:
        rule.step(fsdp_closure(m3, opt, rule, 0, {}))
        out["unsharded_after_closure"] = None
    except RuntimeError as e:
        out["unsharded_after_closure"] = str(e)
    out.update(unreduced_after_closure())
    out["per_param_mesh"] = per_param_mesh()
    out.update(checkpoint_of_other_settings())
    out.update(entropy_on_one_rank())
    return out


def unreduced_after_closure():
    """A closure that leaves gradient sync off for its last backward (``set_requires_gradient_sync(False)``): FSDP
    keeps the gradients in its unsharded parameters, the sharded .grad stays None. The step used to take it for a
    zero gradient (a "small_g0" fallback, nothing moved) and the pending sum went into the next backward. Now:
    RuntimeError on every rank, the step rewound, the pending gradients dropped, so a step with sync back on
    equals a fresh model's first step bit for bit."""
    from gxpo_kernels.integrations import fsdp as gf
    out = {}
    for mp in (False, True):                 # the pending sum in .grad (fp32) and in FSDP's reduce_dtype buffer
        case = {"mp": mp}
        model = sharded(case)
        opt = make_optimizer(model, case)
        rule = gf.wrap(model, opt, gate=None)
        before, inner = [full(p) for p in model.parameters()], fsdp_closure(model, opt, rule, 0, case)

        def closure():
            model.set_requires_gradient_sync(False)
            return inner()
        try:
            rule.step(closure)
            out[f"unreduced_mp{int(mp)}"] = None
        except RuntimeError as e:
            out[f"unreduced_mp{int(mp)}"] = str(e)
        rewound = all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters())) and not opt.state
        model.set_requires_gradient_sync(True)
        rule.step(fsdp_closure(model, opt, rule, 0, case))
        fresh = train(case, steps=1)[0]
        out[f"unreduced_mp{int(mp)}_then_clean"] = rewound and all(
            torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), fresh.parameters()))
    return out


def per_param_mesh():
    """The biases sharded over a second mesh of the same ranks (``shard_placement_fn`` returning a
    ``ShardPlacementResult``, torch >= 2.11): FSDP2 then keeps two parameter groups in the module, whose singular
    accessor the rule used to read (an AssertionError from torch's internals). The same layout: two steps give
    the parameters of the one-mesh model, bit for bit. None where torch has no per-parameter mesh."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, ShardPlacementResult
    except ImportError:
        return None
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from gxpo_kernels.integrations import fsdp as gf
    other = FSDPMeshInfo(DeviceMesh.from_group(dist.new_group(list(range(WORLD))), "cpu"), shard_mesh_dim=0)
    model = Net()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)),
                shard_placement_fn=lambda p: ShardPlacementResult(Shard(0), other) if p.ndim == 1 else None)
    opt = make_optimizer(model, {})
    rule = gf.wrap(model, opt, gate=None)
    for step in range(2):
        rule.step(fsdp_closure(model, opt, rule, step, {}))
    one_mesh = train({"rule": {"gate": None}}, steps=2)[0]
    return all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), one_mesh.parameters()))


def checkpoint_of_other_settings():
    """load_checkpoint into a rule built with another K: ValueError, and the model, the optimizer (no state) and
    the rule (no steps) as they were built."""
    from gxpo_kernels.integrations import fsdp as gf
    with _dcp_folder() as path:
        model, opt, rule, _ = train({"rule": {"gate": None}}, steps=1)
        gf.save_checkpoint(path, model, opt, rule)
        m = sharded({})
        opt = make_optimizer(m, {})
        rule = gf.wrap(m, opt, K=3, gate=None)
        before, rule_before = [full(p) for p in m.parameters()], rule.state_dict()
        try:
            gf.load_checkpoint(path, m, opt, rule)
            err = None
        except ValueError as e:
            err = str(e)
    out = {"load_other_K": err, "load_other_K_unchanged": all(torch.equal(a, full(p)) for a, p in zip(
        before, m.parameters())) and not opt.state and rule.state_dict() == rule_before}
    # a checkpoint of an older version (its rule state without the rule's name and the model signature) loads
    with _dcp_folder() as path:
        model, opt, rule, _ = train({"rule": {"gate": None}}, steps=1)
        sd = rule.state_dict()
        rule.state_dict = lambda: {k: v for k, v in sd.items() if k not in ("rule", "optimizer", "params")}
        gf.save_checkpoint(path, model, opt, rule)
        m = sharded({})
        opt = make_optimizer(m, {})
        fresh = gf.wrap(m, opt, gate=None)
        gf.load_checkpoint(path, m, opt, fresh)
        out["old_format_loads"] = fresh.state_dict() == sd and all(
            torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), m.parameters()))
    with _dcp_folder() as path:
        model, opt, rule, _ = train({"rule": {"gate": None}}, steps=1)
        gf.save_checkpoint(path, model, opt, rule)
        m = sharded({})
        opt = make_optimizer(m, {})
        short = gf.wrap(m, opt, gate=None)
        short.optimizer.param_groups[0]["params"][0].requires_grad_(False)   # one trainable tensor fewer
        try:
            gf.load_checkpoint(path, m, opt, short)
            out["other_params"] = None
        except ValueError as e:
            out["other_params"] = str(e)
    return out


def entropy_on_one_rank():
    """The entropy gate with an entropy passed on rank 0 only: ValueError on every rank (the step rewound), then
    the same step with an entropy on every rank runs. The mesh's group times out after 60 s: a rank that skips
    the entropy's all-reduce fails the spawn instead of hanging it."""
    import datetime

    from torch.distributed.device_mesh import DeviceMesh

    from gxpo_kernels.integrations import fsdp as gf
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=60))
    model = sharded({}, mesh=DeviceMesh.from_group(group, "cpu"))
    opt = make_optimizer(model, {})
    rule = gf.wrap(model, opt, gate="entropy", window=2)
    before = [full(p) for p in model.parameters()]
    closure = fsdp_closure(model, opt, rule, 0, {})
    try:
        rule.step(closure, entropy=1.0 if dist.get_rank() == 0 else None)
        err = None
    except ValueError as e:
        err = str(e)
    rewound = all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters())) and not opt.state
    info = rule.step(closure, entropy=1.0 + dist.get_rank())
    return {"entropy_one_rank": err, "entropy_one_rank_rewound": rewound and rule.outer_steps == 1,
            "entropy_then_all": (info["active"], info["backward_passes"], rule.gate.state_dict())}


def worker(rank, port, outdir, cases):
    DW.rank_env(rank, port)
    recs = {}
    for name, case in cases.items():
        kind = case.get("kind", "fsdp")
        if kind == "fsdp":
            recs[name] = run_case(case)
        elif kind == "resume":
            recs[name] = run_resume(case, case["k"])
        elif kind == "deepspeed":
            recs[name] = run_deepspeed_z3(case)
    recs["_refusals"] = refusals()
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---- the single-process reference --------------------------------------------------------------------------
def single_process_reference(case):
    """The plain-PyTorch GXPO/SFPO on the whole mini-batch (mixed precision: fp32 master + a bf16 model copy)."""
    case = dict(case)                              # _maybe_raise marks it
    for key in ("raise_before_backward", "raise_between_micro"):   # one process: where it raises does not matter
        if key in case:
            case["raise_at"] = case.pop(key)
    model = Net()
    opt = make_optimizer(model, case)
    rule, fwd = _reference_rule(model, opt, case)
    dtype = torch.float32 if fwd is model else torch.bfloat16
    infos = []
    for step in range(case.get("steps", 3)):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            fwd.zero_grad(set_to_none=True)
            tot = 0.0
            for r in range(WORLD):                 # FSDP averages the ranks' gradients of their half-batch means
                lo, hi = r * ROWS // WORLD, (r + 1) * ROWS // WORLD
                fwd.skip_gain = bool(case.get("unused_on_rank0")) and r == 0
                mid = (lo + hi) // 2             # micro-batches: each bf16 grad accumulated in fp32 (reduce_dtype)
                for a, z, div in ((lo, mid, 2), (mid, hi, 2)) if case.get("micro") else ((lo, hi, 1),):
                    loss = mse(fwd, X[step, a:z], Y[step, a:z], dtype)
                    (loss / (WORLD * div)).backward()
                    tot += float(loss.detach()) / (WORLD * div)
                    if fwd is not model:           # each rank's bf16 grad, reduced in fp32
                        for m, p in zip(model.parameters(), fwd.parameters()):
                            if p.grad is not None:
                                m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
                            p.grad = None
            if (step, rule.pass_index) == case.get("nan"):
                model.l1.weight.grad[NAN_GLOBAL] = math.nan
            _maybe_raise(case, step, rule.pass_index)
            return tot
        ent = None if "entropy" not in case else sum(case["entropy"][step]) / WORLD
        infos.append(_step(rule, closure, ent, step in case.get("force_plain", ())))
    ps = list(model.parameters())
    return {"params": [p.detach().clone() for p in ps], "exp_avg": [opt.state[p]["exp_avg"].clone() for p in ps],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in ps],
            "step": [float(opt.state[p]["step"]) for p in ps], "infos": infos,
            "fired_step": rule.gate.fired_step, "fallbacks": rule.fallbacks, "rule_state": rule.state_dict()}


# ---- three ranks: a tied-embedding LM with a frozen layer, rows that do not split evenly --------------------
V3, D3, T3, ROWS3 = 11, 5, 4, 6
IDS3 = torch.randint(0, V3, (4, ROWS3, T3 + 1), generator=torch.Generator().manual_seed(7))


class TiedLM(torch.nn.Module):
    """Embedding(11, 5) tied to the head, two residual Linear(5, 5) blocks, a frozen Linear(5, 5), a (1,) gain and
    a (2, 5) bias table. On 3 ranks dim 0 splits as 4/4/3, 2/2/1, 1/0/0 (the gain) and 1/1/0 (the table)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V3, D3)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(D3, D3) for _ in range(2)])
        self.frozen = torch.nn.Linear(D3, D3).requires_grad_(False)
        self.gain = torch.nn.Parameter(1 + 0.1 * torch.randn(1))
        self.table = torch.nn.Parameter(0.1 * torch.randn(2, D3))
        self.head = torch.nn.Linear(D3, V3, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(self.frozen(h) * self.gain + self.table.sum(0))


def lm_loss(model, ids):
    logits = model(ids[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V3), ids[:, 1:].reshape(-1))


def _lm_optimizer(model, case):
    params = list(model.parameters()) if case.get("frozen_in_optimizer") else \
        [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.01)


def _lm_rule(model, opt, case):
    from gxpo_kernels.integrations import fsdp as gf
    return gf.wrap(model, opt, case.get("algo", "gxpo"), **case["rule"])


def sharded_lm(case, world):
    """``fully_shard`` per block and on the frozen layer, then the root (``root_only``: the root alone)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model = TiedLM()
    kw = {"mesh": init_device_mesh("cpu", (world,))}
    if case.get("mp"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if not case.get("root_only"):
        for m in [*model.layers, model.frozen]:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def train_lm(case, world, steps, objs=None, start=0):
    rank = dist.get_rank()
    if objs is None:
        model = sharded_lm(case, world)
        opt = _lm_optimizer(model, case)
        objs = (model, opt, _lm_rule(model, opt, case))
    model, opt, rule = objs
    lo, hi = rank * ROWS3 // world, (rank + 1) * ROWS3 // world
    infos = []
    for step in range(start, steps):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(model, IDS3[step, lo:hi])
            loss.backward()
            return loss
        infos.append(_info(rule.step(closure)))
    return objs, infos


def lm_record(objs, infos):
    model, opt, rule = objs
    return {"params": {n: full(p) for n, p in model.named_parameters()}, "infos": infos,
            "fired_step": rule.gate.fired_step, "rule_state": rule.state_dict(),
            "exp_avg_sq": {n: full(opt.state[p]["exp_avg_sq"])
                           for n, p in model.named_parameters() if p in opt.state},
            "local_numel": [p.to_local().numel() for p in model.parameters()]}


def worker_lm(rank, world, port, outdir, cases):
    """``world`` gloo ranks without DeepSpeed; ``kind="resume"``: k steps, save_checkpoint, fresh objects,
    load_checkpoint, the rest; also the uninterrupted run."""
    from gxpo_kernels.integrations import fsdp as gf
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    recs = {}
    for name, case in cases.items():
        steps = case.get("steps", 3)
        recs[name] = lm_record(*train_lm(case, world, steps))
        if case.get("kind") == "resume":
            with _dcp_folder() as path:
                objs, infos = train_lm(case, world, case["k"])
                gf.save_checkpoint(path, *objs)
                model = sharded_lm(case, world)
                opt = _lm_optimizer(model, case)
                objs = (model, opt, _lm_rule(model, opt, case))
                gf.load_checkpoint(path, *objs)
            objs, more = train_lm(case, world, steps, objs=objs, start=case["k"])
            recs[name + "/resumed"] = lm_record(objs, infos + more)
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _reference_rule(model, opt, case):
    """(rule, fwd) of a single-process reference run: GXPO or SFPO over ``opt``; with ``case["mp"]`` the forward
    runs a bf16 copy ``fwd`` whose gradients the caller moves to the fp32 ``model`` (a master-weights rule)."""
    from gxpo_kernels.update import GXPO, SFPO
    cls = GXPO if case.get("algo", "gxpo") == "gxpo" else SFPO
    fwd = model
    if case.get("mp"):
        fwd = copy.deepcopy(model).to(torch.bfloat16)
        cls = DW._master_rule(cls, fwd, list(model.parameters()))
    return cls(opt, **case.get("rule", {})), fwd


def lm_reference(case, world):
    """The plain rule on the whole mini-batch: the mean of the ranks' losses (mixed precision: a bf16 copy whose
    per-rank gradients are summed in fp32, then divided by the world size, as FSDP's fp32 reduce does)."""
    model = TiedLM()
    opt = _lm_optimizer(model, case)
    rule, fwd = _reference_rule(model, opt, case)
    infos = []
    for step in range(case.get("steps", 3)):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            fwd.zero_grad(set_to_none=True)
            total = 0.0
            for r in range(world):
                lo, hi = r * ROWS3 // world, (r + 1) * ROWS3 // world
                loss = lm_loss(fwd, IDS3[step, lo:hi])
                (loss / world if fwd is model else loss).backward()
                total += float(loss.detach()) / world
                if fwd is not model:               # this rank's bf16 gradient, summed in fp32
                    for m, p in zip(model.parameters(), fwd.parameters()):
                        if p.grad is not None:
                            m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
                        p.grad = None
            if fwd is not model:
                for m in model.parameters():
                    if m.grad is not None:
                        m.grad /= world
            return total
        infos.append(rule.step(closure))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "infos": infos,
            "fired_step": rule.gate.fired_step, "rule_state": rule.state_dict(),
            "exp_avg_sq": {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters() if p in opt.state}}


# ---- refusals that depend on one rank's own tensors -----------------------------------------------------------
def worker_one_rank_refusals(rank, port, outdir):
    """Checks that fail on rank 0 only, each in its own step: a frozen parameter that holds a .grad on rank 0
    (GXPO), an entropy that is no number on rank 0 (GXPO, entropy gate), an SFPO slow-pass closure that returns no
    entropy on rank 0, an entropy that is no number on rank 0 with SFPO and gate=None (the entropy is only
    reported), force_plain=True on rank 0 only. Every rank must raise (gloo times out after 20 s where one waits
    in a collective instead) and rewind; then one normal step on every rank shows the ranks are still
    paired. Records, per probe, the error (type, message) and whether the gathered parameters are those the step
    began with."""
    import datetime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    from gxpo_kernels.integrations import fsdp as gf
    model = sharded({})
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    frozen = model.l2.bias

    def full():
        return [p.full_tensor().clone() for p in model.parameters()]

    def closure_at(step, slow_entropy=False):
        inner = fsdp_closure(model, opt, rule, step, {})

        def closure():
            loss = inner()
            if rank == 0 and frozen.grad is None and not frozen.requires_grad:
                frozen.grad = torch.zeros_like(frozen)     # a stale grad of a frozen parameter, on rank 0 only
            return (loss, 1.0) if slow_entropy and rank else loss   # SFPO's (loss, entropy) on rank 1 only
        return closure

    rec = {}

    def probe(name, fn):
        before = full()
        try:
            fn()
            rec[name] = (None, None)
        except Exception as e:   # noqa: BLE001 - recorded for the parent
            rec[name] = (type(e).__name__, str(e))
        rec[name + "_rewound"] = all(torch.equal(a, b) for a, b in zip(before, full()))

    frozen.requires_grad_(False)
    rule = gf.wrap(model, opt, gate=None)
    probe("frozen_grad", lambda: rule.step(closure_at(0)))
    frozen.requires_grad_(True)
    frozen.grad = None
    rule = gf.wrap(model, opt, gate="entropy", window=2)
    probe("entropy", lambda: rule.step(closure_at(0), entropy=1.0 if rank else torch.ones(2)))
    rule = gf.wrap(model, opt, algo="sfpo", K=2, gate="entropy", window=2, entropy_signal="slow_pass")
    probe("sfpo_slow_entropy", lambda: rule.step(closure_at(0, slow_entropy=True)))
    rule = gf.wrap(model, opt, algo="sfpo", K=2, gate=None)   # the entropy is only reported
    probe("sfpo_entropy_reported", lambda: rule.step(closure_at(0), entropy=1.0 if rank else torch.ones(2)))
    rule = gf.wrap(model, opt, gate=None)
    probe("force_plain", lambda: rule.step(closure_at(0), force_plain=rank == 0))
    rec["after"] = rule.step(closure_at(1))["active"]
    rec["params_after"] = full()
    torch.save(rec, os.path.join(outdir, f"refusals{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
