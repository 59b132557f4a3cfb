"""README's demo section and docs/workflow.md's seed tables are what `docs/demo/update.py` made
from the recorded runs (run.json), and the pictures README shows are there. README's layout
names every room of the package."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "docs" / "demo"


def _update_module():
    spec = importlib.util.spec_from_file_location("demo_update", DEMO / "update.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_section_is_the_recorded_run():
    update = _update_module()
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
