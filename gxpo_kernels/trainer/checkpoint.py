"""Trainer checkpoints: save every ``save_steps`` steps, resume bit-exactly, save the final model.

A checkpoint is a folder ``<out_dir>/checkpoint-<step>/`` holding

- the engine's model + optimizer state (``engine.pt`` for the plain engine; DeepSpeed's own per-rank files
  under ``deepspeed/``);
- ``trainer_state.pt``: the loop's counters, the update rule's ``state_dict`` (gate included) and the FADE
  controller's, the world size, and the fingerprint of the frozen reference policy when the run has one
  (``--beta`` > 0, ``fpa_*``: a resume rebuilds it from the warm start and refuses one with other weights);
- ``rng_rank<r>.pt``: each rank's RNG states (torch CPU / CUDA, Python ``random``, NumPy) as tensors;
- ``records.jsonl`` (the records up to that step) and ``config.json`` (the run's ``TrainConfig``);
- under DeepSpeed, ``deepspeed_config.json``: the DeepSpeed config as the engine received it (the JSON with the
  trainer's fill-ins). A resume refuses a config that differs in any key but ``DS_RESUMABLE_KEYS`` (logging and
  monitoring); checkpoints written before this file existed resume without that check.

Every ``.pt`` file the trainer writes holds tensors and plain Python values only, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs on load). A checkpoint is written into
``checkpoint-<step>.tmp``, every file and folder in it is flushed to disk (``fsync``), and only then is it renamed
into place (and its parent folder flushed): a crash mid-save, of the process or of the machine, never leaves a
folder that looks finished, and the previous checkpoint stays as it was. ``--resume`` refuses a ``.tmp`` folder.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from typing import List, Optional, Tuple

import numpy as np
import torch

from .config import same_setting, saved_setting

PREFIX = "checkpoint-"
# TrainConfig fields that may differ between a run and its resumption (everything else must match)
RESUMABLE_CHANGES = ("steps", "resume", "out_dir", "cache_dir", "quiet", "save_steps", "save_model")
# DeepSpeed config keys (top level) a resume may change: logging / monitoring only, nothing of the math or sharding
DS_RESUMABLE_KEYS = ("steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "comms_logger",
                     "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "timers")
DS_CONFIG_FILE = "deepspeed_config.json"
# what the loop reads from trainer_state.pt on resume (besides world_size)
TRAINER_STATE_KEYS = ("step", "backward_passes", "optimizer_steps", "wall_clock", "gate_fired_at", "rule", "fade")


# ---------------------------------------------------------------------------------------------------------
# RNG states as tensors
# ---------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states, as tensors and ints (loadable with ``weights_only=True``)."""
    py = random.getstate()                    # (version, tuple of 625 ints, gauss_next)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python": torch.tensor(py[1], dtype=torch.int64), "python_version": int(py[0]),
           "python_gauss": py[2],
           "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
           "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss), "numpy_name": str(np_name)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), s["python_gauss"]))
    np.random.set_state((s["numpy_name"], s["numpy"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    if "cuda" in s:
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------
def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"{PREFIX}{step}")


def _checkpoints(out_dir: Optional[str]) -> List[Tuple[int, str]]:
    """(N, folder name) of every ``checkpoint-<N>`` folder name in ``out_dir``, by N."""
    if not out_dir or not os.path.isdir(out_dir):
        return []
    found = ((re.fullmatch(re.escape(PREFIX) + r"(\d+)", name), name) for name in os.listdir(out_dir))
    return sorted((int(m.group(1)), name) for m, name in found if m)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The finished ``checkpoint-<N>`` folder with the largest N in ``out_dir``, or None."""
    done = [os.path.join(out_dir, name) for _, name in _checkpoints(out_dir)
            if os.path.isfile(os.path.join(out_dir, name, "trainer_state.pt"))]
    return done[-1] if done else None


def set_aside_later(out_dir: str, step: int) -> List[str]:
    """Rename every ``checkpoint-<N>`` in ``out_dir`` with N > ``step`` to ``checkpoint-<N>.abandoned``: after a
    resume from ``step`` they belong to the continuation it replaces, and ``--resume latest`` would otherwise pick
    one up again after a crash. Renamed, not deleted. Returns the new paths."""
    moved = []
    for n, name in _checkpoints(out_dir):
        if n > step:
            src, dst = os.path.join(out_dir, name), os.path.join(out_dir, name + ".abandoned")
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            moved.append(dst)
    return moved


def resolve_resume(resume: str, out_dir: Optional[str]) -> str:
    """``resume`` is a checkpoint folder, or ``"latest"`` = the newest checkpoint in ``out_dir``."""
    if resume == "latest":
        path = latest_checkpoint(out_dir)
        if path is None:
            raise ValueError(f"--resume latest: no finished checkpoint-<step> folder in {out_dir!r} (--save_steps N "
                             "writes one every N steps; --overwrite instead of --resume starts the run again)")
        return path
    if os.path.basename(os.path.normpath(resume)).endswith(".tmp"):
        raise ValueError(f"--resume {resume!r}: an unfinished checkpoint (a save that was interrupted: it is renamed "
                         "to checkpoint-<step> once complete); resume from a finished one (--resume latest)")
    if not os.path.isfile(os.path.join(resume, "trainer_state.pt")):
        raise ValueError(f"--resume {resume!r}: not a trainer checkpoint (no trainer_state.pt in it)")
    return resume


def _fsync(path: str) -> None:
    """Flush a file's or a folder's contents to disk (a folder: the names in it, so that a rename persists)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):   # (platforms that cannot open a folder: nothing to flush)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # some filesystems (network mounts, FUSE) refuse fsync on a folder: its files were flushed, go on
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """``fsync`` every file under ``path``, then every folder (deepest first). Without it, after a power loss
    or an OS crash a renamed folder can hold empty or partial files: the rename may reach the disk first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished folder ``tmp`` to ``final``, durably: ``tmp``'s files are flushed to disk before the
    rename and the parent folder after it (an older ``final`` is removed only after the move)."""
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):
        old = f"{final}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def write_records(path: str, records: List[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_records(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(out_dir: str, step: int, engine, trainer_state: dict, records: List[dict], config: dict) -> str:
    """Write ``checkpoint-<step>`` (every rank calls this; see the module docstring). Returns its path."""
    final = checkpoint_dir(out_dir, step)
    tmp = f"{final}.tmp"
    if engine.lead:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    engine.save_state(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{engine.rank}.pt"))
    if engine.lead:
        torch.save(dict(trainer_state, world_size=engine.world), os.path.join(tmp, "trainer_state.pt"))
        write_records(os.path.join(tmp, "records.jsonl"), records)
        _write_json(os.path.join(tmp, "config.json"), config)
        if getattr(engine, "ds_config", None) is not None:
            _write_json(os.path.join(tmp, DS_CONFIG_FILE), engine.ds_config)
    engine.barrier()
    if engine.lead:
        replace_dir(tmp, final)
    engine.barrier()
    return final


@contextlib.contextmanager
def _reading(path: str, what: str):
    """A damaged or missing file of checkpoint ``path`` (truncated, not a torch file, bad JSON, keys that do not
    fit the model) as the one-line ValueError the CLI reports, naming the file; the cause stays chained."""
    try:
        yield
    except ValueError as e:
        if not isinstance(e, json.JSONDecodeError):   # (a refusal of ours, or a check of the engine's)
            raise
        raise ValueError(f"--resume {path!r}: cannot read {what} (JSONDecodeError: {e})") from e
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"--resume {path!r}: cannot read {what} ({type(e).__name__}: {str(e)[:300]})") from e


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config as ``{"a.b": value}`` (so a difference names the nested key)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(path: str, config: dict, ds_config: Optional[dict] = None) -> None:
    """Refuse to resume a run whose settings differ from the checkpoint's (other than ``RESUMABLE_CHANGES``);
    under DeepSpeed (``ds_config``: the config the engine was given) also one whose DeepSpeed config differs from
    the checkpoint's ``deepspeed_config.json`` in a key outside ``DS_RESUMABLE_KEYS``."""
    with _reading(path, "config.json"), open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)

    def same(k):   # the DeepSpeed JSON may move (or differ per rank): its contents are compared below
        a, b = saved_setting(saved, k), config.get(k)
        return (a is None) == (b is None) if k == "deepspeed" else same_setting(k, a, b)
    diff = sorted(k for k in set(saved) | set(config) if k not in RESUMABLE_CHANGES and not same(k))
    shown = [f"{k}={saved_setting(saved, k)!r} (now {config.get(k)!r})" for k in diff]
    ds_file = os.path.join(path, DS_CONFIG_FILE)
    if ds_config is not None and os.path.isfile(ds_file):   # (older checkpoints lack the file: not checked)
        with _reading(path, DS_CONFIG_FILE), open(ds_file) as f:
            old, new = (_flat({k: v for k, v in c.items() if k not in DS_RESUMABLE_KEYS})
                        for c in (json.load(f), json.loads(json.dumps(ds_config))))
        missing = "<absent>"
        shown += [f"deepspeed config {k}={old.get(k, missing)!r} (now {new.get(k, missing)!r})"
                  for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]
    if shown:
        raise ValueError(f"--resume {path!r}: the checkpoint was made with different settings: " + ", ".join(shown))


def load_checkpoint(path: str, engine) -> Tuple[dict, List[dict]]:
    """Restore the engine's model + optimizer and this rank's RNG; return (trainer_state, records)."""
    with _reading(path, "trainer_state.pt"):
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
        world = int(state["world_size"])
        missing = [k for k in TRAINER_STATE_KEYS if k not in state]   # (a foreign file of that name)
        if missing:
            raise ValueError(f"--resume {path!r}: cannot read trainer_state.pt (it has no {', '.join(missing)})")
    if world != engine.world:
        raise ValueError(f"--resume {path!r}: saved with {world} ranks, resumed with {engine.world}")
    with _reading(path, "the model and optimizer state"):
        engine.load_state(path)
    rng = f"rng_rank{engine.rank}.pt"
    with _reading(path, rng):
        set_rng_state(torch.load(os.path.join(path, rng), map_location="cpu", weights_only=True))
    with _reading(path, "records.jsonl"):
        return state, read_records(os.path.join(path, "records.jsonl"))


def weights_fingerprint(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order): identifies the frozen
    reference policy a run trains against, which a resume rebuilds from the warm start instead of loading."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_reference(path: str, state: dict, fingerprint: Optional[str]) -> None:
    """Refuse a resume whose rebuilt reference policy (``weights_fingerprint``) is not the checkpoint's.
    Checkpoints written before the fingerprint was saved are not checked."""
    saved = state.get("ref_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ValueError(f"--resume {path!r}: the reference policy (the warm start that --beta's KL penalty / the "
                         "fpa_* objective compare with) differs from the one the checkpoint was trained against: "
                         "the warm-start cache file, the bundled warm start or the --model folder changed, or the "
                         "warm start was retrained on another machine; restore it or start a new run")


def save_tokenizer(tok, path: str) -> None:
    """A transformers tokenizer via ``save_pretrained``; the built-in character tokenizer as a small JSON."""
    inner = getattr(tok, "tok", None)
    if inner is not None and hasattr(inner, "save_pretrained"):
        inner.save_pretrained(path)
    else:
        _write_json(os.path.join(path, "char_tokenizer.json"),
                    {"alphabet": tok.alphabet, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id})


def save_final_model(out_dir: str, engine, tok) -> Optional[str]:
    """``save_pretrained`` of the policy (full weights, gathered if sharded) + tokenizer into ``<out_dir>/model``
    (every rank calls this; the lead writes). Returns the folder on the lead rank."""
    sd = engine.full_state_dict()
    if not engine.lead:
        engine.barrier()
        return None
    final = os.path.join(out_dir, "model")
    tmp = f"{final}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    engine.policy.save_pretrained(tmp, state_dict=sd)
    save_tokenizer(tok, tmp)
    replace_dir(tmp, final)
    engine.barrier()
    return final
