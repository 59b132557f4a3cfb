"""SafeDIG steering at run time, on diffusers' hooks: the clock, per-site state, the hooks,
the handle, and `apply_safedig` / `remove_safedig` / `check_config`.

How it runs, and why it needs no recompilation:

- One `ModelHook` per hooked block (`post_forward` rewrites the chosen output streams), one on
  each hooked text encoder, and a "clock" hook on the transformer whose `pre_forward` turns the
  `timestep` input into schedule progress `p = 1 - sigma` (a 0-d device tensor: 0 at pure noise,
  1 at the clean image) and whose `post_forward` advances the telemetry row.
- Everything a user may change after applying (strengths, threshold, harmful mask, window,
  on/off) is a device tensor changed in place. Window and switch are folded into the strengths
  on the device: `beta_eff = beta * on * in_window(p)`, likewise gamma; out of the window both
  are 0, and the op returns `x` bitwise. So a step out of the window still pays for the encoder
  GEMM; `remove_safedig` is what removes the cost.
- The folded encoder bias `b_enc - b_dec @ W_enc` is checked against the SAE weights once per
  transformer call by the clock's `pre_forward`, which runs eagerly even when the blocks are
  compiled (`compile_repeated_blocks`); compiled blocks read that buffer instead of redoing the
  GEMV. A transformer compiled whole traces the clock too, so there each site call folds it.
- Telemetry rows are written with `index_copy_` at a device-side call counter: no host sync
  inside a step. `handle.telemetry()` is the only place that reads them back.
- SAEs and state follow the hooked module's `.to()` (the module's `_apply` is wrapped), so
  applying before `pipe.to("cuda")` works.
- A pipeline run whose schedule has no step inside a switched-on site's window is refused at
  its first step (`_ScheduleCheck`; eager or regionally compiled transformers): such a site
  would never steer.

CFG: SD3 pipelines batch `[uncond; cond]`; `cfg="cond"` steers only the second half. Which
calls carry such a batch is read in Python when the pipeline encodes its prompt
(`sites.pipeline_batches_cfg`), outside any compiled region; the extra skip-layer-guidance call
(`skip_layers=...`) is cond-only. FLUX pipelines never batch CFG, so `cfg="cond"` is refused there.

Per-request control (`SafeDIGHandle.set_requests`): a site may also hold one column per request
of the batch (beta, gamma, tau, enabled), a static fp32 `[4, B]` buffer changed in place; the
site then passes the op one strength per batch row (`[x.shape[0]]` tensors), repeated over both
halves of a CFG batch, and records per-request telemetry next to its per-call row.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..._checks import strength
from ..._settings import read_settings, write_setting, write_settings
from ...ops import as_harmful_mask
from ...sae import TopKSAE
from .config import (
    SafeDIGConfig,
    SiteConfig,
    check_gate_can_open,
    check_sae_site,
    check_strengths,
    check_window,
    resolve_sae,
)
from .sites import (
    ModelSpec,
    ResolvedSite,
    SiteSpec,
    block_streams,
    call_timestep,
    conditional_start,
    model_spec,
    pipeline_batches_cfg,
    resolve_site,
    site_labels,
    split_target,
    timestep_index,
)

__all__ = ["SafeDIGHandle", "apply_safedig", "remove_safedig", "check_config"]

_STEER_HOOK = "safedig_steer"
_CLOCK_HOOK = "safedig_clock"
_HANDLE_ATTR = "_safedig_handle"
# Telemetry columns, per site and call: row written?, schedule progress, steering active
# (in window, switched on, a non-zero strength), fraction of tokens with h > tau, mean finite h.
_TELEMETRY_COLUMNS = ("written", "progress", "active", "gated_fraction", "mean_harm")
# Per-request telemetry rows, per site and call, one column per request: the same quantities
# over that request's rows of the steered batch.
_REQUEST_TELEMETRY_ROWS = ("written", "active", "gated_fraction", "mean_harm")
# Rows of a site's per-request buffer; a NaN strength means "this site's own value", so a later
# set_site still reaches the requests that left it unset.
_REQUEST_ROWS = ("beta", "gamma", "tau", "enabled")


def _module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError(f"{type(module).__name__} has no floating-point parameters to take device and dtype from")


def _sae_on(sae: TopKSAE, device: torch.device, dtype: torch.dtype) -> TopKSAE:
    """`sae` itself when already placed, else a copy on (device, dtype); the caller's SAE is never moved."""
    if sae.device == device and sae.dtype == dtype:
        return sae
    tensors = (t.detach().to(device=device, dtype=dtype) for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    # activation_scale is already folded into the weights; metadata keeps the record of it.
    return TopKSAE(*tensors, k=sae.k, metadata=sae.metadata)


def _static(t: torch.Tensor) -> torch.Tensor:
    # Tensors that live across calls and are mutated in place: static addresses keep CUDA-graph
    # capture (mode="reduce-overhead") from copying them in or refusing the mutation. No guard,
    # so sites whose state differs only by values share a compiled graph.
    torch._dynamo.mark_static_address(t, guard=False)
    return t


def _static_sae(sae: TopKSAE) -> TopKSAE:
    # Without this, CUDA graphs would copy the weights into graph-owned buffers on every replay.
    for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        _static(t)
    return sae


# -- runtime state -----------------------------------------------------------------------

class _Clock:
    """Per hooked root module (the transformer, or one text encoder): the device-side call
    counter that indexes telemetry rows, and for the transformer the current progress."""

    def __init__(self, device: torch.device, uses_progress: bool) -> None:
        self.counter = _static(torch.zeros((), dtype=torch.int64, device=device))
        self.uses_progress = uses_progress
        self.progress: Optional[torch.Tensor] = None  # set by the transformer's pre_forward
        self.cfg_batch = False    # set from the pipeline when it encodes its prompt (host side)
        self.cfg_halves = False   # this call's batch is [uncond; cond]
        self.sites: list["_SiteState"] = []
        self.bias_fresh = False   # the sites' folded encoder biases were checked eagerly this call

    def place(self, device: torch.device) -> None:
        if self.counter.device != device:
            self.counter = _static(self.counter.to(device))


class _SiteState:
    """One SiteConfig at run time: its SAE and the device tensors the handle changes in place.

    Strengths, threshold, window and switch live in one float32 buffer, `values` =
    [beta, gamma, tau, window start, window end, switch], written with one copy (`write`): a
    steering call on another thread sees a `set_site` whole or not at all (on CUDA, when both
    use one stream; on the CPU each call copies `values` and the mask once, at its start, under the lock
    `write` takes: `_settings`).

    `requests` (None, or fp32 `[4, B]`: `_REQUEST_ROWS`) holds per-request values the same way:
    written with one copy, read with `values` and the mask in the call's one read."""

    def __init__(self, label: str, cfg: SiteConfig, site: ResolvedSite, sae: TopKSAE, clock: _Clock,
                 harmful: torch.Tensor, fused: bool, capacity: Optional[int]) -> None:
        self.label = label
        self.cfg = cfg            # resolved: harmful, strengths and window hold the values in use
        self.site = site
        self.sae = _static_sae(sae)
        self.clock = clock
        self.fused = fused
        self.site_on = True
        dev = sae.device
        f32 = dict(dtype=torch.float32, device=dev)
        self.harmful = _static(harmful)
        self.switch_on = True
        self.values = _static(torch.tensor(self._row(), **f32))
        self.telemetry = None if capacity is None else _static(torch.zeros(capacity, len(_TELEMETRY_COLUMNS), **f32))
        self.requests: Optional[torch.Tensor] = None
        self.request_telemetry: Optional[torch.Tensor] = None  # [capacity, 4, B]: _REQUEST_TELEMETRY_ROWS
        self.enc_bias: Optional[torch.Tensor] = None  # fp32 [F]: b_enc - b_dec @ W_enc, see refresh_bias
        self._enc_bias_src: Optional[torch.Tensor] = None

    # host side -------------------------------------------------------------------------
    def _row(self) -> list[float]:
        c = self.cfg
        return [c.beta, c.gamma, c.tau, c.window[0], c.window[1], 1.0 if self.switch_on else 0.0]

    def write(self, harmful: Optional[torch.Tensor] = None) -> None:
        """Copy `cfg` (checked) and the switch into `values`, all in one copy, and a new
        harmful mask with it: a steering call sees the whole update or none of it."""
        row = (self.values, torch.tensor(self._row(), dtype=torch.float32))
        write_settings(row, *([(self.harmful, harmful)] if harmful is not None else []))

    def set_requests(self, table: torch.Tensor) -> None:
        """Write the checked per-request table (CPU fp32 `[4, B]`) with one copy; a new buffer
        (and telemetry buffer) only when B changes, so compiled graphs keep their addresses."""
        n = table.shape[1]
        if self.telemetry is not None and (self.request_telemetry is None or self.request_telemetry.shape[-1] != n):
            capacity = self.telemetry.shape[0]
            self.request_telemetry = _static(torch.zeros(capacity, len(_REQUEST_TELEMETRY_ROWS), n,
                                                         dtype=torch.float32, device=self.values.device))
        if self.requests is None or self.requests.shape != table.shape:
            self.requests = _static(table.to(self.values.device))  # whole before any call can see it
        else:
            write_setting(self.requests, table)

    @property
    def beta(self) -> torch.Tensor:
        return self.values[0]

    @property
    def gamma(self) -> torch.Tensor:
        return self.values[1]

    @property
    def tau(self) -> torch.Tensor:
        return self.values[2]

    def place(self, device: torch.device, dtype: torch.dtype, moved: dict) -> None:
        key = (id(self.sae), device, dtype)
        if key not in moved:
            moved[key] = _sae_on(self.sae, device, dtype)
        self.sae = _static_sae(moved[key])
        self._enc_bias_src = None  # rebuilt on the new device by the next refresh_bias
        for name in ("harmful", "values", "telemetry", "requests", "request_telemetry"):
            t = getattr(self, name)
            if t is not None and t.device != device:
                setattr(self, name, _static(t.to(device)))

    def refresh_bias(self) -> None:
        """Eager, once per transformer call: bring `enc_bias` up to date with the SAE's weights.

        The SAE's own cache (`TopKSAE.enc_bias`) recomputes only when a weight changed, a check
        on data pointers and version counters that torch.compile cannot trace; so compiled
        blocks read this buffer instead, checked here before they run, rather than redo the
        GEMV `b_dec @ W_enc` per call (0.11 ms at the FLUX 4x shape on an H200). One buffer,
        updated in place: compiled graphs and CUDA graphs keep reading the same address."""
        src = self.sae.enc_bias()
        if src is self._enc_bias_src:
            return
        if self.enc_bias is None or self.enc_bias.shape != src.shape or self.enc_bias.device != src.device:
            self.enc_bias = _static(src.clone())
        else:
            self.enc_bias.copy_(src)
        self._enc_bias_src = src

    # traced (eager or under torch.compile) ----------------------------------------------
    def steer(self, x: torch.Tensor) -> torch.Tensor:
        """Steer `x` `[B, T, d]` (any strides); returns a tensor of x's shape and dtype."""
        sae = self.sae
        if x.device != sae.device or x.dtype != sae.dtype:
            raise RuntimeError(f"SafeDIG site {self.label!r}: activations are {x.dtype} on {x.device} but the SAE "
                               f"is {sae.dtype} on {sae.device}; move the pipeline with .to() so the SAEs follow")
        clock = self.clock
        request_buffer = self.requests  # read once: clear_requests on another thread may set it to None
        buffers = (self.values, self.harmful) + (() if request_buffer is None else (request_buffer,))
        values, harmful, *requests = read_settings(*buffers)  # one read of every setting (class docstring)
        beta, gamma, tau, lo, hi, s = values.unbind()
        if clock.uses_progress:
            p = clock.progress
            if p is None:
                raise RuntimeError(f"SafeDIG site {self.label!r} ran outside a forward of its transformer, "
                                   f"so there is no timestep to place it in the window")
            in_window = (p >= lo) & ((p < hi) | (hi >= 1.0))
            s = s * in_window.to(torch.float32)
        else:
            p = torch.full((), float("nan"), dtype=torch.float32, device=x.device)

        half = conditional_start(x.shape[0], self.cfg.cfg == "cond" and clock.cfg_halves, self.label)
        xs = x[half:] if half else x
        if requests:
            beta, gamma, request_tau, active = self._per_request(requests[0], x.shape[0], beta, gamma, tau, s)
            repeats = xs.shape[0] // active.shape[0]  # 2: both halves of a CFG batch are steered
            beta, gamma, tau = (t.repeat(repeats) for t in (beta, gamma, request_tau))
        else:
            beta, gamma = beta * s, gamma * s
            active = s * ((beta != 0) | (gamma != 0)).to(torch.float32)
        # bias_fresh: the clock checked the SAE weights eagerly at the start of this call;
        # otherwise (None) the SAE uses its own cache.
        enc_bias = self.enc_bias if self.fused and clock.bias_fresh else None
        y, h = sae.steer(xs, beta=beta, gamma=gamma, tau=tau, harmful=harmful, enc_bias=enc_bias,
                         fused=self.fused)
        if self.telemetry is not None:
            self._record(h, p, tau, active.amax())  # with requests: active when any request is
            if requests:
                self._record_requests(h, request_tau, active)
        return torch.cat([x[:half], y], dim=0) if half else y

    def _per_request(self, requests: torch.Tensor, batch: int, beta: torch.Tensor, gamma: torch.Tensor,
                     tau: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-request `[B]` beta, gamma (switch, window and enabled folded in), tau, and active,
        for a call whose batch has `batch` rows: B, or 2B when it is a CFG batch [uncond; cond]."""
        n = requests.shape[1]
        cfg_doubled = self.clock.cfg_halves
        if batch != (2 * n if cfg_doubled else n):
            cfg = f"a CFG batch [uncond; cond] of 2 x {n} rows" if cfg_doubled else f"{n} rows"
            raise RuntimeError(f"SafeDIG site {self.label!r}: {n} requests are set (set_requests), so the batch "
                               f"must be {cfg}, but it has {batch}; set one value per image this call generates "
                               f"(prompts x num_images_per_prompt), or clear_requests()")
        req_beta, req_gamma, req_tau, enabled = requests.unbind()
        on = s * enabled
        beta = torch.where(torch.isnan(req_beta), beta, req_beta) * on
        gamma = torch.where(torch.isnan(req_gamma), gamma, req_gamma) * on
        tau = torch.where(torch.isnan(req_tau), tau, req_tau)
        return beta, gamma, tau, on * ((beta != 0) | (gamma != 0)).to(torch.float32)

    def _row_index(self) -> torch.Tensor:
        return self.clock.counter.clamp(max=self.telemetry.shape[0] - 1).view(1)

    def _record(self, h: torch.Tensor, p: torch.Tensor, tau: torch.Tensor, active: torch.Tensor) -> None:
        # tau: 0-d, or one per batch row of h [rows, T]
        gated, mean_h = _gate_stats(h.flatten(), tau if tau.dim() == 0 else tau.view(-1, 1).expand_as(h).flatten())
        row = torch.stack([torch.ones_like(p), p.to(torch.float32), active, gated, mean_h])
        self.telemetry.index_copy_(0, self._row_index(), row.view(1, -1))

    def _record_requests(self, h: torch.Tensor, tau: torch.Tensor, active: torch.Tensor) -> None:
        n = tau.shape[0]
        buffer = self.request_telemetry
        if buffer is None or buffer.shape[-1] != n:  # a set_requests with a new B on another thread
            return
        # h [repeats * n, T], rows [half 0 requests; half 1 requests]: one row of tokens per request
        per_request = h.reshape(-1, n, h.shape[-1]).transpose(0, 1).reshape(n, -1)
        gated, mean_h = _gate_stats(per_request, tau.view(n, 1))
        row = torch.stack([torch.ones_like(active), active, gated, mean_h])
        buffer.index_copy_(0, self._row_index(), row.unsqueeze(0))


def _gate_stats(h: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the last dim of `h`: the fraction with h > tau (a NaN h, a non-finite token, is never
    gated) and the mean of the finite h."""
    finite = torch.isfinite(h)
    mean_h = torch.where(finite, h, 0.0).sum(-1) / finite.sum(-1).clamp_min(1)
    return (h > tau).to(torch.float32).mean(-1), mean_h


# -- hooks -------------------------------------------------------------------------------

class _ScheduleCheck:
    """Refuse a pipeline run none of whose steps falls inside a switched-on site's window: with
    4 steps (progress 0, .25, .5, .75) a window (0.9, 0.95) would never steer, and the images
    would come out unsteered without a word.

    Runs in the clock's eager `pre_forward` (not when the whole transformer is compiled: it is
    traced there) at a run's first step, which the scheduler marks by not having stepped yet
    (`step_index` None), over the steps the run takes (from `begin_index`, as img2img sets
    it); a window changed later in the run is the caller's choice. It copies the timesteps to
    the host once per run (one sync on CUDA). Skipped while capturing a CUDA graph, and when
    the call is not a step of that schedule (the transformer called on its own). Both
    pipelines hand the scheduler's timesteps t (sigma * 1000) to the transformer so that
    progress is 1 - t / 1000; `SLACK` absorbs FLUX passing them in the model's dtype (bf16
    moves progress by < 0.004), so the check only ever errs towards letting a call through."""

    SLACK = 0.01

    def __init__(self, pipeline, clock: _Clock) -> None:
        self.pipeline = pipeline
        self.clock = clock
        self._passed: Optional[tuple] = None  # (weakref to the timesteps, windows) last let through

    def __call__(self, t: torch.Tensor, spec: ModelSpec) -> None:
        if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        scheduler = getattr(self.pipeline, "scheduler", None)
        ts = getattr(scheduler, "timesteps", None)
        if (not isinstance(ts, torch.Tensor) or ts.dim() != 1 or ts.numel() == 0
                or getattr(scheduler, "step_index", None) is not None):
            return
        windows = tuple((st.label, tuple(st.cfg.window)) for st in self.clock.sites if st.switch_on)
        if self._passed is not None and self._passed[0]() is ts and self._passed[1] == windows:
            return
        begin = getattr(scheduler, "begin_index", None) or 0
        steps = (1.0 - ts[begin:].detach().to("cpu", torch.float32) / 1000.0).tolist()
        now = float(spec.progress(t))
        if windows and any(abs(now - p) <= self.SLACK for p in steps):
            for label, (lo, hi) in windows:
                if not any(p >= lo - self.SLACK and (p < hi + self.SLACK or hi >= 1.0) for p in steps):
                    shown = ", ".join(f"{p:.3g}" for p in steps[:12]) + (", ..." if len(steps) > 12 else "")
                    raise RuntimeError(f"SafeDIG site {label!r}: its window ({lo}, {hi}) holds none of this "
                                       f"run's {len(steps)} steps (schedule progress {shown}), so it would never "
                                       f"steer. Widen the window, use more steps, or switch the site off with "
                                       f"handle.set_site({label!r}, enabled=False)")
        self._passed = (weakref.ref(ts), windows)


class _ClockHook(ModelHook):
    """On the transformer: schedule progress from `timestep` before the blocks run; advance the
    telemetry row after. The call itself runs in `new_forward`, which clears the progress even
    when the transformer raises: a block called later, outside a forward of its transformer,
    then refuses to steer rather than steer with a stale timestep."""

    def __init__(self, clock: _Clock, spec: ModelSpec, timestep_index: int,
                 schedule: Optional[_ScheduleCheck] = None) -> None:
        super().__init__()
        self.clock = clock
        self.spec = spec
        self.index = timestep_index
        self.schedule = schedule

    def pre_forward(self, module, *args, **kwargs):
        t = call_timestep(args, kwargs, self.index)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"SafeDIG needs the transformer's timestep as a tensor, got {type(t).__name__}")
        if self.schedule is not None:
            self.schedule(t, self.spec)
        self.clock.progress = self.spec.progress(t)
        self.clock.cfg_halves = self.clock.cfg_batch and kwargs.get("skip_layers") is None
        if not torch.compiler.is_compiling():
            # Eager here even when the blocks are compiled (compile_repeated_blocks): check each
            # SAE's weights once per call so the compiled blocks can take the cached bias. When
            # the whole transformer is compiled this is traced, and the sites compute the bias.
            for st in self.clock.sites:
                if st.fused:
                    st.refresh_bias()
            self.clock.bias_fresh = True
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.clock.progress = None
            self.clock.bias_fresh = False

    def post_forward(self, module, output):
        self.clock.counter.add_(1)
        return output


class _BlockSteerHook(ModelHook):
    """On a transformer block returning `(encoder_hidden_states, hidden_states)` (diffusers >= 0.35)."""

    def __init__(self, states: list[_SiteState]) -> None:
        super().__init__()
        self.states = states

    def post_forward(self, module, output):
        text, image = block_streams(output, type(module).__name__)
        for st in self.states:
            stream = st.cfg.stream
            if stream == "image":
                image = st.steer(image)
            elif stream == "text":
                text = st.steer(text)
            else:
                n_text = text.shape[1]
                y = st.steer(torch.cat([text, image], dim=1))
                text, image = y[:, :n_text], y[:, n_text:]
        return (text, image)


class _TextEncoderSteerHook(ModelHook):
    """On a T5 encoder: steers `last_hidden_state` (output[0]) once per prompt encoding."""

    def __init__(self, state: _SiteState) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        if isinstance(output, tuple):
            output = (self.state.steer(output[0]),) + tuple(output[1:])
        else:
            output["last_hidden_state"] = self.state.steer(output["last_hidden_state"])
        self.state.clock.counter.add_(1)
        return output


# -- handle ------------------------------------------------------------------------------

class SafeDIGHandle:
    """Returned by `apply_safedig`: changes settings in place and reads telemetry.

    Sites are named by their `SiteConfig.site`; a block with two SiteConfigs (one per stream)
    has labels `"{site}:{stream}"` and `set_site` needs `stream=` to pick one.

    Every setter writes each site's settings with one copy into a buffer that compiled graphs
    keep reading (no recompile, no re-hook); a steering call reads each site's buffers once, so
    it sees each `set_site` / `set_requests` whole or not at all (per site; on CUDA when the
    setter and the pipeline share one stream). Per-request control: `set_requests`.
    """

    def __init__(self, transformer: torch.nn.Module, pipeline, config: SafeDIGConfig) -> None:
        self._transformer = transformer
        self._pipeline = pipeline
        self._config = config
        self._enabled = config.enabled
        self._states: dict[str, _SiteState] = {}
        self._hooked: list[torch.nn.Module] = []
        self._clocks: dict[int, _Clock] = {}
        self._follow: list[torch.nn.Module] = []
        self._encode_prompt_wrapped = False
        self._removed = False

    # settings ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._states)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _live(self) -> None:
        if self._removed:
            raise RuntimeError("this SafeDIG handle was removed (remove_safedig); its settings no longer reach any "
                               "model: apply_safedig again and use the new handle")

    def enable(self) -> None:
        """Turn steering on at every site (site-level switches still apply). No recompile."""
        self._live()
        self._enabled = True
        self._sync_switches()

    def disable(self) -> None:
        """Outputs become bitwise those of the unhooked model; the steering compute still runs
        (the switch is a device tensor). `remove_safedig` removes the cost too."""
        self._live()
        self._enabled = False
        self._sync_switches()

    def set_site(self, site: str, *, stream: Optional[str] = None, beta: Optional[float] = None,
                 gamma: Optional[float] = None, tau: Optional[float] = None,
                 harmful: Union[Sequence[int], torch.Tensor, None] = None,
                 window: Optional[tuple[float, float]] = None, enabled: Optional[bool] = None) -> None:
        """Change one site in place: no recompile, no re-hook. `None` leaves a value as is.

        `stream` selects among two SiteConfigs on one block; it cannot change a site's stream.
        `harmful` takes feature ids or a bool mask `[F]`.
        """
        self._live()
        st = self._state(site, stream)
        where = f"set_site({site!r})"
        check_strengths(where, beta, gamma, tau)
        if window is not None:
            window = check_window(window, f"{where}.window")
            if not st.clock.uses_progress and window != (0.0, 1.0):
                raise ValueError(f"{where}.window: text-encoder sites run once per prompt; the window must be (0, 1)")
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"{where}.enabled must be a bool, got {enabled!r}")
        mask = None
        if harmful is not None:
            mask = as_harmful_mask(harmful, st.sae.num_features, st.harmful.device, f"{where}.harmful")
        n_harmful = int(mask.sum()) if mask is not None else len(st.cfg.harmful)
        check_gate_can_open(where, n_harmful, st.cfg.tau if tau is None else tau)
        # All checks passed: apply, each buffer with one copy.
        cfg = dataclasses.replace(st.cfg)
        for name, v in (("beta", beta), ("gamma", gamma), ("tau", tau)):
            if v is not None:
                setattr(cfg, name, float(v))
        if window is not None:
            cfg.window = window
        if mask is not None:
            cfg.harmful = mask.nonzero().flatten().tolist()
        if enabled is not None:
            st.site_on = enabled
        st.cfg = cfg
        st.switch_on = self._enabled and st.site_on
        st.write(harmful=mask)

    def set_requests(self, *, beta=None, gamma=None, tau=None, enabled=None, site: Optional[str] = None,
                     stream: Optional[str] = None) -> None:
        """Per-request strengths, threshold and on/off for a batch that mixes requests.

        Each given argument holds one entry per request, i.e. per image the pipeline call
        generates (its batch of prompts x `num_images_per_prompt`), as a sequence or 1-D tensor:
        `beta`, `gamma`, `tau` numbers (the one strength rule, `_checks.strength`), `enabled`
        bools (a disabled request is steered nowhere: beta = gamma = 0 for it). An argument left
        None uses each site's own value, which `set_site` may still change. `site=None` sets
        every site, else the one named as in `set_site`. Each call replaces the requests of the
        sites it sets; everything is checked before anything changes.

        CFG: when the transformer's batch is `[uncond; cond]` (SD3 with guidance), it has 2B
        rows and request i applies to row i of both halves; with `cfg="cond"` only the cond half
        is steered, with the same B values. Any other batch size raises a RuntimeError at the
        call (a text-encoder site sees one row per prompt: set it with `site=` when
        `num_images_per_prompt > 1`). A bare transformer has no CFG flag: give one request per
        row of its batch.

        Values are written in place into a static fp32 `[4, B]` buffer per site (a new one only
        when B changes): changing them never recompiles a compiled transformer. The first call
        with requests compiles a second graph, once (`clear_requests` goes back to the first);
        a new B comes with a new batch size, which torch.compile treats as any batch change.
        Telemetry per request: `request_telemetry()`."""
        self._live()
        states = self._targets(site, stream, "set_requests")
        given = zip(_REQUEST_ROWS, (beta, gamma, tau, enabled))
        columns = {name: _request_column(value, name) for name, value in given if value is not None}
        if not columns:
            raise ValueError("set_requests: give beta, gamma, tau or enabled, one entry per request "
                             "(clear_requests() returns to the sites' own values)")
        lengths = {name: len(column) for name, column in columns.items()}
        n = next(iter(lengths.values()))
        if n == 0 or any(length != n for length in lengths.values()):
            raise ValueError(f"set_requests: every argument needs one entry per request, the same number for each "
                             f"and at least one, got lengths {lengths}")
        for st in states:
            for i, t in enumerate(columns.get("tau", ())):
                check_gate_can_open(f"set_requests.tau[{i}] at site {st.label!r}", len(st.cfg.harmful), t)
        # All checks passed. NaN: the site's own value (see _REQUEST_ROWS); every request on unless said.
        table = torch.full((len(_REQUEST_ROWS), n), float("nan"), dtype=torch.float32)
        table[_REQUEST_ROWS.index("enabled")] = 1.0
        for row, name in enumerate(_REQUEST_ROWS):
            if name in columns:
                table[row] = torch.tensor(columns[name], dtype=torch.float32)
        for st in states:
            st.set_requests(table)

    def clear_requests(self, site: Optional[str] = None, stream: Optional[str] = None) -> None:
        """Back to each site's own values (every site, or the one named). Per-request telemetry
        recorded so far stays readable until `reset_telemetry`."""
        self._live()
        for st in self._targets(site, stream, "clear_requests"):
            st.requests = None

    def config(self) -> SafeDIGConfig:
        """The settings in use now (SAEs as given to `apply_safedig`)."""
        sites = [dataclasses.replace(st.cfg, harmful=list(st.cfg.harmful)) for st in self._states.values()]
        for st, original in zip(sites, self._config.sites):
            st.sae = original.sae
        return dataclasses.replace(self._config, sites=sites, enabled=self._enabled)

    # telemetry --------------------------------------------------------------------------
    def telemetry(self) -> dict[str, list[dict[str, Any]]]:
        """Per site, one record per call of its model since the last reset (transformer sites:
        per denoiser call, i.e. per step, or two per step for FLUX true CFG; text-encoder sites:
        per prompt encoding): `step`, `progress` (1 - sigma; NaN for text encoders), `active`,
        `gated_fraction` (tokens with h > tau), `mean_harm` (mean finite h). With requests set,
        `active` means some request was steered. Syncs the device."""
        self._live()
        out: dict[str, list[dict[str, Any]]] = {}
        for label in self._states:
            out[label] = [{"step": step, "progress": progress, "active": active == 1.0, "gated_fraction": gated,
                           "mean_harm": mean_h}
                          for _, step, (_, progress, active, gated, mean_h) in self._written_rows(label)]
        return out

    def request_telemetry(self) -> dict[str, list[dict[str, Any]]]:
        """Per site, one record per call that ran with requests set (`set_requests`), since the
        last reset: `step`, `progress` as in `telemetry()`, and one entry per request in
        `active` (bools: in window, switched on, enabled, a non-zero strength),
        `gated_fraction` and `mean_harm` (over that request's rows: both halves of a CFG batch,
        or the cond half with `cfg="cond"`). Sites that never had requests have no records; a
        new number of requests starts over (the records for the old number are dropped). Syncs
        the device."""
        self._live()
        out: dict[str, list[dict[str, Any]]] = {}
        for label, st in self._states.items():
            rows = self._written_rows(label, requests=True)
            progress = st.telemetry[:, 1].tolist() if rows else []
            out[label] = [{"step": step, "progress": progress[i], "active": [a == 1.0 for a in active],
                           "gated_fraction": gated, "mean_harm": mean_h}
                          for i, step, (_, active, gated, mean_h) in rows]
        return out

    def reset_telemetry(self) -> None:
        self._live()
        for clock in self._clocks.values():
            clock.counter.zero_()
        for st in self._states.values():
            for buffer in (st.telemetry, st.request_telemetry):
                if buffer is not None:
                    buffer.zero_()

    # lifecycle --------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook and wrapper this handle installed."""
        for m in self._hooked:
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                for name in (_STEER_HOOK, _CLOCK_HOOK):
                    registry.remove_hook(name, recurse=False)
        self._hooked.clear()
        for m in self._follow:
            if getattr(m.__dict__.get("_apply"), "_safedig", False):
                del m.__dict__["_apply"]
        self._follow.clear()
        if self._encode_prompt_wrapped and getattr(self._pipeline.__dict__.get("encode_prompt"), "_safedig", False):
            del self._pipeline.__dict__["encode_prompt"]
        self._encode_prompt_wrapped = False
        self._removed = True
        if self._transformer.__dict__.get(_HANDLE_ATTR) is self:
            delattr(self._transformer, _HANDLE_ATTR)

    # internals --------------------------------------------------------------------------
    def _targets(self, site: Optional[str], stream: Optional[str], where: str) -> list[_SiteState]:
        """Every site for `site=None`, else the one `_state` names."""
        if site is None:
            if stream is not None:
                raise ValueError(f"{where}: stream= selects among the SiteConfigs of one block; give site= too")
            return list(self._states.values())
        return [self._state(site, stream)]

    def _written_rows(self, label: str, requests: bool = False) -> list[tuple]:
        """(row index, step, row as lists) of each row of a site's telemetry buffer (per call, or
        per request: `requests`) written by a call since the last reset."""
        st = self._states[label]
        if st.telemetry is None:
            raise RuntimeError("telemetry is off (SafeDIGConfig.telemetry=False)")
        buffer = st.request_telemetry if requests else st.telemetry
        if buffer is None:
            return []
        calls = int(st.clock.counter)
        cap = buffer.shape[0]
        if not requests and calls > cap:  # said once, by telemetry()
            warnings.warn(f"SafeDIG telemetry for {label!r}: {calls} calls but room for {cap}; the last row "
                          f"holds the latest call. Raise telemetry_capacity or call reset_telemetry() more often.")
        head = buffer[: min(calls, cap)].cpu()
        # the first entry, "written", is 0 where the site did not run in that call (e.g. skip_layers)
        written = (head.flatten(1)[:, 0] == 1.0).tolist()
        steps = [i if i < cap - 1 else calls - 1 for i in range(len(written))]
        return [(i, step, row) for i, (step, row, w) in enumerate(zip(steps, head.tolist(), written)) if w]

    def _state(self, site: str, stream: Optional[str]) -> _SiteState:
        if site in self._states and stream in (None, self._states[site].cfg.stream):
            return self._states[site]
        label = f"{site}:{stream}"
        if stream is not None and label in self._states:
            return self._states[label]
        matches = [lb for lb in self._states if lb.split(":")[0] == site]
        if matches and stream is None:
            raise ValueError(f"site {site!r} has one SiteConfig per stream ({matches}); pass stream=")
        raise ValueError(f"no site {site!r}" + (f" with stream {stream!r}" if stream else "")
                         + f"; sites: {list(self._states)}")

    def _sync_switches(self) -> None:
        for st in self._states.values():
            st.switch_on = self._enabled and st.site_on
            st.write()

    def _place(self, module: torch.nn.Module) -> None:
        """After `module` moved: move its clock and the state of its sites with it."""
        device, dtype = _module_placement(module)
        clock = self._clocks.get(id(module))
        if clock is not None:
            clock.place(device)
        moved: dict = {}
        for st in self._states.values():
            root = self._transformer if st.site.kind == "block" else st.site.module
            if root is module:
                st.place(device, dtype, moved)

    def _follow_moves(self, module: torch.nn.Module) -> None:
        original = module._apply

        @functools.wraps(original)
        def _apply(fn, *args, **kwargs):
            out = original(fn, *args, **kwargs)
            self._place(module)
            return out

        _apply._safedig = True
        module._apply = _apply
        self._follow.append(module)

    def _wrap_encode_prompt(self, warn_text_sites: list[str]) -> None:
        pipe = self._pipeline
        original = pipe.encode_prompt
        clock = self._clocks[id(self._transformer)]

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            if warn_text_sites and kwargs.get("prompt_embeds") is not None:
                warnings.warn(f"SafeDIG: prompt_embeds were passed in, so the text-encoder sites {warn_text_sites} "
                              f"steer nothing in this call; make sure the embeddings came from the hooked encoder.")
            out = original(*args, **kwargs)
            # Host side, once per pipeline call, outside any compiled region.
            clock.cfg_batch = pipeline_batches_cfg(pipe)
            return out

        encode_prompt._safedig = True
        pipe.encode_prompt = encode_prompt
        self._encode_prompt_wrapped = True


# -- apply / remove ----------------------------------------------------------------------

@dataclass
class _Resolved:
    """One SiteConfig checked against the model: the values in use, the site, its SAE."""

    cfg: SiteConfig   # harmful, beta, gamma, tau filled in from the SAE where the config left them None
    site: ResolvedSite
    sae: TopKSAE
    harmful: torch.Tensor  # bool [F], CPU


def _resolve(pipeline_or_transformer, config: SafeDIGConfig
             ) -> tuple[torch.nn.Module, Any, ModelSpec, list[_Resolved]]:
    """Every check `apply_safedig` makes, touching nothing: (transformer, pipeline or None,
    its model spec, the resolved sites)."""
    if not isinstance(config, SafeDIGConfig):
        raise TypeError(f"config must be a SafeDIGConfig, got {type(config).__name__}")
    transformer, pipeline = split_target(pipeline_or_transformer)
    spec = model_spec(transformer)
    if spec is None:
        owner = type(pipeline).__name__ if pipeline is not None else "apply_safedig"
        raise TypeError(f"{owner}: unsupported model {type(transformer).__name__}; SafeDIG supports "
                        f"FluxTransformer2DModel and SD3Transformer2DModel pipelines")
    resolved: list[_Resolved] = []
    per_module: dict[int, list[SiteConfig]] = {}
    for cfg in config.sites:
        where = cfg.where
        site = resolve_site(cfg.site, transformer, spec, pipeline)
        if site.kind == "text_encoder":
            if cfg.window != (0.0, 1.0):
                raise ValueError(f"{where}.window: text-encoder sites run once per prompt, not per step; "
                                 f"the window must be (0, 1), got {cfg.window}")
            if cfg.cfg != "both":
                raise ValueError(f"{where}.cfg: a text-encoder site cannot tell the negative prompt from the "
                                 f"prompt; cfg must be 'both', got {cfg.cfg!r}")
        elif not site.has_text_out and cfg.stream != "image":
            raise ValueError(f"{where}.stream: this block returns no text stream (it is the last joint "
                             f"block); stream must be 'image', got {cfg.stream!r}")
        if cfg.cfg == "cond" and site.kind == "block":
            pipe_name = type(pipeline).__name__ if pipeline is not None else None
            if pipe_name not in spec.cfg_pipelines:
                raise ValueError(f"{where}.cfg='cond' needs a pipeline that batches CFG as [uncond; cond] "
                                 f"({', '.join(spec.cfg_pipelines) or f'none for {spec.name}'}), "
                                 f"got {pipe_name or 'a bare transformer'}")
        sae = resolve_sae(cfg.sae, where)
        if sae.d != site.width:
            raise ValueError(f"{where}.sae: SAE width d = {sae.d} but the site's activations have width {site.width}")
        check_sae_site(sae, cfg.site, cfg.stream, where, cfg.allow_other_site)
        sae.check_finite()  # weights changed in memory since the SAE was built are checked here too
        harmful = (sae.harmful_mask.detach().cpu().clone() if cfg.harmful is None
                   else as_harmful_mask(cfg.harmful, sae.num_features, torch.device("cpu"), f"{where}.harmful"))
        beta = float(sae.beta) if cfg.beta is None else cfg.beta
        gamma = float(sae.gamma) if cfg.gamma is None else cfg.gamma
        tau = float(sae.tau) if cfg.tau is None else cfg.tau
        check_strengths(f"{where} (SAE defaults)", beta, gamma, tau)
        check_gate_can_open(where, int(harmful.sum()), tau)
        mods = per_module.setdefault(id(site.module), [])
        for other in mods:
            if site.kind == "text_encoder" or "both" in (other.stream, cfg.stream) or other.stream == cfg.stream:
                raise ValueError(f"{where}: overlaps another SiteConfig on the same module "
                                 f"(streams {other.stream!r} and {cfg.stream!r})")
        mods.append(cfg)
        res_cfg = dataclasses.replace(cfg, harmful=harmful.nonzero().flatten().tolist(),
                                      beta=beta, gamma=gamma, tau=tau)
        resolved.append(_Resolved(res_cfg, site, sae, harmful))
    return transformer, pipeline, spec, resolved


def check_config(pipeline_or_transformer, config: SafeDIGConfig) -> None:
    """Raise what `apply_safedig` would for `config` (unknown site, SAE width, model not
    supported, bad strengths, ...), without touching the model."""
    _resolve(pipeline_or_transformer, config)


def apply_safedig(pipeline_or_transformer, config: SafeDIGConfig) -> SafeDIGHandle:
    """Install SafeDIG steering on a FLUX / SD3 pipeline or transformer; returns the handle.

    Everything is checked before anything is hooked, and any problem raises: an unknown site,
    an SAE whose width is not the site's, a missing or unreadable checkpoint, an unsupported
    pipeline or model, bad strengths, windows or streams. SAEs are copied to the hooked
    module's device and dtype when they differ (the caller's SAE is never moved).
    """
    transformer, pipeline, spec, resolved = _resolve(pipeline_or_transformer, config)
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("SafeDIG is already applied to this model; call remove_safedig() first")
    t_index = timestep_index(transformer)
    handle = SafeDIGHandle(transformer, pipeline, config)
    t_device, _ = _module_placement(transformer)
    handle._clocks[id(transformer)] = _Clock(t_device, uses_progress=True)
    capacity = config.telemetry_capacity if config.telemetry else None
    labels = site_labels([SiteSpec(r.cfg.site, r.cfg.stream) for r in resolved])
    placed: dict = {}
    by_block: dict[int, list[_SiteState]] = {}
    for label, r in zip(labels, resolved):
        device, dtype = _module_placement(r.site.module)
        key = (id(r.sae), device, dtype)
        if key not in placed:
            placed[key] = _sae_on(r.sae, device, dtype)
        if r.site.kind == "text_encoder":
            clock = handle._clocks.setdefault(id(r.site.module), _Clock(device, uses_progress=False))
        else:
            clock = handle._clocks[id(transformer)]
        st = _SiteState(label, r.cfg, r.site, placed[key], clock, r.harmful.to(device), config.use_fused_ops, capacity)
        handle._states[label] = st
        if r.site.kind == "block":
            by_block.setdefault(id(r.site.module), []).append(st)
            clock.sites.append(st)
    handle._sync_switches()

    clock = handle._clocks[id(transformer)]
    schedule = _ScheduleCheck(pipeline, clock) if pipeline is not None else None
    _register(transformer, _ClockHook(clock, spec, t_index, schedule), _CLOCK_HOOK, handle)
    handle._follow_moves(transformer)
    for st in handle._states.values():
        if st.site.kind == "block" and id(st.site.module) in by_block:
            _register(st.site.module, _BlockSteerHook(by_block.pop(id(st.site.module))), _STEER_HOOK, handle)
        elif st.site.kind == "text_encoder":
            _register(st.site.module, _TextEncoderSteerHook(st), _STEER_HOOK, handle)
            handle._follow_moves(st.site.module)
    text_sites = [st.label for st in handle._states.values() if st.site.kind == "text_encoder"]
    needs_cfg = any(st.cfg.cfg == "cond" for st in handle._states.values())
    if pipeline is not None and hasattr(pipeline, "encode_prompt") and (text_sites or needs_cfg):
        handle._wrap_encode_prompt(text_sites)
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


def _request_column(value, name: str) -> list[float]:
    """One `set_requests` argument as one float per request: strengths by the one rule, `enabled`
    as bools (1.0 / 0.0); errors name the argument and the request's index."""
    label = f"set_requests.{name}"
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):  # numpy
        value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{label} must be 1-D, one entry per request, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{label} must be a sequence or a 1-D tensor, one entry per request, "
                        f"got {type(value).__name__}")
    if name != "enabled":
        return [strength(v, name, f"{label}[{i}]") for i, v in enumerate(value)]
    for i, v in enumerate(value):
        if not isinstance(v, bool):
            raise TypeError(f"{label}[{i}] must be a bool, got {v!r} ({type(v).__name__})")
    return [1.0 if v else 0.0 for v in value]


def _register(module: torch.nn.Module, hook: ModelHook, name: str, handle: SafeDIGHandle) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    handle._hooked.append(module)


def remove_safedig(pipeline_or_transformer) -> bool:
    """Remove SafeDIG from a pipeline or transformer. Returns whether anything was installed."""
    transformer, _ = split_target(pipeline_or_transformer, "remove_safedig")
    handle = getattr(transformer, _HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True
