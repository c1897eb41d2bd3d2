"""GXPO / SFPO inside DeepSpeed ZeRO 1/2/3 and the BF16_Optimizer (gxpo_kernels.integrations.deepspeed).

Two ranks on CPU (gloo), spawned once (imports cost ~6-8 s per spawn) for all the configurations:

* parity: N outer steps give the same full fp32 parameters, Adam moments and step counts (DeepSpeed's
  ``safe_get_full_*``) as the single-process rule on the same data: stages 1/2/3 fp32, stage 2 bf16,
  BF16_Optimizer, gradient accumulation, several param groups / ZeRO-3 sub-groups, CPU offload (stage 2 and
  3), SFPO, transactional state,
  optimizer-aware retention, an LR scheduler (advanced once per outer update), frozen parameters, ZeRO-3
  persistent parameters and parameter offload, fp16 with dynamic loss scaling (DeepSpeed's CPU accelerator
  refuses fp16; the worker lifts that check, torch runs fp16 on CPU), whose scale is fixed within an outer step;
* shard-local: each rank's extrapolation touched only its shard (numel = total / 2 + padding), through the
  C++ op (spied) and one prepared plan built once per run, and the low-precision weights equal the fp32
  master after every update; ZeRO's padding between parameters (parameter_alignment), in a param group smaller
  than a shard, or on a rank holding no parameter at all is skipped;
* rank-consistent decisions: NaN injected on one rank in pass 0/1/2 -> both ranks take the same fallback
  (the reference's), parameters identical across ranks; the gate fires on the same step on both ranks and
  at the reference's step (the entropy gate sees the dp-mean entropy, per-rank values differ);
* the fused GRPO losses in the engine's forward: fused-linear (ZeRO-3 lm_head gather, grad in forward) and
  logits-path ``grpo_loss`` on a tiny Qwen2;
* refusals at start-up (engine without ZeRO, inactive_threshold, and config checks on fakes).
"""
import json
import types

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.integrations import _ds_worker as W  # noqa: E402
from tests._utils import flat64, spawn_ranks  # noqa: E402

G = dict(gate=None)
MLP_CASES = {
    "z1": dict(stage=1, steps=4, rule=G),
    "z2_two_groups": dict(stage=2, groups=True, rule=G),
    "z3": dict(stage=3, steps=4, rule=G),
    "z3_gas2_sched_subgroups": dict(stage=3, gas=2, sched=True, groups=True, sub_group=40, rule=G),
    "z2_bf16": dict(stage=2, dtype="bf16", steps=4, rule=G),
    "bf16_optimizer": dict(stage=1, dtype="bf16", bf16_optimizer=True, groups=True, rule=G),
    "z2_offload": dict(stage=2, offload=True, rule=G),
    "z3_offload_sfpo": dict(stage=3, offload=True, algo="sfpo", rule=G),
    # ZeRO's padding inside a flat group: between parameters (parameter_alignment), and a 1-element param group
    # whose padding fills the rest of rank 0's shard and all of rank 1's (the last rank's padding > its shard)
    "z1_param_alignment": dict(stage=1, groups=True, zero={"parameter_alignment": True}, rule=G),
    "z2_param_alignment_bf16": dict(stage=2, dtype="bf16", zero={"parameter_alignment": True}, rule=G),
    "bf16_optimizer_scalar_group": dict(stage=1, dtype="bf16", bf16_optimizer=True, groups="scalar", rule=G),
    "z2_scalar_group": dict(stage=2, groups="scalar", rule=G),
    # a rank holding padding only (no real element on rank 1) must still join every collective
    "z1_scale_only": dict(stage=1, model="scale_only", rule=G),
    "z3_scale_only": dict(stage=3, model="scale_only", rule=G),
    "z1_sfpo_gas2": dict(stage=1, gas=2, algo="sfpo", rule=dict(gate=None, K=2, alpha=0.8)),
    "z2_transactional": dict(stage=2, groups=True, rule=dict(gate=None, transactional_state=True)),
    "z1_optimizer_aware": dict(stage=1, rule=dict(gate=None, optimizer_aware=True)),
    # frozen sub-modules (left out of the shards) with param groups; ZeRO-3 persistent parameters (the biases)
    # and parameter offload
    "z1_frozen_groups": dict(stage=1, frozen=True, groups=True, rule=G),
    "z3_bf16_frozen": dict(stage=3, dtype="bf16", frozen=True, groups=True, rule=G),
    "z3_frozen_persistent": dict(stage=3, frozen=True, groups="scalar",
                                 zero={"stage3_param_persistence_threshold": 20}, rule=G),
    "z3_offload_param_gas2": dict(stage=3, gas=2, offload=True, zero={"offload_param": {"device": "cpu"}}, rule=G),
    # fp16 with dynamic loss scaling (window 2: the scale doubles after every 2nd clean outer step). Each pass
    # must be unscaled by the scale its backward used: DeepSpeed grows the scale before it unscales, and with 3
    # internal engine.step() calls per outer step it used to grow mid-step and halve that pass's gradient
    "z2_fp16": dict(stage=2, dtype="fp16", steps=4, rule=G),
    "z1_fp16_sfpo": dict(stage=1, dtype="fp16", algo="sfpo", rule=dict(gate=None, K=2, alpha=0.8)),
    # non-finite gradients on ONE rank (pass index, step): every rank must fall back like the reference
    "nan_z2_g1": dict(stage=2, rule=G, nan_rank=1, nan_pass=1, nan_step=1),
    "nan_z3_gcorr": dict(stage=3, rule=G, nan_rank=0, nan_pass=2, nan_step=1),
    "nan_z3_g0": dict(stage=3, rule=G, nan_rank=1, nan_pass=0, nan_step=0),
    "nan_bf16opt_g1": dict(stage=1, dtype="bf16", bf16_optimizer=True, rule=G, nan_rank=1, nan_pass=1, nan_step=0),
    "nan_offload_gcorr": dict(stage=2, offload=True, rule=G, nan_rank=1, nan_pass=2, nan_step=2),
    "nan_sfpo_z1": dict(stage=1, algo="sfpo", rule=G, nan_rank=0, nan_pass=2, nan_step=1),
    "nan_z3_fp16_g1": dict(stage=3, dtype="fp16", rule=G, nan_rank=1, nan_pass=1, nan_step=1),   # fp16 overflow
    "nan_offload_fp16_gcorr": dict(stage=2, dtype="fp16", offload=True, rule=G, nan_rank=0, nan_pass=2, nan_step=1),
    # gates: GXPO's window gate on the reduced norm; SFPO's entropy gate on per-rank entropies
    "gate_window_z3": dict(stage=3, steps=5, rule=dict(gate="window", window=2, tau=0.3)),
    "gate_entropy_z2": dict(stage=2, algo="sfpo", steps=4, rule=dict(gate="entropy", window=2, tau=0.5),
                            entropy=[[1.0, 1.2], [1.0, 1.4], [1.0, 1.0], [2.0, 0.0]]),
    # an exception inside the closure, retried: the step is rewound, ZeRO's gradient buffers and DeepSpeed's
    # counters included (ZeRO-3 and BF16 used to add the aborted pass's gradient to the retried one's)
    "raise_z3_p1": dict(stage=3, rule=G, raise_at=(1, 1)),
    "raise_bf16opt_p0": dict(stage=1, dtype="bf16", bf16_optimizer=True, rule=G, raise_at=(1, 0)),
    "raise_z2_gas2_before": dict(stage=2, gas=2, rule=G, raise_at=(1, 2, 0)),   # before the pass's 1st backward
    # a zero gradient with fallback_grad="recompute": DeepSpeed already applied pass 0's step, which the rule
    # must undo (it used to raise an "internal" error), optimizer state included even with fallback_state="keep"
    "small_g0_recompute_z2": dict(stage=2, zero_step=1,
                                  rule=dict(gate=None, fallback_grad="recompute", fallback_state="keep")),
    "broken_gas2": dict(broken=True, stage=2, gas=2, raise_at=(0, 1, 1), rule=G),
    "fp16_min_scale": dict(min_scale=True, stage=2),
    "clip_roundtrip": dict(clip_roundtrip=True, stage=2),
    "refuse_stage0": dict(refused=True, stage=0),
    "refuse_inactive": dict(refused=True, stage=2, rule=dict(inactive_threshold=1e-3)),
}
LM_CASES = {
    "lm_z3_fused_gas2": dict(stage=3, lm="fused", gas=2, steps=2, rule=G),
    "lm_z2_fused": dict(stage=2, lm="fused", steps=2, rule=G),
    "lm_z1_logits": dict(stage=1, lm="logits", steps=2, rule=G),
}


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """Every case in one spawn: each spawn costs process start-up, DeepSpeed's import and a gloo group."""
    return spawn_ranks(W.worker, W.WORLD, str(tmp_path_factory.mktemp("ds")), {**MLP_CASES, **LM_CASES})


@pytest.fixture(scope="module")
def mlp_runs(ds_runs):
    return ds_runs


@pytest.fixture(scope="module")
def lm_runs(ds_runs):
    return ds_runs


def _check_parity(name, case, recs, rms_tol, max_tol):
    ref = W.single_process_reference(case)
    r0, r1 = recs[0][name], recs[1][name]
    for key in ("params", "exp_avg", "exp_avg_sq"):
        a, b, c = flat64(r0[key]), flat64(r1[key]), flat64(ref[key])
        assert torch.equal(a, b), f"{name}/{key}: ranks disagree"
        err = (a - c).abs()
        rms = float((a - c).norm() / c.norm().clamp(min=1e-30))
        assert rms <= rms_tol and float(err.max()) <= max_tol * max(1.0, float(c.abs().max())), \
            f"{name}/{key}: rms ratio {rms:.2e}, max abs err {float(err.max()):.2e}"
    assert sorted(set(r0["step"])) == sorted(set(r1["step"])) == ref["step"], (name, r0["step"], ref["step"])
    # fallbacks and gate: the same branch on both ranks, and the reference's
    for k in ("fallbacks", "fired_step"):
        assert r0[k] == r1[k] == ref[k], (name, k, r0[k], r1[k], ref[k])
    for i0, i1, ir in zip(r0["infos"], r1["infos"], ref["infos"]):
        for k in ("active", "fell_back", "fallback_reason", "skipped", "backward_passes"):
            assert i0.get(k) == i1.get(k) == ir.get(k), (name, k, i0.get(k), i1.get(k), ir.get(k))
        # entropy_signal: the dp-mean the gate saw (each rank passes its own entropy), not the rank's own
        for k in ("scale_mean", "scale_max", "grad_norm_0", "grad_norm_corr", "cos_g0_g1", "disp_norm",
                  "entropy_signal"):
            if isinstance(ir.get(k), float) and ir[k] == ir[k]:
                assert i0[k] == i1[k], (name, k)
                assert abs(i0[k] - ir[k]) <= 1e-4 * max(1.0, abs(ir[k])), (name, k, i0[k], ir[k])
    assert r0["lr"] == r1["lr"] and all(abs(a - b) < 1e-12 for a, b in zip(r0["lr"], ref["lr"])), name
    assert r0["global_steps"] == case.get("steps", 3), name
    # the rule's wrapper keeps torch's LR-scheduler call tracker: no "optimizer.step() has been overridden" warning
    assert r0["sched_warnings"] == r1["sched_warnings"] == [], (name, r0["sched_warnings"])
    # the model the next forward sees is the master rounded to the model dtype, on every rank
    for rec in (r0, r1):
        lp, master = flat64(rec["lowp"]), flat64(rec["params"])
        tol = 0.0 if case.get("dtype", "fp32") == "fp32" else 2 ** -8
        assert float(((lp - master).abs() - tol * master.abs()).max()) <= 0, name


@pytest.mark.parametrize("name", [n for n, c in MLP_CASES.items()
                                  if not (c.get("refused") or c.get("broken") or c.get("clip_roundtrip")
                                          or c.get("min_scale"))])
def test_matches_single_process_rule(mlp_runs, name):
    _check_parity(name, MLP_CASES[name], mlp_runs, rms_tol=1e-5, max_tol=1e-5)


@pytest.mark.parametrize("name", ["z1", "z2_two_groups", "z3", "z3_gas2_sched_subgroups", "z2_bf16",
                                  "bf16_optimizer", "z2_offload", "z3_offload_sfpo", "z1_param_alignment",
                                  "z2_param_alignment_bf16", "bf16_optimizer_scalar_group", "z2_scalar_group",
                                  "z1_scale_only", "z3_scale_only"])
def test_extrapolation_is_shard_local_and_uses_cpp(mlp_runs, name):
    kinds = {"z1": "z12", "z2_two_groups": "z12", "z3": "z3", "z3_gas2_sched_subgroups": "z3", "z2_bf16": "z12",
             "bf16_optimizer": "bf16", "z2_offload": "z12", "z3_offload_sfpo": "z3", "z1_param_alignment": "z12",
             "z2_param_alignment_bf16": "z12", "bf16_optimizer_scalar_group": "bf16", "z2_scalar_group": "z12",
             "z1_scale_only": "z12", "z3_scale_only": "z3"}
    n_shards = {"z2_two_groups": 2, "z3_gas2_sched_subgroups": 3, "bf16_optimizer": 2, "z1_param_alignment": 2,
                "bf16_optimizer_scalar_group": 2, "z2_scalar_group": 2}.get(name, 1)
    total = mlp_runs[0][name]["total_numel"]
    for rank, recs in enumerate(mlp_runs):
        rec = recs[name]
        assert rec["kind"] == kinds[name]
        assert rec["shard_device"] == "cpu"
        # Z1/2/BF16 pad each flat group to 2*dp (parameter_alignment: also each parameter to 16 bytes, <= 8
        # elements in bf16); Z3 pads every parameter to a multiple of dp
        slack = 4 * n_shards + (4 * 8 if "alignment" in name else 0)
        assert total / W.WORLD <= rec["shard_numel"] <= total / W.WORLD + slack, (rec["shard_numel"], total)
        assert rec["n_shards"] == n_shards
        calls = rec["cpp_calls"]
        assert len(calls) == MLP_CASES[name].get("steps", 3), calls      # one fused call per outer step
        # only this rank's real data: ZeRO's alignment padding (uninitialised under ZeRO-3) is skipped
        assert all(c["ok"] and c["numel"] == rec["valid_numel"] for c in calls), calls
        for c in calls:                      # the C++ op agrees with the PyTorch reference on the same shard
            assert c["params_err"] <= 1e-6, c
            assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(c["stats"], c["ref_stats"])), c
        assert rec["infos"][0]["extrapolate_backend"] == "cpp"
        # one prepared extrapolation plan for the run: the views of the shards are new tensors every step (the
        # same memory), and with the plan keyed on their ids it was built again on every step
        assert rec["plan_builds"] == 1, rec["plan_builds"]
        assert rec["infos"][0]["shard_numel"] == rec["valid_numel"]
        if rank == 0 and "alignment" not in name:   # rank 0's shards hold no padding: one view per shard
            assert rec["n_runs"] == n_shards, rec["n_runs"]
    assert sum(recs[name]["valid_numel"] for recs in mlp_runs) == total     # the shards tile the model


def test_nan_on_one_rank_falls_back_on_both(mlp_runs):
    expect = {"nan_z2_g1": (1, "nonfinite_g1"), "nan_z3_gcorr": (1, "nonfinite_gcorr"),
              "nan_z3_g0": (0, "nonfinite_g0"), "nan_bf16opt_g1": (0, "nonfinite_g1"),
              "nan_offload_gcorr": (2, "nonfinite_gcorr"), "nan_sfpo_z1": (1, "nonfinite_g2"),
              "nan_z3_fp16_g1": (1, "nonfinite_g1"), "nan_offload_fp16_gcorr": (1, "nonfinite_gcorr")}
    for name, (step, reason) in expect.items():
        for recs in mlp_runs:
            info = recs[name]["infos"][step]
            assert info["fell_back"] and info["fallback_reason"] == reason, (name, info)
            assert all(torch.isfinite(p).all() for p in recs[name]["params"]), name
        assert torch.equal(flat64(mlp_runs[0][name]["lowp"]), flat64(mlp_runs[1][name]["lowp"])), name


def test_fp16_loss_scale_is_fixed_within_an_outer_step(mlp_runs):
    """Every pass of an outer step backward-scales (and so unscales) with the scale the step began with; the scale
    makes one update per outer step: doubled after the 3rd clean one (window 2, from 256), halved by the step
    whose pass 1 overflowed on one rank (DeepSpeed skipped that pass; the rule fell back to θ0 + ĝ0)."""
    expect = {"z2_fp16": [256.0, 256.0, 256.0, 512.0], "z1_fp16_sfpo": [256.0] * 3,
              "nan_z3_fp16_g1": [256.0, 256.0, 128.0], "nan_offload_fp16_gcorr": [256.0, 256.0, 128.0]}
    for name, scales in expect.items():
        for recs in mlp_runs:
            seen = recs[name]["loss_scales"]
            per_step = [sorted({s for st, _, s in seen if st == i}) for i in range(len(scales))]
            assert per_step == [[s] for s in scales], (name, seen)
            assert recs[name]["skipped_steps"] == 0, name     # every overflow fell back to a step with ĝ0


def test_fp16_overflow_at_the_minimum_scale_raises_and_rewinds(mlp_runs):
    """The rule holds the loss scale inside a step but still lets DeepSpeed's scaler raise at its minimum scale,
    mid-step: the step is rewound (master, global_steps, scaler) and the hold is released."""
    for recs in mlp_runs:
        r = recs["fp16_min_scale"]
        assert r["msg"] is not None and "loss scale already at minimum" in r["msg"], r
        assert r["unchanged"] and not r["held"], r


def test_gates_fire_on_the_same_step(mlp_runs):
    w0, w1 = mlp_runs[0]["gate_window_z3"], mlp_runs[1]["gate_window_z3"]
    assert w0["fired_step"] is not None and w0["fired_step"] == w1["fired_step"] < 4
    assert [i["active"] for i in w0["infos"]] == [i["active"] for i in w1["infos"]]
    assert not w0["infos"][-1]["active"] and w0["infos"][-1]["backward_passes"] == 1
    # per-rank entropies differ: only the dp-mean makes rank 0 (constant 1.0, 1.0) fire with rank 1
    e0, e1 = mlp_runs[0]["gate_entropy_z2"], mlp_runs[1]["gate_entropy_z2"]
    assert e0["fired_step"] == e1["fired_step"] == 1


def test_rewound_and_small_g0_steps(mlp_runs):
    for recs in mlp_runs:
        assert recs["small_g0_recompute_z2"]["infos"][1]["fallback_reason"] == "small_g0"
        assert recs["small_g0_recompute_z2"]["infos"][1]["backward_passes"] == 2
        for name in ("raise_z3_p1", "raise_bf16opt_p0", "raise_z2_gas2_before"):
            assert [i["fell_back"] for i in recs[name]["infos"]] == [False] * 3, name
            # after a step that raised: ZeRO-3 re-gathers at once; ZeRO-1/2 leave the module's weights stale (the
            # all-gather is a collective an exception on one rank could not run) and refuse a forward and
            # state_dict() until rule.sync_weights(), which brings them to the rewound master exactly
            (check,) = recs[name]["stale_checks"]
            if name == "raise_z3_p1":
                assert check["errors"] == [None, None], check
            else:
                assert all(e is not None and "rule.sync_weights()" in e for e in check["errors"]), check
            assert check["diff"] == 0.0, check


def test_exception_mid_accumulation_is_refused_by_name(mlp_runs):
    # the partial accumulation cannot be rewound: the next step says so instead of blaming a user engine.step()
    for recs in mlp_runs:
        msg = recs["broken_gas2"]
        assert msg is not None and "stopped inside a pass after 1 engine.backward call(s) " \
            "(gradient_accumulation_steps=2)" in msg


def test_allreduce_contract(mlp_runs):
    # [:-1] SUM, [-1] MAX; rank 1's local non-finite count reaches rank 0
    assert mlp_runs[0]["_allreduce"] == mlp_runs[1]["_allreduce"] == [3.0, 1.0, 5.0]


def test_unsupported_engines_are_refused(mlp_runs):
    for recs in mlp_runs:
        assert "zero_optimization" in recs["refuse_stage0"] and "ZeRO stage 0" in recs["refuse_stage0"]
        assert "inactive_threshold" in recs["refuse_inactive"]


def test_wrap_sets_and_detach_restores_the_engines_clipping(mlp_runs):
    """wrap(max_grad_norm=3) -> 3; detach() -> the engine's 1.0 again; a wrap whose rule is refused (K=0) leaves
    1.0 (found by fuzzing: detach kept 3, and a refused wrap had already set its value)."""
    for recs in mlp_runs:
        assert recs["clip_roundtrip"] == [1.0, 3.0, 1.0, 1.0]


@pytest.mark.parametrize("name", list(LM_CASES))
def test_fused_grpo_losses_in_engine_forward(lm_runs, name):
    # Adam turns fp32 round-off on near-zero gradients into lr-sized steps on a few coordinates: RMS check
    _check_parity(name, LM_CASES[name], lm_runs, rms_tol=1e-4, max_tol=1e-3)
    assert lm_runs[0][name]["kind"] == ("z3" if LM_CASES[name]["stage"] == 3 else "z12")


# ---- start-up checks on fakes (no processes) -----------------------------------------------------------------
def _fake_engine(**zero_cfg):
    from gxpo_kernels.integrations.deepspeed._zero import _ENGINE_ATTRS, _ZO_ATTRS
    zo = types.SimpleNamespace(**{a: None for a in _ZO_ATTRS["z12"]})
    zo.single_partition_of_fp32_groups = [torch.zeros(4)]
    zo.compute_grad_norm = True
    eng = types.SimpleNamespace(**{a: None for a in _ENGINE_ATTRS})
    eng.optimizer = zo
    eng.zero_optimization_stage = lambda: 2
    zc = types.SimpleNamespace(offload_optimizer=None, offload_param=None, zero_hpz_partition_size=1)
    for k, v in zero_cfg.items():
        setattr(zc, k, v)
    eng._config = types.SimpleNamespace(zero_config=zc, bfloat16_config=types.SimpleNamespace(),
                                        float16_config=types.SimpleNamespace())
    return eng


@pytest.mark.parametrize("zero_cfg,match", [
    (dict(offload_optimizer=types.SimpleNamespace(device="nvme", ratio=1.0)), "NVMe"),
    (dict(offload_param=types.SimpleNamespace(device="nvme")), "NVMe"),
    (dict(offload_optimizer=types.SimpleNamespace(device="cpu", ratio=0.5)), "partial optimizer offload"),
    (dict(zero_hpz_partition_size=2), "hpZ"),
    (dict(mics_shard_size=2), "MiCS"),
])
def test_config_refusals(zero_cfg, match):
    from gxpo_kernels.integrations.deepspeed._zero import check_engine
    with pytest.raises(ValueError, match=match):
        check_engine(_fake_engine(**zero_cfg))


def test_low_precision_master_and_missing_internals_are_refused():
    from gxpo_kernels.integrations.deepspeed._zero import check_engine
    eng = _fake_engine()
    eng._config.bfloat16_config.bf16_master_weights_and_grads = True
    with pytest.raises(ValueError, match="master weights"):
        check_engine(eng)
    eng = _fake_engine()
    eng.optimizer.single_partition_of_fp32_groups = [torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="fp32 master shards"):
        check_engine(eng)
    eng = _fake_engine()
    del eng.optimizer.update_lp_params
    with pytest.raises(RuntimeError, match=r"update_lp_params.*0\.19"):
        check_engine(eng)
    assert check_engine(_fake_engine()) == "z12"


def test_shm_allreduce_switch(monkeypatch):
    """GXPO_DEEPSPEED_SHM=0 makes DeepSpeed's backend skip its shared-memory all-reduce op (no JIT build); 1 leaves
    DeepSpeed's default; any other value is an error naming the variable."""
    import importlib
    from gxpo_kernels.integrations.deepspeed import apply_shm_setting
    dct = importlib.import_module("deepspeed.comm.torch")
    default = dct.build_shm_op
    monkeypatch.setattr(dct, "build_shm_op", default)          # restored afterwards
    monkeypatch.setenv("GXPO_DEEPSPEED_SHM", "1")
    apply_shm_setting()
    assert dct.build_shm_op is default
    monkeypatch.setenv("GXPO_DEEPSPEED_SHM", "off")
    with pytest.raises(ValueError, match="GXPO_DEEPSPEED_SHM must be 0 or 1, got 'off'"):
        apply_shm_setting()
    assert dct.build_shm_op is default
    monkeypatch.setenv("GXPO_DEEPSPEED_SHM", "0")
    apply_shm_setting()
    built = []
    monkeypatch.setattr(dct, "get_accelerator", lambda: built.append(1))     # what the real builder asks first
    assert dct.build_shm_op() is None and built == []


def test_initialize_finds_the_shipped_config_by_name(tmp_path, monkeypatch):
    """`gds.initialize(config="ds_zero3.json")` (as docs/deepspeed.md writes it) reads the config shipped with the
    package when no such file is in the working directory, as `--deepspeed ds_zero3.json` does; a file there wins,
    and any other missing name is a clear error listing the shipped ones."""
    import deepspeed
    from gxpo_kernels.integrations import deepspeed as gds
    seen = []

    def fake_initialize(*, config, **kw):
        seen.append(config)
        raise RuntimeError("stop")

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    monkeypatch.chdir(tmp_path)
    for name, stage in (("ds_zero3.json", 3), ("ds_zero2.json", 2)):
        with pytest.raises(RuntimeError, match="stop"):
            gds.initialize(model=torch.nn.Linear(2, 2), config=name, gxpo={})
        assert seen[-1]["zero_optimization"]["stage"] == stage
    (tmp_path / "ds_zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(RuntimeError, match="stop"):
        gds.initialize(model=torch.nn.Linear(2, 2), config="ds_zero3.json", gxpo={})
    assert seen[-1]["zero_optimization"]["stage"] == 1
    for missing in ("ds_zero9.json", str(tmp_path / "sub" / "ds_zero2.json")):
        with pytest.raises(FileNotFoundError, match="shipped configs: ds_zero2.json"):
            gds.initialize(model=torch.nn.Linear(2, 2), config=missing, gxpo={})


def test_closure_raising_on_one_rank_ends_every_rank():
    """A closure that raises on rank 1 only, before its forward (a loss failing on one rank's data): under ZeRO-2
    the rule's rewind on rank 1 ran the all-gather that re-syncs the module's weights, which met rank 0's gradient
    reduction in its backward: both ranks hung (until the process group's 30-minute timeout). Now rank 1 raises its
    error and ends, and rank 0 fails in its backward on the closed connection, in bounded time."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", "from tests.integrations import _ds_worker as W; "
                        "W.one_rank_raises_main(stage=2, timeout=90)"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert None not in out["exitcodes"], f"a rank still ran after {out['seconds']:.0f} s (hung): {out}"
    assert out["exitcodes"] == [1, 1] and out["errors"]["1"] == "Injected: the loss failed on rank 1", out
    assert "Connection closed by peer" in out["errors"]["0"] or "Connection reset" in out["errors"]["0"], out
