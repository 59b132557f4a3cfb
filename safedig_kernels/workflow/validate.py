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

Which sites to steer, and how hard, are the same kind of question: routing picks a few sites
from measures taken before adaptation, and a mark the routed sites only thin out may need every
site the method can steer, or a stronger Repel. `validate_steerer` adds those candidates in two
more rounds, only while the best trial still leaves unsafe images, and picks over all trials; a
wider or stronger steerer costs safe-image quality, so it wins only by leaving fewer unsafe
images within the budget.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..integrations.diffusers.config import SafeDIGConfig
from .detectors import Detector
from .eval import UNSTEERED, evaluate_images, generate_runs, run_images
from .generate import GenerateConfig, generate
from .prompts import PromptRecord

__all__ = ["DEFAULT_MIN_PSNR_DB", "REPEL_LADDER", "Trial", "OperatorChoice", "choose_operators", "run_trials",
           "validate_steerer", "distinct_candidates", "pick", "site_operators"]

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

    @property
    def best(self) -> Trial:
        """The chosen trial."""
        return next(t for t in self.trials if t.name == self.chosen)

    def with_trials(self, trials: Sequence[Trial]) -> "OperatorChoice":
        """This choice with more trials (on the same prompts), picked again over all of them."""
        every = [*self.trials, *trials]
        return dataclasses.replace(self, chosen=pick(every).name, trials=every)

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
    judge them, and `pick` one (module docstring): `validate_steerer`'s first round alone.
    Candidates that steer every site with the same operators as an earlier one are tried once,
    under the earlier name."""
    return validate_steerer(pipe, prompts, candidates, detector, gen, unsafe_labels, repel_ladder=(),
                            safe_label=safe_label, min_psnr_db=min_psnr_db)[0]


def run_trials(pipe, prompts: Sequence[PromptRecord], candidates: Mapping[str, SafeDIGConfig], detector: Detector,
               gen: GenerateConfig, unsafe_labels: Sequence[str], safe_label: str = "safe",
               min_psnr_db: float = DEFAULT_MIN_PSNR_DB, unsteered: Optional[Mapping[str, torch.Tensor]] = None
               ) -> tuple[list[Trial], dict[str, torch.Tensor]]:
    """One `Trial` per candidate: `prompts` labelled `unsafe_labels` or `safe_label` steered with
    it and judged by `detector` (every candidate is tried, repeats too), and the unsteered images
    the PSNR is measured against (prompt id -> image). Pass those back as `unsteered` to judge
    more candidates on the same prompts without generating them again."""
    if not candidates:
        raise ValueError("candidates is empty; expected {name: SafeDIGConfig}")
    if isinstance(min_psnr_db, bool) or not isinstance(min_psnr_db, (int, float)) or math.isnan(min_psnr_db):
        raise ValueError(f"min_psnr_db must be a number (dB), got {min_psnr_db!r}")
    chosen_prompts = _prompts_for(prompts, unsafe_labels, safe_label)
    if unsteered is None:
        images = run_images(generate_runs(pipe, chosen_prompts, candidates, gen))
    else:  # the same prompts and noise: the unsteered images would come out the same
        steered_only = dataclasses.replace(gen, baseline=False, decode=True)
        images = {UNSTEERED: dict(unsteered),
                  **{name: {r.id: r.images["steered"] for r in generate(pipe, chosen_prompts, conf, steered_only)}
                     for name, conf in candidates.items()}}
    report = evaluate_images(images, {p.id: p.label for p in chosen_prompts}, detector,
                             label_order=[*unsafe_labels, safe_label])
    trials = []
    for name, conf in candidates.items():
        cells = [report.unsafe[lb][name] for lb in unsafe_labels]
        psnr = report.safe_similarity[name]["psnr_db"]
        trials.append(Trial(name, site_operators(conf), int(sum(c["unsafe"] for c in cells)),
                            int(sum(c["n"] for c in cells)), psnr, psnr >= min_psnr_db))
    return trials, images[UNSTEERED]


def _prompts_for(prompts: Sequence[PromptRecord], unsafe_labels: Sequence[str], safe_label: str) -> list[PromptRecord]:
    wanted = set(unsafe_labels) | {safe_label}
    chosen = [p for p in prompts if p.label in wanted]
    missing = sorted(wanted - {p.label for p in chosen})
    if missing:
        raise ValueError(f"choose_operators: no training prompt labelled {missing}; labels present: "
                         f"{sorted({p.label for p in prompts})}")
    return chosen


# How much stronger Repel the last round tries, rung by rung (spec §2: gamma is any real;
# Blend's beta stays in [0, 1], so only gamma is scaled).
REPEL_LADDER = (1.5, 2.0, 2.5, 3.0, 4.0)


def validate_steerer(pipe, prompts: Sequence[PromptRecord], candidates: Mapping[str, SafeDIGConfig],
                     detector: Detector, gen: GenerateConfig, unsafe_labels: Sequence[str], *,
                     widen: Optional[Callable[[SafeDIGConfig], SafeDIGConfig]] = None,
                     repel_ladder: Sequence[float] = REPEL_LADDER, safe_label: str = "safe",
                     min_psnr_db: float = DEFAULT_MIN_PSNR_DB) -> tuple[OperatorChoice, dict[str, SafeDIGConfig]]:
    """Choose a steerer in three rounds on the same training prompts, `pick`ing over every trial:

    1. `candidates` (operators at the routed sites; one trial per distinct operator assignment,
       `distinct_candidates`);
    2. if the winner still leaves unsafe images, each candidate within the quality budget
       widened by `widen` (e.g. to every site the method can steer), named
       `<name>-every-site`, where that adds sites;
    3. if the winner still leaves unsafe images and repels, its Repel strength gamma times each
       rung of `repel_ladder` in turn, `<winner>-repel-x<rung>` (`repel-x<rung>` when the winner
       is `repel`), until the best trial leaves none or a rung breaks the quality budget (a
       stronger one would cost more).

    The unsteered images are generated once, in the first round. A wider or stronger steerer
    costs safe-image quality, so it wins only by leaving fewer unsafe images within the budget.
    Returns the choice and every config tried, by name."""
    tried = dict(candidates)
    trials, unsteered = run_trials(pipe, prompts, distinct_candidates(candidates), detector, gen, unsafe_labels,
                                   safe_label, min_psnr_db)
    choice = OperatorChoice(pick(trials).name, trials, list(unsafe_labels), len(unsteered), float(min_psnr_db))

    def more(configs: Mapping[str, SafeDIGConfig]) -> OperatorChoice:
        tried.update(configs)
        return choice.with_trials(run_trials(pipe, prompts, configs, detector, gen, unsafe_labels, safe_label,
                                             min_psnr_db, unsteered=unsteered)[0])

    if widen is not None and choice.best.unsafe:
        wide = {}
        for t in (t for t in choice.trials if t.within_budget):
            conf = widen(tried[t.name])
            if len(conf.sites) > len(tried[t.name].sites):
                wide[f"{t.name}-every-site"] = conf
        if wide:
            choice = more(wide)
    winner = tried[choice.chosen]
    stem = choice.chosen if choice.chosen.endswith("repel") else f"{choice.chosen}-repel"
    if any(site.gamma for site in winner.sites):
        for boost in repel_ladder:
            if not choice.best.unsafe:
                break  # nothing left to remove
            choice = more({f"{stem}-x{boost:g}": SafeDIGConfig(
                [dataclasses.replace(site, gamma=site.gamma * boost) for site in winner.sites])})
            if not choice.trials[-1].within_budget:
                break  # stronger still would cost more quality
    return choice, tried


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
