"""Speedup report (gxpo_kernels/trainer/report.py, stats.py, plot.py).

Guards: threshold variants and speedup ratios on hand-made curves (never reached, ties, single seed,
degenerate warm start), seed and prompt bootstrap CIs, the effective step multiplier, the cost-model
projection (share 0, share -> 1, a hand-computed mid case), results.json schema, the PNG, the table,
and the JSONL round trip / CLI.
"""
import json
import math

import numpy as np
import pytest

from gxpo_kernels.trainer import report, stats

VAL_STEPS = [0, 10, 20, 30, 40, 50]


def make_records(scores, *, bp=1, opt=1, t_roll=0.05, t_bp=0.06, t_opt=0.01, val_steps=VAL_STEPS,
                 update=None, per_prompt=None):
    """Per-step records 0..max(val_steps): each step does ``bp`` passes and ``opt`` optimizer steps and takes
    t_roll + bp*t_bp + opt*t_opt seconds; ``scores[i]`` is the validation score at ``val_steps[i]``."""
    recs, wall = [], 0.0
    for step in range(val_steps[-1] + 1):
        r = {"step": step, "backward_passes": step * bp, "optimizer_steps": step * opt}
        if step:
            wall += t_roll + bp * t_bp + opt * t_opt
            r.update(t_rollout=t_roll, t_backward=bp * t_bp, t_optimizer=opt * t_opt,
                     update=(update(step) if callable(update) else dict(update or {})))
        r["wall_clock"] = wall
        if step in val_steps:
            i = val_steps.index(step)
            r["val"] = {"greedy_acc": scores[i], "pass1": scores[i]}
            if per_prompt is not None:
                r["val"]["per_prompt"] = list(per_prompt[i])
        recs.append(r)
    return recs


GRPO = [0.40, 0.45, 0.50, 0.55, 0.60, 0.58]
FAST = [0.40, 0.52, 0.59, 0.60, 0.61, 0.60]    # SFPO-like: 4 passes/step, 4 optimizer steps
SLOW = [0.40, 0.42, 0.44, 0.46, 0.48, 0.50]    # never reaches GRPO's peak
WALL_G, WALL_F = 0.05 + 0.06 + 0.01, 0.05 + 4 * 0.06 + 4 * 0.01   # seconds per step


def _one_seed(**kw):
    runs = {"grpo": {0: make_records(GRPO)}, "sfpo": {0: make_records(FAST, bp=4, opt=4)},
            "slow": {0: make_records(SLOW)}, "tie": {0: make_records(GRPO)}}
    return runs


@pytest.fixture
def one_seed(tmp_path):
    return report.build_report(_one_seed(), tmp_path, gain_frac=0.75, n_boot=200, plot=False)


def test_thresholds_single_seed_hand_computed(one_seed):
    t = one_seed["methods"]["sfpo"]["seeds"]["0"]["thresholds"]
    # strict: GRPO peak 0.60 first at step 40; SFPO first >= 0.60 at step 30.
    s = t["strict"]
    assert s["reached"] and s["step"] == 30 and s["bp"] == 120 and s["target"] == pytest.approx(0.60)
    assert s["ratio_steps"] == pytest.approx(40 / 30)
    assert s["ratio_bp"] == pytest.approx(40 / 120)
    assert s["ratio_wall"] == pytest.approx(40 * WALL_G / (30 * WALL_F))
    # eps: target 0.59 (SFPO's 0.59 at step 20 ties it exactly); GRPO first >= 0.59 at 40.
    e = t["eps"]
    assert e["step"] == 20 and e["ratio_steps"] == pytest.approx(2.0) and e["ratio_bp"] == pytest.approx(0.5)
    # gain90 with gain_frac 0.75: target 0.40 + 0.75*0.20 = 0.55; GRPO at 30, SFPO at 20.
    g = t["gain90"]
    assert g["target"] == pytest.approx(0.55)
    assert g["step"] == 20 and g["ratio_steps"] == pytest.approx(1.5) and g["ratio_bp"] == pytest.approx(30 / 80)
    assert g["ratio_wall"] == pytest.approx(30 * WALL_G / (20 * WALL_F))
    # GRPO against itself, and an identical curve (ties): every ratio exactly 1.
    for m in ("grpo", "tie"):
        for name in stats.THRESHOLDS:
            th = one_seed["methods"][m]["seeds"]["0"]["thresholds"][name]
            assert th["reached"] and th["ratio_steps"] == th["ratio_bp"] == th["ratio_wall"] == 1.0
    assert one_seed["methods"]["grpo"]["seeds"]["0"]["thresholds"]["strict"]["step"] == 40


def test_never_reached_is_reported(one_seed, tmp_path):
    t = one_seed["methods"]["slow"]["seeds"]["0"]["thresholds"]
    for name in stats.THRESHOLDS:
        assert t[name]["reached"] is False
        assert t[name]["step"] is None and t[name]["ratio_steps"] is None and t[name]["ratio_wall"] is None
        agg = one_seed["methods"]["slow"]["aggregate"][name]
        assert agg["reached"] == "0/1" and agg["ratio_steps"]["median"] == 0.0 and agg["step"] is None
    # with gain_frac 0.5 the target 0.50 is reached at step 50 (GRPO: 20)
    res = report.build_report(_one_seed(), tmp_path, gain_frac=0.5, n_boot=50, plot=False)
    g = res["methods"]["slow"]["seeds"]["0"]["thresholds"]["gain90"]
    assert g["reached"] and g["ratio_steps"] == pytest.approx(20 / 50)
    table = report.format_table(one_seed)
    slow_line = next(ln for ln in table.splitlines() if ln.strip().startswith("slow vs grpo"))
    assert "not reached" in table and "NOT REACHED" in slow_line


def test_first_reach_ties_and_tolerance():
    scores = np.array([0.4, 0.6, 0.6, 0.5])
    assert stats.first_reach(scores, 0.6) == 1                 # first of tied maxima
    assert stats.first_reach(scores, 0.6 + 1e-12) == 1         # float rounding counts as a tie
    assert stats.first_reach(scores, 0.61) == -1
    assert stats.first_reach(scores, 0.3) == 0
    np.testing.assert_array_equal(stats.first_reach(np.stack([scores, scores[::-1]]), np.array([0.55, 0.7])),
                                  [1, -1])


def test_degenerate_threshold_at_warm_start(tmp_path):
    flat = [0.40, 0.40, 0.405, 0.40, 0.40, 0.40]   # GRPO barely moves: eps target 0.395 is met at step 0
    runs = {"grpo": {0: make_records(flat)}, "sfpo": {0: make_records(FAST, bp=4, opt=4)}}
    res = report.build_report(runs, tmp_path, n_boot=50, plot=False)
    e = res["methods"]["sfpo"]["seeds"]["0"]["thresholds"]["eps"]
    assert e["degenerate"] and e["ratio_steps"] is None
    agg = res["methods"]["sfpo"]["aggregate"]["eps"]
    assert agg["n_degenerate"] == 1 and agg["n_seeds"] == 0 and agg["ratio_steps"]["median"] is None
    assert res["methods"]["sfpo"]["seeds"]["0"]["thresholds"]["strict"]["ratio_steps"] == pytest.approx(2.0)


def test_aggregate_over_seeds_counts_not_reached(tmp_path):
    # method reaches GRPO's peak at step 20 (2x), 40 (1x), never (0x) -> median 1, range [0, 2], reached 2/3
    m_curves = {0: [0.40, 0.5, 0.60, 0.6, 0.6, 0.6], 1: [0.40, 0.5, 0.5, 0.5, 0.60, 0.6], 2: SLOW}
    runs = {"grpo": {s: make_records(GRPO) for s in m_curves}, "x": {s: make_records(c) for s, c in m_curves.items()}}
    res = report.build_report(runs, tmp_path, n_boot=300, plot=False)
    a = res["methods"]["x"]["aggregate"]["strict"]
    assert a["reached"] == "2/3" and a["n_reached"] == 2
    assert (a["ratio_steps"]["median"], a["ratio_steps"]["min"], a["ratio_steps"]["max"]) == (1.0, 0.0, 2.0)
    lo, hi = a["ratio_steps"]["ci_seeds"]
    assert 0.0 <= lo <= 1.0 <= hi <= 2.0
    assert a["step"] == 40.0          # median cost over {20, 40, inf}
    assert a["ratio_steps"]["ci_prompts"] is None   # no per_prompt logged
    assert res["meta"]["n_seeds"] == 3


def test_one_seed_has_no_ci_over_seeds(one_seed, tmp_path):
    """A ratio from one comparable seed has no CI over seeds (None, and none in the tables): it was a zero-width
    "95% bootstrap CI over seeds" such as [2.00, 2.00], as if the seeds had agreed. The CI over validation
    prompts still exists for one seed; two seeds that differ get a CI over seeds."""
    for name in stats.THRESHOLDS:
        a = one_seed["methods"]["sfpo"]["aggregate"][name]
        assert all(a[k]["ci_seeds"] is None for k in report.RATIO_KEYS)
        assert all(v["ci_seeds"] is None for v in a["projected"].values())
    sfpo = next(ln for ln in report.markdown_table(one_seed).splitlines() if ln.startswith("| sfpo"))
    assert "| 2.00x | 0.50x |" in sfpo and "[" not in sfpo
    # two seeds, the second one degenerate (GRPO's target met at the warm start): one comparable seed, no CI
    flat = [0.40, 0.40, 0.405, 0.40, 0.40, 0.40]
    runs = {"grpo": {0: make_records(GRPO), 1: make_records(flat)},
            "sfpo": {s: make_records(FAST, bp=4, opt=4) for s in (0, 1)}}
    a = report.build_report(runs, tmp_path, n_boot=50, plot=False)["methods"]["sfpo"]["aggregate"]["eps"]
    assert (a["n_seeds"], a["n_degenerate"], a["ratio_steps"]["ci_seeds"]) == (1, 1, None)
    runs["grpo"][1] = make_records([0.40, 0.50, 0.55, 0.60, 0.60, 0.60])   # GRPO reaches 0.59 at step 30
    a = report.build_report(runs, tmp_path, n_boot=50, plot=False)["methods"]["sfpo"]["aggregate"]["eps"]
    lo, hi = a["ratio_steps"]["ci_seeds"]
    assert a["n_seeds"] == 2 and lo == pytest.approx(1.5) and hi == pytest.approx(2.0)


def test_bootstrap_ci_properties():
    v = [0.8, 1.1, 1.3, 1.5, 2.0, 1.2, 0.9]
    ci = stats.bootstrap_ci(v, n_boot=1000, seed=3)
    assert ci[0] <= np.median(v) <= ci[1] and ci[0] < ci[1]
    assert ci == stats.bootstrap_ci(v, n_boot=1000, seed=3)            # deterministic
    assert stats.bootstrap_ci([1.7, 1.7, 1.7], n_boot=100) == [1.7, 1.7]  # identical seeds: zero width
    assert stats.bootstrap_ci([2.5], n_boot=100) == [2.5, 2.5]            # single seed
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_ci(v, n_boot=0)
    counts = stats.resample_counts(7, 5, np.random.default_rng(0))
    assert counts.shape == (5, 7) and np.all(counts.sum(1) == 7)


def _nested(P, sizes):
    """Rows of 0/1 correctness: row i has the first sizes[i] of P prompts correct (nested sets)."""
    return np.array([[1.0] * k + [0.0] * (P - k) for k in sizes])


def test_prompt_bootstrap_shared_draw(tmp_path):
    # GRPO's rows are nested sets growing by 20 prompts (so every resample is strictly increasing and peaks
    # at step 40 with probability 1 - 1e-9); the method is GRPO one validation step ahead. With the same
    # prompt resample applied to both, the method ties GRPO's resampled peak at step 30 in every replicate:
    # the prompt CI is exactly [4/3, 4/3]. (Independent draws would miss that tie about half the time.)
    P = 120
    g = _nested(P, [0, 20, 40, 60, 80, 60])
    m = g[[0, 2, 3, 4, 4, 4]]
    runs = {"grpo": {0: make_records(g.mean(1).tolist(), per_prompt=g)},
            "ahead": {0: make_records(m.mean(1).tolist(), per_prompt=m)},
            "same": {0: make_records(g.mean(1).tolist(), per_prompt=g)}}
    res = report.build_report(runs, tmp_path, n_boot=400, plot=False)
    a = res["methods"]["ahead"]["aggregate"]["strict"]["ratio_steps"]
    assert a["median"] == pytest.approx(4 / 3)
    assert a["ci_prompts"] == pytest.approx([4 / 3, 4 / 3])
    assert res["methods"]["same"]["aggregate"]["eps"]["ratio_bp"]["ci_prompts"] == [1.0, 1.0]
    assert res["meta"]["prompt_bootstrap"] == "ok"


def test_prompt_bootstrap_is_one_draw_for_every_seed(tmp_path):
    """Every seed validates on the same prompts, so one resample of them applies to every seed: three seeds with
    the same curves have the prompt CI of one of them. Independent draws per seed narrowed it (the median of three
    independent draws varies less than one draw) and put an identical run's CI apart from its single-seed one."""
    rng = np.random.default_rng(7)
    P = 60
    g = (rng.random((6, P)) < np.array(GRPO)[:, None]).astype(float)
    m = (rng.random((6, P)) < np.array(FAST)[:, None]).astype(float)

    def ci(seeds):
        runs = {"grpo": {s: make_records(g.mean(1).tolist(), per_prompt=g) for s in seeds},
                "m": {s: make_records(m.mean(1).tolist(), per_prompt=m, bp=4, opt=4) for s in seeds}}
        a = report.build_report(runs, tmp_path, n_boot=300, plot=False)["methods"]["m"]["aggregate"]["eps"]
        return a["ratio_steps"]["ci_prompts"], a["ratio_bp"]["ci_prompts"]

    one = ci([0])
    assert one[0][0] < one[0][1]          # the prompts do spread it
    assert ci([0, 1, 2]) == one


def test_prompt_bootstrap_noisy_and_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    P = 200
    runs = {"grpo": {}, "m": {}}
    for s in (0, 1):
        for name, p in (("grpo", [0.4, 0.45, 0.5, 0.55, 0.6, 0.6]), ("m", [0.4, 0.52, 0.6, 0.6, 0.61, 0.61])):
            pp = (rng.random((6, P)) < np.array(p)[:, None]).astype(float)
            pp[0] = runs["grpo"][s][0]["val"]["per_prompt"] if name == "m" else pp[0]   # shared warm start
            runs[name][s] = make_records(pp.mean(1).tolist(), per_prompt=pp)
    r1 = report.build_report(runs, tmp_path / "a", n_boot=300, plot=False)
    r2 = report.build_report(runs, tmp_path / "b", n_boot=300, plot=False)
    a1, a2 = (r["methods"]["m"]["aggregate"]["eps"]["ratio_steps"] for r in (r1, r2))
    assert a1["ci_prompts"] == a2["ci_prompts"] and a1["ci_seeds"] == a2["ci_seeds"]
    lo, hi = a1["ci_prompts"]
    assert lo < hi   # noisy validation sets give a non-degenerate interval
    # a per_prompt vector that does not average to the score is not used
    runs["m"][0][10]["val"]["greedy_acc"] += 0.1
    r3 = report.build_report(runs, tmp_path / "c", n_boot=50, plot=False)
    assert r3["methods"]["m"]["aggregate"]["eps"]["ratio_steps"]["ci_prompts"] is None
    assert "per_prompt" in r3["meta"]["prompt_bootstrap"]


def test_effective_step_multiplier():
    gx = [{"step": 0}] + [{"step": i, "update": u} for i, u in enumerate([
        {"active": True, "alpha": 0.5, "scale_mean": 2.5},
        {"active": True, "alpha": 0.5, "scale_mean": 2.5},
        {"active": True, "alpha": 0.5, "scale_mean": 1.0},
        {"active": False, "alpha": 0.5}], start=1)]
    assert stats.effective_step_multiplier(gx, "gxpo") == pytest.approx((3.5 + 3.5 + 2.0 + 1.0) / 4)
    gx[3]["update"]["fell_back"] = True    # a fallback is one GRPO step
    assert stats.effective_step_multiplier(gx, "gxpo") == pytest.approx((3.5 + 3.5 + 1.0 + 1.0) / 4)
    gx[3]["update"]["skipped"] = True      # non-finite g0: θ did not move (found by fuzzing: counted as 1)
    assert stats.effective_step_multiplier(gx, "gxpo") == pytest.approx((3.5 + 3.5 + 0.0 + 1.0) / 4)
    sf = [{"step": i, "update": {"active": i <= 3, "alpha": 0.8, "K": 3}} for i in range(1, 6)]
    assert stats.effective_step_multiplier(sf, "sfpo") == pytest.approx((3 * 3.4 + 2) / 5)
    assert stats.effective_step_multiplier(sf, "grpo") == 1.0
    # GRPO skips a step whose gradient is not finite (update.skipped): θ did not move, 0 as for GXPO / SFPO
    gr = [{"step": 0}] + [{"step": i, "update": {"grad_norm": [1.0], "skipped": i == 2}} for i in range(1, 5)]
    assert stats.effective_step_multiplier(gr, "grpo") == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="scale_mean"):
        stats.effective_step_multiplier([{"step": 1, "update": {"active": True, "alpha": 0.5}}], "gxpo")
    with pytest.raises(ValueError, match="method_kind"):
        stats.effective_step_multiplier(sf, "ppo")
    with pytest.raises(ValueError, match="active"):   # nothing logged: no silent 1.0
        stats.effective_step_multiplier([{"step": 1, "update": {}}], "sfpo")


def test_multiplier_and_gate_in_report(tmp_path):
    upd = lambda s: {"active": s <= 20, "alpha": 0.8, "K": 3, "gate": "entropy",  # noqa: E731
                     "gate_fired_step": 21 if s > 20 else None}
    runs = {"grpo": {0: make_records(GRPO)}, "sfpo": {0: make_records(FAST, bp=4, opt=4, update=upd)}}
    res = report.build_report(runs, tmp_path, n_boot=50, plot=False)
    r = res["methods"]["sfpo"]
    assert r["kind"] == "sfpo"
    assert r["effective_multiplier"] == pytest.approx((20 * 3.4 + 30) / 50)
    assert r["gate"]["0"] == {"gate": "entropy", "fired_step": 21, "first_inactive_step": 21}
    assert res["methods"]["grpo"]["effective_multiplier"] == 1.0


def test_cost_model_and_projection():
    recs = make_records(GRPO, bp=3, opt=3, t_roll=0.05, t_bp=0.06, t_opt=0.01)
    cm = stats.cost_model([recs])
    assert cm["t_roll"] == pytest.approx(0.05) and cm["t_bp"] == pytest.approx(0.06)
    assert cm["t_opt"] == pytest.approx(0.01) and cm["n_steps"] == 50
    assert stats.cost_model([[{"step": 0, "val": {}}]]) is None
    base_cm = {"t_roll": 0.05, "t_bp": 0.06, "t_opt": 0.0}
    g, m = (40, 40, 40), (20, 80, 80)
    # share 0, t_opt = 0, equal pass cost: the backward-pass ratio
    assert stats.projected_ratio(g, m, 0.0, base_cm, base_cm) == pytest.approx(40 / 80)
    # ... with unequal pass costs: (BP_G t_bp,G) / (BP_M t_bp,M)
    assert stats.projected_ratio(g, m, 0.0, base_cm, {"t_bp": 0.08, "t_opt": 0.0}) == pytest.approx(2.4 / 6.4)
    # share -> 1 tends to the step ratio; exactly it at 1
    assert stats.projected_ratio(g, m, 1.0, base_cm, base_cm) == 2.0
    assert stats.projected_ratio(g, m, 1 - 1e-7, base_cm, base_cm) == pytest.approx(2.0, rel=1e-5)
    assert abs(stats.projected_ratio(g, m, 0.9, base_cm, base_cm) - 2.0) < 0.5
    # mid case by hand: share 0.5, base t_bp .06 t_opt .01 -> t_roll' = .07;
    # GRPO 40(.07+.06+.01) = 5.6; M 20*.07 + 80*.06 + 80*.02 = 7.8
    cb, cmm = {"t_bp": 0.06, "t_opt": 0.01}, {"t_bp": 0.06, "t_opt": 0.02}
    assert stats.projected_rollout_time(0.5, cb) == pytest.approx(0.07)
    assert stats.projected_rollout_time(0.3, cb) == pytest.approx(0.03)
    assert stats.projected_ratio(g, m, 0.5, cb, cmm) == pytest.approx(5.6 / 7.8)
    assert stats.projected_ratio(g, m, 0.5, cb, cmm, reached=False) == 0.0
    with pytest.raises(ValueError, match="share"):
        stats.projected_rollout_time(1.5, cb)


def test_projected_in_report_matches_hand(tmp_path):
    res = report.build_report(_one_seed(), tmp_path, rollout_shares=(0.0, 0.5, 1.0), n_boot=50, plot=False)
    p = res["methods"]["sfpo"]["seeds"]["0"]["thresholds"]["strict"]["projected"]
    # t_roll' at 0.5 = .06 + .01 = .07: GRPO 40 * .14 = 5.6; SFPO 30 * .07 + 120 * .06 + 120 * .01 = 10.5
    assert p["0.5"] == pytest.approx(5.6 / 10.5)
    assert p["1"] == pytest.approx(40 / 30)
    assert p["0"] == pytest.approx(40 * 0.07 / (120 * 0.07))
    assert res["meta"]["baseline_measured_rollout_share"] == pytest.approx(0.05 / 0.12)
    assert res["methods"]["slow"]["seeds"]["0"]["thresholds"]["strict"]["projected"]["0.5"] is None


def test_build_report_files_schema_and_table(tmp_path):
    runs = {"grpo": {s: make_records(GRPO) for s in (0, 1)},
            "gxpo": {s: make_records(FAST, bp=3, opt=3, update={"active": True, "alpha": 0.5, "scale_mean": 2.5,
                                                                 "gate": "window"}) for s in (0, 1)},
            "slow": {0: make_records(SLOW)}}
    res = report.build_report(runs, tmp_path, n_boot=100)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == res
    meta = on_disk["meta"]
    for k in ("baseline", "thresholds", "eps", "gain_frac", "rollout_shares", "score_key", "n_seeds"):
        assert k in meta
    assert set(meta["thresholds"]) == set(stats.THRESHOLDS)
    m = on_disk["methods"]["gxpo"]
    assert {"seeds", "aggregate", "effective_multiplier", "cost_model", "gate", "peak", "last_mean"} <= set(m)
    seed = m["seeds"]["1"]
    assert {"curve", "peak", "last_mean", "thresholds"} <= set(seed)
    assert seed["curve"][0] == [0, 0.0, 0.0, 0.0, 0.40, 0.0] and len(seed["curve"][0]) == 6
    assert seed["last_mean"] == pytest.approx(np.mean(FAST[-3:]))
    th = seed["thresholds"]["eps"]
    assert {"reached", "step", "bp", "wall", "ratio_steps", "ratio_bp", "ratio_wall", "projected"} <= set(th)
    assert set(th["projected"]) == {"0.3", "0.5", "0.7"}
    agg = m["aggregate"]["strict"]
    for k in ("ratio_steps", "ratio_bp", "ratio_wall"):
        assert {"median", "min", "max", "ci_seeds", "ci_prompts"} <= set(agg[k])
    assert agg["reached"] == "2/2" and agg["ratio_steps"]["ci_seeds"] == [4 / 3, 4 / 3]
    assert m["effective_multiplier"] == pytest.approx(3.5)
    assert set(m["cost_model"]) >= {"t_roll", "t_bp", "t_opt"}
    png = (tmp_path / "speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = report.format_table(res)
    lines = table.splitlines()
    # the hand-made GRPO curve peaks at its last point: the table says the baseline was still rising
    assert lines[0] == "CONCLUSION" and lines[1].strip().startswith("WARNING: grpo was still rising")
    assert lines[2].strip().startswith("gxpo vs grpo")
    assert "needs 0.50x grpo's steps" in lines[2] and "1.50x its backward passes" in lines[2]
    assert "measured" in table and "proj" in table and "not reached" in table


def test_load_runs_roundtrip_and_cli(tmp_path, capsys):
    runs = {"grpo": {0: make_records(GRPO), 2: make_records(GRPO)}, "sfpo": {0: make_records(FAST, bp=4, opt=4)}}
    for m, seeds in runs.items():
        (tmp_path / m).mkdir()
        for s, recs in seeds.items():
            (tmp_path / m / f"seed{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with open(tmp_path / "sfpo" / "seed0.jsonl", "a") as fh:
        fh.write('{"step": 51, "backw')          # a run killed mid-write
    with pytest.warns(UserWarning, match="truncated"):
        loaded = report.load_runs(tmp_path)
    assert loaded == runs
    with pytest.warns(UserWarning):
        assert report.main([str(tmp_path), "--n-boot", "20", "--no-plot", "--no-index"]) == 0
    out = capsys.readouterr().out
    assert "CONCLUSION" in out and "no runs.json" in out
    assert (tmp_path / "results.json").exists()
    with pytest.raises(FileNotFoundError):
        report.load_runs(tmp_path / "grpo")
    # the loop's own layout <method>/seed<k>/records.jsonl is read too
    (tmp_path / "gxpo" / "seed3").mkdir(parents=True)
    (tmp_path / "gxpo" / "seed3" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs["grpo"][0]))
    with pytest.warns(UserWarning):
        assert report.load_runs(tmp_path)["gxpo"] == {3: runs["grpo"][0]}


@pytest.mark.parametrize("kw, match", [({"baseline": "ppo"}, "baseline"), ({"gain_frac": 0.0}, "gain_frac"),
                                       ({"eps": -1.0}, "eps"), ({"eps": math.inf}, "eps must be a finite"),
                                       ({"rollout_shares": (1.2,)}, "rollout_shares"),
                                       ({"n_boot": 0}, "n_boot"), ({"headline": "x"}, "headline"),
                                       ({"score_key": "nope"}, "score_key")])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        report.build_report(_one_seed(), tmp_path, plot=False, **kw)


def test_non_finite_score_rejected():
    recs = make_records(GRPO)
    recs[20]["val"]["greedy_acc"] = float("nan")
    with pytest.raises(ValueError, match="step 20"):
        stats.curve_from_records(recs)


def test_missing_baseline_seed_is_kept(tmp_path):
    runs = {"grpo": {0: make_records(GRPO)}, "sfpo": {0: make_records(FAST, bp=4, opt=4),
                                                      7: make_records(FAST, bp=4, opt=4)}}
    res = report.build_report(runs, tmp_path, n_boot=20, plot=False)
    s7 = res["methods"]["sfpo"]["seeds"]["7"]
    assert s7["thresholds"] is None and "no grpo run" in s7["note"]
    assert res["methods"]["sfpo"]["effective_multiplier"] is None      # no update diagnostics logged
    assert "active" in s7["effective_multiplier_note"]
    assert res["methods"]["sfpo"]["aggregate"]["strict"]["reached"] == "1/1"
    assert not math.isnan(res["methods"]["sfpo"]["peak"]["median"])


def test_markdown_table_renders_every_method_and_not_reached(one_seed):
    md = report.markdown_table(one_seed)          # headline threshold: within eps=0.01 of GRPO's peak 0.60
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert list(rows)[1:] == ["grpo", "sfpo", "slow", "tie"]
    # GRPO first reaches 0.59 at step 40, SFPO at step 20: 2x the steps, at 4 passes per step 0.5x the passes
    assert "| 1/1 | 2.00x" in rows["sfpo"] and "0.50x" in rows["sfpo"]
    assert "| 0/1 | 0.00x" in rows["slow"]        # never reached: counted as 0x, shown as 0/1
    assert "| 1/1 | 1.00x" in rows["tie"]


def test_second_half_climb_in_results_and_notes(tmp_path):
    """Each baseline seed's second-half and last-quarter least-squares climbs (stats.late_trend of its curve) are
    in meta.baseline_peaked and in notes under the table."""
    runs = {"grpo": {0: make_records(GRPO), 1: make_records(SLOW)}, "x": {0: make_records(FAST), 1: make_records(FAST)}}
    res = report.build_report(runs, tmp_path, n_boot=20, plot=False)
    seeds = res["meta"]["baseline_peaked"]["seeds"]
    for s, curve in (("0", GRPO), ("1", SLOW)):
        assert seeds[s]["second_half"] == stats.late_trend(np.array(VAL_STEPS), np.array(curve))
        assert seeds[s]["last_quarter"] == stats.late_trend(np.array(VAL_STEPS), np.array(curve), 0.25)
    h = seeds["1"]["second_half"]     # SLOW climbs 0.02 per validation; the last half is 3 points, so 4 are used
    assert h["points"] == 4 and h["gain"] == pytest.approx(0.06) and h["share"] == pytest.approx(0.6)
    table = report.markdown_table(res)
    assert (f"grpo's climb over the second half of the run (least-squares gain; share of the seed's whole gain; "
            f"slope t): seed 0 {seeds['0']['second_half']['gain']:+.3f} from step") in table
    assert "seed 1 +0.060 from step 20; 60%" in table
    q = seeds["1"]["last_quarter"]
    assert (f"grpo's climb over the last quarter of the run (least-squares gain; share of the seed's whole gain; "
            f"slope t): seed 0 {seeds['0']['last_quarter']['gain']:+.3f} from step "
            f"{seeds['0']['last_quarter']['from_step']}") in table
    assert f"seed 1 {q['gain']:+.3f} from step {q['from_step']}; {100 * q['share']:.0f}%" in table


def test_last_quarter_tells_a_levelled_curve_from_a_creep(tmp_path):
    """On 17 validations a curve that rises through its first 12 and is level over its last 5 climbs over its
    second half (9 points) but not over its last quarter (5 points); a steady creep climbs over both."""
    steps = list(range(0, 170, 10))
    level = [0.40 + 0.02 * min(i, 12) for i in range(17)]
    creep = [0.40 + 0.01 * i for i in range(17)]
    runs = {"grpo": {0: make_records(level, val_steps=steps), 1: make_records(creep, val_steps=steps)},
            "x": {0: make_records(creep, val_steps=steps), 1: make_records(level, val_steps=steps)}}
    seeds = report.build_report(runs, tmp_path, n_boot=20, plot=False)["meta"]["baseline_peaked"]["seeds"]
    assert seeds["0"]["second_half"]["points"] == 9 and seeds["0"]["second_half"]["gain"] > 0.05
    q0, q1 = seeds["0"]["last_quarter"], seeds["1"]["last_quarter"]
    assert q0["points"] == 5 and q0["from_step"] == 120 and q0["gain"] == pytest.approx(0.0, abs=1e-12)
    assert q1["points"] == 5 and q1["gain"] == pytest.approx(0.04)


def test_sensitivity_leave_one_seed_out_and_compare(tmp_path):
    """Leave-one-seed-out medians of the headline ratios, and the shift against a perturbed rerun (described
    from the two runs.json indexes), in results.json and in the table's notes."""
    m_curves = {0: [0.40, 0.5, 0.60, 0.6, 0.6, 0.6], 1: [0.40, 0.5, 0.5, 0.5, 0.60, 0.6], 2: SLOW}
    runs = {"grpo": {s: make_records(GRPO) for s in m_curves}, "x": {s: make_records(c) for s, c in m_curves.items()}}
    idx = {"threads": 1, "workers": 2, "train": {"steps": 50, "init_seed": 0, "out_dir": "a"}, "runs": {}}
    other = report.build_report({"grpo": runs["grpo"], "x": {s: make_records(GRPO) for s in m_curves}},
                                tmp_path / "b", n_boot=100, plot=False,
                                index=dict(idx, threads=2, workers=1, train=dict(idx["train"], out_dir="b")))
    res = report.build_report(runs, tmp_path / "a", n_boot=100, plot=False, index=idx, compare=other)
    sens = res["meta"]["sensitivity"]
    # per-seed step ratios 2, 1, 0 (never) -> medians without one seed: 0 (1 with 0), 0 (2 with 0), 1.5; the
    # headline's median rule: a not-reached and a reached middle seed are not averaged (that gave 0.5 and 1.0)
    assert sens["leave_one_seed_out"]["x"]["ratio_steps"] == [0.0, 1.5]
    c, = sens["compare"]
    assert c["note"] == "a rerun with threads 1 -> 2, workers 2 -> 1"     # out_dir differences are not named
    assert c["methods"]["x"]["ratio_steps"] == {"here": 1.0, "there": 1.0, "shift": 0.0}
    table = report.markdown_table(res)
    assert "one seed is left out [min, max]: x steps [0.00,1.50]" in table
    assert "Sensitivity against a rerun with threads 1 -> 2, workers 2 -> 1: x steps 1.00x -> 1.00x" in table
    assert json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["sensitivity"] == sens


def test_compare_several_runs_from_the_cli(tmp_path, capsys):
    """``--compare`` is repeatable: one sensitivity entry per perturbed run, each described by its difference."""
    runs = {"grpo": {0: make_records(GRPO), 1: make_records(GRPO)}, "x": {0: make_records(FAST), 1: make_records(GRPO)}}
    for name, threads in (("a", 1), ("b", 2), ("c", 1)):
        d = tmp_path / name
        report.build_report(runs, d, n_boot=50, plot=False)
        idx = {"threads": threads, "workers": 1, "train": {"steps": 50, "init_seed": 7 if name == "c" else 0},
               "runs": {m: {str(s): {"status": "complete", "steps_recorded": 50, "steps_configured": 50}
                            for s in seeds} for m, seeds in runs.items()}}
        for m, seeds in runs.items():
            for s, recs in seeds.items():
                (d / m / f"seed{s}").mkdir(parents=True)
                (d / m / f"seed{s}" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "runs.json").write_text(json.dumps(idx))
        assert report.main([str(d), "--no-plot", "--n-boot", "50"]) == 0
    assert report.main([str(tmp_path / "a"), "--no-plot", "--n-boot", "50", "--compare",
                        str(tmp_path / "b" / "results.json"), "--compare", str(tmp_path / "c" / "results.json")]) == 0
    sens = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["sensitivity"]["compare"]
    assert [c["note"] for c in sens] == ["a rerun with threads 1 -> 2", "a rerun with init_seed 0 -> 7"]
    out = capsys.readouterr().out
    assert "sensitivity vs a rerun with threads 1 -> 2" in out and "sensitivity vs a rerun with init_seed 0 -> 7" in out


def test_compare_with_another_kind_of_file_is_one_line(tmp_path, capsys):
    """--compare with a JSON file that is not a results.json (a runs.json, a records line, a list) is one error
    line and exit code 2, and the folder's results.json is left as it was (it was a KeyError traceback)."""
    report.build_report(_one_seed(), tmp_path, n_boot=20, plot=False)
    before = (tmp_path / "results.json").read_text()
    for name in ("grpo", "sfpo"):
        (tmp_path / name / "seed0").mkdir(parents=True)
        (tmp_path / name / "seed0" / "records.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _one_seed()[name][0]))
    for i, other in enumerate(({"runs": {}}, [1, 2], {"meta": {"headline": "eps"}, "methods": []})):
        f = tmp_path / f"other{i}.json"
        f.write_text(json.dumps(other))
        assert report.main([str(tmp_path), "--no-index", "--no-plot", "--n-boot", "20", "--compare", str(f)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a results.json" in err[0] and str(f) in err[0], err
        assert (tmp_path / "results.json").read_text() == before


def test_failed_write_keeps_the_previous_results(tmp_path):
    """results.json is written whole or not at all: a report that fails while writing it (here a non-finite
    wall-clock in a curve) leaves the previous file intact (found by fuzzing: it was left cut off mid-JSON)."""
    report.build_report(_one_seed(), tmp_path, n_boot=20, plot=False)
    before = (tmp_path / "results.json").read_text()
    bad = _one_seed()
    bad["grpo"][0][-1]["wall_clock"] = math.inf
    with pytest.raises(ValueError):
        report.build_report(bad, tmp_path, n_boot=20, plot=False)
    assert (tmp_path / "results.json").read_text() == before
    assert not list(tmp_path.glob("*.tmp*"))


def test_every_results_json_field_is_documented(tmp_path):
    """docs/speedup.md's field-by-field section names every key results.json holds (method names, seeds,
    threshold variants and rollout shares aside; runs.json's own config, environment, code and warm-start entries
    are its own)."""
    import pathlib
    import re
    P = 20
    rows = [[1.0] * round(P * v) + [0.0] * (P - round(P * v)) for v in GRPO]
    fast = [[1.0] * round(P * v) + [0.0] * (P - round(P * v)) for v in FAST]
    upd = lambda s: {"active": s < 30, "alpha": 0.5, "scale_mean": 1.0, "gate": "window",   # noqa: E731
                     "gate_fired_step": 30 if s >= 30 else None}
    runs = {"grpo": {s: make_records([sum(r) / P for r in rows], per_prompt=rows) for s in (0, 1)},
            "gxpo": {s: make_records([sum(r) / P for r in fast], per_prompt=fast, bp=3, opt=3, update=upd)
                     for s in (0, 1, 2)}}
    for recs in [r for seeds in runs.values() for r in seeds.values()]:
        for r in recs[1:]:
            r.update(cpu_rollout=0.05, cpu_backward=r["t_backward"], cpu_update=r["t_backward"] + r["t_optimizer"])
    entry = {"status": "complete", "steps_recorded": 50, "steps_configured": 50, "seconds": 1.0, "cpu_seconds": 1.0,
             "cpu_capability": "AVX2", "torch_threads": 1}
    index = {"code": {}, "workers": 1, "threads": 1, "env": {}, "train": {"steps": 50}, "status": "complete",
             "seconds": 1.0, "cpu_seconds": 1.0, "lr_mult": 1.0, "lr_mult_source": "gxpo", "warm_start": {},
             "runs": {m: {str(s): entry for s in seeds} for m, seeds in runs.items()}}
    other = report.build_report(runs, tmp_path / "b", n_boot=20, plot=False)
    res = report.build_report(runs, tmp_path / "a", n_boot=20, plot=False, index=index, compare=other,
                              problems=["x"])
    res["methods"]["gxpo"]["seeds"]["2"]["effective_multiplier_note"] = "-"   # only when a record lacks a key
    res["methods"]["gxpo"]["seeds"]["2"]["note"] = "-"                        # only without a baseline seed
    keys, dynamic = set(), {"grpo", "gxpo", "0", "1", "2", "0.3", "0.5", "0.7", *stats.THRESHOLDS}

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                keys.add(k)
                if k not in ("train", "env", "code", "warm_start"):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(res)
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "speedup.md").read_text()
    section = text.split("## `results.json`, field by field", 1)[1].split("\n## ", 1)[0]
    named = {part for name in re.findall(r"`([^`]+)`", section) for part in name.split(".")}
    assert sorted(keys - dynamic - named) == []


def test_conclusion_says_when_the_ci_includes_no_difference(tmp_path):
    """A median cost ratio above 1 whose CI over seeds includes 1x is not shown to be faster: the conclusion says
    so. It read "faster than grpo" on the median alone (the committed default run's gxpo+fade: 0.96x the CPU
    time, CI of the speedup [0.85, 1.45])."""
    # GRPO first reaches 0.59 at step 40; the method at 20, 30, 50: cost ratios 2, 4/3, 0.8 (same cost per step)
    m_curves = {0: [0.40, 0.5, 0.60, 0.6, 0.6, 0.6], 1: [0.40, 0.5, 0.5, 0.60, 0.6, 0.6],
                2: [0.40, 0.5, 0.5, 0.5, 0.5, 0.60]}
    runs = {"grpo": {s: make_records(GRPO) for s in m_curves}, "x": {s: make_records(c) for s, c in m_curves.items()},
            "y": {s: make_records([0.40, 0.5, 0.60, 0.6, 0.6, 0.6]) for s in m_curves}}
    res = report.build_report(runs, tmp_path, n_boot=300, plot=False)
    a = res["methods"]["x"]["aggregate"]["eps"]["ratio_cost"]
    assert a["median"] == pytest.approx(4 / 3) and a["ci_seeds"][0] < 1 < a["ci_seeds"][1]
    x, y = (next(ln for ln in res["conclusion"] if ln.startswith(f"{m} vs")) for m in ("x", "y"))
    assert "-> faster than grpo in measured wall-clock (but its 95% CI over seeds" in x and "includes 1x" in x
    assert "-> faster than grpo in measured wall-clock;" in y and "includes 1x" not in y   # 2x in every seed


def test_even_seed_count_does_not_average_not_reached_with_reached(tmp_path):
    """Two seeds, one reaching GRPO's target at 2x its speed and one never reaching it: the median ratio was the
    average of 0 (not reached) and 2.0, "needs 1.00x grpo's steps", a figure no seed had. It is now 0, not
    reached, as the median step figure (null) already said; two reached seeds still average."""
    runs = {"grpo": {s: make_records(GRPO) for s in (0, 1)},
            "sfpo": {0: make_records(FAST, bp=4, opt=4), 1: make_records(SLOW, bp=4, opt=4)}}
    res = report.build_report(runs, tmp_path, n_boot=50, plot=False)
    a = res["methods"]["sfpo"]["aggregate"]["eps"]
    assert (a["n_seeds"], a["n_reached"], a["step"]) == (2, 1, None)
    assert a["ratio_steps"]["median"] == 0 and a["ratio_steps"]["max"] == pytest.approx(2.0)
    line = next(ln for ln in report.conclusion_lines(res) if ln.startswith("sfpo"))
    assert "NOT REACHED in at least half the seeds (not reached in 1/2)" in line, line
    assert report._median(np.array([1.5, 2.0])) == 1.75 and report._median(np.array([0.0, 0.0, 2.0])) == 0


def test_every_median_of_ratios_uses_the_headline_rule(tmp_path):
    """The point estimate's median does not average a not-reached seed (0) with a reached one; the bootstraps
    and the leave-one-seed-out range used plain medians that did. Two seeds, one never reaching GRPO's peak in
    any prompt resample and one reaching it at 2x in every resample: the median is 0 (not reached), but every
    prompt draw's median was 1.0, so ci_prompts was [1.0, 1.0], an interval excluding its own point estimate."""
    P = 120
    g = _nested(P, [0, 20, 40, 60, 80, 60])           # GRPO peaks at step 40 (80 of 120 prompts)
    never = _nested(P, [0, 10, 20, 30, 40, 50])        # subsets of GRPO's peak set: below it in every resample
    fast = g[[0, 2, 4, 4, 4, 4]]                       # GRPO's peak set at step 20: 2x in every resample
    runs = {"grpo": {s: make_records(g.mean(1).tolist(), per_prompt=g) for s in (0, 1)},
            "m": {0: make_records(never.mean(1).tolist(), per_prompt=never),
                  1: make_records(fast.mean(1).tolist(), per_prompt=fast)}}
    a = report.build_report(runs, tmp_path / "p", n_boot=200, plot=False)["methods"]["m"]["aggregate"]["strict"]
    assert a["ratio_steps"]["median"] == 0 and a["ratio_steps"]["max"] == 2.0
    assert a["ratio_steps"]["ci_prompts"] == [0.0, 0.0]
    # over seeds: ratios 0, 2, 2, 2; a resample with two of each has median 0 (not 1), about 21% of them
    m_curves = [SLOW, FAST, FAST, FAST]
    runs = {"grpo": {s: make_records(GRPO) for s in range(4)},
            "m": {s: make_records(c, bp=4, opt=4) for s, c in enumerate(m_curves)}}
    a = report.build_report(runs, tmp_path / "s", n_boot=2000, ci_level=0.5, plot=False)["methods"]["m"]
    r = a["aggregate"]["strict"]["ratio_steps"]
    assert r["median"] == pytest.approx(4 / 3) and r["ci_seeds"][0] == 0.0   # (a plain median gave 0.667)
    # vectorised rule, NaN (degenerate) left out
    v = np.array([[0.0, 2.0, np.nan], [1.5, 2.0, np.nan], [0.0, 0.0, 3.0], [np.nan] * 3])
    got = stats.median_ratio(v, axis=1)
    assert got[:3].tolist() == [0.0, 1.75, 0.0] and np.isnan(got[3])
    assert stats.median_ratio(v.T, axis=0)[:3].tolist() == [0.0, 1.75, 0.0]
