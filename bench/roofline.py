"""Minimum bytes moved and FLOPs per op (pure functions), and the measured device ceilings they are judged by.

Every op in gxpo-kernels is judged against the *minimum* traffic or arithmetic the op cannot avoid, divided
by the measured time, as a percentage of what this device was measured to sustain in the same run:

- memory-bound ops (``grpo_loss``, ``fpa_logprobs``, ``extrapolate_``) -> bytes / time vs the device-to-device
  copy bandwidth (``measure_copy_bandwidth``: a large ``dst.copy_(src)``, counting read + write);
- the fused LM-head loss (``linear_grpo_loss``) -> *useful* FLOPs / time vs a large matmul
  (``measure_matmul_flops``: bf16 on CUDA, fp32 on the CPU).

Conventions (all byte counts are integers):
- ``itemsize`` is the element size of the big (N, V) / (N, H) / (V, H) tensors: 2 for bf16, 4 for fp32.
- Per-token O(N) traffic is counted with ``token_bytes`` (see ``GRPO_FWD_TOKEN_BYTES`` & co.): int64 token
  ids, a bool mask, fp32 side inputs and the fp32 per-token values saved for backward. It is negligible
  next to N*V but keeps the count honest at small V.
- Masked rows (``n_valid`` of the ``N`` rows are unmasked; default: all) are skipped by the ops: their inputs
  are not read and no FLOPs are spent on them, so they are not counted, except the one mask byte each pass
  loads per row and the gradient rows a backward writes for them (zeros: the gradient is a dense tensor).
  A masked row's token id may hold anything (e.g. an ignore index of -100): it is never read.
- ``linear_grpo_loss`` FLOPs: forward 2*N*H*V (logits), backward 4*N*H*V (dhidden and dweight). The
  *useful* total 6*N*H*V is the figure used for % of the matmul ceiling (the same count as Liger's published
  A100 numbers, so the two compare). A kernel that recomputes the logits in backward executes 8*N*H*V;
  ``count_recompute=True`` returns that, for reference only.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

MODES = ("fwd", "bwd", "fwd+bwd")

# per-token bytes of grpo_loss: forward reads token id (int64 8) + mask (1) + advantage (4) + old log-prob (4),
# writes the saved lse (4); backward reads token id + mask + lse + the upstream dlogp (4). The logits kernels
# save lse as float64 (4 bytes more per token each way, ~1e-5 of one bf16 logits row at V = 151,936): the
# counts keep the fp32 figure the fused head saves, which shares GRPO_FWD_TOKEN_BYTES
GRPO_FWD_TOKEN_BYTES = 8 + 1 + 4 + 4 + 4
GRPO_BWD_TOKEN_BYTES = 8 + 1 + 4 + 4
# fpa_logprobs: forward reads token id + mask, writes logp, ref_logp, fpa_logp and the saved lse (4 x fp32);
# backward reads token id + mask + lse + dlogp
FPA_FWD_TOKEN_BYTES = 8 + 1 + 4 * 4
FPA_BWD_TOKEN_BYTES = 8 + 1 + 4 + 4
# a masked row costs one mask load per pass (its bool); nothing else of it is read
MASK_BYTES = 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_pos(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def _valid_rows(N: int, n_valid: Optional[int]) -> int:
    """The unmasked row count: ``n_valid`` (0 <= n_valid <= N), or N when None (no mask)."""
    if n_valid is None:
        return N
    _check_pos(n_valid=n_valid)
    if n_valid > N:
        raise ValueError(f"n_valid must be <= N = {N}, got {n_valid}")
    return n_valid


# ------------------------------------------------------------------------------------------- grpo_loss
def grpo_loss_bytes(N: int, V: int, itemsize: int, mode: str = "fwd+bwd", *, n_valid: Optional[int] = None,
                    fwd_token_bytes: int = GRPO_FWD_TOKEN_BYTES,
                    bwd_token_bytes: int = GRPO_BWD_TOKEN_BYTES) -> int:
    """Minimum bytes of the GRPO loss from (N, V) logits, ``n_valid`` of the N rows unmasked (default: all).

    fwd: read the unmasked rows' logits once (+ O(N) per-token values). bwd: read them again and write the whole
    (N, V) dlogits (zeros at masked rows). fwd+bwd without a mask: 3 * N * V * itemsize + the per-token terms;
    with one: (2 * n_valid + N) * V * itemsize + the per-token terms of the unmasked rows + a mask byte per
    masked row and pass.
    """
    _check_mode(mode)
    _check_pos(N=N, V=V, itemsize=itemsize)
    nv = _valid_rows(N, n_valid)
    skipped = (N - nv) * MASK_BYTES
    fwd = nv * V * itemsize + nv * fwd_token_bytes + skipped
    bwd = nv * V * itemsize + N * V * itemsize + nv * bwd_token_bytes + skipped
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------ linear_grpo_loss
def linear_grpo_loss_flops(N: int, H: int, V: int, mode: str = "fwd+bwd", *, count_recompute: bool = False,
                           n_valid: Optional[int] = None) -> int:
    """FLOPs of the LM-head GEMMs over the ``n_valid`` unmasked of N rows (default: all; the loss math is
    O(N*V) and ignored).

    fwd 2*N*H*V; bwd 4*N*H*V (dhidden = dZ @ W and dW = dZ^T @ hidden); fwd+bwd 6*N*H*V (useful work), with
    n_valid in place of N under a mask. ``count_recompute=True`` adds the 2*N*H*V logits recompute that a
    backward without saved logits executes (bwd 6NHV, fwd+bwd 8NHV).
    """
    _check_mode(mode)
    _check_pos(N=N, H=H, V=V)
    unit = 2 * _valid_rows(N, n_valid) * H * V
    fwd, bwd = unit, 2 * unit + (unit if count_recompute else 0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def linear_grpo_loss_bytes(N: int, H: int, V: int, itemsize: int, mode: str = "fwd+bwd", *,
                           n_valid: Optional[int] = None, grad_itemsize: Optional[int] = None,
                           token_bytes: int = GRPO_FWD_TOKEN_BYTES) -> int:
    """Minimum bytes of the fused LM-head GRPO loss: the logits never touch memory.

    fwd: read hidden (N*H; n_valid*H under a mask) and the weight (V*H). bwd: read both again, write dhidden
    (N*H, zeros at masked rows) and dweight (V*H) in ``grad_itemsize`` (default: ``itemsize``). Per-token terms
    as in ``grpo_loss_bytes``.
    """
    _check_mode(mode)
    _check_pos(N=N, H=H, V=V, itemsize=itemsize)
    g = itemsize if grad_itemsize is None else grad_itemsize
    nv = _valid_rows(N, n_valid)
    skipped = (N - nv) * MASK_BYTES
    fwd = (nv * H + V * H) * itemsize + nv * token_bytes + skipped
    bwd = (nv * H + V * H) * itemsize + (N * H + V * H) * g + nv * token_bytes + skipped
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def linear_fpa_logprobs_flops(N: int, H: int, H_ref: int, V: int, mode: str = "fwd+bwd", *,
                              n_valid: Optional[int] = None) -> int:
    """Useful FLOPs of the fused FPA heads over the ``n_valid`` unmasked of N rows (default: all).

    fwd 2*N*V*(H + H_ref) (the policy and the reference logits); bwd 4*N*H*V (d hidden and d weight of the
    policy head; the reference side has no gradient); the logits recompute is not counted.
    """
    _check_mode(mode)
    _check_pos(N=N, H=H, H_ref=H_ref, V=V)
    nv = _valid_rows(N, n_valid)
    fwd, bwd = 2 * nv * V * (H + H_ref), 4 * nv * H * V
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------------- fpa_logprobs
def fpa_logprobs_bytes(N: int, V: int, itemsize: int, mode: str = "fwd", *, n_valid: Optional[int] = None,
                       ref_itemsize: Optional[int] = None, fwd_token_bytes: int = FPA_FWD_TOKEN_BYTES,
                       bwd_token_bytes: int = FPA_BWD_TOKEN_BYTES) -> int:
    """Minimum bytes of FPA log-probs: fwd reads both (N, V) logits of the ``n_valid`` unmasked rows once
    (2*N*V at equal dtypes without a mask); the gradient reaches the policy logits only, so bwd reads the
    unmasked rows of them and writes the whole (N, V) dlogits (zeros at masked rows)."""
    _check_mode(mode)
    _check_pos(N=N, V=V, itemsize=itemsize)
    r = itemsize if ref_itemsize is None else ref_itemsize
    nv = _valid_rows(N, n_valid)
    skipped = (N - nv) * MASK_BYTES
    fwd = nv * V * (itemsize + r) + nv * fwd_token_bytes + skipped
    bwd = nv * V * itemsize + N * V * itemsize + nv * bwd_token_bytes + skipped
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------------- extrapolate_
def extrapolate_bytes(numel: int, *, param_itemsize: int = 4, theta0_itemsize: int = 4, grad_itemsize: int = 4,
                      with_grads: bool = True, lowp_itemsize: Optional[int] = None) -> int:
    """Minimum bytes of the in-place extrapolation over ``numel`` coordinates.

    Reads θ0 and θ (and g0, g1 for the retention-scaled GXPO move; not for SFPO's plain move), writes θ, and
    writes the low-precision copy when ``lowp_itemsize`` is given. The stats vector is O(1).
    """
    _check_pos(numel=numel, param_itemsize=param_itemsize, theta0_itemsize=theta0_itemsize,
               grad_itemsize=grad_itemsize)
    per = theta0_itemsize + 2 * param_itemsize + (2 * grad_itemsize if with_grads else 0)
    if lowp_itemsize is not None:
        _check_pos(lowp_itemsize=lowp_itemsize)
        per += lowp_itemsize
    return numel * per


# --------------------------------------------------------------------------------------------- ceilings
def copy_bytes(numel: int, itemsize: int) -> int:
    """Bytes a ``dst.copy_(src)`` moves: one read plus one write."""
    _check_pos(numel=numel, itemsize=itemsize)
    return 2 * numel * itemsize


def matmul_flops(M: int, N: int, K: int) -> int:
    """FLOPs of an (M, K) @ (K, N) product (a multiply-add counts 2)."""
    _check_pos(M=M, N=N, K=K)
    return 2 * M * N * K


def gbps(nbytes: int, ms: float) -> float:
    """Achieved GB/s (1e9 bytes) of ``nbytes`` moved in ``ms`` milliseconds."""
    if not ms > 0:
        raise ValueError(f"ms must be > 0, got {ms!r}")
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: int, ms: float) -> float:
    """Achieved TFLOP/s (1e12) of ``flops`` in ``ms`` milliseconds."""
    if not ms > 0:
        raise ValueError(f"ms must be > 0, got {ms!r}")
    return flops / (ms * 1e-3) / 1e12


def pct_of_ceiling(achieved: float, ceiling: float) -> float:
    """100 * achieved / ceiling (may exceed 100 when caches flatter a figure; the driver reports it as is)."""
    if not (isinstance(ceiling, (int, float)) and ceiling > 0 and math.isfinite(ceiling)):
        raise ValueError(f"ceiling must be a positive finite number, got {ceiling!r}")
    if not (isinstance(achieved, (int, float)) and achieved >= 0 and math.isfinite(achieved)):
        raise ValueError(f"achieved must be a finite number >= 0, got {achieved!r}")
    return 100.0 * achieved / ceiling


# ------------------------------------------------------------------------------------ timing + ceilings
def quantiles_ms(samples_s: Sequence[float]) -> Dict[str, float]:
    """p50 / p20 / p80 of wall-clock samples (seconds) in milliseconds (linear interpolation)."""
    if len(samples_s) == 0:
        raise ValueError("need at least one sample")
    xs = sorted(float(s) * 1e3 for s in samples_s)
    if len(xs) == 1:
        return {"p50_ms": xs[0], "p20_ms": xs[0], "p80_ms": xs[0]}
    qs = statistics.quantiles(xs, n=10, method="inclusive")   # deciles: qs[1] = p20, qs[4] = p50, qs[7] = p80
    return {"p50_ms": qs[4], "p20_ms": qs[1], "p80_ms": qs[7]}


def time_fn(fn: Callable[[int], object], *, device: str = "cpu", n_rotate: int = 1, warmup: int = 2,
            min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0) -> Dict[str, float]:
    """Median and p20/p80 of ``fn(i)`` in ms; ``i`` cycles over ``n_rotate`` input copies (so caches see a
    different buffer each call). CUDA: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events),
    quantiles [0.5, 0.2, 0.8]. CPU: ``time.perf_counter`` around each call after ``warmup`` calls, at least
    ``min_reps`` and at most ``max_reps`` calls or ``budget_s`` seconds."""
    if n_rotate < 1:
        raise ValueError(f"n_rotate must be >= 1, got {n_rotate!r}")
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % n_rotate
        return fn(i)

    if device == "cuda":
        import triton.testing
        p50, p20, p80 = triton.testing.do_bench(call, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"p50_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80), "reps": -1}
    for _ in range(warmup):
        call()
    samples = []
    t_end = time.perf_counter() + budget_s
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    out = quantiles_ms(samples)
    out["reps"] = len(samples)
    return out


def n_copies(input_bytes: int, cache_bytes: int = 64 << 20, max_copies: int = 8) -> int:
    """How many input copies to cycle so the working set exceeds ~2x the last-level cache."""
    if input_bytes <= 0:
        return max_copies
    return int(min(max_copies, max(1, math.ceil(2 * cache_bytes / input_bytes))))


def measure_copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, **timing) -> Dict[str, float]:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` fp32, GB/s counting read + write."""
    import torch
    numel = nbytes // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device=device, **timing)
    if not torch.equal(dst, src):
        raise RuntimeError("copy ceiling: dst != src after copy_")
    moved = copy_bytes(numel, 4)
    return dict(t, nbytes=moved, gbps=gbps(moved, t["p50_ms"]), gbps_p20=gbps(moved, t["p80_ms"]),
                gbps_p80=gbps(moved, t["p20_ms"]))


def measure_matmul_flops(device: str = "cpu", n: Optional[int] = None, dtype=None, **timing) -> Dict[str, float]:
    """Large square matmul rate: bf16 n=8192 on CUDA, fp32 n=2048 on the CPU; TFLOP/s at the median."""
    import torch
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if n is None:
        n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda i: torch.matmul(a, b, out=c), device=device, **timing)
    # correctness of the timed output on a few rows against fp32 (fp64 on the CPU)
    rows = slice(0, 4)
    ref = a[rows].double() @ b.double()
    err = (c[rows].double() - ref).norm() / ref.norm()
    if not float(err) < (2e-2 if dtype == torch.bfloat16 else 1e-4):
        raise RuntimeError(f"matmul ceiling: relative error {float(err):.2e}")
    f = matmul_flops(n, n, n)
    return dict(t, n=n, dtype=str(dtype).replace("torch.", ""), flops=f, tflops=tflops(f, t["p50_ms"]),
                tflops_p20=tflops(f, t["p80_ms"]), tflops_p80=tflops(f, t["p20_ms"]))
