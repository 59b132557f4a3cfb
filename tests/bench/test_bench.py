"""The benchmark suite (safedig_kernels/bench/) on a CPU: the CPU set end to end through the CLI, the
pytest-benchmark front end, the correctness gate (broken providers refused, a legitimate
near-tie choice accepted), and the reports checked against numbers computed here from two
recorded CPU results (tests/data/bench_cpu_{a,b}.json, real runs of `--set cpu`, the second
with `--no-compile`).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safedig_kernels import reference
from safedig_kernels.bench import main
from safedig_kernels.bench import providers as prov
from safedig_kernels.bench.check import check_outputs
from safedig_kernels.bench.report import ReportError, load, render_results
from safedig_kernels.bench.runner import build_cases
from safedig_kernels.bench.shapes import MODELS, OPS, Shape, entries, model_shape
from safedig_kernels.bench.timing import percentile

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURE_A, FIXTURE_B = DATA / "bench_cpu_a.json", DATA / "bench_cpu_b.json"


def _clean_env() -> dict:
    # tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests; the benchmark must not need it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# -- the CPU set, end to end through the command line --------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cpu")
    # The timeout only stops a hung run; how long the set takes is for the benchmarks to record, not
    # for a test to assert (wall time depends on the machine and its load).
    p = subprocess.run([sys.executable, "-m", "safedig_kernels.bench", "run", "--set", "cpu", "--out", str(out)],
                       cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    return out, p


def test_cpu_set_runs_and_writes_every_case(cpu_run):
    out, p = cpu_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    expected = [c.id for c in build_cases("cpu", torch.device("cpu"), torch.float32)]
    assert [b["name"] for b in doc["benchmarks"]] == expected
    assert all(b["extra_info"]["check"]["passed"] is True for b in doc["benchmarks"])
    info = doc["machine_info"]["safedig"]
    assert info["device_type"] == "cpu" and info["device"].startswith("CPU") and not info["triton_interpret"]
    assert info["fused_runs_reference"] is True


def test_cpu_set_writes_csv_table_and_plots_labelled_cpu(cpu_run):
    out, p = cpu_run
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    info = doc["machine_info"]["safedig"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["benchmarks"])
    for r in rows:  # device, versions, git revision and date on every row
        assert r["device"] == info["device"] and r["device"].startswith("CPU")
        assert r["torch"] == torch.__version__ and r["date"] == info["date"] and r["git"] == (info["git"] or "")
    md = (out / "results.md").read_text()
    assert md.startswith("## CPU numbers (no GPU)")
    assert "### steer (CPU)" in md and "ran the PyTorch reference" in md
    pngs = sorted((out / "plots").glob("*.png"))
    families = {(b["extra_info"]["op"], b["extra_info"]["family"]) for b in doc["benchmarks"]}
    multi_n = [f for f in families if len({b["extra_info"]["N"] for b in doc["benchmarks"]
                                           if (b["extra_info"]["op"], b["extra_info"]["family"]) == f}) > 1]
    assert len(pngs) == len(multi_n) > 0
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_pytest_benchmark_suite_writes_json_the_report_reads(tmp_path):
    out = tmp_path / "pb.json"
    p = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "-q", "-p", "no:cacheprovider",
                        "-k", "N16", "--safedig-no-compile", "--benchmark-json", str(out)],
                       cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    names = {b["extra_info"]["provider"] for b in doc["benchmarks"]}
    assert names == {"torch_mm", "eager_reference", "eager_anchor", "fused"}
    assert all(b["stats"]["data"] for b in doc["benchmarks"])
    res = load(out)
    assert res.is_cpu and {r.N for r in res.rows} == {16}
    assert all(r.p20_ms <= r.median_ms <= r.p80_ms for r in res.rows)


def test_pytest_benchmark_suite_refuses_a_wrong_row(tmp_path):
    out = tmp_path / "pb.json"
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env["PYTHONPATH"]])
    p = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "-q", "-p", "no:cacheprovider",
                        "-p", "_bench_broken_fused", "-k", "N16 and steer and (fused or eager_reference)",
                        "--safedig-no-compile", "--benchmark-json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    bad = "steer-cpu-small-4x-k32-N16-float32-fused"
    assert p.returncode == 1 and f"REFUSED {bad}" in p.stdout, p.stdout[-3000:]
    names = [b["extra_info"]["provider"] for b in json.loads(out.read_text())["benchmarks"]]
    assert names == ["eager_reference"]


# -- the correctness gate ----------------------------------------------------------------

def _broken(kind: str):
    def build(p: prov.Prepared):
        good = prov.BUILDERS[("steer", "eager_reference")](p)
        x = p.inputs.x

        def fn():
            y, h = good()
            if kind == "scaled":
                return y * 1.02, h
            if kind == "one_token_unsteered":
                y = y.clone()
                y[3] = x[3]
                return y, h
            if kind == "no_repel":
                i = p.inputs
                return reference.steer(*i.steer_args()[:7], torch.zeros_like(i.gamma), *i.steer_args()[8:],
                                       upcast=False)
            if kind == "harm_score_wrong":
                return y, h * 1.5
            if kind == "nan":
                y = y.clone()
                y[0, 0] = float("nan")
                return y, h
            if kind == "wrong_dtype":
                return y.double(), h
            if kind == "raises":
                raise RuntimeError("kernel launch failed")
            raise AssertionError(kind)
        return fn
    return build


@pytest.mark.parametrize("kind", ["scaled", "one_token_unsteered", "no_repel", "harm_score_wrong", "nan",
                                  "wrong_dtype", "raises"])
def test_broken_provider_is_refused_and_not_reported(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prov.BUILDERS, ("steer", "fused"), _broken(kind))
    rc = main(["run", "--set", "cpu", "--shapes", "N16", "--ops", "steer", "--providers", "eager_reference,fused",
               "--out", str(tmp_path)])
    captured = capsys.readouterr()
    bad = "steer-cpu-small-4x-k32-N16-float32-fused"
    assert rc == 1
    assert f"REFUSED {bad}" in captured.out and bad in captured.err
    doc = json.loads((tmp_path / "results.json").read_text())
    names = [b["name"] for b in doc["benchmarks"]]
    assert bad not in names and "steer-cpu-small-4x-k32-N16-float32-eager_reference" in names
    for f in ("results.csv", "results.md"):
        text = (tmp_path / f).read_text()
        assert "eager_reference" in text and "| fused |" not in text and ",fused," not in text


def test_correct_provider_with_the_other_near_tie_choice_passes():
    """Duplicate feature a's encoder column into feature b (different decoder rows): the two
    tie at token 0's k-th place. The reference on the SAE with a and b swapped picks the other
    one, a different but correct output that a plain comparison would call wrong."""
    prep = prov.Prepared(Shape("tie", 8, 64, 256, 8, "test"), torch.float32, torch.device("cpu"))
    i = prep.inputs
    pre = reference.encoder_preactivations(i.x, i.W_enc, i.b_enc, i.b_dec)
    order = pre[0].argsort(descending=True)
    a, b = int(order[i.k - 1]), int(order[i.k + 5])
    i.W_enc[:, b], i.b_enc[b] = i.W_enc[:, a], i.b_enc[a]
    perm = torch.arange(256)
    perm[a], perm[b] = b, a
    y_other, h_other = reference.steer(i.x, i.W_enc[:, perm], i.b_enc[perm], i.W_dec[perm], i.b_dec,
                                       i.harmful[perm], i.beta, i.gamma, i.tau, i.k, upcast=False)
    y_o = prep.oracle("steer")["y"]
    assert (y_other[0].double() - y_o[0]).norm() > 1e-2 * y_o[0].norm()  # the choice really differs
    assert check_outputs("steer", {"y": y_other, "h": h_other}, prep).passed
    y_bad = y_other.clone()
    y_bad[0] += 0.05 * y_o[0].norm() / 8 * torch.randn(64)  # not explained by the tie
    assert not check_outputs("steer", {"y": y_bad, "h": h_other}, prep).passed


def test_topk_provider_choosing_below_the_tie_window_is_refused():
    prep = prov.Prepared(Shape("tie", 8, 64, 256, 8, "test"), torch.float32, torch.device("cpu"))
    vals, idx = prov.BUILDERS[("topk_encode", "eager_reference")](prep)()
    pre = prep.pre_hi
    assert check_outputs("topk_encode", {"vals": vals, "idx": idx}, prep).passed
    low = pre.argsort(-1)[:, :1].int()  # the smallest feature instead of the k-th largest
    idx2 = torch.cat([idx[:, :-1], low], -1)
    vals2 = torch.cat([vals[:, :-1], pre.gather(-1, low.long()).clamp_min(0).float()], -1)
    r = check_outputs("topk_encode", {"vals": vals2, "idx": idx2}, prep)
    assert not r.passed and "below the k-th largest" in r.reason


# -- reports from a recorded result -------------------------------------------------------

def _expected_rows(doc: dict) -> dict:
    """Every reported quantity, recomputed here from the raw JSON."""
    ceil = doc["machine_info"]["safedig"]["ceilings"]
    rows = {}
    for b in doc["benchmarks"]:
        e = b["extra_info"]
        data = np.array(b["stats"]["data"]) * 1e3
        med = float(np.percentile(data, 50))
        floor = 1e3 * max(e["gemm_flops"] / (ceil["gemm_TFLOPs"][e["dtype"]] * 1e12),
                          e["bytes"] / (ceil["copy_GBps"] * 1e9))
        rows[(e["op"], e["shape"], e["provider"])] = dict(
            e=e, median=med, p20=float(np.percentile(data, 20)), p80=float(np.percentile(data, 80)),
            tflops=e["flops"] / med * 1e-9, floor=floor, pct=100 * floor / med)
    for (op, shape, _), r in rows.items():
        same = {p: v for (o, s, p), v in rows.items() if (o, s) == (op, shape)}
        for kind in ("eager", "compiled"):
            base = [v["median"] for v in same.values() if v["e"]["kind"] == kind]
            r[kind] = min(base) / r["median"] if base else None
        gemm = rows.get(("encoder_gemm", shape, "torch_mm"))
        r["gemm"] = r["median"] / gemm["median"] if gemm and op in ("steer", "topk_encode") else None
    return rows


def _tables(md: str) -> dict:
    """{(op, shape, provider): cells} from the markdown's per-op tables."""
    out, op = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            op = line[4:].split()[0]
            op = op if op in (*OPS, "encoder_gemm") else None
        elif line.startswith("| ") and op and not line.startswith("| shape") and not line.startswith("| spec"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[(op, cells[0], cells[3])] = cells
    return out


def _close(cell: str, value, digits: int) -> bool:
    if value is None:
        return cell == "—"
    return float(cell) == pytest.approx(value, rel=10 ** (1 - digits))


def test_markdown_table_matches_numbers_computed_from_the_recorded_json():
    doc = json.loads(FIXTURE_A.read_text())
    expected = _expected_rows(doc)
    md = _render(FIXTURE_A)
    md_rows = _tables(md)
    assert md.startswith("## CPU numbers (no GPU)")
    assert set(md_rows) == set(expected)
    for key, r in expected.items():
        c = md_rows[key]
        assert int(c[1]) == r["e"]["N"] and c[2] == r["e"]["dtype"]
        for col, val, digits in ((4, r["median"], 4), (5, r["p20"], 4), (6, r["p80"], 4), (7, r["tflops"], 3),
                                 (8, r["floor"], 4), (9, r["pct"], 3), (10, r["eager"], 3), (11, r["compiled"], 3),
                                 (12, r["gemm"], 3)):
            assert _close(c[col], val, digits), (key, col, c[col], val)
    assert any(r["compiled"] is not None for r in expected.values())  # the fixture has compiled rows
    assert any(r["gemm"] is not None for r in expected.values())


def _render(path: Path) -> str:
    from safedig_kernels.bench.report import to_markdown

    return to_markdown(load(path))


def test_csv_matches_numbers_computed_from_the_recorded_json(tmp_path):
    doc = json.loads(FIXTURE_A.read_text())
    expected = _expected_rows(doc)
    assert main(["report", str(FIXTURE_A), "--out", str(tmp_path), "--no-plots"]) == 0
    with open(tmp_path / "results.csv") as f:
        got = {(r["op"], r["shape"], r["provider"]): r for r in csv.DictReader(f)}
    assert set(got) == set(expected)
    env = doc["machine_info"]["safedig"]
    for key, r in expected.items():
        g = got[key]
        assert (g["device"], g["torch"], g["git"], g["date"]) == (env["device"], env["torch"], env["git"], env["date"])
        for col, val in (("median_ms", r["median"]), ("p20_ms", r["p20"]), ("p80_ms", r["p80"]),
                         ("tflops", r["tflops"]), ("floor_ms", r["floor"]), ("pct_of_floor", r["pct"]),
                         ("speedup_vs_eager", r["eager"]),
                         ("speedup_vs_compiled", r["compiled"]), ("vs_gemm", r["gemm"])):
            assert (g[col] == "") if val is None else float(g[col]) == pytest.approx(val, rel=1e-9), (key, col)


def test_report_refuses_a_row_without_a_passed_check(tmp_path, capsys):
    doc = json.loads(FIXTURE_A.read_text())
    victim = doc["benchmarks"][2]
    victim["extra_info"]["check"]["passed"] = False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ReportError, match=victim["name"]):
        load(bad)
    assert main(["report", str(bad), "--out", str(tmp_path / "r")]) == 1
    assert victim["name"] in capsys.readouterr().err
    assert not (tmp_path / "r" / "results.md").exists()


def test_percentile_matches_numpy():
    data = [float(v) for v in np.random.default_rng(0).random(23)]
    for q in (0, 20, 50, 80, 100):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12)


# -- comparison of two recorded results ---------------------------------------------------

def test_compare_prints_per_row_ratios(capsys):
    a, b = (json.loads(p.read_text()) for p in (FIXTURE_A, FIXTURE_B))

    def medians(doc):
        return {(x["extra_info"]["op"], x["extra_info"]["shape"], x["extra_info"]["provider"]):
                float(np.percentile(x["stats"]["data"], 50)) for x in doc["benchmarks"]}

    ma, mb = medians(a), medians(b)
    assert main(["compare", str(FIXTURE_A), str(FIXTURE_B)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "op":
            rows[(cells[0], cells[1], cells[3])] = cells
    common = set(ma) & set(mb)
    assert set(rows) == common and common
    for key in common:
        assert float(rows[key][6]) == pytest.approx(mb[key] / ma[key], rel=1e-2)
        assert float(rows[key][4]) == pytest.approx(ma[key] * 1e3, rel=1e-3)
    only_a = sorted(set(ma) - set(mb))
    assert only_a and all("compiled" in k[2] for k in only_a)  # B was recorded with --no-compile
    line = next(ln for ln in out.splitlines() if ln.startswith("only in base"))
    for op, shape, provider in only_a:
        assert f"{op}/{shape}/float32/{provider}" in line


# -- RESULTS.md and the shape registry -------------------------------------------------------

def test_results_md_is_exactly_what_the_generator_renders(monkeypatch):
    monkeypatch.chdir(ROOT)  # as `python -m safedig_kernels.bench results` runs: from the repository root
    recorded = sorted(Path("benchmarks/results").glob("*.json"))
    assert Path("benchmarks/RESULTS.md").read_text() == render_results(recorded)
    assert main(["results", "--check"]) == 0


def test_results_generator_renders_a_recorded_result():
    text = render_results([FIXTURE_A])
    doc = json.loads(FIXTURE_A.read_text())
    assert "No GPU results are recorded yet" not in text
    assert f"## CPU numbers (no GPU): {doc['machine_info']['safedig']['device']} (`{FIXTURE_A.name}`)" in text
    assert _tables(text).keys() == _expected_rows(doc).keys()
    assert render_results([]).rstrip().endswith("No GPU results are recorded yet.")


def test_kernel_check_renders_the_profiler_breakdown_and_graph_timings():
    from safedig_kernels.bench.device_reports import kernel_check_markdown

    row = {"shape": "flux-4x", "N": 4608, "d": 3072, "F": 12288, "k": 32, "gemm": {"median_ms": 0.5},
           "fused_steer": {"median_ms": 1.0}, "fused_steer_split": {"median_ms": 1.0},
           "fused_steer_row": {"median_ms": 1.25},
           "breakdown": {"span_ms": 1.0, "busy_ms": 0.875, "launches_per_call": 5,
                         "kernels": [{"name": "cuBLAS GEMM", "ms": 0.5}, {"name": "_steer_fwd_kernel", "ms": 0.375}]}}
    doc = {"env": {"device": "GPU", "torch": "t", "triton": "tr", "date": "d"}, "ceilings": {}, "rows": [row],
           "sweep": {"select_small_n": [{"N": 16, "algo": "row", "median_ms": 0.17, "graph_ms": 0.02}],
                     "steer_small_n": [{"N": 16, "one_launch": True, "median_ms": 0.1, "graph_ms": 0.04},
                                       {"N": 16, "one_launch": False, "median_ms": 0.15}],
                     "decode_16x": [{"BLOCK_D": 256, "K_BLOCK": 8, "num_warps": 2, "median_ms": 0.3},
                                    {"BLOCK_D": 1024, "K_BLOCK": 8, "num_warps": 4, "median_ms": 0.4}]}}
    text = kernel_check_markdown(doc)
    assert ("- flux-4x: span 1.000 ms per call, 5 launches; cuBLAS GEMM 0.500, _steer_fwd_kernel 0.375; "
            "GPU idle between kernels 0.125.") in text
    assert "Selection alone at small N (ms, per call / CUDA-graph replay): N=16 row 0.170 / 0.020." in text
    assert "- flux-4x: split 1.000, row 1.250." in text
    assert ("Fused steer at small N, \"row\" selection, one kernel or two (ms, per call / CUDA-graph replay): "
            "N=16 one 0.100 / 0.040; N=16 two 0.150.") in text
    assert ("Fused decode alone at the FLUX 16x shape, every token steered (ms): [8, 256] tile, 2 warps: 0.300; "
            "[8, 1024] tile, 4 warps: 0.400; slowest swept 0.400.") in text


def test_host_overhead_script_counts_launches_per_path():
    # a subprocess: the script stubs the kernel launchers for its whole process
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"),
                          "--calls", "20", "--runs", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for via in ("dispatcher", "eager fast path"):  # the same launches either way
        assert rows[f"default, {via}"].endswith("| _steer_row_kernel ×1 |")
        assert rows[f"row, two kernels, {via}"].endswith("| _topk_select_kernel ×1, _steer_fwd_kernel ×1 |")
        assert "_split_rank_kernel ×1, _steer_fwd_kernel ×1 |" in rows[f"split, {via}"]


def test_shapes_follow_the_model_configs():
    flux, sd35l, sd35m = MODELS["flux1-dev"], MODELS["sd35-large"], MODELS["sd35-medium"]
    # spec §4: FLUX 4096 image + 512 text tokens at 1024², width 3072; SD3.5 Large width 2432,
    # 4096 image tokens at 1024², CFG batch 2.
    assert (flux.d, flux.image_tokens(1024), flux.text_tokens, flux.batch) == (3072, 4096, 512, 1)
    assert (sd35l.d, sd35l.image_tokens(1024), sd35l.batch) == (2432, 4096, 2)
    assert sd35m.d == sd35m.num_attention_heads * sd35m.attention_head_dim != sd35l.d
    assert model_shape("flux1-dev", 512, 4, 32).N == flux.image_tokens(512) + flux.text_tokens
    assert model_shape("sd35-large", 1024, 16, 64).N == 2 * sd35l.image_tokens(1024)
    for set_name in ("quick", "full"):
        shapes = [e.shape for e in entries(set_name)]
        assert len({s.id for s in shapes}) == len(shapes)
        assert {s.F // s.d for s in shapes} <= {4, 8, 16, 32} and {s.k for s in shapes} <= {32, 64, 128}
        assert model_shape("flux1-dev", 1024, 4, 32) in shapes and any(s.N == 16 for s in shapes)


def test_cli_usage_errors_and_listing(capsys):
    assert main(["run", "--set", "full", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["run", "--ops", "nope", "--device", "cpu"]) == 2
    assert "unknown op" in capsys.readouterr().err
    assert main(["--bogus-flag"]) == 2
    capsys.readouterr()
    assert main(["--list", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[:-1] == [c.id for c in build_cases("cpu", torch.device("cpu"), torch.float32)]


def test_gpu_result_renders_spec_targets_from_its_own_rows():
    """A GPU result (the recorded CPU rows relabelled as bf16 rows at the FLUX 4x shape):
    the spec §6 table shows the ratios of those rows and judges them against TARGETS."""
    from safedig_kernels.bench.report import TARGETS, to_markdown

    doc = json.loads(FIXTURE_A.read_text())
    info = doc["machine_info"]["safedig"]
    info.update(device="Fake GPU", device_type="cuda", cuda="12.8", fused_runs_reference=False)
    info["ceilings"]["gemm_TFLOPs"] = {"bfloat16": info["ceilings"]["gemm_TFLOPs"]["float32"]}
    flux4 = model_shape("flux1-dev", 1024, 4, 32).id
    for b in doc["benchmarks"]:
        e = b["extra_info"]
        e["dtype"] = "bfloat16"
        if e["shape"] == "cpu-small-4x-k32-N64":
            e["shape"] = flux4
    md = to_markdown(load(doc))
    assert md.startswith("## GPU numbers: Fake GPU")
    med = {(b["extra_info"]["op"], b["extra_info"]["provider"]): float(np.percentile(b["stats"]["data"], 50))
           for b in doc["benchmarks"] if b["extra_info"]["shape"] == flux4}
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and flux4 in ln and "encoder GEMM" in ln]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    ratio = med[("steer", "fused")] / med[("encoder_gemm", "torch_mm")]
    assert float(cells[2]) == pytest.approx(ratio, rel=5e-3)
    t = next(t for t in TARGETS if t.metric == "vs_gemm")
    assert cells[5] == ("meets goal" if ratio <= t.goal else "meets must" if ratio <= t.must else "**misses must**")
    compiled = [ln for ln in md.splitlines() if ln.startswith("| fastest torch.compile'd") and flux4 in ln]
    speedup = min(med[("steer", "compiled_reference")], med[("steer", "compiled_anchor")]) / med[("steer", "fused")]
    assert float(compiled[0].split("|")[3]) == pytest.approx(speedup, rel=5e-3)
    assert md.count("| not measured |") == 3  # FLUX 16x (two targets) and N = 16 are not in this result


def test_time_budget_stops_early_and_lists_what_was_not_measured(tmp_path, capsys):
    rc = main(["run", "--set", "cpu", "--no-compile", "--ops", "steer", "--time-budget", "1e-9",
               "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    planned = [c.id for c in build_cases("cpu", torch.device("cpu"), torch.float32, ops=["steer"], compile_=False)]
    assert doc["benchmarks"] == [] and doc["machine_info"]["safedig"]["not_measured"] == planned
    md = (tmp_path / "results.md").read_text()
    assert f"Not measured (run stopped early): {len(planned)} rows" in md and all(f"`{n}`" in md for n in planned)
