"""SafeDIG's run-time state, held as modules inside the model it steers.

Each steered root module (the transformer, and a T5 encoder with a text site) gets one child,
`safedig` (`SteeringState`), holding a `Clock` and one `SiteSteering` per site. Everything they
hold is a non-persistent buffer, so it follows the model the way torch moves modules:
`.to()`, `copy.deepcopy`, group offloading and model CPU offload move or copy it, and the
model's `state_dict()` keys stay exactly as without steering. A site computes in the dtype of
the activations it receives: weights stored in another dtype (layerwise casting, a model cast
after `apply_safedig`) are cast for the call.

Everything a user may change after applying (strengths, threshold, harmful mask, window,
on/off, per-request values) is a buffer changed in place with one copy (`_settings`), so a
compiled graph keeps reading the same address and never recompiles for a new value; a step out
of the window folds to zero strengths on the device, and the op returns `x` bitwise.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ..._settings import read_settings, write_setting, write_settings
from ...ops import call_steer, encoder_bias
from ...reference import steer as reference_steer
from .plan import SitePlan
from .requests import REQUEST_ROWS, row_layout

__all__ = ["CallInfo", "Clock", "SiteSteering", "SteeringState", "TELEMETRY_COLUMNS", "REQUEST_TELEMETRY_ROWS",
           "STATE_NAME"]

STATE_NAME = "safedig"  # the child module of a steered root
# Telemetry columns, per site and call: row written?, schedule progress, steering active (in
# window, switched on, a non-zero strength), fraction of tokens with h > tau, mean finite h, and
# the counts those two are over (tokens, finite tokens), which make the statistics of a sequence
# split over context-parallel ranks exact sums over ranks (telemetry.py).
TELEMETRY_COLUMNS = ("written", "progress", "active", "gated_fraction", "mean_harm", "tokens", "finite_tokens")
# Per-request telemetry rows, per site and call, one column per request.
REQUEST_TELEMETRY_ROWS = ("written", "active", "gated_fraction", "mean_harm", "tokens", "finite_tokens")
_SETTINGS = ("beta", "gamma", "tau", "window_start", "window_end", "switch")
_FLOAT32_BUFFERS = ("enc_bias", "settings", "requests", "telemetry", "request_telemetry")


@dataclass(frozen=True)
class CallInfo:
    """What every site of one call of a root module shares: the schedule progress (0-d fp32, or
    None for a text encoder), the telemetry row (0-d int64), whether the pipeline guides this
    call (`requests.pipeline_guides`), and whether the call is a recomputation during backward
    (gradient checkpointing), which steers as its forward did and records no telemetry."""

    progress: Optional[torch.Tensor]
    row: torch.Tensor
    guided: Optional[bool]
    replay: bool = False


def _static(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Buffers that live across calls and are changed in place: a static address keeps CUDA-graph
    # capture (mode="reduce-overhead") from copying them in or refusing the mutation. No guard,
    # so sites whose state differs only by values share a compiled graph.
    if t is not None and t.is_cuda:
        torch._dynamo.mark_static_address(t, guard=False)
    return t


class Clock(torch.nn.Module):
    """Per steered root: counts its calls (the telemetry row, on the device: no host sync)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    def forward(self, capacity: int) -> torch.Tensor:
        """This call's telemetry row (the last row once `capacity` calls were made); advances."""
        row = self.counter.clamp(max=capacity - 1)
        self.counter.add_(1)
        return row


class SiteSteering(torch.nn.Module):
    """One site: its SAE, its settings, its telemetry; `forward(x, call)` steers `x` `[B, T, d]`.

    `settings` = [beta, gamma, tau, window start, window end, switch] (fp32, one copy per update);
    `requests` fp32 `[4, n]` (`requests.REQUEST_ROWS`; n = 0: none set). A steering call reads the
    settings, mask and requests once (`_settings.read_settings`): it sees an update whole or not
    at all."""

    def __init__(self, plan: SitePlan, fused: bool, capacity: Optional[int]) -> None:
        super().__init__()
        self.key = plan.key
        self.stream = plan.site.spec.stream
        self.cfg = plan.cfg
        self.family_cfg = plan.family_cfg  # how the model's pipelines batch guidance (families.Family.cfg)
        self.windowed = plan.windowed      # a window other than (0, 1) can be placed (set_site)
        self.site_on = True                # the site's own switch (set_site(enabled=))
        self.sae_source = plan.sae_source  # the path or hf:// name it came from (handle.config)
        self.allow_other_site = plan.allow_other_site
        self.k = plan.sae.k
        self.fused = fused
        self.num_features = plan.sae.num_features
        dev, dtype = plan.device, plan.dtype
        f32 = dict(dtype=torch.float32, device=dev)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            weight = getattr(plan.sae, name).detach().to(device=dev, dtype=dtype, copy=True)
            self.register_buffer(name, weight, persistent=False)
        if dtype != plan.sae.dtype:
            self._check_finite(f"placed in {dtype}")
        self.register_buffer("enc_bias", encoder_bias(self.W_enc, self.b_enc, self.b_dec).float(), persistent=False)
        self.register_buffer("harmful", plan.harmful.to(dev), persistent=False)
        # Host copies of what the buffers hold, so that the handle reads settings without a device sync.
        self.values = [plan.beta, plan.gamma, plan.tau, plan.window[0], plan.window[1], 1.0]
        self.n_harmful = int(plan.harmful.sum())
        self.request_taus: list[float] = []
        self.register_buffer("settings", torch.tensor(self.values, **f32), persistent=False)
        self.register_buffer("requests", torch.zeros(len(REQUEST_ROWS), 0, **f32), persistent=False)
        telemetry = None if capacity is None else torch.zeros(capacity, len(TELEMETRY_COLUMNS), **f32)
        self.register_buffer("telemetry", telemetry, persistent=False)
        request_telemetry = None if capacity is None else torch.zeros(capacity, len(REQUEST_TELEMETRY_ROWS), 0, **f32)
        self.register_buffer("request_telemetry", request_telemetry, persistent=False)
        for t in self.buffers():
            _static(t)

    def extra_repr(self) -> str:
        return f"{self.key!r}, d={self.W_enc.shape[0]}, F={self.num_features}, k={self.k}, fused={self.fused}"

    # host side -------------------------------------------------------------------------
    def _check_finite(self, how: str) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"SafeDIG site {self.key!r}: the SAE's {name} holds non-finite values once {how}; a "
                                 f"non-finite weight would leave every token unsteered. Keep the SAE in a wider "
                                 f"dtype (apply_safedig after the cast, with an SAE that fits)")

    def _apply(self, fn, recurse=True):
        # `.to(torch.float16)` would cast the settings too (tau = 1e5 becomes inf): they stay
        # float32 where the weights went; the folded bias is made again from the moved weights; a
        # cast that overflows a weight is refused and leaves this site as it was.
        before = dict(self._buffers)
        out = super()._apply(fn, recurse)
        for name in _FLOAT32_BUFFERS:
            t = self._buffers[name]
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = before[name].to(device=t.device, dtype=torch.float32)
        moved = self.W_enc is not before["W_enc"] and self.W_enc.device.type != "meta"
        if moved:
            if self.W_enc.dtype != before["W_enc"].dtype:
                try:
                    self._check_finite(f"cast to {self.W_enc.dtype}")
                except ValueError:
                    self._buffers.update(before)
                    raise
            self._buffers["enc_bias"] = encoder_bias(self.W_enc, self.b_enc, self.b_dec).float()
        for t in self._buffers.values():
            _static(t)
        return out

    def write(self, values: list[float], mask: Optional[torch.Tensor] = None) -> None:
        """Write the settings row (and a new harmful mask, CPU bool `[F]`), all in one copy under
        one lock."""
        row = (self.settings, torch.tensor(values, dtype=torch.float32))
        write_settings(row, *([(self.harmful, mask)] if mask is not None else []))
        self.values = [float(v) for v in values]  # as given; the buffer holds them in float32
        if mask is not None:
            self.n_harmful = int(mask.sum())

    def set_requests(self, table: torch.Tensor) -> None:
        """Write a checked per-request table (CPU fp32 `[4, n]`, or `[4, 0]`: none) with one copy;
        new buffers only when n changes, so compiled graphs keep their addresses otherwise."""
        n = table.shape[1]
        self.request_taus = table[REQUEST_ROWS.index("tau")].tolist()
        if self.requests.shape == table.shape:
            write_setting(self.requests, table)
            return
        self.requests = _static(table.to(self.settings.device))  # whole before any call can see it
        if self.telemetry is not None:
            self.request_telemetry = _static(torch.zeros(self.telemetry.shape[0], len(REQUEST_TELEMETRY_ROWS), n,
                                                         dtype=torch.float32, device=self.settings.device))

    # traced (eager or under torch.compile) ----------------------------------------------
    def forward(self, x: torch.Tensor, call: CallInfo) -> torch.Tensor:
        """Steer `x` `[B, T, d]` (any strides) for one call; returns a tensor of x's shape and dtype.
        A stream without a batch dimension, `[T, d]` (Cosmos 3 packs one sample per call), is one row."""
        if x.dim() == 2:
            return self.forward(x.unsqueeze(0), call).squeeze(0)
        values, harmful, requests = read_settings(self.settings, self.harmful, self.requests)
        beta, gamma, tau, lo, hi, switch = values.unbind()
        if call.progress is not None:
            p = call.progress
            switch = switch * ((p >= lo) & ((p < hi) | (hi >= 1.0))).to(torch.float32)
        else:
            p = torch.full((), float("nan"), dtype=torch.float32, device=x.device)
        n = requests.shape[1]
        layout = row_layout(x.shape[0], n or None, call.guided, self.key, self.family_cfg, self.cfg == "cond")
        rows = layout.cond if self.cfg == "cond" else slice(None)
        xs = x[rows]
        if n:
            beta, gamma, tau, active = self._per_request(requests, beta, gamma, tau, switch)
            groups = 1 if self.cfg == "cond" else layout.groups
            beta, gamma, tau = (t.repeat(groups) for t in (beta, gamma, tau))
        else:
            beta, gamma = beta * switch, gamma * switch
            active = switch * ((beta != 0) | (gamma != 0)).to(torch.float32)
        y, h = self._steer(xs, harmful, beta, gamma, tau)
        if self.telemetry is not None and not call.replay:
            self._record(h, p, tau, active.amax(), call.row)  # with requests: active when any request is
            if n:
                self._record_requests(h, tau[:n], active, call.row)
        if rows == slice(None):
            return y
        out = x.clone()  # the other rows (the unconditional half) pass through as they came
        out[rows] = y
        return out

    def _steer(self, x, harmful, beta, gamma, tau) -> tuple[torch.Tensor, torch.Tensor]:
        weights = (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        same = x.dtype == self.W_enc.dtype
        if not same:  # stored in another dtype than the activations compute in (layerwise casting)
            weights = tuple(w.to(x.dtype) for w in weights)
        if self.fused:
            return call_steer(x, *weights, harmful, beta, gamma, tau, self.k, self.enc_bias if same else None)
        return reference_steer(x, *weights, harmful, beta, gamma, tau, self.k)

    @staticmethod
    def _per_request(requests, beta, gamma, tau, switch) -> tuple[torch.Tensor, ...]:
        """Per-request `[n]` beta, gamma (switch, window and enabled folded in), tau, and active.
        A NaN entry takes the site's own value."""
        req_beta, req_gamma, req_tau, enabled = requests.unbind()
        on = switch * enabled
        beta = torch.where(torch.isnan(req_beta), beta, req_beta) * on
        gamma = torch.where(torch.isnan(req_gamma), gamma, req_gamma) * on
        tau = torch.where(torch.isnan(req_tau), tau, req_tau)
        return beta, gamma, tau, on * ((beta != 0) | (gamma != 0)).to(torch.float32)

    def _record(self, h, p, tau, active, row) -> None:
        # Statistics of detached values: telemetry is never part of an autograd graph.
        h = h.detach()
        stats = _gate_stats(h.flatten(), tau if tau.dim() == 0 else tau.view(-1, 1).expand_as(h).flatten())
        entry = torch.stack([torch.ones_like(p), p.to(torch.float32), active, *stats])
        self.telemetry.index_copy_(0, row.view(1), entry.view(1, -1))

    def _record_requests(self, h, tau, active, row) -> None:
        n = tau.shape[0]
        buffer = self.request_telemetry
        if buffer.shape[-1] != n:  # a set_requests with a new n on another thread
            return
        # h [groups * n, T], rows [group 0 requests; group 1 requests]: one row of tokens per request
        per_request = h.detach().reshape(-1, n, h.shape[-1]).transpose(0, 1).reshape(n, -1)
        entry = torch.stack([torch.ones_like(active), active, *_gate_stats(per_request, tau.view(n, 1))])
        buffer.index_copy_(0, row.view(1), entry.unsqueeze(0))


def _gate_stats(h: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Over the last dim of `h`: the fraction with h > tau (a NaN h, a non-finite token, is never
    gated), the mean of the finite h, and the numbers of tokens and of finite tokens (fp32)."""
    finite = torch.isfinite(h)
    n_finite = finite.sum(-1).to(torch.float32)
    mean_h = torch.where(finite, h, 0.0).sum(-1) / n_finite.clamp_min(1)
    return (h > tau).to(torch.float32).mean(-1), mean_h, torch.full_like(mean_h, h.shape[-1]), n_finite


class SteeringState(torch.nn.Module):
    """The `safedig` child of a steered root: its clock, its sites, and during a call of the root
    the `CallInfo` its sites share. Not in `state_dict()` (every buffer is non-persistent)."""

    def __init__(self, sites: list[SiteSteering], device: torch.device, capacity: Optional[int],
                 text_encoder_sites: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.clock = Clock(device)
        self.sites = torch.nn.ModuleList(sites)
        self.capacity = capacity or 1
        self.enabled = True                           # the handle's global switch
        self.text_encoder_sites = text_encoder_sites  # on the transformer: sites its pipeline holds
        self.hook_handles: list = []                  # torch hook handles; deep-copied with the model
        self.call: Optional[CallInfo] = None          # during a call of the root only
        self.removed = False
        self._replays: dict[int, tuple[weakref.ref, CallInfo]] = {}

    def begin(self, progress: Optional[torch.Tensor], guided: Optional[bool]) -> None:
        self.call = CallInfo(progress, self.clock(self.capacity), guided)

    def end(self) -> None:
        self.call = None

    # gradient checkpointing ---------------------------------------------------------------
    def remember(self, x: torch.Tensor, call: CallInfo) -> None:
        """Keep `call` for a block whose input is `x`, so that recomputing the block in backward
        (gradient checkpointing) steers with this call's timestep; dropped with `x`."""
        key = id(x)
        replays = self._replays
        replays[key] = (weakref.ref(x, lambda _, key=key: replays.pop(key, None)), call)

    def recall(self, x: torch.Tensor) -> Optional[CallInfo]:
        entry = self._replays.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        return CallInfo(entry[1].progress, entry[1].row, entry[1].guided, replay=True)

    def __getstate__(self):
        # A copy or pickle of the model never carries a call in progress or its recomputation notes.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["call"] = None
        state["_replays"] = {}
        return state
