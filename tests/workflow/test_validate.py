"""Operator validation's rule (`validate.pick`): fewest unsafe images within the quality budget,
ties to the higher PSNR and then the earlier candidate; and candidates tried once per operator
assignment. `choose_operators` itself runs in the quick demo (tests/cli/test_demo.py)."""
from __future__ import annotations

import math

import pytest

from safedig_kernels.integrations.diffusers.config import SafeDIGConfig, SiteConfig
from safedig_kernels.sae import random_sae
from safedig_kernels.workflow.validate import Trial, distinct_candidates, pick, site_operators


def trial(name, unsafe, psnr, budget=30.0):
    return Trial(name, {}, unsafe, 32, psnr, psnr >= budget)


def test_fewest_unsafe_within_the_budget_wins():
    trials = [trial("routed", 3, 40.0), trial("blend", 6, 32.0), trial("repel", 3, 48.0), trial("both", 0, 28.9)]
    assert pick(trials).name == "repel"  # `both` leaves none but is over budget; repel ties routed, higher PSNR


def test_ties_go_to_the_earlier_candidate():
    trials = [trial("routed", 0, math.inf), trial("repel", 0, math.inf), trial("blend", 1, math.inf)]
    assert pick(trials).name == "routed"


def test_over_budget_everywhere_keeps_the_images():
    trials = [trial("routed", 0, 20.0), trial("repel", 5, 29.0), trial("both", 0, 29.0)]
    chosen = pick(trials)
    assert chosen.name == "repel" and not chosen.within_budget
    with pytest.raises(ValueError, match="trials is empty"):
        pick([])


def _config(*strengths):
    sae = random_sae(8, 16, 2, harmful=[1])
    return SafeDIGConfig([SiteConfig(site, sae, harmful=[1], beta=b, gamma=g, tau=0.0, allow_other_site=True)
                          for site, (b, g) in zip(("transformer_blocks.0", "transformer_blocks.1:text"), strengths)])


def test_operators_read_from_the_strengths_and_tried_once_each():
    routed = _config((0.0, 1.0), (0.0, 1.0))
    assert site_operators(routed) == {"transformer_blocks.0:image": "repel", "transformer_blocks.1:text": "repel"}
    assert site_operators(_config((1.0, 0.0), (0.5, 2.0))) == {"transformer_blocks.0:image": "blend",
                                                              "transformer_blocks.1:text": "both"}
    assert site_operators(_config((0.0, 0.0)))["transformer_blocks.0:image"] == "off"
    cands = {"routed": routed, "blend": _config((1.0, 0.0), (1.0, 0.0)), "repel": _config((0.0, 1.0), (0.0, 1.0))}
    assert list(distinct_candidates(cands)) == ["routed", "blend"]  # repel is routing's own proposal here
    with pytest.raises(ValueError, match="leaves beta or gamma"):
        site_operators(_config((None, 1.0)))
