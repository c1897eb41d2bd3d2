"""Guards the ``gxpo-kernels`` command line.

- every TrainConfig / SFTConfig field is an option (generated, so a new field cannot be forgotten), with its
  default in --help (speedup: the default preset's), and TRL's names reach the same fields;
- every bad value fails before any work (no warm start, no run) as one stderr line with exit code 2;
- --out: a path under a file, an existing non-empty folder (unless --overwrite / --resume), --overwrite of a
  folder gxpo-kernels did not write;
- `train` shows a progress bar; docs/cli.md is the parser's current reference.
"""
import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
import torch

from gxpo_kernels import cli
from gxpo_kernels.trainer import loop, speedup
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig, preset

ROOT = Path(__file__).resolve().parents[2]


def _example(name, tp, default):
    """A valid non-default CLI value for a field, and what it parses to."""
    tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
    choices = None
    for cls in (TrainConfig, SFTConfig):
        for f in dataclasses.fields(cls):
            if f.name == name:
                choices = f.metadata.get("choices")
    if choices:
        v = next(c for c in choices if c != default)
        return [v], v
    if tp is bool:
        return ["false" if default else "true"], not default
    if tp is int:
        return ["7"], 7
    if tp is float:
        return ["0.375"], 0.375
    if typing.get_origin(tp) is list:
        return ["1", "2"], [1, 2]
    return ["some/where"], "some/where"


def _fields():
    out = []
    for cls, prefix in ((TrainConfig, ""), (SFTConfig, "sft_")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                out.append((prefix + f.name, hints[f.name], f.default if f.default is not dataclasses.MISSING
                            else f.default_factory()))
    return out


@pytest.mark.parametrize("name, tp, default", _fields(), ids=[f[0] for f in _fields()])
def test_every_field_is_an_option(name, tp, default):
    argv, want = _example(name, tp, default)
    a = cli.build_parser().parse_args(["train", f"--{name}", *argv])
    got = getattr(a, name)
    assert got == want
    # the hyphenated spelling reaches the same field
    if "_" in name:
        a = cli.build_parser().parse_args(["train", f"--{name.replace('_', '-')}", *argv])
        assert getattr(a, name) == want


def test_options_reach_the_config_and_trl_aliases():
    p = cli.build_parser()
    a = p.parse_args(["train", "--num_generations", "4", "--max_steps", "9", "--max_completion_length", "5",
                      "--learning_rate", "3e-6", "--epsilon", "0.1", "--epsilon_high", "0.28", "--num_iterations",
                      "2", "--eval_steps", "3", "--sft-steps", "11", "--sft-target", "0.5", "--no_chat_template",
                      "--temperature", "0.9", "--max_grad_norm", "0.5", "--gxpo-K", "4", "--out", "x"])
    tc = cli.config_from_args(a, TrainConfig())
    assert (tc.group, tc.steps, tc.max_new_tokens, tc.lr, tc.eps_low, tc.eps_high, tc.epochs, tc.val_every) == \
        (4, 9, 5, 3e-6, 0.1, 0.28, 2, 3)
    assert (tc.sft.max_steps, tc.sft.target_acc, tc.chat_template, tc.temperature, tc.max_grad_norm, tc.gxpo_K,
            tc.out_dir) == (11, 0.5, False, 0.9, 0.5, 4, "x")
    # TRL's (transformers') name of the output folder, on both commands
    for cmd in ("train", "speedup"):
        assert p.parse_args([cmd, "--output_dir", "y"]).out_dir == "y"
    # nothing typed -> the base config untouched (the speedup preset's values survive)
    base = preset("smoke").train
    assert cli.config_from_args(p.parse_args(["speedup"]), base, exclude=cli.SPEEDUP_OWN) == base


HELP_SAYS = {"speedup": ("(default: the preset's)", "(default: measured from the GXPO, else SFPO, runs)"),
             "train": ("(None: torch's choice)",)}


def test_help_shows_defaults(capsys):
    for argv, want in ((["train", "--help"], ["(default: 200)", "(default: 1e-05)", "(default: 1500)",
                                              "--num_generations", "--max_completion_length"]),
                       (["speedup", "--help"], [f"(default: {preset('default').train.steps})", "--workers"])):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = " ".join(capsys.readouterr().out.split())   # undo the help formatter's line wrapping
        for w in want:
            assert w in out, (argv, w)
        # one default per option: the options whose default the preset or the machine decides said
        # "(default: the preset's) (default: None)"
        for said in HELP_SAYS[argv[0]]:
            assert said in out and said + " (default:" not in out, (argv, said)


@pytest.fixture
def no_work(monkeypatch):
    """Any warm start or run fails the test: the CLI must reject bad input before it."""
    def boom(*a, **k):
        raise AssertionError("work started before validation")
    monkeypatch.setattr(loop, "train", boom)
    monkeypatch.setattr(loop, "prepare_warm_start", boom)
    monkeypatch.setattr(speedup, "run_speedup", boom)


BAD = [
    (["train", "--loss_agg_mode", "bogus"], "invalid choice"),
    (["train", "--gxpo_K", "1"], "gxpo_K must be in [2, 256]"),
    (["train", "--gxpo_K", str(2 ** 40)], "gxpo_K must be in [2, 256]"),
    (["train", "--group", "1"], "group must be an int >= 2"),
    (["train", "--num_generations", "1"], "group must be an int >= 2"),
    (["train", "--sft_target", "nan"], "sft_target_acc must be in (0, 1]"),
    (["train", "--max_new_tokens", "0"], "max_new_tokens must be an int >= 1"),
    (["train", "--lr", "inf"], "lr must be a finite number > 0"),
    (["train", "--lr", "0"], "lr must be a finite number > 0"),
    (["train", "--temperature", "nan"], "temperature must be a finite real number in [1e-6, 1e6]"),
    (["train", "--threads", "-1"], "--threads must be >= 1"),
    (["train", "--steps", "0"], "steps must be an int >= 1"),
    (["train", "--sft_pool_size", "100"], "sft_pool_size (100) must be >= sft_batch_size (128)"),
    (["train", "--pass_k", "5"], "pass_k must be ints in [1, pass1_n"),
    (["train", "--hidden", "30"], "multiple of heads"),
    (["train", "--steps", "abc"], "invalid int value"),
    (["train", "--dataset", "/nonexistent.jsonl"], "no such file (--dataset takes a local JSONL file"),
    (["train", "--dataset", str(ROOT / "docs")], "a folder, not a file (--dataset takes a local JSONL file"),
    (["train", "--beta", "-0.1"], "beta must be in [0, inf)"),
    (["train", "--beta", "0.04", "--fsdp"], "runs on the plain engine"),
    (["train", "--beta", "0.04", "--algo", "fpa_dpo"], "takes --fpa_beta"),
    (["train", "--lr_scheduler_type", "polynomial"], "invalid choice"),
    (["speedup", "--methods", "grpo,fpa_dpo", "--beta", "0.1"], "takes --fpa_beta"),
    (["speedup", "--lr-mult", "-1"], "lr_mult must be a finite number > 0"),
    (["speedup", "--workers", "-1"], "workers must be an int >= 0"),
    (["speedup", "--threads", "0"], "threads must be an int >= 1"),
    (["speedup", "--seeds", "0"], "--seeds must be >= 1"),
    (["speedup", "--methods", "grpo,grpo"], "repeated"),
    (["speedup", "--sft-steps", "-3"], "sft_max_steps must be an int >= 0"),
    (["speedup", "--algo", "gxpo"], "unrecognized arguments"),
    # no abbreviations: `speedup --seed 3` was read as --seeds 3 (three seeds 0, 1, 2, not seed 3), and
    # `--seed 999999999` ended in a MemoryError traceback
    (["speedup", "--seed", "3"], "unrecognized arguments: --seed 3"),
    (["train", "--temp", "0.5"], "unrecognized arguments: --temp 0.5"),
    (["speedup", "--preset", "test", "--lr_m", "2"], "unrecognized arguments: --lr_m 2"),
    # the library's own rules (GRPOLossOptions, the update rules, FADE, the FPA objectives), checked up front:
    # they used to fail after the warm start, with config.json and records.jsonl already in --out
    (["train", "--eps_low", "1.5"], "eps_low must be in [0, 1), got 1.5"),
    (["train", "--epsilon_high", "nan"], "eps_high must be a finite real number"),
    (["train", "--temperature", "1e-9"], "temperature must be in [1e-6, 1e6]"),
    (["train", "--temperature", "1e7"], "temperature must be in [1e-6, 1e6]"),
    (["train", "--val_temperature", "1e-9"], "val_temperature must be in [1e-6, 1e6]"),
    (["train", "--algo", "fpa_dpo", "--temperature", "1e7"], "temperature must be in [1e-6, 1e6]"),
    (["train", "--gxpo_alpha", "0"], "gxpo_alpha must be in (0, inf)"),
    (["train", "--algo", "gxpo", "--gxpo_tau", "0"], "gxpo_tau must be in (0, inf)"),
    (["train", "--sfpo_K", "0"], "sfpo_K must be in [1, inf)"),
    (["train", "--sfpo_alpha", "-1"], "sfpo_alpha must be in (0, inf)"),
    (["train", "--fpa_lam", "-1"], "fpa_lam must be in [0, 1e6]"),
    (["train", "--algo", "fpa_dpo", "--fpa_beta", "0"], "fpa_beta must be in (0, 1e6]"),
    (["train", "--algo", "fpa_rpo", "--fpa_rpo_alpha", "-1"], "fpa_rpo_alpha must be in [0, 1e6]"),
    # beta = 1e300 made the FPA loss NaN (inf * 0 in fp32); a weight of 1e300 an internal overflow error
    (["train", "--algo", "fpa_dpo", "--fpa_beta", "1e300"], "fpa_beta must be in (0, 1e6], got 1e+300"),
    (["train", "--algo", "fpa_rpo", "--fpa_rpo_alpha", "1e7"], "fpa_rpo_alpha must be in [0, 1e6], got 10000000.0"),
    (["train", "--advantage", "fade", "--fade_target_entropy", "-1"], "fade_target_entropy must be in [0, inf)"),
    (["speedup", "--eps_low", "1.5"], "eps_low must be in [0, 1)"),
    # the model shape and the device, which used to fail as raw tracebacks (exit 1)
    (["train", "--hidden", "12", "--heads", "4"], "hidden / heads (12 / 4 = 3) must be even"),
    (["train", "--hidden", "8", "--heads", "8"], "must be even"),
    (["speedup", "--hidden", "12", "--heads", "4"], "must be even"),
    (["train", "--device", "banana"], "device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    (["train", "--device", "meta"], "the trainer runs on cpu and cuda"),
    (["train", "--device", "cuda:99"], "device 'cuda:99'"),
    # a negative number in exponent notation is a value (argparse's own pattern took it for an option)
    (["train", "--lr", "-1e-5"], "lr must be a finite number > 0, got -1e-05"),
    (["train", "--lr=-1e-5"], "lr must be a finite number > 0, got -1e-05"),
    (["train", "--learning_rate", "-inf"], "lr must be a finite number > 0, got -inf"),
    (["train", "--sft_lr", "-.5e-3"], "sft_lr must be a finite number > 0"),
    # inputs the run itself read later
    (["train", "--resume", "/nonexistent/ckpt"], "not a trainer checkpoint"),
    (["train", "--deepspeed", "/nonexistent.json"], "no such file"),
    # memory bounds: the micro-batches must split the rows; DeepSpeed's JSON owns its value
    (["train", "--gradient_accumulation_steps", "3"],
     "gradient_accumulation_steps (3) must divide the rows of a step, prompts * group = 128"),
    (["speedup", "--prompts", "6", "--group", "4", "--gradient_accumulation_steps", "16"], "prompts * group = 24"),
    (["train", "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an int >= 1"),
    (["train", "--gradient_accumulation_steps", "4", "--deepspeed", "ds_zero2.json"],
     "--gradient_accumulation_steps 4 conflicts with the gradient_accumulation_steps 2 of --deepspeed"),
    (["train", "--eval_batch_size", "0"], "eval_batch_size must be an int >= 1"),
    # sizes that passed validation and then exhausted memory inside the run (drawing ~1e14 prompts up front, a
    # 1e12-problem warm-start pool, one generate call of 1e15 rows): the bound and why, before any work
    (["train", "--prompts", str(10 ** 14)], "prompts * group = 800000000000000 is too large: at most 1048576 "
                                            "(sequences sampled in one generate call"),
    (["train", "--num_generations", str(10 ** 14)], "prompts * group = 1600000000000000 is too large"),
    (["train", "--sft_pool_size", str(10 ** 12)], "sft_pool_size = 1000000000000 is too large: at most 100000000 "
                                                  "(the run draws these prompts up front"),
    (["train", "--sft_batch_size", str(2 ** 21), "--sft_pool_size", str(2 ** 22)],
     "sft_batch_size = 2097152 is too large: at most 1048576"),
    (["train", "--steps", str(10 ** 8)], "steps * prompts = 1600000000 is too large: at most 100000000 (the run "
                                         "draws its whole prompt stream up front"),
    (["train", "--val_size", str(10 ** 9)], "val_size = 1000000000 is too large: at most 100000000"),
    (["train", "--val_size", str(2 ** 21), "--eval_batch_size", str(2 ** 21)],
     "min(eval_batch_size, val_size) = 2097152 is too large"),
    (["train", "--pass1_n", str(10 ** 5), "--pass_k", "1"],
     "min(eval_batch_size, pass1_size, val_size) * pass1_n = 12800000 is too large"),
    # --pass_k 1 1 computed and logged pass@1 twice
    (["train", "--pass_k", "1", "1"], "pass_k must not repeat a k: [1] given more than once in [1, 1]"),
    # an explicit --val_size the task's val split cannot fill: the error says what to pass
    (["train", "--task", "addition2", "--val_size", "2030"], "(found 2029); pass --val_size 2029 or less"),
]


@pytest.mark.parametrize("argv, msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_fail_before_work_in_one_line(argv, msg, capsys, no_work, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_library_rules_are_the_configs(monkeypatch):
    """TrainConfig.validate refuses exactly what the objects the trainer builds refuse: one rule each."""
    from gxpo_kernels.losses import GRPOLossOptions
    from gxpo_kernels.trainer.config import loss_kwargs

    def refused(fn):
        try:
            fn()
        except (TypeError, ValueError):
            return True
        return False

    cases = [("eps_low", v) for v in (-0.1, 0.0, 0.5, 0.999, 1.0, 1.5)] + \
            [("eps_high", v) for v in (-1e-3, 0.0, 0.28, 1e9, float("inf"))] + \
            [("temperature", v) for v in (1e-7, 1e-6, 0.7, 1e6, 1.1e6, float("nan"))] + \
            [("beta", v) for v in (-0.1, 0.0, 0.04)]
    for name, v in cases:
        tc = TrainConfig(**{name: v})
        assert refused(tc.validate) == refused(lambda: GRPOLossOptions.build(**loss_kwargs(tc, 8))), (name, v)


def test_model_shape_rule_matches_transformers():
    """The tiny model's shape rule (hidden = heads x an even head dim) is what Qwen2 / Llama can run. (Head dim
    1, also refused, runs in Qwen2 by accident: its 2-wide rotary tables broadcast over the 1-wide heads.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from gxpo_kernels.trainer.model import tiny_config_dict

    for conf, model in ((Qwen2Config, Qwen2ForCausalLM), (LlamaConfig, LlamaForCausalLM)):
        for hidden, heads in ((12, 4), (16, 4), (4, 2), (6, 2), (12, 3), (10, 2)):
            try:
                tiny_config_dict(16, hidden=hidden, heads=heads)
                ok = True
            except ValueError:
                ok = False
            try:
                m = model(conf(vocab_size=16, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
                               num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16))
                m(input_ids=torch.zeros(1, 3, dtype=torch.long))
                runs = True
            except Exception:
                runs = False
            assert ok == runs, (conf.__name__, hidden, heads)


@pytest.fixture
def fake_work(monkeypatch):
    """The run and the speedup runner replaced by no-ops (what the CLI does before them is under test)."""
    monkeypatch.setattr(loop, "train", lambda *a, **k: [])
    monkeypatch.setattr(speedup, "run_speedup", lambda *a, **k: {"results": [], "out_dir": "x"})
    monkeypatch.setattr(speedup, "format_table", lambda results: "")


def test_options_the_run_does_not_read_warn(tmp_path, capsys, fake_work):
    def warnings(argv):
        assert cli.main(argv + ["--no_progress", "--out", str(tmp_path / str(len(list(tmp_path.iterdir()))))]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert all(e.startswith("gxpo-kernels: warning: ") for e in err), err
        return [e.split()[2] for e in err]

    assert warnings(["train", "--algo", "grpo", "--fpa_lam", "2", "--gxpo_K", "9", "--fade_target_entropy", "0.5"]) \
        == ["--fpa_lam", "--gxpo_K", "--fade_target_entropy"]
    assert warnings(["train", "--algo", "fpa_dpo", "--advantage", "fade", "--fpa_beta", "0.2"]) == ["--advantage"]
    assert warnings(["train", "--algo", "gxpo", "--advantage", "fade", "--gxpo_K", "3", "--fade_target_entropy",
                     "0.5", "--eps_low", "0.1", "--hidden", "64"]) == []
    assert warnings(["train", "--algo", "grpo_lr", "--lr_mult", "2", "--epochs", "2"]) == ["--epochs"]
    # speedup: an option warns when no method of the run reads it
    assert warnings(["speedup", "--preset", "test", "--methods", "grpo,gxpo", "--gxpo_K", "3"]) == []
    assert warnings(["speedup", "--preset", "test", "--methods", "grpo,sfpo", "--gxpo_K", "3", "--lr_mult", "2",
                     "--sfpo_K", "2"]) == ["--gxpo_K"]


def test_out_folder_checks(tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    cases = [(["train", "--out", str(f / "sub")], "is a file"), (["train", "--out", str(f)], "not a folder"),
             (["speedup", "--out", str(f / "a" / "b")], "is a file"),
             (["train", "--out", str(tmp_path / "ok"), "--cache_dir", str(f / "c")], "--cache_dir"),
             (["speedup", "--out", str(tmp_path / "ok"), "--cache_dir", str(f)], "--cache_dir")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases += [(["train", "--out", str(full)], "not empty"), (["speedup", "--out", str(full)], "not empty"),
              (["train", "--out", str(full), "--overwrite"], "only replaces a folder written by gxpo-kernels")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert (full / "notes.txt").read_text() == "mine"
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            cli.main(["train", "--out", str(ro / "x")])
        assert "not writable" in capsys.readouterr().err
    if os.path.isdir("/proc/self"):   # procfs refuses new entries even to root (whom os.access would pass)
        for argv in (["train", "--out", "/proc/gxpo-out"], ["speedup", "--out", str(tmp_path / "ok2"),
                                                            "--cache_dir", "/proc/gxpo-cache"]):
            with pytest.raises(SystemExit):
                cli.main(argv)
            err = capsys.readouterr().err
            assert "not writable" in err and len(err.strip().splitlines()) == 1, err


def _bad_model_and_dataset(tmp_path):
    """A --model folder whose config.json is not JSON, one with a valid config.json, and a JSONL file whose
    first line is not JSON."""
    from transformers import Qwen2Config
    broken, fine = tmp_path / "broken-model", tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(fine)
    data = tmp_path / "d.jsonl"
    data.write_text("not json\n")
    return broken, fine, data


def test_bad_inputs_fail_before_overwrite(tmp_path, capsys, no_work):
    """A damaged --model config.json or --dataset file, or a --val_size the task's val split cannot fill, is one
    line and exit code 2, found before --overwrite empties --out: it used to be a traceback (exit 1) from inside
    the run, or found after the earlier run's folder had been deleted (`--task addition2 --val_size 2048`: the
    split holds 2029 problems)."""
    broken, fine, data = _bad_model_and_dataset(tmp_path)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "records.jsonl").write_text("{}\n")
    for cmd in ("train", "speedup"):
        for argv, msg in ((["--model", str(broken)], "cannot read its config.json"),
                          (["--model", str(fine), "--dataset", str(data)], "d.jsonl:1: not a JSON object"),
                          (["--task", "addition2", "--val_size", "2048"],
                           "val_size 2048: could not draw 2048 distinct 'val' problems for task 'addition2' "
                           "(found 2029)")):
            with pytest.raises(SystemExit) as e:
                cli.main([cmd, *argv, "--out", str(earlier), "--overwrite"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and msg in err and "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1, err
            assert (earlier / "records.jsonl").read_text() == "{}\n"


def test_damaged_model_weights_are_one_clear_error(tmp_path):
    from gxpo_kernels.trainer.model import load_local_model
    _, fine, _ = _bad_model_and_dataset(tmp_path)
    (fine / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load the model"):
        load_local_model(str(fine), torch.device("cpu"))


def test_overwrite_replaces_only_own_folder(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "records.jsonl").write_text("{}\n")
    (own / "config.json").write_text("{}")
    assert speedup.check_out_dir(str(own), overwrite=True) == str(own)
    assert not own.exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "runs.json").write_text("{}")
    assert speedup.check_out_dir(str(tmp_path / "keep"), resume=True) and (tmp_path / "keep" / "runs.json").exists()


def test_train_progress_bar_and_refuses_second_run(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", "--steps", "2", "--prompts", "2", "--group", "2", "--hidden", "16", "--heads", "2",
            "--layers", "1", "--val_every", "2", "--val_size", "8", "--pass1_size", "0", "--sft_max_steps", "0",
            "--out", str(out)]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    assert "2/2" in cap.err and "greedy" in cap.out         # tqdm bar on stderr, validation lines on stdout
    before = (out / "records.jsonl").read_text()
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "not empty" in capsys.readouterr().err and (out / "records.jsonl").read_text() == before
    assert cli.main(argv + ["--overwrite", "--quiet", "--no_progress"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_cli_reference_is_current():
    """docs/cli.md is generated from the parser: regenerate with `python docs/build_cli_doc.py`."""
    assert (ROOT / "docs" / "cli.md").read_text() == cli.markdown_reference()


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    from gxpo_kernels.trainer import report
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path)]) == 2                   # no runs.json
    (tmp_path / "runs.json").write_text("{not json")
    assert report.main([str(tmp_path)]) == 2
    (tmp_path / "runs.json").write_text(json.dumps({"runs": []}))
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("python -m gxpo_kernels.trainer.report: error:") for e in err)


@pytest.mark.parametrize("argv, msg", [
    ([], "no command given: speedup (every method x seed, then the report) or train (one method) "
         "(see `gxpo-kernels --help`)"),
    (["speedup", "--foo", "1"], "unrecognized arguments: --foo 1 (see `gxpo-kernels speedup --help`)"),
    (["train", "--task", "mult"], "invalid choice: 'mult' (choose from 'addition', 'addition2', 'sort') "
                                  "(see `gxpo-kernels train --help`)"),
    (["train", "--steps"], "expected one argument (see `gxpo-kernels train --help`)"),
])
def test_parser_errors_name_the_help_to_read(argv, msg, capsys):
    """A new user's first mistakes (no command, an unknown option) say where the choices are: the one-line
    errors had dropped argparse's usage block, so `gxpo-kernels` alone said only 'arguments are required:
    command'."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_overwrite_and_resume_checks(tmp_path, capsys, no_work):
    """--overwrite with --resume was read as --resume (the overwrite silently ignored); --resume into a folder
    gxpo-kernels did not write wrote runs into it (and a speedup run deleted its results.json / speedup.png);
    train's refusal of a used folder pointed at `--resume`, which takes a checkpoint (`--resume latest`)."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "runs.json").write_text("{}")
    (own / "checkpoint-2").mkdir()
    (own / "checkpoint-2" / "trainer_state.pt").write_bytes(b"")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my own")
    used = tmp_path / "used"
    used.mkdir()
    (used / "records.jsonl").write_text("{}\n")
    for argv, msg in [
        (["speedup", "--out", str(own), "--overwrite", "--resume"], "--overwrite and --resume contradict"),
        (["train", "--out", str(own), "--overwrite", "--resume", "latest"], "--overwrite and --resume contradict"),
        (["speedup", "--out", str(mine), "--resume"], "--resume continues a folder written by gxpo-kernels"),
        (["train", "--out", str(used)], "pass --overwrite to replace it, --resume latest to continue it"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert (own / "runs.json").read_text() == "{}" and (mine / "results.json").read_text() == "my own"


def test_ctrl_c_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C ended in a KeyboardInterrupt traceback: now one line naming the folder and the rerun that
    continues it (--resume with the same --out: the default --out is a new timestamped folder), exit 130."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(speedup, "run_speedup", interrupted)
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        cli.main(["speedup", "--preset", "test", "--out", str(out), "--no_progress"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err, err
    assert f"interrupted: {out / 'runs.json'} marks the runs that finished; rerun with the same options and " \
           f"--out {out} --resume" in err
    # train: from the newest checkpoint if one was written, else start again
    def train(tc, progress=None, log=print):   # interrupted after it wrote its records (and maybe a checkpoint)
        os.makedirs(tc.out_dir)
        (Path(tc.out_dir) / "records.jsonl").write_text("{}\n")
        if tc.save_steps:
            os.makedirs(os.path.join(tc.out_dir, "checkpoint-4"))
            torch.save({}, os.path.join(tc.out_dir, "checkpoint-4", "trainer_state.pt"))
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "train", train)
    for save, want in (("0", "holds no checkpoint (--save_steps N writes one every N steps); rerun with "
                             f"--out {tmp_path / 't0'} --overwrite to start again"),
                       ("4", f"rerun with the same options and --out {tmp_path / 't4'} --resume latest to continue "
                             "from checkpoint-4")):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--steps", "8", "--val_size", "16", "--save_steps", save, "--out",
                      str(tmp_path / f"t{save}"), "--no_progress"])
        err = capsys.readouterr().err
        assert e.value.code == 130 and want in err and "Traceback" not in err, err


def _sigterm_when(cmd, ready, tmp_path):
    """Start ``cmd`` (the CLI) in its own process group, SIGTERM it once ``ready()``; return (rc, stderr, whether
    a process of its group outlived it), every wait bounded."""
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "gxpo_kernels.cli", *cmd], cwd=str(tmp_path), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not ready() and p.poll() is None and time.monotonic() - t0 < 180:
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()[-3000:]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        orphans = True
        for _ in range(100):             # the workers of a speedup run end with the runner
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                orphans = False
                break
            time.sleep(0.1)
        return p.returncode, err, orphans
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_stops_like_ctrl_c(tmp_path):
    """SIGTERM (a scheduler preempting the job) killed `train` without a word; now both commands stop as on
    Ctrl-C (one line naming the --resume rerun, no traceback), exit 143, and no speedup worker outlives the runner."""
    out = tmp_path / "t"
    rc, err, orphans = _sigterm_when(
        ["train", "--steps", "500", "--save_steps", "1", "--sft_steps", "0", "--prompts", "2", "--group", "2",
         "--val_size", "4", "--pass1_size", "0", "--val_every", "1000", "--no_save_model", "--no_progress",
         "--out", str(out), "--cache_dir", str(tmp_path / "cache")],
        lambda: (out / "checkpoint-1").is_dir(), tmp_path)
    assert rc == 143 and "Traceback" not in err and not orphans, err[-3000:]
    assert f"interrupted: rerun with the same options and --out {out} --resume latest to continue from" in err, err

    out = tmp_path / "s"
    rc, err, orphans = _sigterm_when(
        ["speedup", "--preset", "test", "--workers", "2", "--steps", "500", "--no_progress", "--out", str(out),
         "--cache_dir", str(tmp_path / "cache")],
        lambda: any(f == "records.jsonl" for _, _, fs in os.walk(out) for f in fs), tmp_path)
    assert rc == 143 and "Traceback" not in err and not orphans, err[-3000:]
    assert f"interrupted: {out / 'runs.json'} marks the runs that finished" in err, err
    assert json.loads((out / "runs.json").read_text())["status"] == "interrupted"


def test_size_bounds_leave_large_legitimate_values_alone():
    """The memory bounds cap what the run allocates at once, not how long it runs: a million steps of the default
    16 prompts, an eval_batch_size far above the validation set (the calls take min(eval_batch_size, prompts
    left)) and pass@k over many samples of few prompts all validate."""
    from gxpo_kernels.trainer.config import MAX_DRAWN_PROMPTS, MAX_GENERATE_ROWS, TrainConfig
    TrainConfig(steps=10 ** 6).validate()
    TrainConfig(eval_batch_size=10 ** 12).validate()
    TrainConfig(pass1_size=4, pass1_n=2 ** 18, pass_k=[1, 2 ** 18]).validate()
    TrainConfig(prompts=2 ** 10, group=2 ** 10).validate()                  # exactly MAX_GENERATE_ROWS rows
    TrainConfig(steps=MAX_DRAWN_PROMPTS // 16).validate()
    with pytest.raises(ValueError, match="prompts . group = 1049600 is too large"):
        TrainConfig(prompts=2 ** 10 + 1, group=2 ** 10).validate()
    assert MAX_GENERATE_ROWS == 2 ** 20


@pytest.mark.parametrize("env, printed", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                          ({"LOCAL_RANK": "2"}, False), ({"RANK": "0", "LOCAL_RANK": "0"}, True)])
def test_interrupted_line_on_rank_zero_only(monkeypatch, capsys, env, printed):
    """Under torchrun every rank printed the same "interrupted: ..." line; now only rank 0 (RANK, else LOCAL_RANK,
    or torch.distributed's rank when a group is up) prints it, and every rank keeps the exit code (130 for
    Ctrl-C, 143 for SIGTERM)."""
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for e, code in ((KeyboardInterrupt(), 130), (speedup.Terminated(), 143)):
        with pytest.raises(SystemExit) as exc:
            cli._interrupted("rerun with --resume latest", e)
        assert exc.value.code == code
        err = capsys.readouterr().err
        assert (f"{cli.PROG}: interrupted: rerun with --resume latest" in err) == printed, err
        assert printed or err == ""
