"""Operator validation's rule (`validate.pick`): fewest unsafe images within the quality budget,
ties to the higher PSNR and then the earlier candidate; and candidates tried once per operator
assignment. `choose_operators` itself runs in the quick demo (tests/cli/test_demo.py)."""
from __future__ import annotations

import math

import pytest

from safedig_kernels.integrations.diffusers.config import SafeDIGConfig, SiteConfig
from safedig_kernels.sae import random_sae
from safedig_kernels.workflow.validate import OperatorChoice, Trial, distinct_candidates, pick, site_operators


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


def test_more_trials_are_picked_with_the_first_ones():
    first = OperatorChoice("routed", [trial("routed", 9, 39.0), trial("blend", 10, 30.3)], ["unsafe/a"], 48, 30.0)
    wider = first.with_trials([trial("routed-every-site", 0, 36.0)])
    assert wider.chosen == "routed-every-site" and [t.name for t in wider.trials] == [
        "routed", "blend", "routed-every-site"]
    # a wider steerer that only ties keeps the first choice when it costs quality
    tie = OperatorChoice("routed", [trial("routed", 0, 42.0)], ["unsafe/a"], 48, 30.0)
    assert tie.with_trials([trial("routed-every-site", 0, 36.0)]).chosen == "routed"
    assert first.chosen == "routed" and len(first.trials) == 2  # unchanged


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


def test_validation_rounds_widen_the_candidates_in_budget_then_strengthen_repel(monkeypatch):
    """`validate_steerer`'s rounds, with the images' judgement faked: the trials a candidate would
    give are fixed by name."""
    from safedig_kernels.workflow import validate

    outcome = {"routed": (12, 36.0), "blend": (15, 32.6), "both": (8, 31.5), "over": (0, 20.0),
               "routed-every-site": (2, 35.2), "blend-every-site": (9, 31.0), "both-every-site": (9, 24.9),
               "routed-every-site-repel-x1.5": (0, 32.3)}
    seen = []

    def fake_trials(pipe, prompts, candidates, detector, gen, unsafe_labels, safe_label, min_psnr_db, unsteered=None):
        seen.append(list(candidates))
        return [Trial(n, site_operators(c), outcome[n][0], 32, outcome[n][1], outcome[n][1] >= min_psnr_db)
                for n, c in candidates.items()], {"p0": None}

    monkeypatch.setattr(validate, "run_trials", fake_trials)
    one = _config((0.0, 1.0))
    cands = {"routed": one, "blend": _config((1.0, 0.0)), "both": _config((1.0, 1.0)), "over": _config((0.0, 0.0))}
    wider = lambda conf: _config(*[(conf.sites[0].beta, conf.sites[0].gamma)] * 2)  # noqa: E731
    choice, tried = validate.validate_steerer(None, [], cands, None, None, ["unsafe/a"], widen=wider)
    # round 2 widens only the candidates within the budget ("over" is not); round 3 boosts the winner's Repel
    assert seen == [["routed", "blend", "both", "over"], ["routed-every-site", "blend-every-site", "both-every-site"],
                    ["routed-every-site-repel-x1.5"]]
    assert choice.chosen == "routed-every-site-repel-x1.5" and len(choice.trials) == 8
    assert [s.gamma for s in tried[choice.chosen].sites] == [1.5, 1.5]
    assert [s.beta for s in tried["both-every-site"].sites] == [1.0, 1.0]
    # a winner that only blends has no Repel to strengthen; nothing wider: no second round
    outcome["blend"] = (0, 40.0)
    seen.clear()
    choice, _ = validate.validate_steerer(None, [], {"blend": cands["blend"]}, None, None, ["unsafe/a"])
    assert seen == [["blend"]] and choice.chosen == "blend"
    # a first round that leaves no unsafe image: nothing wider or stronger can do better
    seen.clear()
    choice, _ = validate.validate_steerer(None, [], {"routed": one, "blend": cands["blend"]}, None, None,
                                          ["unsafe/a"], widen=wider)
    assert seen == [["routed", "blend"]] and choice.chosen == "blend"


def test_repel_ladder_climbs_until_nothing_is_left_or_the_budget_breaks(monkeypatch):
    from safedig_kernels.workflow import validate

    outcome = {"routed": (9, 38.0), "routed-repel-x1.5": (4, 34.0), "routed-repel-x2": (4, 31.0),
               "routed-repel-x2.5": (1, 29.0), "routed-repel-x3": (0, 27.0)}
    seen = []

    def fake_trials(pipe, prompts, candidates, detector, gen, unsafe_labels, safe_label, min_psnr_db, unsteered=None):
        seen.extend(candidates)
        return [Trial(n, site_operators(c), outcome[n][0], 32, outcome[n][1], outcome[n][1] >= min_psnr_db)
                for n, c in candidates.items()], {"p0": None}

    monkeypatch.setattr(validate, "run_trials", fake_trials)
    routed = _config((0.0, 2.0), (1.0, 0.0))
    choice, tried = validate.validate_steerer(None, [], {"routed": routed}, None, None, ["unsafe/a"],
                                              repel_ladder=(1.5, 2.0, 2.5, 3.0))
    # x2 leaves as many as x1.5 at a lower PSNR; x2.5 breaks the budget, so x3 is never tried
    assert seen == ["routed", "routed-repel-x1.5", "routed-repel-x2", "routed-repel-x2.5"]
    assert choice.chosen == "routed-repel-x1.5"
    assert [(s.beta, s.gamma) for s in tried["routed-repel-x2.5"].sites] == [(0.0, 5.0), (1.0, 0.0)]
    # each rung scales the first winner's gamma, and the climb stops once nothing is left
    outcome["routed-repel-x2"] = (0, 31.0)
    seen.clear()
    choice, _ = validate.validate_steerer(None, [], {"routed": routed}, None, None, ["unsafe/a"],
                                          repel_ladder=(1.5, 2.0, 2.5, 3.0))
    assert seen == ["routed", "routed-repel-x1.5", "routed-repel-x2"] and choice.chosen == "routed-repel-x2"
    # a winner already called `repel` is not named twice
    outcome.update({"repel": (9, 38.0), "repel-x1.5": (0, 33.0)})
    seen.clear()
    choice, _ = validate.validate_steerer(None, [], {"repel": routed}, None, None, ["unsafe/a"])
    assert seen == ["repel", "repel-x1.5"] and choice.chosen == "repel-x1.5"
