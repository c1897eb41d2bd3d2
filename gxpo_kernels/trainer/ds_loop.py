"""The RL loop on a DeepSpeed ZeRO engine: ``gxpo-kernels train --deepspeed ds.json ...``.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m gxpo_kernels.cli train \\
        --deepspeed examples/ds_zero2.json --algo gxpo --steps 50 --out runs/ds-gxpo        # CPU, gloo
    deepspeed --num_gpus 2 --module gxpo_kernels.cli train --deepspeed ds.json --algo gxpo   # GPUs, NCCL

Without a launcher it runs as a single rank. It is ``loop.train`` with these differences:

- every rank builds the same initial policy; rank 0 runs (or loads from the cache) the warm start and
  broadcasts the weights;
- the policy is wrapped in :class:`PolicyLoss` (the trainer's response logits + fused GRPO loss, with
  left-padding-aware positions) and handed to DeepSpeed, so the loss runs inside ``engine(...)`` (ZeRO-3 needs
  that, see ``integrations.deepspeed._loss``);
- each rank rolls out its own P prompts (rank r takes the r-th slice of the step's world * P prompts; sampling
  is seeded by seed and rank) and computes its own group advantages; DeepSpeed averages the gradient;
- the B = P * G rows go through ``engine(...)`` in ``gradient_accumulation_steps`` micro-batches of B / gas
  rows (``train_micro_batch_size_per_gpu`` is set to that);
- ``gxpo`` / ``sfpo``: ``integrations.deepspeed.initialize`` builds the engine and the rule, which runs the
  passes and every ``engine.step()``; ``grpo`` / ``grpo_lr`` / ``grpo_epochs``: ``engine.backward`` +
  ``engine.step`` per micro-batch (one optimizer step per pass);
- gradient clipping is DeepSpeed's ``gradient_clipping`` (the config's value, else ``max_grad_norm``);
- logged rollout statistics, the loss (every pass's) and the loss metrics are dp means; FADE sees the
  dp-mean reward and entropy, the entropy gate the dp-mean entropy (the rule reduces it); timings are rank 0's;
- validation runs on every rank (ZeRO-3 gathers parameters collectively inside each forward, so ``generate``
  runs with ``synced_gpus``); rank 0 logs and writes ``config.json`` / ``records.jsonl``.

Precision is the DeepSpeed config's (``bf16``); no autocast is layered on top.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..advantages import FADEController
from .config import DS_ALGOS, TrainConfig
from .loop import RecordLog, build_policy, mark_gate, compute_advantages, validate_policy, warm_start
from .rollout import policy_loss, response_logits, rollout


class PolicyLoss(nn.Module):
    """``forward(prompt_ids, prompt_attn, resp, mask, advantages, old_logp=None) -> loss`` of a causal LM.

    Shapes: prompt_ids / prompt_attn (b, Lp) left padded; resp (b, T); mask (b, T) bool; advantages (b,);
    old_logp (b, T) fp32 or None (= the current policy, ratio 1). The loss op's metrics of the last call are
    kept in ``self.metrics`` (detached).
    """

    def __init__(self, model: nn.Module, loss_kwargs: dict):
        super().__init__()
        self.model = model
        self.loss_kwargs = dict(loss_kwargs)
        self.metrics = {}

    def forward(self, prompt_ids, prompt_attn, resp, mask, advantages, old_logp=None):
        logits = response_logits(self.model, prompt_ids, prompt_attn, resp, mask)
        loss, metrics = policy_loss(logits, resp, advantages, mask, old_logp, self.loss_kwargs)
        self.metrics = {k: v.detach() for k, v in metrics.items()}
        return loss


def load_ds_config(path: str, cfg: TrainConfig) -> dict:
    """Read and check the DeepSpeed JSON; set the micro-batch size from P * G and the clipping default."""
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed {path!r}: no such file")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path!r}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--deepspeed {path!r}: the config must be a JSON object")
    stage = int((d.get("zero_optimization") or {}).get("stage", 0))
    bf16 = bool((d.get("bf16") or {}).get("enabled", False))
    if stage not in (1, 2, 3) and not (stage == 0 and bf16):
        raise ValueError(f"--deepspeed {path!r}: needs zero_optimization.stage 1, 2 or 3 (or bf16 at stage 0, the "
                         f"BF16_Optimizer); got stage {stage}")
    B = cfg.prompts * cfg.group
    gas = int(d.get("gradient_accumulation_steps", 1))
    if gas < 1 or B % gas:
        raise ValueError(f"--deepspeed {path!r}: gradient_accumulation_steps={gas} must divide the per-rank batch "
                         f"prompts * group = {B}")
    d["gradient_accumulation_steps"] = gas
    d["train_micro_batch_size_per_gpu"] = B // gas
    d.pop("train_batch_size", None)                   # DeepSpeed derives it: micro * gas * world
    d.setdefault("gradient_clipping", cfg.max_grad_norm)
    d.setdefault("zero_allow_untested_optimizer", True)
    d.setdefault("steps_per_print", 10 ** 9)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> bool:
    """``deepspeed.init_distributed()``; without a launcher, as rank 0 of 1. True if it created the group."""
    import deepspeed
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed()
    return True


def build_engine(cfg: TrainConfig, ds_cfg: dict, model: nn.Module, loss_kw: dict):
    """(engine, rule or None, static fields of the ``update`` log)."""
    import deepspeed
    from ..integrations import deepspeed as gds

    lr = cfg.lr * (cfg.lr_mult if cfg.algo == "grpo_lr" else 1.0)
    wrapped = PolicyLoss(model, loss_kw)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=lr)
    static = {"algo": cfg.algo, "lr": lr}
    if cfg.algo in ("gxpo", "sfpo"):
        if cfg.algo == "gxpo":
            gate = None if cfg.gxpo_gate == "none" else cfg.gxpo_gate
            kw = {"gxpo": dict(K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, gate=gate)}
            static.update(K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, gate=cfg.gxpo_gate)
        else:
            gate = None if cfg.sfpo_gate == "none" else cfg.sfpo_gate
            kw = {"sfpo": dict(K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, gate=gate)}
            static.update(K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, gate=cfg.sfpo_gate)
        engine, rule = gds.initialize(model=wrapped, config=ds_cfg, optimizer=opt, **kw)
    else:
        engine, *_ = deepspeed.initialize(model=wrapped, config=ds_cfg, optimizer=opt)
        rule = None
        static.update(epochs=cfg.epochs if cfg.algo == "grpo_epochs" else 1, gate=None)
    static.update(zero_stage=engine.zero_optimization_stage(), world_size=dist.get_world_size(),
                  gradient_clipping=ds_cfg["gradient_clipping"])
    return engine, rule, static


def train_deepspeed(cfg: TrainConfig, *, progress: Optional[Callable[[dict], None]] = None,
                    log=print) -> List[dict]:
    """Run one method on a DeepSpeed engine (one call per rank); return the per-step records (every rank
    builds the same records; rank 0 writes them to ``cfg.out_dir/records.jsonl`` and calls ``progress``)."""
    cfg.validate()
    if cfg.algo not in DS_ALGOS:
        raise ValueError(f"--deepspeed drives the algos {DS_ALGOS}, got algo {cfg.algo!r}")
    ds_cfg = load_ds_config(cfg.deepspeed, cfg)       # fail before any process-group set-up
    owned = init_distributed()
    try:
        return _run(cfg, ds_cfg, progress, log)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, ds_cfg: dict, progress, log) -> List[dict]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(acc.current_device_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    model, tok, task, model_key = build_policy(cfg, device)   # same init_seed -> same weights on every rank
    max_new = cfg.max_new_tokens or task.max_answer_chars + 1
    val_pairs = task.sample(cfg.val_size, "val", seed=0, distinct=True)
    box = [warm_start(cfg, model, tok, task, model_key, val_pairs, max_new, log=log) if lead else None]
    dist.broadcast_object_list(box, src=0)
    ws = box[0]
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)

    loss_kw = dict(temperature=cfg.temperature, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                   loss_agg_mode=cfg.agg_mode)
    if cfg.agg_mode == "seq-mean-token-sum-norm":
        loss_kw["max_length"] = max_new
    engine, rule, static = build_engine(cfg, ds_cfg, model, loss_kw)
    policy = engine.module.model
    gas = engine.gradient_accumulation_steps()
    mb = cfg.prompts * cfg.group // gas
    gen_kw = dict(synced_gpus=static["zero_stage"] == 3, use_amp=False)
    torch.manual_seed(cfg.seed + 100_003 * rank)      # each rank samples its own responses
    train_pairs = task.sample(cfg.steps * cfg.prompts * world, "train", seed=cfg.seed)
    fade_ctl = None
    if cfg.advantage == "fade":
        fade_ctl = FADEController() if cfg.fade_target_entropy is None else \
            FADEController(target_entropy=cfg.fade_target_entropy)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def dp_mean(vals: List[float]) -> List[float]:
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / world).tolist()

    emit = RecordLog(cfg.out_dir if lead else None,
                     {"train": dataclasses.asdict(cfg), "warm_start": ws, "deepspeed": ds_cfg, "world_size": world},
                     progress if lead else None)
    records = emit.records

    def validate() -> dict:
        engine.eval()
        try:
            return validate_policy(cfg, policy, tok, task, val_pairs, max_new, **gen_kw)
        finally:
            engine.train()

    bp_total = opt_total = 0
    wall = 0.0
    gate_fired_at = None
    tv = time.perf_counter()
    emit({"step": 0, "val": validate(), "backward_passes": 0, "optimizer_steps": 0, "wall_clock": 0.0,
          "t_val": time.perf_counter() - tv, "warm_start": ws, "method": static})
    try:
        for step in range(1, cfg.steps + 1):
            t0 = clock()
            lo = ((step - 1) * world + rank) * cfg.prompts
            ro = rollout(policy, tok, task, train_pairs[lo:lo + cfg.prompts], cfg.group, max_new, cfg.temperature,
                         **gen_kw)
            g = ro.rewards.view(-1, cfg.group)
            r_mean, frac0, ent, rlen = dp_mean([
                float(ro.rewards.mean()), float((g.max(-1).values == g.min(-1).values).float().mean()),
                ro.entropy, float(ro.mask.float().sum(-1).mean())])
            adv, fade_state = compute_advantages(cfg, ro.rewards, ent, fade_ctl, mean_reward=r_mean)
            t_roll = clock() - t0

            timing = {"bwd": 0.0, "passes": 0}
            first = {}

            def closure():
                tb = clock()
                k = rule.pass_index if rule is not None else 0
                # as loop.train: passes after the first use the current policy as "old" (paper protocol)
                old = None if (rule is not None and cfg.recompute_old_logp and k > 0) else ro.old_logp
                total = 0.0
                for j in range(gas):
                    sl = slice(j * mb, (j + 1) * mb)
                    loss = engine(ro.prompt_ids[sl], ro.prompt_attn[sl], ro.resp[sl], ro.mask[sl], adv[sl],
                                  None if old is None else old[sl])
                    engine.backward(loss)
                    if rule is None and j < gas - 1:
                        engine.step()                 # non-boundary micro-step: DeepSpeed's bookkeeping only
                    total += float(loss.detach()) / gas
                total = dp_mean([total])[0]           # the rule logs it: the same value on every rank
                timing["bwd"] += clock() - tb
                timing["passes"] += 1
                if not first:
                    first.update(loss=total, metrics={n: float(v) for n, v in engine.module.metrics.items()})
                return total

            t1 = clock()
            if rule is None:
                info = {"grad_norm": []}
                for _ in range(cfg.epochs if cfg.algo == "grpo_epochs" else 1):
                    closure()
                    engine.step()                     # the boundary: reduce, clip, optimizer step
                    gn = engine.get_global_grad_norm()
                    info["grad_norm"].append(None if gn is None else float(gn))
                info.update(backward_passes=timing["passes"], optimizer_steps=timing["passes"])
            else:
                kw = {"entropy": ro.entropy} if rule.gate.needs_entropy else {}
                info = dict(rule.step(closure, **kw))
            t_upd = clock() - t1
            if rule is not None:
                bp_total, opt_total = int(rule.total_backward_passes), int(rule.total_optimizer_steps)
            else:
                bp_total += timing["passes"]
                opt_total += timing["passes"]
            wall += t_roll + t_upd

            names = sorted(first["metrics"])
            red = [first["loss"]] + dp_mean([first["metrics"][n] for n in names])
            upd = dict(static)
            upd.update(info)
            if "fell_back" in upd and "fallback" not in upd:
                upd["fallback"] = upd["fell_back"]
            rec = {"step": step, "reward_mean": r_mean, "frac_zero_adv_groups": frac0, "rollout_entropy": ent,
                   "response_len": rlen, "loss": red[0], "metrics": dict(zip(names, red[1:])), "update": upd,
                   "backward_passes": bp_total, "optimizer_steps": opt_total, "wall_clock": wall,
                   "t_rollout": t_roll, "t_backward": timing["bwd"], "t_optimizer": max(t_upd - timing["bwd"], 0.0)}
            if fade_state is not None:
                rec["fade"] = dict(fade_state)
            gate_fired_at = mark_gate(rec, upd, rule, info, step, gate_fired_at)
            if step % cfg.val_every == 0 or step == cfg.steps:
                tv = clock()
                rec["val"] = validate()
                rec["t_val"] = clock() - tv
            emit(rec)
    finally:
        emit.close()
    return records
