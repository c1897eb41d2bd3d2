"""Trainer checkpoints (``trainer.checkpoint``): save every ``save_steps``, resume bit-exactly, final model.

- 5 + 5 steps == 10 steps: a run that crashes after step 6 (checkpoint-5 on disk, step 6 already logged) and is
  resumed with ``resume="latest"`` ends with the same parameters, optimizer state, update-rule state (gate
  fired), FADE state, RNG states and records (timings aside) as an uninterrupted 10-step run, bit for bit;
  GXPO with an EMA gate that fires, and SFPO with FADE advantages and its entropy gate;
- every ``.pt`` file of a checkpoint loads with ``torch.load(..., weights_only=True)``; a checkpoint whose
  trainer state carries a pickled object is refused on resume and its payload never runs;
- a save that fails midway leaves no ``checkpoint-<N>`` folder (only the ``.tmp`` one, which resume ignores);
- resuming with different settings, or from a folder that is no checkpoint, fails clearly;
- the final model folder loads with ``from_pretrained`` and holds the trained weights.
"""
import dataclasses
import glob
import json
import os

import pytest
import torch

from gxpo_kernels.cli import main
from gxpo_kernels.trainer import checkpoint as ckpt
from gxpo_kernels.trainer import loop
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig

TINY = dict(steps=10, prompts=4, group=4, val_every=4, val_size=16, pass1_size=4, pass1_n=2, hidden=32, quiet=True,
            save_steps=5, sft=SFTConfig(max_steps=0))


@pytest.fixture
def random_advantages(monkeypatch):
    """The untrained policy scores 0 everywhere: random advantages make every step a real update. FADE's
    controller still sees the step's reward and entropy, so its state evolves."""
    def fake(cfg, rewards, entropy, fade_ctl, mean_reward=None):
        st = None if fade_ctl is None else fade_ctl.update(float(rewards.mean()) + 0.3, entropy)
        return torch.randn(rewards.shape), st                 # the global RNG: part of what resume restores
    monkeypatch.setattr(loop, "compute_advantages", fake)


class Crash(Exception):
    pass


def _strip(records):
    return [{k: v for k, v in r.items() if k != "wall_clock" and not k.startswith(("t_", "cpu_", "gpu_"))}
            for r in records]


def _pt_files(path):
    return {os.path.relpath(f, path): torch.load(f, weights_only=True)
            for f in sorted(glob.glob(os.path.join(path, "**", "*.pt"), recursive=True))}


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.parametrize("extra", [dict(algo="gxpo", gxpo_gate="ema", gxpo_tau=1e-6, max_grad_norm=1e6),
                                   dict(algo="sfpo", advantage="fade", sfpo_K=2)])
def test_resume_is_bit_exact(tmp_path, random_advantages, extra):
    base = TrainConfig(cache_dir=str(tmp_path / "c"), **TINY, **extra)
    ref_records = loop.train(base.replace(out_dir=str(tmp_path / "full")))
    ref_rng = torch.get_rng_state()

    def crash_after_6(rec):
        if rec["step"] == 6:
            raise Crash
    out = str(tmp_path / "cut")
    with pytest.raises(Crash):
        loop.train(base.replace(out_dir=out), progress=crash_after_6)
    assert ckpt.latest_checkpoint(out).endswith("checkpoint-5")
    assert len(open(os.path.join(out, "records.jsonl")).read().splitlines()) == 7      # steps 0..6 logged
    torch.manual_seed(12345)                                   # the resumed run must not depend on this
    records = loop.train(base.replace(out_dir=out, resume="latest"))
    assert torch.equal(torch.get_rng_state(), ref_rng)

    assert [r["step"] for r in records] == list(range(11))
    assert _strip(records) == _strip(ref_records)
    on_disk = [json.loads(x) for x in open(os.path.join(out, "records.jsonl")).read().splitlines()]
    assert _strip(on_disk) == _strip(ref_records)
    if extra["algo"] == "gxpo":
        assert records[1]["gate_fired_at"] == 1 and records[10]["update"]["active"] is False
    else:
        assert records[10]["fade"]["p_hat"] == ref_records[10]["fade"]["p_hat"]
    # checkpoint-10 of both runs: parameters, optimizer moments, rule + gate, FADE, RNG, counters
    a, b = _pt_files(str(tmp_path / "full" / "checkpoint-10")), _pt_files(os.path.join(out, "checkpoint-10"))
    assert set(a) == {"engine.pt", "trainer_state.pt", "rng_rank0.pt"}
    assert a["trainer_state.pt"].pop("wall_clock") > 0 and b["trainer_state.pt"].pop("wall_clock") > 0   # timing
    _assert_same(a, b)
    st = a["trainer_state.pt"]
    assert st["step"] == 10 and st["rule"]["outer_steps"] == 10 and len(a["engine.pt"]["optimizer"]["state"]) > 0
    assert (st["fade"] is None) == (extra.get("advantage") != "fade")
    # the final model
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wb = load_file(os.path.join(out, "model", "model.safetensors"))
    _assert_same(wa, wb)


def test_final_model_loads(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=2))
    loop.train(cfg)
    m = AutoModelForCausalLM.from_pretrained(str(out / "model"), local_files_only=True)
    saved = torch.load(out / "checkpoint-2" / "engine.pt", weights_only=True)["model"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, saved[k]), k
    tok = json.loads((out / "model" / "char_tokenizer.json").read_text())
    assert tok["eos_token_id"] == 2 and tok["alphabet"]
    assert not any(p.endswith(".tmp") for p in os.listdir(out))


def test_pickle_payload_refused(tmp_path):
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=2))
    loop.train(cfg)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = out / "checkpoint-2" / "trainer_state.pt"
    st = torch.load(path, weights_only=True)
    st["rule"] = Payload()
    torch.save(st, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        loop.train(cfg.replace(resume=str(out / "checkpoint-2"), steps=3))
    assert not marker.exists()


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    from gxpo_kernels.trainer.engines import PlainEngine
    out = tmp_path / "o"

    def broken(self, path):
        open(os.path.join(path, "engine.pt"), "w").write("half")
        raise OSError("disk full")
    monkeypatch.setattr(PlainEngine, "save_state", broken)
    with pytest.raises(OSError, match="disk full"):
        loop.train(TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=2)))
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-2.tmp").exists()
    assert ckpt.latest_checkpoint(str(out)) is None
    with pytest.raises(ValueError, match="no finished checkpoint"):
        loop.train(TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), resume="latest",
                               **dict(TINY, steps=2)))


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=1, hidden=128))
    loop.train(cfg)
    with pytest.raises(ValueError, match="lr=1e-05 .now 0.001"):
        loop.train(cfg.replace(resume="latest", lr=1e-3))
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        loop.train(cfg.replace(resume=str(tmp_path)))
    # the CLI flag reaches the config and extends the run (steps may change on resume)
    main(["train", "--out", str(out), "--resume", "latest", "--steps", "3", "--sft-steps", "0", "--prompts", "4",
          "--group", "4", "--val-size", "16", "--pass1-size", "4", "--pass1-n", "2", "--val-every", "4",
          "--cache-dir", str(tmp_path / "c"), "--quiet"])
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]


def test_extending_a_run_equals_the_longer_run(tmp_path, random_advantages):
    """A 10-step run stopped after step 6 and resumed with --steps 14 equals an uninterrupted 14-step run (records
    and config.json, which says 14 steps; it said 10). Under a cosine schedule the steps after the resume take
    the 14-step schedule's rates (docs/trainer.md: the rest of the schedule is spread over the new total)."""
    base = TrainConfig(cache_dir=str(tmp_path / "c"), **dict(TINY, val_every=2))

    def crash_after_6(rec):
        if rec["step"] == 6:
            raise Crash
    ref = loop.train(base.replace(out_dir=str(tmp_path / "full"), steps=14))
    out = str(tmp_path / "cut")
    with pytest.raises(Crash):
        loop.train(base.replace(out_dir=out), progress=crash_after_6)
    recs = loop.train(base.replace(out_dir=out, resume="latest", steps=14))
    assert _strip(recs) == _strip(ref)
    assert json.load(open(os.path.join(out, "config.json")))["train"]["steps"] == 14
    open(os.path.join(out, "config.json"), "w").write("{damaged")       # not read by a resume: rewritten
    loop.train(base.replace(out_dir=out, resume=os.path.join(out, "checkpoint-10"), steps=14))
    assert json.load(open(os.path.join(out, "config.json")))["train"]["steps"] == 14
    cosine = base.replace(out_dir=str(tmp_path / "cos"), lr_scheduler_type="cosine")
    with pytest.raises(Crash):
        loop.train(cosine, progress=crash_after_6)
    lr = [r.get("learning_rate") for r in loop.train(cosine.replace(resume="latest", steps=14))]
    from gxpo_kernels.trainer.engines import learning_rate
    assert lr[1:6] == [learning_rate(cosine, s) for s in range(1, 6)]
    assert lr[6:] == [learning_rate(cosine.replace(steps=14), s) for s in range(6, 15)]


def test_resume_a_checkpoint_older_than_a_setting(tmp_path):
    """A checkpoint written before a TrainConfig field existed (its config.json lacks it) resumes when the field
    is at its default (the old run behaved so) and is refused when it is not."""
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=1))
    loop.train(cfg)
    for ck in out.glob("checkpoint-*"):
        saved = json.loads((ck / "config.json").read_text())
        del saved["beta"], saved["lr_scheduler_type"]
        (ck / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="beta=0.0 .now 0.1"):
        loop.train(cfg.replace(resume="latest", steps=3, beta=0.1))
    recs = loop.train(cfg.replace(resume="latest", steps=3))
    assert [r["step"] for r in recs] == [0, 1, 2, 3]


def test_saved_setting_defaults_for_missing_fields():
    import dataclasses
    from gxpo_kernels.trainer.config import SFTConfig, saved_setting
    assert saved_setting({"beta": 0.3}, "beta") == 0.3
    assert saved_setting({}, "beta") == 0.0 and saved_setting({}, "lr_scheduler_type") == "constant"
    assert saved_setting({}, "pass_k") == [1] and saved_setting({}, "sft") == dataclasses.asdict(SFTConfig())
    assert saved_setting({}, "no_such_field") is None


def test_resume_refuses_another_reference_policy(tmp_path):
    """A resume rebuilds the frozen reference (--beta's KL penalty, the fpa_* objectives) from the warm start; a
    warm start with other weights (here: the cache file replaced, as another machine's retrained one would be)
    is refused instead of silently changing the KL term (found by fuzzing: the resumed run's kl was 0.028
    instead of 8e-11, without an error)."""
    from safetensors.torch import load_file, save_file
    sft = SFTConfig(max_steps=2, check_every=2, check_size=8, batch_size=8, pool_size=200)
    cfg = TrainConfig(cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=1, beta=0.5, sft=sft,
                                                             save_model=False))
    loop.train(cfg.replace(out_dir=str(tmp_path / "a")))
    st = torch.load(tmp_path / "a" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert isinstance(st["ref_fingerprint"], str)
    recs = loop.train(cfg.replace(out_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-1")))
    assert [r["step"] for r in recs] == [0, 1, 2]                        # the same warm start resumes
    (f,) = (tmp_path / "c").glob("*.safetensors")
    save_file({k: v + 0.05 for k, v in load_file(f).items()}, f, metadata={"sft_steps": "2", "sft_acc": "0.0"})
    with pytest.raises(ValueError, match="reference policy .* differs"):
        loop.train(cfg.replace(out_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-1")))
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "records.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_resume_refuses_a_checkpoint_past_steps(tmp_path):
    """--steps may grow on resume, not shrink below the checkpoint's step (found by fuzzing: --steps 3 from
    checkpoint-5 ran nothing and ended 'successfully' with the 5-step model, records and final model)."""
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=3, save_steps=3))
    loop.train(cfg)
    with pytest.raises(ValueError, match="at step 3, past --steps 2"):
        loop.train(cfg.replace(resume="latest", steps=2))
    assert len((out / "records.jsonl").read_text().splitlines()) == 4          # left as it was
    assert [r["step"] for r in loop.train(cfg.replace(resume="latest"))] == [0, 1, 2, 3]   # same steps: a no-op


def test_resume_sets_later_checkpoints_aside(tmp_path):
    """A resume from an earlier checkpoint replaces the continuation after it (records.jsonl restarts there);
    that continuation's later checkpoints are renamed ``.abandoned``, so a later ``--resume latest`` (after a
    crash of the new continuation) cannot pick one of them up (found by fuzzing)."""
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=3, save_steps=1))
    loop.train(cfg)
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    loop.train(cfg.replace(resume=str(out / "checkpoint-1"), save_steps=0))    # no new checkpoints
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2.abandoned",
                                                                "checkpoint-3.abandoned"]
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert [json.loads(x)["step"] for x in (out / "records.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.parametrize("damage,what", [
    (lambda d: (d / "engine.pt").write_bytes((d / "engine.pt").read_bytes()[:1000]), "model and optimizer"),
    (lambda d: (d / "rng_rank0.pt").unlink(), "rng_rank0.pt"),
    (lambda d: (d / "config.json").write_text('{"train": '), "config.json"),
    (lambda d: (d / "trainer_state.pt").write_bytes(b"not a torch file"), "trainer_state.pt"),
    (lambda d: torch.save({"world_size": 1, "step": 2}, d / "trainer_state.pt"),
     "trainer_state.pt .it has no backward_passes, optimizer_steps"),
    (lambda d: (d / "records.jsonl").write_text('{"step": 0}\n{"step"\n'), "records.jsonl")])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, damage, what):
    """A damaged checkpoint file is a one-line error naming it (exit 2 from the CLI), not a traceback from deep
    inside torch.load or json (found by fuzzing: a truncated engine.pt gave a raw traceback, exit 1)."""
    out = tmp_path / "o"
    cfg = TrainConfig(out_dir=str(out), cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=2))
    loop.train(cfg)
    damage(out / "checkpoint-2")
    with pytest.raises(ValueError, match=f"--resume .*{what}"):
        loop.train(cfg.replace(resume=str(out / "checkpoint-2"), steps=3))


@pytest.mark.parametrize("saved, now", [(2048, None), (None, 2048), (2048, 2048), (None, None)])
def test_resume_across_the_val_size_default(tmp_path, saved, now):
    """val_size None (the default: 2048 prompts, or the whole val split when it holds fewer) and an explicit 2048
    pick the same validation set in every run that can start (an explicit 2048 that the split cannot fill is
    refused), so a checkpoint recorded with either resumes with the other: checkpoints written while 2048 was the
    default stay resumable. Other sizes are still refused."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(val_size=saved))))
    train = dataclasses.asdict(TrainConfig(val_size=now))
    ckpt.check_config(str(ck), train)
    with pytest.raises(ValueError, match="now 2047"):
        ckpt.check_config(str(ck), dict(train, val_size=2047))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc (Linux)")
def test_checkpoint_is_flushed_to_disk_before_it_is_renamed(tmp_path, monkeypatch):
    """Every file and folder of ``checkpoint-<N>.tmp`` is fsync-ed before the rename to ``checkpoint-<N>``, and
    the parent folder after it: otherwise a power loss or an OS crash can leave a renamed folder of empty or
    partial files, which ``--resume latest`` picks (the old code flushed nothing)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = os.path.realpath(tmp_path / "o")
    loop.train(TrainConfig(out_dir=out, cache_dir=str(tmp_path / "c"), **dict(TINY, steps=2, save_steps=2)))
    final = os.path.join(out, "checkpoint-2")
    i = events.index(("replace", final + ".tmp", final))
    flushed = {e[1] for e in events[:i] if e[0] == "fsync"}
    names = [os.path.relpath(os.path.join(r, n), final) for r, ds, fs in os.walk(final) for n in fs + ds]
    assert {"engine.pt", "trainer_state.pt", "rng_rank0.pt", "records.jsonl", "config.json"} <= set(names)
    for rel in names + ["."]:
        assert os.path.normpath(os.path.join(final + ".tmp", rel)) in flushed, rel
    assert ("fsync", out) in events[i + 1:]



@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc (Linux)")
def test_fsync_refused_on_a_folder_is_not_an_error_but_on_a_file_it_is(tmp_path, monkeypatch):
    """Some filesystems (network mounts, FUSE) refuse fsync on a folder (EINVAL): the save goes on, its files
    were flushed. A file whose fsync fails (EIO: its data may not be on disk) still fails the save, and the
    previous checkpoint folder stays."""
    import errno
    real_fsync = os.fsync

    def folder_refuses(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)
    src, final = tmp_path / "ck.tmp", tmp_path / "ck"
    src.mkdir()
    (src / "a.pt").write_bytes(b"x")
    monkeypatch.setattr(os, "fsync", folder_refuses)
    ckpt.replace_dir(str(src), str(final))
    assert (final / "a.pt").read_bytes() == b"x" and not src.exists()

    def file_fails(fd):
        if not os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)
    src.mkdir()
    (src / "a.pt").write_bytes(b"y")
    monkeypatch.setattr(os, "fsync", file_fails)
    with pytest.raises(OSError, match="Input/output"):
        ckpt.replace_dir(str(src), str(final))
    assert (final / "a.pt").read_bytes() == b"x"


_KILLED_SAVE = """
import io, os, signal, sys, torch
from gxpo_kernels.trainer import loop
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig

def fake(cfg, rewards, entropy, fade_ctl, mean_reward=None):     # as the random_advantages fixture
    st = None if fade_ctl is None else fade_ctl.update(float(rewards.mean()) + 0.3, entropy)
    return torch.randn(rewards.shape), st
loop.compute_advantages = fake
real_save = torch.save

def save(obj, f, *a, **k):   # checkpoint-2's trainer_state.pt: half of it reaches the disk, then SIGKILL
    if str(f).endswith(os.path.join("checkpoint-2.tmp", "trainer_state.pt")):
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
loop.train(TrainConfig(out_dir=sys.argv[1], cache_dir=sys.argv[2], steps=3, prompts=4, group=4, val_every=4,
                       val_size=16, pass1_size=4, pass1_n=2, hidden=32, quiet=True, save_steps=1, save_model=False,
                       sft=SFTConfig(max_steps=0)))
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, random_advantages):
    """A process killed (SIGKILL: no cleanup runs) halfway through writing checkpoint-2's trainer_state.pt leaves
    checkpoint-1 as the latest finished checkpoint and the half-written one as ``checkpoint-2.tmp``, which
    ``--resume`` refuses by name; resuming ``latest`` then ends exactly like an uninterrupted run."""
    import subprocess
    import sys
    kw = dict(TINY, steps=3, save_steps=1, save_model=False)
    base = TrainConfig(cache_dir=str(tmp_path / "c"), **kw)
    ref = loop.train(base.replace(out_dir=str(tmp_path / "full")))
    out = tmp_path / "cut"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(loop.__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out), str(tmp_path / "c")], env=env, timeout=300,
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert (out / "checkpoint-2.tmp" / "engine.pt").exists() and not (out / "checkpoint-2").exists()
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        loop.train(base.replace(out_dir=str(out), resume=str(out / "checkpoint-2.tmp")))
    records = loop.train(base.replace(out_dir=str(out), resume="latest"))
    assert _strip(records) == _strip(ref)
    _assert_same(_pt_files(str(tmp_path / "full" / "checkpoint-3"))["engine.pt"],
                 _pt_files(str(out / "checkpoint-3"))["engine.pt"])


@pytest.mark.parametrize("extra", [
    dict(algo="grpo"), dict(algo="grpo_epochs", epochs=2), dict(algo="gxpo", advantage="fade", gxpo_gate="window"),
    dict(algo="gxpo", gxpo_gate="none", beta=0.1), dict(algo="sfpo", sfpo_entropy_signal="slow_pass"),
    dict(algo="fpa_dpo"), dict(algo="fpa_kto", advantage="fade")])
def test_resume_is_bit_exact_for_every_method(tmp_path, random_advantages, extra):
    """3 steps + a crash after step 4 + resume from checkpoint-3 + the rest == 6 straight steps, for the methods
    and options the 10-step test above does not run: the records, and checkpoint-6's parameters, optimizer
    state, rule + gate state, FADE state, counters and RNG states, bit for bit."""
    base = TrainConfig(cache_dir=str(tmp_path / "c"), **dict(TINY, steps=6, save_steps=3, val_every=2,
                                                             save_model=False), **extra)
    ref = loop.train(base.replace(out_dir=str(tmp_path / "full")))

    def crash_after_4(rec):
        if rec["step"] == 4:
            raise Crash
    out = str(tmp_path / "cut")
    with pytest.raises(Crash):
        loop.train(base.replace(out_dir=out), progress=crash_after_4)
    torch.manual_seed(999)
    assert _strip(loop.train(base.replace(out_dir=out, resume="latest"))) == _strip(ref)
    a, b = _pt_files(str(tmp_path / "full" / "checkpoint-6")), _pt_files(os.path.join(out, "checkpoint-6"))
    a["trainer_state.pt"].pop("wall_clock"), b["trainer_state.pt"].pop("wall_clock")
    _assert_same(a, b)
    assert (a["trainer_state.pt"]["fade"] is None) == (extra.get("advantage") != "fade")


def test_deepspeed_config_check_names_nested_keys_and_spares_old_checkpoints(tmp_path):
    """``check_config`` with the engine's DeepSpeed config: a changed nested key (the ZeRO stage), an added one
    and a removed one are each named with both values; logging keys may change; a checkpoint without
    deepspeed_config.json (written before it existed) is not checked."""
    train = dataclasses.asdict(TrainConfig(deepspeed="a.json"))
    (tmp_path / "config.json").write_text(json.dumps(train))
    saved = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True},
             "gradient_clipping": 1.0, "steps_per_print": 10}
    ckpt.check_config(str(tmp_path), dict(train, deepspeed="b.json"), dict(saved, gradient_clipping=0.1))  # old
    (tmp_path / ckpt.DS_CONFIG_FILE).write_text(json.dumps(saved))
    ckpt.check_config(str(tmp_path), train, dict(saved, steps_per_print=1, wandb={"enabled": True}))
    new = dict(saved, zero_optimization={"stage": 3, "overlap_comm": True}, fp16={"enabled": True})
    del new["gradient_clipping"]
    with pytest.raises(ValueError) as e:
        ckpt.check_config(str(tmp_path), train, new)
    msg = str(e.value)
    for part in ("deepspeed config zero_optimization.stage=2 (now 3)", "fp16.enabled='<absent>' (now True)",
                 "gradient_clipping=1.0 (now '<absent>')"):
        assert part in msg, msg
    assert "overlap_comm" not in msg and "bf16" not in msg
