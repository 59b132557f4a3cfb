"""benchmarks/pipeline_step.py --tiny runs end to end on the CPU and writes what it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = str(Path(__file__).resolve().parents[2])
SCRIPT = os.path.join(ROOT, "benchmarks", "pipeline_step.py")


def test_pipeline_step_tiny_writes_json_and_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "pipeline_step.json").read_text())
    rows = result["rows"]
    combos = {(r["model"], r["compile"], r["steering"]) for r in rows}
    assert combos == {(m, c, s) for m in ("FLUX.1-dev", "SD3.5-Large") for c in ("eager", "regional")
                      for s in ("none", "fused", "reference")}
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["reps"] == 3
        if r["steering"] != "none":
            # tau = -1 gates every token; the telemetry proves the steering ran in every timed call
            assert r["gated_fraction"] == 1.0 and r["steering_active"] is True
    assert result["env"]["torch"] and result["args"]["backend"] == "aot_eager"
    table = (tmp_path / "pipeline_step.md").read_text()
    assert "| model | compile | steering | ms/step p50 |" in table
    assert table.count("\n| FLUX.1-dev |") == 6 and table.count("\n| SD3.5-Large |") == 6
