"""Guards the trainer end to end (tiny sizes, CPU).

- ``gxpo-kernels speedup --preset test`` runs every default method in-process: per-run records.jsonl,
  runs.json, results.json and speedup.png are written, the table is printed, and records follow the schema;
- backward-pass and optimizer-step bookkeeping per method: GRPO/grpo_lr 1 per update, grpo_epochs 3,
  SFPO K+1, GXPO 3 while active (1 once gated, fallbacks excluded), on batches with non-zero advantages, with one
  build of the rule's prepared extrapolation plan per run; and
  the recorded counts against the backward / optimizer.step calls counted from outside, GXPO fallbacks included;
- a non-finite gradient skips the optimizer step in every method (GRPO's too), and the run goes on;
- the --lr-mult control really scales the learning rate;
- bad input fails clearly: unknown algo / task / method names, a model folder that does not exist, --deepspeed
  without the integration.
"""
import json
import math
import os

import pytest
import torch

from gxpo_kernels.cli import main
from gxpo_kernels.trainer import engines, loop
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig, parse_method
from tests._utils import count_plan_builds

TINY = dict(steps=3, prompts=4, group=4, val_every=3, val_size=16, pass1_size=4, pass1_n=2, hidden=32,
            sft=SFTConfig(max_steps=2, check_every=2, check_size=8, batch_size=16))
STEP_KEYS = {"step", "reward_mean", "frac_zero_adv_groups", "loss", "metrics", "update", "backward_passes",
             "optimizer_steps", "wall_clock", "t_rollout", "t_backward", "t_optimizer", "gate_fired_at"}


def _check_schema(records, steps, val_size):
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert records[0]["backward_passes"] == 0 and "greedy_acc" in records[0]["val"]
    wall = 0.0
    for r in records[1:]:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["frac_zero_adv_groups"] <= 1.0
        assert {"clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "logp_mean"} <= set(r["metrics"])
        assert r["wall_clock"] >= wall and r["t_backward"] > 0
        assert r["wall_clock"] == pytest.approx(wall + r["t_rollout"] + r["t_backward"] + r["t_optimizer"], rel=1e-6,
                                                abs=1e-6)
        wall = r["wall_clock"]
        json.dumps(r, allow_nan=False)   # strictly JSON-safe
    assert records[-1]["val"]["greedy_acc"] >= 0 and "pass1" in records[-1]["val"]
    assert len(records[-1]["val"]["per_prompt"]) == val_size


def test_speedup_test_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    main(["speedup", "--preset", "test", "--out", str(out), "--no-progress", "--quiet"])
    text = capsys.readouterr().out
    assert str(out) in text and "grpo" in text
    assert (out / "results.json").is_file() and (out / "runs.json").is_file() and (out / "speedup.png").is_file()
    index = json.loads((out / "runs.json").read_text())
    assert index["methods"] == ["grpo", "sfpo", "gxpo", "gxpo+fade", "grpo_lr", "grpo_epochs"]
    assert index["lr_mult"] is not None and index["lr_mult"] >= 1.0 and index["lr_mult_source"] == "gxpo"
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(index["methods"])
    for method in index["methods"]:
        path = out / method / "seed0" / "records.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        steps = index["train"]["steps"]
        _check_schema(records, steps, index["train"]["val_size"])
        algo, adv = parse_method(method)
        assert records[1]["update"]["algo"] == algo
        if adv == "fade":
            assert {"alpha", "delta", "p_hat", "h_hat"} <= set(records[1]["fade"])
    # every run started from the same cached warm start
    ws = {json.dumps(r["warm_start"]["path"]) for r in index["runs"]["grpo"].values()} | \
         {json.dumps(r["warm_start"]["path"]) for m in index["runs"].values() for r in m.values()}
    assert len(ws) == 1


@pytest.fixture
def random_advantages(monkeypatch):
    """The tiny untrained policy scores 0 on every prompt; give the loss non-zero advantages instead, so the
    update rules take real (non-fallback) steps and the pass bookkeeping is exercised."""
    def fake(cfg, rewards, entropy, fade_ctl, mean_reward=None):
        g = torch.Generator().manual_seed(int(rewards.numel()))
        return torch.randn(rewards.shape, generator=g), None
    monkeypatch.setattr(loop, "compute_advantages", fake)


@pytest.mark.parametrize("algo,per_step", [("grpo", 1), ("grpo_lr", 1), ("grpo_epochs", 3), ("sfpo", 4),
                                           ("gxpo", 3)])
def test_backward_pass_counts(tmp_path, random_advantages, algo, per_step):
    cfg = TrainConfig(algo=algo, out_dir=str(tmp_path / algo), cache_dir=str(tmp_path / "cache"), quiet=True,
                      sfpo_K=3, gxpo_gate="none", sfpo_gate="none", **dict(TINY, steps=4))
    with count_plan_builds() as builds:
        records = loop.train(cfg)
    # the rule's prepared extrapolation plan: built on the first active step, reused on the three others
    assert builds[0] == (algo in ("gxpo", "sfpo"))
    _check_schema(records, cfg.steps, cfg.val_size)
    prev_bp = prev_opt = 0
    for r in records[1:]:
        d_bp, d_opt = r["backward_passes"] - prev_bp, r["optimizer_steps"] - prev_opt
        prev_bp, prev_opt = r["backward_passes"], r["optimizer_steps"]
        u = r["update"]
        assert not u.get("fell_back", False) and not u.get("fallback", False)
        assert d_bp == per_step, (algo, r["step"], d_bp)
        assert d_opt == per_step, (algo, r["step"], d_opt)
        if algo in ("gxpo", "sfpo"):
            assert u["active"] is True
    lines = (tmp_path / algo / "records.jsonl").read_text().splitlines()
    assert len(lines) == cfg.steps + 1


@pytest.mark.parametrize("algo,per_step", [("grpo", 1), ("grpo_epochs", 3), ("gxpo", 3)])
def test_nonfinite_gradient_skips_the_step_as_the_rules_do(tmp_path, random_advantages, monkeypatch, algo, per_step):
    """Step 2's first pass has a NaN loss. GRPO stepped on its NaN gradient, wrote NaN into the weights and died
    at its next rollout ("probability tensor contains either inf, nan"), stopping a whole speedup run, while
    GXPO / SFPO skip such a step (``skipped``). Every method now skips it: the run ends, step 2 counts its passes
    but no optimizer step for the NaN one, and the loss stays finite afterwards."""
    real, calls = engines.PolicyLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == per_step + 1 else loss
    monkeypatch.setattr(engines.PolicyLoss, "forward", forward)
    cfg = TrainConfig(algo=algo, out_dir=str(tmp_path / algo), cache_dir=str(tmp_path / "cache"), quiet=True,
                      gxpo_gate="none", save_model=False, **TINY)
    records = loop.train(cfg)
    d_bp = [b["backward_passes"] - a["backward_passes"] for a, b in zip(records, records[1:])]
    d_opt = [b["optimizer_steps"] - a["optimizer_steps"] for a, b in zip(records, records[1:])]
    assert d_bp == [per_step, 1 if algo == "gxpo" else per_step, per_step]   # (GXPO stops at a NaN pass 0)
    assert d_opt == [per_step, 0 if algo == "gxpo" else per_step - 1, per_step]
    assert records[2]["update"]["skipped"] is (per_step == 1 or algo == "gxpo")
    assert math.isfinite(records[3]["loss"]) and records[3]["update"].get("skipped", False) is False


@pytest.mark.parametrize("algo,nan_call", [("grpo_epochs", None), ("sfpo", None), ("gxpo", 5), ("gxpo", 4)])
def test_recorded_counts_match_what_ran(tmp_path, random_advantages, monkeypatch, algo, nan_call):
    """The records' backward_passes / optimizer_steps against counts taken from outside: every Tensor.backward
    (2 micro-batches per pass), every optimizer.step (a global post-hook), every rollout. nan_call makes that
    PolicyLoss call's loss NaN: step 2's pass 1 (GXPO falls back: 2 passes, 2 optimizer steps) or pass 0
    (skipped: 1 pass, none)."""
    import torch.optim.optimizer as topt
    seen = {"backward": 0, "step": 0, "rollout": 0}
    real_bw, real_fw, real_ro, calls = torch.Tensor.backward, engines.PolicyLoss.forward, loop.rollout, []

    def backward(self, *args, **kwargs):
        seen["backward"] += 1
        return real_bw(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss = real_fw(self, *args, **kwargs)
        return loss * float("nan") if len(calls) in (2 * nan_call - 1, 2 * nan_call) else loss   # both halves

    def rollout(*args, **kwargs):
        seen["rollout"] += 1
        return real_ro(*args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(loop, "rollout", rollout)
    if nan_call:
        monkeypatch.setattr(engines.PolicyLoss, "forward", forward)
    snaps = []
    cfg = TrainConfig(algo=algo, out_dir=str(tmp_path / algo), cache_dir=str(tmp_path / "cache"), quiet=True,
                      gxpo_gate="none", sfpo_gate="none", gradient_accumulation_steps=2, save_model=False, **TINY)
    loop.prepare_warm_start(cfg, log=lambda s: None)   # (its optimizer steps come before the hook)
    hook = topt.register_optimizer_step_post_hook(lambda *a: seen.__setitem__("step", seen["step"] + 1))
    try:
        records = loop.train(cfg, progress=lambda r: snaps.append(dict(seen)))
    finally:
        hook.remove()
    for a, b, r0, r1 in zip(snaps, snaps[1:], records, records[1:]):
        assert b["backward"] - a["backward"] == 2 * (r1["backward_passes"] - r0["backward_passes"]), r1["step"]
        assert b["step"] - a["step"] == r1["optimizer_steps"] - r0["optimizer_steps"], r1["step"]
        assert b["rollout"] - a["rollout"] == 1
    if nan_call:
        fb = {5: ("nonfinite_g1", 2, 2), 4: ("nonfinite_g0", 1, 0)}[nan_call]
        u = records[2]["update"]
        assert (u["fallback_reason"], records[2]["backward_passes"] - records[1]["backward_passes"],
                records[2]["optimizer_steps"] - records[1]["optimizer_steps"]) == fb


def test_gxpo_gate_fires_and_falls_to_one_pass(tmp_path, random_advantages):
    """A gate that fires on its first observation (EMA start mu = sigma = 1, tau tiny; no clipping, so the
    observed norm is not pinned at 1) -> the later steps cost 1 pass."""
    cfg = TrainConfig(algo="gxpo", gxpo_gate="ema", gxpo_tau=1e-6, max_grad_norm=1e6, out_dir=str(tmp_path / "g"),
                      cache_dir=str(tmp_path / "cache"), quiet=True, **dict(TINY, steps=3))
    records = loop.train(cfg)
    bp = [r["backward_passes"] for r in records]
    assert bp[1] == 3 and bp[2] - bp[1] == 1 and bp[3] - bp[2] == 1
    assert records[1]["gate_fired_at"] == 1 and records[1]["gate_fired"] is True
    assert records[3]["update"]["gate_fired_step"] == 1 and records[3]["update"]["gate"] == "ema"
    assert records[1]["update"]["active"] is True and records[2]["update"]["active"] is False


def test_lr_mult_scales_learning_rate(tmp_path):
    base = TrainConfig(algo="grpo_lr", lr_mult=3.5, out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"),
                       quiet=True, **dict(TINY, steps=1))
    records = loop.train(base)
    assert records[1]["update"]["lr"] == pytest.approx(3.5e-5)
    records = loop.train(base.replace(algo="grpo", out_dir=str(tmp_path / "b")))
    assert records[1]["update"]["lr"] == pytest.approx(1e-5)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 7, 600])
def test_lr_schedules_are_transformers(kind, steps):
    """learning_rate(cfg, step) = transformers' scheduler of that name (no warm-up) after step - 1 of its steps."""
    from transformers import get_scheduler
    from gxpo_kernels.trainer.engines import learning_rate
    cfg = TrainConfig(algo="grpo_lr", lr=3e-5, lr_mult=2.0, steps=steps, lr_scheduler_type=kind)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=6e-5)
    sched = get_scheduler(kind, opt, num_warmup_steps=0, num_training_steps=steps)
    for step in range(1, steps + 1):
        assert learning_rate(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), step
        opt.step()
        sched.step()
    assert learning_rate(cfg) == pytest.approx(6e-5)


@pytest.mark.parametrize("algo", ["grpo", "gxpo"])
def test_trainer_applies_the_lr_schedule(tmp_path, monkeypatch, algo):
    """Every optimizer step of RL step s runs at the scheduled rate of s (GXPO's three included), and each step's
    record says which."""
    seen, orig = [], torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)
    cfg = TrainConfig(algo=algo, lr=1e-4, lr_scheduler_type="linear", gxpo_gate="none",
                      out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"), quiet=True,
                      **dict(TINY, steps=4, sft=SFTConfig(max_steps=0)))
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    records = loop.train(cfg)
    want = [1e-4 * (4 - s + 1) / 4 for s in range(1, 5)]
    assert [r["learning_rate"] for r in records[1:]] == pytest.approx(want)
    per_step = [r["update"].get("backward_passes", 1) if algo == "gxpo" else 1 for r in records[1:]]
    assert seen == pytest.approx([lr for lr, n in zip(want, per_step) for _ in range(n)])


def test_kl_penalty_against_the_warm_start_policy(tmp_path):
    """beta > 0: the reference is the frozen warm-start policy, so the first step's KL is 0 and later ones are
    not; with beta = 0 no reference is kept and the loss reports no KL."""
    cfg = TrainConfig(algo="grpo", lr=1e-3, beta=0.5, out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"),
                      quiet=True, **dict(TINY, steps=3))
    records = loop.train(cfg)
    kl = [r["metrics"]["kl"] for r in records[1:]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[2] > 1e-6, kl
    records = loop.train(cfg.replace(beta=0.0, out_dir=str(tmp_path / "b")))
    assert "kl" not in records[1]["metrics"]


@pytest.mark.parametrize("argv,msg", [
    (["train", "--algo", "ppo"], "invalid choice"),
    (["train", "--task", "multiplication"], "invalid choice"),
    (["train", "--advantage", "rloo"], "invalid choice"),
    (["speedup", "--methods", "grpo,dpo"], "unknown method"),
    (["speedup", "--methods", "gxpo+rloo"], "unknown method"),
    (["speedup", "--methods", "sfpo,gxpo"], "baseline"),
    (["train", "--model", "/nonexistent/model/dir"], "no such directory"),
    (["speedup", "--model", "/nonexistent/model/dir"], "no such directory"),
])
def test_bad_input_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_model_dir_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tmp_path)])
    assert "config.json" in capsys.readouterr().err


def test_deepspeed_flag_errors_clearly(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(SystemExit):
        main(["train", "--deepspeed", str(ds), "--out", str(tmp_path / "o")])
    assert "deepspeed" in capsys.readouterr().err.lower()


def test_local_model_directory(tmp_path):
    """--model PATH: a saved transformers folder (no tokenizer files -> the character tokenizer)."""
    from gxpo_kernels.trainer.model import build_tiny_model, tiny_config_dict
    from gxpo_kernels.trainer.tasks import CharTokenizer

    tok = CharTokenizer()
    build_tiny_model(tiny_config_dict(tok.vocab_size, hidden=32, intermediate=64), tok, torch.device("cpu")) \
        .save_pretrained(tmp_path / "m")
    cfg = TrainConfig(model=str(tmp_path / "m"), out_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                      quiet=True, **TINY)
    records = loop.train(cfg)
    assert records[-1]["step"] == cfg.steps
    assert os.path.isfile(tmp_path / "o" / "config.json")


def test_sort_task_with_drgrpo_and_llama(tmp_path):
    """The other task, advantage and architecture: Dr.GRPO picks its own aggregation (B * T_max)."""
    cfg = TrainConfig(task="sort", advantage="drgrpo", arch="llama", out_dir=str(tmp_path / "o"),
                      cache_dir=str(tmp_path / "c"), quiet=True, **dict(TINY, steps=2, val_every=1))
    assert cfg.agg_mode == "seq-mean-token-sum-norm"
    records = loop.train(cfg)
    _check_schema(records, cfg.steps, cfg.val_size)
    cfg_json = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg_json["train"]["task"] == "sort" and cfg_json["train"]["arch"] == "llama"
    assert all("val" in r for r in records)


def test_smoke_preset_with_controls(tmp_path, capsys):
    """The real --preset smoke (the bundled default warm start, every method incl. both controls) end to end."""
    out = tmp_path / "smoke"
    main(["speedup", "--preset", "smoke", "--out", str(out), "--no-progress", "--quiet"])
    index = json.loads((out / "runs.json").read_text())
    assert index["methods"] == ["grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(index["methods"]) and (out / "speedup.png").stat().st_size > 0
    per_update = {"grpo": {1}, "grpo_lr": {1}, "grpo_epochs": {3}, "sfpo": {4, 1}, "gxpo": {3, 1}}
    for method, allowed in per_update.items():
        records = [json.loads(line) for line in (out / method / "seed0" / "records.jsonl").read_text().splitlines()]
        assert records[0]["step"] == 0 and records[-1]["step"] == index["train"]["steps"]
        bp = [r["backward_passes"] for r in records]
        deltas = {b - a for a, b in zip(bp, bp[1:])}
        # fallback steps of sfpo/gxpo cost one pass; everything else costs what the method says
        assert deltas <= allowed, (method, deltas)
    assert "CONCLUSION" in capsys.readouterr().out


@pytest.mark.parametrize("signal", ["rollout", "slow_pass"])
def test_sfpo_entropy_signal(tmp_path, random_advantages, signal):
    """The SFPO entropy gate sees the rollout's entropy (default) or, as the SFPO authors do, the slow pass's
    entropy at the repositioned point (its loss metric); both run the K + 1 passes."""
    cfg = TrainConfig(algo="sfpo", sfpo_K=2, sfpo_entropy_signal=signal, out_dir=str(tmp_path / signal),
                      cache_dir=str(tmp_path / "cache"), quiet=True, **dict(TINY, steps=2))
    records = loop.train(cfg)
    for r in records[1:]:
        u = r["update"]
        assert u["active"] is True and u["entropy_source"] == signal
        if signal == "rollout":
            assert u["entropy_signal"] == pytest.approx(r["rollout_entropy"])
        else:   # the slow pass's policy differs from the rollout's, and so does its entropy
            assert u["entropy_signal"] > 0 and u["entropy_signal"] != pytest.approx(r["rollout_entropy"], rel=1e-9)
    assert records[-1]["backward_passes"] == 2 * 3


def test_pass1_sampling_forks_every_cuda_generator(monkeypatch):
    """Validation's pass@1 sampling seeds its own stream with manual_seed, which reseeds the CPU generator and every
    CUDA device's: every one of them must be forked around it. Only the CPU one was (fork_rng(devices=[])), so on
    CUDA each validation reset the rollouts' generator to the same state. (No GPU here: the CUDA calls are stubbed
    and the forked devices recorded.)"""
    import contextlib
    forked, seeded = [], []

    @contextlib.contextmanager
    def fork(devices=None, **kw):
        forked.append(list(devices))
        yield
    monkeypatch.setattr(torch.random, "fork_rng", fork)
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(loop, "evaluate", lambda *a, n=1, **kw: [1.0, 0.0] if n == 1 else [0.5, 0.5])
    cfg = TrainConfig(pass1_size=2, pass1_n=2, seed=3)
    out = loop.validate_policy(cfg, None, None, None, [("1+1=", "2"), ("2+2=", "4")], 2)
    assert forked == [[0, 1]] and seeded == [10_003] and out["pass1"] == 0.5 and out["greedy_acc"] == 0.5
