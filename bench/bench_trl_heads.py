"""Side-by-side of the fused LM heads a TRL GRPO step can use: peak extra memory and CPU time of one loss
forward + backward from the final hidden states, on the CPU.

Providers (same inputs: hidden (B, T, H) fp32, lm_head (V, H), targets, a padded loss mask, advantages, old
log-probs; TRL's ``grpo`` loss with epsilon 0.2 / 0.28, no KL):
  gxpo_hook     what ``enable_gxpo_loss`` runs on the hidden path: ``linear_token_logprobs`` (log-prob and
                entropy; the (N, V) logits never exist) + ``trl_policy_loss``
  trl_fused     TRL 1.16's own fused head (``add_fused_lm_head`` -> ``trl.kernels.ChunkedLogProbFunction``,
                log-prob and entropy) + the same ``trl_policy_loss``
  trl_logits    the logits path (what a model without a fused head does): hidden @ W.T, fp32 log_softmax,
                gather and entropy + the same ``trl_policy_loss``
  liger         Liger-Kernel's ``LigerFusedLinearGRPOLoss(compiled=False, loss_type="grpo")``, its own chunked
                loss (no entropy output)

Each provider runs in a fresh interpreter: inputs first, then its first step's extra peak RSS (the RSS
high-water mark is reset just before, /proc/self/clear_refs), then ``REPS`` more steps timed with the process's
CPU time (all threads; one thread is used). Before measuring, every provider's d(hidden) is checked against
``trl_logits`` at a small size.

    python -m bench.bench_trl_heads                 # writes bench/results/cpu-trl-heads.json
    python -m bench.trl_heads_table --write docs/trl.md   # regenerates the table in the docs
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CFG = dict(B=6, T=512, H=896, V=32000)          # 3,072 tokens; a Qwen2.5-0.5B-wide head with a 32k vocabulary
CHECK_CFG = dict(B=2, T=24, H=40, V=501)
PROVIDERS = ("gxpo_hook", "trl_fused", "trl_logits", "liger")
_NEEDS = {"trl_fused": "trl", "liger": "liger_kernel"}      # optional packages of two providers
REPS = 2
EPS_LOW, EPS_HIGH = 0.2, 0.28
OUT = Path(__file__).resolve().parent / "results" / "cpu-trl-heads.json"


def make_inputs(cfg):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = cfg["B"], cfg["T"], cfg["H"], cfg["V"]
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    for i in range(B):                                   # ragged completions
        mask[i, T - (i * T) // (2 * B):] = False
    adv = torch.randn(B, generator=g)
    old = -torch.log(torch.tensor(float(V))) + 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, tokens, mask, adv, old


def make_step(provider, inputs):
    """A closure running one loss forward + backward of ``provider``; returns d(hidden)."""
    from gxpo_kernels.integrations.trl import GRPOLossOptions, trl_policy_loss
    hidden, weight, tokens, mask, adv, old = inputs
    B, T, H = hidden.shape
    opts = GRPOLossOptions(eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg_mode="seq-mean-token-mean")

    def trl_loss(logp, ent):
        return trl_policy_loss(logp, ent, mask, adv, old, None, opts, loss_type="grpo")[0]

    if provider == "gxpo_hook":
        from gxpo_kernels.ops.logprobs.linear import linear_token_logprobs

        def fwd():
            logp, ent = linear_token_logprobs(hidden, weight, tokens, 1.0, mask=mask)
            return trl_loss(logp, ent)
    elif provider == "trl_fused":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def fwd():
            out = ChunkedLogProbFunction.apply(hidden.reshape(-1, H), weight, None, tokens.reshape(-1), 1.0,
                                               _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",))
            logp, ent = (x.view(B, T).masked_fill(~mask, 0) for x in out[:2])
            return trl_loss(logp, ent)
    elif provider == "trl_logits":
        def fwd():
            logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
            logp = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
            ent = -(logprobs.exp() * logprobs).sum(-1)
            return trl_loss(logp, ent)
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, loss_type="grpo", epsilon_low=EPS_LOW,
                                       epsilon_high=EPS_HIGH, use_ref_model=False)

        def fwd():   # the bool mask the other heads get (Liger reads it as a float one: no per-step copy)
            return mod(hidden, weight, tokens, mask, adv, old_per_token_logps=old)[0]
    else:
        raise ValueError(provider)

    def step():
        hidden.grad = weight.grad = None
        fwd().backward()
        return hidden.grad

    return step


def check(provider) -> float:
    """Relative norm error of the provider's d(hidden) against ``trl_logits`` (small size)."""
    inputs = make_inputs(CHECK_CFG)
    want = make_step("trl_logits", inputs)().clone()
    got = make_step(provider, inputs)().clone()
    return float((got - want).norm() / want.norm())


def measure(provider) -> dict:
    """In a fresh interpreter: the first step's extra peak RSS, then the CPU time of REPS steps."""
    from bench._common import step_peak_rss
    torch.set_num_threads(1)
    err = check(provider)
    step = make_step(provider, make_inputs(CFG))
    mem = step_peak_rss(step)
    times = []
    for _ in range(REPS):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return dict(provider=provider, rel_err_dhidden=err, peak_extra_mib=mem["peak_extra_mib"],
                cpu_s=statistics.median(times), cpu_s_all=times)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_providers_agree_with_logits_path(provider):
    """What pytest (and the BENCH_SMOKE=1 smoke run) checks of this script: every provider's d(hidden) agrees
    with the logits path at the small CHECK_CFG size (a provider whose package is not installed skips). The
    measurement itself is ``main()``."""
    if provider in _NEEDS:
        pytest.importorskip(_NEEDS[provider])
    assert check(provider) < 1e-5, provider


def main() -> None:
    import argparse
    argparse.ArgumentParser(prog="python -m bench.bench_trl_heads", description=__doc__.split("\n\n")[0]
                            + f" Writes {OUT.relative_to(OUT.parents[2])}.").parse_args()
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", PYTHONPATH=root)
    rows = []
    for p in PROVIDERS:
        code = f"import json, bench.bench_trl_heads as b; print(json.dumps(b.measure({p!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import liger_kernel
    import trl
    from importlib.metadata import version
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), threads=1, torch=torch.__version__, trl=trl.__version__,
                liger_kernel=version("liger-kernel"), cfg=CFG, tokens=CFG["B"] * CFG["T"], reps=REPS,
                timer="time.process_time (CPU seconds, median of reps)",
                memory="extra peak RSS of the first step over the inputs (fresh process per provider)")
    del liger_kernel
    OUT.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
