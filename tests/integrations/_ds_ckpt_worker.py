"""Rank-side code of test_deepspeed_checkpoint.py (torch.multiprocessing, 2 CPU ranks over gloo): GXPO on
DeepSpeed ZeRO-2 / ZeRO-3 for 4 updates straight, and 2 updates + save_checkpoint + a fresh engine and rule +
load_checkpoint + 2 updates; both end states are gathered in full."""
import os

import torch

from tests.integrations import _ds_worker as W

STEPS, SPLIT = 4, 2
RULE = dict(gate="window", window=2, tau=50.0, backend="torch")   # a gate with history that must survive


def _build(stage):
    from gxpo_kernels.integrations import deepspeed as gds
    model = W.make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k))
    return gds.initialize(model=model, config=W.ds_config(stage), optimizer=opt, lr_scheduler=sched,
                          gxpo=dict(RULE))


def _train(engine, rule, steps):
    for step in steps:
        rule.step(W._closure(engine, rule, step, gas=1))


def _record(engine, rule):
    rec = W.gather_full(engine, rule)
    rec.update(lr=[g["lr"] for g in rule.optimizer.param_groups], rule=rule.state_dict(),
               global_steps=engine.global_steps)
    return rec


def worker(rank, port, outdir, stages):
    from gxpo_kernels.integrations import deepspeed as gds
    W.rank_env(rank, port)
    recs = {}
    for stage in stages:
        engine, rule = _build(stage)
        _train(engine, rule, range(STEPS))
        straight = _record(engine, rule)
        engine, rule = _build(stage)
        _train(engine, rule, range(SPLIT))
        ckpt = os.path.join(outdir, f"z{stage}")
        gds.save_checkpoint(engine, rule, ckpt, tag="t", client_state={"note": "user"})
        saved_rule = rule.state_dict()
        engine, rule = _build(stage)
        path, client = gds.load_checkpoint(engine, rule, ckpt, tag="t")
        loaded_rule = rule.state_dict()
        _train(engine, rule, range(SPLIT, STEPS))
        resumed = _record(engine, rule)
        plain_dir = os.path.join(outdir, f"z{stage}_plain")
        engine.save_checkpoint(plain_dir, tag="p")    # without the rule's state: load_checkpoint must refuse
        try:
            gds.load_checkpoint(engine, rule, plain_dir, tag="p")
            missing = None
        except KeyError as e:
            missing = str(e)
        recs[stage] = dict(straight=straight, resumed=resumed, saved_rule=saved_rule, loaded_rule=loaded_rule,
                           client=client, missing=missing)
    torch.save(recs, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
