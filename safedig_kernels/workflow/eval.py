"""The unsafe rate a detector sees, per label, unsteered and steered: the measure of success that
does not come from the SAE.

For each labelled prompt there is one image per column: `unsteered`, and one per steering
config, all from the same noise. A detector (`detectors.py`: `world`, `nudenet`) judges every
image. Per label and column the report gives the unsafe rate with its 95 % Wilson interval; for
safe prompts it gives how far each steered column moved the images from the unsteered ones:
PSNR (dB, over all safe images' pixels pooled: 10 log10(1 / MSE); identical images give inf)
and mean SSIM (Gaussian window 11, sigma 1.5, per channel). Files (`EvalReport.write`):
`eval.json`, `eval.md` (the table) and `eval.png` (rates with their intervals per label and
column). `write_images` / `load_images` keep the images as `<dir>/<column>/<name>.png`, so a run
can be judged again by another detector without generating anything.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .._io import atomic_write_json, atomic_write_text
from .detectors import Detector
from .prompts import PromptRecord
from .report import image_file_names, json_safe

__all__ = ["UNSTEERED", "wilson_interval", "rate_cell", "rate_text", "interval_bars", "save_figure",
           "psnr_db", "ssim", "EvalReport", "evaluate_images", "evaluate_runs",
           "run_images", "generate_runs", "check_column_names", "write_images", "load_images"]

UNSTEERED = "unsteered"


def wilson_interval(unsafe: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate `unsafe / n` (95 % for z = 1.96); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = unsafe / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_cell(unsafe: int, n: int) -> dict[str, float]:
    """One cell of an unsafe-rate table: the rate, its Wilson interval and the counts."""
    low, high = wilson_interval(unsafe, n)
    return {"rate": unsafe / n if n else float("nan"), "low": low, "high": high, "unsafe": unsafe, "n": n}


def rate_text(cell: Mapping[str, float]) -> str:
    """A `rate_cell` as the tables print it: `12% [4%, 31%]`."""
    return f"{cell['rate']:.0%} [{cell['low']:.0%}, {cell['high']:.0%}]"


def interval_bars(ax, xs: Sequence[float], cells: Sequence[Mapping[str, float]], width: float, label: str) -> None:
    """One series of bars on a matplotlib axis: each `rate_cell`'s rate with its interval."""
    err = [[max(0.0, c["rate"] - c["low"]) for c in cells], [max(0.0, c["high"] - c["rate"]) for c in cells]]
    ax.bar(xs, [c["rate"] for c in cells], width, yerr=err, capsize=3, label=label)


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Lay out and write a matplotlib figure (its folder made if needed)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def psnr_db(mse: float) -> float:
    """PSNR of images in [0, 1] from their mean squared error (inf when identical)."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two images `[3, H, W]` in [0, 1] (Wang et al. 2004, constants K1 = 0.01,
    K2 = 0.03), with a Gaussian window cut to the image when it is smaller."""
    a, b = a.double()[None], b.double()[None]
    size = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@dataclass
class EvalReport:
    """What `evaluate_images` found. `unsafe[label][column]` holds `rate`, `low`, `high` (the
    95 % Wilson interval), `unsafe` and `n`; `safe_similarity[column]` `psnr_db`, `ssim`, `n`."""

    detector: str
    detector_description: str
    labels: list[str]
    columns: list[str]
    unsafe: dict[str, dict[str, dict[str, float]]]
    safe_similarity: dict[str, dict[str, float]]
    images: list[dict[str, Any]] = field(default_factory=list)

    def unsafe_rate(self) -> dict[str, dict[str, float]]:
        """`{label: {column: rate}}`."""
        return {lb: {c: v["rate"] for c, v in cols.items()} for lb, cols in self.unsafe.items()}

    def safe_psnr_db(self) -> dict[str, float]:
        return {c: v["psnr_db"] for c, v in self.safe_similarity.items()}

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"format": "safedig-eval", "version": 1, "detector": self.detector,
                          "detector_description": self.detector_description, "labels": self.labels,
                          "columns": self.columns, "unsafe": self.unsafe, "safe_similarity": self.safe_similarity,
                          "images": self.images})

    def markdown(self) -> str:
        lines = [f"Unsafe rate judged by `{self.detector}` ({self.detector_description}); 95 % Wilson interval in "
                 f"brackets.", "", "| prompts | n | " + " | ".join(self.columns) + " |",
                 "|---|---:|" + "---:|" * len(self.columns)]
        for label in self.labels:
            cells = self.unsafe[label]
            n = next(iter(cells.values()))["n"] if cells else 0
            lines.append(f"| {label} | {n} | " + " | ".join(rate_text(cells[c]) for c in self.columns) + " |")
        if self.safe_similarity:
            lines += ["", "Safe prompts, steered against unsteered (same noise):", "",
                      "| | " + " | ".join(self.safe_similarity) + " |", "|---|" + "---:|" * len(self.safe_similarity)]
            lines.append("| PSNR (dB) | " + " | ".join(_fmt_db(v["psnr_db"]) for v in self.safe_similarity.values())
                         + " |")
            lines.append("| SSIM | " + " | ".join(f"{v['ssim']:.4f}" for v in self.safe_similarity.values()) + " |")
        return "\n".join(lines)

    def plot(self, path: Union[str, Path]) -> Path:
        """Rates with their intervals, one group of bars per label, one bar per column."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.6 + 1.2 * len(self.labels) * max(1, len(self.columns)) / 2, 3.2))
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(self.columns))
        for j, column in enumerate(self.columns):
            xs = [i + (j - (len(self.columns) - 1) / 2) * width for i in range(len(self.labels))]
            interval_bars(ax, xs, [self.unsafe[lb][column] for lb in self.labels], width, column)
        ax.set_xticks(range(len(self.labels)), self.labels)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"unsafe rate ({self.detector})")
        ax.legend(fontsize="small")
        return save_figure(fig, path)

    def write(self, out_dir: Union[str, Path], plot: bool = True) -> dict[str, Path]:
        """`eval.json`, `eval.md` and (when matplotlib is installed and `plot`) `eval.png`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write_text(paths["markdown"], self.markdown() + "\n")
        if plot:
            try:
                paths["figure"] = self.plot(out / "eval.png")
            except ImportError:  # matplotlib is the [plots] extra
                pass
        return paths


def _fmt_db(v: float) -> str:
    return "identical" if math.isinf(v) else f"{v:.1f}"


def evaluate_images(images: Mapping[str, Mapping[str, torch.Tensor]], labels: Mapping[str, str], detector: Detector,
                    label_order: Optional[Sequence[str]] = None, safe_label: str = "safe") -> EvalReport:
    """Judge `images[column][prompt id]` (`[3, H, W]` in [0, 1]) with `detector`. Every column
    must hold every prompt of `labels`; the first column is the reference the others are
    compared with on safe prompts (PSNR, SSIM)."""
    columns = list(images)
    if not columns:
        raise ValueError("images is empty; expected at least one column (e.g. 'unsteered')")
    ids = list(labels)
    for c in columns:
        missing = [i for i in ids if i not in images[c]]
        if missing:
            raise ValueError(f"column {c!r} has no image for prompt(s) {missing[:5]}")
    shapes = {}
    for c in columns:
        for i in ids:
            shapes.setdefault(tuple(images[c][i].shape), []).append((c, i))
    if len(shapes) > 1:
        listed = "; ".join(f"{list(shape)}: {[f'{c}/{i}' for c, i in where[:3]]}" for shape, where in shapes.items())
        raise ValueError(f"images must all have one shape [3, H, W]; found {len(shapes)}: {listed}")
    order = list(label_order) if label_order is not None else sorted(set(labels.values()))
    judged = {c: detector(torch.stack([images[c][i].float() for i in ids])) for c in columns}
    unsafe: dict[str, dict[str, dict[str, float]]] = {}
    for label in order:
        members = [k for k, i in enumerate(ids) if labels[i] == label]
        unsafe[label] = {}
        for c in columns:
            unsafe[label][c] = rate_cell(sum(judged[c][k].unsafe for k in members), len(members))
    safe_ids = [i for i in ids if labels[i] == safe_label]
    reference = columns[0]
    similarity = {}
    for c in columns[1:]:
        if not safe_ids:
            break
        a = torch.stack([images[reference][i].float() for i in safe_ids])
        b = torch.stack([images[c][i].float() for i in safe_ids])
        similarity[c] = {"psnr_db": psnr_db(float((a.double() - b.double()).pow(2).mean())),
                         "ssim": sum(ssim(x, y) for x, y in zip(a, b)) / len(safe_ids), "n": len(safe_ids)}
    per_image = [{"id": i, "label": labels[i], "column": c, "unsafe": judged[c][k].unsafe,
                  "detail": judged[c][k].detail} for c in columns for k, i in enumerate(ids)]
    return EvalReport(detector.name, detector.description, order, columns, unsafe, similarity, per_image)


def check_column_names(names: Sequence[str], what: str = "config name") -> None:
    """Column names become folder names (`write_images`): letters, digits, `.`, `_`, `-`, and
    not `unsteered`, which is the reference column."""
    for name in names:
        if not isinstance(name, str) or not _COLUMN.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{what} {name!r}: expected letters, digits, '.', '_' or '-' (it names a folder)")
        if name == UNSTEERED:
            raise ValueError(f"{what} may not be {UNSTEERED!r}: that column is the images without steering")


_COLUMN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def run_images(runs: Mapping[str, Sequence]) -> dict[str, dict[str, torch.Tensor]]:
    """`generate`'s runs, one list of `PromptRun` per config name, as image columns: `unsteered`
    (the first config's baseline: steering off is the same model for every config) and one
    column of steered images per config."""
    if not runs:
        raise ValueError("runs is empty; expected {config name: [PromptRun, ...]}")
    check_column_names(list(runs))
    first = next(iter(runs.values()))
    images = {UNSTEERED: {r.id: r.images["baseline"] for r in first}}
    for name, rs in runs.items():
        images[name] = {r.id: r.images["steered"] for r in rs}
    return images


def evaluate_runs(runs: Mapping[str, Sequence], detector: Detector, label_order: Optional[Sequence[str]] = None
                  ) -> EvalReport:
    """Judge `generate`'s runs (columns as `run_images` makes them)."""
    first = next(iter(runs.values()), [])
    return evaluate_images(run_images(runs), {r.id: r.label for r in first}, detector, label_order)


def generate_runs(pipe, prompts: Sequence[PromptRecord], configs: Mapping[str, Any], gen, *,
                  progress: bool = False) -> dict[str, list]:
    """Generate every prompt steered by each of `configs` (name -> SafeDIGConfig, SAEs loaded),
    and once without steering (with the first config): `generate`'s runs per config name."""
    from .generate import generate

    if not configs:
        raise ValueError("configs is empty; expected {name: SafeDIGConfig}")
    check_column_names(list(configs))
    return {name: generate(pipe, prompts, conf, dataclasses.replace(gen, baseline=i == 0, decode=True),
                           progress=progress)
            for i, (name, conf) in enumerate(configs.items())}


def write_images(images: Mapping[str, Mapping[str, torch.Tensor]], prompts: Sequence[PromptRecord],
                 directory: Union[str, Path]) -> Path:
    """Save `images[column][id]` as `<directory>/<column>/<name>.png` (names: `image_file_names`)."""
    from .report import save_png

    root = Path(directory)
    names = image_file_names([p.id for p in prompts])
    for column, by_id in images.items():
        for p, name in zip(prompts, names):
            save_png(by_id[p.id], root / column / f"{name}.png")
    return root


def check_image_folder(directory: Union[str, Path], columns: Sequence[str], option: str = "--out") -> None:
    """Refuse to write `columns` into an image folder that holds other columns: `load_images`
    reads every sub-folder as a column, so an earlier run's would be judged with this one's."""
    root = Path(directory)
    if not root.is_dir():
        return
    stale = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in {UNSTEERED, *columns})
    if stale:
        raise ValueError(f"{option}: {root} holds image columns from an earlier run {stale}; a later --images read "
                         f"would judge them too. Remove them or choose another {option}")


def load_images(directory: Union[str, Path], prompts: Sequence[PromptRecord]) -> dict[str, dict[str, torch.Tensor]]:
    """Images saved by `write_images`: every sub-folder of `directory` is a column; `unsteered`
    comes first. Each column must hold an image for every prompt."""
    import numpy as np
    from PIL import Image

    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    columns = sorted((p.name for p in root.iterdir() if p.is_dir()), key=lambda c: (c != UNSTEERED, c))
    if UNSTEERED not in columns:
        raise ValueError(f"{root} has no {UNSTEERED}/ folder; its sub-folders are the columns, {UNSTEERED}/ the "
                         f"reference (found {columns})")
    names = image_file_names([p.id for p in prompts])
    out: dict[str, dict[str, torch.Tensor]] = {}
    sizes: dict[tuple[int, int], list[Path]] = {}
    for column in columns:
        out[column] = {}
        for p, name in zip(prompts, names):
            path = root / column / f"{name}.png"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no image for prompt {p.id!r} in column {column!r}")
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            out[column][p.id] = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
            sizes.setdefault(tuple(rgb.shape[:2]), []).append(path)
    if len(sizes) > 1:
        # Images are judged and compared (PSNR, SSIM) side by side: every one must have one size.
        common = max(sizes, key=lambda k: len(sizes[k]))
        odd = [(hw, p) for hw, ps in sizes.items() if hw != common for p in ps]
        listed = ", ".join(f"{p} ({hw[0]}x{hw[1]})" for hw, p in odd[:5]) + (" ..." if len(odd) > 5 else "")
        raise ValueError(f"{root}: images of different sizes; most are {common[0]}x{common[1]} "
                         f"(e.g. {sizes[common][0]}), but {len(odd)} are not: {listed}. Every column must hold "
                         f"images of one size")
    return out
