"""The RL loop: warm start -> (rollout -> rewards -> advantages -> loss op -> update rule -> log) x steps.

One record per step is appended to ``records.jsonl`` (schema in ``docs/readme/10-quickstart-trainer.md``);
step 0 is the warm start's validation. ``wall_clock`` counts rollout + update seconds only (validation is
excluded), and each step logs its measured ``t_rollout``, ``t_backward`` (all forward+backward passes) and
``t_optimizer`` (the rest of the update: optimizer steps, clipping, the rule's own arithmetic).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from typing import Callable, List, Optional

import torch

from ..advantages import FADEController, fade_advantages, group_advantages, sign_ratio
from ..update import GXPO, SFPO
from . import fpa_offline
from .config import FPA_ALGOS, TrainConfig
from .model import amp, build_tiny_model, load_local_model, pick_device, tiny_config_dict
from .rollout import encode_prompts, evaluate, policy_loss, position_ids, response_logits, rollout
from .tasks import make_task, make_tokenizer


# ---------------------------------------------------------------------------------------------------------
# Set-up: policy, warm start
# ---------------------------------------------------------------------------------------------------------
def build_policy(cfg: TrainConfig, device: torch.device):
    """(model in train mode, tokenizer, task, model_key). ``model_key`` identifies the initial weights."""
    task = make_task(cfg)
    if cfg.model is not None:
        model, hf_tok = load_local_model(cfg.model, device)
        tok = make_tokenizer(task, hf_tok, cfg.chat_template)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"--model {cfg.model!r}: vocab {model.config.vocab_size} is smaller than the "
                             f"tokenizer's {tok.vocab_size}")
        key = {"model": os.path.abspath(cfg.model), "mtime": os.path.getmtime(os.path.join(cfg.model, "config.json")),
               "dataset": os.path.abspath(cfg.dataset) if cfg.dataset else None, "chat": getattr(tok, "use_chat", False)}
    else:
        tok = make_tokenizer(task)
        mcfg = tiny_config_dict(tok.vocab_size, cfg.arch, cfg.hidden, cfg.layers, cfg.heads, 4 * cfg.hidden)
        model = build_tiny_model(mcfg, tok, device, seed=cfg.init_seed)
        key = {"tiny": mcfg, "init_seed": cfg.init_seed}
    model.train()
    return model, tok, task, key


def _sft_batch(tok, pairs, device):
    """Left-padded prompts + answers; labels only on answer tokens and EOS (-100 elsewhere)."""
    ids, attn = encode_prompts(tok, [p for p, _ in pairs], device)
    ans = [tok.encode_answer(a) for _, a in pairs]
    La = max(len(a) for a in ans)
    a_ids = torch.full((len(ans), La), tok.pad_token_id, dtype=torch.long)
    a_mask = torch.zeros((len(ans), La), dtype=torch.long)
    for i, a in enumerate(ans):
        a_ids[i, :len(a)] = torch.tensor(a)
        a_mask[i, :len(a)] = 1
    a_ids, a_mask = a_ids.to(device), a_mask.to(device)
    full, full_attn = torch.cat([ids, a_ids], 1), torch.cat([attn, a_mask], 1)
    labels = torch.cat([torch.full_like(ids, -100), torch.where(a_mask.bool(), a_ids, -100)], 1)
    return full, full_attn, labels


def default_cache_dir(cfg: TrainConfig) -> str:
    if cfg.cache_dir:
        return cfg.cache_dir
    root = os.path.dirname(os.path.abspath(cfg.out_dir)) if cfg.out_dir else os.path.abspath("runs")
    return os.path.join(root, ".warmstart-cache")


# Warm starts shipped with the package (the default speedup run's), found by the same cache key: loading one
# makes the RL runs start from identical weights on every machine, whatever its floating-point path.
BUNDLED_WARMSTARTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warmstarts")


def warmstart_key(cfg: TrainConfig, task, model_key: dict, max_new: int) -> str:
    """Cache key of a warm start: hash of (task, initial model, SFT config, completion cap)."""
    blob = json.dumps({"task": task.name, "model": model_key, "sft": dataclasses.asdict(cfg.sft), "max_new": max_new},
                      sort_keys=True, default=str)
    return f"warmstart-{task.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"


def _load_warmstart(model, path: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    load_model(model, path, strict=True, device=str(next(model.parameters()).device))
    return {"sft_steps": int(meta.get("sft_steps", -1)), "sft_acc": float(meta.get("sft_acc", "nan")),
            "cached": True, "path": path, "bundled": os.path.dirname(path) == BUNDLED_WARMSTARTS}


def warm_start(cfg: TrainConfig, model, tok, task, model_key: dict, val_pairs, max_new: int, log=print) -> dict:
    """Supervised warm start, cached on disk by ``warmstart_key``; loads ``model`` in place.

    A checkpoint shipped in ``BUNDLED_WARMSTARTS`` with the same key is used first, then the cache folder
    (safetensors: weights only, never unpickled). Otherwise it trains: stops at the first check with greedy
    accuracy >= ``sft.target_acc`` on the first ``sft.check_size`` validation prompts, or at
    ``sft.max_steps``. ``max_steps = 0`` skips it.
    """
    s = cfg.sft
    if s.max_steps <= 0:
        return {"sft_steps": 0, "sft_acc": None, "cached": False, "path": None}
    name = warmstart_key(cfg, task, model_key, max_new)
    for folder in (BUNDLED_WARMSTARTS, default_cache_dir(cfg)):
        if os.path.isfile(os.path.join(folder, name)):
            return _load_warmstart(model, os.path.join(folder, name))
    path = os.path.join(default_cache_dir(cfg), name)

    device = next(model.parameters()).device
    pool = task.sample(s.pool_size, "sft", seed=cfg.init_seed)
    check = val_pairs[:s.check_size]
    rng = random.Random(cfg.init_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99))
    acc, step, t0 = 0.0, 0, time.perf_counter()
    model.train()
    while step < s.max_steps:
        full, attn, labels = _sft_batch(tok, rng.sample(pool, s.batch_size), device)
        with amp(device):
            logits = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % s.check_every == 0 or step == s.max_steps:
            acc = sum(evaluate(model, tok, task, check, max_new)) / max(len(check), 1)
            if not cfg.quiet:
                log(f"[warm start] step {step}: loss {loss.item():.4f}  greedy acc {acc:.3f}")
            if acc >= s.target_acc:
                break
    from safetensors.torch import save_model

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_model(model, tmp, metadata={"sft_steps": str(step), "sft_acc": repr(float(acc))})
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return {"sft_steps": step, "sft_acc": acc, "cached": False, "path": path,
            "seconds": time.perf_counter() - t0}


def prepare_warm_start(cfg: TrainConfig, log=print) -> dict:
    """Build the policy and run (or load) its warm start, so that later runs find it in the cache."""
    cfg.validate()
    c0 = time.process_time()
    model, tok, task, model_key = build_policy(cfg, pick_device(cfg.device))
    max_new = cfg.max_new_tokens or task.max_answer_chars + 1
    val_pairs = task.sample(cfg.val_size, "val", seed=0, distinct=True)
    ws = warm_start(cfg, model, tok, task, model_key, val_pairs, max_new, log=log)
    return dict(ws, cpu_seconds=time.process_time() - c0)


# ---------------------------------------------------------------------------------------------------------
# One RL run
# ---------------------------------------------------------------------------------------------------------
def _json_safe(x):
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    try:
        return _json_safe(float(x))
    except (TypeError, ValueError):
        return str(x)


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_update(cfg: TrainConfig, model):
    """(optimizer, rule or None, static fields for the ``update`` log). GRPO variants step the optimizer
    themselves; SFPO/GXPO wrap it."""
    lr = cfg.lr * (cfg.lr_mult if cfg.algo == "grpo_lr" else 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    static = {"algo": cfg.algo, "lr": lr}
    if cfg.algo in FPA_ALGOS:
        static.update(objective=cfg.algo[len("fpa_"):], lam=cfg.fpa_lam, side=cfg.fpa_side, beta=cfg.fpa_beta,
                      gate=None)
        return opt, None, static
    if cfg.algo == "gxpo":
        gate = None if cfg.gxpo_gate == "none" else cfg.gxpo_gate
        rule = GXPO(opt, K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, max_grad_norm=cfg.max_grad_norm,
                    gate=gate)
        static.update(K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, gate=cfg.gxpo_gate)
        return opt, rule, static
    if cfg.algo == "sfpo":
        gate = None if cfg.sfpo_gate == "none" else cfg.sfpo_gate
        rule = SFPO(opt, K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, max_grad_norm=cfg.max_grad_norm, gate=gate)
        static.update(K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, gate=cfg.sfpo_gate)
        return opt, rule, static
    static.update(epochs=cfg.epochs if cfg.algo == "grpo_epochs" else 1, gate=None)
    return opt, None, static


def compute_advantages(cfg: TrainConfig, rewards: torch.Tensor, entropy: float, fade_ctl,
                       mean_reward: Optional[float] = None):
    """(advantages (B,), FADE controller state or None). ``mean_reward`` (default ``rewards.mean()``) and
    ``entropy`` feed the FADE controller (the DeepSpeed loop passes dp means)."""
    G = cfg.group
    if cfg.advantage == "fade":
        st = fade_ctl.update(float(rewards.mean()) if mean_reward is None else float(mean_reward), entropy)
        adv = fade_advantages(rewards, group_size=G, alpha=st["alpha"], delta=st["delta"])
        st = dict(st, sign_ratio=float(sign_ratio(adv)))
        return adv.float(), st
    scale = "none" if cfg.advantage == "drgrpo" else "std"
    return group_advantages(rewards, group_size=G, scale=scale).float(), None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def validate_policy(cfg, model, tok, task, val_pairs, max_new, **eval_kw) -> dict:
    """Greedy exact match on the validation set; pass@1 on its first ``pass1_size`` prompts. ``eval_kw``:
    ``synced_gpus`` / ``use_amp`` of ``rollout.evaluate``."""
    greedy = evaluate(model, tok, task, val_pairs, max_new, **eval_kw)
    out = {"greedy_acc": sum(greedy) / len(greedy)}
    if cfg.pass1_size > 0 and cfg.pass1_n > 0:
        with torch.random.fork_rng(devices=[]):  # sampling here must not shift the training RNG stream
            torch.manual_seed(10_000 + cfg.seed)
            p1 = evaluate(model, tok, task, val_pairs[:cfg.pass1_size], max_new, do_sample=True, n=cfg.pass1_n,
                          temperature=cfg.val_temperature, **eval_kw)
        out["pass1"] = sum(p1) / len(p1)
        for k in cfg.pass_k:
            if k > 1:   # per prompt: c = n * mean correct of the n samples
                out[f"pass@{k}"] = sum(pass_at_k(cfg.pass1_n, round(v * cfg.pass1_n), k) for v in p1) / len(p1)
    if cfg.log_per_prompt:
        out["per_prompt"] = [int(v) for v in greedy]
    return out



def mark_gate(rec: dict, upd: dict, rule, info: dict, step: int, gate_fired_at: Optional[int]) -> Optional[int]:
    """Record when the update rule's gate fired (``rec["gate_fired_at"]``, ``upd["gate_fired_step"]``, and
    ``rec["gate_fired"]`` on that step); return the (possibly new) firing step."""
    if rule is not None and gate_fired_at is None and rule.gate.fired:
        # the rule counts outer steps from 0; ours start at 1. The gate fired on this step's
        # observation (or an earlier one), so from the next step on the rule runs 1-pass GRPO.
        fs = info.get("gate_fired_step")
        gate_fired_at = step if fs is None else int(fs) + 1
        rec["gate_fired"] = True
    if rule is not None:
        upd["gate_fired_step"] = gate_fired_at
    rec["gate_fired_at"] = gate_fired_at
    return gate_fired_at


class RecordLog:
    """Collects the per-step records and, when ``out_dir`` is set, writes ``config.json`` once and appends each
    record to ``records.jsonl`` (flushed, so a crashed run keeps its curve); ``progress`` sees every record.
    Shared by the plain loop and the DeepSpeed loop (where only the writing rank passes ``out_dir``)."""

    def __init__(self, out_dir: Optional[str], config: dict, progress: Optional[Callable] = None):
        self.records: List[dict] = []
        self.progress = progress
        self._f = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(_json_safe(config), f, indent=1)
            self._f = open(os.path.join(out_dir, "records.jsonl"), "w")

    def __call__(self, rec: dict) -> None:
        rec = _json_safe(rec)
        self.records.append(rec)
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        if self.progress is not None:
            self.progress(rec)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

def train(cfg: TrainConfig, *, progress: Optional[Callable[[dict], None]] = None, log=print) -> List[dict]:
    """Run one method; return its per-step records (also written to ``cfg.out_dir/records.jsonl`` if set).
    With ``cfg.deepspeed`` the run goes to ``ds_loop.train_deepspeed`` (a DeepSpeed ZeRO engine)."""
    cfg.validate()
    if cfg.deepspeed is not None:
        from .ds_loop import train_deepspeed
        return train_deepspeed(cfg, progress=progress, log=log)
    device = pick_device(cfg.device)
    model, tok, task, model_key = build_policy(cfg, device)
    max_new = cfg.max_new_tokens or task.max_answer_chars + 1
    val_pairs = task.sample(cfg.val_size, "val", seed=0, distinct=True)
    ws = warm_start(cfg, model, tok, task, model_key, val_pairs, max_new, log=log)

    torch.manual_seed(cfg.seed)
    train_pairs = task.sample(cfg.steps * cfg.prompts, "train", seed=cfg.seed)
    opt, rule, static = make_update(cfg, model)
    fpa = cfg.algo in FPA_ALGOS
    ref_model = None
    if fpa:  # the warm-start policy, frozen, is the reference of the offline objectives
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    fade_ctl = None
    if cfg.advantage == "fade":
        fade_ctl = FADEController() if cfg.fade_target_entropy is None else \
            FADEController(target_entropy=cfg.fade_target_entropy)
    loss_kw = dict(temperature=cfg.temperature, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                   loss_agg_mode=cfg.agg_mode)
    if cfg.agg_mode == "seq-mean-token-sum-norm":
        loss_kw["max_length"] = max_new
    params = [p for p in model.parameters() if p.requires_grad]

    emit = RecordLog(cfg.out_dir, {"train": dataclasses.asdict(cfg), "warm_start": ws}, progress)
    records = emit.records

    bp_total = opt_total = 0
    wall = 0.0
    gate_fired_at = None
    t_val = time.perf_counter()
    emit({"step": 0, "val": validate_policy(cfg, model, tok, task, val_pairs, max_new), "backward_passes": 0,
          "optimizer_steps": 0, "wall_clock": 0.0, "t_val": time.perf_counter() - t_val,
          "warm_start": ws, "method": static})
    try:
        for step in range(1, cfg.steps + 1):
            t0, c0 = _clock(device), time.process_time()
            pairs = train_pairs[(step - 1) * cfg.prompts: step * cfg.prompts]
            ro = rollout(model, tok, task, pairs, cfg.group, max_new, cfg.temperature)
            adv, fade_state = compute_advantages(cfg, ro.rewards, ro.entropy, fade_ctl)
            t_roll, c_roll = _clock(device) - t0, time.process_time() - c0

            timing = {"bwd": 0.0, "cpu_bwd": 0.0, "passes": 0}
            first = {}

            def closure():
                tb, cb = _clock(device), time.process_time()
                opt.zero_grad(set_to_none=True)
                k = getattr(rule, "pass_index", 0) if rule is not None else 0
                # paper protocol: passes after the first use the current policy as "old" (ratio = 1); the
                # rollout's old log-probs are pi_theta0's, i.e. exact for pass 0. PPO epochs keep them (clip).
                old = None if (rule is not None and cfg.recompute_old_logp and k > 0) else ro.old_logp
                with amp(device):
                    logits = response_logits(model, ro.prompt_ids, ro.prompt_attn, ro.resp, ro.mask)
                loss, metrics = policy_loss(logits, ro.resp, adv, ro.mask, old, loss_kw)
                loss.backward()
                timing["bwd"] += _clock(device) - tb
                timing["cpu_bwd"] += time.process_time() - cb
                timing["passes"] += 1
                if not first:
                    first.update(loss=loss.detach(), metrics={k2: v.detach() for k2, v in metrics.items()})
                return loss.detach()

            t1, c1 = _clock(device), time.process_time()
            if fpa:
                info, got, tb, passes = fpa_offline.update(cfg, model, ref_model, opt, params, ro, adv,
                                                           lambda: _clock(device))
                first.update(got)
                timing["bwd"] += tb
                timing["passes"] += passes
            elif rule is None:
                info = {"grad_norm": []}
                for _ in range(cfg.epochs if cfg.algo == "grpo_epochs" else 1):
                    closure()
                    info["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
                    opt.step()
                info.update(backward_passes=timing["passes"], optimizer_steps=timing["passes"])
            else:
                kw = {"entropy": ro.entropy} if rule.gate.needs_entropy else {}
                info = dict(rule.step(closure, **kw))
            t_upd, c_upd = _clock(device) - t1, time.process_time() - c1
            if rule is not None:
                bp_total = int(rule.total_backward_passes)
                opt_total = int(rule.total_optimizer_steps)
            else:
                bp_total += timing["passes"]
                opt_total += int(info["optimizer_steps"])
            wall += t_roll + t_upd

            g = ro.rewards.view(-1, cfg.group)
            upd = dict(static)
            upd.update(info)
            if "fell_back" in upd and "fallback" not in upd:
                upd["fallback"] = upd["fell_back"]   # the name stats.effective_step_multiplier reads
            rec = {"step": step, "reward_mean": float(ro.rewards.mean()),
                   "frac_zero_adv_groups": float((g.max(-1).values == g.min(-1).values).float().mean()),
                   "rollout_entropy": ro.entropy, "response_len": float(ro.mask.float().sum(-1).mean()),
                   "loss": first.get("loss"), "metrics": first.get("metrics", {}), "update": upd,
                   "backward_passes": bp_total, "optimizer_steps": opt_total, "wall_clock": wall,
                   "t_rollout": t_roll, "t_backward": timing["bwd"], "t_optimizer": max(t_upd - timing["bwd"], 0.0),
                   # process CPU time: what this run computed, not inflated by other work on the machine
                   "t_update": t_upd, "cpu_rollout": c_roll, "cpu_update": c_upd,
                   "cpu_backward": None if fpa else timing["cpu_bwd"]}
            if fade_state is not None:
                rec["fade"] = dict(fade_state)
            if fpa:
                rec["fpa"] = {k: first.get("metrics", {}).get(k) for k in ("pairs", "c_w_mean", "c_l_mean")}
                rec["fpa"]["pairs"] = info["pairs"]
            gate_fired_at = mark_gate(rec, upd, rule, info, step, gate_fired_at)
            if step % cfg.val_every == 0 or step == cfg.steps:
                tv, cv = _clock(device), time.process_time()
                rec["val"] = validate_policy(cfg, model, tok, task, val_pairs, max_new)
                rec["t_val"], rec["cpu_val"] = _clock(device) - tv, time.process_time() - cv
            emit(rec)
    finally:
        emit.close()
    return records
