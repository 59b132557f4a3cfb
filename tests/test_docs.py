"""README's demo section and docs/workflow.md's seed tables are what `docs/demo/update.py` made
from the recorded runs (run.json), and the pictures README shows are there. README's layout
names every room of the package. docs/demo/gap.py measures what docs/workflow.md quotes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "docs" / "demo"


def _demo_script(name: str):
    """A script of docs/demo/ as a module."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_section_is_the_recorded_run():
    update = _demo_script("update")
    runs = json.loads((DEMO / "run.json").read_text())["runs"]
    readme = (REPO / "README.md").read_text()
    want = update.readme_section(runs)
    assert want in readme, "README's demo section is stale: run `python docs/demo/update.py`"
    workflow = (REPO / "docs" / "workflow.md").read_text()
    assert update.workflow_section(runs) in workflow, "docs/workflow.md's seed tables are stale"
    for picture in ("grid.png", "eval.png"):
        assert (DEMO / picture).stat().st_size > 1000
    # README's table cells are the first run's numbers; at least three seeds are reported
    assert len({run["seed"] for run in runs}) >= 3
    for row in runs[0]["methods"]:
        line = next(x for x in readme.splitlines() if x.startswith(f"| {row['method']}"))
        assert all(f"{row[c]['rate']:.0%} [{row[c]['low']:.0%}, {row[c]['high']:.0%}]" in line
                   for c in ("source", "target", "overall", "safe")), line
    assert update.replace_section(readme, want) == readme


def test_update_adds_only_default_demo_runs(tmp_path):
    """`update.py --add-run DIR` keeps a run in run.json only when it is `safedig demo --seed N`
    with no other setting and its own world; anything else is refused before run.json is read."""
    import dataclasses

    import pytest

    from safedig_kernels.workflow.demo import DemoConfig

    update = _demo_script("update")
    config = dataclasses.asdict(DemoConfig.quick_config(seed=3).resolved(64))
    (tmp_path / "summary.json").write_text(json.dumps({"model": "world", "seed": 3, "config": config,
                                                       "world": {"trained_here": True}}))
    with pytest.raises(SystemExit, match=r"not a default `safedig demo --seed N` run \(settings \[.*'quick'"):
        update.add_run(tmp_path)
    config = dataclasses.asdict(DemoConfig(seed=3, world="elsewhere.safetensors").resolved(64))
    (tmp_path / "summary.json").write_text(json.dumps({"model": "world", "seed": 3, "config": config,
                                                       "world": {"trained_here": False}}))
    with pytest.raises(SystemExit, match=r"settings \['world'\] differ"):
        update.add_run(tmp_path)


def test_readme_layout_names_every_room():
    # Top-level modules, private helpers anywhere and the workflow's modules are each named in
    # the layout block; ops/, bench/, cli/ and reference/ are described as a whole.
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    package = REPO / "safedig_kernels"
    rooms = [p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
             and (p.parent == package or p.name.startswith("_") or p.parent.name == "workflow")]
    unnamed = [str(p.relative_to(package)) for p in rooms if p.stem not in layout]
    assert not unnamed, f"README's layout does not name {unnamed}"
    folders = {p.parent.name for p in package.rglob("*.py") if p.parent != package and "data" not in p.parts}
    assert all(f"{f}/" in layout for f in folders), folders


def test_gap_script_measures_what_docs_workflow_quotes():
    # docs/demo/gap.py's two measurements on the shipped world, small: patching the last image
    # site with the paired safe run's activations removes every mark (the site carries the mark),
    # while the best hindsight SAE edit closes well under half of the distance to the safe twin
    # in one step (docs/workflow.md: at most 48 % at any site, with 16 prompts).
    import torch

    from safedig_kernels.workflow.world import SOURCE, TARGET, is_unsafe

    gap = _demo_script("gap")
    runs = gap.PairedRuns(4)
    _, safe = runs.run("safe", record=True)
    images, unsafe = runs.run(SOURCE, record=True)
    assert bool(is_unsafe(images).all())
    site = "single_transformer_blocks.1:image"
    for label in (SOURCE, TARGET):
        patched, _ = runs.run(label, patch=(site, safe))
        assert not bool(is_unsafe(patched).any()), label
    x_unsafe, x_safe = gap.stream(unsafe, site), gap.stream(safe, site)
    assert x_unsafe.shape == x_safe.shape == (gap.STEPS * 4 * 64, 64)
    assert not torch.equal(x_unsafe, x_safe)
    closed = gap.gap_closed(x_unsafe, x_safe, [(4, 256)], train_steps=150)["k=4, F=256"]
    assert 0.0 < closed["repel"] < 0.5 and closed["blend"] < 0.5, closed
    assert "gap.py" in (REPO / "docs" / "workflow.md").read_text()
