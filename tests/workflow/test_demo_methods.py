"""The demo's table: rows from an evaluation's counts, best and worst fixed site, routing's rank."""
from __future__ import annotations

from safedig_kernels.workflow.demo_methods import method_rows, methods_markdown, site_check

SRC, TGT = "unsafe/a", "unsafe/a_gold"


def _unsafe(counts: dict[str, tuple[int, int, int]], n: int = 16) -> dict:
    """{label: {column: cell}} from (source, target, safe) unsafe counts per column."""
    out: dict = {SRC: {}, TGT: {}, "safe": {}}
    for column, (s, t, safe) in counts.items():
        for label, k in ((SRC, s), (TGT, t), ("safe", safe)):
            out[label][column] = {"rate": k / n, "unsafe": k, "n": n}
    return out


COUNTS = {"unsteered": (16, 16, 0), "source": (1, 12, 0), "adapted": (1, 1, 0), "finetune": (3, 2, 0),
          "blend": (2, 3, 0), "repel": (4, 9, 0), "both": (0, 1, 1), "site-b.0": (2, 5, 0), "site-b.1": (9, 14, 0),
          "site-b.0-text": (2, 5, 0)}
SITES = {"b.0": "site-b.0", "b.1": "site-b.1", "b.0:text": "site-b.0-text"}


def test_rows_pool_the_domains_and_pick_the_fixed_sites():
    sim = {c: {"psnr_db": 40.0, "ssim": 0.99} for c in COUNTS if c != "unsteered"}
    rows = method_rows(_unsafe(COUNTS), sim, SRC, TGT, SITES)
    by = {r["method"]: r for r in rows}
    assert [r["column"] for r in rows] == ["unsteered", "source", "adapted", "finetune", "site-b.0", "site-b.1",
                                           "blend", "repel", "both"]
    ad = by["SafeDIG (frozen encoder, adapted decoder, validated sites)"]
    overall = ad["overall"]
    assert (overall["unsafe"], overall["n"]) == (2, 32) and overall["low"] < 2 / 32 < overall["high"]
    # two sites tie on the target and overall rates: the name decides (b.0 before b.0:text)
    assert by["best single fixed site, no routing"]["note"] == "b.0"
    assert by["worst single fixed site, no routing"]["note"] == "b.1"
    assert by["no steering"]["psnr_db"] is None and by["Blend + Repel (both)"]["safe"]["unsafe"] == 1
    table = methods_markdown(rows, SRC, TGT)
    assert "| SafeDIG (frozen encoder, adapted decoder, validated sites) | 6% [" in table and "(reference)" in table


def test_routing_check_ranks_every_site_and_marks_the_routed_ones():
    rows = site_check(_unsafe(COUNTS), SRC, TGT, SITES, routed=["b.1"], operators={k: "blend" for k in SITES},
                      no_harmful=["b.9"])
    assert [(r["site"], r["rank"], r["routed"]) for r in rows] == [
        ("b.0", 1, False), ("b.0:text", 2, False), ("b.1", 3, True), ("b.9", None, False)]
    assert rows[2]["target_rate"] == 14 / 16


def _report():
    from safedig_kernels.workflow.route import Candidate, RoutingReport, SiteEvaluation

    def ev(site, source, target):
        return SiteEvaluation(site=site, sae_path="", harmful_source=source, harmful_target=target, overlap=0.0,
                              recon=1.0, separation=1.0, separation_source=1.0, fvu_target=0.0, tokens=1.0,
                              flops_per_token={})
    sites = [ev("transformer_blocks.0:image", [1, 2], [2, 3]), ev("transformer_blocks.1:text", [], [5])]
    picked = [Candidate("transformer_blocks.0:image", "blend", 1.0, 0.0, 1.0),
              Candidate("transformer_blocks.1:text", "repel", 0.9, 0.0, 0.9)]
    config = {"beta": 0.5, "gamma": 2.0, "tau": None, "window": [0.0, 1.0], "cfg": "both"}
    return RoutingReport(["unsafe/a"], ["unsafe/a_gold"], ["safe"], config, sites, picked, picked,
                         tau={"transformer_blocks.0:image": 0.25, "transformer_blocks.1:text": 0.75})


def test_routed_config_takes_operators_per_site_and_keeps_the_sites_asked_for():
    import pytest

    from safedig_kernels.sae import random_sae
    from safedig_kernels.workflow.demo_methods import operator_candidates, routed_config
    from safedig_kernels.workflow.validate import site_operators

    report = _report()
    saes = {"transformer_blocks.0:image": random_sae(8, 16, 2),
            "transformer_blocks.1:text": random_sae(8, 16, 2, seed=1)}
    conf = routed_config(report, saes, operator={"transformer_blocks.1:text": "both"})
    assert [(s.beta, s.gamma, list(s.harmful), s.tau) for s in conf.sites] == [(0.5, 0.0, [1, 2, 3], 0.25),
                                                                         (0.5, 2.0, [5], 0.75)]
    # The source steerer: its own harmful set and gate, only where it has a harmful feature.
    src = routed_config(report, saes, harmful={"transformer_blocks.0:image": [1, 2]},
                        tau={"transformer_blocks.0:image": 0.125}, sites=["transformer_blocks.0:image"])
    assert [(s.site, list(s.harmful), s.tau, s.beta) for s in src.sites] == [
        ("transformer_blocks.0:image", [1, 2], 0.125, 0.5)]
    with pytest.raises(ValueError, match="candidate sites of the routing report"):
        routed_config(report, saes, sites=["transformer_blocks.7:image"])
    cands = operator_candidates(report, saes)
    assert list(cands) == ["routed", "blend", "repel", "both"]
    assert site_operators(cands["routed"]) == {"transformer_blocks.0:image": "blend",
                                               "transformer_blocks.1:text": "repel"}
    assert set(site_operators(cands["both"]).values()) == {"both"}


def test_a_site_routing_did_not_select_takes_its_best_operator_and_needs_a_gate():
    from dataclasses import replace

    import pytest

    from safedig_kernels.sae import random_sae
    from safedig_kernels.workflow.demo_methods import every_site_config, routed_config, single_site_config
    from safedig_kernels.workflow.route import Candidate
    from safedig_kernels.workflow.validate import site_operators

    report = _report()  # routing ranked a third site and selected the first two
    extra = replace(report.sites[0], site="single_transformer_blocks.0:image", harmful_source=[4], harmful_target=[])
    report.sites.append(extra)
    report.ranking = [*report.ranking, Candidate("single_transformer_blocks.0:image", "both", 0.5, 0.0, 0.5)]
    saes = {k: random_sae(8, 16, 2, seed=i) for i, k in enumerate(
        ["transformer_blocks.0:image", "transformer_blocks.1:text", "single_transformer_blocks.0:image"])}
    every = list(saes)
    with pytest.raises(ValueError, match="has no gate"):
        routed_config(report, saes, sites=every)
    gates = {"single_transformer_blocks.0:image": 0.5}
    conf = routed_config(report, saes, tau=gates, sites=every)
    assert site_operators(conf) == {"transformer_blocks.0:image": "blend", "transformer_blocks.1:text": "repel",
                                    "single_transformer_blocks.0:image": "both"}
    assert [(list(s.harmful), s.tau) for s in conf.sites][2] == ([4], 0.5)
    # widening a validated winner: its sites keep their operators; the new one takes the winner's
    # operator when it steers every site alike, else routing's best there
    repel = routed_config(report, saes, operator="repel")
    assert set(site_operators(every_site_config(report, repel, every, saes=saes, tau=gates)).values()) == {"repel"}
    mixed = routed_config(report, saes)
    assert site_operators(every_site_config(report, mixed, every, saes=saes, tau=gates)) == site_operators(conf)
    one = single_site_config(report, "single_transformer_blocks.0:image", saes["single_transformer_blocks.0:image"],
                             0.25)
    assert [(s.site, s.beta, s.gamma, s.tau) for s in one.sites] == [("single_transformer_blocks.0:image", 0.5, 2.0,
                                                                      0.25)]
