"""Guards the benchmark driver and the README table: record -> figure normalisation (bytes / FLOPs / % of the
measured ceiling, quantiles from either source), the results schema check, device slugs, picking the latest
results file per device, marker replacement, and one end-to-end driver run in smoke mode (tiny sizes)."""
import copy
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import readme_table as rt  # noqa: E402
from bench import roofline as rl  # noqa: E402
from bench import run as drv  # noqa: E402
from bench.report import render_markdown  # noqa: E402

CEIL = {"copy": {"gbps": 100.0, "p50_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "nbytes": 10 ** 8},
        "matmul": {"tflops": 2.0, "p50_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "flops": 2 * 10 ** 9, "n": 1000,
                   "dtype": "float32"}}


def _doc(figures, date="2026-11-22", ts="2026-11-22T10:00:00+00:00", slug="cpu-x-2c", kind="cpu"):
    return {"schema_version": drv.SCHEMA_VERSION, "date": date, "timestamp": ts,
            "device": {"kind": kind, "name": "X (2 cores)", "slug": slug, "cores": 2},
            "versions": {"torch": "2.13.0", "triton": "3.9.0", "transformers": "5", "deepspeed": None,
                         "liger_kernel": "0.8.5"},
            "git": {"commit": "abc123", "dirty": False}, "ceilings": copy.deepcopy(CEIL),
            "suite": {"smoke": False}, "runs": [{"file": "bench_fpa.py", "status": "passed", "wall_s": 1.0}],
            "figures": figures}


def test_figure_from_own_quantiles_and_bytes():
    rec = {"name": "test_fpa_logprobs[gxpo-fwd-N4-V8]", "params": {"provider": "gxpo"},
           "extra_info": {"op": "fpa_logprobs", "provider": "gxpo", "mode": "fwd", "N": 4, "V": 8,
                          "dtype": "float32", "bytes": 5 * 10 ** 7, "p50_ms": 1.0, "p20_ms": 0.8, "p80_ms": 1.5,
                          "timer": "perf_counter"},
           "stats": {"median": 9.0, "data": [9.0, 9.0]}}
    f = drv.figure_from_record(rec, "bench_fpa.py", CEIL)
    assert (f["op"], f["provider"], f["mode"], f["sizes"]) == ("fpa_logprobs", "gxpo", "fwd", {"N": 4, "V": 8})
    assert (f["p50_ms"], f["p20_ms"], f["p80_ms"]) == (1.0, 0.8, 1.5)    # the bench's own timer wins
    assert f["gbps"] == pytest.approx(50.0) and f["pct_copy_bw"] == pytest.approx(50.0)
    assert f["tflops"] is None and f["pct_matmul"] is None and f["test"].startswith("bench_fpa.py::")


def test_figure_from_pytest_benchmark_data_and_roofline_fill():
    # helper-B style record: no op / bytes / quantiles, sizes + dtype + peak memory only
    data = [0.001 * i for i in range(1, 12)]
    rec = {"name": "test_cpu_fwd_bwd[fused]", "params": {"provider": "fused"},
           "extra_info": {"B": 2, "T": 8, "H": 16, "V": 100, "dtype": "float32", "metric": "fwd+bwd",
                          "peak_extra_mib": 12.5},
           "stats": {"median": 0.006, "data": data}}
    f = drv.figure_from_record(rec, "bench_linear_grpo_loss.py", CEIL)
    assert f["op"] == "linear_grpo_loss" and f["provider"] == "fused" and f["mode"] == "fwd+bwd"
    assert f["p50_ms"] == pytest.approx(6.0) and f["p20_ms"] == pytest.approx(3.0)
    assert f["flops"] == 6 * 16 * 16 * 100 and f["bytes"] == rl.linear_grpo_loss_bytes(16, 16, 100, 4)
    assert f["tflops"] == pytest.approx(f["flops"] / 6e-3 / 1e12)
    assert f["pct_matmul"] == pytest.approx(100 * f["tflops"] / 2.0)
    assert f["peak_mem_mib"] == 12.5
    # the FPA head bench: op from the file name, H_ref kept as a size, FLOPs from the record itself
    fpa = drv.figure_from_record({"name": "test_cpu_fwd_bwd[materialised]", "params": {"provider": "materialised"},
                                  "extra_info": {"B": 2, "T": 8, "H": 16, "H_ref": 12, "V": 100, "dtype": "float32",
                                                 "metric": "fwd+bwd", "provider": "materialised",
                                                 "peak_extra_mib": 3.0, "flops": 10 ** 9},
                                  "stats": {"median": 0.006, "data": data}}, "bench_linear_fpa.py", CEIL)
    assert (fpa["op"], fpa["provider"], fpa["mode"]) == ("linear_fpa_logprobs", "materialised", "fwd+bwd")
    assert fpa["sizes"] == {"B": 2, "T": 8, "H": 16, "H_ref": 12, "V": 100} and fpa["bytes"] is None
    assert fpa["flops"] == 10 ** 9 and fpa["pct_matmul"] == pytest.approx(100 * (1e9 / 6e-3 / 1e12) / 2.0)
    assert "bench_linear_fpa.py" in drv.FILES and fpa["peak_mem_mib"] == 3.0
    # per-test op names and unknown files
    ext = drv.figure_from_record({"name": "test_gxpo_step_overhead", "extra_info": {}, "stats": None},
                                 "bench_extrapolate.py", CEIL)
    assert ext["op"] == "gxpo_step_overhead" and ext["p50_ms"] is None and ext["gbps"] is None
    assert drv.figure_from_record({"name": "t", "extra_info": {}}, "bench_new.py", None)["op"] == "bench_new"


def test_validate_results_accepts_and_names_problems():
    rec = {"name": "t[a]", "extra_info": {"op": "grpo_loss", "provider": "a", "mode": "fwd+bwd", "N": 2, "V": 3,
                                          "dtype": "bfloat16", "p50_ms": 1.0, "p20_ms": 0.5, "p80_ms": 2.0}}
    doc = _doc([drv.figure_from_record(rec, "bench_grpo_loss.py", CEIL)])
    drv.validate_results(doc)
    assert doc["figures"][0]["bytes"] == rl.grpo_loss_bytes(2, 3, 2)
    bad = copy.deepcopy(doc)
    del bad["ceilings"]["copy"]["gbps"]
    bad["figures"][0]["p50_ms"] = "fast"
    bad["runs"][0]["status"] = "great"
    del bad["versions"]["liger_kernel"]
    with pytest.raises(ValueError) as e:
        drv.validate_results(bad)
    for part in ("ceilings.copy.gbps missing", "figures[0].p50_ms", "status 'great'", "versions.liger_kernel"):
        assert part in str(e.value)
    unordered = copy.deepcopy(doc)
    unordered["figures"][0].update(p20_ms=3.0, timer="perf_counter")
    with pytest.raises(ValueError, match="p20 <= p50 <= p80"):
        drv.validate_results(unordered)
    md = render_markdown(doc)
    assert "| grpo_loss | a | fwd+bwd | N=2 V=3 | bfloat16 | 1 [0.5–2] |" in md


def test_slug_and_device():
    assert drv.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    dev = drv.detect_device()
    assert dev["kind"] in ("cpu", "cuda") and dev["slug"] == drv.slugify(dev["slug"]) and dev["cores"] >= 1


def test_readme_table_latest_per_device_and_markers(tmp_path):
    fig = {"op": "extrapolate_", "provider": "ours", "mode": "-", "sizes": {"numel": 10}, "dtype": None,
           "test": "x", "p50_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "bytes": 200, "flops": None, "gbps": 1e-4,
           "tflops": None, "pct_copy_bw": 1e-4, "pct_matmul": None, "peak_mem_mib": None, "extra": {}}
    old = _doc([dict(fig, provider="old")], date="2026-11-01", ts="2026-11-01T00:00:00+00:00")
    new = _doc([fig], date="2026-11-22")
    smoke = _doc([dict(fig, provider="smoke")], date="2026-12-01")
    smoke["suite"]["smoke"] = True
    other = _doc([dict(fig, provider="gpu")], slug="nvidia-h100", kind="cuda")
    for d in (old, new, smoke, other):
        (tmp_path / f"{d['device']['slug']}-{d['date']}.json").write_text(json.dumps(d))
    (tmp_path / "notes.json").write_text("{}")
    latest = rt.latest_per_device(tmp_path)
    assert set(latest) == {"cpu-x-2c", "nvidia-h100"}
    assert latest["cpu-x-2c"]["date"] == "2026-11-22"
    sec = rt.render_section(latest)
    assert sec.startswith(rt.BEGIN) and sec.rstrip().endswith(rt.END)
    assert "| extrapolate_ | ours |" in sec and "| extrapolate_ | old |" not in sec and "smoke" not in sec
    assert "not yet measured" not in sec                      # a CUDA results file exists
    assert "not yet measured" in rt.render_section({"cpu-x-2c": new})
    text = "intro\n<!-- bench:begin -->\nstale\n<!-- bench:end -->\noutro\n"
    out = rt.replace_between_markers(text, sec)
    assert out.startswith("intro\n<!-- bench:begin -->") and out.endswith("<!-- bench:end -->\noutro\n")
    assert "stale" not in out and out.count(rt.BEGIN) == 1
    with pytest.raises(ValueError, match="markers"):
        rt.replace_between_markers("no markers", sec)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert rt.main(["--results", str(tmp_path), "--write", str(readme)]) == 0
    assert "| extrapolate_ | ours |" in readme.read_text()


def test_driver_end_to_end_smoke(tmp_path):
    """python -m bench --smoke on one file: ceilings measured, the file run, a valid .json + .md written."""
    p = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--files", "bench_fpa.py", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    js = list(tmp_path.glob("*.json"))
    assert len(js) == 1 and js[0].with_suffix(".md").is_file()
    doc = json.loads(js[0].read_text())
    drv.validate_results(doc)
    assert doc["suite"]["smoke"] and doc["runs"][0]["status"] == "passed"
    figs = [f for f in doc["figures"] if f["op"] == "fpa_logprobs"]
    assert {f["provider"] for f in figs} >= {"gxpo", "ref_eager"} and {f["mode"] for f in figs} == {"fwd", "fwd+bwd"}
    assert all(f["p50_ms"] > 0 and f["gbps"] > 0 and f["pct_copy_bw"] > 0 for f in figs)


def test_best_ceilings_keeps_the_higher_and_both_values():
    lo = copy.deepcopy(CEIL)
    hi = copy.deepcopy(CEIL)
    hi["copy"]["gbps"], lo["matmul"]["tflops"] = 150.0, 3.0
    best = drv.best_ceilings(lo, hi)
    assert best["copy"]["gbps"] == 150.0 and best["copy"]["measured_gbps"] == [100.0, 150.0]
    assert best["matmul"]["tflops"] == 3.0 and best["matmul"]["measured_tflops"] == [3.0, 2.0]


def test_bench_env_pins_paths_and_threads():
    env = drv._bench_env(smoke=True, kind="cpu", threads=1)
    assert env["BENCH_SMOKE"] == "1" and env["TRITON_INTERPRET"] == "0"     # real CPU paths, not the interpreter
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"].split(drv.os.pathsep)[0] == str(ROOT)
    assert drv._bench_env(smoke=False, kind="cpu")["BENCH_SMOKE"] == "0"
    with pytest.raises(SystemExit):
        drv.main(["--threads", "0"])


def test_file_time_limits_drop_the_last_files_first(tmp_path, monkeypatch):
    """A budget shorter than the reserves of the later files skips the *last* files (run order is priority): the
    reserve kept for later files used to be taken from the first one, which was skipped ("skipped-budget") at
    the ~280 s that bench/gpu_check.sh leaves the driver, while later files ran."""
    clock = {"t": 0.0}
    limits = []

    def fake_run_file(file, timeout_s, smoke, kind, **kw):
        limits.append((file, timeout_s))
        clock["t"] += timeout_s                      # every file uses all the time it is given
        return {"run": {"file": file, "status": "timeout", "wall_s": timeout_s}, "records": []}

    monkeypatch.setattr(drv, "run_file", fake_run_file)
    monkeypatch.setattr(drv, "measure_ceilings", lambda kind, smoke=False: copy.deepcopy(CEIL))
    monkeypatch.setattr(drv, "time", type("T", (), {"perf_counter": staticmethod(lambda: clock["t"])}))
    for budget in (280.0, 150.0, 2000.0):
        limits.clear()
        clock["t"] = 0.0
        doc = json.loads(drv.run_suite(drv.FILES, budget, smoke=True, out_dir=tmp_path,
                                       today="2000-01-01").read_text())
        status = [r["status"] for r in doc["runs"]]
        ran = [s != "skipped-budget" for s in status]
        assert ran[0] and ran == sorted(ran, reverse=True), (budget, status)   # skipped files form a suffix
        assert sum(t for _, t in limits) <= budget - drv.FINAL_S + 1e-9
        assert all(t >= min(drv.RESERVE_S, budget - drv.FINAL_S - sum(u for _, u in limits[:i]))
                   for i, (_, t) in enumerate(limits))
    assert len(limits) == len(drv.FILES) and limits[0][1] == 2000.0 - drv.FINAL_S - drv.RESERVE_S * 5


def test_run_file_timeout_keeps_the_finished_tests_records(tmp_path, monkeypatch):
    """A file that runs out of time is interrupted (SIGINT) before it is killed: pytest-benchmark writes the
    records of the tests that finished, and the driver keeps them (a plain kill lost the whole file)."""
    (tmp_path / "bench_slow.py").write_text(
        "import time\n\n"
        "def test_a_fast(benchmark):\n    benchmark.pedantic(lambda: 1, rounds=3, iterations=1)\n\n"
        "def test_b_slow(benchmark):\n    time.sleep(600)\n")
    monkeypatch.setattr(drv, "BENCH_DIR", tmp_path)
    t0 = drv.time.perf_counter()
    res = drv.run_file("bench_slow.py", 30.0, smoke=True, kind="cpu")
    assert drv.time.perf_counter() - t0 < 45
    assert res["run"]["status"] == "timeout" and res["run"]["n_records"] == 1, res["run"]
    assert [r["name"] for r in res["records"]] == ["test_a_fast"]


def test_readme_table_names_files_cut_short():
    """A timed-out file whose finished tests' figures were kept is "incomplete", not "not in this run"."""
    doc = _doc([])
    doc["runs"] = [{"file": "bench_fpa.py", "status": "timeout", "wall_s": 60.0, "n_records": 3},
                   {"file": "bench_linear_fpa.py", "status": "skipped-budget", "wall_s": 0.0},
                   {"file": "bench_grpo_loss.py", "status": "timeout", "wall_s": 60.0, "n_records": 0}]
    sec = rt.render_section({"cpu-x-2c": doc})
    assert "Not in this run (failed, timed out, skipped or missing): bench_linear_fpa.py, bench_grpo_loss.py." in sec
    assert "only the figures of the tests that finished: bench_fpa.py (timeout)." in sec


def test_smoke_run_does_not_replace_the_days_results(tmp_path, monkeypatch):
    """``python -m bench --smoke`` with the default --out wrote ``<slug>-<date>.json`` into bench/results: the
    same name as that day's real run of the device, which it silently replaced with tiny-size figures."""
    real = _doc([], date="2026-12-07")
    dev = {"kind": "cpu", "name": "X (2 cores)", "slug": "cpu-x-2c", "cores": 2}
    path = tmp_path / "cpu-x-2c-2026-12-07.json"
    path.write_text(json.dumps(real))
    monkeypatch.setattr(drv, "detect_device", lambda: dict(dev))
    monkeypatch.setattr(drv, "measure_ceilings", lambda kind, smoke=False: copy.deepcopy(CEIL))
    monkeypatch.setattr(drv, "run_file", lambda file, *a, **k: {"run": {"file": file, "status": "passed",
                                                                        "wall_s": 0.1, "n_records": 0},
                                                                "records": []})
    out = drv.run_suite(["bench_fpa.py"], 100.0, smoke=True, out_dir=tmp_path, today="2026-12-07")
    assert json.loads(path.read_text()) == real                       # the real run's file is untouched
    assert out.name == "cpu-x-2c-2026-12-07-smoke.json" and json.loads(out.read_text())["suite"]["smoke"]
    assert set(rt.latest_per_device(tmp_path)) == {"cpu-x-2c"}
    assert rt.latest_per_device(tmp_path)["cpu-x-2c"] == real


def test_deselected_node_ids_name_existing_tests():
    """The driver's default deselections must name tests that exist: a renamed CPU-only test would otherwise run
    on CUDA unnoticed (and spend the GPU budget on CPU GEMMs)."""
    import ast
    for node in drv.CPU_DESELECT + drv.CUDA_DESELECT:
        path, func = node.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert path.startswith("bench/") and path[len("bench/"):] in drv.FILES and func in names, node


def test_readme_table_flags_figures_counted_before_the_masked_row_rule():
    """A results file written before masked rows left the byte and FLOP counts (no N_valid in a figure's
    sizes) rendered its GB/s and TFLOP/s with no word that they count masked rows too."""
    fig = {"op": "linear_grpo_loss", "provider": "fused", "mode": "fwd+bwd", "sizes": {"B": 8, "T": 4, "H": 2,
           "V": 5}, "dtype": "float32", "test": "x", "p50_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "bytes": 10,
           "flops": 960, "gbps": 1.0, "tflops": 1.0, "pct_copy_bw": 1.0, "pct_matmul": 50.0, "peak_mem_mib": None,
           "extra": {}}
    old = rt.render_section({"cpu-x-2c": _doc([fig])})
    assert "Rows without N_valid" in old and "read high" in old
    new = rt.render_section({"cpu-x-2c": _doc([dict(fig, sizes=dict(fig["sizes"], N_valid=28))])})
    assert "N_valid" not in new.replace("N_valid=28", "")


def test_interleaved_extrapolate_record_gets_a_labelled_row():
    """bench_extrapolate's interleaved test (one timed call; its medians are in extra_info) showed up in the
    report as op "bench_extrapolate", provider "-", mode "-": a row nobody could read."""
    from bench.run import figure_from_record
    rec = {"name": "test_extrapolate_cpu_interleaved", "extra_info": {"numel": 1000, "provider": "ours",
                                                                       "mode": "interleaved (1 call)"},
           "stats": {"median": 0.002, "min": 0.002, "max": 0.002, "rounds": 1, "data": [0.002]}}
    fig = figure_from_record(rec, "bench_extrapolate.py", None)
    assert (fig["op"], fig["provider"], fig["mode"]) == ("extrapolate_", "ours", "interleaved (1 call)")
