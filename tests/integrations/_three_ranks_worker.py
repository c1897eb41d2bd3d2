"""Rank-side code of tests/integrations/test_three_ranks.py: GXPO / SFPO on DeepSpeed ZeRO 1/2/3 and FSDP2 over
THREE gloo ranks (CPU), on a model whose shards come out uneven or empty, against the single-process rule.

``OddNet``: Linear(5, 7) -> tanh -> frozen Linear(7, 4) -> tanh -> Linear(4, 2) -> RMSNorm(2) -> Linear(2, 1) -> * s.
Trainable: 35 + 7 (not divisible by 3), then past the frozen layer 8 + 2, a 2-element norm, 2 + a 1-element bias
and a 1-element scale (smaller than the world). FSDP2 splits dim 0 as 3/3/1 (l1), 1/1/0 (l3, norm), 1/0/0 (l4, s):
ranks 1 and 2 hold empty shards. ZeRO-3 pads each parameter to a multiple of 3 (``s``: ranks 1, 2 padding only);
ZeRO 1/2 cut each param group's flat buffer in three (the group of ``s`` alone: padding on ranks 1, 2). Three param
groups with their own lr and weight decay; the frozen layer sits in the first group.

Every rank records the full fp32 parameters after EVERY outer step and the step's diagnostics; the parent compares
them with ``reference`` (the plain rule on the whole mini-batch, the ranks' gradients summed in the same order).
"""
import math
import os
import warnings

import torch
import torch.distributed as dist

from tests.integrations import _ds_worker as DW

WORLD = 3
LR = 1e-2
ROWS = 12                    # rows per mini-batch: 4 per rank, 2 per micro-batch with gradient accumulation 2
STEPS = 4
_G = torch.Generator().manual_seed(2027)
X = torch.randn(STEPS, ROWS, 5, generator=_G)
Y = torch.randn(STEPS, ROWS, 1, generator=_G)
NAN_RANK = 2                 # the rank whose own gradient (shard) gets the NaN
NAN_GLOBAL = (6, 0)          # FSDP: l1.weight row 6 is rank 2's only row (rows split 3/3/1)


class OddNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(5, 7)
        self.frozen = torch.nn.Linear(7, 4).requires_grad_(False)
        self.l3 = torch.nn.Linear(4, 2)
        self.norm = torch.nn.RMSNorm(2, eps=1e-5)
        self.l4 = torch.nn.Linear(2, 1)
        self.s = torch.nn.Parameter(torch.full((1,), 1.25))
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor([0.9, 1.1]))

    def forward(self, x):
        h = torch.tanh(self.frozen(torch.tanh(self.l1(x))))
        return self.l4(self.norm(self.l3(h))) * self.s


def make_optimizer(model, case):
    """Weights (and the frozen layer) at LR with weight decay; biases and the norm at 2 LR; ``s`` at 3 LR.
    ``frozen_group``: the frozen layer in a param group of its own, between the others (no trainable parameter)."""
    named = list(model.named_parameters())
    small = [p for n, p in named if (n.endswith("bias") or n.startswith("norm")) and p.requires_grad]
    weights = [p for n, p in named if n != "s" and all(p is not q for q in small)]
    groups = [{"params": weights, "weight_decay": 0.01}, {"params": small, "weight_decay": 0.0, "lr": 2 * LR},
              {"params": [model.s], "weight_decay": 0.0, "lr": 3 * LR}]
    if case.get("frozen_group"):
        groups[0]["params"] = [p for p in weights if p.requires_grad]
        groups.insert(1, {"params": list(model.frozen.parameters()), "lr": 5 * LR})
    return torch.optim.AdamW(groups, lr=LR)


def mse(model, x, y, dtype=torch.float32):
    return ((model(x.to(dtype)).float() - y) ** 2).mean()


def _rows(rank, gas, j):
    mb = ROWS // WORLD // gas
    lo = rank * ROWS // WORLD + j * mb
    return lo, lo + mb


def _scaled(loss, case, step, pass_index, rank):
    """A NaN on one rank (case["nan"] = (step, pass)), a zero loss on every rank (case["zero"] = step)."""
    if rank == NAN_RANK and (step, pass_index) == case.get("nan"):
        loss = loss * math.nan
    if step == case.get("zero"):
        loss = loss * 0.0
    return loss


def _info(info):
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))
            or (isinstance(v, list) and all(isinstance(x, float) for x in v))}


def _full(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().float()


# ---- DeepSpeed ----------------------------------------------------------------------------------------------
def ds_config(case):
    gas = case.get("gas", 1)
    cfg = {"train_micro_batch_size_per_gpu": ROWS // WORLD // gas, "gradient_accumulation_steps": gas,
           "gradient_clipping": case.get("clip", 1.0), "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9, "zero_optimization": {"stage": case["stage"]}, "wall_clock_breakdown": False}
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
        cfg["communication_data_type"] = "fp32"
        if case.get("bf16_optimizer"):         # DeepSpeed's BF16_Optimizer: fp32 gradient accumulation
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if case["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if case.get("sub_group"):
            cfg["zero_optimization"]["sub_group_size"] = case["sub_group"]
    return cfg


def _entropy(case, step, rank):
    return case["entropy"][step][rank] if "entropy" in case else None


def run_ds(case):
    from gxpo_kernels.integrations import deepspeed as gds
    model = OddNet()
    if case.get("bf16"):
        model = model.to(torch.bfloat16)
    opt = make_optimizer(model, case)
    engine, rule = gds.initialize(model=model, config=ds_config(case), optimizer=opt,
                                  **{case.get("algo", "gxpo"): dict(case["rule"])})
    rank, gas = dist.get_rank(), case.get("gas", 1)
    dtype = torch.bfloat16 if case.get("bf16") else torch.float32
    infos, params = [], []
    for step in range(case.get("steps", STEPS)):
        def closure(step=step):
            tot = 0.0
            for j in range(gas):
                lo, hi = _rows(rank, gas, j)
                loss = _scaled(mse(engine, X[step, lo:hi], Y[step, lo:hi], dtype), case, step, rule.pass_index, rank)
                engine.backward(loss)
                tot += float(loss.detach()) / gas
            return tot
        infos.append(_info(rule.step(closure, entropy=_entropy(case, step, rank))))
        params.append(DW.gather_full(engine, rule)["params"])
    full = DW.gather_full(engine, rule)
    return {"params": params, "infos": infos, "exp_avg": full["exp_avg"], "exp_avg_sq": full["exp_avg_sq"],
            "fallbacks": rule.fallbacks, "fired_step": rule.gate.fired_step, "lowp": DW.lowp_full(engine),
            "valid": [sum(n for _, n in runs) for runs in rule.zero.valid_segments()],
            "shards": [s.numel() for s in rule.zero.shards()], "kind": rule.zero.kind}


# ---- FSDP2 --------------------------------------------------------------------------------------------------
def run_fsdp(case):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from gxpo_kernels.integrations import fsdp as gf
    model = OddNet()
    kw = {"mesh": init_device_mesh("cpu", (WORLD,))}
    if case.get("mp"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.l1, **kw)
    fully_shard(model.frozen, **kw)
    fully_shard(model, **kw)                   # the root holds l3, norm, l4, s
    opt = make_optimizer(model, case)
    rule = gf.wrap(model, opt, case.get("algo", "gxpo"), **case["rule"])
    rank, gas = dist.get_rank(), case.get("gas", 1)
    dtype = torch.bfloat16 if case.get("mp") else torch.float32
    infos, params = [], []
    for step in range(case.get("steps", STEPS)):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for j in range(gas):               # micro-batches: FSDP's gradient sync on the last one only
                model.set_requires_gradient_sync(j == gas - 1)
                lo, hi = _rows(rank, gas, j)
                loss = mse(model, X[step, lo:hi], Y[step, lo:hi], dtype) / gas
                loss = _scaled(loss, case, step, rule.pass_index, -1)   # (FSDP's NaN goes into one shard below)
                loss.backward()
                tot += float(loss.detach())
            if rank == NAN_RANK and (step, rule.pass_index) == case.get("nan"):
                model.l1.weight.grad.to_local()[0, 0] = math.nan      # rank 2's only row of l1.weight
            return tot
        infos.append(_info(rule.step(closure, entropy=_entropy(case, step, rank))))
        params.append([_full(p) for p in model.parameters() if p.requires_grad])
    ps = [p for p in model.parameters() if p.requires_grad]
    return {"params": params, "infos": infos, "exp_avg": [_full(opt.state[p]["exp_avg"]) for p in ps],
            "exp_avg_sq": [_full(opt.state[p]["exp_avg_sq"]) for p in ps], "fallbacks": rule.fallbacks,
            "fired_step": rule.gate.fired_step, "local_numel": [p.to_local().numel() for p in ps]}


def worker(rank, port, outdir, cases):
    # DeepSpeed's gloo set-up for WORLD ranks (FSDP2 runs on the same default group)
    os.environ["WORLD_SIZE"] = os.environ["LOCAL_WORLD_SIZE"] = str(WORLD)
    DW.WORLD = WORLD                           # rank_env reads it
    DW.rank_env(rank, port)
    recs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, case in cases.items():
            recs[name] = run_ds(case) if case["backend"] == "deepspeed" else run_fsdp(case)
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---- the single-process reference ---------------------------------------------------------------------------
def reference(case):
    """The plain rule on the whole mini-batch. Low precision (ZeRO bf16, FSDP2's bf16 MixedPrecisionPolicy): fp32
    master weights driving a bf16 copy, whose per-rank, per-micro-batch bf16 gradients ``_reduce_lowp`` combines
    as the sharded run does."""
    from gxpo_kernels.update import GXPO, SFPO
    lowp = case.get("bf16") or case.get("mp")
    model = OddNet()
    if case.get("bf16"):                       # ZeRO's fp32 master starts from the bf16 weights
        model = model.to(torch.bfloat16).float()
    fwd = model
    cls = GXPO if case.get("algo", "gxpo") == "gxpo" else SFPO
    if lowp:
        import copy
        fwd = copy.deepcopy(model).to(torch.bfloat16)
        cls = DW._master_rule(cls, fwd, list(model.parameters()))
    opt = make_optimizer(model, case)
    rule = cls(opt, **case["rule"])
    gas = case.get("gas", 1)
    dtype = torch.bfloat16 if lowp else torch.float32
    master = [p for p in model.parameters() if p.requires_grad]
    infos, params = [], []
    for step in range(case.get("steps", STEPS)):
        def closure(step=step):
            opt.zero_grad(set_to_none=True)
            fwd.zero_grad(set_to_none=True)
            tot, grads = 0.0, []
            for r in range(WORLD):
                grads.append([])
                for j in range(gas):
                    lo, hi = _rows(r, gas, j)
                    loss = _scaled(mse(fwd, X[step, lo:hi], Y[step, lo:hi], dtype), case, step, rule.pass_index, r)
                    (loss / (gas if lowp else WORLD * gas)).backward()
                    tot += float(loss.detach()) / (WORLD * gas)
                    if lowp:                   # this rank's bf16 gradient of this micro-batch
                        grads[r].append([p.grad for p in fwd.parameters() if p.requires_grad])
                        fwd.zero_grad(set_to_none=True)
            if lowp:
                for m, g in zip(master, _reduce_lowp(case, grads)):
                    m.grad = g
            if case["backend"] == "fsdp" and (step, rule.pass_index) == case.get("nan"):
                model.l1.weight.grad[NAN_GLOBAL] = math.nan
            return tot
        ent = sum(case["entropy"][step]) / WORLD if "entropy" in case else None
        infos.append(rule.step(closure, entropy=ent))
        params.append([p.detach().clone() for p in master])
    return {"params": params, "infos": infos, "exp_avg": [opt.state[p]["exp_avg"].clone() for p in master],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in master], "fallbacks": rule.fallbacks,
            "fired_step": rule.gate.fired_step}


def _reduce_lowp(case, grads):
    """The fp32 gradients the sharded run's optimizer sees, from ``grads[rank][micro-batch]`` (bf16 per parameter):
    the world size divides in a different place and dtype on each path, which only an odd world size exposes
    (a division by 2 is exact in any dtype):

    - FSDP2 (reduce_dtype fp32), DeepSpeed's BF16_Optimizer (grad_accum_dtype fp32): the micro-batches' gradients
      accumulated in fp32, summed over the ranks, / 3;
    - ZeRO-1 bf16: each rank's micro-batches accumulated in bf16, divided by 3 IN BF16, summed in fp32 (the
      fp32 communication_data_type), kept in bf16;
    - ZeRO-2 bf16: the same reduction per micro-batch, the reduced micro-batches accumulated in bf16;
    - ZeRO-3 bf16: per micro-batch, each rank's gradient / 3 in fp32, summed in fp32, rounded to bf16; the
      micro-batches accumulated in bf16."""
    bf16, n = torch.bfloat16, len(grads[0][0])

    def total(ts):
        out = ts[0]
        for t in ts[1:]:
            out = out + t
        return out
    if case["backend"] == "fsdp" or case.get("bf16_optimizer"):
        return [total([g[i].float() for rank in grads for g in rank]) / WORLD for i in range(n)]
    if case["stage"] == 3:
        return [total([total([rank[j][i].float() / WORLD for rank in grads]).to(bf16)
                       for j in range(len(grads[0]))]).float() for i in range(n)]
    if case["stage"] == 2:
        return [total([total([(rank[j][i] / WORLD).float() for rank in grads]).to(bf16)
                       for j in range(len(grads[0]))]).float() for i in range(n)]
    return [total([(total([g[i] for g in rank]) / WORLD).float() for rank in grads]).to(bf16).float()
            for i in range(n)]
