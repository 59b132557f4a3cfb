"""The hooks that run SafeDIG inside a model: torch module hooks, each a small callable object.

- On the transformer, a forward pre-hook (`TransformerCallHook`) starts a call: schedule
  progress `p = 1 - sigma` from the `timestep` input, the telemetry row, whether the pipeline
  guides this call; a forward hook that always runs (`EndCallHook`, even when the forward
  raised) ends it, so a block that runs outside a forward of its transformer cannot steer with
  a stale timestep.
- On each steered block, a forward hook (`BlockSteerHook`) rewrites the chosen streams of its
  output (where diffusers' block metadata says they are).
- On a T5 encoder with a text site, a pre-hook starts its call and a forward hook
  (`TextEncoderSteerHook`) steers `last_hidden_state` once per prompt encoding.

Why torch's own module hooks and not diffusers' `HookRegistry`: a `HookRegistry` hook replaces
`module.forward` with a closure over the original module, so `copy.deepcopy` of a hooked model
runs the original's forward (weights and all), and removing a hook registered before another
one rewires the other's chain. Torch hooks are deep-copied with their module (a copy steers
with its own state) and removed by handle whatever else is installed. They run around whatever
`forward` diffusers' own hooks install, so steering sees a block's final output.

Gradient checkpointing re-runs a block during backward, after the transformer's forward
returned. A block run inside a forward with grad enabled leaves its `CallInfo` keyed by its
input tensor (`SteeringState.remember`); the recomputation finds it by that same input and steers
with the forward's timestep and values, recording no telemetry.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch

from .families import Family
from .requests import calling_pipeline, pipeline_guides
from .sites import BlockLayout, SiteSpec, call_timestep, hidden_states_of, read_stream, replace_streams
from .state import STATE_NAME, SiteSteering, SteeringState

__all__ = ["TransformerCallHook", "EndCallHook", "BlockSteerHook", "TextEncoderCallHook", "TextEncoderSteerHook",
           "RunCheck"]


class RunCheck:
    """What can only be seen once per pipeline run, checked at the run's first step, which the
    scheduler marks by not having stepped yet (`step_index` None). Runs in the transformer's eager
    pre-hook (not when the whole transformer is compiled: it is traced there); skipped while
    capturing a CUDA graph, and when the call is not a step of the pipeline's schedule (the
    transformer called on its own).

    - A switched-on site whose window holds none of the run's steps is refused: with 4 steps
      (progress 0, .25, .5, .75) a window (0.9, 0.95) would never steer, and the images would
      come out unsteered without a word. Over the steps the run takes (from `begin_index`, as
      img2img sets it); a window changed later in the run is the caller's choice. The scheduler's
      timesteps are sigma * num_train_timesteps; `SLACK` absorbs FLUX passing them in the model's
      dtype (bf16 moves progress by < 0.004), so the check only ever errs towards letting a call
      through. Copies the timesteps to the host once per run (one sync on CUDA).
    - Text-encoder sites that did not run since the previous run's first step are named in a
      warning: the pipeline was given `prompt_embeds`, which bypass the steered encoder.
    """

    SLACK = 0.01

    def __init__(self, pipeline, state: SteeringState, family: Family) -> None:
        self.pipeline = weakref.ref(pipeline)
        self.state = state
        self.family = family
        self._run: Optional[weakref.ref] = None     # the timesteps of the run seen last
        self._passed: Optional[tuple] = None         # (weakref to the timesteps, windows) last let through
        self._encodings = 0                          # text-encoder site calls counted at that run's start

    def __call__(self, timestep: torch.Tensor) -> None:
        pipeline = self.pipeline()
        scheduler = getattr(pipeline, "scheduler", None)
        ts = getattr(scheduler, "timesteps", None)
        if (not isinstance(ts, torch.Tensor) or ts.dim() != 1 or ts.numel() == 0
                or getattr(scheduler, "step_index", None) is not None):
            return
        if self._run is None or self._run() is not ts:
            self._run = weakref.ref(ts)
            self._check_encodings(pipeline)
        if self.family.knows_progress:
            self._check_windows(scheduler, ts, float(self.family.progress(timestep)))

    def _check_encodings(self, pipeline) -> None:
        names = self.state.text_encoder_sites
        if not names:
            return
        encoders = [getattr(pipeline, SiteSpec.parse(key).module, None) for key in names]
        states = [getattr(enc, "_modules", {}).get(STATE_NAME) for enc in encoders]
        encodings = sum(int(st.clock.counter) for st in states if isinstance(st, SteeringState))
        if encodings == self._encodings:
            warnings.warn(f"SafeDIG: the text-encoder sites {list(names)} steered nothing in this run: the pipeline "
                          f"was given prompt_embeds, which bypass the steered encoder. Encode the prompt with the "
                          f"hooked encoder (pipeline.encode_prompt) or pass the prompt as text.", stacklevel=2)
        self._encodings = encodings

    def _check_windows(self, scheduler, ts: torch.Tensor, now: float) -> None:
        windows = tuple((site.key, tuple(site.values[3:5])) for site in self.state.sites if site.values[5])
        if self._passed is not None and self._passed[0]() is ts and self._passed[1] == windows:
            return
        begin = getattr(scheduler, "begin_index", None) or 0
        scale = float(getattr(scheduler.config, "num_train_timesteps", 1000))
        steps = (1.0 - ts[begin:].detach().to("cpu", torch.float32) / scale).tolist()
        if windows and any(abs(now - p) <= self.SLACK for p in steps):
            for key, (lo, hi) in windows:
                if not any(p >= lo - self.SLACK and (p < hi + self.SLACK or hi >= 1.0) for p in steps):
                    shown = ", ".join(f"{p:.3g}" for p in steps[:12]) + (", ..." if len(steps) > 12 else "")
                    raise RuntimeError(f"SafeDIG site {key!r}: its window ({lo:.6g}, {hi:.6g}) holds none of this "
                                       f"run's {len(steps)} steps (schedule progress {shown}), so it would never "
                                       f"steer. Widen the window, use more steps, or switch the site off with "
                                       f"handle.set_site({key!r}, enabled=False)")
        self._passed = (weakref.ref(ts), windows)


class TransformerCallHook:
    """Forward pre-hook of the transformer: starts a call (module docstring)."""

    def __init__(self, state: SteeringState, family: Family, pipeline=None) -> None:
        self.state = state
        self.family = family
        self.pipeline = None if pipeline is None else weakref.ref(pipeline)  # a model copy never copies its pipeline
        self.run_check = RunCheck(pipeline, state, family) if pipeline is not None else None

    def __call__(self, module, args, kwargs) -> None:
        progress = None
        t = call_timestep(module, args, kwargs)
        if self.family.knows_progress:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SafeDIG needs the transformer's timestep as a tensor, got {type(t).__name__}")
            progress = self.family.progress(t)
        if self.run_check is not None and isinstance(t, torch.Tensor) and not _traced(t):
            self.run_check(t)
        self.state.begin(progress, self._guided(kwargs))

    def _guided(self, kwargs: dict) -> Optional[bool]:
        """Whether this call is a guided batch `[uncond; cond]` (`requests.py`): never for a family
        whose pipelines guide by separate calls or a guidance embedding; as the pipeline says for
        one that batches guidance; unknown otherwise."""
        if self.family.cfg == "separate":
            return False
        if not self.family.cfg.startswith("batched") or not self.family.reads_guidance:
            return None
        if torch.compiler.is_compiling():  # traced: no stack to read, so the pipeline passed to apply_safedig
            pipeline = self.pipeline() if self.pipeline is not None else None
        else:
            pipeline = calling_pipeline()  # None: the transformer called on its own
        return None if pipeline is None else pipeline_guides(pipeline, kwargs)


class EndCallHook:
    """Forward hook of a steered root that always runs, even when its forward raised."""

    def __init__(self, state: SteeringState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs, output):
        self.state.end()
        return None


class BlockSteerHook:
    """Forward hook of a block: steers the streams its sites name."""

    def __init__(self, state: SteeringState, sites: list[SiteSteering], layout: BlockLayout, name: str) -> None:
        self.state = state
        self.sites = sites
        self.layout = layout
        self.name = name

    def __call__(self, module, args, kwargs, output):
        call = self.state.call
        compiling = torch.compiler.is_compiling()
        if call is None:  # outside a forward of the transformer: a recomputation, or a stray call
            x_in = hidden_states_of(module, args, kwargs)
            call = self.state.recall(x_in) if isinstance(x_in, torch.Tensor) and not compiling else None
            if call is None:
                raise RuntimeError(f"SafeDIG block {self.name!r} ran outside a forward of its transformer, so there is "
                                   f"no timestep to place it in the window; call the transformer, not its blocks")
        elif torch.is_grad_enabled() and not compiling:
            x_in = hidden_states_of(module, args, kwargs)
            if isinstance(x_in, torch.Tensor):
                self.state.remember(x_in, call)
        layout, new = self.layout, {}
        for site in self.sites:
            if site.stream != "both":
                new[site.stream] = site(read_stream(output, layout, site.stream, site.key), call)
                continue
            text = new.get("text", read_stream(output, layout, "text", site.key))
            image = new.get("image", read_stream(output, layout, "image", site.key))
            y = site(torch.cat([text, image], dim=1), call)
            new["text"], new["image"] = y[:, : text.shape[1]], y[:, text.shape[1]:]
        return replace_streams(output, layout, new)


class TextEncoderCallHook:
    """Forward pre-hook of a T5 encoder with a text site: starts its call (no timestep)."""

    def __init__(self, state: SteeringState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs) -> None:
        self.state.begin(None, None)


class TextEncoderSteerHook:
    """Forward hook of a T5 encoder: steers `last_hidden_state` (output[0]) once per encoding."""

    def __init__(self, state: SteeringState, site: SiteSteering) -> None:
        self.state = state
        self.site = site

    def __call__(self, module, args, kwargs, output):
        call = self.state.call
        if isinstance(output, tuple):
            return (self.site(output[0], call),) + tuple(output[1:])
        output["last_hidden_state"] = self.site(output["last_hidden_state"], call)
        return output


def _traced(t: torch.Tensor) -> bool:
    """Whether host reads of `t` are impossible or would break a capture: compiled, exported, or a
    CUDA graph being captured."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())
