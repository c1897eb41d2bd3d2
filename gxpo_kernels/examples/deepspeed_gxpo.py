"""GXPO (or SFPO) with the fused GRPO loss inside DeepSpeed ZeRO-2 / ZeRO-3, on a tiny random Qwen2.

Launch (CPU, gloo; 2 processes):
    torchrun --nproc_per_node 2 -m gxpo_kernels.examples.deepspeed_gxpo --config ds_zero3.json
    torchrun --nproc_per_node 2 -m gxpo_kernels.examples.deepspeed_gxpo --config ds_zero2.json --algo sfpo
GPUs (NCCL):
    deepspeed --num_gpus 2 --module gxpo_kernels.examples.deepspeed_gxpo --config ds_zero3.json

Toy task (no data, no tokenizer): the prompt is 4 random digits, the completion is 6 sampled tokens, and the
reward is the fraction of completion tokens equal to the prompt's first digit. Every rank samples its own
prompts (G samples each), computes group advantages, and one GXPO outer update runs per mini-batch: the closure
replays the ``gradient_accumulation_steps`` micro-batches through ``engine(...)`` (the fused lm_head + GRPO
loss of ``CausalLMGRPOLoss``) and ``engine.backward``; the rule calls ``engine.step()``, extrapolates each rank's
fp32 master shard in place, and takes every decision from dp-all-reduced statistics.
Set ``DS_ACCELERATOR=cpu`` on machines without GPUs (DeepSpeed then uses gloo).
"""
import argparse
import json
import time

import torch
import transformers

import deepspeed
from deepspeed.accelerator import get_accelerator

from gxpo_kernels.advantages import group_advantages
from gxpo_kernels.examples import find_config
from gxpo_kernels.integrations import deepspeed as gds

V, PROMPT, COMPLETION = 16, 4, 6


def tiny_lm(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


@torch.no_grad()
def rollout(lm, prompts: torch.Tensor, G: int, dtype) -> torch.Tensor:
    """Sample COMPLETION tokens for each prompt G times (a fixed number of forwards on every rank: ZeRO-3
    gathers parameters collectively inside each forward)."""
    ids = prompts.repeat_interleave(G, 0)
    for _ in range(COMPLETION):
        logits = lm(input_ids=ids, use_cache=False).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ids = torch.cat([ids, nxt], 1)
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="ds_zero3.json", help="a DeepSpeed JSON file, or the name of a shipped one")
    ap.add_argument("--algo", choices=("gxpo", "sfpo"), default="gxpo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rank and step")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=-1)   # passed by the deepspeed launcher
    args = ap.parse_args()

    gds.apply_shm_setting()                                 # GXPO_DEEPSPEED_SHM=0: no shm-op build on CPU
    deepspeed.init_distributed()                            # gloo on CPU, NCCL on GPUs
    rank = torch.distributed.get_rank()
    with open(find_config(args.config)) as f:
        cfg = json.load(f)
    gas = cfg["gradient_accumulation_steps"]
    n = args.prompts * args.group
    cfg["train_micro_batch_size_per_gpu"] = n // gas
    model = gds.CausalLMGRPOLoss(tiny_lm(args.seed), fused_linear=True, loss_agg_mode="token-mean")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rule_kw = dict(K=5, alpha=0.5, tau=0.5, gate="window", window=4) if args.algo == "gxpo" else \
        dict(K=3, alpha=0.8, gate=None)
    engine, rule = gds.initialize(model=model, config=cfg, optimizer=opt, **{args.algo: rule_kw})
    dev = torch.device(get_accelerator().current_device_name())
    dtype = next(engine.module.parameters()).dtype
    gen = torch.Generator().manual_seed(1000 * args.seed + rank)
    if rank == 0:
        print(f"[{args.algo}] ZeRO stage {engine.zero_optimization_stage()} ({rule.zero.kind}), "
              f"{torch.distributed.get_world_size()} ranks, gas {gas}, local fp32 shard "
              f"{sum(s.numel() for s in rule.zero.shards())} of "
              f"{sum(p.ds_numel if hasattr(p, 'ds_numel') else p.numel() for p in engine.module.parameters())}"
              f" params", flush=True)
    t0 = time.time()
    for step in range(args.steps):
        prompts = torch.randint(0, 10, (args.prompts, PROMPT), generator=gen).to(dev)
        engine.eval()
        ids = rollout(engine.module.model, prompts, args.group, dtype)
        engine.train()
        target = ids[:, :1]
        rewards = (ids[:, PROMPT:] == target).float().mean(1)
        adv = group_advantages(rewards.cpu(), group_size=args.group).to(dev)
        am = torch.ones_like(ids)
        mb = n // gas

        def closure():
            total = 0.0
            for j in range(gas):
                sl = slice(j * mb, (j + 1) * mb)
                loss = engine(ids[sl], am[sl], adv[sl], None, COMPLETION)
                engine.backward(loss)
                total += float(loss.detach()) / gas
            return total

        info = rule.step(closure)
        r = rewards.mean().to(dev)
        torch.distributed.all_reduce(r)
        if rank == 0:
            extra = f" scale_mean {info['scale_mean']:.3f}" if "scale_mean" in info else ""
            print(f"step {step}: reward {float(r) / torch.distributed.get_world_size():.3f} loss {info['loss']:+.4f}"
                  f" active {info['active']} fell_back {info['fell_back']} passes {info['backward_passes']}"
                  f"{extra} gate_fired_step {info.get('gate_fired_step')} global_steps {engine.global_steps}"
                  f" lr {engine.get_lr()[0]:.1e}", flush=True)
    if rank == 0:
        print(f"done: {args.steps} outer steps in {time.time() - t0:.1f} s, {rule.total_backward_passes} backward "
              f"passes, {rule.fallbacks} fallbacks", flush=True)


if __name__ == "__main__":
    main()
