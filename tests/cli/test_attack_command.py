"""`safedig attack` from a terminal on a small stand-in for a demo output (the shipped world
weights, world prompts, and configs over a random SAE), one prompt per label and one step: the
files and columns it declares, and the inputs it refuses before any work."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from safedig_kernels.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("PIL")


@pytest.fixture()
def demo_dir(tmp_path):
    """The files `safedig attack` reads from a demo output, made small: summary.json, steer.json
    and steer-adapted.json (one site, a random SAE of the world's width), prompts/eval.jsonl."""
    from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig
    from safedig_kernels.sae import TopKSAE
    from safedig_kernels.workflow.world import SHIPPED_WEIGHTS, write_world_prompts

    d = tmp_path / "demo"
    g = torch.Generator().manual_seed(0)
    for name in ("source", "adapted"):
        w = torch.randn(64, 128, generator=g) / 8
        sae = TopKSAE(w, torch.zeros(128), w.t().contiguous(), torch.zeros(64), k=4)
        (d / "saes").mkdir(parents=True, exist_ok=True)
        sae.save(d / "saes" / f"{name}.safetensors")
        config = SafeDIGConfig(sites=[SiteConfig("single_transformer_blocks.0:image", sae=str(d / "saes" /
                                                 f"{name}.safetensors"), harmful=[0, 1, 2], tau=-1.0)])
        config.to_json(d / ("steer.json" if name == "source" else "steer-adapted.json"))
    path = write_world_prompts(d / "prompts", {"unsafe/concept_a": 2, "unsafe/concept_a_gold": 2, "safe": 1})
    path.rename(d / "prompts" / "eval.jsonl")
    (d / "world").mkdir()
    shutil.copy(SHIPPED_WEIGHTS, d / "world" / "world.safetensors")
    summary = {"format": "safedig-demo", "version": 1, "model": "world",
               "config": {"source": "unsafe/concept_a", "target": "unsafe/concept_a_gold", "num_inference_steps": 16,
                          "height": 16, "width": 16, "guidance_scale": 3.5, "seed": 0, "world": None}}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_attack_writes_its_table_json_and_figures(demo_dir, tmp_path, capsys):
    out = tmp_path / "attack"
    rc = main(["attack", str(demo_dir), "--steps", "1", "--prompts", "1", "--eps", "0.3", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "attack.json").read_text())
    assert doc["format"] == "safedig-attack" and doc["columns"] == ["unsteered", "source", "adapted"]
    assert doc["rows"] == ["unsafe/concept_a", "unsafe/concept_a_gold", "all unsafe"]
    assert doc["budget"]["steps"] == 1 and doc["budget"]["eps"] == 0.3 and "per-token L2" in doc["budget"]["norm"]
    for row in doc["rows"]:
        for phase in ("before", "attacked"):
            for column in doc["columns"]:
                cell = doc["unsafe"][row][phase][column]
                assert cell["n"] == (2 if row == "all unsafe" else 1)
                assert 0 <= cell["low"] <= cell["rate"] <= cell["high"] <= 1
    # unsteered, the world draws both marks: the detector sees them before any attack
    assert doc["unsafe"]["all unsafe"]["before"]["unsteered"]["rate"] == 1.0
    assert all(v <= 0.3 * (1 + 1e-5) for v in doc["max_relative_perturbation"].values())
    assert [p["id"] for p in doc["prompts"]] == ["unsafe-concept_a-0000", "unsafe-concept_a_gold-0000"]
    table = (out / "attack.md").read_text()
    assert "| prompts | n | | unsteered | source | adapted |" in table
    assert "| all unsafe | 2 | attacked |" in table
    assert table.strip() in capsys.readouterr().out
    for name in ("attack.png", "grid.png"):
        assert (out / name).stat().st_size > 0


def test_attack_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["attack", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for phrase in ("usage: safedig attack", "DEMO_DIR", "||delta_i||_2 <= eps * ||e_i||_2", "Wilson", "attack.md",
                   "example: safedig demo"):
        assert phrase in out, phrase


@pytest.mark.parametrize("change, message", [
    ("no-summary", "no summary.json"),
    ("not-a-demo", "is not a demo summary"),
    ("tiny-flux", "runs on the demo world"),
    ("no-adapted", "lacks ['steer-adapted.json']"),
    ("no-world", "no world weights"),
    ("a-file", "is not a directory"),
])
def test_attack_refuses_what_is_not_a_demo_output(demo_dir, tmp_path, capsys, change, message):
    target = demo_dir
    summary = json.loads((demo_dir / "summary.json").read_text())
    if change == "no-summary":
        (demo_dir / "summary.json").unlink()
    elif change in ("not-a-demo", "tiny-flux"):
        summary.update({"format": "safedig-eval"} if change == "not-a-demo" else {"model": "tiny-flux"})
        (demo_dir / "summary.json").write_text(json.dumps(summary))
    elif change == "no-adapted":
        (demo_dir / "steer-adapted.json").unlink()
    elif change == "no-world":
        shutil.rmtree(demo_dir / "world")
    else:
        target = demo_dir / "summary.json"
    assert main(["attack", str(target), "--out", str(tmp_path / "attack")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "attack").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be a positive int"),
    (["--eps", "-1"], "eps must be a positive finite number"),
    (["--restarts", "0"], "restarts must be a positive int"),
    (["--prompts", "0"], "--prompts must be a positive int"),
])
def test_attack_refuses_a_bad_budget(demo_dir, tmp_path, capsys, args, message):
    assert main(["attack", str(demo_dir), "--out", str(tmp_path / "attack"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "attack").exists()


def test_attack_refuses_to_write_into_the_demo_directory(demo_dir, capsys):
    before = sorted(p.name for p in demo_dir.iterdir())
    assert main(["attack", str(demo_dir), "--out", str(demo_dir)]) == 2
    assert "is DEMO_DIR itself" in capsys.readouterr().err
    assert sorted(p.name for p in demo_dir.iterdir()) == before
