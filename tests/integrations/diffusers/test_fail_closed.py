"""Steering never turns itself off without a word, on tiny FLUX / SD3 pipelines (CPU).

- The bad-input classes that enter through the integration: strengths at every entrance
  (SiteConfig, its JSON, set_site), SAE weights changed in memory, an SAE used at a site it was
  not trained for, a handle used after removal, a generation that failed part-way, a window
  that no step of the call's schedule enters.
- The fail-open sweep: for every way a site can be configured, either applying it raises, or
  the steered output differs from the unsteered one where the gate opens (every token here).
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from _pipelines import HARM_A, HARM_B, flux_pipe, generate, sae, sd3_pipe  # noqa: E402
from _race import race  # noqa: E402

from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig, remove_safedig  # noqa: E402


def _trained_at(site: str, stream: str = "image", seed: int = 1):
    s = sae(seed)
    s.metadata.site, s.metadata.extra = site, {"stream": stream}
    return s


# -- strengths at every entrance -----------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("tau", float("nan"), "tau"), ("tau", 1e39, "tau must be finite"), ("gamma", float("inf"), "gamma"),
    ("beta", float("nan"), "beta"), ("beta", 1.5, r"beta must lie in \[0, 1\]"), ("gamma", -1e39, "gamma"),
])
def test_site_config_json_and_set_site_apply_one_rule(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        SiteConfig("transformer_blocks.0", sae(1), **{field: value})
    path = tmp_path / "steer.json"
    s = sae(1)
    s.save(tmp_path / "s.safetensors")
    SafeDIGConfig([SiteConfig("transformer_blocks.0", str(tmp_path / "s.safetensors"))]).to_json(path)
    doc = json.loads(path.read_text())
    doc["sites"][0][field] = value
    path.write_text(json.dumps(doc))  # NaN / Infinity / 1e+39 are what Python's json writes
    with pytest.raises(ValueError, match=match):
        SafeDIGConfig.from_json(path)
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), beta=0.5, gamma=1.0,
                                                           tau=-1.0)]))
    _, st = handle._sites["transformer_blocks.0:image"]
    before = st.settings.clone()
    with pytest.raises(ValueError, match=match):
        handle.set_site("transformer_blocks.0", **{"beta": 0.25, "gamma": 2.0, field: value})
    assert torch.equal(st.settings, before) and st.values[:3] == [0.5, 1.0, -1.0]
    remove_safedig(pipe)


def test_set_site_writes_every_setting_with_one_copy():
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), beta=0.5, gamma=1.0,
                                                           tau=-1.0)]))
    _, st = handle._sites["transformer_blocks.0:image"]
    copies = []
    real = torch.Tensor.copy_
    torch.Tensor.copy_ = lambda t, src, *a, **k: copies.append(t.shape) or real(t, src, *a, **k)
    try:
        handle.set_site("transformer_blocks.0", beta=0.25, gamma=2.0, tau=-0.5, window=(0.0, 0.5))
    finally:
        torch.Tensor.copy_ = real
    assert copies == [torch.Size([6])]
    assert st.settings.tolist() == [0.25, 2.0, -0.5, 0.0, 0.5, 1.0]
    remove_safedig(pipe)


# -- SAE weights in memory, the right SAE at the right site ---------------------------------

def test_weights_changed_in_memory_are_refused_on_attach():
    s = sae(1)
    with torch.no_grad():
        s.W_dec[3, 2] = float("nan")
    with pytest.raises(ValueError, match="W_dec.*non-finite"):
        apply_safedig(flux_pipe(1, 1), SafeDIGConfig([SiteConfig("transformer_blocks.0", s)]))


@pytest.mark.parametrize("trained,used", [
    (("single_transformer_blocks.0", "image"), ("transformer_blocks.0", "image")),
    (("transformer_blocks.0", "text"), ("transformer_blocks.0", "image")),
], ids=["other-block", "other-stream"])
def test_an_sae_from_another_site_is_refused_unless_allowed(trained, used):
    pipe = flux_pipe(1, 1)
    s = _trained_at(*trained)
    with pytest.raises(ValueError, match=rf"trained at site '{trained[0]}:{trained[1]}' but is used at "
                                         rf"{used[0]}:{used[1]}"):
        apply_safedig(pipe, SafeDIGConfig([SiteConfig(":".join(used), s)]))
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig(":".join(used), s, allow_other_site=True)]))
    handle.remove()
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig(":".join(trained), s)]))  # its own site
    handle.remove()


def test_a_block_sae_is_refused_at_a_text_encoder_and_a_text_encoder_sae_accepted():
    pipe = flux_pipe(1, 1, t5=True)
    with pytest.raises(ValueError, match="trained at site 'transformer_blocks.0:image' but is used at text_encoder_2;"):
        apply_safedig(pipe, SafeDIGConfig([SiteConfig("text_encoder_2", _trained_at("transformer_blocks.0"))]))
    # a text encoder has one output: the stream its SAE was captured under does not matter
    for stream in ("image", "text"):
        own = SiteConfig("text_encoder_2", _trained_at("text_encoder_2", stream))
        apply_safedig(pipe, SafeDIGConfig([own])).remove()
    # FLUX's text_encoder_2 and SD3's text_encoder_3 are the same T5: an SAE for one fits the other
    apply_safedig(pipe, SafeDIGConfig([SiteConfig("text_encoder_2", _trained_at("text_encoder_3"))])).remove()


def test_set_site_takes_a_numpy_bool_mask():
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), tau=-1.0)]))
    mask = np.zeros(64, dtype=bool)
    mask[[2, 9]] = True
    handle.set_site("transformer_blocks.0", harmful=mask)
    assert handle.config().sites[0].harmful == (2, 9)
    remove_safedig(pipe)


def _flux_call(timestep: float) -> dict:
    """Inputs for calling a `flux_pipe(1, 0)` transformer directly: 4 image and 3 text tokens."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 4, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([timestep]),
                img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3))


def test_set_site_with_a_harmful_set_is_one_update_for_steering_threads():
    """A thread runs the steered transformer while another flips a site between two states that
    differ in harmful set and strengths: every output is one state's, never a mix. (One forward
    of a transformer at a time: its clock holds the forward's timestep, as a pipeline call holds
    its scheduler's.)"""
    pipe = flux_pipe(1, 0)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), beta=0.2,
                                                                       gamma=1.0, tau=-1.0)]))
    inputs = _flux_call(timestep=0.5)
    states = [dict(harmful=HARM_A, beta=0.2), dict(harmful=HARM_B, beta=0.9)]

    def run():
        with torch.no_grad():
            return pipe.transformer(**inputs).sample

    expected, outputs = race(run, states, lambda st: handle.set_site("transformer_blocks.0", **st), 300,
                             readers=1)
    assert sum(not any(torch.equal(y, e) for e in expected) for y in outputs) == 0
    handle.remove()


def test_score_refuses_an_sae_from_another_site(tmp_path):
    from _workflow import orthonormal_basis, orthonormal_sae, planted_tokens, write_store

    from safedig_kernels.workflow.score import score_features
    from safedig_kernels.workflow.store import ActivationStore

    Q, g = orthonormal_basis(16, seed=0), torch.Generator().manual_seed(0)
    prompts = {f"u{i}": ("unsafe/nudity", {"b.0": planted_tokens(Q, 16, g, range(4, 16), {0: (0.9, 3.0)})})
               for i in range(3)}
    prompts.update({f"s{i}": ("safe", {"b.0": planted_tokens(Q, 16, g, range(4, 16))}) for i in range(3)})
    store = ActivationStore(write_store(tmp_path / "acts", prompts))
    s = orthonormal_sae(Q, k=3)
    s.metadata.site, s.metadata.extra = "b.1", {"stream": "image"}
    with pytest.raises(ValueError, match="trained at site 'b.1:image' but is used at b.0:image"):
        score_features(store, "b.0", s)
    assert score_features(store, "b.0", s, allow_other_site=True).site == "b.0:image"


# -- handles and hooks ---------------------------------------------------------------------

def test_a_removed_handle_refuses_to_be_used():
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), tau=-1.0, beta=0.5)]))
    remove_safedig(pipe)
    for use in (lambda: handle.set_site("transformer_blocks.0", gamma=2.0), handle.enable, handle.disable,
                handle.telemetry, handle.reset_telemetry):
        with pytest.raises(RuntimeError, match="was removed"):
            use()
    handle.remove()  # removing twice is harmless


def test_a_failed_generation_leaves_no_timestep_behind():
    pipe = flux_pipe(1, 1)
    apply_safedig(pipe, SafeDIGConfig([SiteConfig("single_transformer_blocks.0", sae(1), tau=-1.0, beta=0.5)]))
    block = pipe.transformer.single_transformer_blocks[0]

    def fail(module, args, output):
        raise RuntimeError("out of memory (simulated)")

    h = pipe.transformer.proj_out.register_forward_hook(fail)  # after the steered block has run
    with pytest.raises(RuntimeError, match="simulated"):
        generate(pipe, steps=1)
    h.remove()
    text = torch.randn(1, 8, 16)
    image = torch.randn(1, 16, 16)
    temb = torch.randn(1, 16)
    rope = pipe.transformer.pos_embed(torch.zeros(24, 3))
    with pytest.raises(RuntimeError, match="outside a forward of its transformer"):
        block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
    remove_safedig(pipe)


# -- the fail-open sweep -------------------------------------------------------------------

# -- a window the schedule never enters ------------------------------------------------------

@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_a_window_no_step_enters_is_refused_at_the_call(model):
    """4 steps have progress 0, .25, .5, .75: a window (0.9, 0.95) would never steer."""
    pipe = flux_pipe(1, 1) if model == "flux" else sd3_pipe(2)
    site = "transformer_blocks.0"
    unsteered = generate(pipe)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig(site, sae(1), beta=0.5, gamma=2.0, tau=-1.0,
                                                           window=(0.9, 0.95))]))
    for _ in range(2):  # refused again on a retry, not remembered as checked
        with pytest.raises(RuntimeError, match=r"window \(0.9, 0.95\) holds none of this run's 4 steps"):
            generate(pipe)
    assert not torch.equal(generate(pipe, steps=20), unsteered)  # progress 0.9 is a step of 20
    handle.set_site(site, enabled=False)  # switched off on purpose: no refusal, the unsteered image
    assert torch.equal(generate(pipe), unsteered)
    handle.set_site(site, enabled=True, window=(0.5, 1.0))
    assert not torch.equal(generate(pipe), unsteered)
    remove_safedig(pipe)


def test_the_schedule_check_lets_a_direct_transformer_call_through():
    # the scheduler still holds the last pipeline call's 4 steps; this call is not one of them
    pipe = flux_pipe(1, 0)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), beta=0.5, gamma=2.0,
                                                           tau=-1.0)]))
    generate(pipe)
    handle.set_site("transformer_blocks.0", window=(0.9, 1.0))
    inputs = _flux_call(timestep=0.05)
    with torch.no_grad():
        steered = pipe.transformer(**inputs).sample
        handle.disable()
        plain = pipe.transformer(**inputs).sample
    assert not torch.equal(steered, plain)
    remove_safedig(pipe)


FLUX_SITES = [("transformer_blocks.0", "image"), ("transformer_blocks.0", "text"), ("transformer_blocks.0", "both"),
              ("single_transformer_blocks.0", "image"), ("single_transformer_blocks.0", "both")]
# SD3 with two joint blocks: block 1 is the last, which returns no text stream
SD3_SITES = [("transformer_blocks.0", "image"), ("transformer_blocks.0", "text"), ("transformer_blocks.0", "both"),
             ("transformer_blocks.1", "image"), ("transformer_blocks.1", "text")]
SWEEP = (
    [("flux", site, stream, cfg, fused, harmful, telemetry)
     for (site, stream), cfg, fused, harmful, telemetry in itertools.product(
         FLUX_SITES, ("both", "cond"), (True, False), ("sae", "given", "empty"), (True, False))]
    + [("sd3", site, stream, cfg, fused, harmful, telemetry)
       for (site, stream), cfg, fused, harmful, telemetry in itertools.product(
           SD3_SITES, ("both", "cond"), (True, False), ("sae", "given", "empty"), (True,))]
)


def _must_refuse(model: str, site: str, stream: str, cfg: str) -> bool:
    """The configurations that cannot steer: FLUX pipelines never batch guidance (cfg="cond"), and
    SD3's last joint block has no text stream."""
    return (model == "flux" and cfg == "cond") or (model == "sd3" and site == "transformer_blocks.1"
                                                   and stream != "image")


@pytest.fixture(scope="module")
def pipes():
    return {"flux": flux_pipe(1, 1), "sd3": sd3_pipe(2)}


@pytest.fixture(scope="module")
def unsteered(pipes):
    return {name: generate(pipe) for name, pipe in pipes.items()}


@pytest.mark.parametrize("model,site,stream,cfg,fused,harmful,telemetry", SWEEP,
                         ids=["-".join(map(str, c)) for c in SWEEP])
def test_every_configuration_steers_or_raises(pipes, unsteered, model, site, stream, cfg, fused, harmful, telemetry):
    pipe = pipes[model]
    harmful_ids = {"sae": None, "given": HARM_A[:3], "empty": []}[harmful]
    # tau < 0 opens the gate for every token (also with an empty harmful set: pure Blend)
    config = SafeDIGConfig([SiteConfig(f"{site}:{stream}", sae(1), harmful=harmful_ids, beta=0.5, gamma=2.0,
                                       tau=-1.0, cfg=cfg)], use_fused_ops=fused, telemetry=telemetry)
    if _must_refuse(model, site, stream, cfg):
        with pytest.raises(ValueError, match=site if stream != "image" else "cfg"):
            apply_safedig(pipe, config)
        assert torch.equal(generate(pipe), unsteered[model])  # and nothing was left hooked
        return
    handle = apply_safedig(pipe, config)
    try:
        assert not torch.equal(generate(pipe), unsteered[model]), "steering configured, output unchanged"
        if telemetry:
            rows = next(iter(handle.telemetry().values()))
            assert rows and all(r["active"] and r["gated_fraction"] > 0 for r in rows)
        handle.disable()  # the deliberate off switch is the only way back to the unsteered image
        assert torch.equal(generate(pipe), unsteered[model])
    finally:
        remove_safedig(pipe)
