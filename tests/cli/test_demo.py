"""`safedig demo` on the CPU: the demo end to end (quick size) with the numbers it must show,
its determinism, its files as `safedig steer` reads them, and README's first command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safedig_kernels.cli import build_parser, main

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert torch.get_num_threads() == threads  # the demo's one-thread setting does not leak
    return rc, out, json.loads((out / "summary.json").read_text())


def test_demo_quick_end_to_end(quick_demo, capsys):
    from PIL import Image

    from safedig_kernels.integrations.diffusers import SafeDIGConfig
    from safedig_kernels.sae import TopKSAE
    from safedig_kernels.workflow.demo import GRID_ROWS

    rc, out, summary = quick_demo
    assert rc == 0
    assert summary["format"] == "safedig-demo" and summary["config"]["quick"] is True
    rows = {r["label"]: r for r in summary["table"]}
    source, target = summary["config"]["source"], summary["config"]["target"]
    assert set(rows) == {source, target, "safe"}
    for cfg in ("source_sae", "adapted_sae"):
        for label in (source, target):
            r = rows[label]
            # the harm score of unsafe prompts falls, in the source and the shifted target domain
            assert r[cfg]["harm"] < 0.67 * r["harm_unsteered"], (cfg, label, r)
            assert r[cfg]["gated_fraction"] > 4 * rows["safe"][cfg]["gated_fraction"]
        # safe prompts: few tokens over the gate, outputs moved far less than unsafe ones
        safe = rows["safe"][cfg]
        assert safe["gated_fraction"] < 0.05
        assert safe["latents_moved"] < 0.5 * min(rows[x][cfg]["latents_moved"] for x in (source, target))
        assert safe["latents_moved"] < 0.005
    t = summary["overhead"]
    assert t["ms_per_step_without"] > 0 and t["ms_per_step_with"] > 0
    assert t["calls_timed"] == summary["config"]["timing_repeats"] * summary["config"]["num_inference_steps"]

    with Image.open(out / "grid.png") as grid:
        scale = -(-128 // summary["config"]["height"])  # workflow.report.image_scale
        assert grid.height >= 3 * GRID_ROWS * summary["config"]["height"] * scale
        assert grid.width >= 4 * summary["config"]["width"] * scale  # unsteered | source | adapted | diff
    assert Path(summary["files"]["grid"]) == out / "grid.png"

    # The configs it wrote are what `safedig steer` and apply_safedig read; the adapted SAEs
    # keep the source encoder bit for bit.
    src, ad = SafeDIGConfig.from_json(out / "steer.json"), SafeDIGConfig.from_json(out / "steer-adapted.json")
    assert [s.site for s in src.sites] == [s.site for s in ad.sites] and src.sites
    for s, a in zip(src.sites, ad.sites):
        s_sae, a_sae = TopKSAE.load(s.sae), TopKSAE.load(a.sae)
        assert torch.equal(s_sae.W_enc, a_sae.W_enc) and torch.equal(s_sae.b_enc, a_sae.b_enc)
        assert not torch.equal(s_sae.W_dec, a_sae.W_dec)
    for name in ("steer-source", "steer-adapted"):
        report = json.loads((out / name / "report.json").read_text())
        assert len(report["prompts"]) == 3 * summary["config"]["eval_prompts"]


def test_demo_rerun_is_deterministic(quick_demo, capsys):
    _, out, first = quick_demo
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0  # replaces its own files
    printed = capsys.readouterr().out
    second = json.loads((out / "summary.json").read_text())
    assert second["table"] == first["table"] and second["selected"] == first["selected"]
    for phrase in ("Harm score h", "Final latents moved", "Steering overhead, cpu", str(out / "grid.png")):
        assert phrase in printed


def test_steer_reproduces_the_demo_from_its_files(quick_demo, tmp_path, capsys):
    """The demo's last stage is `safedig steer` on the files it wrote: rerunning the command it
    prints moves every held-out prompt's latents exactly as the demo did."""
    _, out, summary = quick_demo
    c = summary["config"]
    assert main(["steer", "--config", str(out / "steer-adapted.json"), "--prompts", summary["files"]["eval_prompts"],
                 "--height", str(c["height"]), "--width", str(c["width"]), "--num-inference-steps",
                 str(c["num_inference_steps"]), "--out", str(tmp_path / "again"), "--no-progress",
                 "--no-images"]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["prompts"]
    demo = json.loads((out / "steer-adapted" / "report.json").read_text())["prompts"]
    assert [p["id"] for p in again] == [p["id"] for p in demo]
    assert [p["change"] for p in again] == [p["change"] for p in demo]
    assert any(p["change"] > 0 for p in again)


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safedig demo: error: --out") and "not written by safedig demo" in err
    assert keep.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_readme_first_command_is_the_default_demo():
    from safedig_kernels.cli.demo import _demo_config
    from safedig_kernels.workflow.demo import DemoConfig

    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    first = next(line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    assert first.rstrip().endswith("safedig demo"), first  # no arguments: the built-in default
    args = build_parser().parse_args(["demo"])
    assert args.out == "safedig-demo" and not args.quick
    assert _demo_config(args) == DemoConfig()
    assert DemoConfig() != DemoConfig.quick_config()  # the test above runs the smaller size, not this one
