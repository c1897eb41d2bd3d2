"""The FPA offline mode of the trainer (``--algo fpa_dpo | fpa_rpo | fpa_simper | fpa_kto | fpa_pg``).

- ``build_pairs``: one (first max, first min) pair per prompt with unequal rewards, none otherwise;
- tiny runs of every objective (rewards replaced by random 0/1 so that pairs exist; the untrained policy
  scores 0): the record schema, 1 backward pass and 1 optimizer step per update, pairs = prompts with mixed
  rewards, C_w / C_l means logged, and the future policy really is used: with lam = 1 the extrapolated loss
  differs from the base loss once the policy has left the reference, with lam = 0 it never does;
- a step with no pair makes no update; the CLI flags reach the config; ``speedup --methods grpo,fpa_dpo`` runs
  and reports it, and the default method list does not include it.
"""
import json
import math

import pytest
import torch

from gxpo_kernels.cli import main
from gxpo_kernels.trainer import fpa_offline, loop, stats
from gxpo_kernels.trainer.config import FPA_ALGOS, SFTConfig, TrainConfig, preset
from gxpo_kernels.trainer.fpa_offline import build_pairs

TINY = dict(steps=3, prompts=4, group=4, val_every=3, val_size=16, pass1_size=4, pass1_n=2, hidden=32, quiet=True,
            sft=SFTConfig(max_steps=2, check_every=2, check_size=8, batch_size=16))
KEYS = {"step", "reward_mean", "frac_zero_adv_groups", "loss", "metrics", "update", "backward_passes",
        "optimizer_steps", "wall_clock", "t_rollout", "t_backward", "t_optimizer", "fpa"}


def test_build_pairs():
    r = torch.tensor([0, 1, 1, 0,   1, 1, 1, 1,   0, 0, 0, 0,   0.2, 0.9, 0.1, 0.9], dtype=torch.float32)
    w, l = build_pairs(r, 4)
    assert w.tolist() == [1, 13] and l.tolist() == [0, 14]
    w, l = build_pairs(torch.zeros(8), 4)
    assert w.numel() == 0 and l.numel() == 0
    with pytest.raises(ValueError, match="rewards"):
        build_pairs(torch.zeros(6), 4)


@pytest.fixture
def mixed_rewards(monkeypatch):
    real = loop.rollout

    def fake(*args, **kwargs):
        ro = real(*args, **kwargs)
        g = torch.Generator().manual_seed(int(ro.resp.sum()))
        ro.rewards = (torch.rand(ro.rewards.shape, generator=g) < 0.5).float()
        return ro
    monkeypatch.setattr(loop, "rollout", fake)


@pytest.mark.parametrize("algo,extra", [
    ("fpa_dpo", dict(fpa_lam=1.0)),
    ("fpa_dpo", dict(fpa_lam=0.0)),
    ("fpa_rpo", dict(fpa_side="rejected")),
    ("fpa_simper", dict()),
    ("fpa_kto", dict()),
    ("fpa_pg", dict(advantage="drgrpo")),
])
def test_fpa_run_records(tmp_path, mixed_rewards, algo, extra):
    # a large lr so the policy leaves the reference within a step and pi_hat != pi_theta afterwards
    cfg = TrainConfig(algo=algo, lr=3e-2, out_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                      **TINY, **extra)
    records = loop.train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "o" / "records.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in records] == [0, 1, 2, 3]
    m = records[0]["method"]
    assert m["algo"] == algo and m["objective"] == algo[4:] and m["lam"] == cfg.fpa_lam and m["side"] == cfg.fpa_side
    prev_bp = prev_opt = 0
    wall = 0.0
    for r in records[1:]:
        assert KEYS <= set(r), KEYS - set(r)
        n = r["fpa"]["pairs"]
        assert n == round(cfg.prompts * (1 - r["frac_zero_adv_groups"])) and n > 0
        assert r["backward_passes"] - prev_bp == 1 and r["optimizer_steps"] - prev_opt == 1
        prev_bp, prev_opt = r["backward_passes"], r["optimizer_steps"]
        assert r["update"]["pairs"] == n and r["update"]["skipped"] is False and r["update"]["grad_norm"] > 0
        mt = r["metrics"]
        assert {"c_w_mean", "c_l_mean", "base_loss", "fpa_loss", "logp_chosen", "logp_rejected"} <= set(mt)
        assert r["fpa"]["c_w_mean"] == mt["c_w_mean"] > 0 and r["fpa"]["c_l_mean"] == mt["c_l_mean"] > 0
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(mt["base_loss"], rel=1e-5, abs=1e-7)
        if cfg.fpa_lam == 0 or r["step"] == 1:   # pi_hat = pi_theta: no extrapolation, or policy == reference
            assert mt["fpa_loss"] == pytest.approx(mt["base_loss"], rel=1e-5, abs=1e-6)
        else:
            assert abs(mt["fpa_loss"] - mt["base_loss"]) > 1e-6
        assert r["wall_clock"] == pytest.approx(wall + r["t_rollout"] + r["t_backward"] + r["t_optimizer"],
                                                rel=1e-6, abs=1e-6) and r["t_backward"] > 0
        wall = r["wall_clock"]
        assert r["cpu_backward"] > 0   # (was None: a speedup run with an FPA method fell back to wall-clock costs)
        json.dumps(r, allow_nan=False)
    assert stats.cost_clock([records]) == "cpu"
    assert "greedy_acc" in records[-1]["val"] and len(records[-1]["val"]["per_prompt"]) == cfg.val_size


def test_fpa_nonfinite_gradient_skips_the_step(tmp_path, mixed_rewards, monkeypatch):
    """Step 2's objective is NaN: the optimizer stepped on the NaN gradient and the run died at its next rollout's
    sampling. Now the step is skipped (one backward pass, no optimizer step, ``update.skipped``), as the GXPO /
    SFPO rules skip theirs, and the run goes on."""
    real_update, real_objective, updates = fpa_offline.update, fpa_offline.objective, []

    def update(*args, **kwargs):   # (TrainConfig.validate calls the objective too: count the updates)
        updates.append(1)
        return real_update(*args, **kwargs)

    def objective(*args, **kwargs):
        loss, m = real_objective(*args, **kwargs)
        return (loss * float("nan") if len(updates) == 2 else loss), m
    monkeypatch.setattr(fpa_offline, "update", update)
    monkeypatch.setattr(fpa_offline, "objective", objective)
    cfg = TrainConfig(algo="fpa_dpo", out_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                      **dict(TINY, save_model=False))
    records = loop.train(cfg)
    assert [r["backward_passes"] for r in records] == [0, 1, 2, 3]
    assert [r["optimizer_steps"] for r in records] == [0, 1, 1, 2]
    assert [r["update"]["skipped"] for r in records[1:]] == [False, True, False]
    assert math.isfinite(records[3]["loss"])


def test_fpa_step_without_pairs_makes_no_update(tmp_path):
    """The untrained tiny policy scores 0 everywhere: no preference pair, no backward pass, no step."""
    cfg = TrainConfig(algo="fpa_dpo", out_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                      **dict(TINY, steps=2, sft=SFTConfig(max_steps=0)))
    records = loop.train(cfg)
    for r in records[1:]:
        assert r["reward_mean"] == 0.0 and r["fpa"]["pairs"] == 0 and r["update"]["skipped"] is True
        assert r["backward_passes"] == 0 and r["optimizer_steps"] == 0 and r["loss"] is None


def test_cli_flags_and_speedup_opt_in(tmp_path, monkeypatch, mixed_rewards, capsys):
    seen, real_train = {}, loop.train

    def fake_train(cfg, **kw):
        seen["cfg"] = cfg
        return []
    monkeypatch.setattr(loop, "train", fake_train)
    main(["train", "--algo", "fpa_simper", "--fpa-lam", "0", "--fpa-side", "rejected", "--fpa-beta", "0.5",
          "--out", str(tmp_path / "t")])
    c = seen["cfg"]
    assert (c.algo, c.fpa_lam, c.fpa_side, c.fpa_beta) == ("fpa_simper", 0.0, "rejected", 0.5)
    monkeypatch.setattr(loop, "train", real_train)
    assert not set(preset("default").methods) & set(FPA_ALGOS)
    for bad in (["train", "--fpa-side", "chosen"], ["train", "--algo", "fpa_ipo"]):
        with pytest.raises(SystemExit):
            main(bad)
    capsys.readouterr()

    out = tmp_path / "s"
    # in this process (--workers 0): the mixed_rewards monkeypatch does not reach spawned workers
    main(["speedup", "--preset", "test", "--methods", "grpo,fpa_dpo", "--out", str(out), "--no-progress", "--quiet",
          "--workers", "0"])
    index = json.loads((out / "runs.json").read_text())
    assert index["methods"] == ["grpo", "fpa_dpo"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"grpo", "fpa_dpo"}
    recs = [json.loads(x) for x in (out / "fpa_dpo" / "seed0" / "records.jsonl").read_text().splitlines()]
    assert recs[-1]["update"]["algo"] == "fpa_dpo" and recs[-1]["backward_passes"] >= 1
