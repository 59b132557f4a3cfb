"""Steering in the stack production users run, on tiny FLUX / SD3 models on the CPU: layerwise
casting, LoRA adapters, save/load, gradient checkpointing and training, deep copies, group
offloading, other diffusers hooks beside ours, guided per-request batches, torch.export and
AOTInductor. Each test holds a property diffusers' own model tests check, with steering installed.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from _pipelines import EMB, HARM_A, STEPS, D, K, flux_pipe, generate, sae, sd3_pipe  # noqa: E402
from diffusers import FluxTransformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from test_diffusers import Capture, add_hook, add_outer  # noqa: E402

import safedig_kernels as sk  # noqa: E402
from safedig_kernels import reference  # noqa: E402
from safedig_kernels.integrations.diffusers import (  # noqa: E402
    SafeDIGConfig,
    SiteConfig,
    apply_safedig,
    remove_safedig,
    safedig_handle,
)

SITE = "single_transformer_blocks.0:both"
STRONG = dict(beta=0.5, gamma=1.0, tau=0.0)


def _config(fused: bool = True, **values) -> SafeDIGConfig:
    return SafeDIGConfig([SiteConfig(SITE, sae(1), **{**STRONG, **values}),
                          SiteConfig("transformer_blocks.0:image", sae(2), **{**STRONG, **values})],
                         use_fused_ops=fused)


def _flux_call(batch: int = 1, timestep: float = 0.75, seed: int = 0) -> dict:
    """Inputs of one call of a `flux_pipe` transformer: 16 image and 8 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), timestep),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def _run(transformer, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**(inputs or _flux_call()), return_dict=False)[0]


# -- layerwise casting, LoRA, save/load -------------------------------------------------------------

@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("order", ["steer-then-cast", "cast-then-steer"])
def test_layerwise_casting_keeps_the_saes_in_the_compute_dtype(storage, order):
    pipe = flux_pipe(1, 1)
    tr = pipe.transformer
    block = tr.single_transformer_blocks[0]
    s = sae(1)

    def cast():
        tr.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)

    if order == "cast-then-steer":
        cast()
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig(SITE, s, **STRONG)]))
    if order == "steer-then-cast":
        cast()
    _, st = handle._sites[SITE]
    pipe.to("cpu")  # a move of a model stored in fp8 raised before
    assert st.W_enc.dtype == torch.float32 and st.settings.dtype == torch.float32
    raw, out = add_hook(block, Capture(), "raw"), add_outer(block, Capture())
    steered = generate(pipe)
    for (rt, ri, _, _), (ot, oi, _, _) in zip(raw.calls, out.calls):  # every step in the window (0, 1)
        y, _ = reference.steer(torch.cat([rt, ri], 1), s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.harmful_mask,
                               *(torch.tensor(v) for v in STRONG.values()), K)
        assert torch.equal(torch.cat([ot, oi], 1), y)
    handle.disable()
    off = generate(pipe)
    handle.enable()
    assert remove_safedig(pipe)
    assert torch.equal(generate(pipe), off) and not torch.equal(steered, off)


def test_a_lora_adapter_saves_and_loads_with_steering_installed(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = flux_pipe(1, 1)
    apply_safedig(pipe, _config())
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                            init_lora_weights=False))
    with_lora = generate(pipe)
    pipe.transformer.save_lora_adapter(tmp_path)  # raised through the old wrapped _apply
    other = flux_pipe(1, 1)
    apply_safedig(other, _config())
    other.transformer.load_lora_adapter(tmp_path, prefix=None, weight_name="pytorch_lora_weights.safetensors")
    assert torch.equal(generate(other), with_lora)


def test_state_dict_and_save_pretrained_are_those_of_the_unsteered_model(tmp_path):
    pipe = flux_pipe(1, 1)
    tr = pipe.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    handle = apply_safedig(pipe, _config())
    assert list(tr.state_dict()) == list(before), "steering adds no state_dict key"
    assert torch.equal(generate(pipe), generate(pipe)), "steered generation is deterministic"
    tr.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(before)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    assert safedig_handle(loaded) is None, "a saved model carries no steering"
    handle.disable()
    assert torch.equal(_run(loaded), _run(tr))
    handle.remove()


# -- gradients, training, deep copies ---------------------------------------------------------------

def _grads(transformer, inputs) -> dict[str, torch.Tensor]:
    transformer.zero_grad(set_to_none=True)
    out = transformer(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("setting", ["steered", "zero-strengths", "disabled"])
def test_gradient_checkpointing_recomputes_each_block_with_its_forwards_timestep(setting, fused):
    """The steered model trains the same with and without checkpointing (a recomputed block steers
    with the timestep of the forward that saved it, here inside a window it is steered at and
    nowhere else); at zero strengths and switched off its gradients are the unsteered model's,
    bitwise, through the fused ops' backward and through the reference alike."""
    tr = flux_pipe(1, 2).transformer.train()
    plain = copy.deepcopy(tr)
    values = dict(beta=0.0, gamma=0.0) if setting == "zero-strengths" else {}
    handle = apply_safedig(tr, _config(fused=fused, window=(0.2, 0.3), **values))
    if setting == "disabled":
        handle.disable()
    inputs = _flux_call(batch=2, timestep=0.75)  # progress 0.25: in the window
    eager = _grads(tr, inputs)
    tr.enable_gradient_checkpointing()
    checkpointed = _grads(tr, inputs)
    assert eager.keys() == checkpointed.keys() and len(eager) > 10
    assert all(torch.equal(eager[n], checkpointed[n]) for n in eager)
    unsteered = _grads(plain, inputs)
    same = all(torch.equal(eager[n], unsteered[n]) for n in eager)
    assert same == (setting != "steered")
    # outside the window the steered model is the plain one: the recomputation must know that too
    off_window = _flux_call(batch=2, timestep=0.25)
    assert all(torch.equal(a, b) for a, b in zip(_grads(tr, off_window).values(), _grads(plain, off_window).values()))
    # telemetry counts the three forwards of the steered model, not the recomputations
    assert [len(rows) for rows in handle.telemetry().values()] == [3, 3]
    handle.remove()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_sd3_trains_the_same_with_checkpointing_and_unsteered_at_zero_strength(fused):
    tr = sd3_pipe(num_layers=2).transformer.train()
    plain = copy.deepcopy(tr)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 8, 16,
                  generator=g), pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.full((2,), 500.0))
    handle = apply_safedig(tr, SafeDIGConfig([SiteConfig("transformer_blocks.0:both", sae(1), **STRONG),
                                              SiteConfig("transformer_blocks.1:image", sae(2), **STRONG)],
                                             use_fused_ops=fused))
    steered = _grads(tr, inputs)
    tr.enable_gradient_checkpointing()
    assert all(torch.equal(steered[n], g_) for n, g_ in _grads(tr, inputs).items())
    assert not all(torch.equal(steered[n], g_) for n, g_ in _grads(plain, inputs).items())
    for site in handle.sites:
        handle.set_site(site, beta=0.0, gamma=0.0)
    assert all(torch.equal(a, b) for a, b in zip(_grads(tr, inputs).values(), _grads(plain, inputs).values()))
    handle.remove()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_training_steps_with_steering_installed_and_an_ema_copy(fused):
    """A diffusers-style training loop: optimizer steps on a steered transformer, an EMA copy made
    with copy.deepcopy and updated in place, both steering with their own state."""
    tr = flux_pipe(1, 1).transformer.train()
    handle = apply_safedig(tr, _config(fused=fused))
    ema = copy.deepcopy(tr).eval().requires_grad_(False)
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-3)
    for step in range(3):
        inputs = _flux_call(batch=2, timestep=0.25 + 0.25 * step, seed=step)
        loss = tr(**inputs, return_dict=False)[0].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), tr.parameters()):
                e.lerp_(p, 0.1)
    assert torch.isfinite(loss)
    ema_handle = safedig_handle(ema)
    assert ema_handle is not None and ema_handle.sites == handle.sites
    assert [len(r) for r in handle.telemetry().values()] == [3, 3]
    assert all(rows == [] for rows in ema_handle.telemetry().values()), "the copy's telemetry is its own"
    handle.remove()


def _sd3_call(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 8, 16,
                generator=g), pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.full((2,), 500.0))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_steered_transformer_learns_through_the_fused_ops(family, checkpointing):
    """Loss falls over a few optimizer steps on one batch, with every site steering every token
    (tau -1) through the fused ops' backward, with and without gradient checkpointing."""
    if family == "flux":
        tr = flux_pipe(1, 1).transformer.train()
        config, inputs = _config(fused=True, tau=-1.0), _flux_call(batch=2, timestep=0.5)
    else:
        tr = sd3_pipe(num_layers=2).transformer.train()
        always = {**STRONG, "tau": -1.0}
        config = SafeDIGConfig([SiteConfig("transformer_blocks.0:both", sae(1), **always),
                                SiteConfig("transformer_blocks.1:image", sae(2), **always)], use_fused_ops=True)
        inputs = _sd3_call()
    handle = apply_safedig(tr, config)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    target = torch.randn_like(tr(**inputs, return_dict=False)[0], generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(tr.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = (tr(**inputs, return_dict=False)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(len(rows) == 9 and all(r["gated_fraction"] == 1.0 for r in rows)
               for rows in handle.telemetry().values()), "every token was steered at every step"
    assert losses[-1] < 0.9 * losses[0], losses
    handle.remove()


def test_a_deep_copy_steers_with_its_own_state():
    pipe = flux_pipe(1, 1)
    tr = pipe.transformer
    handle = apply_safedig(tr, _config())
    before = _run(tr)
    twin = copy.deepcopy(tr)
    assert torch.equal(_run(twin), before), "the copy steers as the original does"
    twin_handle = safedig_handle(twin)
    twin.to(torch.bfloat16)  # moves the copy's SAEs, not the original's
    assert all(st.W_enc.dtype == torch.float32 for _, st in handle._sites.values())
    assert all(st.W_enc.dtype == torch.bfloat16 for _, st in twin_handle._sites.values())
    twin_handle.set_site(SITE, beta=1.0, gamma=3.0)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert torch.equal(_run(tr), before), "nothing done to the copy reaches the original"
    assert remove_safedig(twin) and safedig_handle(tr) is not None
    assert torch.equal(_run(tr), before)
    handle.remove()


# -- other hooks and offloading ---------------------------------------------------------------------

@pytest.mark.parametrize("order", ["cache-after-steering", "cache-before-steering"])
def test_removal_leaves_another_diffusers_hook_working(order):
    from diffusers import FirstBlockCacheConfig

    def cached_pipe():
        pipe = flux_pipe(2, 2)
        return pipe

    reference_pipe = cached_pipe()
    reference_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    cached_only = generate(reference_pipe)
    pipe = cached_pipe()
    if order == "cache-before-steering":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    handle = apply_safedig(pipe, _config(tau=-1.0))
    if order == "cache-after-steering":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    assert not torch.equal(generate(pipe), cached_only)
    assert remove_safedig(pipe)
    assert torch.equal(generate(pipe), cached_only), "the cache works as if steering had never been there"
    handle = apply_safedig(pipe, _config(tau=-1.0))  # and steering can be applied again
    assert not torch.equal(generate(pipe), cached_only)
    handle.remove()
    assert torch.equal(generate(pipe), cached_only)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_runs_the_steered_model_unchanged(offload_type):
    """On a CPU both devices are the CPU: this holds that offloading's hooks and ours compose (the
    SAEs are buffers it moves with their module); a GPU run checks the moves themselves."""
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, _config(tau=-1.0))
    steered = generate(pipe)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type=offload_type, num_blocks_per_group=1)
    assert torch.equal(generate(pipe), steered)
    assert all(len(rows) == 2 * STEPS for rows in handle.telemetry().values())


# -- guided batches and requests ------------------------------------------------------------------

def _sd3_prompts(pipe, prompts: int, guidance: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    emb = {name: torch.randn(prompts, *t.shape[1:], generator=g) for name, t in EMB.items()}
    return pipe(num_inference_steps=STEPS, height=8, width=8, output_type="pt", guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0), **emb).images


def test_sd3_requests_with_guidance_on_the_default_sites():
    pipe = sd3_pipe()
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0:both", sae(1), beta=0.5, gamma=1.0,
                                                           tau=-1.0)]))
    handle.set_requests(enabled=[True, False])
    got = _sd3_prompts(pipe, 2)
    (records,) = handle.request_telemetry().values()
    assert len(records) == STEPS and all(r["active"] == [True, False] for r in records)
    handle.disable()
    off = _sd3_prompts(pipe, 2)
    handle.enable()
    assert torch.equal(got[1], off[1]) and not torch.equal(got[0], off[0])
    # One prompt, two requests: a guided batch of 2 rows is refused, not read as two unguided rows
    # (which would steer the negative prompt's row and leave the image's row unsteered).
    with pytest.raises(RuntimeError, match=r"2 requests are set.*guided batch \[uncond; cond\] of 2 x 2 = 4 rows.*"
                                           r"has 2"):
        _sd3_prompts(pipe, 1)
    handle.set_requests(beta=[0.5])  # the right count: both rows of the one prompt
    assert not torch.equal(_sd3_prompts(pipe, 1), off[:1])


def test_a_second_pipeline_from_the_same_components_is_read_for_itself():
    """The rule reads the pipeline that runs the call, so a second pipeline built from the same
    components (guiding or not) never inherits the first one's state."""
    pipe = sd3_pipe()
    other = StableDiffusion3Pipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("transformer_blocks.0:both", sae(1), beta=0.5, gamma=1.0,
                                                           tau=-1.0, cfg="cond")]))
    raw = add_hook(pipe.transformer.transformer_blocks[0], Capture(), "raw")
    out = add_outer(pipe.transformer.transformer_blocks[0], Capture())
    _sd3_prompts(pipe, 1, guidance=5.0)  # the pipeline passed to apply_safedig guides ...
    _sd3_prompts(other, 2, guidance=1.0)  # ... the other one does not: both of its rows are conditional
    guided, unguided = raw.calls[0], raw.calls[STEPS]
    assert guided[1].shape[0] == 2 and unguided[1].shape[0] == 2
    assert torch.equal(out.calls[0][1][:1], guided[1][:1]), "uncond row of the guided call untouched"
    assert not torch.equal(out.calls[0][1][1:], guided[1][1:])
    assert not torch.equal(out.calls[STEPS][1][0], unguided[1][0]), "both prompts of the unguided call steered"
    assert not torch.equal(out.calls[STEPS][1][1], unguided[1][1])
    # called on its own (no pipeline running), a cfg="cond" site cannot tell the halves apart
    with pytest.raises(RuntimeError, match="cannot tell which rows of this call are conditional"):
        with torch.no_grad():
            pipe.transformer(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 8, 16),
                             pooled_projections=torch.randn(2, 16), timestep=torch.full((2,), 500.0))
    handle.remove()


def test_flux_true_cfg_steers_each_request_in_both_calls():
    pipe = flux_pipe(1, 1)
    g = torch.Generator().manual_seed(2)
    emb = dict(prompt_embeds=torch.randn(2, 8, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 16, generator=g),
               negative_prompt_embeds=torch.randn(2, 8, 16, generator=g),
               negative_pooled_prompt_embeds=torch.randn(2, 16, generator=g))

    def run():
        return pipe(num_inference_steps=STEPS, height=8, width=8, output_type="pt", true_cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(0), **emb).images

    handle = apply_safedig(pipe, _config(tau=-1.0))
    handle.set_requests(enabled=[True, False])
    got = run()
    records = handle.request_telemetry()[SITE]
    assert len(records) == 2 * STEPS, "cond and uncond calls, one record each"
    assert all(r["active"] == [True, False] for r in records)
    handle.disable()
    off = run()
    assert torch.equal(got[1], off[1]) and not torch.equal(got[0], off[0])
    handle.remove()


def test_no_combination_of_site_and_request_thresholds_shuts_the_gate_while_telemetry_says_active():
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig([SiteConfig(SITE, sae(1), beta=0.5, tau=0.0)]))
    handle.set_requests(tau=[0.1, 0.2])
    # an empty harmful set with tau = -1 is pure Blend for the site, but the requests' own
    # thresholds (>= 0) would shut the gate for every token of every request
    with pytest.raises(ValueError, match=r"request 0's tau.*harmful set is empty.*never opens"):
        handle.set_site(SITE, harmful=[], tau=-1.0)
    handle.set_requests(tau=[-0.5, -1.0])
    handle.set_site(SITE, harmful=[], tau=-1.0)  # now every threshold lets tokens through
    with pytest.raises(ValueError, match=r"set_requests\.tau\[1\].*never opens"):
        handle.set_requests(tau=[-1.0, 0.3])
    assert not torch.equal(_run(pipe.transformer, _flux_call(batch=2)),
                           _run(flux_pipe(1, 1).transformer, _flux_call(batch=2)))
    (rows,) = {len(r) for r in handle.telemetry().values()}
    assert rows == 1 and handle.telemetry()[SITE][0]["active"]
    handle.remove()


# -- export -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_steered_transformer_exports_decomposes_and_packages_with_aotinductor(tmp_path):
    """torch.export sees the counters and telemetry as buffers it may mutate (no in-place update of
    a captured constant), so run_decompositions and AOTInductor packaging work, and the package
    steers as the eager model does."""
    tr = flux_pipe(1, 1).transformer.eval()
    inputs = _flux_call(timestep=0.75)
    unsteered = _run(tr, inputs)
    handle = apply_safedig(tr, _config(window=(0.2, 0.3)))
    eager = _run(tr, inputs)
    assert not torch.equal(eager, unsteered)
    with torch.no_grad():
        exported = torch.export.export(tr, (), inputs)
    decomposed = exported.run_decompositions()
    mutated = set(decomposed.graph_signature.buffers_to_mutate.values())
    assert {"safedig.clock.counter", "safedig.sites.0.telemetry"} <= mutated, mutated
    torch.testing.assert_close(decomposed.module()(**inputs)[0], eager, rtol=1e-5, atol=1e-5)
    path = torch._inductor.aoti_compile_and_package(decomposed, package_path=str(tmp_path / "steered.pt2"))
    package = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(package(**inputs)[0], eager, rtol=1e-4, atol=1e-4)
    handle.remove()


def test_strided_and_dtype_mismatched_inputs_are_steered_in_the_activations_dtype():
    """A site stored in fp32 steering bf16 activations computes in bf16, as the op's reference does."""
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig([SiteConfig(SITE, sae(1), **STRONG)]))
    _, st = handle._sites[SITE]
    from safedig_kernels.integrations.diffusers.state import CallInfo

    x = torch.randn(2, 9, D).to(torch.bfloat16)[:, 1:]
    y = st(x, CallInfo(torch.tensor(0.5), torch.tensor(0), None))
    s = sae(1)
    want, _ = reference.steer(x, *(t.to(torch.bfloat16) for t in (s.W_enc, s.b_enc, s.W_dec, s.b_dec)),
                              sk.ops.as_harmful_mask(HARM_A, s.num_features, torch.device("cpu")),
                              *(torch.tensor(v) for v in STRONG.values()), K)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    handle.remove()


def test_a_steered_transformer_pickles_whole_and_steers_as_before(tmp_path):
    pipe = flux_pipe(1, 1)
    handle = apply_safedig(pipe, _config())
    before = _run(pipe.transformer)
    generate(pipe)  # the pipeline's run left its notes in the hooks: they are not pickled
    torch.save(pipe.transformer, tmp_path / "steered.pt")
    loaded = torch.load(tmp_path / "steered.pt", weights_only=False)
    assert safedig_handle(loaded).sites == handle.sites
    assert torch.equal(_run(loaded), before)
    handle.remove()
