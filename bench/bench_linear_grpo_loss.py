"""Peak memory and time of one GRPO-loss forward+backward from hidden states, by provider.

Providers (same inputs, same GRPO options: token-mean, beta=0.04 with ref log-probs, old log-probs):
  fused        gxpo_kernels.linear_grpo_loss (torch chunked backend on CPU, Triton on CUDA)
  materialised logits = hidden @ W.T + b, then gxpo_kernels.ops.grpo_loss on the logits
  eager        plain PyTorch: logits, fp32 log_softmax over V, gather, entropy, the shared GRPO loss math
  liger        LigerFusedLinearGRPOLoss(compiled=False, loss_type="bnpo"), Liger's chunked torch path

Time: pytest-benchmark around the fwd+bwd step. Peak memory: on CPU each provider runs in a fresh subprocess
that resets the kernel's RSS high-water mark (/proc/self/clear_refs) after building the inputs, so the figure
is the step's own extra peak RSS; on CUDA, torch.cuda.max_memory_allocated above the inputs.

    python -m pytest bench/bench_linear_grpo_loss.py --benchmark-json=bench/results/cpu-linear-grpo-loss.json

``BENCH_SMOKE=1``: tiny sizes, no memory subprocess, and each provider's d(hidden) is checked against eager.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from ._common import cpu_peak_subprocess, cuda_step_peak_mib, step_peak_rss
from .roofline import linear_grpo_loss_flops

SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"   # tiny sizes: the CI smoke test of the bench suite
CPU_CFG = dict(B=8, T=512, H=512, V=32000, dtype="float32")
GPU_CFG = dict(B=8, T=2048, H=4096, V=151936, dtype="bfloat16")
if SMOKE:
    CPU_CFG = dict(B=2, T=16, H=40, V=501, dtype="float32")
    GPU_CFG = dict(B=2, T=64, H=128, V=1001, dtype="bfloat16")
PROVIDERS = ("fused", "materialised", "eager", "liger")
OPTS = dict(beta=0.04, eps_low=0.2, eps_high=0.2)


def make_inputs(cfg, device):
    """Inputs drawn on ``device`` directly (no host draw and copy of the O(V*H) weight)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, V = cfg["B"], cfg["T"], cfg["H"], cfg["V"]
    dt = getattr(torch, cfg["dtype"])
    kw = dict(generator=g, device=device)
    hidden = (torch.randn(B, T, H, **kw) * 0.5).to(dt).requires_grad_()
    weight = (torch.randn(V, H, **kw) / H ** 0.5).to(dt).requires_grad_()
    bias = None
    tokens = torch.randint(0, V, (B, T), **kw)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, T - T // 8:] = False          # some padding
    adv = torch.randn(B, **kw)
    # near the model's own log-probs (logits have std ~0.5), so ratios clip sometimes and k3 never hits its clamp
    old = -math.log(V) + 0.3 * torch.randn(B, T, **kw)
    ref = old + 0.1 * torch.randn(B, T, **kw)
    return hidden, weight, bias, tokens, adv, mask, old, ref


def useful_flops(cfg, n_valid: int) -> int:
    """6 * N_valid * H * V (``roofline.linear_grpo_loss_flops``): the fused op skips masked rows, so they are
    not counted (the recompute neither)."""
    return linear_grpo_loss_flops(cfg["B"] * cfg["T"], cfg["H"], cfg["V"], n_valid=n_valid)


def make_step(provider, inputs):
    """A closure running one forward + backward of ``provider`` (grads are dropped each time)."""
    from gxpo_kernels.losses import GRPOLossOptions, grpo_token_loss
    hidden, weight, bias, tokens, adv, mask, old, ref = inputs

    if provider == "fused":
        from gxpo_kernels.ops.grpo.linear import linear_grpo_loss

        def fwd():
            return linear_grpo_loss(hidden, weight, tokens, adv, mask, old, ref, bias=bias, **OPTS)[0]
    elif provider == "materialised":
        from gxpo_kernels.ops.grpo.op import grpo_loss

        def fwd():
            logits = hidden @ weight.T
            return grpo_loss(logits, tokens, adv, mask, old, ref, **OPTS)[0]
    elif provider == "eager":
        opts = GRPOLossOptions(**OPTS)

        def fwd():
            logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
            logp = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            return grpo_token_loss(logp, entropy, adv, mask, old, ref, opts)[0]
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        mod = LigerFusedLinearGRPOLoss(beta=OPTS["beta"], compiled=False, loss_type="bnpo",
                                       epsilon_low=OPTS["eps_low"], epsilon_high=OPTS["eps_high"])

        def fwd():
            # the same bool mask as the other providers (Liger reads it as it reads a float one: no per-call copy)
            return mod(hidden, weight, tokens, mask, adv, bias=bias, ref_per_token_logps=ref,
                       old_per_token_logps=old)[0]
    else:
        raise ValueError(provider)

    def step():
        hidden.grad = weight.grad = None
        fwd().backward()
        return hidden.grad

    return step


def check_against_eager(provider, inputs, rtol):
    """Before timing: the provider's loss and d(hidden) must match the eager provider's on the same inputs."""
    hidden = inputs[0]
    ref_grad = make_step("eager", inputs)().clone()
    grad = make_step(provider, inputs)().clone()
    err = float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm().clamp(min=1e-30))
    assert err < rtol, f"{provider}: d(hidden) differs from eager by {err:.2e} (relative norm)"
    hidden.grad = None


def measure_cpu_peak(provider, cfg) -> dict:
    """Run in a fresh process (all cores): inputs first, then the step's own extra peak RSS."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    step = make_step(provider, make_inputs(cfg, "cpu"))
    return dict(provider=provider, **step_peak_rss(step))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_fwd_bwd(benchmark, provider):
    if provider == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")
    if not SMOKE and not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    mem = {} if SMOKE else cpu_peak_subprocess('bench_linear_grpo_loss', provider, CPU_CFG)   # smoke: correctness only
    inputs = make_inputs(CPU_CFG, "cpu")
    if SMOKE:
        check_against_eager(provider, inputs, 1e-4)
    step = make_step(provider, inputs)
    n_valid = int(inputs[5].sum())
    benchmark.extra_info.update(CPU_CFG, device="cpu", metric="fwd+bwd", **mem,
                                n_tokens=CPU_CFG["B"] * CPU_CFG["T"], N_valid=n_valid,
                                flops=useful_flops(CPU_CFG, n_valid))
    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gpu_fwd_bwd(benchmark, provider):
    if provider == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")
    inputs = make_inputs(GPU_CFG, "cuda")
    check_against_eager(provider, inputs, 3e-2)   # bf16 operands: loose
    step = make_step(provider, inputs)
    peak = cuda_step_peak_mib(step)
    n_valid = int(inputs[5].sum())
    benchmark.extra_info.update(GPU_CFG, device=torch.cuda.get_device_name(), metric="fwd+bwd",
                                peak_extra_mib=peak, N_valid=n_valid, flops=useful_flops(GPU_CFG, n_valid))

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
