"""Harmful-feature scoring: which SAE latents fire more on unsafe than on safe prompts.

For each latent j, over the tokens of each group (unsafe, safe):

- `freq` = fraction of tokens on which j is active (in the top k with a positive value);
- `mean` = mean activation over all tokens (0 where inactive) = freq x mean size when active.

Score: `score_j = mean_unsafe_j - mean_safe_j`, which grows with both how much more often and
how much more strongly j fires on unsafe prompts (in the units of the SAE's codes).

Selection rule (`HarmfulRule`): j is harmful when

1. `score_j > min_score`,
2. `freq_unsafe_j >= min_freq` (it fires on a real share of unsafe tokens), and
3. `freq_unsafe_j >= min_ratio * freq_safe_j` (it is selective, not merely frequent);

of those, the `top_n` highest scores are kept (ties to the lower id).

The report also gives the separation of unsafe from safe prompts achieved by the chosen set: the
AUROC of the per-prompt mean harm score `h = sum_{j in S ∩ H} z_j` (spec §2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from .._io import write_json_and_table
from ..integrations.diffusers.plan import check_sae_site
from ..integrations.diffusers.sites import SiteSpec
from ..ops import Harmful, as_harmful_mask
from ..sae import TopKSAE
from .prompts import LabelSelector, parse_labels
from .store import ActivationStore


@dataclass
class HarmfulRule:
    """Thresholds of the selection rule (module docstring)."""

    top_n: int = 32
    min_ratio: float = 2.0
    min_freq: float = 0.01
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.top_n, int) or self.top_n < 1:
            raise ValueError(f"top_n must be a positive int, got {self.top_n!r}")
        if self.min_ratio < 1.0:
            raise ValueError(f"min_ratio must be >= 1 (a harmful feature fires at least as often on unsafe "
                             f"prompts), got {self.min_ratio}")
        if not 0.0 <= self.min_freq <= 1.0:
            raise ValueError(f"min_freq must lie in [0, 1], got {self.min_freq}")


@dataclass
class GroupStats:
    """Per-feature sums over one group of prompts, plus reconstruction sums for FVU."""

    num_features: int
    tokens: int = 0
    prompts: int = 0
    fires: Optional[torch.Tensor] = None  # [F] float64 counts
    act: Optional[torch.Tensor] = None    # [F] float64 activation sums
    err: float = 0.0                # sum ||x - x_hat||^2
    sum_x: Optional[torch.Tensor] = None
    sum_sq: float = 0.0

    def __post_init__(self) -> None:
        if self.fires is None:
            self.fires = torch.zeros(self.num_features, dtype=torch.float64)
        if self.act is None:
            self.act = torch.zeros(self.num_features, dtype=torch.float64)

    @property
    def freq(self) -> torch.Tensor:
        return self.fires / max(self.tokens, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.act / max(self.tokens, 1)

    @property
    def fvu(self) -> float:
        if self.tokens == 0 or self.sum_x is None:
            return float("nan")
        var = self.sum_sq - float((self.sum_x * self.sum_x).sum()) / self.tokens
        return self.err / max(var, 1e-12)

    def merged(self, other: "GroupStats") -> "GroupStats":
        sx = None if self.sum_x is None else self.sum_x + (other.sum_x if other.sum_x is not None else 0)
        return GroupStats(self.num_features, self.tokens + other.tokens, self.prompts + other.prompts,
                          self.fires + other.fires, self.act + other.act, self.err + other.err,
                          sx if sx is not None else other.sum_x, self.sum_sq + other.sum_sq)


@torch.no_grad()
def group_stats(sae: TopKSAE, prompts: Iterable[torch.Tensor], batch_tokens: int = 8192) -> GroupStats:
    """Accumulate `GroupStats` over prompts, each activations `[T, d]`."""
    st = GroupStats(sae.num_features, sum_x=torch.zeros(sae.d, dtype=torch.float64))
    for x in prompts:
        if x.dim() != 2 or x.shape[1] != sae.d:
            raise ValueError(f"activations must be [T, d] with d = {sae.d} (the SAE's width), got {tuple(x.shape)}")
        st.prompts += 1
        for xb in x.split(batch_tokens):
            xb = xb.to(sae.device, sae.dtype)
            vals, idx = sae.encode(xb)
            on = vals > 0
            ids = idx[on].long().cpu()
            st.fires.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
            st.act.index_add_(0, ids, vals[on].double().cpu())
            x_hat = sae.decode(vals, idx)
            st.err += float((xb.double() - x_hat.double()).pow(2).sum())
            st.sum_x += xb.double().sum(0).cpu()
            st.sum_sq += float(xb.double().pow(2).sum())
            st.tokens += xb.shape[0]
    return st


def feature_scores(unsafe: GroupStats, safe: GroupStats) -> torch.Tensor:
    """`mean_unsafe - mean_safe`, `[F]` float64."""
    return unsafe.mean - safe.mean


def select_harmful(unsafe: GroupStats, safe: GroupStats, rule: HarmfulRule = HarmfulRule()) -> list[int]:
    """Feature ids chosen by `rule` (module docstring), highest score first."""
    if unsafe.tokens == 0 or safe.tokens == 0:
        raise ValueError(f"need tokens of both groups to score features, got {unsafe.tokens} unsafe and "
                         f"{safe.tokens} safe")
    score = feature_scores(unsafe, safe)
    ok = (score > rule.min_score) & (unsafe.freq >= rule.min_freq) & (unsafe.freq >= rule.min_ratio * safe.freq)
    ids = ok.nonzero().flatten()
    # Stable sort on -score keeps equal scores in ascending id order.
    order = torch.sort(-score[ids], stable=True).indices
    return ids[order][: rule.top_n].tolist()


@torch.no_grad()
def harm_scores(sae: TopKSAE, harmful: Harmful, x: torch.Tensor) -> torch.Tensor:
    """The harm score `h` (spec §2) of each token of `x` `[..., d]` under `sae` and `harmful`
    (feature ids or a bool mask `[F]`), fp32 `[...]`: a yardstick that may differ from the
    SAE's own harmful set."""
    mask = as_harmful_mask(harmful, sae.num_features, sae.device)
    vals, idx = sae.encode(x.to(sae.device, sae.dtype))
    return torch.where(mask[idx.long()], vals, torch.zeros_like(vals)).sum(-1)


@torch.no_grad()
def prompt_harm_scores(sae: TopKSAE, harmful: Sequence[int], prompts: Iterable[torch.Tensor],
                       batch_tokens: int = 8192) -> torch.Tensor:
    """Mean harm score `h` over each prompt's tokens, `[P]` float64."""
    mask = as_harmful_mask(harmful, sae.num_features, sae.device)
    out = []
    for x in prompts:
        total, n = 0.0, 0
        for xb in x.split(batch_tokens):
            total += float(harm_scores(sae, mask, xb).double().sum())
            n += xb.shape[0]
        out.append(total / max(n, 1))
    return torch.tensor(out, dtype=torch.float64)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties counting one half
    (Mann-Whitney U with average ranks). NaN when either side is empty."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    allv = torch.cat([pos, neg])
    sorted_v, order = torch.sort(allv, stable=True)
    _, counts = torch.unique_consecutive(sorted_v, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank_sorted = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)
    ranks = torch.empty_like(allv)
    ranks[order] = avg_rank_sorted
    n_pos, n_neg = pos.numel(), neg.numel()
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass
class ScoringReport:
    """What `score_features` found for one site."""

    site: str
    sae_path: str
    unsafe_labels: list[str]
    safe_labels: list[str]
    rule: dict[str, Any]
    tokens: dict[str, int]
    prompts: dict[str, int]
    harmful: list[int]
    separation_auroc: float
    features: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self, rows: int = 20) -> str:
        """A fixed-width table of the top-ranked features."""
        lines = [f"site {self.site}: {len(self.harmful)} harmful feature(s) of {self.prompts['unsafe']} unsafe / "
                 f"{self.prompts['safe']} safe prompts ({self.tokens['unsafe']} / {self.tokens['safe']} tokens); "
                 f"unsafe-vs-safe AUROC of the harm score {self.separation_auroc:.3f}",
                 f"{'rank':>4} {'feature':>8} {'score':>9} {'freq_unsafe':>11} {'freq_safe':>9} {'ratio':>7} "
                 f"{'mean_unsafe':>11} {'mean_safe':>9} harmful"]
        for r, f in enumerate(self.features[:rows], start=1):
            ratio = "inf" if f["ratio"] == float("inf") else f"{f['ratio']:.1f}"
            lines.append(f"{r:>4} {f['feature']:>8} {f['score']:>9.4f} {f['freq_unsafe']:>11.4f} "
                         f"{f['freq_safe']:>9.4f} {ratio:>7} {f['mean_unsafe']:>11.4f} {f['mean_safe']:>9.4f} "
                         f"{'yes' if f['harmful'] else ''}")
        return "\n".join(lines)

    def write(self, path: Union[str, Path]) -> tuple[Path, Path]:
        """`path` (JSON) and the same name with `.txt` (the table). Returns both paths."""
        d = self.to_dict()
        # JSON has no infinity: a feature that never fires on safe prompts has ratio null.
        for f in d["features"]:
            if f["ratio"] == float("inf"):
                f["ratio"] = None
        return write_json_and_table(path, d, self.table(rows=len(self.features)))


def score_features(store: ActivationStore, site: Union[str, SiteSpec], sae: TopKSAE,
                   unsafe_labels: LabelSelector = "unsafe", safe_labels: LabelSelector = "safe",
                   rule: HarmfulRule = HarmfulRule(), steps: Optional[Iterable[int]] = None,
                   sae_path: str = "", report_top: int = 100, allow_other_site: bool = False) -> ScoringReport:
    """Rank the SAE's features at `site` by unsafe-vs-safe firing and pick the harmful set.
    An SAE trained at another site is refused unless `allow_other_site` (`check_sae_site`)."""
    spec = SiteSpec.parse(site)
    key = spec.key
    check_sae_site(sae, spec.module, spec.stream, f"score at site {key} with SAE {sae_path or ''}".rstrip(),
                   allow_other_site)
    if store.width(key) != sae.d:
        raise ValueError(f"site {key} has width {store.width(key)} but the SAE {sae_path or ''} has d = {sae.d}")
    steps = None if steps is None else list(steps)
    for what, sel in (("unsafe_labels", unsafe_labels), ("safe_labels", safe_labels)):
        if not store.entries(key, sel, steps):
            raise ValueError(f"{what} {parse_labels(sel)} match no prompts at site {key} in {store.dir}; "
                             f"labels present: {store.labels}")
    unsafe = group_stats(sae, store.prompt_activations(key, unsafe_labels, steps))
    safe = group_stats(sae, store.prompt_activations(key, safe_labels, steps))
    harmful = select_harmful(unsafe, safe, rule)
    sep = auroc(prompt_harm_scores(sae, harmful, store.prompt_activations(key, unsafe_labels, steps)),
                prompt_harm_scores(sae, harmful, store.prompt_activations(key, safe_labels, steps))) if harmful else 0.5
    score = feature_scores(unsafe, safe)
    order = torch.sort(-score, stable=True).indices[:report_top].tolist()
    hset = set(harmful)
    feats = []
    for j in order:
        fu, fs = float(unsafe.freq[j]), float(safe.freq[j])
        feats.append({"feature": j, "score": float(score[j]), "freq_unsafe": fu, "freq_safe": fs,
                      "ratio": fu / fs if fs > 0 else (float("inf") if fu > 0 else 1.0),
                      "mean_unsafe": float(unsafe.mean[j]), "mean_safe": float(safe.mean[j]), "harmful": j in hset})
    return ScoringReport(site=key, sae_path=str(sae_path), unsafe_labels=parse_labels(unsafe_labels),
                         safe_labels=parse_labels(safe_labels), rule=dataclasses.asdict(rule),
                         tokens={"unsafe": unsafe.tokens, "safe": safe.tokens},
                         prompts={"unsafe": unsafe.prompts, "safe": safe.prompts}, harmful=harmful,
                         separation_auroc=sep, features=feats)
