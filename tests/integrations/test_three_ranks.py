"""GXPO / SFPO on DeepSpeed ZeRO 1/2/3 and FSDP2 at an ODD world size (three CPU ranks, gloo, ONE spawn for every
case) on a model whose shards are uneven or empty (see ``_three_ranks_worker.OddNet``): parameters whose numel
is not divisible by 3, a 1-element bias and scale, a 2-element norm, a frozen layer between trainable ones, three
param groups with their own lr, bf16 weights over fp32 masters (ZeRO) / bf16 MixedPrecisionPolicy (FSDP2),
gradient accumulation 2, and fallbacks (a NaN on one rank only, a zero gradient).

After EVERY outer step each rank's full parameters equal the single-process rule's on the same data; the fallback
decisions and every scalar the rule reduces over the ranks (norms, cosines, scales, gate z) are bit-identical
on all three ranks and match the reference.
"""

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.integrations import _three_ranks_worker as W  # noqa: E402
from tests._utils import flat64, spawn_ranks  # noqa: E402

GATE = dict(gate="window", window=2, tau=0.3)
SFPO = dict(gate=None, K=2, alpha=0.8)
# per-rank entropies (sums exact in any order): the rank means 1, 1, 1.5, 2 fire the entropy gate at step 2
ENTROPY = [[1.0, 0.5, 1.5], [1.0, 1.0, 1.0], [1.5, 2.0, 1.0], [2.5, 1.5, 2.0]]
CASES = {
    # a NaN in rank 2's gradient on pass 1 of step 1: every rank falls back (nonfinite_g1)
    "z1_gxpo_nan": dict(backend="deepspeed", stage=1, nan=(1, 1), rule=GATE),
    "z2_sfpo_gas2_nan": dict(backend="deepspeed", stage=2, gas=2, algo="sfpo", nan=(2, 1), rule=SFPO),
    # a zero loss at step 1: GXPO's small-g0 fallback
    # (tol: ZeRO-3 divides each rank's gradient by 3 in fp32 before its fp32 sum, so the sum's rounding depends on
    # the order gloo adds the ranks in, and the bf16 rounding after it can move one ulp: the reference itself
    # moves by up to 2.2e-4 when its ranks are summed in another order; in ZeRO 1/2 the division is in bf16 and
    # the fp32 sum of three bf16 values exact in any order)
    # (fallback_grad="recompute": DeepSpeed applied pass 0's step inside engine.step(), which the rule undoes)
    "z3_gxpo_bf16_gas2_zero": dict(backend="deepspeed", stage=3, bf16=True, gas=2, zero=1, tol=5e-4,
                                   rule=dict(gate=None, fallback_grad="recompute", fallback_state="keep")),
    "z3_sfpo_nan": dict(backend="deepspeed", stage=3, algo="sfpo", nan=(1, 2), rule=SFPO),
    "z2_gxpo_bf16_gas2_nan_gcorr": dict(backend="deepspeed", stage=2, bf16=True, gas=2, nan=(2, 2),
                                        rule=dict(gate=None)),
    "z1_sfpo_bf16_gas2": dict(backend="deepspeed", stage=1, bf16=True, gas=2, algo="sfpo", rule=SFPO),
    # DeepSpeed's BF16_Optimizer (bf16 + fp32 gradient accumulation, stage 1); ZeRO-3 with CPU offload and
    # sub-groups of 20 elements (several per param group), optimizer-aware retention; SFPO's entropy gate on three
    # per-rank entropies (it fires on their mean) with transactional state. frozen_group: the frozen layer in a
    # param group of its own between the others (ZeRO 1/2 cannot: DeepSpeed's own set-up fails on such a group)
    "bf16_optimizer_gxpo_gas2_nan": dict(backend="deepspeed", stage=1, bf16=True, bf16_optimizer=True, gas=2,
                                         nan=(2, 1), rule=dict(gate=None)),
    "z3_offload_subgroups_aware": dict(backend="deepspeed", stage=3, offload=True, sub_group=20, frozen_group=True,
                                       rule=dict(gate=None, optimizer_aware=True)),
    "z2_sfpo_entropy_transactional": dict(backend="deepspeed", stage=2, algo="sfpo", entropy=ENTROPY,
                                          rule=dict(K=2, gate="entropy", window=2, tau=0.5,
                                                    transactional_state=True)),
    # FSDP2: the NaN goes into rank 2's local shard of l1.weight only (its single row)
    "fsdp_gxpo_nan": dict(backend="fsdp", nan=(1, 1), rule=GATE),
    "fsdp_gxpo_mp_gas2_zero": dict(backend="fsdp", mp=True, gas=2, zero=2, rule=dict(gate=None)),
    "fsdp_sfpo_gas2_nan": dict(backend="fsdp", gas=2, algo="sfpo", nan=(1, 1), rule=SFPO),
    "fsdp_sfpo_mp_nan_slow": dict(backend="fsdp", mp=True, algo="sfpo", nan=(2, 2), rule=SFPO),
    "fsdp_sfpo_entropy_aware": dict(backend="fsdp", algo="sfpo", entropy=ENTROPY,
                                    rule=dict(K=2, gate="entropy", window=2, tau=0.5, transactional_state=True)),
    "fsdp_gxpo_aware_transactional": dict(backend="fsdp", gas=2, frozen_group=True,
                                          rule=dict(gate=None, optimizer_aware=True, transactional_state=True)),
}
EXPECT = {   # (step, fallback_reason) of each case's fallback
    "z1_gxpo_nan": (1, "nonfinite_g1"), "z2_sfpo_gas2_nan": (2, "nonfinite_g1"), "z3_gxpo_bf16_gas2_zero":
    (1, "small_g0"), "z3_sfpo_nan": (1, "nonfinite_gslow"), "z2_gxpo_bf16_gas2_nan_gcorr": (2, "nonfinite_gcorr"),
    "z1_sfpo_bf16_gas2": None, "fsdp_gxpo_nan": (1, "nonfinite_g1"), "fsdp_gxpo_mp_gas2_zero": (2, "small_g0"),
    "fsdp_sfpo_gas2_nan": (1, "nonfinite_g1"), "fsdp_sfpo_mp_nan_slow": (2, "nonfinite_gslow"),
    "bf16_optimizer_gxpo_gas2_nan": (2, "nonfinite_g1")}
# rank-local by design: the closure's loss on this rank's rows, the element count of this rank's extrapolation
LOCAL = {"loss", "loss_1", "loss_2", "loss_slow", "shard_numel"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_ranks(W.worker, W.WORLD, str(tmp_path_factory.mktemp("ranks3")), CASES, weights_only=False)


def _err(a, b):
    a, b = flat64(a), flat64(b)
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _same(x, y):
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(map(_same, x, y))
    return x == y or (isinstance(x, float) and x != x and y != y)


@pytest.mark.parametrize("name", list(CASES))
def test_every_step_matches_single_process_rule(runs, name):
    case = CASES[name]
    ref = W.reference(case)
    recs = [r[name] for r in runs]
    tol = case.get("tol", 1e-5)
    for step, want in enumerate(ref["params"]):
        for rank, rec in enumerate(recs):
            assert torch.equal(flat64(rec["params"][step]), flat64(recs[0]["params"][step])), (name, step, rank)
        err = _err(recs[0]["params"][step], want)
        assert err <= tol, f"{name}: step {step} params max err {err:.2e}"
    for key in ("exp_avg", "exp_avg_sq"):
        assert _err(recs[0][key], ref[key]) <= tol, (name, key)
    if "gate" in case["rule"] and case["rule"]["gate"]:      # the gate fires (on every rank, at the reference's step)
        assert ref["fired_step"] is not None, name
    for rec in recs:
        assert rec["fallbacks"] == ref["fallbacks"] and rec["fired_step"] == ref["fired_step"], name
    fell = [(s, i["fallback_reason"]) for s, i in enumerate(ref["infos"]) if i["fell_back"]]
    assert fell == ([EXPECT[name]] if EXPECT.get(name) else []), (name, fell)
    for step, ir in enumerate(ref["infos"]):
        i0 = recs[0]["infos"][step]
        for rec in recs[1:]:   # every reduced statistic and decision: bit-identical on every rank
            i = rec["infos"][step]
            assert i.keys() == i0.keys(), (name, step)
            assert all(_same(i[k], i0[k]) for k in i if k not in LOCAL), \
                (name, step, {k: (i[k], i0[k]) for k in i if k not in LOCAL and not _same(i[k], i0[k])})
        for k in ("active", "fell_back", "fallback_reason", "skipped", "backward_passes"):
            assert i0.get(k) == ir.get(k), (name, step, k, i0.get(k), ir.get(k))
        for k, v in ir.items():    # the reduced statistics match the reference's
            if k not in LOCAL and isinstance(v, float) and v == v and k in i0:
                assert abs(i0[k] - v) <= 10 * tol * max(1.0, abs(v)), (name, step, k, i0[k], v)


def test_layouts_are_uneven_and_empty(runs):
    """The layouts the cases are meant to exercise really occur."""
    # FSDP2, dim 0 over 3 (module order: s, l1, l1.bias, l3, l3.bias, norm, l4, l4.bias): s 1/0/0, l1 and its bias
    # 3/3/1 rows, l3, its bias and the norm 1/1/0, l4 and its bias 1/0/0
    numel = [r["fsdp_gxpo_nan"]["local_numel"] for r in runs]
    assert numel == [[1, 15, 3, 4, 1, 1, 2, 1], [0, 15, 3, 4, 1, 1, 0, 0], [0, 5, 1, 0, 0, 0, 0, 0]], numel
    # ZeRO 1/2: three groups (weights 35 + 8 + 2 = 45, small 7 + 2 + 2 + 1 = 12, s 1); s's group: padding on 1, 2
    for name in ("z1_gxpo_nan", "z2_sfpo_gas2_nan"):
        valid = [r[name]["valid"] for r in runs]
        assert [v[2] for v in valid] == [1, 0, 0], valid
        assert [sum(v[i] for v in valid) for i in range(3)] == [45, 12, 1], valid
    valid = [sum(r["z3_sfpo_nan"]["valid"]) for r in runs]
    assert sum(valid) == 58 and valid[1] != valid[2], valid
