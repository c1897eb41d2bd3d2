"""Speedup-to-peak runner: every method x seed from one shared warm start, in parallel worker processes.

Layout of the output folder::

    <out>/runs.json                       what ran: the code (version, git commit), config, methods, seeds, per
                                          run its status, steps recorded vs configured, wall and CPU seconds;
                                          the lr multiplier; the warm start
    <out>/<method>/seed<k>/records.jsonl  per-step records (method names kept as given, e.g. gxpo+fade)
    <out>/<method>/seed<k>/config.json
    <out>/results.json, speedup.png       written by ``report.build_report`` (rebuild: ``report.main``)

Runs are independent, so they go to a process pool (``spawn``; one torch thread per worker: the tiny policy
gains nothing from a second thread, and a fixed thread count keeps the arithmetic the same everywhere). The warm
start runs first, once, in a worker; every run then loads it from the cache. The control ``grpo_lr`` is
submitted as soon as the runs of the method its learning-rate multiplier is measured from have finished: the
multiplier is the measured effective step multiplier of the GXPO runs (else SFPO's),
``stats.effective_step_multiplier``.

Reproducibility: while the workers start, ``REPRODUCIBLE_ENV`` is put in the environment (unless already set)
so every worker computes with the same ATen CPU kernels (AVX2) on any x86 machine; see docs/speedup.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Dict, Optional

from .config import SpeedupConfig, TrainConfig, parse_method, same_setting, saved_setting
from .stats import effective_step_multiplier
from .tasks import check_inputs

from .report import build_report, format_table  # noqa: F401  (format_table: re-exported for the CLI)

# ATen picks AVX-512 or AVX2 kernels by the CPU it runs on, and the two round differently (the toy's warm start
# and RL curves then differ between machines of the same kind); capping ATen at AVX2 makes every x86-64 machine
# with AVX2 run the same kernels. MKL (CNR mode) and oneDNN get the same cap, against their own CPU dispatch.
# Must be in the environment before torch is imported: workers are spawned with it.
REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def default_workers(device: str = "auto") -> int:
    """min(2, CPU cores) on CPU; 1 on CUDA (runs would share one GPU)."""
    from .model import pick_device
    if pick_device(device).type == "cuda":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def multiplier_source(methods) -> Optional[str]:
    """The method grpo_lr's multiplier is measured from: plain gxpo, else gxpo+adv, else sfpo, else sfpo+adv."""
    for want in ("gxpo", "sfpo"):
        for m in [m for m in methods if parse_method(m) == (want, "grpo")] + \
                 [m for m in methods if parse_method(m)[0] == want and parse_method(m)[1] != "grpo"]:
            return m
    return None


def measured_multiplier(runs: Dict[str, Dict[int, list]]) -> Optional[tuple]:
    """(multiplier, source method): the mean effective step multiplier of the source method's runs."""
    src = multiplier_source(list(runs))
    if src is None:
        return None
    kind = parse_method(src)[0]
    vals = [effective_step_multiplier(recs, kind) for recs in runs[src].values() if recs]
    return (sum(vals) / len(vals), src) if vals else None


def default_out_dir() -> str:
    return os.path.join("runs", "speedup-" + time.strftime("%Y%m%d-%H%M%S"))


OWN_FILES = ("runs.json", "records.jsonl", "config.json")
REPORT_FILES = ("results.json", "speedup.png")   # build_report's


def check_writable_dir(path: str, what: str) -> str:
    """Absolute ``path`` if it is a folder, or can be created as one, that this process can write; else
    ValueError naming ``what``."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path}: exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{what} {path}: {probe} is a file, not a folder")
    try:   # a real entry, not os.access: root passes that check on read-only file systems such as /proc
        tempfile.TemporaryDirectory(dir=probe, prefix=".gxpo-write-probe-").cleanup()
    except OSError as e:
        raise ValueError(f"{what} {path}: {probe} is not writable ({e.strerror or e})") from None
    return path


def code_version() -> dict:
    """The code a run used: the package version and, when it is imported from a git checkout, the commit and
    whether the working tree had changes (None when git or the checkout is not there)."""
    import subprocess
    from .. import __version__
    here = os.path.dirname(os.path.abspath(__file__))
    out = {"version": __version__, "git_commit": None, "git_dirty": None}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        out["git_commit"] = git("rev-parse", "HEAD")
        out["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def check_out_dir(path: str, *, overwrite: bool = False, resume: bool = False,
                  resume_option: str = "--resume") -> str:
    """Validate ``--out`` before any work; return its absolute path.

    Refuses a path under a file, a folder that cannot be created or written, and an existing non-empty folder
    unless ``overwrite`` (only a folder an earlier ``speedup``/``train`` wrote, i.e. one holding runs.json or
    records.jsonl: it is emptied) or ``resume`` (kept; also only such a folder). ``overwrite`` and ``resume``
    together are refused. ``resume_option``: how the command's error message spells the resume option."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other (--overwrite deletes the earlier runs, "
                         "--resume continues them): pass one")
    path = check_writable_dir(path, "--out")
    own = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in OWN_FILES)
    if resume and os.path.isdir(path) and os.listdir(path) and not own:
        raise ValueError(f"--out {path}: {resume_option} continues a folder written by gxpo-kernels (with "
                         "runs.json or records.jsonl); this one is not")
    if os.path.isdir(path) and os.listdir(path) and not resume:
        if not overwrite:
            raise ValueError(f"--out {path}: folder exists and is not empty (pass --overwrite to replace it, "
                             f"{resume_option} to continue it, or choose another folder)")
        if not own:
            raise ValueError(f"--out {path}: --overwrite only replaces a folder written by gxpo-kernels "
                             "(with runs.json or records.jsonl); this one is not")
        shutil.rmtree(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Jobs (run in worker processes; module-level so that ``spawn`` can import them)
# ---------------------------------------------------------------------------------------------------------
_QUEUE = None   # in a worker: the parent's progress queue (set by _init_worker)
_STOP = None    # in a worker: the parent's stop event, set when the runner is interrupted


def _init_worker(queue, threads: int = 1, stop=None) -> None:
    global _QUEUE, _STOP
    import torch
    torch.set_num_threads(threads)
    _QUEUE, _STOP = queue, stop


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler preempting the run, ``kill PID``): stops the run as Ctrl-C does; the CLI exits 143
    (128 + SIGTERM) instead of Ctrl-C's 130."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler: raise :class:`Terminated` where the main thread is."""
    raise Terminated()


def _check_stop() -> None:
    """In a worker: end the job (at its next record or log line) once the runner has been interrupted. A signal
    to the runner alone (``kill PID``) does not reach the workers, which used to finish their runs first."""
    if _STOP is not None and _STOP.is_set():
        raise KeyboardInterrupt("the speedup runner was interrupted")


def _warm_job(tc: TrainConfig) -> dict:
    from .loop import prepare_warm_start
    queue = _QUEUE

    def log(s):
        _check_stop()
        if queue is None:
            print(s)
        else:
            queue.put(("log", "setup", s))

    return prepare_warm_start(tc, log=log)


def _run_job(tc: TrainConfig, job: str) -> dict:
    from .loop import train
    queue = _QUEUE
    c0, t0 = time.process_time(), time.perf_counter()

    def on_record(rec):
        _check_stop()
        if queue is not None:
            queue.put(("rec", job, int(rec["step"]), (rec.get("val") or {}).get("greedy_acc")))

    log = (lambda s: queue.put(("log", job, s))) if queue is not None else print
    records = train(tc, progress=on_record, log=log)
    return {"records": records, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            **arithmetic()}


def arithmetic() -> dict:
    """What set this process's arithmetic: the ATen CPU kernels torch dispatches to and its thread count."""
    import torch
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


class _Progress:
    """One tqdm bar per run in the parent process, fed by the workers' messages. A bar's clock starts at its run's
    first record: every bar is drawn when the runner starts, and a run waiting for a worker showed the wait as
    elapsed time and in its rate and ETA."""

    def __init__(self, jobs: Dict[str, int], enabled: bool, log):
        from tqdm.auto import tqdm
        self.enabled, self.log, self.bars, self.acc, self.started = enabled, log, {}, {}, set()
        for i, (job, total) in enumerate(jobs.items()):
            self.bars[job] = tqdm(total=total, desc=f"{job:>20s}", position=i, disable=not enabled, leave=True,
                                  dynamic_ncols=True, mininterval=2.0)

    def __call__(self, msg) -> None:
        kind, job = msg[0], msg[1]
        if kind == "log":
            (self.bars[job].write if self.enabled and job in self.bars else self.log)(f"[{job}] {msg[2]}")
            return
        step, acc = msg[2], msg[3]
        bar = self.bars.get(job)
        if bar is None:
            return
        if job not in self.started:
            self.started.add(job)
            bar.reset()   # n = 0 (a run's first record is its step 0 or the step it resumes at) and the clock now
        if acc is not None:
            self.acc[job] = acc
            bar.set_postfix(acc=f"{acc:.3f}", refresh=False)
        if step > bar.n:
            bar.update(step - bar.n)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


# ---------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------
def _write_index(out_dir: str, index: dict) -> None:
    tmp = os.path.join(out_dir, f"runs.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "runs.json"))


def _completed_from_index(out_dir: str, base_train: dict, methods, seeds) -> Dict[tuple, dict]:
    """--resume: the complete runs of an earlier runs.json with the same config, as {(method, seed): entry}."""
    from .report import load_index_runs
    path = os.path.join(out_dir, "runs.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        saved = old["train"]
        keep = ("seed", "algo", "advantage", "out_dir", "lr_mult", "quiet")
        diff = sorted(k for k in base_train if k not in keep
                      and not same_setting(k, saved_setting(saved, k), base_train[k]))
        if not diff:
            runs, _ = load_index_runs(out_dir, strict=False)
            # complete = marked so *and* every update step still on disk (a records.jsonl cut short is rerun)
            return {(m, s): {"records": recs, **old["runs"][m][str(s)]} for m, seeds_ in runs.items()
                    for s, recs in seeds_.items() if m in methods and s in seeds
                    and old["runs"][m][str(s)].get("status") == "complete"
                    and sum(1 for r in recs if int(r.get("step", 0)) >= 1) == int(base_train["steps"])}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--resume: {path} is not a runs.json written by gxpo-kernels speedup "
                         f"({type(e).__name__}: {e}); use --overwrite or another --out") from None
    raise ValueError(f"--resume: {path} was written with another config (differs in {', '.join(diff)}); "
                     "use --overwrite or another --out")


def run_speedup(cfg: SpeedupConfig, *, progress: bool = True, log=print, report_flags: Optional[dict] = None,
                overwrite: bool = False, resume: bool = False) -> dict:
    """Run all methods x seeds; return ``{"results", "out_dir", "runs", "lr_mult", "seconds"}``.

    ``cfg.workers`` processes (0 = in this process, one run after another). Every check happens before the
    first run starts: the config, the methods, ``--out`` (see ``check_out_dir``)."""
    cfg.validate()
    check_inputs(cfg.train)   # reads --dataset and draws the validation set: before `overwrite` empties it
    out_dir = check_out_dir(cfg.out_dir or default_out_dir(), overwrite=overwrite, resume=resume)
    os.makedirs(out_dir, exist_ok=True)
    workers = default_workers(cfg.train.device) if cfg.workers is None else cfg.workers
    base = cfg.train
    base = base.replace(cache_dir=base.cache_dir or os.path.join(os.path.dirname(out_dir), ".warmstart-cache"))
    src = multiplier_source(cfg.methods)
    order = [m for m in cfg.methods if parse_method(m)[0] != "grpo_lr"]
    lr_methods = [m for m in cfg.methods if parse_method(m)[0] == "grpo_lr"]
    want = dict(REPRODUCIBLE_ENV, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    # workers start with these variables (a value already set wins), put in the environment only while they spawn;
    # this process's torch is already loaded, so with --workers 0 they change nothing and are only recorded as found
    # (each run's entry records the kernels and threads it really used)
    env = {k: os.environ.get(k, v) for k, v in want.items()} if workers else {k: os.environ.get(k) for k in want}
    index = {"code": code_version(), "methods": list(cfg.methods), "seeds": list(cfg.seeds),
             "train": dataclasses.asdict(base),
             "workers": workers, "threads": cfg.threads, "env": env, "runs": {m: {} for m in cfg.methods}, "lr_mult": None,
             "lr_mult_source": None, "warm_start": None, "status": "running"}
    done = _completed_from_index(out_dir, index["train"], cfg.methods, cfg.seeds) if resume else {}
    if done:   # keep what the earlier run measured for the runs kept
        with open(os.path.join(out_dir, "runs.json")) as f:
            old = json.load(f)
        for k in ("lr_mult", "lr_mult_source", "warm_start"):
            index[k] = old.get(k)
        if old.get("code") != index["code"]:   # the kept runs were made by other code: say so
            index["code_earlier"] = old.get("code")
    runs: Dict[str, Dict[int, list]] = {m: {} for m in cfg.methods}
    for (m, s), e in done.items():
        runs[m][s] = e.pop("records")
        index["runs"][m][str(s)] = e
    # kept grpo_lr runs fix the multiplier: every grpo_lr run of the folder must use the one runs.json reports
    # (re-measuring it over more GXPO seeds, or a new --lr_mult, would mix two multipliers in one method)
    mult = how = None
    if any(m in lr_methods for m, _ in done):
        mult, how = index["lr_mult"], index["lr_mult_source"]
        if mult is None:
            raise ValueError(f"--resume: {out_dir}/runs.json keeps complete grpo_lr runs but no lr_mult; "
                             "use --overwrite or another --out")
        if cfg.lr_mult is not None and float(cfg.lr_mult) != float(mult):
            raise ValueError(f"--resume: the kept grpo_lr runs used lr x {mult:g}, not --lr_mult "
                             f"{cfg.lr_mult:g}; drop --lr_mult (or give {mult:g}), or use --overwrite")
    todo = [(m, s) for m in order + lr_methods for s in cfg.seeds if (m, s) not in done]
    # priority: the multiplier's source, then the baseline, then grpo_lr (once it can start), then the rest
    rank = {m: i for i, m in enumerate([src, "grpo"] + lr_methods)}
    todo.sort(key=lambda ms: rank.get(ms[0], len(rank)))
    for m, s in todo:
        index["runs"][m][str(s)] = {"dir": os.path.join(out_dir, m, f"seed{s}"), "status": "pending",
                                    "steps_configured": base.steps, "steps_recorded": 0}
    for name in REPORT_FILES:   # rebuilt at the end: an earlier run's report must not sit beside this runs.json
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    _write_index(out_dir, index)

    t_start = time.perf_counter()
    # `kill` (SIGTERM) stops the runner like Ctrl-C, so runs.json says which runs were interrupted
    old_term = pool = queue = stop = threads_before = env_before = bars = None

    def submit(fn, *args):
        if pool is not None:
            return pool.submit(fn, *args)
        from concurrent.futures import Future
        f = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:   # noqa: BLE001 - re-raised by .result() below
            f.set_exception(e)
        return f

    def config_for(m, s, extra):
        algo, adv = parse_method(m)
        return base.replace(algo=algo, advantage=adv, seed=s, out_dir=os.path.join(out_dir, m, f"seed{s}"),
                            **extra)

    def drain(timeout: float):
        if queue is None:
            return
        import queue as _q
        try:
            bars(queue.get(timeout=timeout))
            while True:
                bars(queue.get_nowait())
        except _q.Empty:
            pass

    try:
        # what is changed here (the SIGTERM handler, the environment, torch's thread count) is put back by the
        # `finally` below, also when a later part of the set-up fails (the pool, the queue, the progress bars)
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, raise_terminated)
        if workers:
            env_before = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            ctx = multiprocessing.get_context("spawn")
            queue, stop = ctx.Queue(), ctx.Event()
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(queue, cfg.threads, stop))
        else:   # the runs go in this process: with --threads threads, as a worker's (restored at the end)
            import torch
            threads_before = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)
        bars = _Progress({f"{m} seed {s}": base.steps for m, s in todo}, progress, log)
        if todo:
            fut = submit(_warm_job, base)
            while not fut.done():
                drain(0.5)
            index["warm_start"] = fut.result()
            drain(0.0)
            log(f"warm start: {index['warm_start']}")
        pending = {}
        lr_ready = lambda: src is None or all(s in runs[src] for s in cfg.seeds)   # noqa: E731
        while todo or pending:
            # at most `workers` runs in flight, so grpo_lr can jump the queue once its multiplier is known
            while todo and len(pending) < max(workers, 1):
                nxt = next(((m, s) for m, s in todo if m not in lr_methods or lr_ready()), None)
                if nxt is None:
                    break
                todo.remove(nxt)
                m, s = nxt
                extra = {}
                if m in lr_methods:
                    if mult is None:
                        if cfg.lr_mult is not None:
                            mult, how = cfg.lr_mult, "given"
                        else:
                            got = measured_multiplier({src: runs[src]}) if src else None
                            mult, how = got if got is not None else (1.0, "none (no GXPO/SFPO run; lr x 1)")
                        index["lr_mult"], index["lr_mult_source"] = mult, how
                        log(f"grpo_lr: lr x {mult:.3f} (effective step multiplier from {how})")
                    extra = {"lr_mult": mult}
                pending[submit(_run_job, config_for(m, s, extra), f"{m} seed {s}")] = (m, s)
                index["runs"][m][str(s)]["status"] = "running"
                _write_index(out_dir, index)
            if not pending:
                raise RuntimeError(f"cannot schedule {todo}: the runs grpo_lr waits for are missing")
            finished, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
            drain(0.0 if finished else 0.5)
            for f in finished:
                m, s = pending.pop(f)
                got = f.result()   # a failed run stops the runner (the pool is shut down below)
                recs = got["records"]
                runs[m][s] = recs
                n = sum(1 for r in recs if int(r["step"]) >= 1)
                index["runs"][m][str(s)].update(
                    status="complete" if n == base.steps else "incomplete", steps_recorded=n,
                    seconds=got["seconds"], cpu_seconds=got["cpu_seconds"],
                    cpu_capability=got.get("cpu_capability"), torch_threads=got.get("torch_threads"),
                    warm_start=recs[0].get("warm_start") if recs else None)
                _write_index(out_dir, index)
    except BaseException:
        if stop is not None:   # the workers end their runs at the next step instead of finishing them
            stop.set()
        for m in index["runs"]:
            for e in index["runs"][m].values():
                if e["status"] in ("running", "pending"):
                    e["status"] = "interrupted"
        index["status"] = "interrupted"
        _write_index(out_dir, index)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if bars is not None:
            bars.close()
        if pool is not None:
            # a worker exits only once its queued messages are in the pipe: keep reading while they shut down
            # (after an interruption nothing read them, and a full pipe kept the runner waiting forever)
            closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True})
            closer.start()
            while closer.is_alive():
                if bars is not None:
                    drain(0.2)
                else:
                    closer.join(0.2)
            if bars is not None:
                drain(0.0)
        if queue is not None:
            queue.close()
        if threads_before is not None:
            import torch
            torch.set_num_threads(threads_before)
        for k, v in (env_before or {}).items():   # the caller's environment as it was
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    seconds = time.perf_counter() - t_start
    index.update(seconds=seconds, status="complete",
                 cpu_seconds=sum(e.get("cpu_seconds") or 0.0 for m in index["runs"] for e in index["runs"][m].values()))
    _write_index(out_dir, index)
    results = build_report(runs, out_dir, index=index, **(report_flags or {}))
    return {"results": results, "out_dir": out_dir, "runs": runs, "lr_mult": index["lr_mult"], "seconds": seconds}
