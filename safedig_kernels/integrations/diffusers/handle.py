"""Install a plan, change it in place, read its telemetry, remove it: `apply_safedig`,
`SafeDIGHandle`, `safedig_handle`, `remove_safedig`, `check_config`."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from ..._checks import STRENGTH_NAMES, strength_or_none
from ...ops import as_harmful_mask
from ...sae import TopKSAE
from .config import SafeDIGConfig, SiteConfig, check_window
from .hooks import BlockSteerHook, EndCallHook, TextEncoderCallHook, TextEncoderSteerHook, TransformerCallHook
from .plan import SteeringPlan, check_gate_can_open, resolve
from .requests import REQUEST_ROWS, request_column
from .sites import STEER_STREAMS, SiteSpec, split_target, text_encoders
from .state import STATE_NAME, SiteSteering, SteeringState
from .telemetry import telemetry_group, written_rows

__all__ = ["SafeDIGHandle", "apply_safedig", "remove_safedig", "check_config", "safedig_handle"]

_BETA, _GAMMA, _TAU, _START, _END, _SWITCH = range(6)


def check_config(pipeline_or_transformer, config: SafeDIGConfig) -> SteeringPlan:
    """Every check `apply_safedig` makes for `config` on this model (unknown site, SAE width,
    model not described by diffusers, bad strengths, ...), touching nothing; returns the plan
    `apply_safedig` would install (it also takes the plan itself)."""
    return resolve(pipeline_or_transformer, config)


def apply_safedig(pipeline_or_transformer, config: Union[SafeDIGConfig, SteeringPlan]) -> "SafeDIGHandle":
    """Install SafeDIG steering on a diffusers pipeline or transformer; returns the handle.

    `config` is a `SafeDIGConfig`, checked here (`check_config`), or a plan `check_config`
    returned for this same model. Everything is checked before anything is installed. SAEs are
    copied to the hooked module's device (and its dtype, where it stores weights in one the ops
    compute in); the caller's SAE is never moved.
    """
    plan = config if isinstance(config, SteeringPlan) else resolve(pipeline_or_transformer, config)
    transformer, pipeline = split_target(pipeline_or_transformer)
    if plan.transformer is not transformer or (pipeline is not None and plan.pipeline is not pipeline):
        raise ValueError("apply_safedig: this plan was resolved for another model; check_config(model, config) again")
    roots = [transformer] + [p.site.root for p in plan.sites if p.site.is_text_encoder]
    for root in roots:
        if STATE_NAME in root._modules or hasattr(root, STATE_NAME):
            what = "SafeDIG is already applied to this model" if isinstance(getattr(root, STATE_NAME, None),
                                                                          SteeringState) else (
                f"{type(root).__name__} already has an attribute {STATE_NAME!r}")
            raise RuntimeError(f"{what}; call remove_safedig() first")

    sites = [SiteSteering(p, plan.fused, plan.telemetry_capacity) for p in plan.sites]
    text_keys = tuple(p.key for p in plan.sites if p.site.is_text_encoder)
    device = next(p for p in transformer.parameters() if p.is_floating_point()).device
    block_sites = [s for s, p in zip(sites, plan.sites) if not p.site.is_text_encoder]
    state = SteeringState(block_sites, device, plan.telemetry_capacity, text_keys)
    state.enabled = plan.enabled
    states = [state]
    transformer.add_module(STATE_NAME, state)
    hooks = state.hook_handles
    hooks.append(transformer.register_forward_pre_hook(
        TransformerCallHook(state, plan.family, plan.pipeline), with_kwargs=True))
    hooks.append(transformer.register_forward_hook(EndCallHook(state), with_kwargs=True, always_call=True))
    by_module: dict[int, list[int]] = {}
    for i, p in enumerate(plan.sites):
        if not p.site.is_text_encoder:
            by_module.setdefault(id(p.site.module), []).append(i)
    for indices in by_module.values():
        site = plan.sites[indices[0]].site
        hook = BlockSteerHook(state, [sites[i] for i in indices], site.layout, site.spec.module)
        hooks.append(site.module.register_forward_hook(hook, with_kwargs=True))
    for s, p in zip(sites, plan.sites):
        if p.site.is_text_encoder:
            encoder = p.site.root
            enc_state = SteeringState([s], p.device, plan.telemetry_capacity)
            encoder.add_module(STATE_NAME, enc_state)
            enc_state.hook_handles += [
                encoder.register_forward_pre_hook(TextEncoderCallHook(enc_state), with_kwargs=True),
                encoder.register_forward_hook(TextEncoderSteerHook(enc_state, s), with_kwargs=True),
                encoder.register_forward_hook(EndCallHook(enc_state), with_kwargs=True, always_call=True)]
            states.append(enc_state)
    handle = SafeDIGHandle(list(zip(roots, states)))
    handle._sync_switches()
    return handle


def safedig_handle(pipeline_or_transformer) -> Optional["SafeDIGHandle"]:
    """The handle of the steering installed on a pipeline or transformer (None if there is none):
    also for a `copy.deepcopy` of a steered transformer, whose steering is its own."""
    transformer, pipeline = split_target(pipeline_or_transformer, "safedig_handle")
    state = _installed(transformer)
    if state is None:
        return None
    pairs = [(transformer, state)]
    for encoder in text_encoders(pipeline).values():
        enc_state = _installed(encoder)
        if enc_state is not None:
            pairs.append((encoder, enc_state))
    return SafeDIGHandle(pairs)


def remove_safedig(pipeline_or_transformer) -> bool:
    """Remove SafeDIG from a pipeline or transformer. Returns whether anything was installed."""
    transformer, pipeline = split_target(pipeline_or_transformer, "remove_safedig")
    state = _installed(transformer)
    if state is None:
        return False
    if state.text_encoder_sites and pipeline is None:
        raise ValueError(f"remove_safedig: SafeDIG also steers the pipeline's text encoder "
                         f"({', '.join(state.text_encoder_sites)}); pass the pipeline, or call handle.remove()")
    safedig_handle(pipeline_or_transformer).remove()
    return True


def _installed(root: torch.nn.Module) -> Optional[SteeringState]:
    state = root._modules.get(STATE_NAME) if isinstance(root, torch.nn.Module) else None
    return state if isinstance(state, SteeringState) else None


class SafeDIGHandle:
    """Returned by `apply_safedig` (and `safedig_handle`): changes settings in place and reads
    telemetry. A view of the state installed in the model: two handles of one model agree.

    Sites are named by their key, `module:stream` (`handle.sites`); a module alone means its
    default stream (`image`; `text` for a text encoder), as in `SiteConfig`.

    Every setter checks its values, with the state they combine with, before it changes
    anything, then writes each site's settings with one copy into a buffer that compiled graphs
    keep reading (no recompile, no re-hook); a steering call reads each site's buffers once, so
    it sees each `set_site` / `set_requests` whole or not at all (per site; on CUDA when the setter
    and the pipeline share one stream). Per-request control: `set_requests`.
    """

    def __init__(self, installed: list[tuple[torch.nn.Module, SteeringState]]) -> None:
        self._installed = installed  # (root module, its state): the transformer first
        self._states = [state for _, state in installed]
        self._sites: dict[str, tuple[SteeringState, SiteSteering]] = {
            site.key: (state, site) for state in self._states for site in state.sites}

    # settings ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._sites)

    @property
    def enabled(self) -> bool:
        return self._states[0].enabled

    def _live(self) -> None:
        if any(state.removed for state in self._states):
            raise RuntimeError("this SafeDIG handle was removed (remove_safedig); its settings no longer reach any "
                               "model: apply_safedig again and use the new handle")

    def enable(self) -> None:
        """Turn steering on at every site (site-level switches still apply). No recompile."""
        self._live()
        self._states[0].enabled = True
        self._sync_switches()

    def disable(self) -> None:
        """Outputs become bitwise those of the unhooked model; the steering compute still runs
        (the switch is a device tensor). `remove_safedig` removes the cost too."""
        self._live()
        self._states[0].enabled = False
        self._sync_switches()

    def set_site(self, site: str, *, beta: Optional[float] = None, gamma: Optional[float] = None,
                 tau: Optional[float] = None, harmful: Union[Sequence[int], torch.Tensor, None] = None,
                 window: Optional[tuple[float, float]] = None, enabled: Optional[bool] = None) -> None:
        """Change one site in place: no recompile, no re-hook. `None` leaves a value as is.
        `harmful` takes feature ids or a bool mask `[F]`. The new values must leave the gate able
        to open for the site's own threshold and every request's (`set_requests`)."""
        self._live()
        _, st = self._site(site)
        where = f"set_site({st.key!r})"
        given = {name: strength_or_none(v, name, f"{where}.{name}")
                 for name, v in zip(STRENGTH_NAMES, (beta, gamma, tau)) if v is not None}
        if window is not None:
            window = check_window(window, f"{where}.window")
            if window != (0.0, 1.0) and not st.windowed:
                raise ValueError(f"{where}.window: this site runs once per prompt, or its model's timesteps are not "
                                 f"known to SafeDIG; the window must be (0, 1)")
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"{where}.enabled must be a bool, got {enabled!r}")
        mask = None if harmful is None else as_harmful_mask(harmful, st.num_features, torch.device("cpu"),
                                                            f"{where}.harmful")
        values = list(st.values)
        for i, name in enumerate(STRENGTH_NAMES):
            if name in given:
                values[i] = given[name]
        if window is not None:
            values[_START], values[_END] = window
        n_harmful = st.n_harmful if mask is None else int(mask.sum())
        _check_gates(where, st, n_harmful, values[_TAU], st.request_taus)
        # All checks passed: apply with one copy.
        if enabled is not None:
            st.site_on = enabled
        values[_SWITCH] = 1.0 if self.enabled and st.site_on else 0.0
        st.write(values, mask)

    def set_requests(self, *, beta=None, gamma=None, tau=None, enabled=None, site: Optional[str] = None) -> None:
        """Per-request strengths, threshold and on/off for a batch that mixes requests.

        Each given argument holds one entry per request, i.e. per image the pipeline call
        generates (its batch of prompts x `num_images_per_prompt`), as a sequence or 1-D tensor:
        `beta`, `gamma`, `tau` numbers (the one strength rule, `_checks.strength`), `enabled`
        bools (a disabled request is steered nowhere: beta = gamma = 0 for it). An argument left
        None uses each site's own value, which `set_site` may still change. `site=None` sets every
        site, else the one named as in `set_site`. Each call replaces the requests of the sites it
        sets; everything is checked before anything changes.

        Rows of a call map to requests by one rule (`requests.py`, docs/workflow.md): a call
        with n rows has one per request; one with 2n rows is a guided batch `[uncond; cond]`
        and request i applies to row i of both halves (the cond half alone with `cfg="cond"`);
        where the pipeline says it guides, a call must have 2n rows; anything else raises at the
        call, naming the site and both sizes. A text-encoder site sees one row per prompt: set it
        with `site=` when `num_images_per_prompt > 1`.

        Values are written in place into a fp32 `[4, n]` buffer per site (a new one only when n
        changes): changing them never recompiles a compiled transformer. The first call with
        requests compiles a second graph, once (`clear_requests` goes back to the first); a new n
        comes with a new batch size, which torch.compile treats as any batch change. Telemetry
        per request: `request_telemetry()`."""
        self._live()
        targets = list(self._sites.values()) if site is None else [self._site(site)]
        columns = {name: request_column(value, name)
                   for name, value in zip(REQUEST_ROWS, (beta, gamma, tau, enabled)) if value is not None}
        if not columns:
            raise ValueError("set_requests: give beta, gamma, tau or enabled, one entry per request "
                             "(clear_requests() returns to the sites' own values)")
        lengths = {name: len(column) for name, column in columns.items()}
        n = next(iter(lengths.values()))
        if n == 0 or any(length != n for length in lengths.values()):
            raise ValueError(f"set_requests: every argument needs one entry per request, the same number for each "
                             f"and at least one, got lengths {lengths}")
        for _, st in targets:
            _check_gates(f"set_requests at site {st.key!r}", st, st.n_harmful, st.values[_TAU],
                         columns.get("tau", []), requests_given=True)
        # All checks passed. NaN: the site's own value (requests.REQUEST_ROWS); every request on unless said.
        table = torch.full((len(REQUEST_ROWS), n), float("nan"), dtype=torch.float32)
        table[REQUEST_ROWS.index("enabled")] = 1.0
        for row, name in enumerate(REQUEST_ROWS):
            if name in columns:
                table[row] = torch.tensor(columns[name], dtype=torch.float32)
        for _, st in targets:
            st.set_requests(table)

    def clear_requests(self, site: Optional[str] = None) -> None:
        """Back to each site's own values (every site, or the one named). Per-request telemetry
        recorded so far stays readable until `reset_telemetry`."""
        self._live()
        for _, st in list(self._sites.values()) if site is None else [self._site(site)]:
            st.set_requests(torch.zeros(len(REQUEST_ROWS), 0))

    def config(self) -> SafeDIGConfig:
        """The settings in use now, as a config `apply_safedig` would take; each site's SAE is
        the checkpoint path or hf:// name it was given as, else a `TopKSAE` of the site's
        weights (`sae(site)`)."""
        sites = []
        for key, (_, st) in self._sites.items():
            beta, gamma, tau, lo, hi, _ = st.values
            sae = st.sae_source if st.sae_source is not None else self.sae(key)
            sites.append(SiteConfig(key, sae, harmful=st.harmful.nonzero().flatten().tolist(), beta=beta,
                                    gamma=gamma, tau=tau, window=(lo, hi), cfg=st.cfg,
                                    allow_other_site=st.allow_other_site))
        state = self._states[0]
        capacity = next((st.telemetry.shape[0] for _, st in self._sites.values() if st.telemetry is not None), None)
        return SafeDIGConfig(tuple(sites), enabled=state.enabled, use_fused_ops=all(st.fused for _, st in
                                                                                    self._sites.values()),
                             telemetry=capacity is not None, telemetry_capacity=capacity or 1024)

    def sae(self, site: str) -> TopKSAE:
        """A `TopKSAE` of the weights a site steers with (a copy, where they are now), with its
        harmful set and strengths."""
        _, st = self._site(site)
        beta, gamma, tau = st.values[:3]
        sae = TopKSAE(st.W_enc, st.b_enc, st.W_dec, st.b_dec, k=st.k)
        sae.set_harmful(st.harmful)
        sae.set_strengths(beta=beta, gamma=gamma, tau=tau)
        return sae

    # telemetry --------------------------------------------------------------------------
    def telemetry(self, scope: str = "sequence", group=None) -> dict[str, list[dict[str, Any]]]:
        """Per site, one record per call of its model since the last reset (transformer sites:
        per denoiser call, i.e. per step, or two per step for FLUX true CFG; text-encoder sites:
        per prompt encoding): `step`, `progress` (1 - sigma; NaN for text encoders and models
        whose timesteps SafeDIG does not know), `active`, `gated_fraction` (tokens with h > tau),
        `mean_harm` (mean finite h). With requests set, `active` means some request was steered.
        Syncs the device.

        `scope="sequence"` (default): over the whole sequence. On a transformer split over
        context-parallel ranks (diffusers' `enable_parallelism`), or over `group` when given (a
        `torch.distributed.ProcessGroup` splitting the sequence some other way), this sums over
        the ranks with one all-reduce, so every rank of the group must call it (`telemetry.py`).
        `scope="rank"`: this rank's own tokens, with no communication."""
        self._live()
        rows = written_rows(self._sites, False, telemetry_group(self._installed[0][0], scope, group, "telemetry"))
        return {key: [{"step": step, "progress": progress, "active": active == 1.0, "gated_fraction": gated,
                       "mean_harm": mean_h}
                      for step, (_, progress, active, gated, mean_h, *_), _ in records]
                for key, records in rows.items()}

    def request_telemetry(self, scope: str = "sequence", group=None) -> dict[str, list[dict[str, Any]]]:
        """Per site, one record per call that ran with requests set (`set_requests`), since the
        last reset: `step`, `progress` as in `telemetry()`, and one entry per request in
        `active` (bools: in window, switched on, enabled, a non-zero strength),
        `gated_fraction` and `mean_harm` (over that request's rows: both halves of a guided
        batch, or the cond half with `cfg="cond"`). Sites that never had requests have no
        records; a new number of requests starts over (the records for the old number are
        dropped). Syncs the device. `scope` and `group` as in `telemetry()`."""
        self._live()
        group = telemetry_group(self._installed[0][0], scope, group, "request_telemetry")
        return {key: [{"step": step, "progress": progress, "active": [a == 1.0 for a in active],
                       "gated_fraction": gated, "mean_harm": mean_h}
                      for step, (_, active, gated, mean_h, *_), progress in records]
                for key, records in written_rows(self._sites, True, group).items()}

    def reset_telemetry(self) -> None:
        self._live()
        for state in self._states:
            state.clock.counter.zero_()
            for st in state.sites:
                for buffer in (st.telemetry, st.request_telemetry):
                    if buffer is not None:
                        buffer.zero_()

    # lifecycle --------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook and all state this handle's installation put in the model(s)."""
        for root, state in self._installed:
            for h in state.hook_handles:
                h.remove()
            state.hook_handles.clear()
            if root._modules.get(STATE_NAME) is state:
                del root._modules[STATE_NAME]
            state.removed = True

    # internals --------------------------------------------------------------------------
    def _site(self, site: str) -> tuple[SteeringState, SiteSteering]:
        try:
            key = SiteSpec.parse(site, STEER_STREAMS).key
        except ValueError as e:
            raise ValueError(f"{e}; sites: {list(self._sites)}") from None
        if key not in self._sites:
            read = f" (read as {key!r}: a module alone is its default stream)" if key != site else ""
            raise ValueError(f"no site {site!r}{read}; sites: {list(self._sites)}")
        return self._sites[key]

    def _sync_switches(self) -> None:
        for _, st in self._sites.values():
            values = list(st.values)
            values[_SWITCH] = 1.0 if self.enabled and st.site_on else 0.0
            st.write(values)


def _check_gates(where: str, st: SiteSteering, n_harmful: int, site_tau: float, request_taus: Sequence[float],
                 requests_given: bool = False) -> None:
    """The combined state must leave the gate able to open: the site's threshold and every
    request's (a NaN request threshold is the site's) against the harmful set."""
    check_gate_can_open(where, n_harmful, site_tau)
    for i, t in enumerate(request_taus):
        if t == t:  # not NaN
            label = f"set_requests.tau[{i}]" if requests_given else f"{where} with request {i}'s tau"
            check_gate_can_open(f"{label} at site {st.key!r}" if requests_given else label, n_harmful, t)
