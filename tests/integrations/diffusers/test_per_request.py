"""Per-request control in a batch (`SafeDIGHandle.set_requests`) on tiny FLUX / SD3 models, on the CPU.

The oracle for a request is the same batch steered with that request's values set as the
site's own (`set_site`), compared row by row; for single site calls, `reference.steer` with one
value per row. Rows run the same arithmetic either way, so they are compared bitwise, except
compiled against eager (aot_eager may reorder float ops: a tight tolerance, as in test_diffusers).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from _pipelines import EMB, HARM_B, STEPS, D, K, flux_pipe, sae, sd3_pipe  # noqa: E402
from test_diffusers import Capture, add_hook, add_outer  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from safedig_kernels import reference  # noqa: E402
from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig  # noqa: E402
from safedig_kernels.integrations.diffusers.state import CallInfo  # noqa: E402

# Three requests, each unlike the sites' own values (beta 0.3, gamma 0.7, tau 0.0) in every strength.
REQ = dict(beta=[0.5, 0.0, 1.0], gamma=[1.0, 2.0, -0.5], tau=[0.1, -1.0, 0.05])
SITE = dict(beta=0.3, gamma=0.7, tau=0.0)


def request(i: int, req: dict = REQ) -> dict:
    return {name: values[i] for name, values in req.items()}


def flux_sites() -> list[SiteConfig]:
    return [SiteConfig("transformer_blocks.0:text", sae(1, HARM_B), **SITE),
            SiteConfig("single_transformer_blocks.0:both", sae(2), **SITE)]


def flux_inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)


def run(transformer, batch: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**flux_inputs(batch))[0]


def set_every_site(handle, **values) -> None:
    for label in handle.sites:
        handle.set_site(label, **values)


def sd3_three_prompts(pipe, prompts: int = 3) -> torch.Tensor:
    """One image per prompt, with CFG (guidance 5): the transformer's batch is [uncond; cond]."""
    g = torch.Generator().manual_seed(2)
    emb = {name: torch.randn(prompts, *t.shape[1:], generator=g) for name, t in EMB.items()}
    return pipe(num_inference_steps=STEPS, height=8, width=8, output_type="pt", guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), **emb).images


def per_row(values: list, repeats: int = 1) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).repeat(repeats)


# -- each request is steered as its own values would steer it ---------------------------------

def test_each_request_matches_the_batch_steered_with_its_values_as_site_values():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig(flux_sites()))
    handle.set_requests(**REQ)
    got = run(pipe.transformer)
    handle.clear_requests()
    for i in range(3):
        set_every_site(handle, **request(i))
        assert torch.equal(got[i], run(pipe.transformer)[i]), f"request {i}"
    handle.disable()
    unsteered = run(pipe.transformer)
    assert all(not torch.equal(got[i], unsteered[i]) for i in range(3))

    # An argument left out takes the site's own value, read at each call: a later set_site reaches it.
    handle.enable()
    set_every_site(handle, **SITE)
    handle.set_requests(gamma=REQ["gamma"])
    set_every_site(handle, beta=0.9)
    got = run(pipe.transformer)
    handle.clear_requests()
    for i in range(3):
        set_every_site(handle, gamma=REQ["gamma"][i])
        assert torch.equal(got[i], run(pipe.transformer)[i]), f"request {i}, gamma only"
    assert handle.config().sites[0].beta == 0.9, "set_requests leaves the sites' own values alone"


def test_a_disabled_request_is_bitwise_unsteered_and_telemetry_says_so():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig(flux_sites()))
    handle.disable()
    unsteered = run(pipe.transformer)
    handle.enable()
    handle.reset_telemetry()
    handle.set_requests(enabled=[True, False, True])
    got = run(pipe.transformer)
    assert torch.equal(got[1], unsteered[1])
    assert not torch.equal(got[0], unsteered[0]) and not torch.equal(got[2], unsteered[2])
    per_request = handle.request_telemetry()
    for label in handle.sites:
        (rec,) = per_request[label]
        assert rec["step"] == 0 and rec["progress"] == 0.5
        assert rec["active"] == [True, False, True]
        assert len(rec["gated_fraction"]) == len(rec["mean_harm"]) == 3
        # each request has as many tokens as the others: their mean is the per-call figure
        (call,) = handle.telemetry()[label]
        assert call["active"]
        assert sum(rec["gated_fraction"]) / 3 == pytest.approx(call["gated_fraction"], abs=1e-6)
        assert sum(rec["mean_harm"]) / 3 == pytest.approx(call["mean_harm"], rel=1e-5, abs=1e-6)
    # The disabled request is still scored (h is computed for every row): it is only not steered.
    assert any(g > 0 for g in per_request["single_transformer_blocks.0:both"][0]["gated_fraction"])

    handle.clear_requests()
    handle.reset_telemetry()
    run(pipe.transformer)
    assert handle.request_telemetry() == {label: [] for label in handle.sites}, "no requests, no per-request rows"


def test_site_call_per_request_values_and_telemetry_against_the_reference():
    """One site call on a CFG batch [uncond; cond] of 2 x 3 rows: cfg="both" steers row i of each
    half with request i's values; cfg="cond" leaves the uncond half bitwise and steers the cond
    half. Per-request telemetry is taken over exactly the steered rows of that request."""
    pipe = sd3_pipe()
    s0, s1 = sae(1), sae(2)
    handle = apply_safedig(pipe, SafeDIGConfig([
        SiteConfig("transformer_blocks.0", s0, cfg="cond", **SITE),
        SiteConfig("transformer_blocks.1", s1, **SITE)]))
    handle.set_requests(**REQ, enabled=[True, True, False])
    x = torch.randn(6, 10, D, generator=torch.Generator().manual_seed(3))
    on = per_row([1.0, 1.0, 0.0])
    call = CallInfo(torch.tensor(0.5), torch.tensor(0), guided=True)
    for label, s_, rows in (("transformer_blocks.0:image", s0, slice(3, None)),
                            ("transformer_blocks.1:image", s1, slice(None))):
        state, st = handle._sites[label]
        repeats = 2 if rows == slice(None) else 1
        beta, gamma, tau = (per_row(REQ[n], repeats) for n in ("beta", "gamma", "tau"))
        on_rows = on.repeat(repeats)
        y_ref, h = reference.steer(x[rows], s_.W_enc, s_.b_enc, s_.W_dec, s_.b_dec, s_.harmful_mask,
                                   beta * on_rows, gamma * on_rows, tau, K)
        expected = x.clone()
        expected[rows] = y_ref
        assert torch.equal(st(x, call), expected), label
        state.clock.counter.add_(1)  # what the transformer's call hook does at each call
        (rec,) = handle.request_telemetry()[label]
        h_req = h.reshape(repeats, 3, -1).transpose(0, 1).reshape(3, -1)  # request i: its row of each half
        assert rec["active"] == [True, True, False]
        assert rec["gated_fraction"] == pytest.approx((h_req > per_row(REQ["tau"])[:, None]).float().mean(1).tolist(),
                                                      abs=1e-6)
        assert rec["mean_harm"] == pytest.approx(h_req.mean(1).tolist(), rel=1e-5, abs=1e-6)
        assert 0 < sum(rec["gated_fraction"]) < 3, "the gate must be open for some tokens and shut for others"
    assert torch.equal(handle._sites["transformer_blocks.0:image"][1](x, call)[:3], x[:3])


def test_t5_site_takes_one_request_per_prompt():
    pipe = flux_pipe(num_layers=1, num_single_layers=1, t5=True)
    enc = pipe.text_encoder_2
    ids = torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = enc(ids)[0]
    s = sae(3)
    handle = apply_safedig(pipe, SafeDIGConfig([SiteConfig("text_encoder_2", s, **SITE)]))
    handle.set_requests(**REQ, site="text_encoder_2")
    with torch.no_grad():
        got = enc(ids)[0]
    y_ref, _ = reference.steer(raw, s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.harmful_mask,
                               *(per_row(REQ[n]) for n in ("beta", "gamma", "tau")), K)
    assert torch.equal(got, y_ref) and not torch.equal(got, raw)
    with pytest.raises(RuntimeError, match=r"'text_encoder_2:text': 3 requests .* has 2"), torch.no_grad():
        enc(ids[:2])


# -- CFG in a pipeline -------------------------------------------------------------------------

def test_sd3_pipeline_cfg_batch_applies_each_request_to_both_halves():
    """3 prompts with CFG: the transformer's batch is 6 rows [uncond; cond]. Image i equals image
    i of a run with request i's values as the site values (cfg="both" steers row i of both
    halves); the cfg="cond" site leaves every uncond row untouched."""
    pipe = sd3_pipe()
    tr = pipe.transformer
    raw = add_hook(tr.transformer_blocks[0], Capture(), "raw")
    handle = apply_safedig(pipe, SafeDIGConfig([
        SiteConfig("transformer_blocks.0:both", sae(1), cfg="cond", **SITE),
        SiteConfig("transformer_blocks.1", sae(2), **SITE)]))
    out = add_outer(tr.transformer_blocks[0], Capture())
    handle.set_requests(**REQ)
    images = sd3_three_prompts(pipe)
    assert len(raw.calls) == STEPS and raw.calls[0][1].shape[0] == 6, "a CFG batch of 2 x 3 rows"
    for (rt, ri, _, _), (ot, oi, _, _) in zip(raw.calls, out.calls):
        assert torch.equal(ot[:3], rt[:3]) and torch.equal(oi[:3], ri[:3]), "cfg='cond': the uncond half is untouched"
    assert not torch.equal(out.calls[0][1][3:], raw.calls[0][1][3:])
    records = handle.request_telemetry()["transformer_blocks.1:image"]
    assert len(records) == STEPS and all(r["active"] == [True, True, True] for r in records)

    handle.clear_requests()
    for i in range(3):
        set_every_site(handle, **request(i))
        assert torch.equal(images[i], sd3_three_prompts(pipe)[i]), f"image {i}"

    # One prompt: the CFG batch has 2 rows, which 3 requests do not fit.
    handle.set_requests(**REQ)
    with pytest.raises(RuntimeError, match=r"'transformer_blocks.0:both': 3 requests .* 2 x 3 = 6 rows.* has 2"):
        sd3_three_prompts(pipe, prompts=1)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(beta=[0.5, 1.5, 0.2]), ValueError, r"set_requests\.beta\[1\] must lie in \[0, 1\]"),
    (dict(gamma=[0.0, 1.0, float("nan")]), ValueError, r"set_requests\.gamma\[2\] must be finite"),
    (dict(tau=[0.0, 1e39, 0.0]), ValueError, r"set_requests\.tau\[1\] must be finite"),
    (dict(beta=torch.tensor([0.5, float("nan"), 0.0])), ValueError, r"set_requests\.beta\[1\] must be finite"),
    (dict(tau=["0", 0.0, 0.0]), TypeError, r"set_requests\.tau\[0\] must be a float"),
    (dict(beta=[0.5, True, 0.0]), TypeError, r"set_requests\.beta\[1\] must be a float"),
    (dict(beta=[0.5] * 3, enabled=[True, 1, True]), TypeError, r"set_requests\.enabled\[1\] must be a bool"),
    (dict(beta=0.5), TypeError, r"set_requests\.beta must be a sequence or a 1-D tensor"),
    (dict(gamma=torch.zeros(3, 1)), ValueError, r"set_requests\.gamma must be 1-D"),
    (dict(beta=[0.5] * 3, gamma=[1.0] * 2), ValueError, r"same number.*'beta': 3, 'gamma': 2"),
    (dict(beta=[]), ValueError, "at least one"),
    (dict(), ValueError, "give beta, gamma, tau or enabled"),
    (dict(beta=[0.5] * 3, site="transformer_blocks.1"), ValueError, "no site"),
    (dict(beta=[0.5] * 3, site="transformer_blocks.0:both"), ValueError, "no site"),
    (dict(tau=[0.0, 0.0, -1.0]), ValueError, r"set_requests\.tau\[0\] at site 'single_transformer_blocks\.0:image'"
                                             r".*never opens"),
], ids=["beta-range", "gamma-nan", "tau-float32-inf", "tensor-nan", "tau-str", "beta-bool", "enabled-int",
        "not-a-sequence", "2-d", "lengths", "empty", "nothing", "unknown-site", "other-stream",
        "gate-never-opens"])
def test_set_requests_checks_everything_before_changing_anything(kwargs, exc, match):
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig([
        SiteConfig("transformer_blocks.0:text", sae(1), **SITE),
        # an empty harmful set (pure Blend with tau < 0): a request's tau >= 0 would shut its gate for good
        SiteConfig("single_transformer_blocks.0", sae(2), harmful=[], beta=0.5, tau=-1.0)]))
    handle.set_requests(beta=[0.1, 0.2, 0.3])
    before = {label: st.requests.clone() for label, (_, st) in handle._sites.items()}
    with pytest.raises(exc, match=match):
        handle.set_requests(**kwargs)
    for label, (_, st) in handle._sites.items():
        torch.testing.assert_close(st.requests, before[label], rtol=0, atol=0, equal_nan=True,
                                   msg=f"{label} changed by a refused call")


def test_a_batch_that_does_not_match_the_requests_raises_naming_site_and_sizes():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    handle = apply_safedig(pipe.transformer, SafeDIGConfig(flux_sites()))
    handle.set_requests(beta=[0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"site 'transformer_blocks\.0:text': 2 requests are set.* has 3"):
        run(pipe.transformer, batch=3)
    run(pipe.transformer, batch=2)
    # FLUX pipelines guide by separate calls, never by a [uncond; cond] batch: 4 rows are 4 other images.
    with pytest.raises(RuntimeError, match=r"2 requests are set.* must be 2 rows .*not a guided batch.* has 4"):
        run(pipe.transformer, batch=4)
    handle.clear_requests(site="transformer_blocks.0:text")
    with pytest.raises(RuntimeError, match=r"'single_transformer_blocks\.0:both': 2 requests"):
        run(pipe.transformer, batch=3)
    handle.clear_requests()
    run(pipe.transformer, batch=3)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.set_requests(beta=[0.5])


# -- torch.compile -----------------------------------------------------------------------------

def test_compiled_transformer_follows_request_changes_without_recompiling():
    pipe = flux_pipe(num_layers=1, num_single_layers=1)
    tr = pipe.transformer
    handle = apply_safedig(tr, SafeDIGConfig(flux_sites()))
    other = dict(beta=[1.0, 0.2, 0.0], gamma=[-1.0, 0.5, 3.0], tau=[0.0, 0.0, -1.0], enabled=[False, True, True])
    eager = {}
    for name, req in (("a", REQ), ("b", other)):
        handle.set_requests(**req)
        eager[name] = run(tr)
    assert (eager["a"] - eager["b"]).abs().amax(dim=(1, 2)).min() > 1e-3, "each request must change for the test"

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(tr, backend=counter, fullgraph=True)
    handle.set_requests(**REQ)
    addresses = {label: st.requests.data_ptr() for label, (_, st) in handle._sites.items()}
    torch.testing.assert_close(run(compiled), eager["a"], rtol=1e-5, atol=1e-5)
    frames = counter.frame_count  # the forward, and the transformer's call hook beside it
    assert frames <= 2
    handle.reset_telemetry()
    handle.set_requests(**other)
    torch.testing.assert_close(run(compiled), eager["b"], rtol=1e-5, atol=1e-5)
    handle.set_requests(**REQ)
    torch.testing.assert_close(run(compiled), eager["a"], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames, f"recompiled: {counter.frame_count} frames compiled, {frames} at first"
    assert addresses == {label: st.requests.data_ptr() for label, (_, st) in handle._sites.items()}, "written in place"
    for label, records in handle.request_telemetry().items():
        assert [r["active"] for r in records] == [[False, True, True], [True, True, True]], label
