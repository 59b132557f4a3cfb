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
    assert [(s.site, s.stream, s.harmful, s.sae) for s in config.sites] == [
        ("stable", "image", [2], os.path.abspath("stable.safetensors"))]
    path = write_steering_config(report, tmp_path / "steer.json")
    cfg = json.loads(path.read_text())
    assert set(cfg) == {"format", "version", "enabled", "use_fused_ops", "telemetry", "telemetry_capacity",
                        "sites"} and cfg["enabled"]
    assert cfg["use_fused_ops"]
    # The file is what the integration reads (it resolves the SAE path, loading happens on apply).
    loaded = SafeDIGConfig.from_json(path)
    assert [(s.site, s.stream, s.harmful) for s in loaded.sites] == [("stable", "image", [2])]
    assert loaded.sites[0].sae == os.path.abspath("stable.safetensors")
    (site,) = cfg["sites"]
    assert set(site) == {"site", "sae", "stream", "harmful", "beta", "gamma", "tau", "window", "cfg",
                         "allow_other_site"}
    assert site["allow_other_site"] is False  # route writes SAEs for the sites they were trained on
    best = report.selected[0].operator
    assert site["site"] == "stable" and site["stream"] == "image" and site["harmful"] == [2]
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
