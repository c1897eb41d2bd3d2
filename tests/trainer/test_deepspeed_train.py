"""``gxpo-kernels train --deepspeed``: the RL loop on a DeepSpeed ZeRO engine, 2 CPU ranks (gloo).

- the command as documented, ``torchrun --nproc_per_node 2 -m gxpo_kernels.cli train --deepspeed <zero2.json>
  --algo gxpo --steps 3``: rank 0 alone writes config.json and records.jsonl (step 0 + 3 records, schema),
  the backward-pass count follows GXPO (3 per active step, 1 on a fallback / after the gate);
- one ``torch.multiprocessing`` spawn, runs with random advantages (the untrained tiny policy scores 0, so its
  own advantages are 0 and every GXPO step would fall back): GXPO under ZeRO-2 takes 3 passes per step with no
  fallback; SFPO under ZeRO-1 with gradient accumulation K+1; grpo_epochs under ZeRO-3 (``generate`` with
  synced_gpus) 3 optimizer steps per batch; both ranks hold identical weights afterwards;
- resume under ZeRO-3 (GXPO with a gate that fires): a run stopped after step 3 and resumed from its step-2
  checkpoint equals the uninterrupted run (records, RNG, final weights);
- bad configs fail before any process group is created.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from gxpo_kernels.cli import main  # noqa: E402
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig  # noqa: E402
from tests._utils import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(prompts=4, group=4, hidden=32, val_every=3, val_size=16, pass1_size=4, pass1_n=2, quiet=True,
            sft=SFTConfig(max_steps=0))
ZERO = {"gradient_clipping": 1.0, "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}


def _ds_json(d, name, stage, gas=1):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump(dict(ZERO, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas,
                       zero_optimization={"stage": stage}), f)
    return path


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.isfile(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not found")
def test_torchrun_cli_gxpo_zero2(tmp_path):
    ds = _ds_json(str(tmp_path), "zero2.json", 2, gas=2)
    out = tmp_path / "out"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun if os.path.isfile(torchrun) else "torchrun", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "gxpo_kernels.cli", "train", "--deepspeed", ds, "--algo", "gxpo", "--steps",
           "3", "--sft-steps", "0", "--prompts", "4", "--group", "4", "--val-size", "16",
           "--pass1-size", "4", "--pass1-n", "2", "--val-every", "3", "--out", str(out),
           "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("records: ") == 1            # only rank 0 reports (and writes)
    # GXPO_DEEPSPEED_SHM=0 (conftest): DeepSpeed's CPU shared-memory all-reduce op is neither built nor loaded
    assert "shm_comm" not in p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model", "records.jsonl"]
    assert os.path.isfile(out / "model" / "config.json") and os.path.isfile(out / "model" / "char_tokenizer.json")
    conf = json.loads((out / "config.json").read_text())
    assert conf["world_size"] == 2 and conf["deepspeed"]["train_micro_batch_size_per_gpu"] == 8
    recs = _records(out / "records.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    m = recs[0]["method"]
    assert m["algo"] == "gxpo" and m["zero_stage"] == 2 and m["world_size"] == 2
    prev = 0
    for r in recs[1:]:
        u = r["update"]
        per = 3 if (u["active"] and not u["fallback"]) else 1
        assert r["backward_passes"] - prev == per == u["backward_passes"], r
        prev = r["backward_passes"]
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["t_backward"] > 0 and r["wall_clock"] > 0
        assert {"clip_frac_low", "ratio_mean", "entropy", "logp_mean"} <= set(r["metrics"])
        json.dumps(r, allow_nan=False)
    assert "greedy_acc" in recs[-1]["val"] and len(recs[-1]["val"]["per_prompt"]) == 16


# --------------------------------------------------------------------------------------------- spawned runs
CASES = {  # name: (algo, stage, gas, extra TrainConfig fields, backward passes per step)
    "gxpo_z2": ("gxpo", 2, 1, dict(gxpo_gate="none"), 3),
    "sfpo_z1_gas2": ("sfpo", 1, 2, dict(sfpo_gate="none", sfpo_K=2), 3),
    "grpo_epochs_z3": ("grpo_epochs", 3, 1, dict(epochs=3), 3),
}




def _worker(rank, port, d):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from gxpo_kernels.trainer import loop

    def random_advantages(cfg, rewards, entropy, fade_ctl, mean_reward=None):
        g = torch.Generator().manual_seed(int(rewards.numel()) + 7 * rank)   # differ per rank, like real data
        return torch.randn(rewards.shape, generator=g), None
    loop.compute_advantages = random_advantages
    out = {}
    for name, (algo, stage, gas, extra, _) in CASES.items():
        # one config file per rank: both ranks writing one path races (the other rank can read it half-written)
        cfg = TrainConfig(algo=algo, steps=2, deepspeed=_ds_json(d, f"{name}.rank{rank}.json", stage, gas),
                          out_dir=os.path.join(d, name), cache_dir=os.path.join(d, "cache"), **TINY, **extra)
        recs = loop.train(cfg)
        out[name] = {"records": recs}
    # resume under ZeRO-3: stop after step 3 (checkpoint at 2), resume, compare with the uninterrupted 4 steps
    base = TrainConfig(algo="gxpo", gxpo_gate="ema", gxpo_tau=1e-6, steps=4, save_steps=2,
                       deepspeed=_ds_json(d, f"resume.rank{rank}.json", 3), cache_dir=os.path.join(d, "cache"),
                       **dict(TINY, val_every=1, val_size=8, pass1_size=0, pass1_n=1))
    full = loop.train(base.replace(out_dir=os.path.join(d, "resume", "full")))
    rng_full = torch.get_rng_state()
    loop.train(base.replace(steps=3, out_dir=os.path.join(d, "resume", "cut")))
    torch.manual_seed(999)
    resumed = loop.train(base.replace(out_dir=os.path.join(d, "resume", "cut"), resume="latest"))
    out["resume"] = {"full": full, "resumed": resumed, "rng": (rng_full, torch.get_rng_state())}
    import deepspeed.comm.comm as dcomm
    out["shm_op"] = dcomm.cdb.shm_comm_op is not None
    torch.save(out, os.path.join(d, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    import torch.multiprocessing as mp
    d = str(tmp_path_factory.mktemp("dstrain"))
    mp.spawn(_worker, args=(free_port(), d), nprocs=2, join=True)
    return d, [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_spawned_bookkeeping(spawned, name):
    d, ranks = spawned
    algo, stage, gas, _, per = CASES[name]
    recs = _records(os.path.join(d, name, "records.jsonl"))
    assert recs == ranks[0][name]["records"]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[0]["method"]["zero_stage"] == stage and recs[0]["method"]["world_size"] == 2
    prev_bp = prev_opt = 0
    for r in recs[1:]:
        u = r["update"]
        assert not u.get("fallback", False), u
        assert r["backward_passes"] - prev_bp == per and r["optimizer_steps"] - prev_opt == per, (name, r)
        prev_bp, prev_opt = r["backward_passes"], r["optimizer_steps"]
        if algo != "grpo_epochs":
            assert u["active"] is True
        else:
            assert len(u["grad_norm"]) == 3 and all(g > 0 for g in u["grad_norm"])
    # rank 1 built the same (dp-reduced) records, except for its own timings
    own = lambda r: {k: v for k, v in r.items() if k != "wall_clock" and not k.startswith(("t_", "cpu_", "gpu_"))}
    for a, b in zip(ranks[0][name]["records"], ranks[1][name]["records"]):
        assert own(a) == own(b)


@pytest.mark.parametrize("config,msg", [
    ("{}", "stage 1, 2 or 3"),
    ('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 3}', "must divide"),
    ("not json", "not valid JSON"),
])
def test_bad_config_fails_before_launch(tmp_path, capsys, config, msg):
    ds = tmp_path / "ds.json"
    ds.write_text(config)
    with pytest.raises(SystemExit):
        main(["train", "--deepspeed", str(ds), "--out", str(tmp_path / "o"), "--prompts", "4", "--group", "4"])
    assert msg in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_deepspeed_refuses_fpa_and_speedup(tmp_path, capsys):
    ds = _ds_json(str(tmp_path), "z.json", 2)
    with pytest.raises(SystemExit):
        main(["train", "--deepspeed", ds, "--algo", "fpa_dpo", "--out", str(tmp_path / "o")])
    assert "--deepspeed drives" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["speedup", "--deepspeed", ds, "--out", str(tmp_path / "s")])
    assert "not with `speedup`" in capsys.readouterr().err


def _strip(records):
    return [{k: v for k, v in r.items() if k != "wall_clock" and not k.startswith(("t_", "cpu_", "gpu_"))}
            for r in records]


def test_shm_allreduce_skipped_when_asked(spawned):
    """GXPO_DEEPSPEED_SHM=0 (set by conftest): DeepSpeed's communication backend, made by deepspeed.initialize on
    a process group the caller created, has no shared-memory all-reduce op (it used to JIT-build one)."""
    assert os.environ.get("GXPO_DEEPSPEED_SHM") == "0"
    assert [r["shm_op"] for r in spawned[1]] == [False, False]


def test_resume_zero3_is_bit_exact(spawned):
    """GXPO (EMA gate fires at step 1) on ZeRO-3: the rule's state rides in trainer_state.pt, DeepSpeed's own
    partitioned model / optimizer files in checkpoint-<N>/deepspeed; the resumed run equals the full one."""
    from safetensors.torch import load_file
    d, ranks = spawned
    for r in range(2):
        res = ranks[r]["resume"]
        assert _strip(res["resumed"]) == _strip(res["full"]) and torch.equal(*res["rng"])
        assert res["full"][1]["gate_fired_at"] == 1 and res["full"][4]["update"]["active"] is False
    wa = load_file(os.path.join(d, "resume", "full", "model", "model.safetensors"))
    wb = load_file(os.path.join(d, "resume", "cut", "model", "model.safetensors"))
    assert set(wa) == set(wb) and all(wa[k].numel() > 0 and torch.equal(wa[k], wb[k]) for k in wa)
    for run in ("full", "cut"):
        c = os.path.join(d, "resume", run, "checkpoint-4")
        assert os.path.isdir(os.path.join(c, "deepspeed"))
        st = torch.load(os.path.join(c, "trainer_state.pt"), weights_only=True)
        assert st["step"] == 4 and st["rule"]["gate"]["fired"] is True and st["world_size"] == 2


def test_shipped_config_names_resolve(tmp_path, monkeypatch):
    """`--deepspeed ds_zero2.json` with no such file here uses the config shipped in gxpo_kernels/examples; any
    other missing name is a clear error listing the shipped ones."""
    from gxpo_kernels.trainer.engines import load_ds_config
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(algo="gxpo", prompts=4, group=4)
    assert load_ds_config("ds_zero2.json", cfg)["zero_optimization"]["stage"] == 2
    assert load_ds_config("ds_zero3.json", cfg)["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="shipped configs: ds_zero2.json"):
        load_ds_config("ds_zero9.json", cfg)
    with pytest.raises(ValueError, match="no such file"):
        load_ds_config(str(tmp_path / "sub" / "ds_zero2.json"), cfg)


def test_max_grad_norm_and_config_gradient_clipping_conflict(tmp_path):
    """DeepSpeed clips with the config's gradient_clipping: an explicit --max_grad_norm that differs from it was
    silently dropped (the shipped configs set 1.0); now it is refused, as a conflicting gradient_accumulation_steps
    is. A config without gradient_clipping takes --max_grad_norm; the default --max_grad_norm leaves the config's."""
    from gxpo_kernels.trainer.engines import load_ds_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.7}))
    cfg = TrainConfig(algo="gxpo", prompts=4, group=4)
    assert load_ds_config(str(path), cfg)["gradient_clipping"] == 0.7
    assert load_ds_config(str(path), cfg.replace(max_grad_norm=0.7))["gradient_clipping"] == 0.7
    with pytest.raises(ValueError, match=r"--max_grad_norm 0\.3 conflicts with the gradient_clipping 0\.7"):
        load_ds_config(str(path), cfg.replace(max_grad_norm=0.3))
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert load_ds_config(str(path), cfg.replace(max_grad_norm=0.3))["gradient_clipping"] == 0.3


@pytest.mark.parametrize("field", ["gradient_clipping", "gradient_accumulation_steps", "stage"])
def test_auto_placeholders_in_the_config_are_one_clear_error(tmp_path, field):
    """HF Trainer configs carry "auto" placeholders that nothing fills in here: each used to be a bare
    ``could not convert string to float: 'auto'`` (or int()) ValueError; now the message names the field."""
    from gxpo_kernels.trainer.engines import load_ds_config
    d = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    (d["zero_optimization"] if field == "stage" else d)[field] = "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(d))
    cfg = TrainConfig(algo="gxpo", prompts=4, group=4)
    with pytest.raises(ValueError, match=f"{field} must be an? (int|number), got 'auto' \\(HF Trainer's 'auto'"):
        load_ds_config(str(path), cfg.replace(max_grad_norm=0.5))


@pytest.mark.parametrize("field", ["gradient_clipping", "gradient_accumulation_steps", "stage"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_in_the_config_are_one_clear_error(tmp_path, field, value):
    """JSON as Python reads it accepts Infinity / NaN: a stage or gradient_accumulation_steps of them was a bare
    OverflowError / ValueError from int() naming no field, and a gradient_clipping of them was taken as is."""
    from gxpo_kernels.trainer.engines import load_ds_config
    d = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    (d["zero_optimization"] if field == "stage" else d)[field] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(d))
    cfg = TrainConfig(algo="gxpo", prompts=4, group=4)
    with pytest.raises(ValueError, match=f"{field} must be an? (int|number), got (inf|-inf|nan)"):
        load_ds_config(str(path), cfg)


def test_config_scheduler_and_lr_scheduler_type_are_exclusive(tmp_path):
    """A DeepSpeed config's own scheduler runs with lr_scheduler_type='constant' only (which then leaves the rate
    to DeepSpeed); another schedule on top of it is refused before any work."""
    from gxpo_kernels.trainer.engines import load_ds_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}))
    cfg = TrainConfig(algo="gxpo", prompts=4, group=4)
    assert load_ds_config(str(path), cfg)["scheduler"]["type"] == "WarmupLR"
    with pytest.raises(ValueError, match="has its own scheduler"):
        load_ds_config(str(path), cfg.replace(lr_scheduler_type="linear"))


def test_resume_refuses_a_changed_deepspeed_config(tmp_path):
    """The checkpoint keeps the DeepSpeed config it was trained with: a resume whose JSON changes a setting of the
    math (here gradient_clipping) is refused naming the key, old and new value; a logging key may change."""
    out, env = str(tmp_path / "out"), _env()
    env.pop("RANK", None)                      # one process, no launcher: rank 0 of 1

    def run(conf, *extra):
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps(conf))
        cmd = [sys.executable, "-m", "gxpo_kernels.cli", "train", "--deepspeed", str(ds), "--algo", "grpo",
               "--sft-steps", "0", "--prompts", "2", "--group", "2", "--val-size", "4", "--pass1-size", "0",
               "--val-every", "100", "--save-steps", "1", "--no-save-model", "--no-progress", "--out", out,
               "--cache-dir", str(tmp_path / "cache"), *extra]
        return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)

    conf = dict(ZERO, zero_optimization={"stage": 1})
    p = run(conf, "--steps", "1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = run(dict(conf, gradient_clipping=0.5), "--steps", "2", "--resume", "latest")
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "gradient_clipping=1.0 (now 0.5)" in p.stderr, p.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "checkpoint-1", "deepspeed_config.json"))
    p = run(dict(conf, steps_per_print=5, wall_clock_breakdown=False), "--steps", "2", "--resume", "latest")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [r["step"] for r in _records(os.path.join(out, "records.jsonl"))] == [0, 1, 2]
