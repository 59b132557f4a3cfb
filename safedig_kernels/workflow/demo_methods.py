"""The methods `safedig demo` compares, as steering configs, the paper-shaped table of their
results, and the demo's whole printout (`demo.py` runs them; `eval.py` judges their images).

Every method steers the held-out prompts from the same noise; each is one column of images:

- `source`: the steerer learned on the source domain alone: the routed sites (or every site,
  where its validation prefers that) with the SAEs trained there, each site's harmful set scored
  on the source only and its gate calibrated for that set (a site with no source harmful feature
  is not steered);
- `adapted` (SafeDIG): the routed sites (or every site, as for `source`), encoder frozen, decoder
  adapted to the target, harmful set the union of those scored on the source and (same frozen
  encoder) on the target;
- `unadapted`: SafeDIG with the source decoders: the same sites, harmful sets, gates and
  operators, decoder not adapted (what the decoder adaptation alone buys);
- `finetune`: the sites with the whole SAE (encoder too) fine-tuned on the same target
  samples, its harmful set scored again with the new encoder and its gate recalibrated;
- `site-<site>`: one candidate site alone (no routing), adapted, with the operator routing ranks
  best for it; the best and the worst of these are the table's fixed-site rows;
- `blend`, `repel`, `both`: the routed sites, adapted, every site with that one operator.

`source`, `adapted` and `finetune` steer the sites and operators `validate.py` chose on the
method's own training prompts: `operator_candidates` lists what it tries at the routed sites,
`every_site_config` the winner widened to every site the method can steer (kept when
`validate.pick` prefers it); without a detector, routing's.

Rates are the detector's (independent of the SAEs): per domain, and `overall` over the source
and target prompts pooled, each with its 95 % Wilson interval; the safe images' PSNR and SSIM
are against the unsteered ones.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

from ..integrations.diffusers.config import SafeDIGConfig
from ..sae import TopKSAE
from .eval import rate_cell, rate_text
from .route import OPERATORS, RoutingReport
from .validate import site_operators

__all__ = ["format_table", "site_column", "routed_config", "best_operator", "operator_candidates", "every_site_config",
           "single_site_config", "method_rows",
           "site_check", "format_methods_table", "format_site_check", "methods_markdown"]


def site_column(site: str) -> str:
    """The column name of one fixed site: `site-<module>` or `site-<module>-<stream>`."""
    return "site-" + site.replace(":", "-")


def routed_config(report: RoutingReport, saes: Mapping[str, TopKSAE], *,
                  operator: Union[None, str, Mapping[str, str]] = None,
                  harmful: Optional[Mapping[str, Sequence[int]]] = None,
                  tau: Optional[Mapping[str, float]] = None, sites: Optional[Sequence[str]] = None) -> SafeDIGConfig:
    """`sites` (default: the routed ones, in routing's order) steered with `saes[site]`.

    Each site's operator is `operator` (one for every site, or one per site), else routing's
    where it routed the site, else the operator it ranks best there. Its harmful set and gate are
    `harmful[site]` and `tau[site]` (a fine-tuned encoder's, the source's alone), else routing's:
    the union of the sets scored on the source and on the target, and the routed gate (a site
    routing did not select has none, so its `tau` must be given)."""
    evals = {e.site: e for e in report.sites}
    routed = {c.site: c.operator for c in report.selected}
    keys = list(routed) if sites is None else list(sites)
    unknown = [k for k in keys if k not in evals]
    if unknown or not keys:
        raise ValueError(f"routed_config: sites must be candidate sites of the routing report ({list(evals)}), "
                         f"got {list(sites or [])}")
    kept = []
    for key in keys:
        op = operator.get(key) if isinstance(operator, Mapping) else operator
        kept.append(report.site_config(key, saes[key], op or routed.get(key) or best_operator(report, key),
                                       tau=(tau or {}).get(key), harmful=(harmful or {}).get(key)))
    return SafeDIGConfig(kept)


def best_operator(report: RoutingReport, site: str) -> str:
    """The operator routing ranks best at `site`."""
    return next(c.operator for c in report.ranking if c.site == site)


def operator_candidates(report: RoutingReport, saes: Mapping[str, TopKSAE], **overrides: Any
                        ) -> dict[str, SafeDIGConfig]:
    """What `validate.validate_steerer` tries first for one method: routing's own per-site operators
    (`routed`, first, so it wins exact ties), then each operator at every routed site. `overrides` are
    `routed_config`'s `harmful`, `tau` and `sites`."""
    return {"routed": routed_config(report, saes, **overrides),
            **{op: routed_config(report, saes, operator=op, **overrides) for op in OPERATORS}}


def every_site_config(report: RoutingReport, winner: SafeDIGConfig, sites: Sequence[str], *,
                      saes: Mapping[str, TopKSAE], harmful: Optional[Mapping[str, Sequence[int]]] = None,
                      tau: Optional[Mapping[str, float]] = None) -> SafeDIGConfig:
    """`winner` (a validated config) widened to every site in `sites`: its own sites keep their
    operators; the others take its operator when it steers every site alike, else the one
    routing ranks best there. `saes`, `harmful` and `tau` as `routed_config`'s."""
    own = site_operators(winner)
    alike = set(own.values())
    operator = {k: own.get(k) or (next(iter(alike)) if len(alike) == 1 else best_operator(report, k)) for k in sites}
    return routed_config(report, saes, operator=operator, harmful=harmful, tau=tau, sites=sites)


def single_site_config(report: RoutingReport, site: str, sae: TopKSAE, tau: float) -> SafeDIGConfig:
    """One candidate site alone, steered with `sae` and the operator routing ranks best for it."""
    return routed_config(report, {site: sae}, operator=best_operator(report, site), tau={site: tau}, sites=[site])


def method_rows(unsafe: Mapping[str, Mapping[str, Mapping[str, float]]], similarity: Mapping[str, Mapping[str, float]],
                source: str, target: str, site_columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """The table's rows from an evaluation (`EvalReport.unsafe`, `.safe_similarity`): one per
    method, in the paper's order; the best and worst fixed site by the target rate (ties: the
    lower overall rate is better; then the site name)."""
    def row(method: str, column: str, note: str = "") -> dict[str, Any]:
        s, t, safe = unsafe[source][column], unsafe[target][column], unsafe["safe"][column]
        sim = similarity.get(column, {})
        return {"method": method, "column": column, "note": note, "source": rate_cell(s["unsafe"], s["n"]),
                "target": rate_cell(t["unsafe"], t["n"]),
                "overall": rate_cell(s["unsafe"] + t["unsafe"], s["n"] + t["n"]),
                "safe": rate_cell(safe["unsafe"], safe["n"]), "psnr_db": sim.get("psnr_db"), "ssim": sim.get("ssim")}

    rows = [row("no steering", "unsteered"), row("source SAEs (no adaptation)", "source"),
            row("SafeDIG (frozen encoder, adapted decoder, validated sites)", "adapted"),
            row("full fine-tune (encoder too)", "finetune")]
    if "unadapted" in unsafe[source]:
        rows.append(row("SafeDIG with the source decoders (decoder not adapted)", "unadapted"))
    fixed = [row("", col, site) for site, col in site_columns.items()]
    if fixed:
        ranked = sorted(fixed, key=lambda r: (r["target"]["rate"], r["overall"]["rate"], r["note"]))
        rows.append(dict(ranked[0], method="best single fixed site, no routing"))
        rows.append(dict(ranked[-1], method="worst single fixed site, no routing"))
    rows += [row(f"{op.capitalize()} only" if op != "both" else "Blend + Repel (both)", op) for op in OPERATORS]
    return rows


def site_check(unsafe: Mapping[str, Mapping[str, Mapping[str, float]]], source: str, target: str,
               site_columns: Mapping[str, str], routed: Sequence[str], operators: Mapping[str, str],
               no_harmful: Sequence[str]) -> list[dict[str, Any]]:
    """Routing checked against its purpose: per candidate site, the target (and source) unsafe
    rate with that site alone, adapted; its rank by the target rate (1 = fewest marks left); and
    whether routing chose it. Sites with no harmful feature cannot steer and rank last."""
    rows = []
    for site, col in site_columns.items():
        t, s = unsafe[target][col], unsafe[source][col]
        rows.append({"site": site, "operator": operators[site], "target_rate": t["rate"], "source_rate": s["rate"],
                     "routed": site in routed})
    rows.sort(key=lambda r: (r["target_rate"], r["source_rate"], r["site"]))
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    for site in no_harmful:
        rows.append({"site": site, "operator": None, "target_rate": None, "source_rate": None, "routed": False,
                     "rank": None})
    return rows


def _db(v: Optional[float]) -> str:
    if v is None:
        return "(reference)"
    return "identical" if math.isinf(v) else f"{v:.1f}"


def methods_markdown(rows: Sequence[Mapping[str, Any]], source: str, target: str) -> str:
    """The table as markdown (README, docs/workflow.md)."""
    n = rows[0]["source"]["n"]
    lines = [f"| method | source `{source}` | target `{target}` | overall unsafe | safe | safe PSNR (dB) | safe SSIM |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["method"] + (f" (`{r['note']}`)" if r["note"] else "")
        ssim = "" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {name} | {rate_text(r['source'])} | {rate_text(r['target'])} | {rate_text(r['overall'])} | "
                     f"{rate_text(r['safe'])} | {_db(r['psnr_db'])} | {ssim} |")
    lines.append(f"\n{n} held-out prompts per label; unsafe rate with its 95 % Wilson interval.")
    return "\n".join(lines)


def format_methods_table(summary: Mapping[str, Any]) -> str:
    """The paper-shaped table printed at the end of the demo, from `summary.json`'s content."""
    c = summary["config"]
    det = summary["detector"]
    head = (f"Unsafe rate judged by the `{det['name']}` detector (independent of the SAEs: {det['description']}), "
            f"seed {summary['seed']}; domains: source {summary['domains']['source']}, target "
            f"{summary['domains']['target']}.")
    return head + "\n\n" + methods_markdown(summary["methods"], c["source"], c["target"])


def format_site_check(summary: Mapping[str, Any]) -> str:
    """Per candidate site: the target unsafe rate with that site alone, adapted, and its rank."""
    lines = ["Routing checked: each candidate site alone (adapted decoder, its best-ranked operator); rank 1 leaves "
             "the fewest target marks.", "",
             "| rank | site | operator | target unsafe | source unsafe | routed |", "|---:|---|---|---:|---:|---|"]
    for r in summary["site_check"]:
        if r["rank"] is None:
            lines.append(f"| - | {r['site']} | - | no harmful feature: nothing to steer | | |")
            continue
        lines.append(f"| {r['rank']} | {r['site']} | {r['operator']} | {r['target_rate']:.0%} | {r['source_rate']:.0%} "
                     f"| {'yes' if r['routed'] else ''} |")
    return "\n".join(lines)


# -- the whole printout of `safedig demo` -------------------------------------------------------

def _fmt_rel(after: float, before: float) -> str:
    if not (math.isfinite(after) and math.isfinite(before)) or before == 0:
        return "n/a"
    return f"{(after - before) / before:+.0%}"


def _unsafe_rate_lines(summary: dict[str, Any], names: list[str], w: int) -> list[str]:
    """The detector's verdict: unsafe rate per label and column with its 95 % Wilson interval,
    then how far steering moved the safe images (PSNR, SSIM against the unsteered ones)."""
    columns = (("unsteered", "unsteered"), ("source", "steered, source SAE"), ("adapted", "steered, adapted SAE"))
    det = summary["detector"]
    n = max(r["prompts"] for r in summary["table"])
    lines = [f"Unsafe rate of the final images judged by the `{det['name']}` detector, independent of the SAEs; "
             f"{n} held-out",
             f"prompts per row; 95 % Wilson interval in brackets. Detector: {det['description']}.", "",
             f"{'prompts':<{w}} " + " | ".join(f"{title:^20}" for _, title in columns)]
    for name, row in zip(names, summary["table"]):
        cells = summary["unsafe"][row["label"]]
        texts = [rate_text(cells[k]) for k, _ in columns]
        lines.append(f"{name:<{w}} " + " | ".join(f"{t:^20}" for t in texts))
    sim = summary["safe_similarity"]
    lines += ["", "Safe images, steered against unsteered (same noise): "
              + "; ".join(f"{title.split(', ')[1]} PSNR {_fmt_psnr(sim[k]['psnr_db'])}, SSIM {sim[k]['ssim']:.4f}"
                          for k, title in columns[1:] if k in sim), ""]
    return lines


def _fmt_psnr(db: float) -> str:
    return "inf (identical)" if math.isinf(db) else f"{db:.1f} dB"


def format_table(summary: dict[str, Any]) -> str:
    """The before/after table printed at the end of the demo (from `summary.json`'s content)."""
    rows = summary["table"]
    c = summary["config"]
    role = {c["source"]: "  (source)", c["target"]: "  (target)"}
    names = [f"{r['label']}{role.get(r['label'], '')}" for r in rows]
    w = max(28, *(len(n) for n in names))
    n = max(r["prompts"] for r in rows)
    lines = _unsafe_rate_lines(summary, names, w) if "unsafe" in summary else []
    lines += ["Harm score h (spec §2) of the activations leaving the steered sites, mean per token and step,",
             f"judged by the source SAE; {n} held-out prompts per row. Gate: share of tokens over tau (steered).",
             "",
             f"{'':<{w}} {'unsteered':>9} | {'steered, source SAE':^22} | {'steered, adapted SAE':^22}",
             f"{'prompts':<{w}} {'h':>9} | {'h':>8} {'change':>7} {'gate':>5} | {'h':>8} {'change':>7} {'gate':>5}"]
    for name, r in zip(names, rows):
        base = r["harm_unsteered"]
        cells = [f"{x['harm']:>8.3f} {_fmt_rel(x['harm'], base):>7} {x['gated_fraction']:>5.0%}"
                 for x in (r["source_sae"], r["adapted_sae"])]
        lines.append(f"{name:<{w}} {base:>9.3f} | {cells[0]} | {cells[1]}")
    lines += ["",
              "Final latents moved by steering, ||z_steered - z_unsteered|| / ||z_unsteered|| (same noise):",
              "",
              f"{'':<{w}} {'':>9} | {'steered, source SAE':^22} | {'steered, adapted SAE':^22}",
              f"{'prompts':<{w}} {'':>9} | {'mean':>10} {'max':>11} | {'mean':>10} {'max':>11}"]
    for name, r in zip(names, rows):
        cells = [f"{x['latents_moved']:>10.3%} {x['latents_moved_max']:>11.3%}"
                 for x in (r["source_sae"], r["adapted_sae"])]
        lines.append(f"{name:<{w}} {'':>9} | {cells[0]} | {cells[1]}")
    t = summary["overhead"]
    lines += ["",
              f"Steering overhead, {t['device']} ({t['threads']} thread(s), {t['dtype']}, this machine, "
              f"{summary['model']}, {t['sites']} site(s)):",
              f"  {t['ms_per_step_without']:.2f} ms per denoising step without steering, "
              f"{t['ms_per_step_with']:.2f} ms with ({t['overhead']:+.0%}; median of {t['calls_timed']} steps each)"]
    if t["device"].startswith("cpu"):
        lines.append("  CPU numbers on a tiny model: they say nothing about GPU overhead (spec §5-6).")
    if summary.get("methods"):  # the paper's table last: what the demo is for
        lines += ["", format_site_check(summary), "", format_methods_table(summary)]
    return "\n".join(lines)
