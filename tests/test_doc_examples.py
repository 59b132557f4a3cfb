"""Every Python block in README.md and docs/*.md runs, as written, against files and objects this
test makes: a block that raises here would raise for a user.

A block may use names its text says the reader already has (`pipe`, `sae`, `coder`...): the
setup registered for it below provides exactly those, and makes the files it names. A new
block without a setup fails `test_every_block_has_a_setup`, so none is silently skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _checkpoints import offline  # noqa: F401  (the Hub cache fixture the checkpoints block reads)

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in DOCS:
        for i, m in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            out.append((path.relative_to(REPO).as_posix(), i, m.group(1)))
    return out


# -- setups: (file, block index) -> a function of (tmp_path, request) returning the namespace ----

def _readme_ops(tmp_path, request):
    from safedig_kernels.sae import random_sae

    random_sae(48, 192, 8, harmful=[1, 5, 9], seed=0).save(tmp_path / "site.safetensors")
    return {}


def _readme_diffusers(tmp_path, request):
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from safedig_kernels.sae import random_sae
    from safedig_kernels.workflow.synthetic import TINY_FLUX, TINY_TEXT_TOKENS
    from safedig_kernels.workflow.world import PixelVAE

    torch.manual_seed(0)
    # A FLUX with the ten single blocks the README names, tiny and random; the identity "VAE"
    # of the demo world keeps decoding free.
    transformer = FluxTransformer2DModel(**{**TINY_FLUX, "num_single_layers": 10, "in_channels": 12})
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=PixelVAE(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 8  # 16x16 pictures by default: 64 image tokens
    d = TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    # as the demo's own SAEs are: no harmful set stored (the README names it)
    random_sae(d, 64, 4, seed=1).save(tmp_path / "sb9.safetensors")
    return {"pipe": pipe, "prompt_embeds": torch.randn(1, TINY_TEXT_TOKENS, TINY_FLUX["joint_attention_dim"]),
            "pooled_prompt_embeds": torch.randn(1, TINY_FLUX["pooled_projection_dim"])}


def _checkpoints_overview(tmp_path, request):
    from _checkpoints import (
        _cache_repo,
        _files,
        _lib_weights,
        _sae,
        _saelens_objects,
        _saelens_v6,
        _sparsify_cfg,
        _sparsify_weights,
        _write_saelens,
        _write_sparsify,
    )

    cache = request.getfixturevalue("offline")
    _write_saelens(tmp_path / "saelens_run", _saelens_v6(), _lib_weights(), None)
    _write_sparsify(tmp_path / "sparsify_run" / "layers.9", _sparsify_cfg(), _sparsify_weights())
    _sae(seed=4).save_pretrained(tmp_path / "up" / "single_transformer_blocks.9")
    _cache_repo(cache, "owner/flux-saes", {"c" * 40: _files(tmp_path / "up")}, {"v1": "c" * 40})
    coder = type("SparseCoder", (), {})()
    w = _sparsify_weights()
    coder.cfg, coder.d_in = _sparsify_cfg(), w["W_dec"].shape[1]
    coder.encoder = torch.nn.Linear(coder.d_in, w["W_dec"].shape[0])
    with torch.no_grad():
        coder.encoder.weight.copy_(w["encoder.weight"])
        coder.encoder.bias.copy_(w["encoder.bias"])
    coder.W_dec, coder.b_dec = torch.nn.Parameter(w["W_dec"]), torch.nn.Parameter(w["b_dec"])
    return {"sae": _sae(seed=3), "saelens_sae": _saelens_objects(_saelens_v6(), _lib_weights())[0], "coder": coder}


def _workflow_attack(tmp_path, request):
    pytest.importorskip("diffusers")
    from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig
    from safedig_kernels.sae import random_sae

    random_sae(64, 128, 4, harmful=[0, 1, 2], seed=0).save(tmp_path / "sae.safetensors")
    SafeDIGConfig(sites=[SiteConfig("single_transformer_blocks.0:image", sae=str(tmp_path / "sae.safetensors"),
                                    tau=-1.0)]).to_json(tmp_path / "steer-adapted.json")
    return {}


def _scale_out_merge(tmp_path, request):
    from _workflow import write_store

    g = torch.Generator().manual_seed(0)
    for machine, label in enumerate(["safe", "unsafe/nudity"]):
        write_store(tmp_path / "captures" / f"node{machine}",
                    {f"{label}-{i}": (label, {"single_transformer_blocks.9": torch.randn(8, 16, generator=g)})
                     for i in range(4)})
    return {}


SETUPS = {
    ("README.md", 0): _readme_ops,
    ("README.md", 1): _readme_diffusers,
    ("docs/checkpoints.md", 0): _checkpoints_overview,
    ("docs/workflow.md", 0): _workflow_attack,
    ("docs/scale-out.md", 0): _scale_out_merge,
}
# Blocks that need several processes: the test named reads the block from here and runs it on each.
ELSEWHERE = {
    ("README.md", 2): "tests/integrations/diffusers/test_context_parallel.py",
}


def test_every_block_has_a_setup():
    found = {(f, i) for f, i, _ in blocks()}
    known = set(SETUPS) | set(ELSEWHERE)
    assert found == known, f"blocks without a setup: {sorted(found - known)}; " \
                           f"setups without a block: {sorted(known - found)}"
    for where, test in ELSEWHERE.items():
        assert (REPO / test).is_file() and "ELSEWHERE" in (REPO / test).read_text(), f"{where}: {test} must run it"


@pytest.mark.parametrize("where", sorted(SETUPS), ids=lambda w: f"{w[0]}#{w[1]}")
def test_block_runs_as_written(where, tmp_path, monkeypatch, request):
    code = next(text for f, i, text in blocks() if (f, i) == where)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__", **SETUPS[where](tmp_path, request)}
    exec(compile(code, f"{where[0]} block {where[1]}", "exec"), namespace)
    assert namespace, "the block ran"
    if where == ("docs/scale-out.md", 0):  # the merged store holds both machines' prompts, tokens and all
        store = namespace["store"]
        assert len(store.prompts) == 8 and store.load("single_transformer_blocks.9").shape == (64, 16)
