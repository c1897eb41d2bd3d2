"""``gxpo-kernels`` command line: ``speedup`` (all methods x seeds + report) and ``train`` (one method).

    gxpo-kernels speedup                      # the embedded default: tiny Qwen2, addition, 6 methods x 3 seeds
    gxpo-kernels speedup --preset smoke       # about a minute on 2 CPU cores (checks the set-up)
    gxpo-kernels train --algo gxpo --advantage fade --task sort --max_steps 100 --out runs/gxpo-sort
    gxpo-kernels train --model ./my-model --dataset math.jsonl --num_generations 8 --max_completion_length 1024
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gxpo_kernels.cli train --deepspeed ds_zero2.json --algo gxpo

Every ``TrainConfig`` field (and the warm start's ``SFTConfig`` ones, as ``--sft_<name>``) is an option,
generated from the dataclasses by ``transformers.HfArgumentParser``: ``--field_name`` and ``--field-name``,
plus the TRL ``GRPOConfig`` name where one means the same thing (``--num_generations``, ``--max_steps``,
``--max_completion_length``, ``--learning_rate`` ...). ``--help`` shows each default (for ``speedup``, the
default preset's). Every check runs before any work; a bad value is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import signal
import sys
import threading
import time
import typing
from typing import List, Optional

from ._utils import OPTIONAL_DEPS, missing_extra
from .trainer.config import SFTConfig, TrainConfig, ignored_options, parse_method, preset
from .trainer.tasks import check_inputs

PRESETS = ("default", "smoke", "test")
PROG = "gxpo-kernels"
TRAIN_MODULES = tuple(m for m, (_, extra) in OPTIONAL_DEPS.items() if extra == "train")   # what the CLI imports
# TrainConfig fields the speedup runner sets itself per run (methods x seeds), so not options of `speedup`
SPEEDUP_OWN = ("algo", "advantage", "seed", "lr_mult", "deepspeed", "fsdp", "resume")


# argparse reads an argument that starts with "-" as a value only when it looks like a negative number, and
# its pattern misses exponents and inf/nan: "--lr -1e-5" was "expected one argument" instead of the lr check
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*(e[-+]?\d+)?|\.\d+(e[-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that name the ``--help`` to read, exit code 2; negative
    numbers in any notation are values (no option of ours looks like one); no abbreviated options (``speedup
    --seed 3`` was read as ``--seeds 3``: three seeds, not seed 3)."""

    help_prog = None   # the top-level parser: set by main to "gxpo-kernels <command>" (it reports unknown options)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        if message == "the following arguments are required: command":
            message = "no command given: speedup (every method x seed, then the report) or train (one method)"
        sys.stderr.write(f"{PROG}: error: {message} (see `{self.help_prog or self.prog} --help`)\n")
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default (the options whose
    default the preset or the machine decides: ``--methods``, ``--seeds``, ``--workers`` ... said "(default: the
    preset's) (default: None)")."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _fail(message) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def _rank0() -> bool:
    """Whether this process is rank 0 of a distributed run, or in none: torch.distributed's rank while a process
    group is up, else the launcher's ``RANK`` (torchrun, deepspeed), else ``LOCAL_RANK``."""
    dist = sys.modules.get("torch.distributed")   # (imported by then if a group is up: no torch import here)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.lstrip("-").isdigit():
            return int(value) == 0
    return True


def _interrupted(message, e: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: one line saying what was kept and how to go on (on rank 0 only: torchrun stops every
    rank), exit 130 (Ctrl-C) or 143 (SIGTERM) on every rank."""
    from .trainer.speedup import Terminated
    if _rank0():
        sys.stderr.write(f"\n{PROG}: interrupted: {message}\n")
    raise SystemExit(143 if isinstance(e, Terminated) else 130)


def _warn_ignored(a: argparse.Namespace, configs, exclude=()) -> None:
    """One stderr line per option the user typed that none of ``configs`` (the runs about to start) reads
    (a config option's parsed default is SUPPRESS, so ``a`` holds only those typed)."""
    typed = [k for k in vars(a) if k in TrainConfig.__dataclass_fields__ and k not in exclude]
    for message in ignored_options(typed, configs):
        sys.stderr.write(f"{PROG}: warning: {message}\n")


def _flat_dataclass(cls, prefix: str = "", exclude=()):
    """A flat copy of dataclass ``cls`` (nested dataclass fields dropped, names prefixed) for HfArgumentParser."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or dataclasses.is_dataclass(hints[f.name]):
            continue
        kw = {"metadata": dict(f.metadata)}
        if f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        else:
            kw["default"] = f.default
        fields.append((prefix + f.name, hints[f.name], dataclasses.field(**kw)))
    return dataclasses.make_dataclass(f"{cls.__name__}Args", fields)


def _add_config_options(p: argparse.ArgumentParser, defaults: TrainConfig, exclude=()) -> None:
    """Add every TrainConfig / SFTConfig field of ``defaults`` as options of ``p``. Their parsed default is
    SUPPRESS (so only what the user typed overrides the preset); help shows the real default."""
    from transformers import HfArgumentParser

    src = HfArgumentParser([_flat_dataclass(TrainConfig, exclude=exclude), _flat_dataclass(SFTConfig, "sft_")],
                           add_help=False)
    shown = {**dataclasses.asdict(defaults), **{f"sft_{k}": v for k, v in dataclasses.asdict(defaults.sft).items()}}
    g = p.add_argument_group("configuration (TrainConfig / SFTConfig fields)")
    for a in src._actions:
        if not a.option_strings:
            continue
        kw = dict(dest=a.dest, default=argparse.SUPPRESS, required=False)
        if isinstance(a, argparse._StoreFalseAction):
            g.add_argument(*a.option_strings, action="store_false", help=f"set {a.dest} to False", **kw)
            continue
        help_ = f"{a.help or ''} (default: {shown[a.dest]})".strip()
        act = g.add_argument(*a.option_strings, type=a.type, nargs=a.nargs, const=a.const, choices=a.choices,
                             help=help_, metavar=a.metavar, **kw)
        act.shown_default, act.plain_help = shown[a.dest], a.help or ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="GRPO / SFPO / GXPO trainer and speedup-to-peak runner")
    # the deepspeed launcher puts --local_rank=N before the sub-command; LOCAL_RANK is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = _HelpFormatter

    s = sub.add_parser("speedup", formatter_class=fmt,
                       help="run methods x seeds from one warm start and report speedup to GRPO's peak")
    s.add_argument("--preset", choices=PRESETS, default="default",
                   help="default (the committed run), smoke (about a minute), test (seconds; the test suite's)")
    s.add_argument("--methods", help="comma list of algo[+advantage], e.g. grpo,sfpo,gxpo,gxpo+fade,grpo_lr,"
                   "grpo_epochs (default: the preset's)")
    s.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the preset's)")
    s.add_argument("--lr_mult", "--lr-mult", type=float,
                   help="grpo_lr's lr multiplier (default: measured from the GXPO, else SFPO, runs)")
    s.add_argument("--workers", type=int, help="parallel worker processes, one torch thread each (default: "
                   "min(2, CPU cores) on CPU, 1 on CUDA; 0 = in this process)")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--resume", action="store_true", help="keep the complete runs of an existing output folder "
                   "(same config) and run the rest")
    s.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bars")
    _add_config_options(s, preset("default").train, exclude=SPEEDUP_OWN)

    t = sub.add_parser("train", formatter_class=fmt, help="run one method")
    t.add_argument("--threads", type=int, help="torch CPU threads (None: torch's choice)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
    _add_config_options(t, TrainConfig())
    return p


def markdown_reference() -> str:
    """docs/cli.md: every option of every sub-command with its default, from the parser itself."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command-line reference", "",
             "Generated from the parser by `python docs/build_cli_doc.py` (do not edit by hand). Options of the",
             "form `--name` also accept `--name-with-hyphens`; TRL `GRPOConfig` names are listed as aliases.",
             "Options are written in full: an abbreviation (`--seed` for `--seeds`) is an error.",
             "Defaults of `speedup` are its default preset's; `--preset smoke|test` changes them.", ""]
    for name, sp in sub.choices.items():
        lines += [f"## `gxpo-kernels {name}`", "", sp.description or next(
            a.help for a in sub._choices_actions if a.dest == name), "",
                  "| option | default | description |", "|---|---|---|"]
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            # the --name-with-hyphens twins are not listed (the header says they exist)
            opts = [o for o in a.option_strings
                    if not ("-" in o[2:] and "--" + o[2:].replace("-", "_") in a.option_strings)]
            if hasattr(a, "shown_default"):
                default, text = a.shown_default, a.plain_help
            elif isinstance(a, argparse._StoreFalseAction):
                default, text = "", a.help
            else:
                default, text = a.default, a.help or ""
            if a.choices:
                text += " (one of: " + ", ".join(map(str, a.choices)) + ")"
            cell = "" if default is None or default == "" else f"`{default}`"
            lines.append(f"| {', '.join(f'`{o}`' for o in opts)} | {cell} | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def config_from_args(a: argparse.Namespace, base: TrainConfig, exclude=()) -> TrainConfig:
    """``base`` with every option the user gave (``sft_*`` into ``base.sft``), validated."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(exclude)
    kw = {k: v for k, v in vars(a).items() if k in names}
    sft = {k[4:]: v for k, v in vars(a).items() if k.startswith("sft_")}
    tc = base.replace(sft=dataclasses.replace(base.sft, **sft), **kw)
    return tc.validate()


def _speedup(a) -> int:
    from .trainer.config import SpeedupConfig
    from .trainer.speedup import check_out_dir, check_writable_dir, default_out_dir, format_table, run_speedup

    cfg: SpeedupConfig = preset(a.preset)
    tc = config_from_args(a, cfg.train, exclude=SPEEDUP_OWN)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods is not None else cfg.methods
    if a.seeds is not None and a.seeds < 1:
        _fail(f"--seeds must be >= 1, got {a.seeds}")
    seeds = tuple(range(a.seeds)) if a.seeds is not None else cfg.seeds
    cfg = dataclasses.replace(cfg, train=tc, methods=methods, seeds=seeds, lr_mult=a.lr_mult,
                              out_dir=tc.out_dir or default_out_dir(), workers=a.workers, threads=a.threads)
    cfg.validate()
    check_inputs(tc)   # reads --dataset and draws the validation set: before --overwrite empties --out
    if tc.cache_dir:
        check_writable_dir(tc.cache_dir, "--cache_dir")
    check_out_dir(cfg.out_dir, overwrite=a.overwrite, resume=a.resume)   # the last check: --overwrite empties it
    _warn_ignored(a, [tc.replace(algo=algo, advantage=adv) for algo, adv in map(parse_method, cfg.methods)],
                  exclude=SPEEDUP_OWN)
    t0 = time.perf_counter()
    try:
        out = run_speedup(cfg, progress=not a.no_progress, overwrite=a.overwrite, resume=a.resume)
    except KeyboardInterrupt as e:   # (run_speedup turns SIGTERM into Terminated itself)
        out_dir = os.path.abspath(cfg.out_dir)
        _interrupted(f"{os.path.join(out_dir, 'runs.json')} marks the runs that finished; rerun with the same "
                     f"options{' (less --overwrite)' if a.overwrite else ''} and --out {out_dir} --resume to keep "
                     "them and run the rest", e)
    print(format_table(out["results"]))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; outputs in {out['out_dir']}")
    return 0


class _TrainProgress:
    """tqdm bar over the RL steps; validation lines above it."""

    def __init__(self, tc: TrainConfig, enabled: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=tc.steps, desc=f"{tc.algo}", disable=not enabled, dynamic_ncols=True)
        self.quiet = tc.quiet

    def __call__(self, rec) -> None:
        v = rec.get("val")
        if v:
            self.bar.set_postfix(acc=f"{v['greedy_acc']:.3f}", refresh=False)
            if not self.quiet:
                self.bar.write(f"step {rec['step']:4d}  greedy {v['greedy_acc']:.3f}  pass@1 "
                               f"{v.get('pass1', float('nan')):.3f}  reward {rec.get('reward_mean', float('nan')):.3f}"
                               f"  bp {rec['backward_passes']}")
        if rec["step"] > self.bar.n:
            self.bar.update(rec["step"] - self.bar.n)


def _train(a) -> int:
    from .trainer import checkpoint, loop
    from .trainer.engines import load_ds_config
    from .trainer.speedup import check_out_dir, check_writable_dir, raise_terminated

    tc = config_from_args(a, TrainConfig())
    out = tc.out_dir or os.path.join("runs", f"{tc.algo}-" + time.strftime("%Y%m%d-%H%M%S"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if a.threads is not None and a.threads < 1:
        _fail(f"--threads must be >= 1, got {a.threads}")
    if tc.deepspeed is not None:
        load_ds_config(tc.deepspeed, tc)          # the engine reads it again; a bad one fails here, not later
    if tc.resume is not None:
        checkpoint.resolve_resume(tc.resume, out)   # the run resolves it again (read only)
    check_inputs(tc)   # reads --dataset and draws the validation set: before --overwrite empties --out
    if rank0:   # under torchrun / deepspeed only rank 0 writes records
        if tc.cache_dir:
            check_writable_dir(tc.cache_dir, "--cache_dir")
        # the last check: --overwrite empties the folder, so every other check has passed by now
        check_out_dir(out, overwrite=a.overwrite, resume=bool(getattr(tc, "resume", False)),
                      resume_option="--resume latest")
        _warn_ignored(a, [tc])
    tc = tc.replace(out_dir=out)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    bar = _TrainProgress(tc, enabled=rank0 and not a.no_progress)
    # SIGTERM (a job scheduler preempting the run) stops it as Ctrl-C does (exit 143): it used to end the process
    # without a word; the finished checkpoints are kept either way
    old_term = signal.signal(signal.SIGTERM, raise_terminated) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        loop.train(tc, progress=bar, log=bar.bar.write if not a.no_progress else print)
    except KeyboardInterrupt as e:
        bar.bar.close()
        out_dir = os.path.abspath(out)
        latest = checkpoint.latest_checkpoint(out_dir)
        if latest is not None:
            _interrupted(f"rerun with the same options{' (less --overwrite)' if a.overwrite else ''} and "
                         f"--out {out_dir} --resume latest to continue from {os.path.basename(latest)}", e)
        _interrupted(f"{out_dir} holds no checkpoint (--save_steps N writes one every N steps); rerun with "
                     f"--out {out_dir} --overwrite to start again", e)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        bar.bar.close()
    if rank0:
        print(f"records: {os.path.join(os.path.abspath(out), 'records.jsonl')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((x for x in args if x in ("speedup", "train")), None)
    if args[:1] == ["speedup"]:   # name the train-only launch options instead of "unrecognized arguments"
        for opt in ("--deepspeed", "--fsdp"):
            if any(x == opt or x.startswith(opt + "=") for x in args):
                _fail(f"{opt} works with `train` (one method per launch), not with `speedup`")
    try:
        parser = build_parser()   # the options come from transformers' HfArgumentParser
        parser.help_prog = f"{PROG} {command}" if command else None
        a = parser.parse_args(args)
        for module in TRAIN_MODULES:   # the rest of [train] now, not when the runs end (the plot, the checkpoint)
            importlib.import_module(module)
        return _speedup(a) if a.command == "speedup" else _train(a)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        _fail(e)
    except ModuleNotFoundError as e:   # an optional dependency (pip install . brings the core only)
        message = missing_extra(e, PROG)
        if message is None:
            raise
        _fail(message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
