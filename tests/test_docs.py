"""README's demo section is what `docs/demo/update.py` made from one recorded run: the table
matches docs/demo/eval.md and run.json, and the pictures it shows are there. README's layout
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
    run = json.loads((DEMO / "run.json").read_text())
    readme = (REPO / "README.md").read_text()
    want = update.readme_section((DEMO / "eval.md").read_text(), run)
    assert want in readme, "README's demo section is stale: run `python docs/demo/update.py`"
    for picture in ("grid.png", "eval.png"):
        assert (DEMO / picture).stat().st_size > 1000
    # the table's cells are run.json's numbers
    for label, cells in run["unsafe"].items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| {label} |"))
        assert all(f"{c['rate']:.0%} [{c['low']:.0%}, {c['high']:.0%}]" in row for c in cells.values()), row
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
