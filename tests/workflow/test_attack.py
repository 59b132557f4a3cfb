"""The white-box attack's pieces on the demo world (shipped weights, one or two prompts, a few
steps): the surrogate agrees with the hard pixel rule, the written-out sampler is the
pipeline's, the attack raises the surrogate, the norm bound holds, bad budgets are refused."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from safedig_kernels.integrations.diffusers.runner import RunSettings  # noqa: E402
from safedig_kernels.workflow.attack import (  # noqa: E402
    AttackBudget,
    FluxSampler,
    attack_embeddings,
    judge_embeddings,
    project,
    world_surrogate,
)
from safedig_kernels.workflow.world import LABELS, detect_marks, is_unsafe, render, world_prompts  # noqa: E402

SETTINGS = RunSettings(num_inference_steps=16, height=16, width=16)


@pytest.fixture(scope="module")
def world_pipe():
    from safedig_kernels.workflow.world import load_world, world_pipeline

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield world_pipeline(load_world())
    torch.set_num_threads(old)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surrogate_agrees_with_the_pixel_rule_on_rendered_pictures(seed):
    g = torch.Generator().manual_seed(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(30)]
    shapes = [("circle", "square")[i % 2] for i in range(30)]
    pictures = render(labels, shapes, g)
    score = world_surrogate(pictures)
    assert torch.equal(score > 0.5, is_unsafe(pictures))
    assert bool((score[is_unsafe(pictures)] > 0.9).all()) and bool((score[~is_unsafe(pictures)] < 0.1).all())
    # over half of a mark painted over in the background's colour: the rule and the surrogate both fall
    from safedig_kernels.workflow.world import MARK_PIXELS

    px = MARK_PIXELS["mark_a"]
    marked = pictures[[i for i, lb in enumerate(labels) if lb == "unsafe/concept_a"]].clone()
    cut = px[: len(px) * 2 // 3]
    marked[:, :, cut[:, 0], cut[:, 1]] = marked[:, :, 0, :1]  # the corner pixel is background
    assert not bool(detect_marks(marked)["mark_a"].any()) and bool((world_surrogate(marked) < 0.5).all())


def test_surrogate_has_gradients_towards_the_mark():
    """On a safe picture with a sampler's small pixel noise, the surrogate's gradient lives on the
    marks' pixels (and the colour references), and a step along it raises the score."""
    g = torch.Generator().manual_seed(0)
    clean = render(["safe"], ["circle"], g)
    pictures = (clean + 0.02 * torch.randn(clean.shape, generator=g)).requires_grad_(True)
    score = world_surrogate(pictures)
    score.sum().backward()
    from safedig_kernels.workflow.world import MARK_PIXELS

    px = torch.cat(list(MARK_PIXELS.values()))
    assert bool((pictures.grad[0][:, px[:, 0], px[:, 1]].abs().sum(0) > 0).all())
    assert float(world_surrogate(pictures.detach() + 0.5 * pictures.grad.sign())) > float(score.detach())


def _steering():
    """A config that steers every image token of a single block (a random SAE, gate open)."""
    from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig
    from safedig_kernels.sae import random_sae

    return SafeDIGConfig(sites=[SiteConfig("single_transformer_blocks.0:image", tau=-1.0, gamma=4.0,
                                           sae=random_sae(64, 128, 4, harmful=[0, 1, 2, 3], seed=0))])


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_the_written_out_sampler_is_the_pipelines(world_pipe, steered):
    from safedig_kernels.integrations.diffusers import apply_safedig, remove_safedig

    config = _steering() if steered else None
    p = world_prompts(["unsafe/concept_a", "safe"], ["circle", "square"])
    sampler = FluxSampler(world_pipe, SETTINGS)
    # noise 10 draws the X plainly with the shipped weights (noise 11 draws 5 of its 16 pixels, too
    # few for the judge): the unsteered check below needs a drawn mark
    latents, ids = sampler.noise([10, 12])
    if config is not None:
        apply_safedig(world_pipe, config)
    try:
        with torch.no_grad():
            ours = sampler(p.prompt_embeds, p.pooled_prompt_embeds, latents, ids).clamp(0, 1)
    finally:
        if config is not None:
            remove_safedig(world_pipe)
    theirs = judge_embeddings(world_pipe, p.prompt_embeds, p.pooled_prompt_embeds, [10, 12], SETTINGS, config)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    plain = judge_embeddings(world_pipe, p.prompt_embeds, p.pooled_prompt_embeds, [10, 12], SETTINGS)
    assert bool((theirs - plain).abs().max() > 0.05) == steered  # the steering did act, or nothing was installed
    if not steered:
        assert is_unsafe(theirs).tolist() == [True, False]


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_attack_raises_the_surrogate(world_pipe, steered):
    p = world_prompts(["safe"], ["circle"])
    flags = [q.requires_grad for q in world_pipe.transformer.parameters()]
    out = attack_embeddings(world_pipe, p.prompt_embeds, p.pooled_prompt_embeds, [3], world_surrogate,
                            AttackBudget(steps=5, eps=0.5), SETTINGS, _steering() if steered else None)
    # from a safe prompt the mark is far (the judge wants 40 % of its pixels off-colour): a clear rise
    assert float(out.score_after[0]) > 1.2 * float(out.score_before[0]), (out.score_before, out.score_after)
    assert [q.requires_grad for q in world_pipe.transformer.parameters()] == flags  # the model is left as it was
    assert all(q.grad is None for q in world_pipe.transformer.parameters())
    assert not hasattr(world_pipe.transformer, "safedig")


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_the_norm_bound_holds(world_pipe, eps):
    p = world_prompts(["unsafe/concept_a_gold", "safe"], ["square", "circle"])
    # a step of 3 radii overshoots every time: only the projection keeps the iterate in the ball
    out = attack_embeddings(world_pipe, p.prompt_embeds, p.pooled_prompt_embeds, [4, 5], world_surrogate,
                            AttackBudget(steps=2, eps=eps, restarts=2, step_size=3.0), SETTINGS)
    for attacked, clean in ((out.prompt_embeds, p.prompt_embeds), (out.pooled_prompt_embeds, p.pooled_prompt_embeds)):
        ratio = (attacked - clean).norm(dim=-1) / clean.norm(dim=-1)
        assert float(ratio.max()) <= eps * (1 + 1e-5)
    assert float(out.relative_norm.max()) <= eps * (1 + 1e-5)
    assert float(out.relative_norm.max()) > 0  # it moved


def test_project_scales_rows_back_into_the_ball():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = project(delta, torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(restarts=True), "restarts must be a positive int"),
    (dict(eps=0.0), "eps must be a positive finite number"),
    (dict(eps=float("inf")), "eps must be a positive finite number"),
    (dict(step_size=-1.0), "step_size must be a positive finite"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttackBudget(**kwargs)


def test_the_sampler_refuses_a_pipeline_without_flux_latents():
    class NotFlux:
        pass

    with pytest.raises(ValueError, match="follows FluxPipeline"):
        FluxSampler(NotFlux(), SETTINGS)
