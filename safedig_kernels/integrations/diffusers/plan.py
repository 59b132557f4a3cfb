"""Resolve once: a `SafeDIGConfig` and a model become a frozen `SteeringPlan`, every value checked.

`resolve` makes every check `apply_safedig` needs and touches nothing: the sites exist and emit
their streams (`sites.resolve_site`), each SAE is read (once per file), fits its site's width and
the site it was trained for, its weights are finite, its harmful ids are in range, strengths
left to the SAE are its defaults, the gate can open, the window can be read from this model's
timesteps, the CFG rule can be applied, and no two sites overlap. `apply_safedig` installs a
plan and checks nothing again; `check_config` returns one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...ops import as_harmful_mask
from ...sae import TopKSAE
from .config import SafeDIGConfig, SiteConfig, read_sae_source
from .families import Family, family_of
from .sites import ResolvedSite, resolve_site, split_target

__all__ = ["SitePlan", "SteeringPlan", "resolve", "check_sae_site", "check_gate_can_open"]

# Storage dtypes an SAE may be placed in; a model stored in another (fp8 under layerwise casting)
# computes in one of these, and the SAE keeps its own dtype until activations say otherwise.
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class SitePlan:
    """One site, resolved: where, with which SAE and harmful mask, with which values."""

    site: ResolvedSite
    sae: TopKSAE
    harmful: torch.Tensor          # bool [F], CPU
    beta: float
    gamma: float
    tau: float
    window: tuple[float, float]
    cfg: str
    dtype: torch.dtype             # what the SAE is placed in
    device: torch.device
    windowed: bool                 # a window other than (0, 1) can be read from this model's calls
    family_cfg: str                # how the model's pipelines batch guidance (families.Family.cfg)
    sae_source: Optional[str]      # the checkpoint path or hf:// name the SAE was read from
    allow_other_site: bool

    @property
    def key(self) -> str:
        return self.site.spec.key


@dataclass(frozen=True)
class SteeringPlan:
    """What `apply_safedig` installs on one model (`resolve`)."""

    transformer: torch.nn.Module
    pipeline: Any
    family: Family
    sites: tuple[SitePlan, ...]
    enabled: bool
    fused: bool
    telemetry_capacity: Optional[int]   # None: telemetry off
    config: SafeDIGConfig               # as the user gave it


def resolve(pipeline_or_transformer, config: SafeDIGConfig) -> SteeringPlan:
    """Check `config` against a pipeline or transformer and return the plan (module docstring)."""
    if not isinstance(config, SafeDIGConfig):
        raise TypeError(f"config must be a SafeDIGConfig, got {type(config).__name__}")
    transformer, pipeline = split_target(pipeline_or_transformer)
    family = family_of(transformer)
    loaded: dict[str, TopKSAE] = {}
    plans: list[SitePlan] = []
    for cfg in config.sites:
        site = resolve_site(cfg.spec, transformer, pipeline)
        plans.append(_site_plan(cfg, site, family, pipeline, _load(cfg, loaded)))
    _check_overlaps(plans)
    capacity = config.telemetry_capacity if config.telemetry else None
    return SteeringPlan(transformer, pipeline, family, tuple(plans), config.enabled, config.use_fused_ops, capacity,
                        config)


def _load(cfg: SiteConfig, loaded: dict[str, TopKSAE]) -> TopKSAE:
    if isinstance(cfg.sae, TopKSAE):
        return cfg.sae
    path = os.fspath(cfg.sae)
    if path not in loaded:
        loaded[path] = read_sae_source(path, cfg.where)
    return loaded[path]


def _placement(module: torch.nn.Module, sae: TopKSAE) -> tuple[torch.device, torch.dtype]:
    """Where an SAE for `module` is placed: the module's device, and the dtype it computes in:
    the compute dtype of diffusers' layerwise casting where that is on (its weights are stored
    in another), else the dtype its weights are stored in when the ops compute in it, else the
    SAE's own (the activations' dtype decides at each call)."""
    device = next((p.device for p in module.parameters() if p.is_floating_point()), None)
    if device is None:
        raise ValueError(f"{type(module).__name__} has no floating-point parameters to place the SAEs by")
    for m in module.modules():
        hook = getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).get("layerwise_casting")
        if hook is not None and getattr(hook, "compute_dtype", None) in _COMPUTE_DTYPES:
            return device, hook.compute_dtype
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    return device, (dtype if dtype in _COMPUTE_DTYPES else sae.dtype)


def _site_plan(cfg: SiteConfig, site: ResolvedSite, family: Family, pipeline, sae: TopKSAE) -> SitePlan:
    where = cfg.where
    spec = site.spec
    if not site.is_text_encoder:
        if cfg.window != (0.0, 1.0) and not family.knows_progress:
            raise ValueError(f"{where}.window: SafeDIG does not know how {family.name} pipelines encode the timestep, "
                             f"so it cannot place a step in a window; only (0, 1) is possible for this model")
        if cfg.cfg == "cond":
            if not family.cfg.startswith("batched"):
                raise ValueError(f"{where}.cfg='cond' steers the conditional half of a guided batch [uncond; cond]; "
                                 f"{family.name} pipelines do not batch guidance that way ({family.cfg}), so "
                                 f"use cfg='both'")
            if pipeline is None:
                raise ValueError(f"{where}.cfg='cond' needs the pipeline, to read at each call whether it guides: "
                                 f"pass the pipeline to apply_safedig, not its transformer")
    if site.width is not None and sae.d != site.width:
        raise ValueError(f"{where}.sae: SAE width d = {sae.d} but the site's activations have width {site.width}")
    check_sae_site(sae, spec.module, spec.stream, where, cfg.allow_other_site)
    sae.check_finite()  # weights changed in memory since the SAE was built are checked here too
    if cfg.harmful is None:
        harmful = sae.harmful_mask.detach().cpu().clone()
    else:
        harmful = as_harmful_mask(list(cfg.harmful), sae.num_features, torch.device("cpu"), f"{where}.harmful")
    defaults = sae.strengths.tolist()  # the SAE's own values, checked by the one rule when it was made
    beta, gamma, tau = (d if v is None else v for v, d in zip((cfg.beta, cfg.gamma, cfg.tau), defaults))
    check_gate_can_open(where, int(harmful.sum()), tau)
    device, dtype = _placement(site.module, sae)
    windowed = not site.is_text_encoder and family.knows_progress
    source = None if isinstance(cfg.sae, TopKSAE) else os.fspath(cfg.sae)
    return SitePlan(site, sae, harmful, beta, gamma, tau, cfg.window, cfg.cfg, dtype, device, windowed, family.cfg,
                    source, cfg.allow_other_site)


def _check_overlaps(plans: list[SitePlan]) -> None:
    seen: dict[int, list[SitePlan]] = {}
    for p in plans:
        stream = p.site.spec.stream
        for other in seen.setdefault(id(p.site.module), []):
            theirs = other.site.spec.stream
            if "both" in (stream, theirs) or stream == theirs:
                raise ValueError(f"SiteConfig(site={p.key!r}): overlaps {other.key!r} on the same module")
        seen[id(p.site.module)].append(p)


def check_sae_site(sae: TopKSAE, module: str, stream: str, where: str, allow: bool = False) -> None:
    """Refuse an SAE whose metadata names another site or stream than (`module`, `stream`): its
    features describe other activations, so steering with it would quietly do nothing useful.
    Checked for this project's SAEs that record a site (training writes `metadata.site` and
    `metadata.extra["stream"]`), and for SAELens/sparsify SAEs loaded with `site=`/`stream=`
    (recorded the same way); otherwise they name hooks of their own and are not compared.
    `allow` (`SiteConfig.allow_other_site`, `--allow-other-site`) skips the check."""
    meta = sae.metadata
    told = meta.source == "safedig" or "stream" in (meta.extra or {})
    if allow or not told or not meta.site:
        return
    trained_module = meta.site.removeprefix("transformer.")
    trained_stream = (meta.extra or {}).get("stream")
    trained = f"{trained_module}:{trained_stream}" if trained_stream else trained_module
    used = f"{module}:{stream}"
    if module.startswith("text_encoder"):
        # One output, whatever stream a label carries; and the T5 sites are one model under two
        # names (FLUX's text_encoder_2, SD3's text_encoder_3): a T5 SAE fits either.
        trained_stream, used = None, module
        if trained_module.startswith("text_encoder"):
            trained_module = module
    if trained_module != module or (trained_stream is not None and trained_stream != stream):
        raise ValueError(f"{where}: the SAE was trained at site {trained!r} but is used at {used}; use "
                         f"the SAE trained for this site, or allow_other_site=True (--allow-other-site) if this "
                         f"is intended")


def check_gate_can_open(where: str, n_harmful: int, tau: float) -> None:
    """With no harmful features h is 0 for every token, so with tau >= 0 the gate (h > tau)
    never opens: the site would be on in name only. Refuse rather than steer silently off."""
    if n_harmful == 0 and tau >= 0:
        raise ValueError(f"{where}: the harmful set is empty, so h = 0 for every token and the gate h > tau "
                         f"never opens with tau = {tau}; give harmful features, or tau < 0 to Blend every token")
