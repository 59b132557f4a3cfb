"""What a user asks `apply_safedig` for: `SiteConfig`, `SafeDIGConfig` and their JSON file.

Imports no diffusers, so a workflow step (routing, say) can build and write configs on a
machine without a pipeline. Each value is checked once, when a config is made (a config is
frozen, so it stays checked); what needs the model (does the site exist, does the SAE fit it)
is checked once more when `plan.resolve` turns a config into a plan for one model.

The one writer of the steering-config JSON is `SafeDIGConfig.to_json`; `from_json` reads it
back. Relative SAE paths are relative to the JSON file's folder; an SAE on the Hugging Face Hub
is named `"hf://owner/name[/subfolder][@revision]"` (read with `TopKSAE.from_pretrained`, kept
as written); `null` means "the SAE's own default":

    {"format": "safedig-diffusers", "version": 2,
     "enabled": true, "use_fused_ops": true, "telemetry": true, "telemetry_capacity": 1024,
     "sites": [{"site": "single_transformer_blocks.9:image", "sae": "saes/sb9.safetensors",
                "harmful": [12, 40] | null, "beta": 0.5 | null, "gamma": 1.0 | null,
                "tau": 0.0 | null, "window": [0.0, 0.4], "cfg": "both", "allow_other_site": false}]}

Version 1 files (a `site` module path and a separate `stream`) are read too.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..._checks import STRENGTH_NAMES, harmful_ids, strength_or_none
from ..._io import atomic_write_json, read_json
from ...checkpoints import is_hub_uri, parse_hub_uri
from ...sae import TopKSAE
from .sites import STEER_STREAMS, SiteSpec

__all__ = ["SiteConfig", "SafeDIGConfig", "CFG_MODES", "JSON_FORMAT", "JSON_VERSION", "check_window",
           "read_sae_source"]

JSON_FORMAT = "safedig-diffusers"
JSON_VERSION = 2
CFG_MODES = ("both", "cond")

PathLike = Union[str, "os.PathLike[str]"]
SAESource = Union[TopKSAE, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class SiteConfig:
    """One intervention site and how to steer it.

    Args:
        site: `"module:stream"`: a block the transformer's diffusers block metadata describes
            (`transformer_blocks.{i}`, `single_transformer_blocks.{i}`, ...) and the stream of
            its output to steer, `image`, `text` or `both` (the tokens of both streams through
            one SAE); the stream defaults to `image`. Or the T5 encoder's pipeline component
            name (`text_encoder_2` FLUX, `text_encoder_3` SD3), whose stream is `text`. Held
            as the full key (`site` always ends in `:stream`).
        sae: a `TopKSAE`, a checkpoint path (read with `TopKSAE.load`), or an SAE on the Hugging
            Face Hub as `"hf://owner/name[/subfolder][@revision]"` (`TopKSAE.from_pretrained`).
            Its width `d` must be the site's width (FLUX 3072, SD3.5 Large 2432, T5 4096).
        harmful: harmful feature ids (or a bool mask `[F]`, held as its ids); `None`: the
            SAE's own set.
        beta: Blend strength in [0, 1]; `None`: the SAE's default.
        gamma: Repel strength (finite); `None`: the SAE's default.
        tau: gate threshold (finite; < 0 steers every token); `None`: the SAE's default.
        window: `(start, end)` fractions of the noise schedule, `0 <= start < end <= 1`, as
            progress `p = 1 - sigma` read from the transformer's `timestep` input (0 = pure
            noise); steering is on for `start <= p < end` (`end = 1` includes 1). This is the
            noise level, not the step count: on a shifted schedule the two differ (FLUX.1-dev at
            1024², shift e^1.15: `p < 0.4` spans the first two thirds of 28 steps). Must be
            `(0, 1)` for text-encoder sites (once per prompt).
        cfg: `"both"` steers every row of a guided batch; `"cond"` only the conditional rows
            (models whose pipelines batch CFG as `[uncond; cond]`, such as SD3; needs the
            pipeline passed to `apply_safedig`).
        allow_other_site: use an SAE whose metadata names another site or stream than this
            one (refused otherwise: an SAE steers the activations it was trained on).
    """

    site: str
    sae: SAESource
    harmful: Optional[tuple[int, ...]] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    tau: Optional[float] = None
    window: tuple[float, float] = (0.0, 1.0)
    cfg: str = "both"
    allow_other_site: bool = False

    def __post_init__(self) -> None:
        try:
            spec = SiteSpec.parse(self.site, STEER_STREAMS)
        except ValueError as e:
            raise ValueError(f"SiteConfig.site: {e}") from None
        set_ = object.__setattr__  # frozen: normalise each field once, here
        set_(self, "site", spec.key)
        set_(self, "_spec", spec)  # not a field: parsed once, here
        where = self.where
        if not isinstance(self.sae, (TopKSAE, str, os.PathLike)):
            raise TypeError(f"{where}.sae must be a TopKSAE, a checkpoint path or an hf:// name, "
                            f"got {type(self.sae).__name__}")
        if is_hub_uri(self.sae):
            try:
                parse_hub_uri(self.sae)
            except ValueError as e:
                raise ValueError(f"{where}.sae: {e}") from None
        if self.cfg not in CFG_MODES:
            raise ValueError(f"{where}.cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        if self.harmful is not None:
            set_(self, "harmful", tuple(_harmful_as_ids(self.harmful, f"{where}.harmful")))
        for name in STRENGTH_NAMES:
            set_(self, name, strength_or_none(getattr(self, name), name, f"{where}.{name}"))
        set_(self, "window", check_window(self.window, f"{where}.window"))
        if not isinstance(self.allow_other_site, bool):
            raise TypeError(f"{where}.allow_other_site must be a bool, got {self.allow_other_site!r}")
        if spec.is_text_encoder:
            if self.window != (0.0, 1.0):
                raise ValueError(f"{where}.window: text-encoder sites run once per prompt, not per step; "
                                 f"the window must be (0, 1), got {self.window}")
            if self.cfg != "both":
                raise ValueError(f"{where}.cfg: a text-encoder site cannot tell the negative prompt from the "
                                 f"prompt; cfg must be 'both', got {self.cfg!r}")

    @property
    def spec(self) -> SiteSpec:
        """The site parsed: its module and stream."""
        return self._spec

    @property
    def where(self) -> str:
        """How error messages name this site."""
        return f"SiteConfig(site={self.site!r})"


@dataclass(frozen=True)
class SafeDIGConfig:
    """What `apply_safedig` installs.

    Args:
        sites: the sites to steer, at least one.
        enabled: initial state of the global switch (`handle.enable()` / `disable()`).
        use_fused_ops: `True` runs `torch.ops.safedig.steer`; `False` the PyTorch reference
            `safedig_kernels.reference.steer` (the baseline the benchmarks compare against).
        telemetry: record per-site, per-call gate statistics (a few tiny reductions per site).
        telemetry_capacity: rows kept per site; later calls overwrite the last row
            (`handle.reset_telemetry()` between generations keeps them all).
    """

    sites: tuple[SiteConfig, ...]
    enabled: bool = True
    use_fused_ops: bool = True
    telemetry: bool = True
    telemetry_capacity: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.sites, (list, tuple)) or not self.sites:
            raise ValueError(f"SafeDIGConfig.sites must be a non-empty list of SiteConfig, got {self.sites!r}")
        for i, s in enumerate(self.sites):
            if not isinstance(s, SiteConfig):
                raise TypeError(f"SafeDIGConfig.sites[{i}] must be a SiteConfig, got {type(s).__name__}")
        object.__setattr__(self, "sites", tuple(self.sites))
        for name in ("enabled", "use_fused_ops", "telemetry"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SafeDIGConfig.{name} must be a bool, got {getattr(self, name)!r}")
        cap = self.telemetry_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"SafeDIGConfig.telemetry_capacity must be an int >= 1, got {cap!r}")

    def with_loaded_saes(self) -> "SafeDIGConfig":
        """This config with each SAE path or hf:// name replaced by the `TopKSAE` read from it (each
        file read once), so that a missing or unreadable SAE fails before any model is loaded."""
        loaded: dict[str, TopKSAE] = {}
        sites = []
        for cfg in self.sites:
            site = copy.copy(cfg)  # its values are checked already: only the SAE changes
            if not isinstance(cfg.sae, TopKSAE):
                path = os.fspath(cfg.sae)
                if path not in loaded:
                    loaded[path] = read_sae_source(path, cfg.where)
                object.__setattr__(site, "sae", loaded[path])
            sites.append(site)
        out = copy.copy(self)
        object.__setattr__(out, "sites", tuple(sites))
        return out

    def to_json(self, path: PathLike, sae_paths: Optional[Sequence[Optional[PathLike]]] = None) -> Path:
        """Write the documented JSON file (module docstring), atomically. SAEs are stored as paths
        relative to the file's folder, or hf:// names as given; a site holding a `TopKSAE` object
        needs the file it was saved to in `sae_paths` (one entry per site, None where the site's
        SAE is a path already). Returns the path."""
        path = Path(path)
        folder = os.path.dirname(os.path.abspath(path))
        if sae_paths is not None and len(sae_paths) != len(self.sites):
            raise ValueError(f"SafeDIGConfig.to_json: sae_paths needs one entry per site ({len(self.sites)}), "
                             f"got {len(sae_paths)}")
        sites = []
        for i, s in enumerate(self.sites):
            sae = s.sae if sae_paths is None or sae_paths[i] is None else os.fspath(sae_paths[i])
            if isinstance(sae, TopKSAE):
                raise ValueError(f"SafeDIGConfig.to_json: site {s.site!r} holds a TopKSAE object; JSON needs a "
                                 f"checkpoint path (save it with TopKSAE.save and pass sae_paths)")
            entry = {f.name: getattr(s, f.name) for f in fields(SiteConfig)}
            entry["sae"] = sae if is_hub_uri(sae) else _relpath(os.fspath(sae), folder)
            entry["harmful"] = None if s.harmful is None else list(s.harmful)
            entry["window"] = list(s.window)
            sites.append(entry)
        doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "enabled": self.enabled,
               "use_fused_ops": self.use_fused_ops, "telemetry": self.telemetry,
               "telemetry_capacity": self.telemetry_capacity, "sites": sites}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, doc, indent=2)
        return path

    @classmethod
    def from_json(cls, path: PathLike) -> "SafeDIGConfig":
        """Read a file written by `to_json` (version 1 or 2); validates every field."""
        where = f"SafeDIGConfig.from_json({os.fspath(path)!r})"
        doc = read_json(path, "steering config")
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise ValueError(f"{where}: expected a JSON object with \"format\": \"{JSON_FORMAT}\"")
        version = doc.get("version")
        if isinstance(version, bool) or version not in (1, JSON_VERSION):  # true == 1 in Python
            raise ValueError(f"{where}: unsupported version {version!r}, expected 1 or {JSON_VERSION}")
        top = {"format", "version", "enabled", "use_fused_ops", "telemetry", "telemetry_capacity", "sites"}
        _reject_unknown(doc, top, where)
        if not isinstance(doc.get("sites"), list):
            raise ValueError(f"{where}: \"sites\" must be a list")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        site_keys = {f.name for f in fields(SiteConfig)} | ({"stream"} if version == 1 else set())
        sites = []
        for i, d in enumerate(doc["sites"]):
            if not isinstance(d, dict):
                raise ValueError(f"{where}: sites[{i}] must be an object")
            _reject_unknown(d, site_keys, f"{where} sites[{i}]")
            d = dict(d)
            if not isinstance(d.get("sae"), str):
                raise ValueError(f"{where}: sites[{i}].sae must be a checkpoint path or hf:// name string")
            if not is_hub_uri(d["sae"]):  # a Hub name is no path: kept as written, checked by SiteConfig
                d["sae"] = os.path.normpath(os.path.join(folder, d["sae"]))
            if "stream" in d:  # version 1: the module and its stream apart
                stream = d.pop("stream")
                if not isinstance(stream, str) or not isinstance(d.get("site"), str):
                    raise ValueError(f"{where}: sites[{i}].site and .stream must be strings")
                d["site"] = f"{d['site']}:{stream}" if ":" not in d["site"] else d["site"]
            try:
                sites.append(SiteConfig(**d))
            except (TypeError, ValueError) as e:  # name the file, not only the site
                raise type(e)(f"{where} sites[{i}]: {e}") from None
        kw = {k: doc[k] for k in ("enabled", "use_fused_ops", "telemetry", "telemetry_capacity") if k in doc}
        try:
            return cls(sites=tuple(sites), **kw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None


def check_window(window, where: str) -> tuple[float, float]:
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"{where} must be a (start, end) pair of floats, got {window!r}")
    lo, hi = window
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{where} must be a (start, end) pair of finite floats, got {window!r}")
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{where} must satisfy 0 <= start < end <= 1 (fractions of the schedule), got {window!r}")
    return (float(lo), float(hi))


def read_sae_source(source: str, where: str) -> TopKSAE:
    """The SAE at a checkpoint path or hf:// name; errors say which site's SAE failed."""
    if is_hub_uri(source):
        try:
            return TopKSAE.from_pretrained(source)
        except ImportError:
            raise
        except FileNotFoundError as e:  # not on the Hub, or not cached when offline
            raise FileNotFoundError(f"{where}.sae: {e}") from e
        except Exception as e:  # any reader error means the repo holds no usable SAE
            raise ValueError(f"{where}.sae: {source!r} is not a valid SAE: {e}") from e
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{where}.sae: no SAE checkpoint at {source!r} (the file does not exist)")
    try:
        return TopKSAE.load(source)
    except ImportError:
        raise
    except Exception as e:  # any reader error means the file is not a usable checkpoint
        raise ValueError(f"{where}.sae: {source!r} is not a valid SAE checkpoint: {e}") from e


def _harmful_as_ids(harmful, where: str) -> list[int]:
    """Ids from ids, or from a bool mask (a tensor, array or list of bools) of any length: the
    SAE's F is not known until the plan checks the ids against it."""
    if hasattr(harmful, "__array__") and not isinstance(harmful, torch.Tensor):  # numpy
        harmful = torch.as_tensor(harmful)
    if isinstance(harmful, torch.Tensor) and harmful.dtype == torch.bool:
        if harmful.dim() != 1:
            raise ValueError(f"{where}: a bool mask must be 1-D [F], got shape {tuple(harmful.shape)}")
        return harmful.nonzero().flatten().tolist()
    if isinstance(harmful, (list, tuple)) and harmful and all(isinstance(j, bool) for j in harmful):
        return [i for i, on in enumerate(harmful) if on]
    return harmful_ids(harmful, None, where)


def _reject_unknown(d: dict, known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _relpath(p: str, folder: str) -> str:
    try:
        return os.path.relpath(os.path.abspath(p), folder)
    except ValueError:  # another drive on Windows
        return os.path.abspath(p)
