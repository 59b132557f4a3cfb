"""diffusers integration on tiny FLUX / SD3 pipelines built in code, on the CPU.

The oracle for steering is `reference.steer` applied by hand to the block outputs captured by a
diffusers hook (inside the block's forward, so it sees the raw output), compared with what a
torch forward hook registered after SafeDIG's sees. Images are compared bitwise where nothing should change.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from _pipelines import HARM_A, HARM_B, STEPS, D, F, K, flux_pipe, generate, sae, sd3_pipe  # noqa: E402
from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import safedig_kernels as sk  # noqa: E402
from safedig_kernels import reference  # noqa: E402
from safedig_kernels.integrations.diffusers import (  # noqa: E402
    SafeDIGConfig,
    SafeDIGHandle,
    SiteConfig,
    apply_safedig,
    remove_safedig,
)
from safedig_kernels.integrations.diffusers.state import CallInfo  # noqa: E402

# -- capture -----------------------------------------------------------------------------

class Capture(ModelHook):
    """Records a block's (text, image) outputs; registered before SafeDIG it sees them raw."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def post_forward(self, module, output):
        text, image = output
        self.calls.append((None if text is None else text.clone(), image.clone(),
                           None if text is None else text.is_contiguous(), image.is_contiguous()))
        return output


class TimestepCapture(ModelHook):
    def __init__(self):
        super().__init__()
        self.timesteps: list[float] = []

    def pre_forward(self, module, *args, **kwargs):
        self.timesteps.append(float(kwargs["timestep"].reshape(-1)[0]))
        return args, kwargs


def add_hook(module, hook, name):
    """A diffusers hook: inside the module's forward, so it sees the block's raw output."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


def add_outer(module, capture: "Capture") -> "Capture":
    """A torch forward hook registered after SafeDIG's: it sees what the block passes on."""
    module.register_forward_hook(lambda m, args, output: capture.post_forward(m, output))
    return capture


def pick(text, image, stream):
    return {"image": image, "text": text, "both": None}[stream] if stream != "both" else torch.cat([text, image], 1)


def check_site(raw: Capture, out: Capture, timesteps: list[float], scale: float, s: sk.TopKSAE, *, stream: str,
               harmful, beta: float, gamma: float, tau: float, window, cfg_rows: slice = slice(None),
               other_untouched: bool = True) -> dict:
    """Every call: the steered stream equals reference.steer of the raw one (strengths zeroed
    outside the window), only gated tokens of the steered rows changed, the other stream is
    untouched. Returns counts so callers can assert the check was not vacuous."""
    assert len(raw.calls) == len(out.calls) == len(timesteps) > 0
    mask = sk.ops.as_harmful_mask(harmful, F, torch.device("cpu"))
    seen = {"in_window": 0, "out_window": 0, "gated": 0, "ungated": 0}
    for (rt, ri, _, _), (ot, oi, _, _), t in zip(raw.calls, out.calls, timesteps):
        p = 1.0 - t / scale
        in_window = window[0] <= p and (p < window[1] or window[1] >= 1.0)
        b, g = (beta, gamma) if in_window else (0.0, 0.0)
        x = pick(rt, ri, stream)
        y_ref, h = reference.steer(x[cfg_rows], s.W_enc, s.b_enc, s.W_dec, s.b_dec, mask, torch.tensor(b),
                                   torch.tensor(g), torch.tensor(tau), K)
        expected = x.clone()
        expected[cfg_rows] = y_ref
        got = pick(ot, oi, stream)
        assert torch.equal(got, expected)
        gated = torch.zeros(x.shape[:-1], dtype=torch.bool)
        gated[cfg_rows] = (h > tau) & in_window
        assert torch.equal((got != x).any(-1), gated), "changed tokens must be exactly the gated ones"
        if other_untouched and stream == "image" and rt is not None:
            assert torch.equal(ot, rt)
        if other_untouched and stream == "text":
            assert torch.equal(oi, ri)
        seen["in_window" if in_window else "out_window"] += 1
        seen["gated"] += int(gated.sum())
        seen["ungated"] += int((~gated[cfg_rows]).sum()) if in_window else 0
    return seen


# -- bitwise identity --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_zero_strength_disabled_and_removed_are_bitwise_unhooked(kind):
    pipe = flux_pipe() if kind == "flux" else sd3_pipe()
    baseline = generate(pipe)
    if kind == "flux":
        sites = [SiteConfig("transformer_blocks.0:image", sae(1)),
                 SiteConfig("transformer_blocks.0:text", sae(2)),
                 SiteConfig("transformer_blocks.1:both", sae(3)),
                 SiteConfig("single_transformer_blocks.0:both", sae(4)),
                 SiteConfig("single_transformer_blocks.1:text", sae(5))]
    else:
        sites = [SiteConfig("transformer_blocks.0:both", sae(1)),
                 SiteConfig("transformer_blocks.1:image", sae(2), cfg="cond")]
    # every token passes the gate; zero strengths must still be identity
    sites = [dataclasses.replace(s, beta=0.0, gamma=0.0, tau=-1.0) for s in sites]
    handle = apply_safedig(pipe, SafeDIGConfig(sites))
    assert torch.equal(generate(pipe), baseline)
    tele = handle.telemetry()
    assert all(len(rows) == STEPS and all(r["gated_fraction"] == 1.0 and not r["active"] for r in rows)
               for rows in tele.values()), "the hooks must have run at every step"

    for s in handle.sites:  # real strengths, then the global switch off
        handle.set_site(s, beta=0.5, gamma=1.0)
    assert not torch.equal(generate(pipe), baseline)
    handle.disable()
    assert torch.equal(generate(pipe), baseline)
    handle.enable()

    assert remove_safedig(pipe) is True
    assert torch.equal(generate(pipe), baseline)
    assert not remove_safedig(pipe)
    for m in pipe.transformer.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, "remove_safedig must leave no hook behind"
        registry = getattr(m, "_diffusers_hook", None)  # the pipeline's cache_context makes an empty one
        assert registry is None or not registry.hooks, "SafeDIG installs no diffusers hook"
    assert "safedig" not in dict(pipe.transformer.named_modules())


# -- steering is spec §2 at the chosen sites, tokens and steps ----------------------------

def test_flux_steering_matches_reference_at_sites_tokens_and_window():
    pipe = flux_pipe()
    tr = pipe.transformer
    a, b = sae(1, HARM_A), sae(2, HARM_B)
    specs = [  # (block, stream, sae, kwargs)
        (tr.transformer_blocks[0], "image", a, dict(beta=0.5, gamma=1.0, tau=0.0, window=(0.1, 0.6))),
        (tr.transformer_blocks[0], "text", b, dict(beta=0.0, gamma=2.0, tau=0.05, window=(0.0, 1.0))),
        (tr.single_transformer_blocks[0], "image", b, dict(beta=1.0, gamma=-1.0, tau=0.0, window=(0.0, 0.3))),
        (tr.single_transformer_blocks[1], "both", a, dict(beta=0.3, gamma=0.7, tau=0.0, window=(0.4, 1.0))),
    ]
    names = ["transformer_blocks.0", "transformer_blocks.0", "single_transformer_blocks.0",
             "single_transformer_blocks.1"]
    untouched = add_hook(tr.transformer_blocks[1], Capture(), "raw")
    blocks = {id(blk): blk for blk, *_ in specs}
    raws = {i: add_hook(blk, Capture(), "raw") for i, blk in blocks.items()}
    ts = add_hook(tr, TimestepCapture(), "ts")
    harm = {id(a): HARM_A, id(b): HARM_B}
    cfg = SafeDIGConfig([SiteConfig(f"{n}:{st}", s_, harmful=harm[id(s_)], **kw)
                         for n, (_, st, s_, kw) in zip(names, specs)])
    handle = apply_safedig(pipe, cfg)
    outs = {i: add_outer(blk, Capture()) for i, blk in blocks.items()}
    unhooked_out = add_outer(tr.transformer_blocks[1], Capture())

    generate(pipe, num_images_per_prompt=2)  # batch 2: single-block slices are truly strided
    assert len(ts.timesteps) == STEPS
    for blk, stream, s_, kw in specs:
        seen = check_site(raws[id(blk)], outs[id(blk)], ts.timesteps, 1.0, s_, stream=stream, harmful=harm[id(s_)],
                          other_untouched=blk is not tr.transformer_blocks[0], **kw)
        assert seen["gated"] > 0 and seen["ungated"] > 0, seen
        if kw["window"] != (0.0, 1.0):
            assert seen["in_window"] > 0 and seen["out_window"] > 0, seen
    for (t0, i0, _, _), (t1, i1, _, _) in zip(untouched.calls, unhooked_out.calls):
        assert torch.equal(t0, t1) and torch.equal(i0, i1)
    # FLUX single blocks return slices of the joint sequence: the strided-activation case.
    raw_single = raws[id(tr.single_transformer_blocks[0])].calls
    assert not raw_single[0][2] and not raw_single[0][3]

    # Telemetry equals gate statistics computed from the captured raw activations.
    tele = handle.telemetry()
    assert set(tele) == {"transformer_blocks.0:image", "transformer_blocks.0:text", "single_transformer_blocks.0:image",
                         "single_transformer_blocks.1:both"}
    for label, (blk, stream, s_, kw) in zip(tele, specs):
        rows = tele[label]
        assert [r["step"] for r in rows] == list(range(STEPS))
        for r, (rt, ri, _, _), t in zip(rows, raws[id(blk)].calls, ts.timesteps):
            p = 1.0 - t
            _, h = reference.steer(pick(rt, ri, stream), s_.W_enc, s_.b_enc, s_.W_dec, s_.b_dec,
                                   sk.ops.as_harmful_mask(harm[id(s_)], F, torch.device("cpu")),
                                   torch.tensor(0.0), torch.tensor(0.0), torch.tensor(kw["tau"]), K)
            assert r["progress"] == pytest.approx(p, abs=1e-6)
            assert r["active"] == (kw["window"][0] <= p and (p < kw["window"][1] or kw["window"][1] >= 1))
            assert r["gated_fraction"] == pytest.approx(float((h > kw["tau"]).float().mean()), abs=1e-6)
            assert r["mean_harm"] == pytest.approx(float(h.mean()), rel=1e-5, abs=1e-6)
    handle.reset_telemetry()
    assert all(rows == [] for rows in handle.telemetry().values())

    # set_site changes features, strengths and window in place; the same oracle holds.
    new = dict(beta=0.2, gamma=3.0, tau=0.1, window=(0.2, 0.8))
    handle.set_site("single_transformer_blocks.1:both", harmful=HARM_B, **new)
    cap_raw, cap_out = raws[id(tr.single_transformer_blocks[1])], outs[id(tr.single_transformer_blocks[1])]
    cap_raw.calls.clear(), cap_out.calls.clear(), ts.timesteps.clear()
    generate(pipe, num_images_per_prompt=2)
    seen = check_site(cap_raw, cap_out, ts.timesteps, 1.0, a, stream="both", harmful=HARM_B, **new)
    assert seen["gated"] > 0 and seen["in_window"] > 0 and seen["out_window"] > 0
    assert handle.config().sites[3].harmful == tuple(HARM_B) and handle.config().sites[3].window == (0.2, 0.8)
    remove_safedig(pipe)


def test_sd3_cfg_halves_and_last_block():
    pipe = sd3_pipe()
    tr = pipe.transformer
    s0, s1 = sae(1), sae(2)
    raw0, raw1 = (add_hook(b, Capture(), "raw") for b in tr.transformer_blocks)
    ts = add_hook(tr, TimestepCapture(), "ts")
    kw0 = dict(beta=0.5, gamma=1.0, tau=0.0, window=(0.1, 0.6))
    kw1 = dict(beta=0.8, gamma=0.5, tau=0.0, window=(0.0, 1.0))
    handle = apply_safedig(pipe, SafeDIGConfig([
        SiteConfig("transformer_blocks.0:image", s0, cfg="cond", **kw0),
        SiteConfig("transformer_blocks.1:image", s1, **kw1),  # last block: text stream is None
    ]))
    out0, out1 = (add_outer(b, Capture()) for b in tr.transformer_blocks)
    generate(pipe, guidance_scale=5.0)
    assert raw0.calls[0][1].shape[0] == 2, "CFG batch"
    assert raw1.calls[0][0] is None
    seen = check_site(raw0, out0, ts.timesteps, 1000.0, s0, stream="image", harmful=HARM_A, cfg_rows=slice(1, None),
                      **kw0)
    assert seen["gated"] > 0 and seen["in_window"] > 0 and seen["out_window"] > 0
    seen = check_site(raw1, out1, ts.timesteps, 1000.0, s1, stream="image", harmful=HARM_A, **kw1)
    assert seen["gated"] > 0
    for (_, ri, _, _), (_, oi, _, _) in zip(raw1.calls, out1.calls):  # cfg="both": the uncond half is steered too
        if not torch.equal(ri[:1], oi[:1]):
            break
    else:
        pytest.fail("cfg='both' must steer the unconditional half")

    # Without CFG the batch is the prompt alone: cfg="cond" steers all of it.
    for c in (raw0, out0):
        c.calls.clear()
    ts.timesteps.clear()
    generate(pipe, guidance_scale=1.0)
    assert raw0.calls[0][1].shape[0] == 1
    seen = check_site(raw0, out0, ts.timesteps, 1000.0, s0, stream="image", harmful=HARM_A, **kw0)
    assert seen["gated"] > 0
    handle.remove()


def test_strided_3d_activation_is_steered_in_place_of_a_copy():
    """The hook path on a non-contiguous [B, T, d] slice equals the op on a contiguous copy."""
    s = sae(1)
    joint = torch.randn(2, 11, D)
    x = joint[:, 3:]  # what a FLUX single block returns for its image tokens
    assert not x.is_contiguous()
    for fused in (True, False):
        pipe = flux_pipe(num_layers=1, num_single_layers=1)
        handle = apply_safedig(pipe.transformer, SafeDIGConfig(
            [SiteConfig("single_transformer_blocks.0", s, beta=0.5, gamma=1.0, tau=0.0)], use_fused_ops=fused))
        _, st = handle._sites["single_transformer_blocks.0:image"]
        y = st(x, CallInfo(torch.tensor(0.5), torch.tensor(0), None))
        y_ref, _ = reference.steer(x.contiguous(), s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.harmful_mask,
                                   torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.0), K)
        assert y.shape == x.shape and torch.equal(y, y_ref) and not torch.equal(y, x)


def test_window_edges_on_the_device():
    """start is inclusive, end exclusive except end = 1, which includes progress 1 (sigma = 0)."""
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig(
        [SiteConfig("single_transformer_blocks.0", sae(1), beta=0.5, gamma=1.0, tau=-1.0, window=(0.25, 1.0))]))
    _, st = handle._sites["single_transformer_blocks.0:image"]
    x = torch.randn(1, 6, D)
    for p, window, steered in [(0.25, (0.25, 1.0), True), (1.0, (0.25, 1.0), True), (0.2, (0.25, 1.0), False),
                               (0.75, (0.25, 0.75), False), (0.7, (0.25, 0.75), True)]:
        handle.set_site("single_transformer_blocks.0", window=window)
        y = st(x, CallInfo(torch.tensor(p), torch.tensor(0), None))
        assert torch.equal(y, x) != steered, (p, window)


# -- T5 text-encoder site ----------------------------------------------------------------

def test_t5_site_steers_prompt_embeddings_once_per_encoding():
    pipe = flux_pipe(num_layers=1, num_single_layers=1, t5=True)
    enc = pipe.text_encoder_2
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = enc(ids)[0]
    s = sae(3)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("text_encoder_2", s, beta=0.5, gamma=1.0, tau=0.0)]))
    with torch.no_grad():
        got = enc(ids, output_hidden_states=False)[0]
        got_tuple = enc(ids, return_dict=False)[0]
    y_ref, h = reference.steer(raw, s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.harmful_mask, torch.tensor(0.5),
                               torch.tensor(1.0), torch.tensor(0.0), K)
    assert torch.equal(got, y_ref) and torch.equal(got_tuple, y_ref)
    assert 0 < (h > 0).sum() < h.numel()
    rows = handle.telemetry()["text_encoder_2:text"]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["progress"] != rows[0]["progress"]  # NaN: no schedule for a text encoder
    assert rows[0]["gated_fraction"] == pytest.approx(float((h > 0).float().mean()))
    # Embeddings passed in bypass the encoder: a run whose encoder never ran since the previous
    # run says so at its first step instead of steering nothing silently. (The encodings above
    # could have made this first run's embeddings; the second run has none of its own.)
    generate(pipe, steps=1)
    with pytest.warns(UserWarning, match="text-encoder sites"):
        generate(pipe, steps=1)
    handle.remove()
    assert "encode_prompt" not in pipe.__dict__ and "safedig" not in dict(enc.named_modules())
    with torch.no_grad():
        assert torch.equal(enc(ids)[0], raw)


def test_state_follows_pipeline_to_and_caller_sae_is_not_moved():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    s = sae(1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("single_transformer_blocks.0:both", s,
                                                           beta=0.5, gamma=1.0, tau=0.0)]))
    handle.set_site("single_transformer_blocks.0:both", gamma=2.0)
    pipe.to(torch.bfloat16)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=torch.randn(1, 16, 4, dtype=torch.bfloat16),
                               encoder_hidden_states=torch.randn(1, 8, 16, dtype=torch.bfloat16),
                               pooled_projections=torch.randn(1, 16, dtype=torch.bfloat16),
                               timestep=torch.tensor([0.5], dtype=torch.bfloat16),
                               img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]
    assert out.dtype == torch.bfloat16
    (row,) = handle.telemetry()["single_transformer_blocks.0:both"]
    assert row["active"] and row["progress"] == 0.5
    assert s.dtype == torch.float32, "the caller's SAE must not be converted in place"
    assert handle.config().sites[0].gamma == 2.0
    handle.remove()


# -- torch.compile -----------------------------------------------------------------------

def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _flux_compile_sites():
    return [SiteConfig("single_transformer_blocks.0:both", sae(1), beta=0.5, gamma=1.0, tau=0.0,
                       window=(0.1, 0.6)),
            SiteConfig("transformer_blocks.0:text", sae(2, HARM_B), beta=0.3, gamma=0.5, tau=0.0)]


def _changes(handle: SafeDIGHandle) -> None:
    handle.set_site("single_transformer_blocks.0:both", beta=0.0, gamma=2.5, tau=0.1, harmful=HARM_B, window=(0.0, 0.4))
    handle.set_site("transformer_blocks.0:text", enabled=False)


def _compiled_generations(pipe, handle, eager: dict, tol: float = 1e-5) -> None:
    """Run generations on a compiled pipeline: the first compiles, none after it, none across
    steps, strength/feature/window/switch changes, and results match eager ones."""
    torch._dynamo.reset()
    counters.clear()
    handle.set_site("single_transformer_blocks.0:both", beta=0.5, gamma=1.0, tau=0.0, harmful=HARM_A, window=(0.1, 0.6))
    handle.set_site("transformer_blocks.0:text", enabled=True)
    after_first_step = []

    def snapshot(p, i, t, kwargs):
        if i == 0:
            after_first_step.append(_graphs())
        return {}

    first = generate(pipe, callback_on_step_end=snapshot)
    assert after_first_step[0] >= 1 and _graphs() == after_first_step[0], "recompiled across the steps"
    torch.testing.assert_close(first, eager["a"], rtol=tol, atol=tol)
    n = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        handle.reset_telemetry()
        torch.testing.assert_close(generate(pipe), eager["a"], rtol=tol, atol=tol)
        tele = handle.telemetry()
        _changes(handle)
        torch.testing.assert_close(generate(pipe), eager["b"], rtol=tol, atol=tol)
        handle.disable()
        torch.testing.assert_close(generate(pipe), eager["off"], rtol=tol, atol=tol)
        handle.enable()
    assert _graphs() == n
    for label, rows in eager["tele"].items():
        for r, c in zip(rows, tele[label], strict=True):
            assert r["active"] == c["active"] and r["step"] == c["step"]
            assert c["gated_fraction"] == pytest.approx(r["gated_fraction"], abs=1e-6)
            assert c["mean_harm"] == pytest.approx(r["mean_harm"], rel=1e-4, abs=1e-5)


def _eager_results(pipe, handle) -> dict:
    handle.reset_telemetry()
    a = generate(pipe)
    tele = handle.telemetry()
    _changes(handle)
    b = generate(pipe)
    handle.disable()
    off = generate(pipe)
    handle.enable()
    assert (a - b).abs().max() > 1e-3 and (a - off).abs().max() > 1e-3, "settings must matter for the test to mean much"
    return {"a": a, "b": b, "off": off, "tele": tele}


@pytest.mark.slow
def test_compile_fullgraph_inductor_flux_no_recompile():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe, SafeDIGConfig(_flux_compile_sites()))
    eager = _eager_results(pipe, handle)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="inductor")
    _compiled_generations(pipe, handle, eager)
    # The blocks' steering traces into the forward's graph; the transformer's own hooks (the
    # call's start: progress and telemetry row) are a second small graph; none recompiles.
    assert _graphs() <= 2, "steering must trace without graph breaks"


@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs_capture_steering_without_recompile():
    """mode="reduce-overhead": state tensors are static inputs, so their in-place updates
    neither recompile nor keep CUDA graphs from being used."""
    pipe = flux_pipe(num_layers=1, num_single_layers=1).to("cuda")
    handle = apply_safedig(pipe, SafeDIGConfig(_flux_compile_sites()))
    eager = _eager_results(pipe, handle)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, mode="reduce-overhead")
    _compiled_generations(pipe, handle, eager, tol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped (mutated non-static input?)"


def test_compile_repeated_blocks_flux_no_recompile():
    pipe = flux_pipe(num_layers=1, num_single_layers=2)
    handle = apply_safedig(pipe, SafeDIGConfig(_flux_compile_sites()))
    eager = _eager_results(pipe, handle)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    _compiled_generations(pipe, handle, eager)


def test_compile_fullgraph_sd3_cfg_cond_no_recompile():
    pipe = sd3_pipe()
    handle = apply_safedig(pipe, SafeDIGConfig([
        SiteConfig("transformer_blocks.0:both", sae(1), cfg="cond", beta=0.5, gamma=1.0, tau=0.0,
                   window=(0.1, 0.6)),
        SiteConfig("transformer_blocks.1:image", sae(2), beta=0.4, gamma=1.0, tau=0.0)],
        use_fused_ops=False))
    eager = generate(pipe)
    handle.set_site("transformer_blocks.0:both", gamma=3.0, window=(0.0, 1.0))
    eager_b = generate(pipe)
    handle.set_site("transformer_blocks.0:both", gamma=1.0, window=(0.1, 0.6))
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(generate(pipe), eager, rtol=1e-5, atol=1e-5)
    n = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        handle.set_site("transformer_blocks.0:both", gamma=3.0, window=(0.0, 1.0))
        torch.testing.assert_close(generate(pipe), eager_b, rtol=1e-5, atol=1e-5)
    assert _graphs() == n <= 2


_SPY_SEEN: list = []


@torch.library.custom_op("safedig_test::spy_steer", mutates_args=())
def _spy_steer(x: torch.Tensor, W_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, harmful: torch.Tensor,
               beta: torch.Tensor, gamma: torch.Tensor, tau: torch.Tensor, k: int,
               enc_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path's CPU stand-in. Opaque to the compiler (a custom op, unlike the triton_op
    whose body is traced into the graph), so it records the bias it is given at run time."""
    _SPY_SEEN.append(enc_bias.clone())
    # so (x - b_dec) W_enc + b_enc = x W_enc + enc_bias
    b_enc = (enc_bias + b_dec.float() @ W_enc.float()).to(W_enc.dtype)
    return reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)


@_spy_steer.register_fake
def _(x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _spy_on_the_fused_path(monkeypatch) -> list:
    """Route the fused op's CUDA path to a CPU emulation that records the folded encoder bias it
    was given (pre-activations `x @ W_enc + enc_bias`, as the Triton path computes them)."""
    import importlib

    steer_module = importlib.import_module("safedig_kernels.ops.steer")
    _SPY_SEEN.clear()
    monkeypatch.setattr(steer_module, "use_triton_for", lambda t: True)
    monkeypatch.setattr(steer_module, "_steer_fwd", torch.ops.safedig_test.spy_steer)
    return _SPY_SEEN


@pytest.mark.parametrize("compiled", ["eager", "blocks", "whole"])
def test_the_op_is_given_the_bias_folded_once_from_the_placed_weights(monkeypatch, compiled):
    """The site folds `b_enc - b_dec @ W_enc` when it is placed (and again when the model moves),
    so no call redoes that GEMV: eager, regionally compiled or compiled whole alike. The caller's
    SAE is copied, so editing it after apply_safedig changes nothing."""
    seen = _spy_on_the_fused_path(monkeypatch)
    s = sae(1)
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe, SafeDIGConfig([
        SiteConfig("single_transformer_blocks.0", s, beta=0.5, gamma=1.0, tau=-1.0)]))
    _, st = handle._sites["single_transformer_blocks.0:image"]
    want = sk.ops.encoder_bias(s.W_enc, s.b_enc, s.b_dec)
    assert torch.equal(st.enc_bias, want)
    eager = generate(pipe)
    if compiled == "blocks":
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    elif compiled == "whole":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    seen.clear()
    torch.testing.assert_close(generate(pipe), eager, rtol=1e-5, atol=1e-5)
    assert len(seen) == STEPS and all(torch.equal(b, want) for b in seen)
    with torch.no_grad():
        s.b_dec.add_(0.25)  # the caller's SAE, not the installed copy
    seen.clear()
    torch.testing.assert_close(generate(pipe), eager, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(b, want) for b in seen)
    remove_safedig(pipe)


def test_moving_the_model_folds_the_bias_again_from_the_moved_weights():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("single_transformer_blocks.0", sae(1))]))
    _, st = handle._sites["single_transformer_blocks.0:image"]
    pipe.transformer.to(torch.bfloat16)
    assert st.W_enc.dtype == torch.bfloat16 and st.enc_bias.dtype == torch.float32
    assert torch.equal(st.enc_bias, sk.ops.encoder_bias(st.W_enc, st.b_enc, st.b_dec))
    assert st.settings.dtype == torch.float32 and st.telemetry.dtype == torch.float32
    handle.remove()


# -- fail closed -------------------------------------------------------------------------

def _apply_flux(*sites, pipe=None, **cfg):
    return apply_safedig(pipe if pipe is not None else flux_pipe(1, 1), SafeDIGConfig(list(sites), **cfg))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: _apply_flux(SiteConfig("single_transformer_blocks.7", sae(1))), ValueError,
     r"single_transformer_blocks\.0\.\.0"),
    (lambda: _apply_flux(SiteConfig("transformer_block.0", sae(1))), ValueError, "unknown site"),
    (lambda: apply_safedig(sd3_pipe(), SafeDIGConfig([SiteConfig("single_transformer_blocks.0", sae(1))])),
     ValueError, "unknown site"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", sae(1, d=24))), ValueError, "width d = 24.*width 16"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", "/nonexistent/sae.safetensors")), FileNotFoundError,
     "no SAE checkpoint"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", sae(1), harmful=[F])), ValueError, r"\[0, 64\)"),
    (lambda: _apply_flux(SiteConfig("text_encoder_2", sae(1))), ValueError, "T5EncoderModel"),
    (lambda: apply_safedig(flux_pipe(1, 1).transformer, SafeDIGConfig([SiteConfig("text_encoder_2", sae(1))])),
     ValueError, "pass the pipeline"),
    (lambda: apply_safedig(sd3_pipe(), SafeDIGConfig([SiteConfig("transformer_blocks.1:text", sae(1))])),
     ValueError, "no text stream"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", sae(1), cfg="cond")), ValueError,
     "do not batch guidance that way"),
    (lambda: apply_safedig(sd3_pipe().transformer,
                           SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1), cfg="cond")])),
     ValueError, "pass the pipeline to apply_safedig"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", sae(1)),
                         SiteConfig("transformer_blocks.0:both", sae(2))), ValueError, "overlaps"),
    (lambda: apply_safedig(torch.nn.Linear(2, 2), SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1))])),
     TypeError, "Linear has no blocks diffusers describes.*TransformerBlockRegistry.register"),
    (lambda: apply_safedig(object(), SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1))])),
     TypeError, "has no .transformer"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), beta=1.5), ValueError, r"beta must lie in \[0, 1\]"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), gamma=float("nan")), ValueError, "gamma must be finite"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), tau="0"), TypeError, "tau must be a float"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), window=(0.6, 0.2)), ValueError, "0 <= start < end <= 1"),
    (lambda: SiteConfig("transformer_blocks.0:joint", sae(1)), ValueError, "stream must be one of"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), cfg="uncond"), ValueError, "cfg must be one of"),
    (lambda: SiteConfig("transformer_blocks.0", sae(1), harmful=[1, -2]), ValueError, "non-negative int"),
    (lambda: SiteConfig("transformer_blocks.0", object()), TypeError, "a TopKSAE, a checkpoint path or an hf:// name"),
    (lambda: SafeDIGConfig([]), ValueError, "non-empty"),
    (lambda: _apply_flux(SiteConfig("transformer_blocks.0", sae(1), harmful=[], tau=0.0)), ValueError,
     "harmful set is empty.*never opens"),
], ids=["index", "name", "flux-site-on-sd3", "width", "missing-file", "harmful-range", "clip-encoder",
        "t5-needs-pipeline", "sd3-last-block-text", "cfg-cond-flux", "cfg-cond-bare", "overlap", "not-a-model",
        "not-a-pipeline", "beta-range", "gamma-nan", "tau-type", "window-order", "stream", "cfg", "harmful-negative",
        "sae-type", "no-sites", "gate-never-opens"])
def test_fail_closed(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_fail_closed_leaves_model_unhooked_and_apply_twice_raises():
    pipe = flux_pipe(1, 1)
    with pytest.raises(ValueError, match="width"):
        _apply_flux(SiteConfig("transformer_blocks.0", sae(1)), SiteConfig("single_transformer_blocks.0", sae(1, d=8)),
                    pipe=pipe)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())
    assert "safedig" not in dict(pipe.transformer.named_modules())
    handle = _apply_flux(SiteConfig("transformer_blocks.0", sae(1)), pipe=pipe)
    with pytest.raises(RuntimeError, match="already applied"):
        _apply_flux(SiteConfig("transformer_blocks.0", sae(1)), pipe=pipe)
    # set_site checks everything before changing anything.
    _, st = handle._sites["transformer_blocks.0:image"]
    before = (st.settings.clone(), st.harmful.clone())
    for kwargs, exc in [(dict(beta=0.1, gamma=float("inf")), ValueError), (dict(beta=2.0), ValueError),
                        (dict(harmful=[F + 1]), ValueError), (dict(window=(0.5, 0.5)), ValueError),
                        (dict(harmful=[], tau=0.2), ValueError), (dict(harmful=[]), ValueError),
                        (dict(enabled=1), TypeError)]:
        with pytest.raises(exc):
            handle.set_site("transformer_blocks.0", **kwargs)
    assert torch.equal(st.settings, before[0]) and torch.equal(st.harmful, before[1])
    with pytest.raises(ValueError, match="no site"):
        handle.set_site("transformer_blocks.1", beta=0.1)
    remove_safedig(pipe)


def test_empty_harmful_set_is_accepted_when_the_gate_can_open():
    # tau < 0 opens the gate for every token (h = 0 > tau): pure Blend, a deliberate setting
    pipe = flux_pipe(1, 1)
    handle = _apply_flux(SiteConfig("transformer_blocks.0", sae(1), harmful=[], beta=0.5, tau=-1.0), pipe=pipe)
    handle.set_site("transformer_blocks.0", tau=-0.5)
    with pytest.raises(ValueError, match="never opens with tau = 0.0"):
        handle.set_site("transformer_blocks.0", tau=0.0)
    assert handle.config().sites[0].tau == -0.5
    remove_safedig(pipe)


def test_two_streams_on_one_block_are_two_sites_named_as_configs_name_them():
    pipe = flux_pipe(1, 1)
    handle = _apply_flux(SiteConfig("transformer_blocks.0:image", sae(1)),
                         SiteConfig("transformer_blocks.0:text", sae(2)), pipe=pipe)
    assert handle.sites == ("transformer_blocks.0:image", "transformer_blocks.0:text")
    handle.set_site("transformer_blocks.0:text", beta=0.2)
    handle.set_site("transformer_blocks.0", gamma=0.3)  # a module alone is its image stream, as in SiteConfig
    assert handle._sites["transformer_blocks.0:text"][1].values[:2] == [0.2, 0.0]
    assert handle._sites["transformer_blocks.0:image"][1].values[:2] == [0.0, 0.3]
    with pytest.raises(ValueError, match="no site 'transformer_blocks.0:both'"):
        handle.set_site("transformer_blocks.0:both", beta=0.2)
    handle.remove()


# -- JSON --------------------------------------------------------------------------------

def test_json_roundtrip_and_validation(tmp_path):
    (tmp_path / "saes").mkdir()
    cfg = SafeDIGConfig([SiteConfig("single_transformer_blocks.9", str(tmp_path / "saes" / "a.safetensors"),
                                    harmful=[1, 5], beta=0.5, gamma=1.0, window=(0.0, 0.4)),
                         SiteConfig("text_encoder_2", str(tmp_path / "saes" / "t5.safetensors"))],
                        use_fused_ops=False, telemetry_capacity=64)
    path = tmp_path / "routing.json"
    cfg.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "safedig-diffusers" and doc["version"] == 2
    assert [d["site"] for d in doc["sites"]] == ["single_transformer_blocks.9:image", "text_encoder_2:text"]
    assert doc["sites"][0]["sae"] == os.path.join("saes", "a.safetensors"), "paths are stored relative to the file"
    assert doc["sites"][1]["beta"] is None and doc["sites"][0]["window"] == [0.0, 0.4]
    back = SafeDIGConfig.from_json(path)
    assert back == cfg

    with pytest.raises(ValueError, match="TopKSAE object"):
        SafeDIGConfig([SiteConfig("transformer_blocks.0", sae(1))]).to_json(tmp_path / "x.json")
    for mutate, match in [(lambda d: d.update(version=3), "unsupported version"),
                          (lambda d: d["sites"][0].update(strength=1.0), r"unknown keys \['strength'\]"),
                          (lambda d: d["sites"][0].update(window=[0.5, 0.1]), "0 <= start < end"),
                          (lambda d: d.update(format="other"), "format"),
                          (lambda d: d.update(version=True), "unsupported version True"),
                          (lambda d: d.update(enabled="false"), "enabled must be a bool"),
                          (lambda d: d.update(sites=[]), "site")]:
        bad = json.loads(path.read_text())
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises((TypeError, ValueError), match=match) as refused:
            SafeDIGConfig.from_json(tmp_path / "bad.json")
        assert "bad.json" in str(refused.value), "the error names the file"


def test_checkpoint_paths_load_and_bad_files_fail_closed(tmp_path):
    s = sae(1)
    s.save(tmp_path / "sb0.safetensors")
    cfg = SafeDIGConfig([SiteConfig("single_transformer_blocks.0", str(tmp_path / "sb0.safetensors"), beta=0.5,
                                    gamma=1.0, tau=0.0)])
    cfg.to_json(tmp_path / "cfg.json")
    pipe = flux_pipe(1, 1)
    baseline = generate(pipe, steps=2)
    handle = apply_safedig(pipe, SafeDIGConfig.from_json(tmp_path / "cfg.json"))
    assert not torch.equal(generate(pipe, steps=2), baseline)
    assert handle.telemetry()["single_transformer_blocks.0:image"][0]["gated_fraction"] > 0
    handle.remove()
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a valid SAE checkpoint"):
        _apply_flux(SiteConfig("transformer_blocks.0", str(tmp_path / "junk.safetensors")))


def test_telemetry_off_and_overflow():
    pipe = flux_pipe(1, 1)
    handle = _apply_flux(SiteConfig("single_transformer_blocks.0", sae(1), tau=0.0, beta=0.5), pipe=pipe,
                         telemetry_capacity=2)
    generate(pipe, steps=3)
    with pytest.warns(UserWarning, match="3 calls but room for 2"):
        rows = handle.telemetry()["single_transformer_blocks.0:image"]
    assert [r["step"] for r in rows] == [0, 2] and rows[1]["progress"] == pytest.approx(2 / 3, abs=1e-6)
    handle.remove()
    handle = _apply_flux(SiteConfig("single_transformer_blocks.0", sae(1)), pipe=pipe, telemetry=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(pipe, steps=1)
    with pytest.raises(RuntimeError, match="telemetry is off"):
        handle.telemetry()
    handle.remove()


def test_a_version_1_file_reads_as_the_same_config(tmp_path):
    doc = {"format": "safedig-diffusers", "version": 1, "sites": [
        {"site": "transformer_blocks.0", "stream": "text", "sae": "a.safetensors", "harmful": [3], "beta": 0.5,
         "gamma": None, "tau": None, "window": [0.0, 0.5], "cfg": "both", "allow_other_site": False}]}
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    (site,) = SafeDIGConfig.from_json(tmp_path / "v1.json").sites
    assert site == SiteConfig("transformer_blocks.0:text", str(tmp_path / "a.safetensors"), harmful=[3], beta=0.5,
                              window=(0.0, 0.5))
