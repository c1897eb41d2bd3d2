"""The generators of docs/build_docs.py that render bench result files."""
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import build_docs  # noqa: E402


def _record(provider, mib, median):
    return {"extra_info": {"provider": provider, "peak_extra_mib": mib, "n_tokens": 8, "H": 4, "V": 16,
                           "dtype": "float32"}, "stats": {"median": median, "min": median, "rounds": 2}}


def test_bench_rows_ratio_is_to_the_fused_provider(tmp_path, monkeypatch):
    """The "x fused" column divided by the first row that had a memory figure: with another provider first in
    the file (or the fused row without one), every ratio was to that provider, under the "x fused" heading."""
    doc = {"datetime": "2026-12-07T00:00:00", "commit_info": {"id": "0123456789ab"},
           "benchmarks": [_record("eager", 400.0, 2.0), _record("fused", 100.0, 3.0), _record("liger", 50.0, 4.0)]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    monkeypatch.setattr(build_docs, "ROOT", tmp_path)
    text = build_docs._bench_rows("r.json", {"fused": "ours", "eager": "eager", "liger": "liger"})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[2] for line in text.splitlines()
            if line.startswith("| ") and "provider" not in line}
    assert rows == {"eager": "4.0x", "ours": "1.0x", "liger": "0.5x"}, text
    # no fused memory figure: no ratio at all rather than one to another provider
    doc["benchmarks"][1]["extra_info"]["peak_extra_mib"] = None
    (tmp_path / "r.json").write_text(json.dumps(doc))
    text = build_docs._bench_rows("r.json", {"fused": "ours", "eager": "eager", "liger": "liger"})
    assert "x |" not in text.replace("x fused |", "") and "| eager | 400 | - |" in text, text


def test_extrapolate_prose_repeats_the_host_overhead_file():
    """docs/extrapolate.md quotes the host-overhead medians in its prose beside the generated table; a new
    cpu-extrapolate-host.json would update the table (build_docs --check) but leave the prose stale."""
    doc = json.loads((ROOT / "bench" / "results" / "cpu-extrapolate-host.json").read_text())
    text = " ".join((ROOT / "docs" / "extrapolate.md").read_text().split())
    ms = {k: f"{v['median_ms']:.3f}" for k, v in doc["results"].items()}
    before = {k: f"{v['median_ms']:.3f}" for k, v in doc["before"]["results"].items()}
    for case in ("extrapolate_same_grads", "extrapolate_new_g1", "extrapolate_new_g1_same_addresses",
                 "extrapolate_new_g0_g1"):
        assert f"{ms[case]} ms instead of {before[case]}" in text, case
    for case in ("plan_same_addresses", "plan_new_addresses", "plan_kept_g0_same_addresses",
                 "plan_kept_g0_new_addresses", "plan_new_tensors_os"):
        assert f"({ms[case]} ms)" in text or f"({ms[case]} ms;" in text, case
    assert f"{ms['extrapolate_same_grads']} ms with the same gradients, {ms['extrapolate_new_g1']} ms with a new g1" \
        in text
    p = doc["passes_us"]
    # the compiled pass behind the public op's checks, against one attribute read in Python
    attr = [p[k] for k in ("data_ptr", "numel", "is_contiguous", "dtype", "device")]
    assert f"costs {p['tensor_records']:.1f} µs, against {min(attr):.0f} to {max(attr):.0f} µs" in text
    # without a compiler, the floor summed from the Python-level passes: id, data_ptr, dtype, numel and
    # contiguity for params, theta0, g0 and g1 (repeated); a new g1 takes five attribute passes instead of its five
    five = p["id"] + p["data_ptr"] + p["dtype"] + p["numel"] + p["is_contiguous"]
    repeated = 4 * five
    new_g1 = 3 * five + p["data_ptr"] + p["numel"] + p["is_contiguous"] + p["dtype"] + p["device"]
    assert f"about {repeated / 1e3:.2f} ms with repeated gradients and {new_g1 / 1e3:.2f} ms with a new g1" in text


def test_speedup_prose_repeats_the_committed_runs():
    """docs/speedup.md sums up the committed GRPO curves and plateau trials in prose ("from the warm start's 0.43
    to about 0.70 by step 250", "t = 2.6 to 7.5"); a rerun would update the tables but leave the prose stale."""
    text = " ".join((ROOT / "docs" / "speedup.md").read_text().split())
    res = json.loads((ROOT / "docs" / "results" / "speedup-default-results.json").read_text())
    curves = [{p[0]: p[4] for p in seed["curve"]} for seed in res["methods"]["grpo"]["seeds"].values()]
    start = {f"{c[0]:.2f}" for c in curves}
    assert len(start) == 1 and f"from the warm start's {start.pop()} to about 0.70 by step 250" in text
    assert abs(sum(c[250] for c in curves) / len(curves) - 0.70) < 0.015
    ts = [seed["second_half"]["t"] for n in ("constant-600", "constant-1200") for seed in json.loads(
        (ROOT / "docs" / "results" / "plateau-trials" / f"{n}-results.json").read_text()
    )["meta"]["baseline_peaked"]["seeds"].values()]
    assert f"climbs in every seed at both lengths, t = {min(ts):.1f} to {max(ts):.1f})" in text


def test_toy_task_prose_repeats_the_shipped_warm_start():
    """docs/toy-task.md quotes the shipped addition2 warm start's SFT steps and accuracy; they come from the
    checkpoint's own metadata, which a new warm start would change."""
    from safetensors import safe_open
    (path,) = (ROOT / "gxpo_kernels" / "trainer" / "warmstarts").glob("warmstart-addition2-*.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    text = " ".join((ROOT / "docs" / "toy-task.md").read_text().split())
    assert f"it stopped at {meta['sft_steps']} steps with {float(meta['sft_acc']):.2f}" in text


def _ab_medians(rel: str, size: str) -> dict:
    """Per-round and median GXPO bookkeeping shares (%) of one A/B file at one size, as build_docs renders them."""
    import statistics
    doc = json.loads((ROOT / rel).read_text())
    rounds = {w: [100 * r[w][size]["overhead_timer_frac"] for r in doc["rounds"]] for w in ("after", "before")}
    return {w: (f"{statistics.median(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}") for w, v in rounds.items()}


def test_gxpo_bookkeeping_prose_repeats_the_ab_files():
    """docs/extrapolate.md sums up the generated A/B tables in prose ("a median of 3.0% in the third table", "at
    2.8% in the fourth (2.9% before ...)", "2.4% to 3.5% per round"); a new A/B file updates the tables only."""
    text = " ".join((ROOT / "docs" / "extrapolate.md").read_text().split())
    third = _ab_medians("bench/results/cpu-update-throughput-gxpo-ab3.json", "tiny")
    fourth = _ab_medians("bench/results/cpu-update-throughput-gxpo-ab4.json", "tiny")
    assert f"(a median of {third['after'][0]}% in the third table)" in text
    assert f"at {fourth['after'][0]}% in the fourth ({fourth['before'][0]}% before its changes" in text
    assert f"({fourth['after'][1]}% to {fourth['after'][2]}% per round at `tiny` there)" in text
    small = _ab_medians("bench/results/cpu-update-throughput-gxpo-ab4.json", "small")
    assert "`small` meets it" in text and float(small["after"][0]) <= 3.0
    fifth, small5 = (_ab_medians("bench/results/cpu-update-throughput-gxpo-ab5.json", s) for s in ("tiny", "small"))
    assert f"The fifth table measures {fifth['after'][0]}% at `tiny` ({fifth['before'][0]}% before its changes" in text
    assert f"and {small5['after'][0]}% at `small` ({small5['before'][0]}% before)" in text
    assert float(small5["after"][0]) <= 3.0 < float(fifth["after"][0])   # "`small` stays under, `tiny` is not shown"
    sixth, small6 = (_ab_medians("bench/results/cpu-update-throughput-gxpo-ab6.json", s) for s in ("tiny", "small"))
    assert f"measures {sixth['after'][0]}% at `tiny` ({sixth['before'][0]}% before its changes in the same run" in text
    assert f"and {small6['after'][0]}% at `small` ({small6['before'][0]}% before), at a load average" in text
    doc6 = json.loads((ROOT / "bench/results/cpu-update-throughput-gxpo-ab6.json").read_text())
    tiny6 = statistics.median(100 * r["after"]["tiny"]["overhead_timer_frac"] for r in doc6["rounds"])
    assert f"{tiny6:.3f}% unrounded, so still not under the line" in text and tiny6 > 3.0
    assert float(small6["after"][0]) > 3.0   # "`small` is not shown under the line in this run"
    assert not (doc6["after_dirty"] or doc6["before_dirty"])   # both commits measured from clean checkouts


def test_readme_wall_clock_is_the_committed_runs():
    """README.md gives the committed speedup run's wall-clock in minutes; it is the runs file's total."""
    text = " ".join((ROOT / "README.md").read_text().split())
    runs = json.loads((ROOT / "docs" / "results" / "speedup-default-runs.json").read_text())
    n = sum(len(seeds) for seeds in runs["runs"].values())
    assert f"({n} runs on {runs['workers']} worker processes; the committed run took {round(runs['seconds'] / 60)} " \
           "minutes of wall-clock" in text
