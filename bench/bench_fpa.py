"""fpa_logprobs (policy, reference and FPA future-policy log-probs in one pass): gxpo vs baselines.

Providers:
  gxpo        ``fpa_logprobs`` (Triton on CUDA; the chunked PyTorch path on the CPU)
  ref_eager   ``fpa_logprobs_ref`` as shipped (the executable reference: float64, three materialised log-softmaxes)
  ref_compile ``torch.compile(fpa_logprobs_ref)`` (CUDA only: a cold compile costs ~25 s on the CPU)
Modes: ``fwd`` (no grad: the rollout/scoring use) and ``fwd+bwd`` (gradient into the policy logits via logp).

Before timing, every provider's outputs (and for fwd+bwd the logits gradient) are checked against the
float64 reference on the same inputs; the bytes the op cannot avoid (``roofline.fpa_logprobs_bytes``: both
logits read once forward; backward reads the policy logits and writes dlogits) go into extra_info, and the
driver turns them into GB/s and % of the measured copy bandwidth. Inputs are random (never zero) and
rotated over several copies so caches do not flatter small sizes.

    python -m pytest bench/bench_fpa.py --benchmark-json=/tmp/fpa.json        (or: python -m bench)
"""
from __future__ import annotations

import pytest
import torch

from gxpo_kernels.ops.fpa.logprobs import fpa_logprobs
from gxpo_kernels.ops.fpa.reference import fpa_logprobs_ref

from ._common import CUDA, DEVICE, SMOKE, timed_record
from .roofline import fpa_logprobs_bytes, n_copies

LAM, TEMP = 1.0, 0.9
if SMOKE:
    SIZES = [(16, 1000)]
    DTYPE = torch.float32
elif CUDA:
    SIZES = [(4096, 151936), (16384, 151936), (8192, 32000)]     # (N tokens, V)
    DTYPE = torch.bfloat16
else:
    SIZES = [(64, 32000), (16, 151936)]
    DTYPE = torch.float32
PROVIDERS = ["gxpo", "ref_eager"] + (["ref_compile"] if CUDA and not SMOKE else [])
MODES = ["fwd", "fwd+bwd"]
_COMPILED = {}


def _make(N, V, copies):
    g = torch.Generator(device=DEVICE).manual_seed(0)    # generated on the device: GPU sizes are GBs
    out = []
    for _ in range(copies):
        x = (torch.randn(N, V, generator=g, device=DEVICE) * 2).to(DTYPE)
        r = (x.float() + 0.5 * torch.randn(N, V, generator=g, device=DEVICE)).to(DTYPE)   # a nearby reference
        out.append((x, r))
    tokens = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    mask = torch.rand(N, generator=g, device=DEVICE) > 0.1
    return out, tokens, mask


def _raise_recompile_limit(limit: int = 64) -> None:
    """One compiled graph per (shape, grad mode): the check's 64 rows and the timed rows, fwd under no_grad and
    fwd+bwd, per size: 10 on CUDA, past dynamo's default limit of 8, beyond which it runs the function eagerly
    without an error (eager timings recorded as "ref_compile"). Raise the limit, and fail instead of falling
    back should it be hit anyway."""
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit"):          # (the older name first, then the alias)
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), limit))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, True)


def _fn(provider):
    if provider == "gxpo":
        return lambda x, r, t, m: fpa_logprobs(x, r, t, LAM, TEMP, mask=m)
    if provider == "ref_eager":
        return lambda x, r, t, m: fpa_logprobs_ref(x, r, t, LAM, TEMP, mask=m)
    if provider == "ref_compile":
        if "c" not in _COMPILED:
            _raise_recompile_limit()
            _COMPILED["c"] = torch.compile(fpa_logprobs_ref, dynamic=False)
        return lambda x, r, t, m: _COMPILED["c"](x, r, t, LAM, TEMP, mask=m)
    raise ValueError(provider)


def _check(provider, mode, x, r, tokens, mask, rows=64):
    """All three outputs (and dlogits for fwd+bwd) against the float64 reference on the first ``rows`` rows."""
    x, r, tokens, mask = x[:rows], r[:rows], tokens[:rows], mask[:rows]
    fn = _fn(provider)
    xd = x.detach().double().requires_grad_(mode == "fwd+bwd")
    ref = fpa_logprobs_ref(xd, r.double(), tokens, LAM, TEMP, mask=mask)
    xx = x.detach().clone().requires_grad_(mode == "fwd+bwd")
    out = fn(xx, r, tokens, mask)
    tol = 1e-4 if DTYPE == torch.float32 else 2e-2
    for name, a, b in zip(("logp", "ref_logp", "fpa_logp"), out, ref):
        err = float((a.detach().double() - b.detach()).abs().max())
        assert err <= tol * max(1.0, float(b.detach().abs().max())), f"{provider} {name}: max err {err:.2e}"
    if mode == "fwd+bwd":
        w = torch.randn(tokens.shape, dtype=torch.float64, device=DEVICE)
        (out[0].double() * w).sum().backward()
        (ref[0] * w).sum().backward()
        rel = float((xx.grad.double() - xd.grad).norm() / xd.grad.norm().clamp(min=1e-30))
        assert rel <= tol, f"{provider}: dlogits rel err {rel:.2e}"


@pytest.mark.parametrize("size", [pytest.param(s, id=f"N{s[0]}-V{s[1]}") for s in SIZES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fpa_logprobs(benchmark, provider, mode, size):
    N, V = size
    itemsize = torch.tensor([], dtype=DTYPE).element_size()
    copies = 1 if SMOKE else n_copies(2 * N * V * itemsize)
    inputs, tokens, mask = _make(N, V, copies)
    _check(provider, mode, inputs[0][0], inputs[0][1], tokens, mask)
    fn = _fn(provider)
    xs = [(x.detach().clone().requires_grad_(mode == "fwd+bwd"), r) for x, r in inputs]

    def step(i):
        x, r = xs[i]
        if mode == "fwd":
            with torch.no_grad():
                return fn(x, r, tokens, mask)
        out = fn(x, r, tokens, mask)
        out[0].sum().backward()
        x.grad = None
        return out

    # masked rows are skipped (one mask load each): their logits are not read; the backward still writes
    # their zero rows of dlogits
    n_valid = int(mask.sum())
    nbytes = fpa_logprobs_bytes(N, V, itemsize, mode, n_valid=n_valid)
    benchmark.extra_info.update(op="fpa_logprobs", provider=provider, mode=mode, N=N, N_valid=n_valid, V=V,
                                dtype=str(DTYPE).replace("torch.", ""), bytes=nbytes, device=DEVICE)
    try:
        timed_record(benchmark, step, n_rotate=copies, **({} if CUDA else dict(budget_s=1.0, max_reps=20)))
    except torch.cuda.OutOfMemoryError:   # the float64 reference materialises 3 x N x V doubles
        pytest.skip(f"{provider} {mode} runs out of memory at N={N}, V={V}")
