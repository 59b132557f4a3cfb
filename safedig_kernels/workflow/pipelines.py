"""The pipelines the workflow runs on, by name: the built-in tiny FLUX or a diffusers pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from .._io import read_json
from ._noise import quiet_pipeline_noise

__all__ = ["load_pipeline"]


def load_pipeline(model: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """`"tiny-flux"` (seeded random tiny FLUX, `synthetic.tiny_flux_pipeline`), `"world"` (the demo
    world's trained transformer, `world.py`; `"world:PATH"` for other weights) or a diffusers
    pipeline directory / model id. Components a saved directory lists as null (e.g. text encoders
    left out for embedding-only prompts) are passed as None. Third-party log lines that loading
    triggers and that mean nothing to a user are dropped (`_noise.quiet_pipeline_noise`)."""
    with quiet_pipeline_noise():
        return _load(model, device, dtype)


def _load(model: str, device: Union[str, torch.device], dtype: torch.dtype):
    if model == "tiny-flux":
        from .synthetic import tiny_flux_pipeline

        return tiny_flux_pipeline(dtype=dtype).to(device)
    from .world import is_world_model, load_world, world_pipeline, world_weights_in

    if is_world_model(model):
        return world_pipeline(load_world(world_weights_in(model)), device=device, dtype=dtype)
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); older releases ignore `dtype`.
    kwargs: dict[str, Any] = {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}
    index = Path(model) / "model_index.json"
    if index.is_file():
        spec = read_json(index, "pipeline index")
        kwargs.update({k: None for k, v in spec.items() if isinstance(v, list) and v == [None, None]})
    elif Path(model).exists():
        raise ValueError(f"--model {model}: a local pipeline directory must contain model_index.json")
    return DiffusionPipeline.from_pretrained(model, **kwargs).to(device)
