"""GXPO / SFPO on PyTorch FSDP2 (gxpo_kernels.integrations.fsdp).

Two ranks on CPU (gloo), ONE spawn for every configuration (imports cost ~6-8 s per spawn), and one 3-rank spawn:

* parity: after several outer steps the gathered parameters, Adam moments and step counts equal the
  single-process rule's on the same data (GXPO with the window gate firing and a NaN put into one rank's
  local gradient shard; SFPO with the entropy gate on per-rank entropies and a NaN fallback; two param groups
  with transactional state and optimizer-aware retention; bf16 compute over fp32 shards via
  MixedPrecisionPolicy), and the same steps under DeepSpeed ZeRO-3 agree;
* shard-local: θ0 / ĝ0 have the local shard shapes (rank 1 holds an empty shard of the (1, 3) gain), the
  extrapolation is one C++ call per active step on the local shards whose element counts sum to the model
  size, through one prepared plan built once per run, and the rule issues only the documented collectives (no
  gather of any parameter);
* a second (per-parameter) mesh over the same ranks: the same steps as one mesh;
* three ranks (a second spawn): a tied-embedding LM with a frozen layer whose parameters split unevenly (empty
  shards), a binding clip norm, per-block and root-only sharding, bf16 compute, SFPO, optimizer-aware with the
  frozen layer in the optimizer: parity with the single-process rule; resume bit-exact;
* checkpoint: N steps == k steps + torch.distributed.checkpoint save + load into fresh objects + N - k steps,
  bit for bit (parameters, optimizer state, rule state, diagnostics);
* refusals by name: CPUOffloadPolicy, inactive_threshold, a model not sharded by fully_shard, a foreign param,
  a closure that leaves the model unsharded; the TRL trainer's FSDP refusal.
"""
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.integrations import _fsdp_worker as W  # noqa: E402
from tests._utils import flat64, free_port, spawn_ranks  # noqa: E402

NAN_G1 = dict(nan=(1, 1))
CASES = {
    "gxpo_gate_nan": dict(steps=5, rule=dict(gate="window", window=2, tau=0.3), **NAN_G1),
    # + an exception on pass 1 of step 1 (the step is rewound and retried) and a forced plain step 2
    "gxpo_nan_gcorr": dict(steps=4, rule=dict(gate=None), nan=(0, 2), raise_at=(1, 1), force_plain=(2,)),
    "sfpo_entropy_nan": dict(algo="sfpo", steps=5, rule=dict(K=2, gate="entropy", window=2, tau=0.5),
                             nan=(0, 1), entropy=[[1.0, 1.0], [1.0, 1.2], [1.0, 1.4], [1.0, 1.0], [2.0, 0.0]]),
    "gxpo_groups_transactional_aware": dict(groups=True, steps=4, rule=dict(gate=None, transactional_state=True,
                                                                   optimizer_aware=True)),
    "gxpo_mixed_precision": dict(mp=True, steps=4, rule=dict(gate=None)),
    # an exception between the forward and the backward of pass 2 (and of SFPO's slow pass): FSDP still holds
    # that pass's unsharded parameters, which the retried step's forward used to reuse instead of the rewound
    # shards; the rule now reshards on the rewind
    "gxpo_raise_before_backward": dict(rule=dict(gate=None), raise_before_backward=(1, 2)),
    "sfpo_raise_before_backward": dict(algo="sfpo", rule=dict(gate=None, K=2), raise_before_backward=(1, 2)),
    # micro-batches accumulated without gradient sync, an exception between them: their partial sum (kept in
    # FSDP's unsharded .grad) used to be added to the retried pass's gradient
    "gxpo_micro_raise_between": dict(micro=True, rule=dict(gate=None), raise_between_micro=(1, 1)),
    # the same with bf16 compute (FSDP accumulates the micro-batches in its fp32 reduce_dtype buffer, which the
    # rewind must drop too), set_is_last_backward on the last micro-batch only, reshard_after_forward=False
    "gxpo_mp_micro_raise_between": dict(mp=True, micro=True, last_backward=True, reshard_after_forward=False,
                                        rule=dict(gate=None), raise_between_micro=(1, 1)),
    # a branch rank 0 does not take (gain: no gradient there; FSDP's set_reduce_scatter_unused_params), param
    # groups with their own lr and weight decay, a NaN fallback and the window gate
    "gxpo_unused_on_rank0_group_lr": dict(steps=4, unused_on_rank0=True, groups=True, group_lr=True, nan=(1, 1),
                                          rule=dict(gate="window", window=2, tau=0.3, optimizer_aware=True)),
    "gxpo_plain": dict(steps=4, rule=dict(gate="window", window=2, tau=0.3)),
    "ds_z3_gxpo_plain": dict(kind="deepspeed", steps=4, rule=dict(gate="window", window=2, tau=0.3)),
}
# resume = the same case stopped after k steps, checkpointed, loaded into fresh objects and continued
CASES["resume_gxpo"] = dict(CASES["gxpo_gate_nan"], kind="resume", k=2)
CASES["resume_sfpo"] = dict(CASES["sfpo_entropy_nan"], kind="resume", k=2)
PARITY = [n for n, c in CASES.items() if c.get("kind", "fsdp") == "fsdp"]




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_ranks(W.worker, W.WORLD, str(tmp_path_factory.mktemp("fsdp")), CASES, weights_only=False)


def _close(a, b, tol, what):
    a, b = flat64(a), flat64(b)
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"{what}: max abs err {err:.2e}"


@pytest.mark.parametrize("name", PARITY)
def test_matches_single_process_rule(runs, name):
    ref = W.single_process_reference(CASES[name])
    r0, r1 = runs[0][name], runs[1][name]
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(flat64(r0[key]), flat64(r1[key])), f"{name}/{key}: ranks disagree"
        _close(r0[key], ref[key], 1e-6, f"{name}/{key}")
    assert r0["step"] == r1["step"] == ref["step"]
    for k in ("fallbacks", "fired_step"):
        assert r0[k] == r1[k] == ref[k], (name, k, r0[k], r1[k], ref[k])
    assert r0["rule_state"]["gate"] == r1["rule_state"]["gate"]
    for i0, i1, ir in zip(r0["infos"], r1["infos"], ref["infos"]):
        for k in ("active", "fell_back", "fallback_reason", "skipped", "backward_passes"):
            assert i0.get(k) == i1.get(k) == ir.get(k), (name, k, i0.get(k), i1.get(k), ir.get(k))
        for k in ("grad_norm_0", "grad_norm_1", "grad_norm_corr", "scale_mean", "scale_max", "retention_mean",
                  "cos_g0_g1", "cos_g0_gcorr", "disp_norm", "gate_z", "entropy_signal"):   # the dp-mean entropy
            if isinstance(ir.get(k), float) and ir[k] == ir[k]:
                assert i0[k] == i1[k], (name, k)
                assert abs(i0[k] - ir[k]) <= 1e-5 * max(1.0, abs(ir[k])), (name, k, i0[k], ir[k])


def test_gate_fires_and_nan_on_one_rank_falls_back_on_both(runs):
    expect = {"gxpo_gate_nan": (1, "nonfinite_g1"), "gxpo_nan_gcorr": (0, "nonfinite_gcorr"),
              "sfpo_entropy_nan": (0, "nonfinite_g1")}
    for name, (step, reason) in expect.items():
        for recs in runs:
            info = recs[name]["infos"][step]
            assert info["fell_back"] and info["fallback_reason"] == reason, (name, info)
            assert all(torch.isfinite(p).all() for p in recs[name]["params"]), name
    for name in ("gxpo_gate_nan", "sfpo_entropy_nan"):
        fired = [recs[name]["fired_step"] for recs in runs]
        assert fired[0] is not None and fired[0] == fired[1], (name, fired)
        assert not runs[0][name]["infos"][-1]["active"] and runs[0][name]["infos"][-1]["backward_passes"] == 1
    # the injected exception rewound step 1 (retried as a normal step); step 2 was forced plain, on both ranks
    for recs in runs:
        infos = recs["gxpo_nan_gcorr"]["infos"]
        assert infos[1]["active"] and not infos[1]["fell_back"] and infos[1]["backward_passes"] == 3
        assert infos[2]["fallback_reason"] == "forced" and infos[2]["backward_passes"] == 1
    # SFPO's entropy gate (not fed on the step-0 fallback): rank 0's entropies are constant and would never
    # fire it alone; the dp-mean (1.1, 1.2) does, at the second observation
    assert runs[0]["sfpo_entropy_nan"]["fired_step"] == 2


@pytest.mark.parametrize("name", PARITY)
def test_buffers_and_extrapolation_are_shard_local(runs, name):
    total = runs[0][name]["total_numel"]
    for rank, recs in enumerate(runs):
        rec = recs[name]
        assert rec["theta0_shapes"] == rec["local_shapes"]
        assert rec["g0_shapes"] in ([], rec["local_shapes"])
        active = [i for i in rec["infos"] if i["active"] and i["fallback_reason"] in (None, "nonfinite_gcorr")]
        # one fused call per extrapolation, plus the one of a step that raised after it (rewound and retried)
        at = CASES[name].get("raise_at") or CASES[name].get("raise_before_backward") or \
            CASES[name].get("raise_between_micro")
        aborted = int(at is not None and at[1] >= 2)
        assert len(rec["cpp_calls"]) == len(active) + aborted and active
        local = sum(torch.Size(s).numel() for s in rec["local_shapes"])
        assert all(c["numel"] == local and c["n"] == len(rec["local_shapes"]) for c in rec["cpp_calls"])
        assert all(i["shard_numel"] == local and i["extrapolate_backend"] == "cpp" for i in active)
        # one prepared extrapolation plan for the run (the local shards come as new tensor objects every step: the
        # same memory; keyed on their ids, the plan was built again on every active step)
        assert rec["plan_builds"] == 1, rec["plan_builds"]
    assert rank == 1 and (0, 3) in runs[1][name]["local_shapes"]          # rank 1's empty shard of the gain
    assert sum(sum(torch.Size(s).numel() for s in recs[name]["local_shapes"]) for recs in runs) == total


GATHER = "distributed.all_gather_single" if hasattr(torch.distributed, "all_gather_single") else \
    "distributed.all_gather_into_tensor"


def _collectives(info):
    return eval(info["collectives"])


def test_rule_collectives_are_the_documented_ones(runs):
    # per pass one all-reduce of 2 float64 (grad norm, refusals); per extrapolation one all-gather of 12 (stats);
    # SFPO's entropy gate one all-reduce of 3. Nothing else, no gathers (GXPO's cos(g0, g_corr) diagnostic, one
    # all-gather of 2, is off by default). The entropy's all-reduce carries (entropy, whether this rank passed one,
    # whether it refused it).
    n = 12 * W.WORLD
    # Every step begins with one all-reduce of 2 (force_plain, the same on every rank; whether this rank refused the
    # entropy argument).
    norm, forced = ("distributed.all_reduce", 2), ("distributed.all_reduce", 2)
    gxpo_active = [forced] + [norm] * 2 + [(GATHER, n)] + [norm]
    plain = runs[0]["gxpo_plain"]["infos"]
    for info in plain:
        expect = gxpo_active if info["active"] else [forced, norm]
        assert _collectives(info) == expect, info["collectives"]
    g = runs[0]["gxpo_gate_nan"]["infos"][1]                    # nonfinite g1: two norms, then the fallback
    assert _collectives(g) == [forced] + [norm] * 2
    s = runs[0]["sfpo_entropy_nan"]["infos"]
    assert _collectives(s[1]) == [forced] + [norm] * 2 + [(GATHER, n)] + \
        [norm] + [("distributed.all_reduce", 3)]   # K = 2 norms, stats, slow norm, entropy


def test_same_steps_as_deepspeed_zero3(runs):
    for recs in runs:
        ds, fs = recs["ds_z3_gxpo_plain"], recs["gxpo_plain"]
        for key in ("params", "exp_avg", "exp_avg_sq"):
            _close(fs[key], ds[key], 1e-6, f"fsdp vs zero-3 {key}")
        assert fs["fired_step"] == ds["fired_step"] is not None


@pytest.mark.parametrize("name,straight", [("resume_gxpo", "gxpo_gate_nan"), ("resume_sfpo", "sfpo_entropy_nan")])
def test_checkpoint_resume_is_bit_exact(runs, name, straight):
    for recs in runs:
        res, ref = recs[name], recs[straight]
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(flat64(res[key]), flat64(ref[key])), f"{name}/{key} differs after resume"
        assert res["step"] == ref["step"] and res["rule_state"] == ref["rule_state"]
        assert res["fired_step"] == ref["fired_step"] is not None and res["fallbacks"] == ref["fallbacks"] == 1
        for a, b in zip(res["infos"], ref["infos"]):
            a, b = dict(a), dict(b)
            a.pop("collectives", None), b.pop("collectives", None)
            assert a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), (a, b)
        assert res["loaded_theta0_equal"]           # buffers=True: θ0 of the last step came back
        assert res["extra_marker"] == CASES[name]["k"] + 0.5


def test_unsupported_configurations_are_refused(runs):
    for recs in runs:
        r = recs["_refusals"]
        assert "CPUOffloadPolicy" in r["cpu_offload"]
        for name in ("fp16_compute", "fp16_reduce", "fp16_params"):
            assert r[name].startswith("ValueError") and "float16 is not supported" in r[name], r[name]
            assert "GradScaler" in r[name] and "bfloat16" in r[name]
        assert "inactive_threshold" in r["inactive_threshold"]
        assert "fully_shard" in r["not_fsdp"] and r["not_fsdp"].startswith("TypeError")
        assert "'gxpo' or 'sfpo'" in r["algo"]
        assert "not the model's" in r["foreign_param"]
        assert "still unsharded after the closure" in r["unsharded_after_closure"]
        for mp in (0, 1):                              # gradient sync left off for the closure's last backward
            assert "kept its gradients unreduced" in r[f"unreduced_mp{mp}"], r[f"unreduced_mp{mp}"]
            assert r[f"unreduced_mp{mp}_then_clean"]
        assert r["per_param_mesh"] in (True, None)     # a second mesh of the same ranks (None: torch has none)


def test_load_checkpoint_of_other_settings_changes_nothing(runs):
    # the rule's settings are checked before the model and the optimizer are loaded (they used to be loaded first)
    for recs in runs:
        r = recs["_refusals"]
        assert "K: checkpoint 5 vs rule 3" in r["load_other_K"]
        assert r["load_other_K_unchanged"]
        # a rule state without the rule's name and model signature (an older version's checkpoint) still loads;
        # a current one into a rule with one trainable parameter tensor fewer is refused
        assert r["old_format_loads"]
        assert "params: checkpoint [" in r["other_params"], r["other_params"]


def test_entropy_passed_on_some_ranks_only_raises_on_every_rank(runs):
    # a rank without an entropy used to skip the entropy's all-reduce: the ranks' collectives went out of step
    for recs in runs:
        r = recs["_refusals"]
        assert "entropy was passed on 1 of 2 ranks" in r["entropy_one_rank"]
        assert r["entropy_one_rank_rewound"]
        assert r["entropy_then_all"][:2] == (True, 3)
    assert runs[0]["_refusals"]["entropy_then_all"] == runs[1]["_refusals"]["entropy_then_all"]


# three ranks, a tied-embedding LM with a frozen layer; dim 0 of several parameters does not split evenly (and
# leaves ranks empty); the clip norm binds (pre-clip norms ~1.3, max_grad_norm 0.05) so the sharded norm matters
LM_CASES = {
    "lm_per_layer_clip": dict(steps=4, rule=dict(gate="window", window=2, tau=0.3, max_grad_norm=0.05)),
    "lm_root_only_mp_sfpo": dict(root_only=True, mp=True, algo="sfpo", rule=dict(gate=None, K=2, max_grad_norm=0.05)),
    "lm_frozen_in_optimizer_aware": dict(frozen_in_optimizer=True, rule=dict(gate=None, optimizer_aware=True,
                                                                             transactional_state=True)),
    "lm_resume": dict(kind="resume", steps=4, k=2, rule=dict(gate="window", window=2, tau=0.3)),
}


@pytest.fixture(scope="module")
def runs3(tmp_path_factory):
    import torch.multiprocessing as mp
    d = str(tmp_path_factory.mktemp("fsdp3"))
    mp.spawn(W.worker_lm, args=(3, free_port(), d, LM_CASES), nprocs=3, join=True)
    return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(3)]


@pytest.mark.parametrize("name", list(LM_CASES))
def test_three_ranks_tied_frozen_uneven_match_single_process(runs3, name):
    ref = W.lm_reference(LM_CASES[name], 3)
    r0 = runs3[0][name]
    assert set(r0["params"]) == set(ref["params"]) and "head.weight" not in r0["params"]   # one tied tensor
    assert torch.equal(r0["params"]["frozen.weight"], ref["params"]["frozen.weight"])       # never moved
    for recs in runs3[1:]:
        assert all(torch.equal(recs[name]["params"][n], t) for n, t in r0["params"].items()), "ranks disagree"
    for key in ("params", "exp_avg_sq"):
        assert set(r0[key]) == set(ref[key])
        for n in ref[key]:
            _close([r0[key][n]], [ref[key][n]], 1e-6, f"{name}/{key}/{n}")
    assert [0 in recs[name]["local_numel"] for recs in runs3] == [False, True, True]          # empty shards
    assert r0["fired_step"] == ref["fired_step"] and r0["rule_state"]["gate"].keys() == ref["rule_state"]["gate"].keys()
    for recs in runs3:
        for i, i0, ir in zip(recs[name]["infos"], r0["infos"], ref["infos"]):
            for k in ("active", "fell_back", "fallback_reason", "backward_passes"):
                assert i.get(k) == ir.get(k), (name, k)
            for k in ("grad_norm_0", "grad_norm_corr", "grad_norm_slow", "scale_mean", "disp_norm", "gate_z"):
                if isinstance(ir.get(k), float) and ir[k] == ir[k]:
                    assert i[k] == i0[k], (name, k)                                             # every rank
                    assert abs(i[k] - ir[k]) <= 1e-5 * max(1.0, abs(ir[k])), (name, k, i[k], ir[k])
    clip = LM_CASES[name]["rule"].get("max_grad_norm")
    if clip is not None:                                                                       # the clip binds
        assert all(i.get("grad_norm_0", i.get("grad_norm_slow")) > clip for i in ref["infos"])
    if name == "lm_resume":                                      # the window gate fires after the checkpoint
        assert ref["fired_step"] is not None and ref["fired_step"] >= LM_CASES[name]["k"]


def test_three_ranks_resume_is_bit_exact(runs3):
    for recs in runs3:
        a, b = recs["lm_resume"], recs["lm_resume/resumed"]
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert all(torch.equal(a["exp_avg_sq"][n], b["exp_avg_sq"][n]) for n in a["exp_avg_sq"])
        assert a["rule_state"] == b["rule_state"] and a["fired_step"] == b["fired_step"]
        for x, y in zip(a["infos"], b["infos"]):
            assert x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x)


def test_trl_trainer_refuses_fsdp_by_name(tmp_path, monkeypatch):
    """accelerate enables FSDP only on accelerators (a CPU run with an FSDP plugin becomes DDP), so the TRL
    trainer's FSDP path cannot run here; the GXPO/SFPO trainer refuses it by name (the plain GRPO loss path
    does not care). The distributed type is faked as a GPU run would report it."""
    pytest.importorskip("trl")
    from accelerate.utils import DistributedType

    from gxpo_kernels.integrations import trl as gtrl
    from tests.integrations.test_trl import make_trainer
    tr = make_trainer(tmp_path)
    monkeypatch.setattr(type(tr.accelerator), "distributed_type", property(lambda self: DistributedType.FSDP))
    msg = gtrl._unsupported(tr, for_update=True)
    assert "distributed_type=FSDP" in msg and "gxpo_kernels.integrations.fsdp" in msg
    assert gtrl._unsupported(tr, for_update=False) is None


def test_check_failing_on_one_rank_raises_on_every_rank(tmp_path):
    """A check of one rank's own tensors (a frozen parameter with a .grad, an entropy that is no number, SFPO's
    slow-pass entropy missing) failed on rank 0 only: rank 0 raised while rank 1 went on into the next
    collective and waited there (a hang; here gloo's 20 s timeout); SFPO with a gate that does not read the
    entropy refused one that is no number after its last collective, on rank 0 only (rank 1 kept its step). Now
    the refusal travels with the reduction that follows the check (the entropy argument: the all-reduce that
    begins the step): rank 0 raises its error, rank 1 a RuntimeError saying a rank refused, both rewind, and the
    next step runs paired on both. force_plain=True on rank 0 only (a plain step there, an active one on rank 1)
    is refused on both before anything changes."""
    import torch.multiprocessing as mp
    d = str(tmp_path)
    ctx = mp.start_processes(W.worker_one_rank_refusals, args=(free_port(), d), nprocs=W.WORLD, join=False,
                             start_method="spawn")
    try:
        for _ in range(24):                        # 120 s at most, then the ranks are killed
            if ctx.join(timeout=5):
                break
        else:
            pytest.fail("the ranks did not finish in 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    recs = [torch.load(os.path.join(d, f"refusals{r}.pt"), weights_only=False) for r in range(W.WORLD)]
    own = {"frozen_grad": ("ValueError", "requires_grad=False but a .grad"),
           "entropy": ("RuntimeError", "cannot be converted"),
           "sfpo_slow_entropy": ("ValueError", "needs every slow-pass closure to return (loss, entropy)"),
           "sfpo_entropy_reported": ("ValueError", "entropy must be a number or a one-element real tensor")}
    for name, (kind, text) in own.items():
        assert recs[0][name][0] == kind and text in recs[0][name][1], recs[0][name]
        assert recs[1][name][0] == "RuntimeError" and "1 of 2 ranks refused" in recs[1][name][1], recs[1][name]
        assert recs[0][name + "_rewound"] and recs[1][name + "_rewound"], name
    for r in range(W.WORLD):                       # a plain step on rank 0, an active one on rank 1: refused
        assert recs[r]["force_plain"][0] == "ValueError" and "passed on 1 of 2 ranks" in recs[r]["force_plain"][1]
        assert recs[r]["force_plain_rewound"]
    assert recs[0]["after"] and recs[1]["after"]
    _close(recs[0]["params_after"], recs[1]["params_after"], 0.0, "ranks after the refusals")
