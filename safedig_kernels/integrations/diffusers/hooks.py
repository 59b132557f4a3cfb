"""SafeDIG steering inside diffusers pipelines (FLUX.1, SD3/SD3.5), built on diffusers' hooks.

    config = SafeDIGConfig(sites=[
        SiteConfig("single_transformer_blocks.9", sae="sb9.safetensors", beta=0.5, gamma=1.0, window=(0.0, 0.4)),
        SiteConfig("transformer_blocks.3", sae=sae_txt, stream="text"),
    ])
    handle = apply_safedig(pipe, config)
    image = pipe(prompt).images[0]
    handle.set_site("single_transformer_blocks.9", gamma=2.0)   # no recompile, no re-hook
    print(handle.telemetry())
    remove_safedig(pipe)

Sites (SPEC §4) are addressed by name: `transformer_blocks.{i}` (FLUX double blocks and SD3
joint blocks: image stream `output[1]`, text stream `output[0]`), `single_transformer_blocks.{i}`
(FLUX single blocks: text tokens are the first `txt_len` positions of the joint sequence), and
the T5 text encoder by its pipeline component name (`text_encoder_2` in FLUX pipelines,
`text_encoder_3` in SD3 pipelines), steered once per prompt encoding.

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

CFG: SD3 pipelines batch `[uncond; cond]`; `cfg="cond"` steers only the second half. Which
calls carry such a batch is read in Python when the pipeline encodes its prompt (its
`do_classifier_free_guidance`), outside any compiled region; the extra skip-layer-guidance call
(`skip_layers=...`) is cond-only. FLUX pipelines never batch CFG, so `cfg="cond"` is refused there.

JSON file (`SafeDIGConfig.to_json` / `from_json`; written by the routing tool). Relative SAE
paths are relative to the JSON file's folder; `null` means "the SAE's own default":

    {"format": "safedig-diffusers", "version": 1,
     "enabled": true, "use_fused_ops": true, "telemetry": true, "telemetry_capacity": 1024,
     "sites": [{"site": "single_transformer_blocks.9", "sae": "saes/sb9.safetensors",
                "stream": "image", "harmful": [12, 40] | null, "beta": 0.5 | null,
                "gamma": 1.0 | null, "tau": 0.0 | null, "window": [0.0, 0.4], "cfg": "both"}]}
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .. import reference
from ..ops import as_harmful_mask
from ..ops.steer import _steer_op
from ..sae import TopKSAE

__all__ = ["SiteConfig", "SafeDIGConfig", "SafeDIGHandle", "apply_safedig", "remove_safedig"]

_STEER_HOOK = "safedig_steer"
_CLOCK_HOOK = "safedig_clock"
_HANDLE_ATTR = "_safedig_handle"
_JSON_FORMAT = "safedig-diffusers"
_JSON_VERSION = 1
_STREAMS = ("image", "text", "both")
_CFG_MODES = ("both", "cond")
# Telemetry columns, per site and call: row written?, schedule progress, steering active
# (in window, switched on, a non-zero strength), fraction of tokens with h > tau, mean finite h.
_TELEMETRY_COLUMNS = ("written", "progress", "active", "gated_fraction", "mean_harm")

PathLike = Union[str, "os.PathLike[str]"]


# -- configuration -----------------------------------------------------------------------

@dataclass
class SiteConfig:
    """One intervention site and how to steer it.

    Args:
        site: module name: `transformer_blocks.{i}`, `single_transformer_blocks.{i}` (FLUX), or
            the T5 encoder's pipeline component name (`text_encoder_2` FLUX, `text_encoder_3` SD3).
        sae: a `TopKSAE` or a checkpoint path (read with `TopKSAE.load`). Its width `d` must be
            the site's width (FLUX 3072, SD3.5 Large 2432, T5 4096).
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

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise TypeError(f"SiteConfig.site must be a non-empty str, got {self.site!r}")
        where = f"SiteConfig(site={self.site!r})"
        if not isinstance(self.sae, (TopKSAE, str, os.PathLike)):
            raise TypeError(f"{where}.sae must be a TopKSAE or a checkpoint path, got {type(self.sae).__name__}")
        if self.stream not in _STREAMS:
            raise ValueError(f"{where}.stream must be one of {_STREAMS}, got {self.stream!r}")
        if self.cfg not in _CFG_MODES:
            raise ValueError(f"{where}.cfg must be one of {_CFG_MODES}, got {self.cfg!r}")
        if self.harmful is not None:
            self.harmful = _check_ids(self.harmful, f"{where}.harmful")
        _check_strengths(where, self.beta, self.gamma, self.tau)
        self.window = _check_window(self.window, f"{where}.window")


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

    def to_json(self, path: PathLike) -> None:
        """Write the documented JSON file (module docstring). SAEs must be given as paths;
        they are stored relative to the file's folder."""
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        sites = []
        for s in self.sites:
            if isinstance(s.sae, TopKSAE):
                raise ValueError(f"SafeDIGConfig.to_json: site {s.site!r} holds a TopKSAE object; "
                                 f"JSON needs a checkpoint path (save it with TopKSAE.save first)")
            d = dataclasses.asdict(s)
            d["sae"] = _relpath(os.fspath(s.sae), folder)
            d["window"] = list(s.window)
            sites.append(d)
        doc = {"format": _JSON_FORMAT, "version": _JSON_VERSION, "enabled": self.enabled,
               "use_fused_ops": self.use_fused_ops, "telemetry": self.telemetry,
               "telemetry_capacity": self.telemetry_capacity, "sites": sites}
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, path: PathLike) -> "SafeDIGConfig":
        """Read a file written by `to_json` (or the routing tool); validates every field."""
        with open(path) as f:
            doc = json.load(f)
        where = f"SafeDIGConfig.from_json({os.fspath(path)!r})"
        if not isinstance(doc, dict) or doc.get("format") != _JSON_FORMAT:
            raise ValueError(f"{where}: expected a JSON object with \"format\": \"{_JSON_FORMAT}\"")
        if doc.get("version") != _JSON_VERSION:
            raise ValueError(f"{where}: unsupported version {doc.get('version')!r}, expected {_JSON_VERSION}")
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
                raise ValueError(f"{where}: sites[{i}].sae must be a checkpoint path string")
            d["sae"] = os.path.normpath(os.path.join(folder, d["sae"]))
            if "window" in d:
                d["window"] = _check_window(d["window"], f"{where} sites[{i}].window")
            sites.append(SiteConfig(**d))
        kw = {k: doc[k] for k in ("enabled", "use_fused_ops", "telemetry", "telemetry_capacity") if k in doc}
        return cls(sites=sites, **kw)


def _reject_unknown(d: dict, known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _relpath(p: str, folder: str) -> str:
    try:
        return os.path.relpath(os.path.abspath(p), folder)
    except ValueError:  # another drive on Windows
        return os.path.abspath(p)


def _check_ids(ids, where: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{where} must be a list of feature ids, got {type(ids).__name__}")
    out = []
    for j in ids:
        if isinstance(j, bool) or not isinstance(j, int) or j < 0:
            raise ValueError(f"{where} must hold non-negative int feature ids, got {j!r}")
        out.append(int(j))
    return out


def _check_strengths(where: str, beta, gamma, tau) -> None:
    for name, v in (("beta", beta), ("gamma", gamma), ("tau", tau)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where}.{name} must be a float or None, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{where}.{name} must be finite, got {v}")
    if beta is not None and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}.beta must lie in [0, 1] (Blend strength, SPEC §2), got {beta}")


def _check_gate_can_open(where: str, n_harmful: int, tau: float) -> None:
    """With no harmful features h is 0 for every token, so with tau >= 0 the gate (h > tau)
    never opens: the site would be on in name only. Refuse rather than steer silently off."""
    if n_harmful == 0 and tau >= 0:
        raise ValueError(f"{where}: the harmful set is empty, so h = 0 for every token and the gate h > tau "
                         f"never opens with tau = {tau}; give harmful features, or tau < 0 to Blend every token")


def _check_window(window, where: str) -> tuple[float, float]:
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"{where} must be a (start, end) pair of floats, got {window!r}")
    lo, hi = window
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{where} must be a (start, end) pair of finite floats, got {window!r}")
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{where} must satisfy 0 <= start < end <= 1 (fractions of the schedule), got {window!r}")
    return (float(lo), float(hi))


# -- models and sites --------------------------------------------------------------------

@dataclass
class _ModelSpec:
    """What differs between the supported transformers."""

    name: str
    timestep_scale: float        # timestep input = sigma * scale
    block_stacks: tuple[str, ...]
    cfg_pipelines: tuple[str, ...]  # pipeline classes that batch CFG as [uncond; cond]


def _model_spec(transformer: torch.nn.Module) -> Optional[_ModelSpec]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        # FluxPipeline passes timestep / 1000 (= sigma); the model multiplies by 1000 itself.
        return _ModelSpec("FLUX", 1.0, ("transformer_blocks", "single_transformer_blocks"), ())
    if isinstance(transformer, SD3Transformer2DModel):
        return _ModelSpec("SD3", 1000.0, ("transformer_blocks",),
                          ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                           "StableDiffusion3InpaintPipeline"))
    return None


@dataclass
class _Site:
    """A resolved site name: the module to hook and what it emits."""

    module: torch.nn.Module
    kind: str          # "block" or "text_encoder"
    width: int
    has_text_out: bool  # False for SD3's last joint block (context_pre_only)


_BLOCK_SITE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)$")


def _valid_sites(transformer, spec: _ModelSpec, pipeline) -> str:
    names = [f"{s}.0..{len(getattr(transformer, s)) - 1}" for s in spec.block_stacks]
    names += list(_text_encoders(pipeline))
    return ", ".join(names)


def _text_encoders(pipeline) -> dict[str, torch.nn.Module]:
    if pipeline is None:
        return {}
    try:
        from transformers import T5EncoderModel
    except ImportError:  # pragma: no cover - diffusers pipelines need transformers
        return {}
    return {n: m for n, m in pipeline.components.items()
            if n.startswith("text_encoder") and isinstance(m, T5EncoderModel)}


def _resolve_site(name: str, transformer, spec: _ModelSpec, pipeline) -> _Site:
    m = _BLOCK_SITE.match(name)
    if m and m.group(1) in spec.block_stacks:
        stack = getattr(transformer, m.group(1))
        i = int(m.group(2))
        if i >= len(stack):
            raise ValueError(f"unknown site {name!r}: {spec.name} has {m.group(1)}.0..{len(stack) - 1}")
        block = stack[i]
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        return _Site(block, "block", width, not getattr(block, "context_pre_only", False))
    if name.startswith("text_encoder"):
        if pipeline is None:
            raise ValueError(f"site {name!r} is a text encoder: pass the pipeline, not the transformer, "
                             f"to apply_safedig")
        encoders = _text_encoders(pipeline)
        if name not in encoders:
            have = type(getattr(pipeline, name, None)).__name__
            raise ValueError(f"unknown site {name!r}: text-encoder sites must be T5EncoderModel components "
                             f"of the pipeline, and {type(pipeline).__name__}.{name} is {have}; "
                             f"valid sites: {_valid_sites(transformer, spec, pipeline)}")
        enc = encoders[name]
        return _Site(enc, "text_encoder", enc.config.d_model, True)
    raise ValueError(f"unknown site {name!r} for {spec.name}; valid sites: {_valid_sites(transformer, spec, pipeline)}")


def _load_sae(sae, where: str) -> TopKSAE:
    if isinstance(sae, TopKSAE):
        return sae
    path = os.fspath(sae)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}.sae: no SAE checkpoint at {path!r}")
    try:
        loaded = TopKSAE.load(path)
    except ImportError:
        raise
    except Exception as e:  # any reader error means the file is not a usable checkpoint
        raise ValueError(f"{where}.sae: {path!r} is not a valid SAE checkpoint: {e}") from e
    if not isinstance(loaded, TopKSAE):
        raise ValueError(f"{where}.sae: TopKSAE.load({path!r}) returned {type(loaded).__name__}, not a TopKSAE")
    return loaded


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
    """One SiteConfig at run time: its SAE and the device tensors the handle changes in place."""

    def __init__(self, label: str, cfg: SiteConfig, site: _Site, sae: TopKSAE, clock: _Clock,
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
        self.beta = _static(torch.tensor(cfg.beta, **f32))
        self.gamma = _static(torch.tensor(cfg.gamma, **f32))
        self.tau = _static(torch.tensor(cfg.tau, **f32))
        self.lo = _static(torch.tensor(cfg.window[0], **f32))
        self.hi = _static(torch.tensor(cfg.window[1], **f32))
        self.switch = _static(torch.tensor(1.0, **f32))
        self.telemetry = None if capacity is None else _static(torch.zeros(capacity, len(_TELEMETRY_COLUMNS), **f32))
        self.enc_bias: Optional[torch.Tensor] = None  # fp32 [F]: b_enc - b_dec @ W_enc, see refresh_bias
        self._enc_bias_src: Optional[torch.Tensor] = None

    # host side -------------------------------------------------------------------------
    def place(self, device: torch.device, dtype: torch.dtype, moved: dict) -> None:
        key = (id(self.sae), device, dtype)
        if key not in moved:
            moved[key] = _sae_on(self.sae, device, dtype)
        self.sae = _static_sae(moved[key])
        self._enc_bias_src = None  # rebuilt on the new device by the next refresh_bias
        for name in ("harmful", "beta", "gamma", "tau", "lo", "hi", "switch", "telemetry"):
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
        s = self.switch
        if clock.uses_progress:
            p = clock.progress
            if p is None:
                raise RuntimeError(f"SafeDIG site {self.label!r} ran outside a forward of its transformer, "
                                   f"so there is no timestep to place it in the window")
            in_window = (p >= self.lo) & ((p < self.hi) | (self.hi >= 1.0))
            s = s * in_window.to(torch.float32)
        else:
            p = torch.full((), float("nan"), dtype=torch.float32, device=x.device)
        beta, gamma = self.beta * s, self.gamma * s

        half = 0
        if self.cfg.cfg == "cond" and clock.cfg_halves:
            if x.shape[0] % 2:
                raise RuntimeError(f"SafeDIG site {self.label!r}: a CFG batch must have an even size, got {x.shape[0]}")
            half = x.shape[0] // 2
        xs = x[half:] if half else x
        if self.fused:
            # bias_fresh: the clock checked the SAE weights eagerly at the start of this call
            enc_bias = self.enc_bias if clock.bias_fresh else sae._bias_for(xs)
            y, h = _steer_op(xs, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, self.harmful,
                             beta, gamma, self.tau, sae.k, enc_bias)
        else:
            y, h = reference.steer(xs, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, self.harmful,
                                   beta, gamma, self.tau, sae.k)
        if self.telemetry is not None:
            self._record(h, p, s * ((beta != 0) | (gamma != 0)).to(torch.float32))
        return torch.cat([x[:half], y], dim=0) if half else y

    def _record(self, h: torch.Tensor, p: torch.Tensor, active: torch.Tensor) -> None:
        finite = torch.isfinite(h)
        mean_h = torch.where(finite, h, 0.0).sum() / finite.sum().clamp_min(1)
        gated = (h > self.tau).to(torch.float32).mean()  # NaN h (non-finite token) is never gated
        row = torch.stack([torch.ones_like(p), p.to(torch.float32), active, gated, mean_h])
        idx = self.clock.counter.clamp(max=self.telemetry.shape[0] - 1).view(1)
        self.telemetry.index_copy_(0, idx, row.view(1, -1))


# -- hooks -------------------------------------------------------------------------------

class _ClockHook(ModelHook):
    """On the transformer: schedule progress from `timestep` before the blocks run; advance the
    telemetry row after."""

    def __init__(self, clock: _Clock, timestep_scale: float, timestep_index: int) -> None:
        super().__init__()
        self.clock = clock
        self.scale = timestep_scale
        self.index = timestep_index

    def pre_forward(self, module, *args, **kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else (args[self.index] if len(args) > self.index else None)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"SafeDIG needs the transformer's timestep as a tensor, got {type(t).__name__}")
        # One timestep per call (diffusers pipelines expand a scalar over the batch).
        self.clock.progress = 1.0 - t.reshape(-1)[0].to(torch.float32) / self.scale
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

    def post_forward(self, module, output):
        self.clock.counter.add_(1)
        self.clock.progress = None
        self.clock.bias_fresh = False
        return output


class _BlockSteerHook(ModelHook):
    """On a transformer block returning `(encoder_hidden_states, hidden_states)` (diffusers >= 0.35)."""

    def __init__(self, states: list[_SiteState]) -> None:
        super().__init__()
        self.states = states

    def post_forward(self, module, output):
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError(f"SafeDIG expects {type(module).__name__} to return (encoder_hidden_states, "
                            f"hidden_states) as diffusers >= 0.35 does, got {type(output).__name__}")
        text, image = output
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

    # settings ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._states)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Turn steering on at every site (site-level switches still apply). No recompile."""
        self._enabled = True
        self._sync_switches()

    def disable(self) -> None:
        """Outputs become bitwise those of the unhooked model; the steering compute still runs
        (the switch is a device tensor). `remove_safedig` removes the cost too."""
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
        st = self._state(site, stream)
        where = f"set_site({site!r})"
        _check_strengths(where, beta, gamma, tau)
        if window is not None:
            window = _check_window(window, f"{where}.window")
            if not st.clock.uses_progress and window != (0.0, 1.0):
                raise ValueError(f"{where}.window: text-encoder sites run once per prompt; the window must be (0, 1)")
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"{where}.enabled must be a bool, got {enabled!r}")
        mask = None
        if harmful is not None:
            if isinstance(harmful, torch.Tensor) and harmful.dtype == torch.bool:
                harmful = harmful.to(st.harmful.device)
            else:
                harmful = _check_ids(harmful, f"{where}.harmful")
            mask = as_harmful_mask(harmful, st.sae.num_features, st.harmful.device)
        n_harmful = int(mask.sum()) if mask is not None else len(st.cfg.harmful)
        _check_gate_can_open(where, n_harmful, st.cfg.tau if tau is None else tau)
        # All checks passed: apply.
        for name, v in (("beta", beta), ("gamma", gamma), ("tau", tau)):
            if v is not None:
                getattr(st, name).fill_(float(v))
                setattr(st.cfg, name, float(v))
        if window is not None:
            st.lo.fill_(window[0])
            st.hi.fill_(window[1])
            st.cfg.window = window
        if mask is not None:
            st.harmful.copy_(mask)
            st.cfg.harmful = mask.nonzero().flatten().tolist()
        if enabled is not None:
            st.site_on = enabled
            self._sync_switches()

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
        `gated_fraction` (tokens with h > tau), `mean_harm` (mean finite h). Syncs the device."""
        out: dict[str, list[dict[str, Any]]] = {}
        for label, st in self._states.items():
            if st.telemetry is None:
                raise RuntimeError("telemetry is off (SafeDIGConfig.telemetry=False)")
            calls = int(st.clock.counter)
            cap = st.telemetry.shape[0]
            if calls > cap:
                warnings.warn(f"SafeDIG telemetry for {label!r}: {calls} calls but room for {cap}; the last row "
                              f"holds the latest call. Raise telemetry_capacity or call reset_telemetry() more often.")
            rows = st.telemetry[: min(calls, cap)].cpu().tolist()
            recs = []
            for i, (written, progress, active, gated, mean_h) in enumerate(rows):
                if written != 1.0:  # the site's block did not run in that call (e.g. skip_layers)
                    continue
                step = i if i < cap - 1 else calls - 1
                recs.append({"step": step, "progress": progress, "active": active == 1.0,
                             "gated_fraction": gated, "mean_harm": mean_h})
            out[label] = recs
        return out

    def reset_telemetry(self) -> None:
        for clock in self._clocks.values():
            clock.counter.zero_()
        for st in self._states.values():
            if st.telemetry is not None:
                st.telemetry.zero_()

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
        if self._transformer.__dict__.get(_HANDLE_ATTR) is self:
            delattr(self._transformer, _HANDLE_ATTR)

    # internals --------------------------------------------------------------------------
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
            st.switch.fill_(1.0 if (self._enabled and st.site_on) else 0.0)

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
            clock.cfg_batch = bool(getattr(pipe, "do_classifier_free_guidance", False))
            return out

        encode_prompt._safedig = True
        pipe.encode_prompt = encode_prompt
        self._encode_prompt_wrapped = True


# -- apply / remove ----------------------------------------------------------------------

def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # a torch.compile'd module


def _split_target(obj) -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None)."""
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj), None
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module) or not hasattr(obj, "components"):
        raise TypeError(f"apply_safedig supports FLUX and SD3 pipelines or their transformers; "
                        f"{type(obj).__name__} has no .transformer")
    return _unwrap(transformer), obj


def apply_safedig(pipeline_or_transformer, config: SafeDIGConfig) -> SafeDIGHandle:
    """Install SafeDIG steering on a FLUX / SD3 pipeline or transformer; returns the handle.

    Everything is checked before anything is hooked, and any problem raises: an unknown site,
    an SAE whose width is not the site's, a missing or unreadable checkpoint, an unsupported
    pipeline or model, bad strengths, windows or streams. SAEs are copied to the hooked
    module's device and dtype when they differ (the caller's SAE is never moved).
    """
    if not isinstance(config, SafeDIGConfig):
        raise TypeError(f"config must be a SafeDIGConfig, got {type(config).__name__}")
    transformer, pipeline = _split_target(pipeline_or_transformer)
    spec = _model_spec(transformer)
    if spec is None:
        owner = type(pipeline).__name__ if pipeline is not None else "apply_safedig"
        raise TypeError(f"{owner}: unsupported model {type(transformer).__name__}; SafeDIG supports "
                        f"FluxTransformer2DModel and SD3Transformer2DModel pipelines")
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("SafeDIG is already applied to this model; call remove_safedig() first")

    # 1. resolve and check every site before touching the model
    resolved: list[tuple[SiteConfig, _Site, TopKSAE, torch.Tensor]] = []
    per_module: dict[int, list[SiteConfig]] = {}
    for cfg in config.sites:
        where = f"SiteConfig(site={cfg.site!r})"
        site = _resolve_site(cfg.site, transformer, spec, pipeline)
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
        sae = _load_sae(cfg.sae, where)
        if sae.d != site.width:
            raise ValueError(f"{where}.sae: SAE width d = {sae.d} but the site's activations have width {site.width}")
        harmful = (sae.harmful_mask.clone() if cfg.harmful is None
                   else _harmful_ids_mask(cfg.harmful, sae.num_features, where))
        beta = float(sae.beta) if cfg.beta is None else cfg.beta
        gamma = float(sae.gamma) if cfg.gamma is None else cfg.gamma
        tau = float(sae.tau) if cfg.tau is None else cfg.tau
        _check_strengths(f"{where} (SAE defaults)", beta, gamma, tau)
        _check_gate_can_open(where, int(harmful.sum()), tau)
        mods = per_module.setdefault(id(site.module), [])
        for other in mods:
            if site.kind == "text_encoder" or "both" in (other.stream, cfg.stream) or other.stream == cfg.stream:
                raise ValueError(f"{where}: overlaps another SiteConfig on the same module "
                                 f"(streams {other.stream!r} and {cfg.stream!r})")
        mods.append(cfg)
        res_cfg = dataclasses.replace(cfg, harmful=harmful.nonzero().flatten().tolist(),
                                      beta=beta, gamma=gamma, tau=tau)
        resolved.append((res_cfg, site, sae, harmful))

    # 2. build state, then hook
    handle = SafeDIGHandle(transformer, pipeline, config)
    t_device, _ = _module_placement(transformer)
    handle._clocks[id(transformer)] = _Clock(t_device, uses_progress=True)
    capacity = config.telemetry_capacity if config.telemetry else None
    counts: dict[str, int] = {}
    for cfg, _, _, _ in resolved:
        counts[cfg.site] = counts.get(cfg.site, 0) + 1
    placed: dict = {}
    by_block: dict[int, list[_SiteState]] = {}
    for cfg, site, sae, harmful in resolved:
        device, dtype = _module_placement(site.module)
        key = (id(sae), device, dtype)
        if key not in placed:
            placed[key] = _sae_on(sae, device, dtype)
        if site.kind == "text_encoder":
            clock = handle._clocks.setdefault(id(site.module), _Clock(device, uses_progress=False))
        else:
            clock = handle._clocks[id(transformer)]
        label = cfg.site if counts[cfg.site] == 1 else f"{cfg.site}:{cfg.stream}"
        st = _SiteState(label, cfg, site, placed[key], clock, harmful.to(device), config.use_fused_ops, capacity)
        handle._states[label] = st
        if site.kind == "block":
            by_block.setdefault(id(site.module), []).append(st)
            clock.sites.append(st)
    handle._sync_switches()

    try:
        params = list(inspect.signature(type(transformer).forward).parameters)[1:]
        timestep_index = params.index("timestep")
    except ValueError:
        raise TypeError(f"{type(transformer).__name__}.forward has no timestep argument") from None
    _register(transformer, _ClockHook(handle._clocks[id(transformer)], spec.timestep_scale, timestep_index),
              _CLOCK_HOOK, handle)
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


def _harmful_ids_mask(ids: list[int], F: int, where: str) -> torch.Tensor:
    bad = [j for j in ids if j >= F]
    if bad:
        raise ValueError(f"{where}.harmful: feature ids must lie in [0, F) = [0, {F}), got {bad[:8]}")
    return as_harmful_mask(ids, F, torch.device("cpu"))


def _register(module: torch.nn.Module, hook: ModelHook, name: str, handle: SafeDIGHandle) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    handle._hooked.append(module)


def remove_safedig(pipeline_or_transformer) -> bool:
    """Remove SafeDIG from a pipeline or transformer. Returns whether anything was installed."""
    transformer, _ = _split_target(pipeline_or_transformer)
    handle = getattr(transformer, _HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True
