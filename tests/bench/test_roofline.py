"""Guards bench/roofline.py: the minimum bytes / FLOPs per op (hand-computed cases), the percent-of-ceiling and
quantile helpers, and that the ceiling measurements return sane, self-consistent numbers on this device."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from bench import roofline as rl  # noqa: E402


def test_grpo_loss_bytes_by_mode():
    # N=3 rows, V=5, bf16: fwd reads 15 logits (30 B) + 3 * 21 per-token bytes
    assert rl.GRPO_FWD_TOKEN_BYTES == 21 and rl.GRPO_BWD_TOKEN_BYTES == 17
    assert rl.grpo_loss_bytes(3, 5, 2, "fwd") == 30 + 63
    # bwd reads 15 logits and writes 15 dlogits (60 B) + 3 * 17
    assert rl.grpo_loss_bytes(3, 5, 2, "bwd") == 60 + 51
    assert rl.grpo_loss_bytes(3, 5, 2, "fwd+bwd") == 93 + 111
    # the N*V term dominates: 3 * N * V * itemsize at a realistic size
    big = rl.grpo_loss_bytes(8192, 151936, 2, "fwd+bwd", fwd_token_bytes=0, bwd_token_bytes=0)
    assert big == 3 * 8192 * 151936 * 2


def test_linear_grpo_loss_flops_and_bytes():
    N, H, V = 4, 3, 7
    assert rl.linear_grpo_loss_flops(N, H, V, "fwd") == 168          # 2 * 4 * 3 * 7
    assert rl.linear_grpo_loss_flops(N, H, V, "bwd") == 336
    assert rl.linear_grpo_loss_flops(N, H, V) == 504                  # 6 N H V (useful)
    assert rl.linear_grpo_loss_flops(N, H, V, count_recompute=True) == 672   # 8 N H V executed
    assert rl.linear_grpo_loss_flops(N, H, V, "fwd", count_recompute=True) == 168
    # fp32: fwd reads hidden (12) + weight (21) elements = 132 B + 4 * 21 per-token
    assert rl.linear_grpo_loss_bytes(N, H, V, 4, "fwd") == 132 + 84
    # bwd re-reads both (132 B) and writes dhidden + dweight in fp32 (132 B)
    assert rl.linear_grpo_loss_bytes(N, H, V, 4, "bwd") == 264 + 84
    # bf16 inputs with fp32 gradients
    assert rl.linear_grpo_loss_bytes(N, H, V, 2, "bwd", grad_itemsize=4, token_bytes=0) == 33 * 6


def test_fpa_and_extrapolate_bytes():
    assert rl.fpa_logprobs_bytes(2, 10, 4, "fwd", fwd_token_bytes=0) == 2 * 2 * 10 * 4     # both logits once
    assert rl.fpa_logprobs_bytes(2, 10, 2, "fwd", ref_itemsize=4, fwd_token_bytes=0) == 2 * 10 * 6
    assert rl.fpa_logprobs_bytes(2, 10, 2, "bwd", bwd_token_bytes=0) == 2 * 2 * 10 * 2
    assert rl.fpa_logprobs_bytes(1, 1, 4, "fwd") == 8 + rl.FPA_FWD_TOKEN_BYTES
    # GXPO move, fp32: read θ0, θ, g0, g1 + write θ = 20 B per coordinate; + bf16 copy = 22
    assert rl.extrapolate_bytes(1000) == 20_000
    assert rl.extrapolate_bytes(1000, lowp_itemsize=2) == 22_000
    # SFPO plain move: read θ0, θ, write θ
    assert rl.extrapolate_bytes(1000, with_grads=False) == 12_000
    # bf16 params with fp32 θ0 and bf16 grads: 4 + 2*2 + 2*2
    assert rl.extrapolate_bytes(10, param_itemsize=2, grad_itemsize=2) == 120
    assert rl.copy_bytes(10, 4) == 80 and rl.matmul_flops(2, 3, 4) == 48


def test_rates_and_pct():
    assert rl.gbps(2e9, 1000.0) == pytest.approx(2.0)
    assert rl.tflops(3e12, 500.0) == pytest.approx(6.0)
    assert rl.pct_of_ceiling(45.0, 50.0) == pytest.approx(90.0)
    assert rl.pct_of_ceiling(0.0, 1.0) == 0.0
    for bad in (0, -1.0, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="ceiling"):
            rl.pct_of_ceiling(1.0, bad)
    with pytest.raises(ValueError, match="achieved"):
        rl.pct_of_ceiling(-1.0, 2.0)
    with pytest.raises(ValueError, match="ms"):
        rl.gbps(1, 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        rl.grpo_loss_bytes(1, 1, 2, "backward")
    with pytest.raises(ValueError, match="V"):
        rl.grpo_loss_bytes(1, -1, 2)
    with pytest.raises(ValueError, match="N"):
        rl.linear_grpo_loss_flops(1.5, 2, 3)
    with pytest.raises(ValueError, match="numel"):
        rl.extrapolate_bytes(True)


def test_quantiles_and_rotation():
    q = rl.quantiles_ms([0.001 * i for i in range(1, 12)])     # 1..11 ms
    assert q["p50_ms"] == pytest.approx(6.0) and q["p20_ms"] == pytest.approx(3.0) and q["p80_ms"] == pytest.approx(9.0)
    assert rl.quantiles_ms([0.002]) == {"p50_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}
    with pytest.raises(ValueError):
        rl.quantiles_ms([])
    assert rl.n_copies(1 << 30, cache_bytes=32 << 20) == 1
    assert rl.n_copies(16 << 20, cache_bytes=32 << 20) == 4
    assert rl.n_copies(1, cache_bytes=32 << 20) == 8
    seen = []
    t = rl.time_fn(lambda i: seen.append(i), n_rotate=3, warmup=1, min_reps=5, max_reps=5, budget_s=0.0)
    assert seen == [0, 1, 2, 0, 1, 2] and t["reps"] == 5 and t["p20_ms"] <= t["p50_ms"] <= t["p80_ms"]


def test_ceiling_measurements_on_this_device():
    c = rl.measure_copy_bandwidth("cpu", nbytes=4 << 20, budget_s=0.05, min_reps=3)
    assert c["nbytes"] == 8 << 20 and c["gbps"] > 0
    assert c["gbps"] == pytest.approx(rl.gbps(c["nbytes"], c["p50_ms"]))
    assert c["gbps_p20"] <= c["gbps"] <= c["gbps_p80"]
    m = rl.measure_matmul_flops("cpu", n=128, budget_s=0.05, min_reps=3)
    assert m["flops"] == 2 * 128 ** 3 and m["dtype"] == "float32" and m["tflops"] > 0
