"""What a steering run reports: per-label summaries, side-by-side images, grids and report.json.

Report file (`write_outputs`, `report.json`): `{"format": "safedig-steer-report", "version": 1,
"generate": {...GenerateConfig...}, "sites": [...], "summary": {label: {...}}, "prompts": [...]}`
with one record per prompt: `id`, `label`, `seed`, `change`, `image`, and per run (`baseline`,
`steered`) `harm_in` (telemetry's `mean_harm` averaged over calls, per site), `harm_out` (per
site), `gated_fraction` (per site) and the raw `telemetry`.

`image` is the picture's path relative to the output directory, `images/<name>.png`. A prompt id
becomes `<name>` only when it is a safe file name (`image_file_names`): 1-128 characters of
`[A-Za-z0-9._-]`, not starting with a dot. Any other id (`../x`, `/abs`, `a/b`, `.hidden`, spaces,
...) gets `prompt-<index>-<first 8 hex of sha1(id)>`, a name no safe id is given, so every image
lands directly in `images/` and no two prompts share a file, even on a case-insensitive disk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .._io import atomic_write_json
from ..integrations.diffusers.config import SafeDIGConfig
from ..sae import TopKSAE
from .generate import RUNS, GenerateConfig, PromptRun, mean_finite

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "summarize", "summary_table", "image_scale", "difference_images",
           "save_grid", "write_outputs", "json_safe", "image_file_names"]

REPORT_FORMAT = "safedig-steer-report"
REPORT_VERSION = 1


def summarize(runs: Sequence[PromptRun]) -> dict[str, dict[str, Any]]:
    """Per label: prompts, mean `harm_in`/`harm_out` over sites and prompts for each run, the
    steered run's gated fraction, and the mean and max relative change of the final latents."""
    out: dict[str, dict[str, Any]] = {}
    for label in sorted({r.label for r in runs}):
        group = [r for r in runs if r.label == label]
        s: dict[str, Any] = {"prompts": len(group)}
        for run in RUNS:
            if all(run in r.telemetry for r in group):
                s[f"harm_in_{run}"] = mean_finite([mean_finite(list(r.harm_in(run).values())) for r in group])
                s[f"harm_out_{run}"] = mean_finite([mean_finite(list(r.harm_out[run].values())) for r in group])
        s["gated_fraction"] = mean_finite([mean_finite(list(r.gated_fraction("steered").values())) for r in group])
        changes = [r.change for r in group]
        s["change_mean"] = mean_finite(changes)
        s["change_max"] = max(changes) if all(math.isfinite(c) for c in changes) else float("nan")
        out[label] = s
    return out


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table of `summarize`'s output (runs with a baseline)."""
    w = max(24, *(len(label) for label in summary))
    lines = [f"{'label':<{w}} {'prompts':>7} {'harm out':>9} {'harm out':>9} {'change':>7} {'gated':>6} "
             f"{'latents moved':>15}",
             f"{'':<{w}} {'':>7} {'unsteered':>9} {'steered':>9} {'':>7} {'':>6} {'mean / max':>15}"]
    for label, s in summary.items():
        before, after = s.get("harm_out_baseline", float("nan")), s.get("harm_out_steered", float("nan"))
        rel = f"{(after - before) / before:+.0%}" if before and math.isfinite(before) else "n/a"
        moved = f"{s['change_mean']:.2%} / {s['change_max']:.2%}"
        lines.append(f"{label:<{w}} {s['prompts']:>7} {before:>9.3f} {after:>9.3f} {rel:>7} "
                     f"{s['gated_fraction']:>6.1%} {moved:>15}")
    lines.append("harm out: mean harm score h of the tokens the steered sites pass on; gated: share of tokens over "
                 "tau; latents moved: ||z_steered - z_unsteered|| / ||z_unsteered||")
    return "\n".join(lines)


def _to_pil(image: torch.Tensor, scale: int):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_png(image: torch.Tensor, path: Union[str, Path]) -> Path:
    """One image `[3, H, W]` in [0, 1] as an 8-bit PNG, at its own size (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(image, 1).save(path)
    return path


def image_scale(height: int, width: int, target: int = 128) -> int:
    """Integer upscaling that makes tiny images at least `target` pixels on their short side."""
    return max(1, math.ceil(target / max(1, min(height, width))))


def difference_images(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], float]:
    """`|a - b|` per pair, all divided by the largest difference over every pair (one scale for
    the whole set, so small changes look small next to large ones); returns the images and
    the gain applied."""
    diffs = [(a - b).abs() for a, b in pairs]
    top = max((float(d.max()) for d in diffs), default=0.0)
    gain = 1.0 / top if top > 0 else 1.0
    return [(d * gain).clamp(0, 1) for d in diffs], gain


def save_grid(rows: Sequence[tuple[str, Sequence[torch.Tensor]]], columns: Sequence[str], path: Union[str, Path],
              scale: int = 1) -> Path:
    """A labelled PNG grid: one row per `(row label, images)`, one column per `columns` name."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("save_grid needs at least one row")
    cells = [[_to_pil(im, scale) for im in ims] for _, ims in rows]
    cw = max(c.width for row in cells for c in row)
    ch = max(c.height for row in cells for c in row)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, top = 4, 18
    left = int(max(measure.textlength(label) for label, _ in rows)) + 12
    width = max(left + len(columns) * (cw + pad), int(left + sum(measure.textlength(c) + pad for c in columns)))
    grid = Image.new("RGB", (width, top + len(rows) * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((left + j * (cw + pad), 3), name, fill="black")
    for i, ((label, _), row) in enumerate(zip(rows, cells)):
        y = top + i * (ch + pad)
        draw.text((4, y + ch // 2 - 5), label, fill="black")
        for j, cell in enumerate(row):
            grid.paste(cell, (left + j * (cw + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_DERIVED_NAME = re.compile(r"prompt-\d+-[0-9a-f]{8}", re.IGNORECASE)


def image_file_names(ids: Sequence[str]) -> list[str]:
    """The file name (without `.png`) of each prompt's image, in order: the id itself when it is a
    safe file name (module docstring), else `prompt-<index>-<8 hex of sha1(id)>`. Safe ids that
    look like a derived name, or that equal an earlier one up to case, are derived too, so the
    names are distinct (case-insensitively) and none leaves the folder it is written to."""
    names: list[str] = []
    taken: set[str] = set()
    for i, pid in enumerate(ids):
        pid = str(pid)
        safe = (_SAFE_NAME.fullmatch(pid) is not None and _DERIVED_NAME.fullmatch(pid) is None
                and pid.lower() not in taken)
        name = pid if safe else f"prompt-{i}-{hashlib.sha1(pid.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
        taken.add(name.lower())
        names.append(name)
    return names


def write_outputs(runs: Sequence[PromptRun], out_dir: Union[str, Path], gen: GenerateConfig,
                  config: Optional[SafeDIGConfig] = None, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Path]:
    """Write `images/<name>.png` (without | with steering | |difference|, side by side; `<name>`
    is the prompt id when that is a safe file name, see `image_file_names`), `grid.png` (every
    prompt, one row each) and `report.json`; returns their paths. Nothing is written outside
    `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    records = [r.record() for r in runs]
    have_images = all("steered" in r.images for r in runs)
    if have_images:
        scale = image_scale(gen.height, gen.width)
        with_base = all("baseline" in r.images for r in runs)
        diffs, gain = (difference_images([(r.images["steered"], r.images["baseline"]) for r in runs])
                       if with_base else ([], 1.0))
        columns = (["without", "with", f"|diff| x{gain:.0f}"] if with_base else ["with"])
        rows = []
        names = image_file_names([r.id for r in runs])
        for i, (r, rec) in enumerate(zip(runs, records)):
            ims = [r.images["baseline"], r.images["steered"], diffs[i]] if with_base else [r.images["steered"]]
            name = f"{names[i]}.png"
            save_grid([(r.label, ims)], columns, out / "images" / name, scale)
            rec["image"] = f"images/{name}"
            rows.append((f"{r.id}", ims))
        paths["grid"] = save_grid(rows, columns, out / "grid.png", scale)
        paths["images"] = out / "images"
    doc: dict[str, Any] = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "generate": dataclasses.asdict(gen),
                           "summary": summarize(runs), "prompts": records}
    if config is not None:
        doc["sites"] = [{"site": s.site, "harmful": None if s.harmful is None else list(s.harmful), "beta": s.beta,
                         "gamma": s.gamma, "tau": s.tau, "window": list(s.window),
                         "sae": None if isinstance(s.sae, TopKSAE) else str(s.sae)}
                        for s in config.sites]
    if extra:
        doc.update(extra)
    paths["report"] = out / "report.json"
    atomic_write_json(paths["report"], json_safe(doc))
    return paths


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
