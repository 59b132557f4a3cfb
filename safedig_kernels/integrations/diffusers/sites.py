"""The one site model: where in a pipeline activations are read or steered, what each block
returns, and how a transformer call's timestep and CFG batch are read. Steering (`hooks`),
capture, the harm meter and the CLI all go through it.

A site is a module and a stream of its output (`SiteSpec`, written `"transformer_blocks.1:text"`;
the stream defaults to `image`). Supported sites (spec §4):

- `transformer_blocks.{i}`: FLUX double blocks and SD3 joint blocks; `single_transformer_blocks.{i}`:
  FLUX single blocks. All return `(encoder_hidden_states, hidden_states)` in diffusers >= 0.35:
  the text stream is `output[0]`, the image stream `output[1]` (`BLOCK_OUTPUT`). FLUX single
  blocks return slices of one joint sequence; SD3's last joint block returns no text stream.
- the T5 text encoder by its pipeline component name (`text_encoder_2` in FLUX pipelines,
  `text_encoder_3` in SD3 pipelines), whose `last_hidden_state` is its one stream.

Imports diffusers only inside `model_spec`, so the workflow's store can parse sites without it.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

__all__ = ["STREAMS", "SiteSpec", "site_labels", "ModelSpec", "model_spec", "split_target", "ResolvedSite",
           "resolve_site", "text_encoders", "BLOCK_OUTPUT", "block_streams", "read_stream", "timestep_index",
           "call_timestep", "conditional_start", "pipeline_batches_cfg"]

STREAMS = ("image", "text")


@dataclass(frozen=True)
class SiteSpec:
    """A module path inside the transformer (or a text-encoder component) and a stream of its
    output. `"transformer_blocks.1:text"` parses to module `transformer_blocks.1`, stream `text`;
    the stream defaults to `image`. `streams` widens what `parse` accepts (steering also takes
    `both`)."""

    module: str
    stream: str = "image"

    @classmethod
    def parse(cls, spec: Union[str, "SiteSpec"], streams: Sequence[str] = STREAMS) -> "SiteSpec":
        if isinstance(spec, SiteSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"site must be a string like 'single_transformer_blocks.3' or "
                             f"'transformer_blocks.1:text', got {spec!r}")
        module, _, stream = spec.strip().partition(":")
        module = module.removeprefix("transformer.")
        stream = stream or "image"
        if stream not in streams:
            raise ValueError(f"site {spec!r}: stream must be one of {tuple(streams)}, got {stream!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", module):
            raise ValueError(f"site {spec!r}: expected a dotted module path such as 'transformer_blocks.1'")
        return cls(module, stream)

    @property
    def key(self) -> str:
        """`module:stream`, always with the stream: how stores and file names spell a site."""
        return f"{self.module}:{self.stream}"

    def __str__(self) -> str:
        return self.key


def site_labels(sites: Sequence[SiteSpec]) -> list[str]:
    """How telemetry and reports name `sites`: the module alone, or `module:stream` where a
    module has more than one entry (a FLUX double block steered per stream)."""
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.module] = counts.get(s.module, 0) + 1
    return [s.module if counts[s.module] == 1 else s.key for s in sites]


# -- models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What differs between the supported transformers."""

    name: str
    timestep_scale: float            # timestep input = sigma * scale
    block_stacks: tuple[str, ...]
    cfg_pipelines: tuple[str, ...]   # pipeline classes that batch CFG as [uncond; cond]

    def progress(self, timestep: torch.Tensor) -> torch.Tensor:
        """Schedule progress `p = 1 - sigma` (0-d fp32, on the timestep's device) of a call:
        0 at pure noise, 1 at the clean image. One timestep per call (pipelines expand a
        scalar over the batch)."""
        return 1.0 - timestep.reshape(-1)[0].to(torch.float32) / self.timestep_scale


def model_spec(transformer: torch.nn.Module) -> Optional[ModelSpec]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        # FluxPipeline passes timestep / 1000 (= sigma); the model multiplies by 1000 itself.
        return ModelSpec("FLUX", 1.0, ("transformer_blocks", "single_transformer_blocks"), ())
    if isinstance(transformer, SD3Transformer2DModel):
        return ModelSpec("SD3", 1000.0, ("transformer_blocks",),
                         ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                          "StableDiffusion3InpaintPipeline"))
    return None


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # a torch.compile'd module


def split_target(obj, what: str = "apply_safedig") -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None) of a pipeline or a bare transformer."""
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj), None
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module) or not hasattr(obj, "components"):
        raise TypeError(f"{what} supports FLUX and SD3 pipelines or their transformers; "
                        f"{type(obj).__name__} has no .transformer")
    return _unwrap(transformer), obj


# -- sites ----------------------------------------------------------------------------------

@dataclass
class ResolvedSite:
    """A site name resolved in a model: the module to hook and what it emits."""

    module: torch.nn.Module
    kind: str           # "block" or "text_encoder"
    width: int
    has_text_out: bool  # False for SD3's last joint block (context_pre_only)


_BLOCK_SITE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)$")


def text_encoders(pipeline) -> dict[str, torch.nn.Module]:
    """The T5 encoders of a pipeline by component name: the text-encoder sites."""
    if pipeline is None:
        return {}
    try:
        from transformers import T5EncoderModel
    except ImportError:  # pragma: no cover - diffusers pipelines need transformers
        return {}
    return {n: m for n, m in pipeline.components.items()
            if n.startswith("text_encoder") and isinstance(m, T5EncoderModel)}


def _valid_sites(transformer, spec: ModelSpec, pipeline) -> str:
    names = [f"{s}.0..{len(getattr(transformer, s)) - 1}" for s in spec.block_stacks]
    names += list(text_encoders(pipeline))
    return ", ".join(names)


def resolve_site(name: str, transformer: torch.nn.Module, spec: ModelSpec, pipeline=None,
                 label: Optional[str] = None) -> ResolvedSite:
    """The module `name` names in `transformer` (a block) or `pipeline` (a T5 encoder).
    Errors name the site as `label` (default `name`) and list the valid ones."""
    label = label or name
    m = _BLOCK_SITE.match(name)
    if m and m.group(1) in spec.block_stacks:
        stack = getattr(transformer, m.group(1))
        i = int(m.group(2))
        if i >= len(stack):
            raise ValueError(f"unknown site {label!r}: {spec.name} has {m.group(1)}.0..{len(stack) - 1}")
        block = stack[i]
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        return ResolvedSite(block, "block", width, not getattr(block, "context_pre_only", False))
    if name.startswith("text_encoder"):
        if pipeline is None:
            raise ValueError(f"site {label!r} is a text encoder: pass the pipeline, not the transformer")
        encoders = text_encoders(pipeline)
        if name not in encoders:
            have = type(getattr(pipeline, name, None)).__name__
            raise ValueError(f"unknown site {label!r}: text-encoder sites must be T5EncoderModel components "
                             f"of the pipeline, and {type(pipeline).__name__}.{name} is {have}; "
                             f"valid sites: {_valid_sites(transformer, spec, pipeline)}")
        enc = encoders[name]
        return ResolvedSite(enc, "text_encoder", enc.config.d_model, True)
    raise ValueError(f"unknown site {label!r} for {spec.name}; "
                     f"valid sites: {_valid_sites(transformer, spec, pipeline)}")


# -- what blocks return ---------------------------------------------------------------------

# Index of each stream in a block's output tuple (diffusers >= 0.35).
BLOCK_OUTPUT = {"text": 0, "image": 1}


def block_streams(output: Any, block: str = "the block") -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(text, image) of a block's output; text is None for SD3's last joint block."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(f"SafeDIG expects {block} to return (encoder_hidden_states, hidden_states) as diffusers "
                        f">= 0.35 does, got {type(output).__name__}")
    return output[BLOCK_OUTPUT["text"]], output[BLOCK_OUTPUT["image"]]


def read_stream(output: Any, stream: str, site: str = "the block") -> torch.Tensor:
    """The `image` or `text` stream of a block's output, or `both` joined along tokens
    (`[B, T_text + T_image, d]`, text first as in FLUX's joint sequence)."""
    text, image = block_streams(output, site)
    if stream == "image":
        return image
    if text is None:
        raise ValueError(f"site {site}: this block returns no text stream (SD3's last joint block)")
    return text if stream == "text" else torch.cat([text, image], dim=1)


# -- calls ----------------------------------------------------------------------------------

def timestep_index(transformer: torch.nn.Module) -> int:
    """Position of `timestep` among the transformer's positional forward arguments."""
    params = list(inspect.signature(type(transformer).forward).parameters)[1:]
    if "timestep" not in params:
        raise TypeError(f"{type(transformer).__name__}.forward has no timestep argument")
    return params.index("timestep")


def call_timestep(args: tuple, kwargs: dict, index: int) -> Optional[torch.Tensor]:
    """The `timestep` a transformer call received, by keyword or at positional `index`."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    return args[index] if len(args) > index else None


def pipeline_batches_cfg(pipeline) -> bool:
    """Whether the pipeline's current call batches classifier-free guidance as [uncond; cond]
    (SD3 pipelines with guidance > 1; FLUX pipelines never do). Read on the host."""
    return bool(getattr(pipeline, "do_classifier_free_guidance", False))


def conditional_start(batch: int, cfg_batch: bool, site: str) -> int:
    """First row of the conditional half of a batch: `batch // 2` for a CFG batch
    `[uncond; cond]`, else 0 (every row is conditional)."""
    if not cfg_batch:
        return 0
    if batch % 2:
        raise RuntimeError(f"SafeDIG site {site!r}: a CFG batch must have an even size, got {batch}")
    return batch // 2
