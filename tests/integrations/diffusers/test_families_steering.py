"""Steering on every DiT family diffusers describes, on the tiny models of tests/_families.py.

For each family: at beta = gamma = 0 on every stream of every registered block the transformer's
output is bitwise the unsteered one; with real strengths each steered stream equals
`reference.steer` of the stream the block produced (captured inside the block's forward by a
diffusers hook, so it sees the raw output), the other stream passes through, and telemetry reads
the schedule progress the call was made at, in the family's own timestep convention.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from _families import FAMILIES, WIDTH  # noqa: E402
from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry  # noqa: E402

import safedig_kernels as sk  # noqa: E402
from safedig_kernels import reference  # noqa: E402
from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig  # noqa: E402
from safedig_kernels.integrations.diffusers.sites import block_layout, block_stacks, read_stream  # noqa: E402

F, K = 32, 4
P = 0.25  # the progress every call is made at
STEERED = [name for name in FAMILIES if name != "bria"]


class RawOutputs(ModelHook):
    """Inside a block's forward (a diffusers hook): the output before SafeDIG's torch hook."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def post_forward(self, module, output):
        self.outputs.append(output)
        return output


def _record_raw(block) -> RawOutputs:
    hook = RawOutputs()
    HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "raw")
    return hook


def _sae(width: int, seed: int) -> sk.TopKSAE:
    return sk.random_sae(width, F, K, harmful=list(range(0, F, 3)), seed=seed)


def _streams(block) -> list[str]:
    layout = block_layout(block)
    return ["image"] + (["text"] if layout.text_index is not None else [])


def _width(family, stream: str) -> int:
    return family.text_width if stream == "text" else WIDTH


def _batch(family) -> int:
    return 2 if family.batched else 1


def _run(model, family) -> torch.Tensor:
    with torch.no_grad():
        out = model(**family.call_kwargs(_batch(family), "cpu", torch.float32, p=P))
    if not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns one tensor per sample


@pytest.mark.parametrize("name", STEERED)
def test_zero_strengths_on_every_stream_of_every_block_leave_the_output_bitwise(name):
    family = FAMILIES[name]
    model = family.build()
    unsteered = _run(model, family)
    sites = [SiteConfig(f"{stack}.{i}:{stream}", _sae(_width(family, stream), i), beta=0.0, gamma=0.0, tau=-1.0)
             for stack, blocks in block_stacks(model).items() for i, block in enumerate(blocks)
             for stream in _streams(block)]
    assert {s.site.rpartition(".")[0] for s in sites} >= set(family.stacks)
    handle = apply_safedig(model, SafeDIGConfig(sites))
    assert torch.equal(_run(model, family), unsteered)
    tele = handle.telemetry()
    assert all(len(rows) == 1 and rows[0]["gated_fraction"] == 1.0 and not rows[0]["active"]
               for rows in tele.values()), "every site ran once, saw every token, and changed nothing"
    handle.remove()


@pytest.mark.parametrize("name", STEERED)
def test_each_stream_is_steered_as_the_reference_steers_what_the_block_returned(name):
    family = FAMILIES[name]
    model = family.build()
    stacks = block_stacks(model)
    # the first block of every stack, each of its streams
    targets = [(stack, blocks[0], stream) for stack, blocks in stacks.items() for stream in _streams(blocks[0])]
    saes = {(stack, stream): _sae(_width(family, stream), seed) for seed, (stack, _, stream) in enumerate(targets)}
    raw = {stack: _record_raw(blocks[0]) for stack, blocks in stacks.items()}
    strengths = dict(beta=0.5, gamma=1.0, tau=0.0)
    # a window around P: steering is on only if the family's timestep convention is read right
    handle = apply_safedig(model, SafeDIGConfig([
        SiteConfig(f"{stack}.0:{stream}", saes[stack, stream], window=(0.2, 0.3), **strengths)
        for stack, _, stream in targets]))
    passed_on = {}
    for stack, blocks in stacks.items():
        blocks[0].register_forward_hook(lambda m, a, out, stack=stack: passed_on.setdefault(stack, out))
    _run(model, family)
    changed = 0
    for stack, block, stream in targets:
        layout = block_layout(block)
        (output,) = raw[stack].outputs
        x = read_stream(output, layout, stream)
        s = saes[stack, stream]
        y, h = reference.steer(x, s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.harmful_mask,
                               *(torch.tensor(v) for v in strengths.values()), K)
        got = read_stream(passed_on[stack], layout, stream)
        assert torch.equal(got, y), f"{stack}:{stream}"
        changed += int(not torch.equal(got, x))
        other = {"image": "text", "text": "image"}[stream]
        if layout.index(other) is not None and (stack, other) not in saes:
            assert torch.equal(read_stream(passed_on[stack], layout, other), read_stream(output, layout, other))
        (row,) = handle.telemetry()[f"{stack}.0:{stream}"]
        assert row["progress"] == pytest.approx(P, abs=1e-3), "the family's timestep convention"
        assert row["active"] and row["gated_fraction"] == pytest.approx(float((h > 0).float().mean()), abs=1e-6)
    assert changed == len(targets), "every steered stream must change for the check to mean much"
    handle.remove()


def test_a_block_whose_registration_names_the_wrong_stream_is_refused_until_registered_right():
    from diffusers.models.transformers.transformer_bria import BriaTransformerBlock

    family = FAMILIES["bria"]
    model = family.build()
    config = SafeDIGConfig([SiteConfig("transformer_blocks.0", _sae(WIDTH, 0), beta=0.5, tau=-1.0)])
    with pytest.raises(TypeError, match=r"BriaTransformerBlock names its text stream as its image stream.*"
                                        r"TransformerBlockRegistry.register"):
        apply_safedig(model, config)
    original = TransformerBlockRegistry.get(BriaTransformerBlock)
    TransformerBlockRegistry.register(BriaTransformerBlock, TransformerBlockMetadata(
        return_hidden_states_index=1, return_encoder_hidden_states_index=0))
    try:
        unsteered = _run(model, family)
        handle = apply_safedig(model, config)
        assert not torch.equal(_run(model, family), unsteered)
        handle.remove()
    finally:
        TransformerBlockRegistry.register(BriaTransformerBlock, original)
