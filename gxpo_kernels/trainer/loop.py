"""The RL loop: warm start -> (rollout -> rewards -> advantages -> loss -> update rule -> log) x steps.

One loop for every engine (``engines``: plain PyTorch, DeepSpeed ZeRO). One record per step is appended to
``records.jsonl``; step 0 is the warm start's validation. Timings per step: ``t_rollout`` (sampling, rewards,
advantages), ``t_update`` (every forward + backward pass, optimizer steps, clipping and the rule's own
arithmetic; split into ``t_backward`` = the passes and ``t_optimizer`` = the rest) and ``t_val`` (validation,
on the steps that validate), in wall-clock seconds after a device sync; the same phases in process CPU seconds
(``cpu_rollout``, ``cpu_update``, ``cpu_val``) and, on CUDA, CUDA-event seconds (``gpu_rollout``,
``gpu_update``, ``gpu_val``). ``wall_clock`` is the running sum of ``t_rollout + t_update`` (validation
excluded). Checkpoints and resume: ``checkpoint``.
"""
from __future__ import annotations

import contextlib
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
from . import checkpoint as ckpt
from . import fpa_offline
from .config import FPA_ALGOS, TrainConfig, loss_kwargs
from .engines import Engine, learning_rate, make_engine
from .model import amp, build_tiny_model, load_local_model, pick_device, tiny_config_dict
from .rollout import encode_prompts, evaluate, position_ids, rollout
from .tasks import make_task, make_tokenizer, model_tokenizer, validation_set


# ---------------------------------------------------------------------------------------------------------
# Set-up: policy, warm start
# ---------------------------------------------------------------------------------------------------------
def build_policy(cfg: TrainConfig, device: torch.device):
    """(model in train mode, tokenizer, task, model_key). ``model_key`` identifies the initial weights."""
    task = make_task(cfg)
    if cfg.model is not None:
        model, hf_tok = load_local_model(cfg.model, device)
        tok = model_tokenizer(cfg, task, hf_tok, model.config.vocab_size)
        # the dataset by its records (not its path: an edited file or another --answer_field is another warm
        # start), and the reward, which the warm start's accuracy check stops on
        key = {"model": os.path.abspath(cfg.model), "mtime": os.path.getmtime(os.path.join(cfg.model, "config.json")),
               "dataset": getattr(task, "digest", None), "reward": task.reward_mode,
               "chat": getattr(tok, "use_chat", False)}
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
            got = evaluate(model, tok, task, check, max_new, batch_size=cfg.eval_batch_size)
            acc = sum(got) / max(len(check), 1)
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
    val_pairs = validation_set(cfg, task)
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


def compute_advantages(cfg: TrainConfig, rewards: torch.Tensor, entropy: float, fade_ctl,
                       mean_reward: Optional[float] = None):
    """(advantages (B,), FADE controller state or None). ``mean_reward`` (default ``rewards.mean()``) and
    ``entropy`` feed the FADE controller (the loop passes the ranks' means). The controller's new state is
    kept only once the advantages are computed: an error (non-binary rewards) leaves it as it was."""
    G = cfg.group
    if cfg.advantage == "fade":
        ctl = copy.deepcopy(fade_ctl)
        st = ctl.update(float(rewards.mean()) if mean_reward is None else float(mean_reward), entropy)
        adv = fade_advantages(rewards, group_size=G, alpha=st["alpha"], delta=st["delta"])
        fade_ctl.load_state_dict(ctl.state_dict())
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
    greedy = evaluate(model, tok, task, val_pairs, max_new, batch_size=cfg.eval_batch_size, **eval_kw)
    out = {"greedy_acc": sum(greedy) / len(greedy)}
    if cfg.pass1_size > 0 and cfg.pass1_n > 0:
        # sampling here must not touch the training RNG streams: manual_seed reseeds the CPU generator and every CUDA
        # device's, so all of them are forked (forking none of CUDA's reset a CUDA run's rollout stream to the same
        # state after every validation)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(10_000 + cfg.seed)
            p1 = evaluate(model, tok, task, val_pairs[:cfg.pass1_size], max_new, batch_size=cfg.eval_batch_size,
                          do_sample=True, n=cfg.pass1_n, temperature=cfg.val_temperature, **eval_kw)
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

    def __init__(self, out_dir: Optional[str], config: dict, progress: Optional[Callable] = None,
                 resumed: Optional[List[dict]] = None):
        """``resumed``: the records of a checkpoint being resumed; ``records.jsonl`` restarts from them (records
        written after the checkpoint are dropped) and ``config.json`` keeps the original run's, with the
        settings a resume may change (``checkpoint.RESUMABLE_CHANGES``: ``steps`` ...) updated to this run's."""
        self.records: List[dict] = list(resumed or [])
        self.progress = progress
        self._f = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "config.json")
            if resumed is not None and os.path.isfile(path):
                try:
                    with open(path) as f:
                        kept = json.load(f)
                    kept["train"].update({k: config["train"][k] for k in ckpt.RESUMABLE_CHANGES})
                    config = kept
                except (ValueError, KeyError, TypeError, AttributeError):   # damaged: this run's config instead
                    pass
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(_json_safe(config), f, indent=1)
            os.replace(tmp, path)
            self._f = open(os.path.join(out_dir, "records.jsonl"), "w")
            for rec in self.records:
                self._f.write(json.dumps(rec) + "\n")
            self._f.flush()

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



class PhaseTimer:
    """Times one phase of a step into a record: ``t_<phase>`` wall-clock seconds (``perf_counter`` after a
    device sync, so queued CUDA work is counted), ``cpu_<phase>`` process CPU seconds (``time.process_time``,
    all threads of this process) and, on CUDA, ``gpu_<phase>`` seconds between two CUDA events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, rec: dict):
        ev = None
        if self.cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        w0 = self.now()
        c0 = time.process_time()
        if ev is not None:
            ev[0].record()
        yield
        if ev is not None:
            ev[1].record()
        rec[f"t_{name}"] = self.now() - w0
        rec[f"cpu_{name}"] = time.process_time() - c0
        if ev is not None:
            rec[f"gpu_{name}"] = ev[0].elapsed_time(ev[1]) / 1000.0


def train(cfg: TrainConfig, *, progress: Optional[Callable[[dict], None]] = None, log=print) -> List[dict]:
    """Run one method; return its per-step records (also written to ``cfg.out_dir/records.jsonl`` if set).

    The engine (``engines.make_engine``) is plain PyTorch, or DeepSpeed with ``cfg.deepspeed`` (one call per
    rank under ``torchrun`` / ``deepspeed``; every rank builds the same records, rank 0 writes them and calls
    ``progress``). ``cfg.save_steps`` writes a checkpoint every N steps, ``cfg.resume`` continues from one,
    ``cfg.save_model`` saves the final policy + tokenizer into ``<out_dir>/model`` (``checkpoint`` module).
    """
    cfg.validate()
    engine = make_engine(cfg)
    try:
        return _run(cfg, engine, progress, log)
    finally:
        engine.close()


def _run(cfg: TrainConfig, engine: Engine, progress, log) -> List[dict]:
    device, rank, world = engine.device, engine.rank, engine.world
    resume = ckpt.resolve_resume(cfg.resume, cfg.out_dir) if cfg.resume else None
    config = {"train": dataclasses.asdict(cfg)}
    if resume is not None:
        ckpt.check_config(resume, config["train"], getattr(engine, "ds_config", None))
    model, tok, task, model_key = build_policy(cfg, device)   # same init_seed -> same weights on every rank
    max_new = cfg.max_new_tokens or task.max_answer_chars + 1
    val_pairs = validation_set(cfg, task)
    ws = warm_start(cfg, model, tok, task, model_key, val_pairs, max_new, log=log) if engine.lead else None
    ws = engine.share_warm_start(model, ws)
    fpa = cfg.algo in FPA_ALGOS
    ref_model = ref_fp = None
    if fpa or cfg.beta:  # the warm-start policy, frozen, is the reference (offline objectives, KL penalty)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if resume is not None or (cfg.out_dir and cfg.save_steps > 0):   # (hashing a large model takes seconds)
            ref_fp = ckpt.weights_fingerprint(ref_model)   # a resume rebuilds it: checked against the checkpoint's
    engine.setup(model, loss_kwargs(cfg, max_new))
    rule, policy = engine.rule, engine.policy
    static = engine.static
    torch.manual_seed(cfg.seed + 100_003 * rank)      # each rank samples its own responses
    train_pairs = task.sample(cfg.steps * cfg.prompts * world, "train", seed=cfg.seed)
    fade_ctl = None
    if cfg.advantage == "fade":
        fade_ctl = FADEController() if cfg.fade_target_entropy is None else \
            FADEController(target_entropy=cfg.fade_target_entropy)
    config.update(warm_start=ws, **engine.config_entries())
    timer = PhaseTimer(device)

    def validate() -> dict:
        with engine.eval_mode():
            return validate_policy(cfg, policy, tok, task, val_pairs, max_new, **engine.gen_kw)

    start, bp_total, opt_total, wall, gate_fired_at, resumed = 0, 0, 0, 0.0, None, None
    if resume is not None:
        st, resumed = ckpt.load_checkpoint(resume, engine)
        ckpt.check_reference(resume, st, ref_fp)   # before records.jsonl is rewritten below
        if int(st["step"]) > cfg.steps:
            raise ValueError(f"--resume {resume!r}: the checkpoint is at step {int(st['step'])}, past --steps "
                             f"{cfg.steps} (a resume can extend a run, not shorten it)")
        start, bp_total, opt_total = int(st["step"]), int(st["backward_passes"]), int(st["optimizer_steps"])
        wall, gate_fired_at = float(st["wall_clock"]), st["gate_fired_at"]
        if rule is not None:
            rule.load_state_dict(st["rule"])
        if fade_ctl is not None:
            fade_ctl.load_state_dict(st["fade"])
        if not cfg.quiet and engine.lead:
            log(f"resumed from {resume} at step {start}")
        if engine.lead and cfg.out_dir:   # records.jsonl restarts at `start`: later checkpoints are another run's
            for old in ckpt.set_aside_later(cfg.out_dir, start):
                log(f"set aside {old} (a later checkpoint of the continuation this resume replaces)")
    emit = RecordLog(cfg.out_dir if engine.lead else None, config, progress if engine.lead else None, resumed)
    records = emit.records
    try:
        if resume is None:
            rec0 = {"step": 0, "backward_passes": 0, "optimizer_steps": 0, "wall_clock": 0.0, "warm_start": ws,
                    "method": static}
            with timer.phase("val", rec0):
                rec0["val"] = validate()
            emit(rec0)
        for step in range(start + 1, cfg.steps + 1):
            if cfg.lr_scheduler_type != "constant":   # (else a DeepSpeed config's own scheduler stays in charge)
                engine.set_lr(learning_rate(cfg, step))
            rec = {"step": step, "learning_rate": engine.current_lr()}
            with timer.phase("rollout", rec):
                lo = ((step - 1) * world + rank) * cfg.prompts
                ro = rollout(policy, tok, task, train_pairs[lo:lo + cfg.prompts], cfg.group, max_new,
                             cfg.temperature, ref_model=ref_model if cfg.beta else None, **engine.gen_kw)
                g = ro.rewards.view(-1, cfg.group)
                r_mean, frac0, ent, rlen = engine.dp_mean([
                    float(ro.rewards.mean()), float((g.max(-1).values == g.min(-1).values).float().mean()),
                    ro.entropy, float(ro.mask.float().sum(-1).mean())])
                adv, fade_state = compute_advantages(cfg, ro.rewards, ent, fade_ctl, mean_reward=r_mean)

            timing = {"bwd": 0.0, "cpu_bwd": 0.0, "passes": 0}
            first = {}
            B, n_mb = ro.resp.shape[0], engine.micro_batches
            mb = B // n_mb
            weights = engine.loss_weights(ro.mask, cfg.agg_mode)

            slow_pass_k = rule.K if getattr(rule, "entropy_signal", None) == "slow_pass" else None

            def closure():
                tb, cb = timer.now(), time.process_time()
                k = rule.pass_index if rule is not None else 0
                # paper protocol: passes after the first use the current policy as "old" (ratio = 1); the
                # rollout's old log-probs are pi_theta0's, i.e. exact for pass 0. PPO epochs keep them (clip).
                old = None if (rule is not None and cfg.recompute_old_logp and k > 0) else ro.old_logp
                engine.zero_grad()
                total, msum = 0.0, {}
                for j in range(n_mb):
                    sl = slice(j * mb, (j + 1) * mb)
                    loss = engine.forward(ro.prompt_ids[sl], ro.prompt_attn[sl], ro.resp[sl], ro.mask[sl], adv[sl],
                                          None if old is None else old[sl],
                                          None if ro.ref_logp is None else ro.ref_logp[sl])
                    engine.backward(loss, weights[j], last=j == n_mb - 1)
                    total += float(loss.detach()) * weights[j]
                    for name, v in engine.module.metrics.items():
                        msum[name] = msum.get(name, 0.0) + float(v) / n_mb
                total = engine.dp_mean([total])[0]           # the rule logs it: the same value on every rank
                timing["bwd"] += timer.now() - tb
                timing["cpu_bwd"] += time.process_time() - cb
                timing["passes"] += 1
                if not first:
                    first.update(loss=total, metrics=msum)
                if k == slow_pass_k:                         # SFPO's slow pass reports its entropy to the gate
                    return total, engine.dp_mean([msum["entropy"]])[0]
                return total

            with timer.phase("update", rec):
                if fpa:
                    info, got, tb, cb, passes = fpa_offline.update(
                        cfg, policy, ref_model, engine.optimizer, [p for p in policy.parameters() if p.requires_grad],
                        ro, adv, timer.now)
                    first.update(got)
                    timing["bwd"] += tb
                    timing["cpu_bwd"] += cb
                    timing["passes"] += passes
                elif rule is None:
                    info, skips = {"grad_norm": []}, 0
                    for _ in range(cfg.epochs if cfg.algo == "grpo_epochs" else 1):
                        closure()
                        info["grad_norm"].append(engine.optimizer_step())
                        # a pass whose gradient is not finite takes no optimizer step (asked right after it)
                        skips += engine.step_skipped(info["grad_norm"][-1])
                    info.update(backward_passes=timing["passes"], optimizer_steps=timing["passes"] - skips,
                                skipped=skips == timing["passes"])
                else:
                    kw = {"entropy": ro.entropy} if rule.gate.needs_entropy and slow_pass_k is None else {}
                    info = dict(rule.step(closure, **kw))
            if rule is not None:
                bp_total, opt_total = int(rule.total_backward_passes), int(rule.total_optimizer_steps)
            else:
                bp_total += timing["passes"]
                opt_total += int(info["optimizer_steps"])
            wall += rec["t_rollout"] + rec["t_update"]

            names = sorted(first.get("metrics", {}))
            metrics = dict(zip(names, engine.dp_mean([first["metrics"][n] for n in names]))) if not fpa \
                else first.get("metrics", {})
            upd = dict(static)
            upd.update(info)
            if "fell_back" in upd and "fallback" not in upd:
                upd["fallback"] = upd["fell_back"]   # the name stats.effective_step_multiplier reads
            rec.update({"reward_mean": r_mean, "frac_zero_adv_groups": frac0, "rollout_entropy": ent,
                        "response_len": rlen, "loss": first.get("loss"), "metrics": metrics, "update": upd,
                        "backward_passes": bp_total, "optimizer_steps": opt_total, "wall_clock": wall,
                        "t_backward": timing["bwd"], "t_optimizer": max(rec["t_update"] - timing["bwd"], 0.0),
                        # CPU time of the passes, for the speedup report's cost model
                        "cpu_backward": timing["cpu_bwd"]})
            if fade_state is not None:
                rec["fade"] = dict(fade_state)
            if fpa:
                rec["fpa"] = {k: metrics.get(k) for k in ("pairs", "c_w_mean", "c_l_mean")}
                rec["fpa"]["pairs"] = info["pairs"]
            gate_fired_at = mark_gate(rec, upd, rule, info, step, gate_fired_at)
            if step % cfg.val_every == 0 or step == cfg.steps:
                with timer.phase("val", rec):
                    rec["val"] = validate()
            emit(rec)
            if cfg.out_dir and cfg.save_steps > 0 and step % cfg.save_steps == 0:
                state = {"step": step, "backward_passes": bp_total, "optimizer_steps": opt_total, "wall_clock": wall,
                         "gate_fired_at": gate_fired_at, "rule": None if rule is None else rule.state_dict(),
                         "fade": None if fade_ctl is None else fade_ctl.state_dict(), "ref_fingerprint": ref_fp}
                ckpt.save_checkpoint(cfg.out_dir, step, engine, state, records, config["train"])
        if cfg.out_dir and cfg.save_model:
            ckpt.save_final_model(cfg.out_dir, engine, tok)
    finally:
        emit.close()
    return records
