"""`pip install .` brings the core only: the optional dependencies of the CLI and the integrations are missing
there, and what needs one says which extra of pyproject.toml installs it. Each test hides one dependency by
putting None in sys.modules (what `import` then does is what it does for a package that is not installed)."""
import pathlib
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the [test] extra brings tomli
    import tomli as tomllib

from gxpo_kernels._utils import OPTIONAL_DEPS, missing_extra, require

PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize("argv", [["--help"], ["speedup", "--help"], ["train", "--help"]])
def test_cli_without_train_extra_names_it(monkeypatch, capsys, argv):
    from gxpo_kernels import cli
    _hide(monkeypatch, "transformers")
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers" in err and "pip install 'gxpo-kernels[train]'" in err, err


@pytest.mark.parametrize("module", ["matplotlib", "safetensors"])
def test_cli_checks_the_whole_train_extra_before_any_run(monkeypatch, capsys, tmp_path, module):
    # matplotlib draws the report's plot once every run has ended: missing, it must stop the command up front
    from gxpo_kernels import cli
    _hide(monkeypatch, module)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["speedup", "--preset", "test", "--workers", "0", "--no_progress", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.endswith(f"needs {module}, which is not installed: pip install 'gxpo-kernels[train]'\n"), err


def test_trl_integration_without_trl_names_the_extra(monkeypatch):
    from gxpo_kernels.integrations import _trl_trainer, trl
    _hide(monkeypatch, "trl", "packaging")          # TRL brings packaging: without TRL it may be missing too
    with pytest.raises(ImportError, match=r"pip install 'gxpo-kernels\[trl\]'"):
        trl.check_trl_version()
    with pytest.raises(ImportError, match=r"pip install 'gxpo-kernels\[trl\]'"):
        trl.enable_gxpo_loss(object())
    with pytest.raises(ImportError, match=r"pip install 'gxpo-kernels\[trl\]'"):   # GXPOGRPOTrainer's builder
        _trl_trainer.make_trainer_classes(enable_loss=None, unsupported=None, check_version=trl.check_trl_version,
                                          engine=None, entropy_bonus_coef=None)


def test_deepspeed_initialize_without_deepspeed_names_the_extra(monkeypatch):
    from gxpo_kernels.integrations import deepspeed
    _hide(monkeypatch, "deepspeed")
    with pytest.raises(ImportError, match=r"pip install 'gxpo-kernels\[deepspeed\]'"):
        deepspeed.initialize(model=None, config={}, gxpo={})


def test_missing_extra_only_for_optional_dependencies(monkeypatch):
    # a dependency of an optional package that is missing is a broken install, not a missing extra: re-raised
    assert missing_extra(ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")) is None
    assert missing_extra(ImportError("cannot import name 'X' from 'trl'", name="trl")) is None
    msg = missing_extra(ModuleNotFoundError("No module named 'math_verify'", name="math_verify.parser"), "reward")
    assert msg == "reward needs math-verify, which is not installed: pip install 'gxpo-kernels[math]'"
    _hide(monkeypatch, "tqdm")
    with pytest.raises(ImportError, match=r"progress bars needs tqdm.*gxpo-kernels\[train\]"):
        require("tqdm", "progress bars")


def test_optional_deps_match_pyproject_extras():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for module, (dist, extra) in OPTIONAL_DEPS.items():
        names = [r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                 for r in extras[extra]]
        assert dist in names, f"{module}: extra [{extra}] does not list {dist} ({extras[extra]})"


def _floor(requirement: str):
    from packaging.requirements import Requirement
    from packaging.version import Version
    lows = [Version(s.version) for s in Requirement(requirement).specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


def test_train_extra_floor_has_from_pretrained_dtype():
    """``from_pretrained(dtype=...)`` exists from transformers 4.56 (before: ``torch_dtype``; older releases pass
    the unknown keyword on to the model's constructor, a TypeError): the [train] floor must be at least that."""
    import ast
    from packaging.version import Version
    root = PYPROJECT.parent / "gxpo_kernels"
    uses = [f"{p.relative_to(root)}:{n.lineno}" for p in sorted(root.rglob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", None) == "from_pretrained" and any(k.arg == "dtype" for k in n.keywords)]
    assert uses, "the check reads the call sites it guards"
    train = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["train"]
    (req,) = [r for r in train if r.startswith("transformers")]
    assert _floor(req) is not None and _floor(req) >= Version("4.56"), f"{req}: from_pretrained(dtype=) at {uses}"
