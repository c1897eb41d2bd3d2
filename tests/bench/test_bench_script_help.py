"""The bench scripts the docs tell users to run as ``python -m bench.<script>`` answer ``--help`` with their usage
and do nothing else: ``bench.bench_extrapolate --help`` used to time the host part and write its JSON to a file
named ``--help``; ``bench.bench_trl_heads --help`` ran the whole measurement (minutes) and overwrote the committed
``bench/results/cpu-trl-heads.json``."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_bench_extrapolate_help_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "bench.bench_extrapolate", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in p.stdout and "--before" in p.stdout
    assert list(tmp_path.iterdir()) == []                  # no results file, least of all one named --help


def test_bench_trl_heads_help_runs_no_measurement(monkeypatch, capsys):
    pytest.importorskip("trl")
    from bench import bench_trl_heads as B

    def _no_measurement(*a, **k):
        raise AssertionError("--help started the measurement")
    monkeypatch.setattr(B.subprocess, "run", _no_measurement)
    monkeypatch.setattr(sys, "argv", ["bench_trl_heads", "--help"])
    with pytest.raises(SystemExit) as e:
        B.main()
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["bench.side_by_side", "bench.cpu_dispatch", "bench.temperature_precision"])
def test_measurement_scripts_help_writes_nothing(script, tmp_path):
    """The scripts behind generated doc figures answer --help without measuring or writing a results file."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", script, "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in p.stdout
    assert list(tmp_path.iterdir()) == []
