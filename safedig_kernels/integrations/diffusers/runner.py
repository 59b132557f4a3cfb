"""Running a diffusers pipeline for one prompt, the same way for capture, steering and timing.

`run_prompt` takes the prompt as text or as precomputed embeddings and returns the final
latents (`output_type="latent"`); noise comes from a seeded CPU generator, so every device
starts from the same noise. `decode_latents` turns latents into images as the pipeline's own
`output_type="pt"` would.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch

__all__ = ["RunSettings", "run_prompt", "decode_latents", "pipeline_device", "pipeline_dtype", "progress_bar_disabled"]


@dataclass
class RunSettings:
    """How a pipeline is called for one prompt (besides the prompt and its seed)."""

    num_inference_steps: int = 4
    height: int = 32
    width: int = 32
    guidance_scale: float = 3.5
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)


def pipeline_device(pipe) -> torch.device:
    dev = getattr(pipe, "_execution_device", None)
    return dev if isinstance(dev, torch.device) else next(pipe.transformer.parameters()).device


def pipeline_dtype(pipe) -> torch.dtype:
    return next(pipe.transformer.parameters()).dtype


def run_prompt(pipe, settings: RunSettings, seed: int, *, prompt: Optional[str] = None,
               embeddings: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """The final latents of one prompt: `embeddings` (pipeline keyword arguments such as
    `prompt_embeds`, moved to the pipeline's device and dtype) when given, else `prompt` text."""
    kwargs: dict[str, Any] = dict(num_inference_steps=settings.num_inference_steps, height=settings.height,
                                  width=settings.width, guidance_scale=settings.guidance_scale, output_type="latent",
                                  generator=torch.Generator().manual_seed(seed))
    kwargs.update(settings.pipeline_kwargs)
    if embeddings:
        device, dtype = pipeline_device(pipe), pipeline_dtype(pipe)
        kwargs.update({k: v.to(device, dtype) for k, v in embeddings.items()})
    else:
        kwargs["prompt"] = prompt
    with torch.inference_mode():
        out = pipe(**kwargs)
    return out.images if hasattr(out, "images") else out[0]


@torch.inference_mode()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] (CPU, float32) from final latents, as the pipeline's own
    `output_type="pt"` would decode them (FLUX pipelines pack latents into tokens first)."""
    return decode_unclamped(pipe, latents, height, width).clamp(0, 1).cpu()


def decode_unclamped(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`decode_latents` before its clamp, on the latents' device: differentiable everywhere
    (the attack's sampler back-propagates through it)."""
    if hasattr(pipe, "_unpack_latents"):
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5


@contextlib.contextmanager
def progress_bar_disabled(pipe) -> Iterator[None]:
    """Silence a diffusers pipeline's own per-step progress bar, restoring its setting after."""
    old = getattr(pipe, "_progress_bar_config", None)
    try:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        yield
    finally:
        if old is not None:
            pipe._progress_bar_config = old
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config
