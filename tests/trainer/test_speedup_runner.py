"""Guards the speedup runner's bookkeeping and the report's integrity checks.

- runs.json lists every run with its status and steps recorded vs configured; a second run into the same
  folder is refused, --resume reruns only what is not complete, --overwrite leaves no stale method behind;
- the report reads only what runs.json lists: foreign subfolders are flagged and ignored, an interrupted run
  is refused (or, when allowed, flagged in results.json and the table);
- the measured cost uses one shared rollout figure for every method (median over all runs).
"""
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

import gxpo_kernels
from gxpo_kernels.trainer import report, speedup, stats
from gxpo_kernels.trainer.config import preset


def _cfg(out, methods=("grpo", "gxpo")):
    cfg = preset("test")
    return dataclasses.replace(cfg, methods=methods, out_dir=str(out), workers=0,
                               train=cfg.train.replace(quiet=True, cache_dir=str(out.parent / "cache")))


def test_index_resume_overwrite_and_report_integrity(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = speedup.run_speedup(_cfg(out), progress=False, log=lambda s: None)
    index = json.loads((out / "runs.json").read_text())
    assert index["status"] == "complete" and index["workers"] == 0
    code = index["code"]                      # in a git checkout the commit is recorded, else None
    in_git = (pathlib.Path(gxpo_kernels.__file__).resolve().parents[1] / ".git").exists()
    assert code["version"] == gxpo_kernels.__version__
    assert (len(code["git_commit"] or "") == 40) == in_git and isinstance(code["git_dirty"], bool) == in_git
    for m in ("grpo", "gxpo"):
        e = index["runs"][m]["0"]
        assert (e["status"], e["steps_recorded"], e["steps_configured"]) == ("complete", 3, 3)
        assert e["cpu_seconds"] > 0
    with pytest.raises(ValueError, match="not empty"):
        speedup.run_speedup(_cfg(out), progress=False, log=lambda s: None)

    # interrupt gxpo: keep step 0 and 1 only, as a killed run leaves it
    f = out / "gxpo" / "seed0" / "records.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:2]))
    index["runs"]["gxpo"]["0"]["status"] = "interrupted"
    (out / "runs.json").write_text(json.dumps(index))
    (out / "stale_method" / "seed0").mkdir(parents=True)           # a folder runs.json does not list
    with pytest.raises(ValueError, match=r"gxpo seed 0: incomplete \(1 of 3 steps"):
        report.load_index_runs(out)
    runs, problems = report.load_index_runs(out, strict=False)
    assert set(runs) == {"grpo", "gxpo"} and any("stale_method" in p for p in problems)
    assert report.main([str(out), "--no-plot", "--n-boot", "20"]) == 2
    # reporting only the complete methods is allowed; the left-out ones are named
    only, notes = report.load_index_runs(out, methods=["grpo"])
    assert set(only) == {"grpo"} and any("gxpo: left out of the report (0/1 runs complete)" in n for n in notes)
    with pytest.raises(ValueError, match="not in this run"):
        report.load_index_runs(out, methods=["sfpo"])
    assert report.main([str(out), "--no-plot", "--n-boot", "20", "--allow-incomplete"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert any("incomplete" in p for p in res["meta"]["problems"])
    assert "PROBLEM" in report.format_table(res) and "PROBLEM" in report.markdown_table(res)

    # --resume reruns only the interrupted run (and names the other code that made the kept runs)
    idx = json.loads((out / "runs.json").read_text())
    earlier = dict(idx["code"], git_commit="0" * 40)
    (out / "runs.json").write_text(json.dumps(dict(idx, code=earlier)))
    ran = []
    real = speedup._run_job
    monkeypatch.setattr(speedup, "_run_job", lambda tc, job: ran.append(job) or real(tc, job))
    again = speedup.run_speedup(_cfg(out), progress=False, log=lambda s: None, resume=True)
    assert ran == ["gxpo seed 0"]
    assert json.loads((out / "runs.json").read_text())["code_earlier"] == earlier
    assert again["runs"]["grpo"][0] == first["runs"]["grpo"][0]
    assert len(again["runs"]["gxpo"][0]) == 4
    assert report.load_index_runs(out, strict=True)[0].keys() == {"grpo", "gxpo"}
    # a run marked complete whose records.jsonl was cut short since is rerun, not kept (found by fuzzing: it was
    # kept and reported from its truncated curve without a problem note)
    g = out / "grpo" / "seed0" / "records.jsonl"
    g.write_text("".join(g.read_text().splitlines(keepends=True)[:2]))
    ran.clear()
    again = speedup.run_speedup(_cfg(out), progress=False, log=lambda s: None, resume=True)
    assert ran == ["grpo seed 0"] and len(again["runs"]["grpo"][0]) == 4
    assert [r.get("val") for r in again["runs"]["grpo"][0]] == [r.get("val") for r in first["runs"]["grpo"][0]]
    # --resume with another config is refused
    other = _cfg(out)
    other = dataclasses.replace(other, train=other.train.replace(lr=2e-5))
    with pytest.raises(ValueError, match="differs in lr"):
        speedup.run_speedup(other, progress=False, log=lambda s: None, resume=True)

    # --overwrite with fewer methods: nothing of the old run survives into the report
    speedup.run_speedup(_cfg(out, ("grpo",)), progress=False, log=lambda s: None, overwrite=True)
    assert not (out / "gxpo").exists() and not (out / "stale_method").exists()
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"grpo"}


def test_interrupted_resume_leaves_no_earlier_report(tmp_path, monkeypatch):
    """A --resume that adds a method and is interrupted leaves runs.json (interrupted) and no results.json /
    speedup.png: the earlier run's report (grpo only, its index "complete") used to stay beside it."""
    out = tmp_path / "run"
    speedup.run_speedup(_cfg(out, ("grpo",)), progress=False, log=lambda s: None)
    assert (out / "results.json").exists() and (out / "speedup.png").exists()
    real = speedup._run_job

    def job(tc, name):
        if name.startswith("gxpo"):
            raise KeyboardInterrupt
        return real(tc, name)
    monkeypatch.setattr(speedup, "_run_job", job)
    with pytest.raises(KeyboardInterrupt):
        speedup.run_speedup(_cfg(out, ("grpo", "gxpo")), progress=False, log=lambda s: None, resume=True)
    assert json.loads((out / "runs.json").read_text())["status"] == "interrupted"
    assert not (out / "results.json").exists() and not (out / "speedup.png").exists()
    monkeypatch.setattr(speedup, "_run_job", real)
    again = speedup.run_speedup(_cfg(out, ("grpo", "gxpo")), progress=False, log=lambda s: None, resume=True)
    assert set(json.loads((out / "results.json").read_text())["methods"]) == set(again["runs"]) == {"grpo", "gxpo"}


@pytest.mark.parametrize("text", ["{oops", json.dumps({"train": 5}), json.dumps({"runs": {}}),
                                  json.dumps([1, 2])])
def test_resume_with_a_damaged_runs_json_is_one_clear_error(tmp_path, text):
    """--resume into a folder whose runs.json is not one (bad JSON, another structure) names the file; it was a
    bare JSON message or a TypeError traceback. Nothing in the folder changes."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "runs.json").write_text(text)
    (out / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="runs.json.*not a runs.json written by gxpo-kernels speedup"):
        speedup.run_speedup(_cfg(out), progress=False, log=lambda s: None, resume=True)
    assert (out / "runs.json").read_text() == text and (out / "results.json").read_text() == "{}"


def _recs(n, roll, bwd, upd_rest, bp=1):
    out = [{"step": 0, "val": {"greedy_acc": 0.1}, "backward_passes": 0, "optimizer_steps": 0}]
    for s in range(1, n + 1):
        out.append({"step": s, "backward_passes": s * bp, "optimizer_steps": s, "wall_clock": 9.0 * s,
                    "t_rollout": 5.0, "t_backward": 5.0, "t_optimizer": 5.0,
                    "cpu_rollout": roll[s - 1], "cpu_backward": bwd * bp, "cpu_update": bwd * bp + upd_rest,
                    "val": {"greedy_acc": 0.1 + 0.01 * s}})
    return out


def test_shared_rollout_cost_and_cpu_clock(tmp_path):
    # method A's rollouts were slowed by a neighbour (0.9 s); B's were not (0.1 s): same work, one figure
    a = _recs(4, [0.9, 0.9, 0.9, 0.9], bwd=0.2, upd_rest=0.05, bp=3)
    b = _recs(4, [0.1, 0.1, 0.1, 0.1], bwd=0.2, upd_rest=0.05)
    c = _recs(4, [0.1, 0.1, 0.1, 0.1], bwd=0.2, upd_rest=0.05)
    assert stats.cost_clock([a, b, c]) == "cpu"
    t = stats.shared_rollout_time([a, b, c], "cpu")
    assert t == pytest.approx(0.1)
    cm = stats.cost_model([a], "cpu", t)
    assert cm["t_roll"] == pytest.approx(0.1) and cm["t_roll_own"] == pytest.approx(0.9)
    assert cm["t_bp"] == pytest.approx(0.2) and cm["t_opt"] == pytest.approx(0.05) and cm["clock"] == "cpu"
    # cost at step 2: 2 * shared rollout + A's own updates (2 * (3 * 0.2 + 0.05))
    assert stats.cost_curve(a, [0, 2], "cpu", t).tolist() == pytest.approx([0.0, 0.2 + 2 * 0.65])
    # a record without the CPU keys: the wall clock for everything, named as such
    d = _recs(4, [0.1] * 4, bwd=0.2, upd_rest=0.05)
    del d[2]["cpu_rollout"]
    assert stats.cost_clock([a, d]) == "wall"
    res = report.build_report({"grpo": {0: b}, "m": {0: a}, "c": {0: c}}, tmp_path, plot=False, n_boot=10)
    meta = res["meta"]
    assert meta["cost_clock"] == "cpu" and "process CPU time" in meta["clocks"]["ratio_cost"]
    assert meta["shared_rollout_time"] == pytest.approx(0.1)


@pytest.mark.parametrize("scores, rising", [
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], True),                 # climbing to the end
    ([0.1, 0.4, 0.5, 0.52, 0.5, 0.51, 0.5, 0.52, 0.51], False),  # flat: best at the end but no trend
    ([0.1, 0.5, 0.6, 0.6, 0.55, 0.56, 0.55], False),             # peaked earlier
    ([0.1, 0.2, 0.3], True),                                     # too short to tell
    ([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3], False),                # level at its best since before the last 3
    ([0.2, 0.5, 0.3, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5], False),    # its best first reached early: a tie later is no peak
])
def test_still_rising(scores, rising):
    steps = list(range(0, 10 * len(scores), 10))
    assert stats.still_rising(steps, scores, tol=0.005)["rising"] is rising


def test_late_trend_separates_a_plateau_from_a_creep():
    """Same noise, same first half: a curve level over its second half has a gain near 0 and |t| small; one
    still creeping by 0.04 over it has that gain back (within noise) and a large t; the share is of best − first."""
    rng = np.random.default_rng(0)
    steps = np.arange(0, 610, 10)
    rise = 0.4 + 0.3 * (1 - np.exp(-steps / 60))
    noise = rng.normal(0, 0.01, steps.size)
    level = np.minimum(rise, 0.69) + noise
    creeping = level + np.clip(steps - 300, 0, None) * (0.04 / 300)
    flat, creep = stats.late_trend(steps, level), stats.late_trend(steps, creeping)
    assert flat["points"] == creep["points"] == 31 and flat["from_step"] == 300
    assert abs(flat["gain"]) < 0.01 and abs(flat["t"]) < 2.5
    assert creep["gain"] == pytest.approx(0.04, abs=0.012) and creep["t"] > 5
    assert creep["share"] == pytest.approx(creep["gain"] / (creeping.max() - creeping[0]), rel=1e-9)
    assert stats.late_trend(steps[:3], rise[:3])["gain"] is None   # too few points for a slope and its error


def test_resume_keeps_grpo_lr_multiplier(tmp_path, monkeypatch):
    """Kept grpo_lr runs fix the lr multiplier: a resume that adds seeds runs the new grpo_lr seeds at the kept
    runs' multiplier even when the GXPO runs would now measure another one, and a different --lr_mult is refused
    before any work (found by fuzzing: the new seeds ran at the re-measured value, runs.json named only it)."""
    out = tmp_path / "run"
    speedup.run_speedup(_cfg(out, ("grpo", "gxpo", "grpo_lr")), progress=False, log=lambda s: None)
    kept = json.loads((out / "runs.json").read_text())["lr_mult"]
    with pytest.raises(ValueError, match="kept grpo_lr runs used lr x"):
        speedup.run_speedup(dataclasses.replace(_cfg(out, ("grpo", "gxpo", "grpo_lr")), lr_mult=kept + 1.5),
                            progress=False, log=lambda s: None, resume=True)
    monkeypatch.setattr(speedup, "measured_multiplier", lambda runs: (kept + 0.5, "gxpo"))   # GXPO seed 1 moves it
    speedup.run_speedup(dataclasses.replace(_cfg(out, ("grpo", "gxpo", "grpo_lr")), seeds=(0, 1)), progress=False,
                        log=lambda s: None, resume=True)
    index = json.loads((out / "runs.json").read_text())
    used = [json.loads((out / "grpo_lr" / f"seed{s}" / "config.json").read_text())["train"]["lr_mult"]
            for s in (0, 1)]
    assert used == [kept, kept] and index["lr_mult"] == kept


@pytest.mark.parametrize("k", [4, 5, 8, 13, 40])
def test_late_trend_points_on_a_line_have_no_t(k):
    """Points exactly on a line (a level one included) have no t statistic (None), whatever the float rounding
    of their mean (found by fuzzing: 0.1 + 0.01 i gave t ~ 1e15, a constant 0.1 gave t = 0.0)."""
    steps = np.arange(k) * 10
    for y in (0.1 + 0.01 * np.arange(k), np.full(k, 0.1), np.full(k, 1 / 3)):
        got = stats.late_trend(steps, y, 1.0)
        assert got["t"] is None and got["gain"] == pytest.approx(y[-1] - y[0], abs=1e-12)


def test_in_process_runs_use_threads_and_record_their_arithmetic(tmp_path, monkeypatch):
    """--workers 0 runs every run in this process with --threads torch threads, as a worker does, and restores the
    caller's count after; each run's entry in runs.json names the ATen kernels and threads it computed with. The
    runs used to keep the caller's thread count (other arithmetic: other losses and curves than --workers 1)
    while runs.json said threads 1 and recorded no kernels."""
    import torch

    from gxpo_kernels.trainer import loop
    seen = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda tc, **kw: seen.append(torch.get_num_threads()) or real(tc, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "run"
        speedup.run_speedup(dataclasses.replace(_cfg(out, ("grpo",)), threads=1), progress=False,
                            log=lambda s: None)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    index = json.loads((out / "runs.json").read_text())
    e = index["runs"]["grpo"]["0"]
    assert (e["torch_threads"], e["cpu_capability"]) == (1, torch.backends.cpu.get_cpu_capability())
    assert set(index["env"]) == set(speedup.REPRODUCIBLE_ENV)   # as found in the environment (not set in-process)
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["runs"]["runs"]["grpo"]["0"]["torch_threads"] == 1


def test_cuda_records_are_costed_on_the_wall_clock(tmp_path):
    """Records from CUDA (they carry gpu_update) are costed on the synced wall clock: process CPU time sees a GPU
    pass's launch, not its work, so a method's extra passes looked nearly free. Measured and projected costs used
    the CPU clock there, and docs/speedup.md pointed at "wall-clock projections" that results.json did not hold."""
    def on_gpu(recs, t_bwd):
        for r in recs[1:]:   # the host spends little CPU per pass; the GPU's time is in the synced wall clock
            r.update(gpu_rollout=0.1, gpu_update=t_bwd, t_backward=t_bwd, t_optimizer=0.01, t_rollout=0.1,
                     cpu_backward=0.001 * r["backward_passes"] / r["step"], cpu_update=0.002)
        return recs
    g = on_gpu(_recs(4, [0.01] * 4, bwd=0.001, upd_rest=0.001), 0.2)
    m = on_gpu(_recs(4, [0.01] * 4, bwd=0.001, upd_rest=0.001, bp=3), 0.6)
    assert stats.cost_clock([g, m]) == "wall"
    res = report.build_report({"grpo": {0: g}, "m": {0: m}}, tmp_path, plot=False, n_boot=10)
    assert res["meta"]["cost_clock"] == "wall" and res["methods"]["m"]["cost_model"]["t_bp"] == pytest.approx(0.2)
    assert stats.cost_clock([_recs(4, [0.1] * 4, bwd=0.2, upd_rest=0.05)]) == "cpu"   # CPU records: CPU time


def test_worker_environment_is_the_callers_again_after_the_run(tmp_path, monkeypatch):
    """The kernel caps and thread counts go to the workers and leave the caller's environment as it was: they
    stayed set (setdefault) after the run, so a second run in the same process with another --threads recorded and
    spawned with the first run's OMP_NUM_THREADS, and every later subprocess inherited the caps. A value the caller
    set still wins."""
    import platform
    for k in speedup.REPRODUCIBLE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    out = tmp_path / "run"
    speedup.run_speedup(dataclasses.replace(_cfg(out, ("grpo",)), workers=1, threads=2), progress=False,
                        log=lambda s: None)
    assert [k for k in speedup.REPRODUCIBLE_ENV if k in os.environ] == ["MKL_CBWR"]
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    index = json.loads((out / "runs.json").read_text())
    assert index["env"] == dict(speedup.REPRODUCIBLE_ENV, MKL_CBWR="COMPATIBLE", OMP_NUM_THREADS="2",
                                MKL_NUM_THREADS="2")
    e = index["runs"]["grpo"]["0"]
    assert e["torch_threads"] == 2
    if platform.machine().lower() in ("x86_64", "amd64"):   # the worker computed with the capped kernels
        assert e["cpu_capability"] == "AVX2"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failed_set_up_leaves_the_callers_process_as_it_was(tmp_path, monkeypatch, workers):
    """The runner changes the SIGTERM handler, the environment (workers) or torch's thread count (in-process)
    before its progress bars exist; a failure there (tqdm missing, a pool that cannot start) left them changed:
    SIGTERM raised KeyboardInterrupt in the caller from then on, and the caller kept the run's thread count."""
    import signal

    import torch

    def broken(*a, **k):
        raise RuntimeError("no progress bars")
    monkeypatch.setattr(speedup, "_Progress", broken)
    for k in speedup.REPRODUCIBLE_ENV:
        monkeypatch.delenv(k, raising=False)
    env, threads, term = dict(os.environ), torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="no progress bars"):
        speedup.run_speedup(dataclasses.replace(_cfg(tmp_path / "run", ("grpo",)), workers=workers,
                                                threads=threads + 1), progress=False, log=lambda s: None)
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    assert signal.getsignal(signal.SIGTERM) is term


_INTERRUPT_SCRIPT = """
import dataclasses, json, sys
from gxpo_kernels.trainer import speedup
from gxpo_kernels.trainer.config import preset
out = sys.argv[1]
cfg = preset("test")
cfg = dataclasses.replace(cfg, methods=("grpo",), out_dir=out, workers=1, train=cfg.train.replace(
    quiet=True, steps=100000, val_every=100000, cache_dir=out + "-cache"))

def interrupt(self, msg):   # the runner alone is interrupted (kill PID), its worker is not
    if msg[0] == "rec" and msg[2] >= 2:
        raise KeyboardInterrupt

speedup._Progress.__call__ = interrupt
try:
    speedup.run_speedup(cfg, progress=False, log=lambda s: None)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_an_interrupted_runner_stops_its_workers(tmp_path):
    """A signal to the runner alone (``kill PID``, which the runner takes as Ctrl-C) stops the runs in flight at
    their next step. The runner used to wait for the workers to finish their runs (minutes at the default
    preset), and forever once their progress messages filled the queue's pipe, which nothing read any more."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(gxpo_kernels.__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPT_SCRIPT, str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)   # the runner and its worker
        p.communicate()
        pytest.fail("the interrupted runner did not stop its worker's 100000-step run")
    assert p.returncode == 0 and "interrupted" in stdout, stderr
    index = json.loads((out / "runs.json").read_text())
    assert index["status"] == "interrupted" and index["runs"]["grpo"]["0"]["status"] == "interrupted"
    steps = [json.loads(line)["step"] for line in (out / "grpo" / "seed0" / "records.jsonl").read_text().splitlines()]
    assert 2 <= max(steps) < 1000


def test_progress_bars_start_with_their_runs():
    """Every run's bar is drawn when the runner starts; a run that waits for a worker counted the wait as its
    elapsed time (and in its rate and ETA: 'sfpo seed 0: 1/10 [00:29<04:23, 29.26s/it]' in a smoke run whose
    steps took ~2 s). The clock of a bar starts at its run's first record."""
    import time
    bars = speedup._Progress({"grpo seed 0": 10, "gxpo seed 0": 10}, enabled=True, log=lambda s: None)
    try:
        time.sleep(0.5)                                   # gxpo waits for a worker
        bars(("rec", "gxpo seed 0", 0, 0.25))
        bars(("rec", "gxpo seed 0", 1, None))
        bar = bars.bars["gxpo seed 0"]
        assert bar.n == 1 and bar.format_dict["elapsed"] < 0.4
        assert bars.bars["grpo seed 0"].format_dict["elapsed"] >= 0.5   # not started: its clock is untouched
    finally:
        bars.close()


def test_resume_across_the_val_size_default(tmp_path):
    """A runs.json written while 2048 was val_size's default resumes under today's default (None: the same 2048
    prompts wherever an explicit 2048 can run); another size is still 'another config'."""
    from gxpo_kernels.trainer.config import TrainConfig
    (tmp_path / "runs.json").write_text(json.dumps({"train": dataclasses.asdict(TrainConfig(val_size=2048)),
                                                    "runs": {}}))
    assert speedup._completed_from_index(str(tmp_path), dataclasses.asdict(TrainConfig()), ["grpo"], [0]) == {}
    with pytest.raises(ValueError, match="another config .differs in val_size"):
        speedup._completed_from_index(str(tmp_path), dataclasses.asdict(TrainConfig(val_size=2047)), ["grpo"], [0])
