"""The TRL-side head comparison stays runnable and its docs table stays generated: every provider of
``bench.bench_trl_heads`` agrees with the logits path at a small size, and docs/trl.md holds exactly the table
``bench.trl_heads_table`` renders from the committed result file."""
import json
import pathlib

import pytest

pytest.importorskip("trl")
pytest.importorskip("liger_kernel")

from bench import bench_trl_heads as B  # noqa: E402
from bench import trl_heads_table as T  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("provider", B.PROVIDERS)
def test_provider_matches_logits_path(provider):
    assert B.check(provider) < 1e-5


def test_docs_table_is_generated_from_the_result_file():
    data = json.loads(T.RESULTS.read_text())
    assert {r["provider"] for r in data["results"]} == set(B.PROVIDERS)
    text = (ROOT / "docs" / "trl.md").read_text()
    section = text[text.index(T.BEGIN) + len(T.BEGIN):text.index(T.END)]
    assert section.strip() == T.render(data).strip()
