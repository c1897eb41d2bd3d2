"""``gxpo-kernels`` command line: ``speedup`` (all methods x seeds + report) and ``train`` (one method).

    gxpo-kernels speedup                      # the embedded default: tiny Qwen2, addition, 6 methods x 3 seeds
    gxpo-kernels speedup --preset smoke       # < 2 minutes on 2 CPU cores
    gxpo-kernels train --algo gxpo --advantage fade --task sort --steps 100 --out runs/gxpo-sort
    gxpo-kernels train --algo fpa_dpo --fpa-lam 1.0 --steps 100    # offline FPA-DPO on rollout pairs
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gxpo_kernels.cli train --deepspeed ds_zero2.json --algo gxpo
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

from .trainer.config import ADVANTAGES, ALGOS, FPA_SIDES, GATES, TrainConfig, parse_method, preset
from .trainer.tasks import TASKS

PRESETS = ("default", "smoke", "test")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and model")
    g.add_argument("--task", choices=sorted(TASKS), help="toy task (default addition)")
    g.add_argument("--model", metavar="PATH", help="local transformers model folder (default: tiny Qwen2 from config)")
    g.add_argument("--arch", choices=("qwen2", "llama"), help="tiny model family (default qwen2)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 for speedup with the built-in model on CPU, else torch's)")
    g = p.add_argument_group("RL")
    g.add_argument("--steps", type=int, help="RL steps per run")
    g.add_argument("--prompts", type=int, help="prompts per step (P)")
    g.add_argument("--group", type=int, help="samples per prompt (G)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-5)")
    g.add_argument("--max-new-tokens", type=int, help="rollout length cap (default: longest answer + EOS)")
    g.add_argument("--loss-agg-mode", help="token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                                          "seq-mean-token-sum-norm (default token-mean; Dr.GRPO's for drgrpo)")
    g.add_argument("--no-recompute-old-logp", action="store_true",
                   help="SFPO/GXPO: keep the rollout's old log-probs on every pass (default: recompute, paper)")
    g.add_argument("--gxpo-K", type=int)
    g.add_argument("--gxpo-alpha", type=float)
    g.add_argument("--gxpo-tau", type=float)
    g.add_argument("--gxpo-gate", choices=GATES, help="GXPO gate (default window; 'none' = always active)")
    g.add_argument("--sfpo-K", type=int)
    g.add_argument("--sfpo-alpha", type=float)
    g.add_argument("--sfpo-gate", choices=GATES, help="SFPO gate (default entropy)")
    g.add_argument("--epochs", type=int, help="grpo_epochs: optimizer steps per batch (default 3)")
    g.add_argument("--fpa-lam", type=float, help="fpa_*: extrapolation lambda of the future policy (default 1; "
                   "0 = the base objective)")
    g.add_argument("--fpa-side", choices=FPA_SIDES, help="fpa_*: coefficients at pi_hat on both sides (default) "
                   "or on the rejected side only")
    g.add_argument("--fpa-beta", type=float, help="fpa_dpo / fpa_rpo / fpa_kto: beta (default 0.1)")
    g = p.add_argument_group("validation and warm start")
    g.add_argument("--val-every", type=int, help="validate every N steps (default 10)")
    g.add_argument("--val-size", type=int, help="held-out prompts for greedy accuracy (default 2048)")
    g.add_argument("--pass1-size", type=int, help="prompts for pass@1 (0 = off)")
    g.add_argument("--pass1-n", type=int, help="samples per prompt for pass@1")
    g.add_argument("--sft-steps", type=int, help="warm-start step cap (default 1500; 0 = no warm start)")
    g.add_argument("--sft-target", type=float, help="warm start stops at this greedy accuracy (default 0.30)")
    g.add_argument("--cache-dir", help="warm-start cache folder (default: <out>/../.warmstart-cache)")
    g.add_argument("--deepspeed", metavar="JSON", help="train: run on a DeepSpeed ZeRO engine with this config "
                   "(launch with torchrun / deepspeed; see the README)")
    g.add_argument("--quiet", action="store_true")


_TRAIN_FIELDS = {"task": "task", "model": "model", "arch": "arch", "device": "device", "steps": "steps",
                 "prompts": "prompts", "group": "group", "lr": "lr", "max_new_tokens": "max_new_tokens",
                 "loss_agg_mode": "loss_agg_mode", "gxpo_K": "gxpo_K", "gxpo_alpha": "gxpo_alpha",
                 "gxpo_tau": "gxpo_tau", "gxpo_gate": "gxpo_gate", "sfpo_K": "sfpo_K", "sfpo_alpha": "sfpo_alpha",
                 "sfpo_gate": "sfpo_gate", "epochs": "epochs", "val_every": "val_every", "val_size": "val_size",
                 "pass1_size": "pass1_size", "pass1_n": "pass1_n", "cache_dir": "cache_dir",
                 "deepspeed": "deepspeed", "quiet": "quiet", "fpa_lam": "fpa_lam", "fpa_side": "fpa_side",
                 "fpa_beta": "fpa_beta"}


def _apply(tc: TrainConfig, a: argparse.Namespace) -> TrainConfig:
    # "is not None", not "in (None, False)": 0.0 == False would drop e.g. --fpa-lam 0
    kw = {f: getattr(a, k) for k, f in _TRAIN_FIELDS.items()
          if getattr(a, k, None) is not None and getattr(a, k) is not False}
    if a.no_recompute_old_logp:
        kw["recompute_old_logp"] = False
    sft = tc.sft
    if a.sft_steps is not None:
        sft = dataclasses.replace(sft, max_steps=a.sft_steps)
    if a.sft_target is not None:
        sft = dataclasses.replace(sft, target_acc=a.sft_target)
    return tc.replace(sft=sft, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gxpo-kernels", description="GRPO / SFPO / GXPO trainer and speedup runner")
    # the deepspeed launcher puts --local_rank=N before the sub-command; LOCAL_RANK is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("speedup", help="run methods x seeds from one warm start and report speedup to peak")
    s.add_argument("--preset", choices=PRESETS, default="default", help="default (<= 20 min on 2 CPU cores), "
                   "smoke (< 2 min), test (seconds; for the test suite)")
    s.add_argument("--methods", help="comma list, e.g. grpo,sfpo,gxpo,gxpo+fade,grpo_lr,grpo_epochs "
                   "(algo[+advantage], algo in %s, advantage in %s)" % (ALGOS, ADVANTAGES))
    s.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    s.add_argument("--lr-mult", type=float, help="grpo_lr's lr multiplier (default: measured from GXPO/SFPO)")
    s.add_argument("--out", help="output folder (default ./runs/speedup-<timestamp>)")
    s.add_argument("--no-progress", action="store_true")
    _common(s)

    t = sub.add_parser("train", help="run one method")
    t.add_argument("--algo", choices=ALGOS, default="grpo")
    t.add_argument("--advantage", choices=ADVANTAGES, default="grpo")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init-seed", type=int, default=0, help="model init + warm start seed")
    t.add_argument("--lr-mult", type=float, help="grpo_lr: lr multiplier (default 1)")
    t.add_argument("--out", help="output folder (default ./runs/<algo>-<timestamp>)")
    t.add_argument("--fsdp", action="store_true", help="run on PyTorch FSDP2 (launch with torchrun)")
    t.add_argument("--save-steps", type=int, help="write <out>/checkpoint-<step> every N steps (default 0 = never)")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint folder, or 'latest' in --out")
    t.add_argument("--loss-path", choices=("fused_linear", "logits"),
                   help="training loss from hidden states + lm_head (default) or from materialised logits")
    _common(t)
    return p


def _speedup(a) -> int:
    from .trainer.speedup import format_table, run_speedup

    if a.deepspeed:
        raise ValueError("--deepspeed works with `train` (one method per launch), not with `speedup`")
    cfg = preset(a.preset)
    tc = _apply(cfg.train, a)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods else cfg.methods
    for m in methods:
        parse_method(m)
    seeds = tuple(range(a.seeds)) if a.seeds else cfg.seeds
    if a.model:   # fail fast, before any warm start
        from .trainer.model import load_local_model, pick_device
        load_local_model(a.model, pick_device(tc.device))
    cfg = dataclasses.replace(cfg, train=tc, methods=methods, seeds=seeds, lr_mult=a.lr_mult, out_dir=a.out)
    t0 = time.perf_counter()
    out = run_speedup(cfg, progress=not a.no_progress)
    print(format_table(out["results"]))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; outputs in {out['out_dir']}")
    return 0


def _train(a) -> int:
    from .trainer.loop import train

    tc = _apply(TrainConfig(algo=a.algo, advantage=a.advantage, seed=a.seed, init_seed=a.init_seed), a)
    if a.lr_mult is not None:
        tc = tc.replace(lr_mult=a.lr_mult)
    tc = tc.replace(fsdp=a.fsdp, **{k: getattr(a, k) for k in ("save_steps", "resume", "loss_path")
                                    if getattr(a, k) is not None})
    out = a.out or os.path.join("runs", f"{a.algo}-" + time.strftime("%Y%m%d-%H%M%S"))
    tc = tc.replace(out_dir=out)

    def show(rec):
        if rec.get("val") and not tc.quiet:
            v = rec["val"]
            print(f"step {rec['step']:4d}  greedy {v['greedy_acc']:.3f}  pass@1 {v.get('pass1', float('nan')):.3f}"
                  f"  reward {rec.get('reward_mean', float('nan')):.3f}  bp {rec['backward_passes']}"
                  f"  wall {rec['wall_clock']:.1f}s", flush=True)

    train(tc, progress=show)
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun / deepspeed only rank 0 writes records
        print(f"records: {os.path.join(os.path.abspath(out), 'records.jsonl')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    elif a.command == "speedup" and getattr(a, "model", None) is None and not torch.cuda.is_available():
        # the built-in 0.5M-parameter policy gains nothing from a second thread and loses a lot when the
        # cores are shared; one thread keeps the default run inside its 20-minute budget on 2 cores
        torch.set_num_threads(1)
    try:
        return _speedup(a) if a.command == "speedup" else _train(a)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"gxpo-kernels: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
