"""The one site model: where in a pipeline activations are read or steered, what each block
returns, and how a transformer call's timestep is read. Steering (`plan`, `hooks`), capture,
the harm meter and the CLI all go through it.

A site is a module and a stream of its output, written `"transformer_blocks.1:text"`
(`SiteSpec`; the stream defaults to `image`, or `text` for a text encoder). Which modules are
sites comes from diffusers itself: every `nn.ModuleList` in the transformer whose blocks are of a
class diffusers describes in `TransformerBlockRegistry` (FLUX.1, FLUX.2, SD3, Qwen-Image, Wan,
HunyuanVideo, LTX-Video, CogVideoX, Z-Image, ...). The registry's metadata says which item of a
block's output is the image stream (`return_hidden_states_index`) and which the text stream
(`return_encoder_hidden_states_index`, None when the block returns none). A block class it does
not describe can be described the same way (`TransformerBlockRegistry.register`, see
`unsupported_model_message`). The T5 text encoder of a pipeline is a site too, by its component
name (`text_encoder_2` in FLUX pipelines, `text_encoder_3` in SD3 ones): its
`last_hidden_state` is its one stream, `text`.

What the registry does not say lives in `families.py`, per transformer class: how the
`timestep` its pipelines pass maps to schedule progress `p = 1 - sigma` (the steering window is
in `p`), and how those pipelines batch classifier-free guidance.

Imports diffusers only inside functions, so the workflow's store can parse sites without it.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from .families import WRONG_METADATA, family_of

__all__ = ["STREAMS", "STEER_STREAMS", "SiteSpec", "BlockLayout",
           "block_layout", "block_stacks", "split_target", "ResolvedSite", "resolve_site", "text_encoders",
           "read_stream", "replace_streams", "call_timestep", "hidden_states_of", "unsupported_model_message"]

STREAMS = ("image", "text")             # what one activation of a site holds (capture, stores)
STEER_STREAMS = STREAMS + ("both",)     # steering may also take both streams through one SAE


@dataclass(frozen=True)
class SiteSpec:
    """A module path inside the transformer (or a text-encoder component) and a stream of its
    output. `"transformer_blocks.1:text"` parses to module `transformer_blocks.1`, stream `text`;
    the stream defaults to `image` (`text` for a `text_encoder*` component, whose one output is
    text tokens). `streams` widens what `parse` accepts (steering also takes `both`)."""

    module: str
    stream: str = "image"

    @classmethod
    def parse(cls, spec: Union[str, "SiteSpec"], streams: Sequence[str] = STREAMS) -> "SiteSpec":
        if isinstance(spec, SiteSpec):
            if spec.stream not in streams:
                raise ValueError(f"site {spec.key!r}: stream must be one of {tuple(streams)}, got {spec.stream!r}")
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"site must be a string like 'single_transformer_blocks.3' or "
                             f"'transformer_blocks.1:text', got {spec!r}")
        module, _, stream = spec.strip().partition(":")
        module = module.removeprefix("transformer.")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", module):
            raise ValueError(f"site {spec!r}: expected a dotted module path such as 'transformer_blocks.1'")
        is_text_encoder = module.startswith("text_encoder")
        stream = stream or ("text" if is_text_encoder else "image")
        if stream not in streams:
            raise ValueError(f"site {spec!r}: stream must be one of {tuple(streams)}, got {stream!r}")
        if is_text_encoder and stream != "text":
            raise ValueError(f"site {spec!r}: a text encoder has one stream, 'text', got {stream!r}")
        return cls(module, stream)

    @property
    def key(self) -> str:
        """`module:stream`, always with the stream: how configs, telemetry, stores and file
        names spell a site."""
        return f"{self.module}:{self.stream}"

    @property
    def is_text_encoder(self) -> bool:
        return self.module.startswith("text_encoder")

    def __str__(self) -> str:
        return self.key


# -- blocks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockLayout:
    """Where a block's output holds each stream (diffusers' `TransformerBlockMetadata`): the
    image stream at `image_index`, the text stream at `text_index` (None: no text stream).
    A block returning a bare tensor has `image_index` 0 and no text stream."""

    image_index: int
    text_index: Optional[int]
    block: str   # the block's class name, for messages

    def index(self, stream: str) -> Optional[int]:
        return self.image_index if stream == "image" else self.text_index


def block_layout(block: torch.nn.Module) -> Optional[BlockLayout]:
    """The layout diffusers registers for `type(block)` (searched along its MRO), or None."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls in type(block).__mro__:
        try:
            meta = TransformerBlockRegistry.get(cls)
        except ValueError:
            continue
        text = meta.return_encoder_hidden_states_index
        if WRONG_METADATA.get(cls.__name__) == (meta.return_hidden_states_index, text):
            raise TypeError(f"diffusers' block metadata for {cls.__name__} names its text stream as its image stream "
                            f"(it returns (encoder_hidden_states, hidden_states) but is registered with "
                            f"return_hidden_states_index=0), so SafeDIG would steer the wrong tokens. Register it "
                            f"correctly before applying: TransformerBlockRegistry.register({cls.__name__}, "
                            f"TransformerBlockMetadata(return_hidden_states_index=1, "
                            f"return_encoder_hidden_states_index=0)) (diffusers.hooks._helpers)")
        if getattr(block, "context_pre_only", False):
            text = None  # SD3's last joint block returns (None, hidden_states)
        return BlockLayout(meta.return_hidden_states_index, text, type(block).__name__)
    return None


def block_stacks(transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """Every `nn.ModuleList` in `transformer` whose items are all blocks diffusers describes, by
    its dotted path (`transformer_blocks`, `single_transformer_blocks`, ...)."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) and all(block_layout(b) is not None for b in m)}


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # a torch.compile'd module


def split_target(obj, what: str = "apply_safedig") -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None) of a pipeline or a bare transformer."""
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj), None
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module) or not hasattr(obj, "components"):
        raise TypeError(f"{what} takes a diffusers pipeline or its transformer; "
                        f"{type(obj).__name__} has no .transformer module")
    return _unwrap(transformer), obj


def unsupported_model_message(transformer: torch.nn.Module) -> str:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()  # fills the registry on first use
    known = sorted(cls.__name__ for cls in TransformerBlockRegistry._registry)
    return (f"{type(transformer).__name__} has no blocks diffusers describes, so SafeDIG cannot tell which output of "
            f"a block is which stream. Blocks described: {', '.join(known)}. For another block class, describe "
            f"it yourself before applying: diffusers.hooks._helpers.TransformerBlockRegistry.register(MyBlock, "
            f"TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0)) "
            f"(the indices of the image and text streams in the block's output; None where it has no text stream)")


# -- sites ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedSite:
    """A site resolved in a model: the module to hook, where its streams are, their width."""

    spec: SiteSpec
    module: torch.nn.Module
    root: torch.nn.Module               # the transformer, or the text encoder itself
    layout: Optional[BlockLayout]       # None for a text encoder
    width: Optional[int]                # the steered activation's width, where the model's config says it

    @property
    def is_text_encoder(self) -> bool:
        return self.layout is None


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


def _valid_sites(stacks: dict[str, torch.nn.ModuleList], pipeline) -> str:
    names = [f"{name}.0..{len(stack) - 1}" for name, stack in stacks.items()]
    return ", ".join(names + list(text_encoders(pipeline)))


def _stream_width(transformer: torch.nn.Module, stream: str) -> Optional[int]:
    """The width of a block stream as the model's config gives it: the blocks' inner width
    (heads x head dim), or the family's own text width; None where the config does not say (the
    op then checks the SAE against the activations at the first call)."""
    cfg = getattr(transformer, "config", None)
    family = family_of(transformer)
    widths = []
    for s in ("text", "image") if stream == "both" else (stream,):
        if s == "text" and family.text_width is not None:
            widths.append(family.text_width(cfg))
            continue
        heads, dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
        widths.append(heads * dim if isinstance(heads, int) and isinstance(dim, int) else None)
    width = widths[0]
    return width if all(w == width for w in widths) and isinstance(width, int) else None


def resolve_site(spec: SiteSpec, transformer: torch.nn.Module, pipeline=None) -> ResolvedSite:
    """The module `spec` names in `transformer` (a block) or `pipeline` (a T5 encoder), checked:
    the module exists and emits the stream. Errors name the site and list the valid ones."""
    if spec.is_text_encoder:
        if pipeline is None:
            raise ValueError(f"site {spec.key!r} is a text encoder: pass the pipeline, not the transformer")
        encoders = text_encoders(pipeline)
        if spec.module not in encoders:
            have = type(getattr(pipeline, spec.module, None)).__name__
            raise ValueError(f"unknown site {spec.key!r}: text-encoder sites must be T5EncoderModel components of the "
                             f"pipeline, and {type(pipeline).__name__}.{spec.module} is {have}; valid sites: "
                             f"{_valid_sites(block_stacks(transformer), pipeline)}")
        enc = encoders[spec.module]
        return ResolvedSite(spec, enc, enc, None, enc.config.d_model)
    stacks = block_stacks(transformer)
    if not stacks:
        raise TypeError(unsupported_model_message(transformer))
    stack_name, _, index = spec.module.rpartition(".")
    if stack_name not in stacks or not index.isdigit():
        raise ValueError(f"unknown site {spec.key!r} for {type(transformer).__name__}; valid sites: "
                         f"{_valid_sites(stacks, pipeline)}")
    stack = stacks[stack_name]
    if int(index) >= len(stack):
        raise ValueError(f"unknown site {spec.key!r}: {type(transformer).__name__} has {stack_name}.0.."
                         f"{len(stack) - 1}")
    block = stack[int(index)]
    layout = block_layout(block)
    for stream in ("image", "text") if spec.stream == "both" else (spec.stream,):
        if layout.index(stream) is None:
            raise ValueError(f"site {spec.key!r}: {layout.block} returns no {stream} stream here "
                             f"(diffusers' block metadata); steer its image stream")
    return ResolvedSite(spec, block, transformer, layout, _stream_width(transformer, spec.stream))


# -- what blocks return -----------------------------------------------------------------------

def read_stream(output: Any, layout: BlockLayout, stream: str, site: str = "the block") -> torch.Tensor:
    """The `image` or `text` stream of a block's output, or `both` joined along tokens
    (`[B, T_text + T_image, d]`, text first as in FLUX's joint sequence)."""
    if stream == "both":
        return torch.cat([read_stream(output, layout, "text", site), read_stream(output, layout, "image", site)], 1)
    index = layout.index(stream)
    if isinstance(output, torch.Tensor) and index == 0 and layout.text_index is None:
        return output
    if not isinstance(output, (tuple, list)) or index is None or index >= len(output):
        raise TypeError(f"SafeDIG site {site}: expected {layout.block} to return its {stream} stream at index {index} "
                        f"(diffusers' block metadata), got {type(output).__name__}")
    x = output[index]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"SafeDIG site {site}: {layout.block} returned {type(x).__name__} as its {stream} stream")
    return x


def replace_streams(output: Any, layout: BlockLayout, streams: dict[str, torch.Tensor]) -> Any:
    """`output` with the given streams (`image`, `text`) replaced, in the same structure."""
    if isinstance(output, torch.Tensor):
        return streams.get("image", output)
    items = list(output)
    for stream, x in streams.items():
        items[layout.index(stream)] = x
    return type(output)(items) if isinstance(output, tuple) else items


# -- calls ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _parameter_index(cls: type, name: str) -> Optional[int]:
    params = list(inspect.signature(cls.forward).parameters)[1:]
    return params.index(name) if name in params else None


def _argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    i = _parameter_index(type(module), name)
    return args[i] if i is not None and i < len(args) else None


def call_timestep(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The timestep a transformer call received (the argument its family names, by keyword or
    position), or None."""
    return _argument(transformer, family_of(transformer).timestep_arg, args, kwargs)


@functools.lru_cache(maxsize=None)
def _hidden_states_argument(cls: type) -> Optional[str]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for base in cls.__mro__:
        try:
            name = TransformerBlockRegistry.get(base).hidden_states_argument_name
        except ValueError:
            continue
        # Z-Image's blocks name it `x`, not the registered `hidden_states`: then the first argument.
        return name if _parameter_index(cls, name) is not None else None
    return None


def hidden_states_of(block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The hidden-states input of a block call: the argument diffusers' block metadata names,
    or the first argument where the block's forward has no such parameter."""
    name = _hidden_states_argument(type(block))
    if name is None:
        return args[0] if args else next(iter(kwargs.values()), None)
    return _argument(block, name, args, kwargs)
