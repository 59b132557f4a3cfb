"""benchmarks/device_run.sh and device_stages.py: the capped GPU run works the first time.

The device tool returns at most 8 files, at most 2 folders down, named in [A-Za-z0-9._-]; the
script's CPU dry run (SMOKE=1) runs every stage end to end on tiny shapes and must leave a JSON
with every stage and numbers in each.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_stages  # noqa: E402
import gpu_check  # noqa: E402


def _medians(d: dict, *keys: str) -> list:
    return [(d.get(k) or {}).get("median_ms") for k in keys]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None, reason="needs bash and timeout")
def test_smoke_run_records_every_stage_with_numbers(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable, TOTAL_S="900")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    assert all(len(p.relative_to(tmp_path).parts) <= 3 for p in files)

    doc = json.loads((tmp_path / "device_run.json").read_text())
    assert doc["env"]["smoke"] is True and doc["env"]["torch"] and "triton" in doc["env"] and doc["env"]["card"]
    stages = doc["stages"]
    assert set(stages) == set(device_stages.STAGES)
    have_diffusers = True
    try:
        import diffusers  # noqa: F401
    except ImportError:
        have_diffusers = False
    for name, rec in stages.items():
        if name == "pipeline" and not have_diffusers:
            assert rec["status"] == "skipped"
            continue
        assert rec["status"] == "ok", (name, rec)
        assert rec["numbers"] > 0 and rec["errors_inside"] == 0, (name, rec)

    t = stages["gpu_tests"]  # on the CPU every gpu-marked test is collected and skipped
    assert t["tests"] > 0 and t["skipped"] == t["tests"] and not t["failed"] and not t["collection_errors"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                "-p", "no:cacheprovider", "tests/"], cwd=ROOT, capture_output=True, text=True)
    assert t["tests"] == sum(1 for line in collected.stdout.splitlines() if "::" in line)
    assert (tmp_path / "gpu_tests.xml").exists()
    for r in stages["mm_addmm"]["rows"]:
        assert all(v > 0 for v in _medians(r, "mm", "addmm")) and r["addmm_over_mm"] > 0
    for r in stages["select_bias"]["rows"]:
        assert all(v > 0 for v in _medians(r, "gemm", "default_bias_on_load", "default_bias_in_pre"))
        assert r["default_idx_agreement"] > 0.9
    for r in stages["decode"]["rows"]:
        assert all(v > 0 for v in _medians(r, "beta0.5_all", "beta0_all", "beta0_gated10"))
        assert r["beta0.5_all"]["gated_fraction"] == 1.0 and 0 < r["beta0_gated10"]["gated_fraction"] < 0.5
    for r in stages["fused"]["rows"]:
        assert all(v > 0 for v in _medians(r, "gemm", "steer_all_beta0.5", "repel_gated10_beta0"))
        assert r["steer_all_beta0.5"]["gated_fraction"] == 1.0 and r["repel_gated10_beta0"]["over_gemm"] > 0
        for variant in ("bias_in_gemm", "tuned", "one_kernel", "persistent"):
            assert r[f"steer_all_beta0.5_{variant}"]["over_gemm"] > 0, variant
    for call in ("sae_steer", "op"):
        e = stages["eager_n16"][call]
        assert e["host_us_per_call"] > 0 and e["wall_ms_per_call"] > 0 and e["events"]["median_ms"] > 0
    spec = stages["spec_table"]
    assert spec["rows"] and all(r["fused_steer"]["median_ms"] > 0 for r in spec["rows"])
    kc = json.loads((tmp_path / "kernel_check.json").read_text())
    assert {"env", "ceilings", "rows"} <= set(kc)  # gpu_check's layout: benchmarks/results/ can record it
    if have_diffusers:
        assert stages["pipeline"]["rows"] and all("ms_p50" in r for r in stages["pipeline"]["rows"])
        assert (tmp_path / "pipeline_step.json").exists()

    # the summary is printed last (the device tool returns the output's tail), targets included
    md = (tmp_path / "device_run.md").read_text()
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])
    assert "Spec §6 targets" in md and len(md) < 12000


def test_missing_gpu_test_path_fails_loudly():
    assert gpu_check.gpu_test_targets("tests/") == ["tests/"]
    with pytest.raises(FileNotFoundError, match="test_kernels_gpu_moved.py"):
        gpu_check.gpu_test_targets("tests/ tests/test_kernels_gpu_moved.py")


def test_junit_summary_counts_outcomes_and_collection_errors(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5" time="1.5">'
        '<testcase classname="tests.ops.test_a" name="test_ok" time="0.1" />'
        '<testcase classname="tests.ops.test_a" name="test_bad" time="0.1"><failure message="boom" /></testcase>'
        '<testcase classname="tests.ops.test_a" name="test_skip" time="0"><skipped message="x" /></testcase>'
        '<testcase classname="" name="tests.ops.test_b" time="0"><error message="collection failure" /></testcase>'
        '<testcase classname="" name="tests.ops.test_b" time="0"><error message="collection failure" /></testcase>'
        '</testsuite></testsuites>')
    s = gpu_check.summarize_junit(xml)
    assert (s["tests"], s["passed"], s["failed_count"], s["skipped"], s["errors"]) == (3, 1, 1, 1, 1)
    assert s["failed"] == ["tests.ops.test_a::test_bad"] and s["collection_errors"] == ["tests.ops.test_b"]
    assert "COLLECTION ERRORS" in s["summary"]
    log = ("[gw0] [ 50%] PASSED tests/ops/test_a.py::test_ok\n[gw1] [100%] FAILED tests/ops/test_a.py::test_bad\n"
           "tests/x.py::test_c SKIPPED (needs a CUDA device)\n")
    c = gpu_check.count_log_outcomes(log)
    assert (c["tests"], c["passed"], c["failed_count"], c["skipped"]) == (3, 1, 1, 1)


def test_finish_records_killed_and_unstarted_stages(tmp_path):
    device_stages.put_stage(tmp_path, "decode", {"status": "running", "rows": [{"shape": "s", "N": 1}]})
    device_stages.finish(tmp_path, "decode", 124, 31.0)
    device_stages.finish(tmp_path, "pipeline", -1, None)
    doc = json.loads((tmp_path / "device_run.json").read_text())
    assert doc["stages"]["decode"]["status"] == "timeout" and doc["stages"]["decode"]["rows"]
    assert doc["stages"]["pipeline"]["status"] == "skipped"
    md = (tmp_path / "device_run.md").read_text()
    assert "| decode | timeout |" in md and "| pipeline | skipped |" in md and "| fused | not run |" in md


def test_a_stage_stopped_by_its_cap_saves_what_it_has(tmp_path):
    # SIGTERM (what `timeout` sends at a stage's cap) a few seconds into the interpreted selection stage
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "device_stages.py"), "--out", str(tmp_path),
                             "--stage", "select_bias", "--smoke"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "device_run.json").exists():
            time.sleep(0.1)
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    rec = json.loads((tmp_path / "device_run.json").read_text())["stages"]["select_bias"]
    assert rec["status"] == "timeout" and "signal" in rec["reason"] and rec["seconds"] > 0
