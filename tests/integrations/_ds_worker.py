"""Rank-side code of tests/integrations/test_deepspeed.py (spawned with torch.multiprocessing, gloo, CPU).

Each rank builds the same tiny model, trains it with the DeepSpeed GXPO/SFPO rule on its half of every
mini-batch, gathers full fp32 parameters / optimizer state with DeepSpeed's ``safe_get_full_*`` and saves
what the parent compares against the single-process rules (``single_process_reference`` below).
"""
import math
import os
import warnings

import torch

from tests._utils import count_plan_builds

WORLD = 2
LR = 1e-2
ROWS = 8                      # rows per mini-batch (each rank takes ROWS / WORLD)
_G = torch.Generator().manual_seed(4321)
X = torch.randn(6, ROWS, 7, generator=_G)
Y = torch.randn(6, ROWS, 3, generator=_G)


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


class ScaledMLP(torch.nn.Sequential):
    """The MLP times a 1-element parameter ``s`` (a param group of one element is smaller than one shard)."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        self.s = torch.nn.Parameter(torch.full((1,), 1.25))

    def forward(self, x):
        return super().forward(x) * self.s


class ScaleOnly(torch.nn.Sequential):
    """A model of one trainable element: every rank after the first holds only ZeRO's padding."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.full((1,), 0.7))

    def forward(self, x):
        return torch.tanh(x[:, :3]) * self.s


V, P, K = 97, 4, 6
_GL = torch.Generator().manual_seed(99)
IDS = torch.randint(0, V, (6, ROWS, P + K), generator=_GL)
AM = torch.ones(6, ROWS, P + K, dtype=torch.long)
AM[:, 0, :2] = 0                                  # a left-padded prompt
CM = AM[:, :, P:].clone()
CM[:, 1, K - 2:] = 0                              # a short completion
ADV = torch.randn(6, ROWS, generator=_GL)


def make_lm(fused, seed=0):
    import transformers
    from gxpo_kernels.integrations.deepspeed import CausalLMGRPOLoss
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, tie_word_embeddings=False)
    lm = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    return CausalLMGRPOLoss(lm, fused_linear=fused, backend="torch")


def make_model(case):
    if "lm" in case:
        return make_lm(case["lm"] == "fused")
    if case.get("model") == "scale_only":
        return ScaleOnly()
    model = ScaledMLP() if case.get("groups") == "scalar" else make_mlp()
    if case.get("frozen"):                        # a frozen first layer: DeepSpeed leaves it out of the shards
        model[0].requires_grad_(False)
    return model


def batch_loss(model, step, lo, hi):
    """Loss of rows [lo, hi) of mini-batch ``step``."""
    if isinstance(getattr(model, "module", model), torch.nn.Sequential):
        return mse(model, X[step, lo:hi], Y[step, lo:hi])
    return model(IDS[step, lo:hi], AM[step, lo:hi], ADV[step, lo:hi], CM[step, lo:hi], K)


def mse(model, x, y):
    dt = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    return ((model(x.to(dt)).float() - y) ** 2).mean()


def rank_env(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import logging

    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    # DeepSpeed's optional CPU shared-memory all-reduce costs a ~2 min JIT build; gloo is all the tests need
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.ERROR)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def make_optimizer(model, case):
    """AdamW; ``groups=True``: two param groups (no weight decay on biases) -> one shard per group;
    ``groups="scalar"`` (ScaledMLP): the 1-element ``s`` alone in the second group."""
    if not case.get("groups"):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    named = list(model.named_parameters())
    if case["groups"] == "scalar":
        return torch.optim.AdamW([{"params": [p for n, p in named if n != "s"], "weight_decay": 0.01},
                                  {"params": [model.s], "weight_decay": 0.0, "lr": 3 * LR}], lr=LR)
    return torch.optim.AdamW([{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.01},
                              {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}], lr=LR)


def ds_config(stage, *, dtype="fp32", gas=1, offload=False, bf16_optimizer=False, clip=1.0, sub_group=None,
              zero=None):
    """``zero``: extra ``zero_optimization`` entries."""
    cfg = {"train_micro_batch_size_per_gpu": ROWS // WORLD // gas, "gradient_accumulation_steps": gas,
           "gradient_clipping": clip, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}, "wall_clock_breakdown": False}
    if dtype == "bf16":                         # fp32 all-reduce: the reference sums bf16 grads in fp32
        cfg["bf16"] = {"enabled": True}
        cfg["communication_data_type"] = "fp32"
        if bf16_optimizer:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if dtype == "fp16":                         # dynamic loss scaling; the scale doubles after 2 clean updates
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1}
        cfg["communication_data_type"] = "fp32"
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if stage == 3:
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0)
        if sub_group:
            cfg["zero_optimization"]["sub_group_size"] = sub_group
    cfg["zero_optimization"].update(zero or {})
    return cfg


LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Injected(RuntimeError):
    pass


def _maybe_raise(case, step, pass_index, after):
    """Raise once (on every rank) at case["raise_at"] = (step, pass[, micro-batches done]): by default after the
    pass's last backward; the rule must rewind the whole step, ZeRO's gradient buffers included."""
    at = case.get("raise_at")
    if at is None or (step, pass_index) != tuple(at[:2]) or after != (at[2] if len(at) > 2 else None):
        return
    if step not in case.setdefault("_raised", set()):
        case["_raised"].add(step)
        raise Injected(f"injected at step {step}, pass {pass_index}")


def _closure(engine, rule, step, *, gas, nan_rank=None, nan_pass=None, nan_step=None, case=None):
    rank = torch.distributed.get_rank()
    lo = rank * ROWS // WORLD
    mb = ROWS // WORLD // gas
    case = {} if case is None else case

    def closure():
        tot = 0.0
        for j in range(gas):
            _maybe_raise(case, step, rule.pass_index, j)
            loss = batch_loss(engine, step, lo + j * mb, lo + (j + 1) * mb)
            if rank == nan_rank and step == nan_step and rule.pass_index == nan_pass:
                loss = loss * math.nan
            if step == case.get("zero_step"):          # a zero gradient: GXPO's small-g0 fallback
                loss = loss * 0.0
            scaler = getattr(engine.optimizer, "loss_scaler", None)
            if scaler is not None and scaler.dynamic:  # the loss scale each pass's backward uses
                case.setdefault("_scales", []).append((step, rule.pass_index, float(scaler.cur_scale)))
            engine.backward(loss)
            tot += float(loss.detach())
        _maybe_raise(case, step, rule.pass_index, None)
        return tot / gas
    return closure


def _step(rule, closure, entropy, engine=None, case=None):
    """rule.step; an injected exception is retried once (the rule rewound the step). With ``engine`` and
    ``case``, what the module's weights are between the two: under ZeRO-1/2 a forward and state_dict() refuse the
    stale weights until rule.sync_weights(), after which they equal the rewound master (case["_stale_checks"])."""
    try:
        return rule.step(closure, entropy=entropy)
    except Injected:
        if engine is not None:
            errors = []
            for read in (lambda: batch_loss(engine, 0, 0, 1), engine.module.state_dict):
                try:
                    read()
                    errors.append(None)
                except RuntimeError as e:
                    errors.append(str(e))
            rule.sync_weights()
            master = gather_full(engine, rule)["params"]
            diff = max(float((lp - m.to(LOWP.get(case.get("dtype"), torch.float32)).float()).abs().max())
                       for lp, m in zip(lowp_full(engine), master))
            batch_loss(engine, 0, 0, 1)                # reads the synced weights
            case.setdefault("_stale_checks", []).append({"errors": errors, "diff": diff})
        return rule.step(closure, entropy=entropy)


def gather_full(engine, rule):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    out = {"params": [], "exp_avg": [], "exp_avg_sq": []}
    for p in engine.module.parameters():
        if not p.requires_grad:                  # frozen: no master copy, no optimizer state
            continue
        out["params"].append(safe_get_full_fp32_param(p).detach().clone().float())
        out["exp_avg"].append(safe_get_full_optimizer_state(p, "exp_avg").detach().clone().float())
        out["exp_avg_sq"].append(safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone().float())
    out["step"] = [float(rule.optimizer.state[s]["step"]) for s in rule.zero.shards()]
    return out


def lowp_full(engine):
    """The low-precision model weights as the next forward sees them (Z3: gathered)."""
    import deepspeed
    ps = [p for p in engine.module.parameters() if p.requires_grad]
    if hasattr(ps[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
            return [p.detach().clone().float() for p in ps]
    return [p.detach().clone().float() for p in ps]


def run_case(case):
    """Train one configuration; returns the rank's record."""
    from gxpo_kernels.integrations import deepspeed as gds
    from gxpo_kernels.ops.extrapolate import _cpp
    model = make_model(case)
    if case.get("dtype") in ("bf16", "fp16"):
        model = model.to(LOWP[case["dtype"]])
    if case.get("dtype") == "fp16":             # DeepSpeed's CPU accelerator refuses fp16; torch's CPU ops run it
        from deepspeed.accelerator import get_accelerator
        type(get_accelerator()).is_fp16_supported = lambda self: True
    opt = make_optimizer(model, case)
    sched = None
    if case.get("sched"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k))
    cfg = ds_config(case["stage"], dtype=case.get("dtype", "fp32"), gas=case.get("gas", 1),
                    offload=case.get("offload", False), bf16_optimizer=case.get("bf16_optimizer", False),
                    sub_group=case.get("sub_group"), zero=case.get("zero"))
    kw = {case.get("algo", "gxpo"): dict(case.get("rule", {}))}
    engine, rule = gds.initialize(model=model, config=cfg, optimizer=opt, lr_scheduler=sched, **kw)
    calls = []
    orig = _cpp.extrapolate_cpp_

    def spy(params, theta0, g0, g1, lowp, thr, **k):
        from gxpo_kernels.ops.extrapolate.op import extrapolate_
        clones = [p.clone() for p in params]
        out = orig(params, theta0, g0, g1, lowp, thr, **k)
        ref = extrapolate_(clones, theta0, g0, g1, backend="torch", **k)   # the PyTorch reference, same inputs
        calls.append({"numel": sum(p.numel() for p in params), "ok": out is not None,
                      "stats": None if out is None else out.tolist(), "ref_stats": ref.tolist(),
                      "params_err": max((float((a - b).abs().max()) for a, b in zip(params, clones) if a.numel()),
                                           default=0.0)})
        return out
    _cpp.extrapolate_cpp_ = spy
    infos = []
    try:
        # caught: e.g. torch's LR scheduler on a wrapped step; builds: of the rule's prepared extrapolation
        with warnings.catch_warnings(record=True) as caught, count_plan_builds() as builds:
            warnings.simplefilter("always")
            for step in range(case.get("steps", 3)):
                ent = case["entropy"][step][torch.distributed.get_rank()] if "entropy" in case else None
                info = _step(rule, _closure(engine, rule, step, gas=case.get("gas", 1),
                                            nan_rank=case.get("nan_rank"), nan_pass=case.get("nan_pass"),
                                            nan_step=case.get("nan_step"), case=case), ent, engine, case)
                infos.append({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))})
    finally:
        _cpp.extrapolate_cpp_ = orig
    rec = gather_full(engine, rule)
    rec.update(infos=infos, cpp_calls=calls, plan_builds=builds[0], kind=rule.zero.kind, lowp=lowp_full(engine),
               shard_numel=sum(s.numel() for s in rule.zero.shards()), n_shards=len(rule.zero.shards()),
               valid_numel=sum(n for runs in rule.zero.valid_segments() for _, n in runs),
               n_runs=sum(len(runs) for runs in rule.zero.valid_segments()),
               shard_device=str(rule.zero.shards()[0].device), global_steps=engine.global_steps,
               lr=[g["lr"] for g in rule.optimizer.param_groups], fired_step=rule.gate.fired_step,
               fallbacks=rule.fallbacks,
               total_numel=sum(p.numel() for p in make_model(case).parameters() if p.requires_grad),
               loss_scales=case.get("_scales"), skipped_steps=engine.skipped_steps,
               stale_checks=case.get("_stale_checks"),
               sched_warnings=[str(w.message) for w in caught if "learning rate scheduler" in str(w.message)])
    return rec


def refused(case):
    """Build an engine the rule must refuse; returns the error message."""
    import deepspeed
    from gxpo_kernels.integrations import deepspeed as gds
    model = make_mlp()
    cfg = ds_config(case["stage"])
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    try:
        gds.wrap(engine, **case.get("rule", {}))
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def clip_roundtrip(case):
    """wrap(max_grad_norm=...) sets the engine's gradient clipping, detach() restores it, and a wrap whose rule
    is refused leaves it untouched; returns the engine's clip_grad after each."""
    import deepspeed
    from gxpo_kernels.integrations import deepspeed as gds
    model = make_mlp()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(case["stage"], clip=1.0),
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    seen = [engine.optimizer.clip_grad]
    rule = gds.wrap(engine, max_grad_norm=3.0)
    seen.append(engine.optimizer.clip_grad)
    rule.detach()
    seen.append(engine.optimizer.clip_grad)
    try:
        gds.wrap(engine, max_grad_norm=2.0, K=0)
    except ValueError:
        seen.append(engine.optimizer.clip_grad)
    return seen


def broken_accumulation(case):
    """A closure that raises between two engine.backward calls of a pass (gradient accumulation): DeepSpeed's
    partial accumulation cannot be rewound, so the next step must refuse, saying why; returns its message."""
    from gxpo_kernels.integrations import deepspeed as gds
    model = make_mlp()
    engine, rule = gds.initialize(model=model, config=ds_config(case["stage"], gas=case["gas"]),
                                  optimizer=make_optimizer(model, case), gxpo=dict(case.get("rule", {})))
    case = dict(case)
    try:
        rule.step(_closure(engine, rule, 0, gas=case["gas"], case=case))
    except Injected:
        pass
    try:
        rule.step(_closure(engine, rule, 0, gas=case["gas"]))
    except RuntimeError as e:
        return str(e)
    return None


def min_scale_overflow(case):
    """fp16 at its minimum loss scale: an overflow in pass 1 makes DeepSpeed's scaler raise, mid-step as in plain
    DeepSpeed, and the rule rewinds the step. Returns the message, whether the master, global_steps and the scaler
    are as before the step, and whether the rule's hold on the scaler is gone."""
    from deepspeed.accelerator import get_accelerator
    from gxpo_kernels.integrations import deepspeed as gds
    type(get_accelerator()).is_fp16_supported = lambda self: True   # as run_case does for fp16
    model = make_mlp().to(torch.float16)
    cfg = ds_config(case["stage"], dtype="fp16")
    cfg["fp16"]["min_loss_scale"] = 2 ** cfg["fp16"]["initial_scale_power"]
    engine, rule = gds.initialize(model=model, config=cfg, optimizer=make_optimizer(model, case), gxpo=dict(gate=None))
    rule.step(_closure(engine, rule, 0, gas=1))
    scaler = engine.optimizer.loss_scaler

    def state():
        return (gather_full(engine, rule)["params"], engine.global_steps,
                {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float))})
    before = state()
    try:
        rule.step(_closure(engine, rule, 1, gas=1, nan_rank=1, nan_pass=1, nan_step=1))
        msg = None
    except Exception as e:
        msg = str(e)
    after = state()
    same = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1:] == after[1:]
    return dict(msg=msg, unchanged=same, held="update_scale" in vars(scaler))


def worker(rank, port, outdir, cases):
    rank_env(rank, port)
    recs = {}
    for name, case in cases.items():
        if case.get("refused"):
            recs[name] = refused(case)
        elif case.get("clip_roundtrip"):
            recs[name] = clip_roundtrip(case)
        elif case.get("broken"):
            recs[name] = broken_accumulation(case)
        elif case.get("min_scale"):
            recs[name] = min_scale_overflow(case)
        else:
            recs[name] = run_case(case)
    # a local non-finite count on one rank only must reach every rank through the rule's reduction
    recs["_allreduce"] = _allreduce_probe()
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    # explicit teardown: a process group left to interpreter exit can abort a rank (gloo threads alive
    # during static destruction: "terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def one_rank_raises(rank, port, stage, q):
    """Rank 1's closure raises before its forward in pass 1 of an active step (a loss that fails on one rank's
    data); the exception ends the process, as in a training script. Puts (rank, "Type: message") on ``q``."""
    rank_env(rank, port)
    from gxpo_kernels.integrations import deepspeed as gds
    model = make_mlp()
    engine, rule = gds.initialize(model=model, config=ds_config(stage), optimizer=make_optimizer(model, {}),
                                  gxpo=dict(gate=None, backend="torch"))   # (no C++ op build: seconds count)

    def closure():
        if rank == 1 and rule.pass_index == 1:
            raise Injected("the loss failed on rank 1")
        loss = batch_loss(engine, 0, rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        engine.backward(loss)
        return float(loss)
    try:
        rule.step(closure)
        q.put((rank, None))
    except Exception as e:
        q.put((rank, f"{type(e).__name__}: {e}"))
        raise


def one_rank_raises_main(stage: int, timeout: float) -> None:
    """Run ``one_rank_raises`` on 2 fresh processes; print JSON: exit codes (None: still running at ``timeout``
    seconds, then killed), each rank's error and the seconds until the last rank ended."""
    import json
    import time

    import torch.multiprocessing as mp

    from tests._utils import free_port
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=one_rank_raises, args=(r, port, stage, q)) for r in range(WORLD)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.1, timeout - (time.monotonic() - t0)))
    wall = time.monotonic() - t0
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {}
    while not q.empty():
        r, err = q.get()
        errors[r] = err
    print(json.dumps({"exitcodes": codes, "errors": errors, "seconds": wall}))


def _allreduce_probe():
    from gxpo_kernels.integrations.deepspeed._rule import _DeepSpeedRule

    class _Z:
        dp_group = None
    r = _DeepSpeedRule.__new__(_DeepSpeedRule)
    r.zero = _Z()
    rank = torch.distributed.get_rank()
    st = torch.tensor([1.0 + rank, float(rank == 1), 2.0 + 3 * rank], dtype=torch.float64)
    return r._all_reduce_(st).tolist()


# ---- the single-process reference --------------------------------------------------------------------------
def single_process_reference(case):
    """The plain-PyTorch GXPO/SFPO on the full mini-batch (bf16, fp16: fp32 master weights + a low-precision model
    copy; fp16's loss scale is a power of two, exact on gradients that neither overflow nor go subnormal)."""
    from gxpo_kernels.update import GXPO, SFPO
    lowp = LOWP.get(case.get("dtype"))
    bf16 = lowp is not None
    model = make_model(case)
    lowp_model = None
    if bf16:                                    # DeepSpeed's fp32 master starts from the bf16 weights
        import copy
        lowp_model = copy.deepcopy(model).to(lowp)
        model = model.to(lowp).float()
    master = [p for p in model.parameters()]
    opt = make_optimizer(model, case)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k)) if case.get("sched") else None
    algo = case.get("algo", "gxpo")
    cls = GXPO if algo == "gxpo" else SFPO
    kw = dict(case.get("rule", {}))
    if bf16:
        cls = _master_rule(cls, lowp_model, list(model.parameters()))
    rule = cls(opt, **kw)
    gas = case.get("gas", 1)
    infos = []
    case = dict(case)                              # _maybe_raise marks it
    for step in range(case.get("steps", 3)):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            fwd = lowp_model if bf16 else model
            fwd.zero_grad(set_to_none=True)
            tot = 0.0
            for r in range(WORLD):              # the same micro-batch split as the ranks: equal-size means
                lo, mb = r * ROWS // WORLD, ROWS // WORLD // gas
                for j in range(gas):
                    loss = batch_loss(fwd, step, lo + j * mb, lo + (j + 1) * mb)
                    if r == case.get("nan_rank") and step == case.get("nan_step") and \
                            rule.pass_index == case.get("nan_pass"):
                        loss = loss * math.nan
                    if step == case.get("zero_step"):
                        loss = loss * 0.0
                    (loss / (WORLD * gas)).backward()
                    tot += float(loss.detach()) / (WORLD * gas)
                    if bf16:                    # fp32 accumulation of each micro-batch's bf16 gradient
                        for m, p in zip(master, lowp_model.parameters()):
                            if p.grad is not None:      # (None: frozen)
                                m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
                                p.grad = None
            if bf16 and not case.get("bf16_optimizer"):   # ZeRO keeps the reduced grad in the model dtype
                for m in master:
                    if m.grad is not None:
                        m.grad = m.grad.to(lowp).float()
            _maybe_raise(case, step, rule.pass_index, None)
            return tot
        ent = None
        if "entropy" in case:
            ent = sum(case["entropy"][step]) / WORLD
        infos.append(_step(rule, closure, ent))
        if sched is not None:
            sched.step()
    master = [p for p in model.parameters() if p.requires_grad]   # module order, as safe_get_full_* reads them
    return {"params": [p.detach().clone() for p in master],
            "exp_avg": [opt.state[p]["exp_avg"].clone() for p in master],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in master],
            "step": sorted({float(opt.state[p]["step"]) for p in master}), "infos": infos,
            "fired_step": rule.gate.fired_step, "fallbacks": rule.fallbacks, "lr": [g["lr"] for g in opt.param_groups]}


def _master_rule(cls, lowp_model, master):
    """fp32 master params driving a bf16 model copy: grads come in from the closure, weights go out after
    every change of the master (what DeepSpeed's bf16 modes do, without sharding)."""

    class Master(cls):
        def _sync(self):
            with torch.no_grad():
                for m, p in zip(master, lowp_model.parameters()):
                    p.copy_(m)

        def _optimizer_step(self):
            super()._optimizer_step()
            self._sync()

        def _restore_params_(self):
            super()._restore_params_()
            self._sync()

        def _extrapolate(self, *a, **k):
            out = super()._extrapolate(*a, **k)
            self._sync()
            return out
    return Master
