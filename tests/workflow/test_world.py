"""The demo world: its prompts, its training loop, its weights files, and that the shipped
weights draw what each prompt asks for."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from safedig_kernels.workflow import world as W  # noqa: E402


def test_prompts_are_distinct_and_dropped_prompts_are_empty():
    p = W.world_prompts(["safe", W.SOURCE, W.TARGET, W.SOURCE], ["circle", "circle", "circle", "square"],
                        drop=torch.tensor([False, False, False, True]))
    assert p.prompt_embeds.shape == (4, W.TEXT_TOKENS, W.EMBED_DIM) and p.pooled_prompt_embeds.shape == (4, 32)
    assert not torch.equal(p.prompt_embeds[0], p.prompt_embeds[1])
    assert not torch.equal(p.prompt_embeds[1], p.prompt_embeds[2])
    pad = W.word_vectors()["pad"]
    assert torch.equal(p.prompt_embeds[3], pad.expand(W.TEXT_TOKENS, -1))


def test_gold_alone_is_the_gilding_without_the_x():
    """`gold` alone draws the target's gilding and not the X: the gilding's own pathway, which
    the world learns and the SAEs' corpus holds."""
    g = torch.Generator().manual_seed(0)
    images = W.render([W.GILDING, W.TARGET, W.SOURCE], ["circle", "square", "circle"], g)
    marks = W.detect_marks(images)
    assert marks["gilding"].tolist() == [True, True, False] and marks["mark_a"].tolist() == [False, True, True]
    p = W.world_prompts([W.GILDING, W.TARGET], ["circle", "circle"])
    vec = W.word_vectors()
    assert torch.equal(p.prompt_embeds[0, 1], vec["gold"]) and torch.equal(p.prompt_embeds[1, 2], vec["gold"])
    assert W.GILDING in W.TRAINING_LABELS and W.GILDING not in W.LABELS  # not a domain of the table


def test_world_prompt_files_load(tmp_path):
    from safedig_kernels.workflow.prompts import load_prompts

    path = W.write_world_prompts(tmp_path, {"safe": 2, W.SOURCE: 3})
    records = load_prompts(path)
    assert [r.label for r in records] == ["safe"] * 2 + [W.SOURCE] * 3
    emb = records[2].load_embeddings()
    want = W.world_prompts([W.SOURCE], ["circle"])
    assert torch.equal(emb["prompt_embeds"], want.prompt_embeds)
    assert len({r.seed for r in records}) == 5
    with pytest.raises(ValueError, match="the world's labels"):
        W.write_world_prompts(tmp_path / "bad", {"unsafe/other": 1})


def test_training_runs_saves_and_loads(tmp_path):
    logs = []
    model = W.train_world(steps=2, batch=4, seed=1, log_every=1, log=logs.append)
    assert len(logs) == 2 and all("loss" in line for line in logs)
    path = W.save_world(model, tmp_path / "w.safetensors", steps=2, seed=1)
    back = W.load_world(path)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    again = W.train_world(steps=2, batch=4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="do not fit the world's transformer"):
        W.load_world(tmp_path / "other.safetensors")


def test_shipped_weights_draw_what_the_prompt_asks():
    """The weights in the package (at most 5 MB: they ship in every wheel) draw each label's mark and
    nothing on safe prompts, as the world's detector sees it: what the demo's numbers rest on."""
    assert W.SHIPPED_WEIGHTS.is_file() and W.SHIPPED_WEIGHTS.stat().st_size <= 5 * 2 ** 20
    from safedig_kernels.workflow.pipelines import load_pipeline

    pipe = load_pipeline("world")
    n = 8
    for label in W.TRAINING_LABELS:
        p = W.world_prompts([label] * n, [("circle", "square")[i % 2] for i in range(n)])
        images = pipe(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds,
                      num_inference_steps=16, height=W.SIZE, width=W.SIZE, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
        assert images.shape == (n, 3, W.SIZE, W.SIZE)
        marks = W.detect_marks(images.float().clamp(0, 1))
        for mark, seen in marks.items():
            want = mark in W.MARKS.get(label, ())
            assert int(seen.sum()) >= n - 1 if want else int(seen.sum()) == 0, (label, mark, seen)


def test_load_pipeline_reads_named_weights(tmp_path):
    from safedig_kernels.workflow.pipelines import load_pipeline

    model = W.train_world(steps=1, batch=2)
    path = W.save_world(model, tmp_path / "w.safetensors", steps=1, seed=0)
    pipe = load_pipeline(f"world:{path}")
    assert torch.equal(next(iter(pipe.transformer.state_dict().values())),
                       next(iter(model.state_dict().values())))
    with pytest.raises(FileNotFoundError):
        load_pipeline(f"world:{tmp_path / 'missing.safetensors'}")


def test_world_model_names():
    from safedig_kernels.workflow.demo import DemoConfig

    assert W.is_world_model("world") and W.is_world_model("world:w.safetensors")
    assert not W.is_world_model("tiny-flux") and not W.is_world_model("worldwide/flux")
    assert W.world_weights_in("world:w.safetensors") == "w.safetensors" and W.world_weights_in("world") is None
    # the demo reads `--model world:PATH` as `--model world --world PATH`, so the world's sizes apply
    cfg = DemoConfig(model="world:w.safetensors")
    assert (cfg.model, cfg.world, cfg.is_world) == ("world", "w.safetensors", True)
    assert DemoConfig.quick_config(model="world:w.safetensors").world == "w.safetensors"
    with pytest.raises(ValueError, match="two world weights files"):
        DemoConfig(model="world:a.safetensors", world="b.safetensors")
