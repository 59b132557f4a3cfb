"""`safedig eval` from a terminal: judging a folder of images, and the bad arguments it refuses
before anything is loaded or written (generation from configs runs in test_demo.py)."""
from __future__ import annotations

import json

import pytest
import torch

from safedig_kernels.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("PIL")


@pytest.fixture()
def world_images(tmp_path):
    """Rendered world pictures as `safedig eval` writes them: unsteered with the marks, `erased`
    with every mark painted over, for 3 prompts per label."""
    from safedig_kernels.workflow.eval import write_images
    from safedig_kernels.workflow.prompts import load_prompts
    from safedig_kernels.workflow.world import LABELS, MARK_PIXELS, render, write_world_prompts

    prompts = load_prompts(write_world_prompts(tmp_path / "prompts", {label: 3 for label in LABELS}))
    pictures = render([p.label for p in prompts], ["circle"] * len(prompts), torch.Generator().manual_seed(0))
    erased = pictures.clone()
    for i, p in enumerate(prompts):
        if p.label == "safe":
            continue
        for px in MARK_PIXELS.values():  # the background colour (corner pixel) where a mark was drawn
            erased[i][:, px[:, 0], px[:, 1]] = erased[i][:, 0, :1]
    write_images({"unsteered": dict(zip([p.id for p in prompts], pictures)),
                  "erased": dict(zip([p.id for p in prompts], erased))}, prompts, tmp_path / "images")
    return tmp_path / "prompts" / "prompts.jsonl", tmp_path / "images"


def test_eval_judges_a_folder_of_images(world_images, tmp_path, capsys):
    prompts, images = world_images
    assert main(["eval", "--prompts", str(prompts), "--images", str(images), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| unsafe/concept_a | 3 | 100% [44%, 100%] | 0% [0%, 56%] |" in printed
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["columns"] == ["unsteered", "erased"] and doc["detector"] == "world"
    assert doc["unsafe"]["safe"]["erased"]["rate"] == 0.0
    assert doc["unsafe"]["unsafe/concept_a_gold"]["unsteered"]["n"] == 3
    assert doc["safe_similarity"]["erased"]["psnr_db"] is None  # safe pictures carry no mark: identical
    assert (tmp_path / "ev" / "eval.md").is_file()


@pytest.mark.parametrize("extra, message", [
    ([], "give either --config NAME=PATH"),
    (["--config", "a=x.json", "--images", "IMAGES"], "give either --config NAME=PATH"),
    (["--config", "unsteered=x.json"], "may not be 'unsteered'"),
    (["--config", "a/b=x.json"], "names a folder"),
    (["--config", "a=x.json", "--config", "a=y.json"], "names must differ"),
    (["--images", "IMAGES", "--threshold", "0.5"], "--threshold applies to the nudenet detector"),
    (["--images", "IMAGES", "--detector", "clip"], "detector must be one of"),
    (["--config", "a=missing.json"], "missing.json"),
])
def test_eval_refuses_bad_arguments(world_images, tmp_path, capsys, extra, message):
    prompts, images = world_images
    out = tmp_path / "ev"
    argv = ["eval", "--prompts", str(prompts), "--out", str(out)] + [str(images) if a == "IMAGES" else a
                                                                      for a in extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eval_names_the_config_whose_json_is_bad(world_images, tmp_path, capsys):
    prompts, _ = world_images
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "safedig-steering/1", "sites": [{"site": 3}]}')
    out = tmp_path / "ev"
    assert main(["eval", "--prompts", str(prompts), "--config", f"adapted={bad}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--config adapted" in err and "bad.json" in err
    assert not out.exists()


def test_eval_refuses_to_mix_columns_with_an_earlier_run(world_images, tmp_path, capsys):
    """Every sub-folder of images/ is a column to a later --images read: an earlier run's
    column left beside this run's would be judged as if it were one of them."""
    prompts, _ = world_images
    out = tmp_path / "ev"
    (out / "images" / "old").mkdir(parents=True)
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert main(["eval", "--prompts", str(prompts), "--config", f"new={config}", "--out", str(out)]) == 2
    assert "columns from an earlier run ['old']" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["old"]


def test_eval_refuses_an_out_inside_the_images(world_images, capsys):
    prompts, images = world_images
    assert main(["eval", "--prompts", str(prompts), "--images", str(images), "--out", str(images / "x")]) == 2
    assert "lies inside --images" in capsys.readouterr().err
    assert sorted(p.name for p in images.iterdir()) == ["erased", "unsteered"]


def test_eval_names_the_files_whose_size_differs(world_images, tmp_path, capsys):
    """A column saved at another size cannot be judged or compared with the others: one clear
    line that names the odd files, no traceback."""
    from PIL import Image

    prompts, images = world_images
    odd = sorted((images / "erased").iterdir())[0]
    with Image.open(odd) as im:
        im.resize((im.width * 2, im.height * 2)).save(odd)
    assert main(["eval", "--prompts", str(prompts), "--images", str(images), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "images of different sizes" in err and str(odd) in err and "32x32" in err
    assert "Traceback" not in err
