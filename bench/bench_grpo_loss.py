"""grpo_loss forward + backward: gxpo vs eager fp32 PyTorch vs Liger-Kernel's triton_grpo_loss (CUDA only).

Run (GPU):  python -m pytest bench/bench_grpo_loss.py --benchmark-json=bench/results/<device>/grpo_loss.json
Smoke (CPU): python -m pytest bench/bench_grpo_loss.py --benchmark-disable -q

Providers:
  gxpo         ``grpo_loss`` (Triton on CUDA, chunked PyTorch path on CPU)
  gxpo_inplace the same with ``inplace_backward=True`` (CUDA only); the logits reach it as a non-leaf, as a
               model's output does (the op ignores ``inplace_backward`` for a leaf or a view of one)
  eager        fp32 ``log_softmax`` materialised over the vocabulary + the same O(tokens) loss math
               (``gxpo_kernels.losses.grpo_token_loss``): what a plain PyTorch trainer does
  liger        ``liger_kernel.transformers.grpo_loss.triton_grpo_loss`` (CUDA only)

Every case is first checked against the float64 reference ``grpo_loss_ref`` on a slice of its rows. The
bytes the op must move are recorded (``roofline.grpo_loss_bytes``: fwd reads the unmasked rows' logits, bwd
reads them again and writes the whole dlogits, (2 * N_valid + N) * V * itemsize plus the per-token values)
together with the achieved GB/s. Inputs are drawn on the
device; all providers read the same (B, T + 1, V) logits buffer (ours through the shifted view, Liger whole).
On CUDA the timing is ``triton.testing.do_bench`` with
quantiles (p50, p20, p80); on CPU it is pytest-benchmark's own loop.
"""
import os

import pytest
import torch

from gxpo_kernels.ops import grpo_loss
from gxpo_kernels.losses import GRPOLossOptions, grpo_token_loss
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref

from .roofline import grpo_loss_bytes

CUDA = torch.cuda.is_available()
SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"  # CI: every case once at a tiny size, as a correctness smoke
OPTS = dict(temperature=0.9, eps_low=0.2, eps_high=0.28, loss_agg_mode="token-mean")

if SMOKE:
    SIZES, DTYPE, PROVIDERS = [(2, 16, 1000)], torch.float32, ["gxpo", "eager"]
elif CUDA:
    # (B, T, V): N = B * T token rows; bf16 logits as a trainer produces them
    SIZES = [(4, 256, 151936), (8, 512, 151936), (16, 1024, 151936), (8, 512, 32000)]
    DTYPE = torch.bfloat16
    PROVIDERS = ["gxpo", "gxpo_inplace", "eager", "liger"]
else:
    SIZES = [(2, 32, 4096), (4, 64, 32000)]
    DTYPE = torch.float32
    PROVIDERS = ["gxpo", "eager"]


def _size_id(s):
    B, T, V = s
    return f"N{B * T}-V{V}"


def _make(B, T, V, device):
    """Inputs drawn on ``device`` (a host draw of 2.5e9 normals alone takes about a minute).

    The logits live in a (B, T + 1, V) buffer, the layout of a causal LM's output: our ops read the shifted
    view ``buf[:, :-1]`` in place, and Liger (which wants the unshifted tensor) gets ``buf`` itself, so no
    provider pays for a copy the others do not."""
    g = torch.Generator(device=device).manual_seed(0)
    buf = torch.randn(B, T + 1, V, generator=g, device=device, dtype=DTYPE) * 2
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.rand(B, T, generator=g, device=device) > 0.1
    adv = torch.randn(B, generator=g, device=device)
    old = -torch.rand(B, T, generator=g, device=device) * 8  # plausible log-probs; the pass cost does not depend
    return buf, tokens, mask, adv, old


def _eager_loss(logits, tokens, adv, mask, old):
    """Plain PyTorch: fp32 log_softmax over V kept for backward, then the shared O(tokens) loss math."""
    logprobs = torch.log_softmax(logits.float() / OPTS["temperature"], dim=-1)
    logp = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return grpo_token_loss(logp, entropy, adv, mask, old, None, GRPOLossOptions(**OPTS))


class _NonLeaf(torch.autograd.Function):
    """Identity without a copy whose output is not a leaf (nor a view of one): the buffer as a model's logits."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return g


def _loss_fn(provider):
    """fn(buf, tokens, adv, mask, old) -> (loss, ...) on the (B, T + 1, V) logits buffer."""
    if provider == "gxpo":
        return lambda buf, tok, adv, mask, old: grpo_loss(buf[:, :-1], tok, adv, mask, old, **OPTS)
    if provider == "gxpo_inplace":
        # the bench's buffer is a leaf, and the op ignores inplace_backward on a leaf or a view of one: it used
        # to time the ordinary backward under this name
        return lambda buf, tok, adv, mask, old: grpo_loss(_NonLeaf.apply(buf)[:, :-1], tok, adv, mask, old,
                                                          inplace_backward=True, **OPTS)
    if provider == "eager":
        return lambda buf, tok, adv, mask, old: _eager_loss(buf[:, :-1], tok, adv, mask, old)
    if provider == "liger":
        pytest.importorskip("liger_kernel.ops")
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(buf, tok, adv, mask, old):
            # Liger takes the unshifted (B, T + 1, V) logits and drops the last position itself; the bool mask
            # as the other providers get it (Liger reads a bool mask as it reads a float one: no per-call copy)
            return triton_grpo_loss(buf, old, None, tok, adv, mask, temperature=OPTS["temperature"],
                                    beta=0.0, eps_low=OPTS["eps_low"], eps_high=OPTS["eps_high"], inplace=False,
                                    loss_type="bnpo", reduce=True)
        return liger
    raise ValueError(provider)


def _check(provider, buf, tokens, mask, adv, old):
    """Loss and dlogits on the first rows vs the float64 reference, before any timing."""
    b = min(2, buf.shape[0])
    t = min(64, buf.shape[1] - 1)
    x = buf[:b, :t + 1].detach().clone().requires_grad_()
    loss, _ = _loss_fn(provider)(x, tokens[:b, :t], adv[:b], mask[:b, :t], old[:b, :t])
    loss.backward()
    xd = buf[:b, :t].detach().double().requires_grad_()
    r_loss, _ = grpo_loss_ref(xd, tokens[:b, :t], adv[:b], mask[:b, :t], old[:b, :t], **OPTS)
    r_loss.backward()
    tol = 1e-4 if DTYPE == torch.float32 else 2e-2
    loss, r_loss = loss.detach(), r_loss.detach()
    assert abs(float(loss) - float(r_loss)) <= 1e-4 * max(1.0, abs(float(r_loss))), (float(loss), float(r_loss))
    g = x.grad[:, :t].double()
    err = (g - xd.grad).norm() / xd.grad.norm().clamp(min=1e-30)
    assert err <= tol, f"{provider}: dlogits rel err {float(err):.2e}"


@pytest.mark.parametrize("size", [pytest.param(s, id=_size_id(s)) for s in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_grpo_loss_fwd_bwd(benchmark, bench_meta, bench_device, provider, size):
    B, T, V = size
    buf, tokens, mask, adv, old = _make(B, T, V, bench_device)
    _check(provider, buf, tokens, mask, adv, old)
    x = buf.requires_grad_()
    fn = _loss_fn(provider)

    def step():
        loss = fn(x, tokens, adv, mask, old)[0]
        loss.backward()
        x.grad = None

    n_valid = int(mask.sum())
    nbytes = grpo_loss_bytes(B * T, V, buf.element_size(), "fwd+bwd", n_valid=n_valid)
    bench_meta.update(provider=provider, mode="fwd+bwd", N=B * T, N_valid=n_valid, V=V,
                      dtype=str(DTYPE).replace("torch.", ""), bytes=nbytes)
    if CUDA:
        import triton.testing
        try:
            step()
            p50, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
        except torch.cuda.OutOfMemoryError:
            pytest.skip(f"{provider} runs out of memory at N={B * T}, V={V}")
        bench_meta.update(p50_ms=p50, p20_ms=p20, p80_ms=p80, gbps=nbytes / (p50 * 1e-3) / 1e9, timer="do_bench")
        benchmark.pedantic(step, rounds=1, iterations=1)
    else:
        benchmark(step)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            med = stats.stats.median
            bench_meta.update(p50_ms=med * 1e3, gbps=nbytes / med / 1e9)
