"""Rank-side code of test_deepspeed_checkpoint.py (torch.multiprocessing, 2 CPU ranks over gloo): GXPO on
DeepSpeed (ZeRO-2, ZeRO-3, and ZeRO-2 fp16 with CPU offload and gradient accumulation) for 4 updates straight, and
2 updates + save_checkpoint + a fresh engine and rule + load_checkpoint + 2 updates; both end states are gathered
in full."""
import os

import torch

from tests.integrations import _ds_worker as W

STEPS, SPLIT = 4, 2
RULE = dict(gate="window", window=2, tau=50.0, backend="torch")   # a gate with history that must survive


CONFIGS = {"z2": dict(stage=2), "z3": dict(stage=3),
           # the dynamic loss scaler's state (scale, iteration, last overflow) must resume too
           "z2_fp16_offload_gas2": dict(stage=2, dtype="fp16", offload=True, gas=2)}


def _build(c):
    from gxpo_kernels.integrations import deepspeed as gds
    model = W.make_mlp()
    if c.get("dtype") == "fp16":
        from deepspeed.accelerator import get_accelerator
        type(get_accelerator()).is_fp16_supported = lambda self: True   # as _ds_worker.run_case does
        model = model.to(torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k))
    cfg = W.ds_config(c["stage"], dtype=c.get("dtype", "fp32"), gas=c.get("gas", 1), offload=c.get("offload", False))
    return gds.initialize(model=model, config=cfg, optimizer=opt, lr_scheduler=sched, gxpo=dict(RULE))


def _train(engine, rule, c, steps):
    for step in steps:
        rule.step(W._closure(engine, rule, step, gas=c.get("gas", 1)))


def _record(engine, rule):
    rec = W.gather_full(engine, rule)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    rec.update(lr=[g["lr"] for g in rule.optimizer.param_groups], rule=rule.state_dict(),
               global_steps=engine.global_steps, lowp=W.lowp_full(engine),
               scaler=None if scaler is None else {k: v for k, v in vars(scaler).items()
                                                   if isinstance(v, (int, float))})
    return rec


def worker(rank, port, outdir, names):
    from gxpo_kernels.integrations import deepspeed as gds
    W.rank_env(rank, port)
    recs = {}
    for name in names:
        c = CONFIGS[name]
        engine, rule = _build(c)
        _train(engine, rule, c, range(STEPS))
        straight = _record(engine, rule)
        engine, rule = _build(c)
        _train(engine, rule, c, range(SPLIT))
        ckpt = os.path.join(outdir, name)
        gds.save_checkpoint(engine, rule, ckpt, tag="t", client_state={"note": "user"})
        saved_rule = rule.state_dict()
        engine, rule = _build(c)
        path, client = gds.load_checkpoint(engine, rule, ckpt, tag="t")
        loaded_rule = rule.state_dict()
        _train(engine, rule, c, range(SPLIT, STEPS))
        resumed = _record(engine, rule)
        plain_dir = os.path.join(outdir, f"{name}_plain")
        engine.save_checkpoint(plain_dir, tag="p")    # without the rule's state: load_checkpoint must refuse
        try:
            gds.load_checkpoint(engine, rule, plain_dir, tag="p")
            missing = None
        except KeyError as e:
            missing = str(e)
        recs[name] = dict(straight=straight, resumed=resumed, saved_rule=saved_rule, loaded_rule=loaded_rule,
                           client=client, missing=missing)
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
