"""Steer output files: a prompt id names its image only when it is a safe file name; any other id
gets a derived name, and nothing is ever written outside the output directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from safedig_kernels.workflow.generate import GenerateConfig, PromptRun
from safedig_kernels.workflow.report import image_file_names, write_outputs

pytest.importorskip("PIL")


def _run(pid: str, i: int) -> PromptRun:
    g = torch.Generator().manual_seed(i)
    images = {"baseline": torch.rand(3, 8, 8, generator=g), "steered": torch.rand(3, 8, 8, generator=g)}
    latents = {"baseline": torch.randn(1, 4, generator=g), "steered": torch.randn(1, 4, generator=g)}
    return PromptRun(id=pid, label="safe", seed=i, latents=latents, images=images,
                     telemetry={"baseline": {}, "steered": {}}, harm_out={"baseline": {}, "steered": {}})


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_unsafe_ids_never_write_outside_out(tmp_path):
    work = tmp_path / "a" / "b" / "c"
    out = work / "out"
    outside = tmp_path / "abs" / "target"
    ids = ["p0", "../../escape", "../../../../x", str(outside), "a/b", ".hidden", " ", "sp ace", "tab\tid",
           "..", ".", "back\\slash", "nul\x00byte", "ünïcode", "x" * 300, "prompt-1-deadbeef", "P0", "ok-id_1.v2"]
    runs = [_run(pid, i) for i, pid in enumerate(ids)]
    paths = write_outputs(runs, out, GenerateConfig(height=8, width=8))

    everything = _files(tmp_path)
    assert everything and all(out in p.parents for p in everything), sorted(everything - _files(out))
    images = sorted(p.name for p in (out / "images").iterdir())
    assert all((out / "images" / n).is_file() for n in images) and len(images) == len(ids)  # flat, one per prompt
    report = json.loads(paths["report"].read_text())
    recorded = [p["image"] for p in report["prompts"]]
    assert [p["id"] for p in report["prompts"]] == ids
    assert sorted(r.removeprefix("images/") for r in recorded) == images
    by_id = dict(zip(ids, recorded))
    for safe in ("p0", "ok-id_1.v2"):  # safe ids keep their own names
        assert by_id[safe] == f"images/{safe}.png"
    for i, pid in enumerate(ids):
        if pid not in ("p0", "ok-id_1.v2"):
            assert by_id[pid].startswith(f"images/prompt-{i}-") and by_id[pid].endswith(".png"), (pid, by_id[pid])
    assert not outside.parent.exists() and not (tmp_path / "a" / "escape.png").exists()


def test_image_file_names_are_safe_and_distinct():
    ids = ["p0", "P0", "a/b", "../up", "prompt-3-0123abcd", "prompt-2-DEADBEEF", ".x", "", "p0.v1", "-dash"]
    names = image_file_names(ids)
    assert names[0] == "p0" and names[8] == "p0.v1" and names[9] == "-dash"
    # a case twin of an earlier id, an id that looks derived, and every unsafe one get derived names
    for i in range(1, 8):
        assert names[i].startswith(f"prompt-{i}-") and len(names[i]) == len(f"prompt-{i}-") + 8
    assert len({n.lower() for n in names}) == len(names)
    for n in names:
        assert os.sep not in n and "/" not in n and not n.startswith(".") and n == os.path.basename(n)
    # The derived name depends on the id, not only on its position.
    assert image_file_names(["a/b"]) != image_file_names(["a/c"])
    assert image_file_names(["a/b"]) == image_file_names(["a/b"])
