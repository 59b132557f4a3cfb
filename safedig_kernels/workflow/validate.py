"""Choose a steerer's operators by steering its own training prompts and judging the images.

Routing proposes an operator per site from stability measures taken before adaptation; which
operator removes the mark once the decoder is adapted is only known by steering. So each method
of the demo is validated on the prompts it may learn from, never on the held-out ones its table
reports: the source steerer on the source domain's training prompts (it knows nothing else),
SafeDIG and the full fine-tune on the source's and the target's.

`choose_operators` steers those prompts with every candidate (routing's own per-site proposal
and each operator at every routed site) and judges them with the detector. The winner leaves the
fewest unsafe images among the candidates whose safe images stay within the quality budget
(PSNR against the unsteered ones >= `min_psnr_db`); ties go to the higher PSNR, then to the
earlier candidate (routing's proposal first). When no candidate keeps the budget the one with
the highest PSNR wins and `within_budget` says so: a weaker steerer that keeps the images, never
a silent switch-off.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..integrations.diffusers.config import SafeDIGConfig
from .detectors import Detector
from .eval import evaluate_runs, generate_runs
from .generate import GenerateConfig
from .prompts import PromptRecord

__all__ = ["DEFAULT_MIN_PSNR_DB", "Trial", "OperatorChoice", "choose_operators", "distinct_candidates", "pick",
           "site_operators"]

# The floor the demo's claim holds safe-image quality to (docs/workflow.md): PSNR >= 30 dB.
DEFAULT_MIN_PSNR_DB = 30.0


def site_operators(config: SafeDIGConfig) -> dict[str, str]:
    """Each site's operator as its strengths make it: `blend` (beta only), `repel` (gamma only),
    `both`, or `off` (neither). Strengths left to the SAE's default (None) are refused."""
    ops = {}
    for s in config.sites:
        if s.beta is None or s.gamma is None:
            raise ValueError(f"site_operators: site {s.site} leaves beta or gamma to its SAE's default; give both")
        ops[s.site] = "both" if s.beta and s.gamma else "blend" if s.beta else "repel" if s.gamma else "off"
    return ops


@dataclass
class Trial:
    """One candidate steered on the training prompts."""

    name: str
    operators: dict[str, str]
    unsafe: int
    n: int
    psnr_db: float
    within_budget: bool


@dataclass
class OperatorChoice:
    chosen: str
    trials: list[Trial]
    labels: list[str]
    prompts: int
    min_psnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """The trials in one line, the winner marked."""
        cells = [f"{t.name}{'*' if t.name == self.chosen else ''} {t.unsafe}/{t.n} unsafe, "
                 f"{'identical' if math.isinf(t.psnr_db) else f'{t.psnr_db:.1f} dB'}"
                 + ("" if t.within_budget else " (over budget)") for t in self.trials]
        return "; ".join(cells)


def choose_operators(pipe, prompts: Sequence[PromptRecord], candidates: Mapping[str, SafeDIGConfig],
                     detector: Detector, gen: GenerateConfig, unsafe_labels: Sequence[str],
                     safe_label: str = "safe", min_psnr_db: float = DEFAULT_MIN_PSNR_DB) -> OperatorChoice:
    """Steer `prompts` (those labelled `unsafe_labels` or `safe_label`) with each candidate,
    judge them, and `pick` one (module docstring). Candidates that steer every site with the
    same operators as an earlier one are tried once, under the earlier name."""
    if not candidates:
        raise ValueError("candidates is empty; expected {name: SafeDIGConfig}")
    if isinstance(min_psnr_db, bool) or not isinstance(min_psnr_db, (int, float)) or math.isnan(min_psnr_db):
        raise ValueError(f"min_psnr_db must be a number (dB), got {min_psnr_db!r}")
    wanted = set(unsafe_labels) | {safe_label}
    chosen_prompts = [p for p in prompts if p.label in wanted]
    missing = sorted(wanted - {p.label for p in chosen_prompts})
    if missing:
        raise ValueError(f"choose_operators: no training prompt labelled {missing}; labels present: "
                         f"{sorted({p.label for p in prompts})}")
    distinct = distinct_candidates(candidates)
    runs = generate_runs(pipe, chosen_prompts, distinct, gen)
    report = evaluate_runs(runs, detector, label_order=[*unsafe_labels, safe_label])
    trials = []
    for name, conf in distinct.items():
        cells = [report.unsafe[lb][name] for lb in unsafe_labels]
        psnr = report.safe_similarity[name]["psnr_db"]
        trials.append(Trial(name, site_operators(conf), int(sum(c["unsafe"] for c in cells)),
                            int(sum(c["n"] for c in cells)), psnr, psnr >= min_psnr_db))
    return OperatorChoice(pick(trials).name, trials, list(unsafe_labels), len(chosen_prompts), float(min_psnr_db))


def distinct_candidates(candidates: Mapping[str, SafeDIGConfig]) -> dict[str, SafeDIGConfig]:
    """`candidates` less those steering every site with the same operator as an earlier one."""
    distinct: dict[str, SafeDIGConfig] = {}
    seen: set[tuple] = set()
    for name, conf in candidates.items():
        key = tuple(sorted(site_operators(conf).items()))
        if key not in seen:
            seen.add(key)
            distinct[name] = conf
    return distinct


def pick(trials: Sequence[Trial]) -> Trial:
    """The fewest unsafe images within the budget (ties: higher PSNR, then the earlier trial);
    none within it: the highest PSNR (ties: the earlier)."""
    if not trials:
        raise ValueError("trials is empty")
    order = {id(t): i for i, t in enumerate(trials)}
    kept = [t for t in trials if t.within_budget]
    if kept:
        return min(kept, key=lambda t: (t.unsafe, -t.psnr_db, order[id(t)]))
    return min(trials, key=lambda t: (-t.psnr_db, order[id(t)]))
