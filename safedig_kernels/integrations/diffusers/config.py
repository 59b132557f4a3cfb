"""What `apply_safedig` installs: `SiteConfig`, `SafeDIGConfig`, their JSON file and their checks.

Imports no diffusers, so a workflow step (routing, say) can build and write configs on a
machine without a pipeline. The one writer of the steering-config JSON is
`SafeDIGConfig.to_json`; `from_json` reads it back. Relative SAE paths are relative to the JSON
file's folder; an SAE on the Hugging Face Hub is named `"hf://owner/name[/subfolder][@revision]"`
(read with `TopKSAE.from_pretrained`, kept as written); `null` means "the SAE's own default":

    {"format": "safedig-diffusers", "version": 1,
     "enabled": true, "use_fused_ops": true, "telemetry": true, "telemetry_capacity": 1024,
     "sites": [{"site": "single_transformer_blocks.9", "sae": "saes/sb9.safetensors",
                "stream": "image", "harmful": [12, 40] | null, "beta": 0.5 | null,
                "gamma": 1.0 | null, "tau": 0.0 | null, "window": [0.0, 0.4], "cfg": "both",
                "allow_other_site": false}]}
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..._checks import STRENGTH_NAMES, harmful_ids, strength_or_none
from ..._io import atomic_write_json, read_json
from ...checkpoints import STREAMS, is_hub_uri, parse_hub_uri
from ...sae import TopKSAE

__all__ = ["SiteConfig", "SafeDIGConfig", "STEER_STREAMS", "CFG_MODES", "JSON_FORMAT", "JSON_VERSION",
           "resolve_sae", "check_sae_site", "check_strengths", "check_window", "check_gate_can_open"]

JSON_FORMAT = "safedig-diffusers"
JSON_VERSION = 1
STEER_STREAMS = STREAMS  # the streams an SAE's metadata may record (checkpoints)
CFG_MODES = ("both", "cond")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class SiteConfig:
    """One intervention site and how to steer it.

    Args:
        site: module name: `transformer_blocks.{i}`, `single_transformer_blocks.{i}` (FLUX), or
            the T5 encoder's pipeline component name (`text_encoder_2` FLUX, `text_encoder_3` SD3).
        sae: a `TopKSAE`, a checkpoint path (read with `TopKSAE.load`), or an SAE on the Hugging
            Face Hub as `"hf://owner/name[/subfolder][@revision]"` (`TopKSAE.from_pretrained`).
            Its width `d` must be the site's width (FLUX 3072, SD3.5 Large 2432, T5 4096).
        stream: `"image"`, `"text"` or `"both"` (the tokens of both streams through one SAE).
            A FLUX double block with a different SAE per stream is two `SiteConfig`s. Ignored
            for text-encoder sites, which have one stream.
        harmful: harmful feature ids; `None`: the SAE's own set.
        beta: Blend strength in [0, 1]; `None`: the SAE's default.
        gamma: Repel strength (finite); `None`: the SAE's default.
        tau: gate threshold (finite; < 0 steers every token); `None`: the SAE's default.
        window: `(start, end)` fractions of the noise schedule, `0 <= start < end <= 1`, as
            progress `p = 1 - sigma` read from the transformer's `timestep` input (0 = pure
            noise); steering is on for `start <= p < end` (`end = 1` includes 1). This is the
            noise level, not the step count: on a shifted schedule the two differ (FLUX.1-dev at
            1024², shift e^1.15: `p < 0.4` spans the first two thirds of 28 steps). Telemetry
            reports `p` per step. Must be `(0, 1)` for text-encoder sites (once per prompt).
        cfg: `"both"` steers every row of a CFG batch; `"cond"` only its conditional half
            (SD3 pipelines; needs the pipeline passed to `apply_safedig`).
        allow_other_site: use an SAE whose metadata names another site or stream than this
            one (refused otherwise: an SAE steers the activations it was trained on).
    """

    site: str
    sae: Union[TopKSAE, str, "os.PathLike[str]"]
    stream: str = "image"
    harmful: Optional[list[int]] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    tau: Optional[float] = None
    window: tuple[float, float] = (0.0, 1.0)
    cfg: str = "both"
    allow_other_site: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise TypeError(f"SiteConfig.site must be a non-empty str, got {self.site!r}")
        where = self.where
        if not isinstance(self.sae, (TopKSAE, str, os.PathLike)):
            raise TypeError(f"{where}.sae must be a TopKSAE, a checkpoint path or an hf:// name, "
                            f"got {type(self.sae).__name__}")
        if is_hub_uri(self.sae):
            try:
                parse_hub_uri(self.sae)
            except ValueError as e:
                raise ValueError(f"{where}.sae: {e}") from None
        if self.stream not in STEER_STREAMS:
            raise ValueError(f"{where}.stream must be one of {STEER_STREAMS}, got {self.stream!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"{where}.cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        if self.harmful is not None:
            self.harmful = harmful_ids(self.harmful, None, f"{where}.harmful")
        check_strengths(where, self.beta, self.gamma, self.tau)
        self.window = check_window(self.window, f"{where}.window")
        if not isinstance(self.allow_other_site, bool):
            raise TypeError(f"{where}.allow_other_site must be a bool, got {self.allow_other_site!r}")

    @property
    def where(self) -> str:
        """How error messages name this site."""
        return f"SiteConfig(site={self.site!r})"


@dataclass
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

    sites: list[SiteConfig]
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
        self.sites = list(self.sites)
        for name in ("enabled", "use_fused_ops", "telemetry"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SafeDIGConfig.{name} must be a bool, got {getattr(self, name)!r}")
        cap = self.telemetry_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"SafeDIGConfig.telemetry_capacity must be an int >= 1, got {cap!r}")

    def with_loaded_saes(self) -> "SafeDIGConfig":
        """This config with every SAE path or hf:// name replaced by the loaded `TopKSAE` (each
        read once), so a missing or unreadable SAE fails here, before any model is loaded."""
        loaded: dict[str, TopKSAE] = {}
        sites = []
        for s in self.sites:
            if not isinstance(s.sae, TopKSAE):
                path = os.fspath(s.sae)
                if path not in loaded:
                    loaded[path] = resolve_sae(path, s.where)
                s = dataclasses.replace(s, sae=loaded[path])
            sites.append(s)
        return dataclasses.replace(self, sites=sites)

    def with_sae_paths(self, paths: Mapping[int, PathLike]) -> "SafeDIGConfig":
        """This config with the SAE objects of the sites at the given indices replaced by the
        files they were saved to, as `to_json` needs."""
        sites = [dataclasses.replace(s, sae=os.fspath(paths[i])) if i in paths else s for i, s in enumerate(self.sites)]
        return dataclasses.replace(self, sites=sites)

    def to_json(self, path: PathLike) -> Path:
        """Write the documented JSON file (module docstring), atomically. SAEs must be given as
        paths, stored relative to the file's folder, or hf:// names, stored as given. Returns
        the path."""
        path = Path(path)
        folder = os.path.dirname(os.path.abspath(path))
        sites = []
        for s in self.sites:
            if isinstance(s.sae, TopKSAE):
                raise ValueError(f"SafeDIGConfig.to_json: site {s.site!r} holds a TopKSAE object; "
                                 f"JSON needs a checkpoint path (save it with TopKSAE.save first)")
            d = dataclasses.asdict(s)
            d["sae"] = s.sae if is_hub_uri(s.sae) else _relpath(os.fspath(s.sae), folder)
            d["window"] = list(s.window)
            sites.append(d)
        doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "enabled": self.enabled,
               "use_fused_ops": self.use_fused_ops, "telemetry": self.telemetry,
               "telemetry_capacity": self.telemetry_capacity, "sites": sites}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, doc, indent=2)
        return path

    @classmethod
    def from_json(cls, path: PathLike) -> "SafeDIGConfig":
        """Read a file written by `to_json`; validates every field."""
        where = f"SafeDIGConfig.from_json({os.fspath(path)!r})"
        doc = read_json(path, "steering config")
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise ValueError(f"{where}: expected a JSON object with \"format\": \"{JSON_FORMAT}\"")
        if isinstance(doc.get("version"), bool) or doc.get("version") != JSON_VERSION:  # true == 1 in Python
            raise ValueError(f"{where}: unsupported version {doc.get('version')!r}, expected {JSON_VERSION}")
        top = {"format", "version", "enabled", "use_fused_ops", "telemetry", "telemetry_capacity", "sites"}
        _reject_unknown(doc, top, where)
        if not isinstance(doc.get("sites"), list):
            raise ValueError(f"{where}: \"sites\" must be a list")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        site_keys = {f.name for f in dataclasses.fields(SiteConfig)}
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
            if "window" in d:
                d["window"] = check_window(d["window"], f"{where} sites[{i}].window")
            try:
                sites.append(SiteConfig(**d))
            except (TypeError, ValueError) as e:  # name the file, not only the site
                raise type(e)(f"{where} sites[{i}]: {e}") from None
        kw = {k: doc[k] for k in ("enabled", "use_fused_ops", "telemetry", "telemetry_capacity") if k in doc}
        try:
            return cls(sites=sites, **kw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None


# -- checks shared by the configs, apply_safedig and the handle -----------------------------

def resolve_sae(sae: Union[TopKSAE, PathLike], where: str) -> TopKSAE:
    """`sae` itself, or the SAE read from its path or hf:// name; errors say which site's SAE
    failed."""
    if isinstance(sae, TopKSAE):
        return sae
    if is_hub_uri(sae):
        try:
            return TopKSAE.from_pretrained(sae)
        except ImportError:
            raise
        except FileNotFoundError as e:  # not on the Hub, or not cached when offline
            raise FileNotFoundError(f"{where}.sae: {e}") from e
        except Exception as e:  # any reader error means the repo holds no usable SAE
            raise ValueError(f"{where}.sae: {sae!r} is not a valid SAE: {e}") from e
    path = os.fspath(sae)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}.sae: no SAE checkpoint at {path!r} (the file does not exist)")
    try:
        return TopKSAE.load(path)
    except ImportError:
        raise
    except Exception as e:  # any reader error means the file is not a usable checkpoint
        raise ValueError(f"{where}.sae: {path!r} is not a valid SAE checkpoint: {e}") from e


def check_sae_site(sae: TopKSAE, site: str, stream: str, where: str, allow: bool = False) -> None:
    """Refuse an SAE whose metadata names another site or stream than (`site`, `stream`): its
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
    used = f"{site}:{stream}"
    if site.startswith("text_encoder"):
        # One output, whatever stream a label carries; and the T5 sites are one model under two
        # names (FLUX's text_encoder_2, SD3's text_encoder_3): a T5 SAE fits either.
        trained_stream, used = None, site
        if trained_module.startswith("text_encoder"):
            trained_module = site
    if trained_module != site or (trained_stream is not None and trained_stream != stream):
        raise ValueError(f"{where}: the SAE was trained at site {trained!r} but is used at {used}; use "
                         f"the SAE trained for this site, or allow_other_site=True (--allow-other-site) if this "
                         f"is intended")


def check_strengths(where: str, beta, gamma, tau) -> None:
    """The one rule for strengths (`_checks.strength`); None means "the SAE's default"."""
    for name, v in zip(STRENGTH_NAMES, (beta, gamma, tau)):
        strength_or_none(v, name, f"{where}.{name}")


def check_gate_can_open(where: str, n_harmful: int, tau: float) -> None:
    """With no harmful features h is 0 for every token, so with tau >= 0 the gate (h > tau)
    never opens: the site would be on in name only. Refuse rather than steer silently off."""
    if n_harmful == 0 and tau >= 0:
        raise ValueError(f"{where}: the harmful set is empty, so h = 0 for every token and the gate h > tau "
                         f"never opens with tau = {tau}; give harmful features, or tau < 0 to Blend every token")


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


def _reject_unknown(d: dict, known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _relpath(p: str, folder: str) -> str:
    try:
        return os.path.relpath(os.path.abspath(p), folder)
    except ValueError:  # another drive on Windows
        return os.path.abspath(p)
