"""Robustness-aware routing: rank (site, operator) pairs before adaptation.

For every candidate site (with its source-trained SAE) three stability measures, each in [0, 1],
say how well its safety features survive the shift from the source risk domain to the target:

- `overlap`: Jaccard overlap of the harmful sets picked (`scoring.select_harmful`) on source
  unsafe vs safe and on target unsafe vs safe prompts, with the same frozen encoder;
- `recon`: `1 - FVU` of the SAE on target activations (target unsafe and safe prompts),
  clipped to [0, 1]: whether the dictionary still describes the new domain;
- `separation`: `max(0, 2 AUROC - 1)` of the per-prompt harm score with the *source* harmful set,
  target unsafe vs safe prompts: whether the source features still flag the new risk.

An operator leans on them differently (`OPERATOR_WEIGHTS`): Blend replaces the activation by
its safe reconstruction, so reconstruction quality matters most; Repel subtracts the harmful
directions, so it needs the harmful set and separation but not a faithful reconstruction.

    stability(site, op) = sum_m OPERATOR_WEIGHTS[op][m] * measure_m(site)
    cost(site, op)      = tokens(site) * flops_per_token(site, op) / max over candidates
    score(site, op)     = stability - cost_weight * cost

with flops per token `2 d F` (encoder) plus the decode the operator needs: `2 k d` for Blend,
`2 E[|S ∩ H|] d` for Repel, both for Both. `tokens(site)` is the full token count of the site's
stream per step (before any capture subsampling).

The steering config (`RoutingReport.steering_config`, a `SafeDIGConfig`) keeps the best
operator of each of the `num_sites` best *steerable* sites: sites where neither the source nor
the target has a harmful feature are passed over (`RoutingReport.passed_over`), since their harm
score is 0 on every token and steering refuses a gate that can never open; with no steerable
site at all `route` raises. Each site gets its SAE, `harmful` the union of the source and target
harmful sets, `beta`/`gamma` as the operator steers (`operator_strengths`), the route's
`window` and `cfg`, and a gate threshold `tau`: by default (`tau_quantile`) the quantile of the
harm score over that site's captured safe tokens (`safe_tau`), so that about `1 - tau_quantile`
of safe tokens are steered; or one global `tau` for every site. `write_steering_config` writes it
with `SafeDIGConfig.to_json` (SAE paths relative to the file).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from .._checks import STRENGTH_NAMES, strength_or_none
from .._io import write_json_and_table
from ..integrations.diffusers.config import CFG_MODES, SafeDIGConfig, SiteConfig, check_window
from ..integrations.diffusers.plan import check_sae_site
from ..integrations.diffusers.sites import SiteSpec
from ..sae import TopKSAE
from .prompts import LabelSelector, parse_labels
from .score import HarmfulRule, auroc, group_stats, harm_scores, prompt_harm_scores, select_harmful
from .store import ActivationStore

OPERATORS = ("blend", "repel", "both")
OPERATOR_WEIGHTS: dict[str, dict[str, float]] = {
    "blend": {"overlap": 0.25, "recon": 0.5, "separation": 0.25},
    "repel": {"overlap": 0.5, "recon": 0.0, "separation": 0.5},
    "both": {"overlap": 1 / 3, "recon": 1 / 3, "separation": 1 / 3},
}
# In one run a global tau = 0 gated 48 % of the safe tokens (every one where a harmful feature
# fires at all); a threshold at this quantile of the safe tokens' harm score gates about 1 %.
DEFAULT_TAU_QUANTILE = 0.99


def operator_strengths(operator: str, beta: float, gamma: float) -> tuple[float, float]:
    """(beta, gamma) an operator steers with: Blend (beta, 0), Repel (0, gamma), Both (beta, gamma)."""
    if operator == "blend":
        return beta, 0.0
    if operator == "repel":
        return 0.0, gamma
    if operator == "both":
        return beta, gamma
    raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")


@dataclass
class RouteConfig:
    """Routing settings; `beta`, `gamma`, the gate, `window`, `cfg` go into the steering config.

    The gate threshold is either `tau`, one value for every site, or `tau_quantile`, each
    selected site's own `safe_tau` over the captured safe tokens; not both. With neither, each
    site is calibrated at `DEFAULT_TAU_QUANTILE` (0.99; `gate_quantile`).
    """

    operators: tuple[str, ...] = OPERATORS
    cost_weight: float = 0.1
    num_sites: int = 4
    rule: HarmfulRule = field(default_factory=HarmfulRule)
    beta: float = 0.5
    gamma: float = 1.0
    tau: Optional[float] = None
    tau_quantile: Optional[float] = None
    window: tuple[float, float] = (0.0, 1.0)
    cfg: str = "both"
    steps: Optional[list[int]] = None

    def __post_init__(self) -> None:
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad or not self.operators:
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS}, got {list(self.operators)}")
        if not isinstance(self.num_sites, int) or self.num_sites < 1:
            raise ValueError(f"num_sites must be a positive int, got {self.num_sites!r}")
        if self.cost_weight < 0:
            raise ValueError(f"cost_weight must be >= 0, got {self.cost_weight}")
        if self.tau is not None and self.tau_quantile is not None:
            raise ValueError(f"RouteConfig: give tau (one threshold for every site) or tau_quantile (calibrated per "
                             f"site on the safe tokens), not both; got tau={self.tau}, "
                             f"tau_quantile={self.tau_quantile}")
        if self.tau_quantile is not None:
            check_quantile(self.tau_quantile, "RouteConfig.tau_quantile")
        # The values the steering config will hold, checked as it checks them, before any work.
        for name in STRENGTH_NAMES:
            strength_or_none(getattr(self, name), name, f"RouteConfig.{name}")
        self.window = check_window(self.window, "RouteConfig.window")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"RouteConfig.cfg must be one of {CFG_MODES}, got {self.cfg!r}")

    @property
    def gate_quantile(self) -> Optional[float]:
        """The quantile each site's tau is calibrated at; None when one `tau` is given."""
        if self.tau_quantile is None and self.tau is None:
            return DEFAULT_TAU_QUANTILE
        return self.tau_quantile


@dataclass
class SiteEvaluation:
    """Stability measures of one site (module docstring)."""

    site: str
    sae_path: str
    harmful_source: list[int]
    harmful_target: list[int]
    overlap: float
    recon: float
    separation: float
    separation_source: float
    fvu_target: float
    tokens: float
    flops_per_token: dict[str, float]

    @property
    def harmful(self) -> list[int]:
        """The harmful set a steering config gets: the union of the source and target sets."""
        return sorted(set(self.harmful_source) | set(self.harmful_target))


@dataclass
class Candidate:
    site: str
    operator: str
    stability: float
    cost: float
    score: float


@dataclass
class RoutingReport:
    source_labels: list[str]
    target_labels: list[str]
    safe_labels: list[str]
    config: dict[str, Any]
    sites: list[SiteEvaluation]
    ranking: list[Candidate]
    selected: list[Candidate]
    # Sites ranked above the last selected one, skipped because they have no harmful feature.
    passed_over: list[str] = field(default_factory=list)
    # The gate threshold of each selected site (site key -> tau).
    tau: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        ev = {s.site: s for s in self.sites}
        chosen = {(c.site, c.operator) for c in self.selected}
        lines = [f"routing {self.source_labels} -> {self.target_labels} (safe: {self.safe_labels})",
                 f"{'rank':>4} {'site':<36} {'operator':<8} {'score':>7} {'stability':>9} {'cost':>6} "
                 f"{'overlap':>7} {'recon':>6} {'separation':>10} selected"]
        for r, c in enumerate(self.ranking, start=1):
            s = ev[c.site]
            lines.append(f"{r:>4} {c.site:<36} {c.operator:<8} {c.score:>7.3f} {c.stability:>9.3f} {c.cost:>6.3f} "
                         f"{s.overlap:>7.3f} {s.recon:>6.3f} {s.separation:>10.3f} "
                         f"{'yes' if (c.site, c.operator) in chosen else ''}")
        if self.passed_over:
            lines.append(f"passed over (no harmful feature on the source or the target, nothing to steer): "
                         f"{', '.join(self.passed_over)}")
        gate = (f"{self.config['tau_quantile']:g} quantile of the harm score on the site's safe tokens"
                if self.config.get("tau_quantile") is not None else "one tau for every site")
        for c in self.selected:
            s = ev[c.site]
            tau = self.gate(c.site)
            lines.append(f"selected {c.site}: {c.operator}, {len(s.harmful)} harmful features (union of the source's "
                         f"{len(s.harmful_source)} and the target's {len(s.harmful_target)}), tau {tau:.4g} ({gate})")
        return "\n".join(lines)

    def write(self, path: Union[str, Path]) -> tuple[Path, Path]:
        """`path` (JSON) and the same name with `.txt` (the table)."""
        return write_json_and_table(path, self.to_dict(), self.table())

    def steering_config(self, saes: Optional[Mapping[str, TopKSAE]] = None) -> SafeDIGConfig:
        """The steering config of the selected pairs (module docstring). Each site's SAE is
        `saes[site]` when given (an SAE in memory), else the file it was evaluated from."""
        ev = {s.site: s for s in self.sites}
        sites = []
        for c in self.selected:
            s = ev[c.site]
            sae = (saes or {}).get(c.site) or (os.path.abspath(s.sae_path) if s.sae_path else "")
            sites.append(self.site_config(c.site, sae, c.operator))
        return SafeDIGConfig(sites)

    def gate(self, site: str) -> Optional[float]:
        """Routing's gate at `site`: its calibrated tau, else the one global `tau` (None when
        routing calibrated per site and did not select this one)."""
        return self.tau.get(site, self.config.get("tau"))

    def site_config(self, site: str, sae: Union[TopKSAE, str], operator: str, *, tau: Optional[float] = None,
                    harmful: Optional[Sequence[int]] = None) -> SiteConfig:
        """One candidate site steered with `sae` and `operator` at this routing's strengths,
        window and CFG branches: its harmful set is `harmful`, else routing's (the union of the
        sets scored on the source and on the target), its gate `tau`, else routing's (the site's
        calibrated gate, or the one global `tau`)."""
        s = next(e for e in self.sites if e.site == site)
        gate = self.gate(site) if tau is None else tau
        if gate is None:  # tau_quantile calibrates the selected sites only
            raise ValueError(f"RoutingReport.site_config: site {site} has no gate (routing calibrated gates for the "
                             f"sites it selected only); give its tau")
        beta, gamma = operator_strengths(operator, self.config["beta"], self.config["gamma"])
        return SiteConfig(SiteSpec.parse(site).key, sae, harmful=list(s.harmful if harmful is None else harmful),
                          beta=beta, gamma=gamma, tau=float(gate), window=tuple(self.config["window"]),
                          cfg=self.config["cfg"])


def write_steering_config(report: RoutingReport, path: Union[str, Path]) -> Path:
    """`report.steering_config()` written as the JSON `SafeDIGConfig.from_json` reads."""
    return report.steering_config().to_json(path)


def _jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 0.0


def evaluate_site(store: ActivationStore, site: Union[str, SiteSpec], sae: TopKSAE, source_labels: LabelSelector,
                  target_labels: LabelSelector, safe_labels: LabelSelector = "safe",
                  rule: HarmfulRule = HarmfulRule(), steps: Optional[Iterable[int]] = None,
                  sae_path: str = "") -> SiteEvaluation:
    """Stability measures and per-token costs of one site with its source SAE."""
    key = SiteSpec.parse(site).key
    if store.width(key) != sae.d:
        raise ValueError(f"site {key} has width {store.width(key)} but its SAE {sae_path} has d = {sae.d}")
    steps = None if steps is None else list(steps)
    for what, sel in (("source_labels", source_labels), ("target_labels", target_labels),
                      ("safe_labels", safe_labels)):
        if not store.entries(key, sel, steps):
            raise ValueError(f"{what} {parse_labels(sel)} match no prompts at site {key} in {store.dir}; "
                             f"labels present: {store.labels}")
    src = group_stats(sae, store.prompt_activations(key, source_labels, steps))
    tgt = group_stats(sae, store.prompt_activations(key, target_labels, steps))
    safe = group_stats(sae, store.prompt_activations(key, safe_labels, steps))
    h_src = select_harmful(src, safe, rule)
    h_tgt = select_harmful(tgt, safe, rule)
    safe_h = prompt_harm_scores(sae, h_src, store.prompt_activations(key, safe_labels, steps))
    sep_t = auroc(prompt_harm_scores(sae, h_src, store.prompt_activations(key, target_labels, steps)), safe_h)
    sep_s = auroc(prompt_harm_scores(sae, h_src, store.prompt_activations(key, source_labels, steps)), safe_h)
    target_all = tgt.merged(safe)
    fvu_t = target_all.fvu
    d, F, k = sae.d, sae.num_features, sae.k
    harmful_active = float(target_all.freq[h_src].sum()) if h_src else 0.0
    enc = 2.0 * d * F
    flops = {"blend": enc + 2.0 * k * d, "repel": enc + 2.0 * harmful_active * d,
             "both": enc + 2.0 * (k + harmful_active) * d}
    es = store.entries(key, None, steps)
    tokens = sum(e.tokens_total for e in es) / len(es)
    return SiteEvaluation(site=key, sae_path=str(sae_path), harmful_source=h_src, harmful_target=h_tgt,
                          overlap=_jaccard(h_src, h_tgt), recon=min(max(1.0 - fvu_t, 0.0), 1.0),
                          separation=max(0.0, 2.0 * sep_t - 1.0) if h_src else 0.0,
                          separation_source=max(0.0, 2.0 * sep_s - 1.0) if h_src else 0.0,
                          fvu_target=fvu_t, tokens=tokens, flops_per_token=flops)


def rank_candidates(sites: list[SiteEvaluation], config: RouteConfig) -> list[Candidate]:
    """Every (site, operator) pair, best score first (ties: site name, then operator order)."""
    raw = [(s, op, s.tokens * s.flops_per_token[op]) for s in sites for op in config.operators]
    top = max((c for _, _, c in raw), default=1.0) or 1.0
    cands = []
    for s, op, c in raw:
        w = OPERATOR_WEIGHTS[op]
        stability = w["overlap"] * s.overlap + w["recon"] * s.recon + w["separation"] * s.separation
        cost = c / top
        cands.append(Candidate(site=s.site, operator=op, stability=stability, cost=cost,
                               score=stability - config.cost_weight * cost))
    return sorted(cands, key=lambda c: (-c.score, c.site, OPERATORS.index(c.operator)))


def route(store: ActivationStore, saes: Mapping[str, tuple[TopKSAE, str]], source_labels: LabelSelector,
          target_labels: LabelSelector, safe_labels: LabelSelector = "safe",
          config: RouteConfig = RouteConfig()) -> RoutingReport:
    """Evaluate each site of `saes` (site -> (SAE, its file path)), rank all (site, operator)
    pairs and select the best operator of the `num_sites` best sites."""
    if not saes:
        raise ValueError("saes is empty; give at least one site with its SAE")
    for site, (sae, path) in saes.items():
        _check_steerable_site(site, sae, path, config)
    evals = [evaluate_site(store, site, sae, source_labels, target_labels, safe_labels, config.rule, config.steps,
                           sae_path=path) for site, (sae, path) in saes.items()]
    ranking = rank_candidates(evals, config)
    selected, passed_over = select_steerable(evals, ranking, config.num_sites)
    taus = {}
    if config.gate_quantile is not None:
        by_key = {SiteSpec.parse(site).key: sae for site, (sae, _) in saes.items()}
        ev = {s.site: s for s in evals}
        taus = {c.site: safe_tau(store, c.site, by_key[c.site], ev[c.site].harmful, config.gate_quantile,
                                 safe_labels, config.steps) for c in selected}
    cfg = dataclasses.asdict(config)
    cfg["tau_quantile"] = config.gate_quantile
    cfg["window"] = list(config.window)
    cfg["operators"] = list(config.operators)
    return RoutingReport(source_labels=parse_labels(source_labels), target_labels=parse_labels(target_labels),
                         safe_labels=parse_labels(safe_labels), config=cfg, sites=evals, ranking=ranking,
                         selected=selected, passed_over=passed_over, tau=taus)


def select_steerable(sites: Sequence[SiteEvaluation], ranking: Sequence[Candidate],
                     num_sites: int) -> tuple[list[Candidate], list[str]]:
    """The best operator of each of the `num_sites` best-ranked sites that have a harmful
    feature (source or target), and the sites ranked above the last pick that were passed over.

    Why: Blend's stability weighs reconstruction quality, so a site with no harmful feature can
    rank first, yet its harm score is 0 on every token: its gate would never open, and
    steering refuses such a site rather than be on in name only."""
    steerable = {s.site for s in sites if s.harmful}
    picked: list[Candidate] = []
    used: set[str] = set()
    for c in ranking:
        if c.site in steerable and c.site not in used and len(picked) < num_sites:
            picked.append(c)
            used.add(c.site)
    if not picked:
        raise ValueError(f"no candidate site has a harmful feature on the source or the target "
                         f"({sorted(s.site for s in sites)}), so there is nothing to steer; try a looser harmful-"
                         f"feature rule (min_ratio, min_freq), SAEs trained longer, or other sites")
    last = ranking.index(picked[-1])
    passed_over = sorted({c.site for c in ranking[:last + 1]} - steerable)
    return picked, passed_over


def check_quantile(q: float, where: str) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
        raise ValueError(f"{where} must be a number in (0, 1) (the share of safe tokens left unsteered), got {q!r}")
    return float(q)


@torch.no_grad()
def safe_tau(store: ActivationStore, site: Union[str, SiteSpec], sae: TopKSAE, harmful: Sequence[int],
             quantile: float, safe_labels: LabelSelector = "safe", steps: Optional[Iterable[int]] = None) -> float:
    """The `quantile` of the harm score `h` (spec §2, with `harmful`) over every captured safe
    token at `site`: as a gate threshold tau (the gate opens where h > tau) it steers about
    `1 - quantile` of safe tokens."""
    check_quantile(quantile, "quantile")
    key = SiteSpec.parse(site).key
    if not harmful:
        # h = 0 on every token: no threshold makes a gate that opens on harmful tokens only.
        raise ValueError(f"safe_tau: site {key} has no harmful feature, so its harm score is 0 on every token "
                         f"and no tau calibrates its gate")
    steps = None if steps is None else list(steps)
    hs = [harm_scores(sae, harmful, x).flatten() for x in store.prompt_activations(key, safe_labels, steps)]
    if not hs:
        raise ValueError(f"safe_tau: safe_labels {parse_labels(safe_labels)} match no prompts at site {key} in "
                         f"{store.dir}; labels present: {store.labels}")
    # Linear interpolation between order statistics, as torch.quantile, which refuses more than
    # 2^24 values (a real capture's safe tokens exceed that).
    h = torch.sort(torch.cat(hs).double().cpu()).values
    pos = quantile * (h.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, h.numel() - 1)
    return float(h[lo] + (pos - lo) * (h[hi] - h[lo]))


def _check_steerable_site(site: Union[str, SiteSpec], sae: TopKSAE, path: str, config: RouteConfig) -> None:
    """Refuse, before any work, a candidate the written config could not steer: `safedig steer`
    would reject it (`integrations.diffusers.plan.resolve`)."""
    spec = SiteSpec.parse(site)
    # The config names the site it was routed at without allow_other_site.
    check_sae_site(sae, spec.module, spec.stream, f"route: site {spec.key} (SAE {path or 'in memory'})")
    if spec.module.startswith("text_encoder") and (tuple(config.window) != (0.0, 1.0) or config.cfg != "both"):
        raise ValueError(f"route: site {spec.key} is a text encoder, which runs once per prompt and cannot tell the "
                         f"negative prompt apart: steering it needs window (0.0, 1.0) and cfg 'both', got window "
                         f"{tuple(config.window)} and cfg {config.cfg!r}")
