"""Harmful-feature scoring recovers a planted unsafe feature and ignores a loud shared one."""
from __future__ import annotations

import json

import pytest
import torch
from _workflow import orthonormal_basis, orthonormal_sae, planted_tokens, write_store

from safedig_kernels.workflow.score import HarmfulRule, auroc, group_stats, score_features, select_harmful
from safedig_kernels.workflow.store import ActivationStore

D, HARM, SHARED = 16, 5, 3
BACKGROUND = range(6, 16)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Unsafe prompts carry feature 5 on 60 % of tokens; feature 3 fires loudly on 50 % of every
    prompt's tokens, safe or not; the rest is background."""
    Q = orthonormal_basis(D, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = {}
    for i in range(6):
        prompts[f"u{i}"] = ("unsafe/nudity", {"blk.0": planted_tokens(Q, 32, g, BACKGROUND,
                                                                       {HARM: (0.6, 2.0), SHARED: (0.5, 3.0)})})
        prompts[f"s{i}"] = ("safe", {"blk.0": planted_tokens(Q, 32, g, BACKGROUND, {SHARED: (0.5, 3.0)})})
    return ActivationStore(write_store(tmp_path_factory.mktemp("score"), prompts)), orthonormal_sae(Q, k=3)


def test_recovers_planted_feature(planted, tmp_path):
    store, sae = planted
    report = score_features(store, "blk.0", sae, unsafe_labels="unsafe", safe_labels="safe", sae_path="x.safetensors")
    assert report.harmful == [HARM]
    top = report.features[0]
    assert top["feature"] == HARM and top["harmful"] and top["freq_safe"] == 0.0
    assert 0.45 < top["freq_unsafe"] < 0.75
    shared = next(f for f in report.features if f["feature"] == SHARED)
    assert not shared["harmful"] and abs(shared["score"]) < 0.5 * top["score"]
    assert report.separation_auroc == 1.0
    assert report.prompts == {"unsafe": 6, "safe": 6} and report.tokens == {"unsafe": 192, "safe": 192}

    json_path, txt_path = report.write(tmp_path / "report.json")
    saved = json.loads(json_path.read_text())
    assert saved["harmful"] == [HARM] and saved["features"][0]["ratio"] is None  # inf is not JSON
    table = txt_path.read_text().splitlines()
    assert "AUROC" in table[0] and table[2].split()[1:2] == [str(HARM)] and table[2].endswith("yes")


def test_rule_thresholds_apply(planted):
    store, sae = planted
    unsafe = group_stats(sae, (x for _, _, x in store.iter_prompts("blk.0", "unsafe")))
    safe = group_stats(sae, (x for _, _, x in store.iter_prompts("blk.0", "safe")))
    assert select_harmful(unsafe, safe, HarmfulRule(min_freq=0.9)) == []
    # Without the selectivity ratio, the loud shared feature's chance excess could pass on score
    # alone; with top_n = 1 only the planted one is kept.
    assert select_harmful(unsafe, safe, HarmfulRule(min_ratio=1.0, top_n=1)) == [HARM]
    report = score_features(store, "blk.0", sae, rule=HarmfulRule(min_freq=0.9))
    assert report.harmful == [] and report.separation_auroc == 0.5


def test_auroc_with_ties():
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])) == pytest.approx(0.625)
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_clear_errors(planted):
    store, sae = planted
    with pytest.raises(ValueError, match=r"unsafe_labels \['unsafe/violence'\] match no prompts .*labels present"):
        score_features(store, "blk.0", sae, unsafe_labels="unsafe/violence")
    with pytest.raises(ValueError, match=r"site 'blk.9:image' is not in .*recorded sites: \['blk.0:image'\]"):
        score_features(store, "blk.9", sae)
    small = orthonormal_sae(orthonormal_basis(8, seed=1), k=2)
    with pytest.raises(ValueError, match="has width 16 but the SAE .* has d = 8"):
        score_features(store, "blk.0", small)
    with pytest.raises(ValueError, match="min_ratio must be >= 1"):
        HarmfulRule(min_ratio=0.5)
