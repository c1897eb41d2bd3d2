"""The sm_90 compile check (bench/sm90): the SASS reader on a known snippet, the whole check on the installed
Triton, the formerly spilling kernels on Triton 3.6 (installed on its own into a cached folder, as
.ci/sm90_triton36.sh does), and the GPU command's CPU dry run."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench.sm90.compile import parse_sass

ROOT = pathlib.Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   MUFU.EX2 R5, R5 ;
        /*0030*/                   SHFL.BFLY PT, R6, R5, 0x10, 0x1f ;
.L_x_2:
        /*0040*/                   FADD R7, R7, R5 ;
        /*0050*/              @!P1 BRA `(.L_x_2) ;
        /*0060*/                   STL [R1], R7 ;
        /*0070*/              @P0 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_parse_sass_loops_and_counts():
    instrs, loops = parse_sass(SASS)
    assert len(instrs) == 9
    outer, inner = sorted(loops, key=lambda lp: -lp.n_instr)
    assert (outer.n_instr, outer.innermost) == (7, False)
    assert (inner.n_instr, inner.innermost) == (2, True)
    assert outer.counts["LDG"] == 1 and outer.counts["MUFU"] == 1 and outer.counts["SHFL"] == 1
    assert outer.counts["LDL_STL"] == 1 and inner.counts["LDG"] == 0


# One fresh process collects every scenario's launches once for the two tests below (a subprocess: the launches
# are recorded from real JIT functions, not the interpreter's), with a copy of the library that has one more kernel.
_COLLECT = """
import json, sys
from bench.sm90 import collect, uncovered_kernels
from bench.sm90.scenarios import library_kernels
items = collect()


def of(ops):   # the compile requests of these ops' scenarios, as collect(ops) lists them
    return [ln for ln, _, cases in items if any(c.split(" [")[0] in ops for c in cases)]


print(json.dumps(dict(
    now=uncovered_kernels(items), kernels=sorted(n for _, n in library_kernels()),
    launched=sorted({ln.name for ln, _, _ in items}), with_new=uncovered_kernels(items, sys.argv[1]),
    extrapolate=[dict(ln.kwargs, C_DT=str(ln.kwargs["C_DT"])) for ln in of(["extrapolate_"])],
    heads=[(str(ln.args[0].dtype), str(ln.args[1].dtype)) for ln in of(["linear_head_fwd", "linear_fpa_fwd"])]),
    default=str))
"""


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    import shutil
    # a copy of the library with one more kernel (and a device helper that kernel calls)
    root = tmp_path_factory.mktemp("lib") / "gxpo_kernels"
    shutil.copytree(ROOT / "gxpo_kernels", root, ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "ops" / "logprobs" / "kernel.py", "a") as f:
        f.write("\n\n@triton.jit\ndef _new_helper(x):\n    return x + 1\n\n\n"
                "@triton.jit(do_not_specialize=['n'])\ndef _new_kernel(p, n, BLOCK: tl.constexpr):\n"
                "    o = tl.arange(0, BLOCK)\n    tl.store(p + o, _new_helper(tl.load(p + o)), mask=o < n)\n")
    p = subprocess.run([sys.executable, "-c", _COLLECT, str(root)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.splitlines()[-1])


def test_sm90_check_compiles_every_library_kernel(collected):
    """A whole run fails on a @triton.jit kernel that no scenario launches: the check only compiled what
    scenarios.py listed, so a new kernel went unchecked while the check still passed."""
    assert collected["now"] == [] and collected["kernels"] == collected["launched"]
    with_new = collected["with_new"]
    assert len(with_new) == 1 and with_new[0].startswith("_new_kernel (gxpo_kernels.ops.logprobs.kernel)"), with_new


# Runs ``python -m MODULE ARGS...`` for each [MODULE, ARGS...] of argv[1] in this one process (one interpreter start
# and import instead of one per command) and prints [exit status, stdout, stderr] per command.
_CLI_RUNS = """
import contextlib, io, json, runpy, sys
res = []
for mod, *args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [mod, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(mod, run_name="__main__", alter_sys=True)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    res.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(res))
"""


def test_sm90_filters_that_match_nothing_fail():
    """A misspelt ``--ops`` or a ``--cases`` that no scenario label holds compiled nothing and exited 0, reporting
    "0 compiles" and no failure: a check that passes having checked nothing. It now exits 2 naming the filter;
    so does the sweep for an op it has no launcher for, and ``--jobs 0``. (No kernel is compiled here.)"""
    cmds = [["bench.sm90", "--ops", "token_logprob_fwd"],
            ["bench.sm90", "--ops", "token_logprobs_fwd", "--cases", "no-such-case"], ["bench.sm90", "--jobs", "0"],
            ["bench.sm90.sweep", "--ops", "fpa_fwd"], ["bench.sm90", "--help"]]
    p = subprocess.run([sys.executable, "-c", _CLI_RUNS, json.dumps(cmds)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = json.loads(p.stdout.splitlines()[-1])
    for cmd, needle, (rc, out, err) in zip(cmds, ("token_logprob_fwd", "no-such-case", "--jobs", "fpa_fwd"), runs):
        assert rc == 2 and needle in err, (cmd, rc, out[-2000:], err[-2000:])
    # the --help text is the whole description, not its first line cut mid-sentence
    rc, out, _ = runs[-1]
    assert rc == 0 and "blown budget" in " ".join(out.split()), out


def test_sm90_extrapolate_scenarios_cover_its_constexpr_branches(collected):
    """The closed-form scale (libdevice pow), the ALIGN = 1 path (a numel off the 16-byte grid) and float64
    params are compiled too: the scenarios used to launch only the Horner form on aligned fp32/bf16 lists. So is
    a fused-linear forward on a bf16 hidden state and an fp32 weight (``fp32_head=True``)."""
    kw = collected["extrapolate"]
    assert any(k["CLOSED"] and k["LIB_POW"] for k in kw) and any(not k["CLOSED"] for k in kw)
    assert any(k["ALIGN"] == 1 for k in kw) and any(k["ALIGN"] > 1 for k in kw)
    assert any("fp64" in k["C_DT"] for k in kw) and any(not k["HAS_GRAD"] for k in kw)
    # mixed head inputs (bf16 hidden, fp32 weight, fp32_head=True) are a forward compile of their own
    assert ["torch.bfloat16", "torch.float32"] in collected["heads"]


def _check_doc(doc, triton_version=None):
    assert doc["failures"] == [], doc["failures"]
    assert doc["kernels"] and all("error" not in k for k in doc["kernels"])
    if triton_version:
        assert doc["triton"] == triton_version
    for k in doc["kernels"]:
        assert 0 < k["registers"] <= 255 and k["local_bytes"] == 0 and k["spill_instructions"] == 0


def test_sm90_check_installed_triton(tmp_path):
    """Every kernel compiles for sm_90 at the launchers' configurations, without a spill, within budget."""
    out = tmp_path / "sm90.json"
    p = subprocess.run([sys.executable, "-m", "bench.sm90", "--json", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    doc = json.loads(out.read_text())
    _check_doc(doc)
    names = {k["kernel"] for k in doc["kernels"]}
    assert {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_fpa_logprobs_fwd_kernel",
            "_fwd_kernel", "_bwd_dlogits_kernel", "_fpa_fwd_kernel", "_extrapolate_kernel"} <= names
    fwd = [k for k in doc["kernels"] if k["kernel"] == "_token_logprobs_fwd_kernel"]
    assert len(fwd) == 12 and all(k["hot_loop"]["instr_per_elem"] <= 12 for k in fwd)   # bf16, fp32, fp16
    assert all(k["hot_loop"]["SHFL"] == 0 and k["hot_loop"]["BAR"] == 0 for k in fwd)   # no cross-thread work
    # the in-place backward: a barrier between the target logit's read and the loop's first store
    bwd = [k for k in doc["kernels"] if k["kernel"] == "_token_logprobs_bwd_kernel"]
    assert bwd and all(min(k["barriers"], default=1 << 30) < k["hot_loop"]["start"] for k in bwd)
    bf16_head = [k for k in doc["kernels"] if k["kernel"] == "_bwd_dlogits_kernel"
                 and k["signature"]["h_ptr"] == "*bf16" and not k["constexprs"]["UPCAST"]]
    assert bf16_head and all(any("64x128x16" in m for m in k["mma"]) for k in bf16_head)
    # extrapolation: full chunks run the unmasked copy of the body; the masked one is for each tensor's last chunk
    ext = {k["cases"][0].split("[")[1].split("]")[0]: k["hot_loop"] for k in doc["kernels"]
           if k["kernel"] == "_extrapolate_kernel"}
    assert {"fp32 master + bf16 copy", "fp32 plain move", "bf16 params"} <= set(ext)
    assert all(h["other_loops_instr_per_elem"] and h["instr_per_elem"] < min(h["other_loops_instr_per_elem"])
               for h in ext.values()), ext
    assert ext["fp32 plain move"]["instr_per_elem"] <= 12 and ext["bf16 params"]["instr_per_elem"] <= 70


def test_sm90_formerly_spilling_kernels_on_triton36(tmp_path):
    """Triton 3.6 (GPU machines): the logits backward (which FPA's backward now is; FPA's own used to spill
    there) and the fused-linear backward (whose d(weight) kernel used to spill there)."""
    out = tmp_path / "sm90-t36.json"
    p = subprocess.run(["bash", ".ci/sm90_triton36.sh", "--json", str(out), "--ops", "token_logprobs_bwd",
                        "linear_head_bwd", "--cases", "bf16"], cwd=ROOT, env=dict(_env(), PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    doc = json.loads(out.read_text())
    _check_doc(doc, "3.6.0")
    assert {k["kernel"] for k in doc["kernels"]} == {"_token_logprobs_bwd_kernel", "_bwd_dlogits_kernel"}


def test_gpu_check_dry_run(tmp_path):
    """bash bench/gpu_check.sh OUTDIR with GPU_CHECK_DRYRUN=1: interpreter, tiny sizes, every stage passes."""
    env = dict(_env(), GPU_CHECK_DRYRUN="1", PY=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    doc = json.loads((tmp_path / "correctness.json").read_text())
    assert len(doc["results"]) >= 11 and all(r["status"] == "pass" for r in doc["results"])
    summary = (tmp_path / "summary.txt").read_text()
    assert "correctness rc=0" in summary and "bench_driver rc=0" in summary and "probe rc=0" in summary
    assert "cpp_build rc=0" in summary   # the C++ extension, built in the background from the start
    assert list((tmp_path / "bench").glob("*.json")) and (tmp_path / "gpu_check.log").is_file()


def test_gpu_check_cpp_build_exit_code_reports_a_failed_build(tmp_path):
    """gpu_check.sh's background build of the C++ extension exits non-zero when the build fails (load_extension
    only warns and returns None), so its ``cpp_build rc=`` in summary.txt tells a failed build from a good one."""
    line = next(ln for ln in (ROOT / "bench/gpu_check.sh").read_text().splitlines() if "load_extension" in ln
                and ln.lstrip().startswith("$PY -c"))
    code = line.split('"')[1]
    env = dict(_env(), CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path))   # no compiler: the build fails
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "could not build" in p.stderr, p.stderr[-2000:]
    assert p.returncode != 0


def test_gpu_correctness_keeps_the_finished_cases_when_cut_short(tmp_path, monkeypatch):
    """correctness.json is rewritten after every case, marked incomplete until the last: the stage's time limit
    (SIGTERM from gpu_check.sh's ``timeout``) used to leave no file at all, losing every finished case."""
    import pytest

    from bench.gpu import correctness as C

    def cut(dev):
        raise KeyboardInterrupt          # stands in for the stage's time limit

    monkeypatch.setattr(C, "cases", lambda tiny: [("a", lambda dev: (True, {"x": 0.0})), ("b", cut),
                                                  ("c", lambda dev: (True, {}))])
    out = tmp_path / "correctness.json"
    with pytest.raises(KeyboardInterrupt):
        C.main(["--out", str(out), "--tiny"])
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == ["a"] and doc["n_cases"] == 3 and doc["complete"] is False
    monkeypatch.setattr(C, "cases", lambda tiny: [("a", lambda dev: (True, {"x": 0.0}))])
    assert C.main(["--out", str(out), "--tiny"]) == 0 and json.loads(out.read_text())["complete"] is True


def test_gpu_correctness_cases_are_reproducible():
    """Every input of a correctness case comes from the case's own seeded generator: the upstream gradients were
    drawn from the global RNG, so a case that failed on the GPU could not be rerun on the same numbers."""
    import torch

    from bench.gpu import correctness as C
    for name, fn in C.cases(True):
        torch.manual_seed(1)
        a = fn("cpu")
        torch.manual_seed(2)
        assert fn("cpu") == a, name


def test_gpu_correctness_fpa_cases_read_a_time_slice(monkeypatch):
    """The GPU check's fpa_logprobs cases give the op the usual next-token slice (B > 1, not contiguous) and
    reference logits with other row strides: the Triton forward addresses each tensor's rows by its own batch and
    time strides in one launch, which a contiguous (N, V) input (one batch row, i_b = 0) never exercises, so the
    first GPU run would not have checked the new address arithmetic at the target size."""
    import gxpo_kernels.ops as ops
    from bench.gpu import correctness as C
    seen, real = [], ops.fpa_logprobs

    def spy(logits, ref_logits, *args, **kwargs):
        seen.append((logits.dim() == 3 and logits.shape[0] > 1 and not logits.is_contiguous(),
                     logits.stride(0) != ref_logits.stride(0)))
        return real(logits, ref_logits, *args, **kwargs)
    monkeypatch.setattr(ops, "fpa_logprobs", spy)
    fpa = [(name, fn) for name, fn in C.cases(True) if name.startswith("fpa_logprobs")]
    assert len(fpa) == 2
    for name, fn in fpa:
        ok, errs = fn("cpu")
        assert ok, (name, errs)
    assert seen == [(True, True)] * 2, seen


def test_gpu_correctness_cases_fail_on_a_nan_output(monkeypatch):
    """A kernel that returns NaN (e.g. reading rows of the wrong tensor or past its end) fails its case. The
    fpa_logprobs and extrapolate_ cases took the worst error with Python's ``max``, which drops a NaN that does
    not come first: NaN reference log-probs, or a NaN in a later parameter, were reported as a pass."""
    import torch

    import gxpo_kernels.ops as ops
    from bench.gpu import correctness as C
    real_fpa, real_x = ops.fpa_logprobs, ops.extrapolate_

    def fpa_nan_ref_logp(*args, **kwargs):
        logp, ref_logp, fpa_logp = real_fpa(*args, **kwargs)
        return logp, torch.full_like(ref_logp, float("nan")), fpa_logp

    def extrapolate_nan_last_param(params, *args, backend, **kwargs):
        stats = real_x(params, *args, backend=backend, **kwargs)
        if backend == "triton":
            params[-1].fill_(float("nan"))
        return stats
    monkeypatch.setattr(ops, "fpa_logprobs", fpa_nan_ref_logp)
    monkeypatch.setattr(ops, "extrapolate_", extrapolate_nan_last_param)
    checked = [(name, fn) for name, fn in C.cases(True) if name.startswith(("fpa_logprobs", "extrapolate_"))]
    assert len(checked) == 5
    for name, fn in checked:
        ok, errs = fn("cpu")
        assert not ok and any(v != v for v in errs.values()), (name, errs)
    assert C.worst([1.0, float("nan"), 2.0]) != C.worst([1.0, float("nan"), 2.0]) and C.worst([1.0, 3.0]) == 3.0
