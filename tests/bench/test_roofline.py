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


def test_masked_rows_hand_count():
    """A small case with masked rows whose token ids hold an ignore index (-100): their logits are never read and
    no FLOPs are spent on them; the backward still writes their (zero) gradient rows. Counted by hand: B = 2,
    T = 3, V = 5, bf16, 4 of the 6 rows unmasked. The driver used the unmasked count for every term (the dlogits
    write too) and fell back to all rows when none was unmasked."""
    import torch
    tokens = torch.tensor([[3, 1, -100], [0, -100, 4]])
    mask = tokens != -100
    N, n_valid, V = tokens.numel(), int(mask.sum()), 5
    assert (N, n_valid) == (6, 4)
    # grpo_loss fwd: 4 rows x 5 x 2 B of logits + 4 x 21 per-token + 2 masked rows x 1 mask byte = 126
    assert rl.grpo_loss_bytes(N, V, 2, "fwd", n_valid=n_valid) == 40 + 84 + 2
    # bwd: read 40 B again, write all 6 rows of dlogits (60 B), 4 x 17 per-token, 2 mask bytes = 170
    assert rl.grpo_loss_bytes(N, V, 2, "bwd", n_valid=n_valid) == 40 + 60 + 68 + 2
    assert rl.grpo_loss_bytes(N, V, 2, n_valid=n_valid) == 296
    assert rl.grpo_loss_bytes(N, V, 2, n_valid=N) == rl.grpo_loss_bytes(N, V, 2)   # no masked row: as before
    # fpa_logprobs fwd reads both logits of the 4 rows: 4 x 5 x (2 + 2) + 4 x 25 + 2; bwd as grpo_loss's
    assert rl.fpa_logprobs_bytes(N, V, 2, "fwd", n_valid=n_valid) == 80 + 100 + 2
    assert rl.fpa_logprobs_bytes(N, V, 2, "bwd", n_valid=n_valid) == 40 + 60 + 68 + 2
    # fused heads, H = 3 (fp32): FLOPs on the 4 rows only; dhidden is written for all 6
    assert rl.linear_grpo_loss_flops(N, 3, V, n_valid=n_valid) == 6 * 4 * 3 * 5
    assert rl.linear_grpo_loss_bytes(N, 3, V, 4, "fwd", n_valid=n_valid) == (12 + 15) * 4 + 84 + 2
    assert rl.linear_grpo_loss_bytes(N, 3, V, 4, "bwd", n_valid=n_valid) == (12 + 15) * 4 + (18 + 15) * 4 + 84 + 2
    assert rl.linear_fpa_logprobs_flops(N, 3, 2, V, n_valid=n_valid) == 2 * 4 * 5 * (3 + 2) + 4 * 4 * 3 * 5
    # the driver fills a record without its own bytes / FLOPs from the same functions
    from bench import run as drv
    sizes = {"N": N, "N_valid": n_valid, "V": V}
    assert drv.roofline_for("grpo_loss", "fwd+bwd", sizes, "bfloat16")["bytes"] == 296
    assert drv.roofline_for("fpa_logprobs", "fwd", sizes, "bfloat16")["bytes"] == 182
    lin = drv.roofline_for("linear_grpo_loss", "fwd+bwd", {"B": 2, "T": 3, "N_valid": 4, "H": 3, "V": V}, "float32")
    assert lin == {"flops": 360, "bytes": rl.linear_grpo_loss_bytes(6, 3, V, 4, n_valid=4)}
    fpa = drv.roofline_for("linear_fpa_logprobs", "fwd+bwd", {"B": 2, "T": 3, "N_valid": 4, "H": 3, "H_ref": 2,
                                                              "V": V}, "float32")
    assert fpa["flops"] == rl.linear_fpa_logprobs_flops(6, 3, 2, V, n_valid=4)
    # every row masked: only the dlogits write and the mask bytes, not the whole batch's reads
    none = drv.roofline_for("grpo_loss", "fwd+bwd", {"N": N, "N_valid": 0, "V": V}, "bfloat16")["bytes"]
    assert none == N * V * 2 + 2 * N
    with pytest.raises(ValueError, match="n_valid"):
        rl.grpo_loss_bytes(2, 5, 2, n_valid=3)
