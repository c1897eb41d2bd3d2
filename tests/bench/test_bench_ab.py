"""The A/B mode of ``python -m bench.bench_extrapolate OUT --before OTHER_CHECKOUT``: the host-part figures of two
checkouts, timed alternately in fresh processes."""
import json
import math
import pathlib

from bench import bench_extrapolate

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_host_overhead_ab_runs_both_checkouts(tmp_path):
    """Each fresh process loads this checkout's harness by path; it imports its sibling modules relatively, and
    loaded as a lone file it failed with ImportError (the documented command did not run)."""
    out = tmp_path / "ab.json"
    doc = bench_extrapolate.host_overhead_ab(str(out), str(ROOT), rounds=1, reps=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["results"] and set(doc["results"]) == set(doc["before"]["results"])
    for side in (doc["results"], doc["before"]["results"]):
        for case, figures in side.items():
            assert figures and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                   for v in figures.values()), (case, figures)
