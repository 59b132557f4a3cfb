"""docs/scale-out.md's computed table is what benchmarks/scale_out_costs.py computes, from the
measured step times benchmarks/RESULTS.md holds now."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_out_costs  # noqa: E402


def test_doc_table_is_the_computed_one():
    doc = (ROOT / "docs" / "scale-out.md").read_text(encoding="utf-8")
    start = doc.index("<!-- scale-out table: benchmarks/scale_out_costs.py -->\n")
    end = doc.index("<!-- end of scale-out table -->")
    assert doc[start:end].split("\n", 1)[1].strip() == scale_out_costs.table().strip()


def test_costs_follow_the_degree():
    rows = {r["gpus"]: r for r in scale_out_costs.rows()}
    assert rows[1]["ulysses_mb"] == rows[1]["ring_mb"] == 0  # one GPU sends nothing
    # Ulysses at P = 2: 57 layers x 4 tensors x 2304 tokens x 3072 x 2 bytes x 1/2, plus half the gathered output
    assert rows[2]["ulysses_mb"] == pytest.approx((57 * 4 * 2304 * 3072 * 2 / 2 + 4608 * 64 * 2 / 2) / 1e6)
    for p in (2, 4, 8):
        assert rows[p]["steer_ms"] == pytest.approx(rows[1]["steer_ms"] / p)
        assert rows[p]["ring_mb"] >= rows[p]["ulysses_mb"]


def test_missing_rows_are_refused(tmp_path):
    (tmp_path / "RESULTS.md").write_text("| FLUX.1-dev | eager | none | 175.0 |\n")
    with pytest.raises(ValueError, match="FLUX.1-dev eager"):
        scale_out_costs.measured_step_ms(tmp_path / "RESULTS.md")
