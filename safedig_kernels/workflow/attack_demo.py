"""`safedig attack` on a `safedig demo` output: attack the held-out unsafe prompts of the demo
world unsteered, steered with the source SAEs and steered with the adapted ones, and report the
attack success rate the world's detector sees (the attack itself is in `attack.py`).

What it reads from the demo directory (`DemoInputs.read`), and nothing else: `summary.json`
(format `safedig-demo`, model `world`: the labels, seed, image size and denoising steps),
`steer.json` and `steer-adapted.json` (the routed configs, their SAEs beside them),
`prompts/eval.jsonl` (the held-out prompts and their noise seeds) and the world weights
(`world/world.safetensors`, or the file the demo was given with `--world`).

Columns: `unsteered`, `source` (steer.json), `adapted` (steer-adapted.json). Rows: each unsafe
label and all of them pooled, before the attack (the clean embeddings) and attacked. Each cell is
the detector's unsafe rate with its 95 % Wilson interval (`eval.wilson_interval`). Each column is
attacked on its own model: the attacker sees the steering it has to beat. Files: `attack.json`,
`attack.md`, `attack.png` (rates with intervals) and `grid.png` (the attacked images).
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .._io import atomic_write_json, atomic_write_text, read_json
from ..integrations.diffusers import SafeDIGConfig
from ..integrations.diffusers.runner import RunSettings
from .attack import AttackBudget, attack_embeddings, judge_embeddings, stack_embeddings, world_surrogate
from .eval import UNSTEERED, interval_bars, rate_cell, rate_text, save_figure
from .prompts import PromptRecord, load_prompts, prompt_seed
from .report import json_safe

logger = logging.getLogger(__name__)

__all__ = ["ATTACK_FORMAT", "COLUMNS", "DemoInputs", "run_attack", "attack_markdown", "plot_attack"]

ATTACK_FORMAT = "safedig-attack"
COLUMNS = (UNSTEERED, "source", "adapted")
_CONFIG_FILES = {"source": "steer.json", "adapted": "steer-adapted.json"}


@dataclass
class DemoInputs:
    """What the attack takes from a demo output directory (module docstring)."""

    directory: Path
    world: Path
    configs: dict[str, Path]
    prompts: Path
    labels: tuple[str, ...]
    settings: RunSettings
    seed: int

    @classmethod
    def read(cls, directory: Union[str, Path]) -> "DemoInputs":
        d = Path(directory)
        what = f"DEMO_DIR {d}"
        if not d.is_dir():
            raise ValueError(f"{what} is not a directory; expected the --out folder of `safedig demo`")
        if not (d / "summary.json").is_file():
            raise ValueError(f"{what} has no summary.json: it is not a finished `safedig demo` output (run "
                             f"`safedig demo --out {d}` first)")
        summary = read_json(d / "summary.json", "demo summary")
        if not isinstance(summary, dict) or summary.get("format") != "safedig-demo":
            raise ValueError(f"{what}/summary.json is not a demo summary (format {summary.get('format')!r} "
                             f"where 'safedig-demo' was expected)" if isinstance(summary, dict) else
                             f"{what}/summary.json is not a JSON object")
        cfg = summary.get("config") or {}
        if summary.get("model") != "world":
            raise ValueError(f"{what} is a demo of model {summary.get('model')!r}; the attack command runs on the "
                             f"demo world (its surrogate and detector are the world's). For other models use "
                             f"safedig_kernels.workflow.attack with a surrogate of your own (docs/workflow.md)")
        missing = [name for name in (*_CONFIG_FILES.values(), "prompts/eval.jsonl") if not (d / name).is_file()]
        if missing:
            raise ValueError(f"{what} lacks {missing}; a finished `safedig demo` writes them")
        world = d / "world" / "world.safetensors"
        if not world.is_file():
            given = cfg.get("world")
            candidates = [Path(given), d / given] if given else []
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise ValueError(f"{what}: no world weights (neither {world} nor the demo's --world {given!r} "
                                 f"exists)")
            world = found[0]
        try:
            labels = (str(cfg["source"]), str(cfg["target"]))
            settings = RunSettings(num_inference_steps=int(cfg["num_inference_steps"]), height=int(cfg["height"]),
                                   width=int(cfg["width"]), guidance_scale=float(cfg["guidance_scale"]))
            seed = int(cfg["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{what}/summary.json: config lacks a readable {e}") from None
        return cls(d, world, {c: d / f for c, f in _CONFIG_FILES.items()}, d / "prompts" / "eval.jsonl", labels,
                   settings, seed)


def run_attack(demo_dir: Union[str, Path], out_dir: Union[str, Path], budget: AttackBudget = AttackBudget(),
               prompts_per_label: int = 8, seed: int = 0, device: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Attack the first `prompts_per_label` held-out prompts of each unsafe label in every column
    (module docstring); writes the files into `out_dir` and returns the JSON written. A line per
    column goes to `log` (default: this module's logger, INFO)."""
    log = log or logger.info
    from .detectors import get_detector
    from .pipelines import load_pipeline
    from .report import image_scale, save_grid

    if isinstance(prompts_per_label, bool) or not isinstance(prompts_per_label, int) or prompts_per_label < 1:
        raise ValueError(f"--prompts must be a positive int (prompts per unsafe label), got {prompts_per_label!r}")
    inputs = DemoInputs.read(demo_dir)
    configs = {name: SafeDIGConfig.from_json(path).with_loaded_saes() for name, path in inputs.configs.items()}
    records = load_prompts(inputs.prompts)
    chosen: list[PromptRecord] = []
    for label in inputs.labels:
        rows = [r for r in records if r.label == label]
        if not rows:
            raise ValueError(f"{inputs.prompts} holds no prompt labelled {label!r}")
        chosen.extend(rows[:prompts_per_label])
    t_start = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(f"world:{inputs.world}", device=dev)
    detector = get_detector("world")
    embeds, pooled = stack_embeddings([r.load_embeddings() for r in chosen])
    seeds = [prompt_seed(r, inputs.seed) for r in chosen]
    labels = [r.label for r in chosen]
    log(f"safedig attack: {len(chosen)} unsafe prompts ({', '.join(inputs.labels)}), {budget.steps} steps, eps "
        f"{budget.eps:g} (per-token L2, relative), {budget.restarts} restart(s), on {dev}, "
        f"{torch.get_num_threads()} thread(s)")

    per_column: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    for column in COLUMNS:
        t0 = time.perf_counter()
        config = configs.get(column)
        before = judge_embeddings(pipe, embeds, pooled, seeds, inputs.settings, config)
        outcome = attack_embeddings(pipe, embeds, pooled, seeds, world_surrogate, budget, inputs.settings, config,
                                    seed=seed)
        after = judge_embeddings(pipe, outcome.prompt_embeds, outcome.pooled_prompt_embeds, seeds, inputs.settings,
                                 config)
        verdict = {"before": [j.unsafe for j in detector(before)], "attacked": [j.unsafe for j in detector(after)]}
        images[column] = {"before": before, "attacked": after}
        per_column[column] = {"verdict": verdict, "outcome": outcome}
        seconds[column] = time.perf_counter() - t0
        log(f"  {column}: unsafe {sum(verdict['before'])}/{len(chosen)} before, {sum(verdict['attacked'])}/"
            f"{len(chosen)} attacked; surrogate {float(outcome.score_before.mean()):.3f} -> "
            f"{float(outcome.score_after.mean()):.3f} ({seconds[column]:.0f} s)")

    groups = {label: [i for i, lb in enumerate(labels) if lb == label] for label in inputs.labels}
    groups["all unsafe"] = list(range(len(chosen)))
    rates = {g: {phase: {c: rate_cell(sum(per_column[c]["verdict"][phase][i] for i in idx), len(idx)) for c in COLUMNS}
                 for phase in ("before", "attacked")} for g, idx in groups.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds["total"] = time.perf_counter() - t_start
    result = {
        "format": ATTACK_FORMAT, "version": 1, "demo": str(inputs.directory), "world": str(inputs.world),
        "budget": {**asdict(budget), "alpha": budget.alpha,
                   "norm": "per-token L2, relative: ||delta_i||_2 <= eps * ||e_i||_2 for every row of prompt_embeds "
                           "and for pooled_prompt_embeds"},
        "prompts_per_label": prompts_per_label, "seed": seed, "noise_seed": inputs.seed,
        "surrogate": "world_surrogate: the world detector's off-colour rule, sigmoids for steps, soft OR over marks "
                     "(the attacker's objective, not the judge)",
        "detector": {"name": detector.name, "description": detector.description},
        "columns": list(COLUMNS), "rows": list(groups), "unsafe": rates,
        "surrogate_score": {c: {"before": float(per_column[c]["outcome"].score_before.mean()),
                                "attacked": float(per_column[c]["outcome"].score_after.mean())} for c in COLUMNS},
        "max_relative_perturbation": {c: float(per_column[c]["outcome"].relative_norm.max()) for c in COLUMNS},
        "prompts": [{"id": r.id, "label": r.label, "seed": s,
                     **{c: {"unsafe_before": per_column[c]["verdict"]["before"][i],
                            "unsafe_attacked": per_column[c]["verdict"]["attacked"][i],
                            "surrogate_before": float(per_column[c]["outcome"].score_before[i]),
                            "surrogate_attacked": float(per_column[c]["outcome"].score_after[i]),
                            "relative_perturbation": float(per_column[c]["outcome"].relative_norm[i])}
                        for c in COLUMNS}} for i, (r, s) in enumerate(zip(chosen, seeds))],
        "seconds": seconds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads(), "device": str(dev)},
        "files": {name: str(out / name) for name in ("attack.json", "attack.md", "attack.png", "grid.png")},
    }
    result = json_safe(result)
    rows = [(f"{r.id}", [images[c][phase][i] for c in COLUMNS for phase in ("before", "attacked")])
            for i, r in enumerate(chosen)]
    save_grid(rows, [f"{c} {p}" for c in COLUMNS for p in ("before", "attacked")], out / "grid.png",
              image_scale(inputs.settings.height, inputs.settings.width))
    atomic_write_text(out / "attack.md", attack_markdown(result) + "\n")
    try:
        plot_attack(result, out / "attack.png")
    except ImportError:  # matplotlib is the [plots] extra
        del result["files"]["attack.png"]
        log("attack.png not written: the figure needs matplotlib (pip install 'safedig-kernels[plots]')")
    atomic_write_json(out / "attack.json", result)
    return result


def attack_markdown(result: dict[str, Any]) -> str:
    """The table of `run_attack`'s result: rows label x (before, attacked), one column per model."""
    b = result["budget"]
    lines = [f"Attack success rate: the `{result['detector']['name']}` detector's unsafe rate on the images, 95 % "
             f"Wilson interval in brackets. White-box PGD on the soft prompt through the sampler: {b['steps']} steps, "
             f"eps {b['eps']:g} ({b['norm']}), {b['restarts']} restart(s), seed {result['seed']}.", "",
             "| prompts | n | | " + " | ".join(result["columns"]) + " |",
             "|---|---:|---|" + "---:|" * len(result["columns"])]
    for row in result["rows"]:
        for phase, name in (("before", "before attack"), ("attacked", "attacked")):
            cells = result["unsafe"][row][phase]
            n = cells[result["columns"][0]]["n"]
            lines.append(f"| {row} | {n} | {name} | " + " | ".join(rate_text(cells[c]) for c in result["columns"])
                         + " |")
    return "\n".join(lines)


def plot_attack(result: dict[str, Any], path: Union[str, Path]) -> Path:
    """Pooled unsafe rate before and after the attack per column, with Wilson intervals."""
    from matplotlib.figure import Figure

    columns, cells = result["columns"], result["unsafe"]["all unsafe"]
    fig = Figure(figsize=(4.8, 3.2))
    ax = fig.add_subplot()
    width = 0.38
    for j, (phase, name) in enumerate((("before", "before attack"), ("attacked", "attacked"))):
        xs = [i + (j - 0.5) * width for i in range(len(columns))]
        interval_bars(ax, xs, [cells[phase][col] for col in columns], width, name)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"unsafe rate ({result['detector']['name']})")
    ax.set_title(f"eps {result['budget']['eps']:g}, {result['budget']['steps']} steps, "
                 f"n = {cells['before'][columns[0]]['n']}", fontsize="small")
    ax.legend(fontsize="small")
    return save_figure(fig, path)
