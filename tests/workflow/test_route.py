"""Routing prefers the site whose harmful features survive the source -> target shift."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _workflow import orthonormal_basis, orthonormal_sae, planted_tokens, write_store

from safedig_kernels.integrations.diffusers import SafeDIGConfig
from safedig_kernels.workflow.route import RouteConfig, operator_strengths, route, write_steering_config
from safedig_kernels.workflow.store import ActivationStore

D = 16
BACKGROUND = range(6, 16)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Site `stable`: nudity and violence both fire feature 2. Site `fragile`: nudity fires
    feature 0, violence feature 1, so the source harmful set says nothing about the target."""
    Q = orthonormal_basis(D, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = {}
    plan = {"unsafe/nudity": ({2: (0.7, 2.5)}, {0: (0.7, 2.5)}),
            "unsafe/violence": ({2: (0.6, 2.0)}, {1: (0.7, 2.5)}),
            "safe": ({}, {})}
    for label, (stable, fragile) in plan.items():
        for i in range(5):
            prompts[f"{label}-{i}"] = (label, {"stable": planted_tokens(Q, 24, g, BACKGROUND, stable),
                                               "fragile": planted_tokens(Q, 24, g, BACKGROUND, fragile)})
    store = ActivationStore(write_store(tmp_path_factory.mktemp("route"), prompts))
    sae = orthonormal_sae(Q, k=3)
    return store, {"stable": (sae, "stable.safetensors"), "fragile": (sae, "fragile.safetensors")}


def test_prefers_stable_site(shifted, tmp_path):
    store, saes = shifted
    report = route(store, saes, "unsafe/nudity", "unsafe/violence", "safe", RouteConfig(num_sites=1))
    ev = {s.site: s for s in report.sites}
    assert ev["stable:image"].harmful_source == [2] and ev["stable:image"].harmful_target == [2]
    assert ev["fragile:image"].harmful_source == [0] and ev["fragile:image"].harmful_target == [1]
    assert ev["stable:image"].overlap == 1.0 and ev["fragile:image"].overlap == 0.0
    assert ev["stable:image"].separation == 1.0 and ev["fragile:image"].separation < 0.2
    assert ev["fragile:image"].separation_source == 1.0  # it works on the source, just not after the shift
    assert {c.site for c in report.ranking[:3]} == {"stable:image"}  # every operator at the stable site first
    assert [c.site for c in report.selected] == ["stable:image"]

    # Routing returns the config object; its one writer (SafeDIGConfig.to_json) writes the file.
    config = report.steering_config()
    assert [(s.site, s.harmful, s.sae) for s in config.sites] == [
        ("stable:image", (2,), os.path.abspath("stable.safetensors"))]
    path = write_steering_config(report, tmp_path / "steer.json")
    cfg = json.loads(path.read_text())
    assert set(cfg) == {"format", "version", "enabled", "use_fused_ops", "telemetry", "telemetry_capacity",
                        "sites"} and cfg["enabled"]
    assert cfg["use_fused_ops"]
    # The file is what the integration reads (it resolves the SAE path, loading happens on apply).
    loaded = SafeDIGConfig.from_json(path)
    assert [(s.site, s.harmful) for s in loaded.sites] == [("stable:image", (2,))]
    assert loaded.sites[0].sae == os.path.abspath("stable.safetensors")
    (site,) = cfg["sites"]
    assert set(site) == {"site", "sae", "harmful", "beta", "gamma", "tau", "window", "cfg", "allow_other_site"}
    assert site["allow_other_site"] is False  # route writes SAEs for the sites they were trained on
    best = report.selected[0].operator
    assert site["site"] == "stable:image" and site["harmful"] == [2]
    assert (site["beta"], site["gamma"]) == operator_strengths(best, 0.5, 1.0)
    assert site["window"] == [0.0, 1.0] and site["cfg"] == "both" and site["tau"] == 0.0
    json_path, txt_path = report.write(tmp_path / "route.json")
    assert json.loads(json_path.read_text())["selected"][0]["site"] == "stable:image"
    assert "stable:image" in txt_path.read_text().splitlines()[2]


def test_cost_weight_favours_cheaper_operator(shifted):
    store, saes = shifted
    free = route(store, saes, "unsafe/nudity", "unsafe/violence", config=RouteConfig(cost_weight=0.0))
    costly = route(store, saes, "unsafe/nudity", "unsafe/violence", config=RouteConfig(cost_weight=10.0))
    c = {(x.site, x.operator): x for x in costly.ranking}
    assert c[("stable:image", "repel")].cost < c[("stable:image", "blend")].cost < c[("stable:image", "both")].cost
    assert costly.ranking[0].operator == "repel"
    assert all(x.score == pytest.approx(x.stability) for x in free.ranking)


def test_clear_errors(shifted):
    store, saes = shifted
    with pytest.raises(ValueError, match=r"target_labels \['unsafe/weapons'\] match no prompts"):
        route(store, saes, "unsafe/nudity", "unsafe/weapons")
    with pytest.raises(ValueError, match="saes is empty"):
        route(store, {}, "unsafe/nudity", "unsafe/violence")
    with pytest.raises(ValueError, match=r"operators must be a non-empty subset"):
        RouteConfig(operators=("erase",))
    with pytest.raises(ValueError, match="window must satisfy"):
        RouteConfig(window=(0.5, 0.2))


# -- route never writes a config that steering refuses --------------------------------------

QUIET, LOUD = "single_transformer_blocks.0", "transformer_blocks.1"  # sites of _pipelines.flux_pipe (width 16)


def _saved_sae(Q, k, site, path):
    sae = orthonormal_sae(Q, k=k)
    sae.metadata.site, sae.metadata.extra = site, {"stream": "image"}
    sae.save(path)
    return sae


@pytest.fixture(scope="module")
def quiet_top(tmp_path_factory):
    """`QUIET` has no harmful feature anywhere (every label has the very same tokens there) but
    an SAE that reconstructs it exactly, so Blend ranks it first; `LOUD` has harmful features
    (nudity fires 0, violence 1) under an SAE with k = 1 that reconstructs it poorly."""
    d = tmp_path_factory.mktemp("quiet-top")
    Q = orthonormal_basis(D, seed=5)
    g = torch.Generator().manual_seed(2)
    plan = {"unsafe/nudity": {0: (0.7, 2.5)}, "unsafe/violence": {1: (0.7, 2.5)}, "safe": {}}
    same = [planted_tokens(Q, 24, g, BACKGROUND) for _ in range(5)]
    prompts = {f"{label}-{i}": (label, {QUIET: same[i], LOUD: planted_tokens(Q, 24, g, BACKGROUND, planted)})
               for label, planted in plan.items() for i in range(5)}
    store = ActivationStore(write_store(d / "acts", prompts))
    saes = {QUIET: (_saved_sae(Q, 3, QUIET, d / "quiet.safetensors"), str(d / "quiet.safetensors")),
            LOUD: (_saved_sae(Q, 1, LOUD, d / "loud.safetensors"), str(d / "loud.safetensors"))}
    return store, saes


@pytest.mark.parametrize("gate", [{}, {"tau": 0.0}, {"tau_quantile": 0.9}], ids=["default", "tau", "quantile"])
def test_config_passes_steering_checks_when_the_top_site_has_no_harmful_feature(quiet_top, tmp_path, gate):
    pytest.importorskip("diffusers")
    from _pipelines import flux_pipe

    from safedig_kernels.integrations.diffusers import check_config

    store, saes = quiet_top
    report = route(store, saes, "unsafe/nudity", "unsafe/violence", "safe", RouteConfig(num_sites=2, **gate))
    ev = {s.site: s for s in report.sites}
    # The situation this guards against: the best-ranked site has nothing to steer.
    assert report.ranking[0].site == f"{QUIET}:image" and ev[f"{QUIET}:image"].harmful == []
    assert ev[f"{LOUD}:image"].harmful_source == [0] and ev[f"{LOUD}:image"].harmful_target == [1]
    assert [c.site for c in report.selected] == [f"{LOUD}:image"]
    assert report.passed_over == [f"{QUIET}:image"]
    assert "passed over" in report.table() and f"{QUIET}:image" in report.table().splitlines()[-2]

    path = write_steering_config(report, tmp_path / "steer.json")
    loaded = SafeDIGConfig.from_json(path).with_loaded_saes()  # what `safedig steer` reads first
    (site,) = loaded.sites
    assert (site.site, site.harmful) == (f"{LOUD}:image", (0, 1))  # the union of the source and target sets
    check_config(flux_pipe(), loaded)  # and what it checks against the pipeline before generating


def test_no_steerable_site_is_an_error_not_a_dead_config(quiet_top):
    store, saes = quiet_top
    with pytest.raises(ValueError, match="no candidate site has a harmful feature"):
        route(store, {QUIET: saes[QUIET]}, "unsafe/nudity", "unsafe/violence")


def test_an_sae_of_another_site_is_refused_before_routing(quiet_top):
    store, saes = quiet_top
    with pytest.raises(ValueError, match=f"trained at site '{LOUD}:image' but is used at {QUIET}:image"):
        route(store, {QUIET: saes[LOUD]}, "unsafe/nudity", "unsafe/violence")
    with pytest.raises(ValueError, match=r"not both"):
        RouteConfig(tau=0.0, tau_quantile=0.9)
    for bad in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match=r"tau_quantile must be a number in \(0, 1\)"):
            RouteConfig(tau_quantile=bad)


# -- the gate threshold calibrated on the safe tokens ---------------------------------------

def _graded_tokens(Q, n, g, p, lo, hi):
    """`[n, D]`: three background features of size ~1 plus feature 2 with probability `p` at a
    magnitude drawn uniformly from [lo, hi] (so the harm score takes distinct values)."""
    c = torch.zeros(n, D)
    bg = torch.tensor(list(BACKGROUND))
    for i in range(n):
        c[i, bg[torch.randperm(len(bg), generator=g)[:3]]] = 0.8 + 0.4 * torch.rand(3, generator=g)
        if float(torch.rand((), generator=g)) < p:
            c[i, 2] = lo + (hi - lo) * float(torch.rand((), generator=g))
    return c @ Q.t()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Feature 2 fires on 90 % of unsafe tokens and, weaker, on 30 % of safe ones: harmful, yet
    a gate at tau = 0 opens on every safe token where it fires."""
    Q = orthonormal_basis(D, seed=7)
    g = torch.Generator().manual_seed(4)
    plan = {"unsafe/nudity": (0.9, 1.5, 3.0), "unsafe/violence": (0.9, 1.5, 3.0), "safe": (0.3, 0.2, 2.0)}
    prompts = {f"{label}-{i}": (label, {"s": _graded_tokens(Q, 48, g, *args)})
               for label, args in plan.items() for i in range(10)}
    store = ActivationStore(write_store(tmp_path_factory.mktemp("graded"), prompts))
    return store, {"s": (orthonormal_sae(Q, k=4), "s.safetensors")}


def _safe_share_gated(store, site_config):
    from safedig_kernels.workflow.score import harm_scores

    h = torch.cat([harm_scores(site_config.sae, site_config.harmful, x)
                   for x in store.prompt_activations("s", "safe")])
    return float((h > site_config.tau).double().mean()), h.numel()


@pytest.mark.parametrize("q", [0.8, 0.9, 0.95, 0.99])
def test_tau_quantile_gates_about_one_minus_q_of_safe_tokens(graded, q):
    store, saes = graded
    report = route(store, saes, "unsafe/nudity", "unsafe/violence", "safe", RouteConfig(num_sites=1, tau_quantile=q))
    config = report.steering_config(saes={"s:image": saes["s"][0]})
    (site,) = config.sites
    assert site.harmful == (2,) and site.tau > 0
    share, n = _safe_share_gated(store, site)
    assert abs(share - (1 - q)) <= 2 / n, (share, q, n)


def test_default_gate_is_the_99th_percentile_not_tau_zero(graded):
    store, saes = graded
    memory = {"s:image": saes["s"][0]}
    default = route(store, saes, "unsafe/nudity", "unsafe/violence", "safe", RouteConfig(num_sites=1))
    assert default.config["tau_quantile"] == 0.99 and default.config["tau"] is None
    share, n = _safe_share_gated(store, default.steering_config(saes=memory).sites[0])
    assert abs(share - 0.01) <= 2 / n
    flat = route(store, saes, "unsafe/nudity", "unsafe/violence", "safe", RouteConfig(num_sites=1, tau=0.0))
    (site,) = flat.steering_config(saes=memory).sites
    assert site.tau == 0.0 and flat.config["tau_quantile"] is None
    share0, _ = _safe_share_gated(store, site)
    assert 0.2 < share0 < 0.4  # tau = 0 opens on every safe token where the feature fires (30 %)
