"""The tiny transformers of tests/_families.py, one per DiT family whose blocks diffusers registers
(``diffusers.hooks._helpers.TransformerBlockRegistry``), checked with plain torch hooks only:

- each builds, runs one forward on the CPU and returns a sample of the expected shape;
- the registered blocks are exactly the blocks of the stacks the family names, each called once;
- at the registry's ``return_hidden_states_index`` / ``return_encoder_hidden_states_index`` every block
  returns the stream the family describes (token count and width), and nothing more;
- each family's main pipeline, run around the tiny transformer, passes the timestep convention,
  classifier-free-guidance rows and ``cache_context`` names the family records.
"""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("diffusers")

from _families import FAMILIES, PIPE_PROMPTS, WIDTH  # noqa: E402
from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from diffusers.hooks._helpers import TransformerBlockRegistry  # noqa: E402
from diffusers.hooks.hooks import BaseState, StateManager  # noqa: E402

CPU, F32 = torch.device("cpu"), torch.float32

# Sample shape of one call_kwargs(batch) forward: a tensor, or a list of per-item tensors.
SAMPLES = {
    "flux": (2, 16, 4), "flux2": (2, 16, 4), "flux2_klein": (2, 16, 4), "sd3": (2, 4, 8, 8),
    "qwenimage": (2, 16, 16), "wan": (2, 4, 2, 8, 8), "wan_ti2v": (2, 4, 2, 8, 8),
    "hunyuanvideo": (2, 4, 2, 4, 4), "hunyuanvideo_token_replace": (2, 4, 2, 4, 4), "ltx": (2, 32, 4),
    "cogvideox": (2, 2, 4, 8, 8), "z_image": [(4, 1, 8, 8)] * 2, "hunyuanimage": (2, 4, 4, 4),
    "cogview4": (2, 4, 8, 8), "mochi": (2, 4, 2, 8, 8), "motif_video": (2, 4, 2, 4, 4), "bria": (2, 16, 4),
    "kandinsky5": (2, 2, 8, 8, 4), "cosmos3": [(1, 4, 2, 2, 3)], "pixart": (2, 8, 8, 8), "dit": (2, 8, 8, 8),
}

# diffusers 0.42.1 registers BriaTransformerBlock as (hidden at 0, no text stream), but the block
# returns (encoder_hidden_states, hidden_states), like FLUX's. Strict: passes once diffusers fixes it.
REGISTRY_WRONG = {"bria": "BriaTransformerBlock returns (text, image) but is registered with hidden index 0"}


def _family_params():
    params = []
    for name in FAMILIES:
        marks = [pytest.mark.xfail(reason=REGISTRY_WRONG[name], strict=True)] if name in REGISTRY_WRONG else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _registered(model):
    TransformerBlockRegistry._register()
    return {n: m for n, m in model.named_modules() if type(m) in TransformerBlockRegistry._registry}


def _batch(fam):
    return 2 if fam.batched else 1


@pytest.mark.parametrize("name", FAMILIES)
def test_the_registered_blocks_are_the_named_stacks(name):
    fam = FAMILIES[name]
    model = fam.build()
    assert type(model).__name__ == fam.transformer_class
    expected = set()
    for stack in fam.stacks:
        blocks = getattr(model, stack)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) >= 2, stack
        expected |= {f"{stack}.{i}" for i in range(len(blocks))}
    assert set(_registered(model)) == expected
    assert set(fam.streams) == set(fam.stacks)


@pytest.mark.parametrize("name", FAMILIES)
def test_builds_are_seeded(name):
    first, second = FAMILIES[name].build().state_dict(), FAMILIES[name].build().state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _sample(out):
    return out[0] if isinstance(out, tuple) else out


def _shape(sample):
    return [tuple(s.shape) for s in sample] if isinstance(sample, list) else tuple(sample.shape)


@pytest.mark.parametrize("name", _family_params())
def test_blocks_return_the_streams_the_registry_names(name):
    fam = FAMILIES[name]
    model = fam.build()
    blocks = _registered(model)
    outputs: dict[str, list] = {n: [] for n in blocks}
    for n, block in blocks.items():
        block.register_forward_hook(lambda mod, args, out, n=n: outputs[n].append(out))
    batch = _batch(fam)
    with torch.no_grad():
        sample = _sample(model(**fam.call_kwargs(batch, CPU, F32)))

    assert _shape(sample) == (SAMPLES[name] if isinstance(SAMPLES[name], list) else SAMPLES[name])
    for s in sample if isinstance(sample, list) else [sample]:
        assert torch.isfinite(s).all()

    for n, block in blocks.items():
        assert len(outputs[n]) == 1, f"{n} ran {len(outputs[n])} times in one forward"
        out = outputs[n][0]
        meta = TransformerBlockRegistry.get(type(block))
        stack, index = n.rsplit(".", 1)
        want = fam.streams[stack]
        hidden_tokens, text_tokens = want[int(index)] if isinstance(want, list) else want
        if isinstance(out, torch.Tensor):
            assert meta.return_hidden_states_index == 0 and meta.return_encoder_hidden_states_index is None, n
            hidden, text = out, None
        else:
            assert isinstance(out, tuple) and len(out) == 2, f"{n} returned {type(out).__name__} of {len(out)}"
            hidden = out[meta.return_hidden_states_index]
            e = meta.return_encoder_hidden_states_index
            text = None if e is None else out[e]
        lead = (batch,) if fam.batched else ()
        assert isinstance(hidden, torch.Tensor) and hidden.shape == (*lead, hidden_tokens, WIDTH), (n, hidden.shape)
        if text_tokens is None:
            assert text is None, f"{n}: the registry names a text stream the family says is absent"
        else:
            width = fam.text_width if hidden_tokens != text_tokens else WIDTH
            assert isinstance(text, torch.Tensor) and text.shape == (*lead, text_tokens, width), (n, getattr(
                text, "shape", None))


def test_sd3_last_block_returns_no_text_and_mochi_last_block_returns_its_text_input():
    """The two context_pre_only blocks: a hook steering the text stream there finds None (SD3) or the
    very tensor the block was given (Mochi), which is the previous block's output."""
    seen = {}
    for name in ("sd3", "mochi"):
        fam = FAMILIES[name]
        model = fam.build()
        last = model.transformer_blocks[-1]
        last.register_forward_hook(lambda mod, args, kwargs, out, name=name: seen.__setitem__(
            name, (kwargs["encoder_hidden_states"], out)), with_kwargs=True)
        with torch.no_grad():
            model(**fam.call_kwargs(2, CPU, F32))
    assert seen["sd3"][1][0] is None
    text_in, (_, text_out) = seen["mochi"]
    assert text_out is text_in


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_progress_reads_the_timestep_the_call_was_built_at(name, p):
    fam = FAMILIES[name]
    ts = fam.call_kwargs(_batch(fam), CPU, F32, p=p)[fam.timestep_arg]
    got = fam.progress(ts)
    if name == "wan_ti2v":                      # the clean first frame's tokens sit at p = 1
        got = got[:, got.shape[1] // 2:]
    tol = 1e-3 if fam.discrete_timesteps else 1e-6
    torch.testing.assert_close(got, torch.full_like(got, p), atol=tol, rtol=0)


class _NoState(BaseState):
    def reset(self, *args, **kwargs):
        pass


class _CallLog(ModelHook):
    """Records each transformer call: its cache_context name, timestep and which prompt rows it carries."""
    _is_stateful = True

    def __init__(self, fam, case):
        super().__init__()
        self.state = StateManager(_NoState)
        self.fam, self.case, self.calls = fam, case, []

    def reset_state(self, module):
        return module

    def _row(self, value):
        for tag, rows in (("c", self.case.cond), ("u", self.case.uncond)):
            if rows is not None and any(r.shape == value.shape and torch.equal(r, value) for r in rows):
                return tag
        return "?"

    def pre_forward(self, module, *args, **kwargs):
        bound = dict(zip(list(inspect.signature(type(module).forward).parameters)[1:], args), **kwargs)
        try:
            context = self.state.context.name
        except ValueError:
            context = None
        rows = "".join(self._row(v) for v in bound[self.case.text_arg])
        self.calls.append((context, rows, torch.as_tensor(bound[self.fam.timestep_arg]).clone()))
        return args, kwargs


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.pipeline is not None])
def test_the_pipeline_calls_the_transformer_as_the_family_says(name):
    fam = FAMILIES[name]
    case = fam.pipeline()
    case.pipe.set_progress_bar_config(disable=True)
    log = _CallLog(fam, case)
    HookRegistry.check_if_exists_or_initialize(case.pipe.transformer).register_hook(log, "families_call_log")
    with torch.no_grad():
        case.pipe(**case.kwargs)

    if case.uncond is None:
        per_step = ["c" * PIPE_PROMPTS]
    elif fam.cfg in ("uncond_cond", "cond_uncond"):
        first, second = fam.cfg.split("_")
        per_step = [first[0] * PIPE_PROMPTS + second[0] * PIPE_PROMPTS]
    else:                                       # separate calls, or true CFG of a distilled model
        per_step = ["c" * PIPE_PROMPTS, "u" * PIPE_PROMPTS]
    scheduler = case.pipe.scheduler
    steps = len(scheduler.timesteps)
    contexts = list(fam.cache_contexts[: len(per_step)]) or [None] * len(per_step)
    assert [(c, r) for c, r, _ in log.calls] == list(zip(contexts, per_step)) * steps

    for k, (_, _, ts) in enumerate(log.calls):
        step = k // len(per_step)
        p = fam.progress(ts)
        t = float(scheduler.timesteps[step])
        if fam.discrete_timesteps:
            assert not ts.is_floating_point()
            expected = 1.0 - t / 1000.0
        else:
            sigma = float(scheduler.sigmas[step])
            if scheduler.config.get("invert_sigmas", False):    # Mochi: the scheduler holds 1 - noise level
                sigma = 1.0 - sigma
            expected = 1.0 - sigma
            if name == "cogview4":              # t is unshifted: progress read from it is not 1 - sigma
                if step == 1:
                    assert abs((1.0 - t / 1000.0) - expected) > 0.05
                expected = 1.0 - t / 1000.0
        torch.testing.assert_close(p, torch.full_like(p, expected), atol=1e-5, rtol=0)
