"""The public API is pinned: names users import from ``gxpo_kernels`` must not disappear or move."""
import os
import subprocess
import sys

import gxpo_kernels

EXPECTED = {
    "grpo_loss", "GRPOLoss", "GRPOLossOptions", "token_logprobs", "linear_grpo_loss", "LinearGRPOLoss", "linear_token_logprobs",
    "fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs", "fpa_dpo_loss", "fpa_rpo_loss", "fpa_simper_loss",
    "fpa_kto_loss", "fpa_offline_pg_loss", "extrapolate_", "stats_to_dict", "STAT_NAMES", "GXPO", "SFPO",
    "EMAGate", "WindowGate", "EntropyGate", "group_advantages", "group_stats", "fade_advantages",
    "FADEController", "sign_ratio",
}


def test_all_is_pinned():
    assert set(gxpo_kernels.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(gxpo_kernels, name) is not None, name


def test_optional_integrations_not_imported_by_the_package():
    # importing gxpo_kernels must not pull the optional heavy dependencies (fresh interpreter: pytest's own
    # process may already hold them)
    code = ("import sys, gxpo_kernels; bad = [m for m in ('trl', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_readme_api_imports_without_any_extra():
    # `pip install .` installs no extra: every import of the README's API table works with all the optional
    # dependencies missing (None in sys.modules is what `import` does for a package that is not installed),
    # and importing raises no warning
    from gxpo_kernels._utils import OPTIONAL_DEPS
    code = "\n".join([
        "import sys, warnings",
        f"for m in {sorted(OPTIONAL_DEPS)!r}: sys.modules[m] = None",
        "warnings.simplefilter('error')",
        "from gxpo_kernels import *",
        "from gxpo_kernels.integrations import deepspeed, fsdp, trl",
        "from gxpo_kernels.integrations.hf import patch_causal_lm",
        "import gxpo_kernels.cli, gxpo_kernels.trainer.loop, gxpo_kernels.trainer.speedup",
    ])
    for interpret in ("0", "1"):
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": interpret})


def test_public_docstrings_name_every_parameter_and_shapes():
    """Each public function and class says what every parameter of its signature is (by name) and, where it takes
    or returns tensors, their shapes: the FPA objectives' and the gates' docstrings named none of theirs."""
    import inspect
    import re
    tensor_api = {"grpo_loss", "GRPOLoss", "token_logprobs", "linear_grpo_loss", "LinearGRPOLoss",
                  "linear_token_logprobs", "fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs", "fpa_dpo_loss",
                  "fpa_rpo_loss", "fpa_simper_loss", "fpa_kto_loss", "fpa_offline_pg_loss", "extrapolate_",
                  "stats_to_dict", "group_advantages", "group_stats", "fade_advantages", "sign_ratio"}
    bad = []
    for name in sorted(EXPECTED - {"STAT_NAMES"}):
        obj = getattr(gxpo_kernels, name)
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__   # not a base class's
        doc = (doc or "") + ((obj.__init__.__doc__ or "") if inspect.isclass(obj) else "")
        params = [p.name for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        missing = [p for p in params if not re.search(rf"\b{p}\b", doc)]
        if missing:
            bad.append(f"{name}: {missing}")
        if name in tensor_api and not re.search(r"\((B|N|V|len)\b|\bshapes?\b", doc):
            bad.append(f"{name}: no shape")
    assert not bad, bad
