"""SafeDIG steering inside diffusers pipelines, for every diffusion transformer whose blocks
diffusers describes (FLUX.1, FLUX.2, SD3/SD3.5, Qwen-Image, Wan, HunyuanVideo, LTX-Video, ...).

    config = SafeDIGConfig(sites=[
        SiteConfig("single_transformer_blocks.9", sae="sb9.safetensors", beta=0.5, gamma=1.0, window=(0.0, 0.4)),
        SiteConfig("transformer_blocks.3:text", sae=sae_txt),
    ])
    handle = apply_safedig(pipe, config)
    image = pipe(prompt).images[0]
    handle.set_site("single_transformer_blocks.9", gamma=2.0)   # no recompile, no re-hook
    handle.set_requests(beta=[0.5, 0.0], enabled=[True, False])  # per image of a 2-image batch
    print(handle.telemetry())
    remove_safedig(pipe)

The rooms, in the order a config travels: `config` (what the user asks for, and its JSON;
imports no diffusers), `sites` (the one site model: which module, which stream of its output,
from diffusers' block metadata), `families` (what differs per model family: timesteps, guidance
batching, text widths), `plan` (a config resolved
against one model, every value checked once), `requests` (the rule mapping a call's rows to
requests and guidance halves), `state` (the modules holding SAEs, settings and telemetry inside
the model), `hooks` (the torch module hooks that run them), `telemetry` (reading what the sites
recorded, per rank or summed over a context-parallel group), `handle` (apply, change, read,
remove), `runner` (one prompt through a pipeline, latents to images).

Names are imported on first use, so `config` and `sites` work where diffusers is not
installed (routing writes steering configs without a pipeline).
"""
from __future__ import annotations

from ..._imports import lazy_exports

_EXPORTS = {"SiteConfig": "config", "SafeDIGConfig": "config", "SteeringPlan": "plan",
            "SafeDIGHandle": "handle", "apply_safedig": "handle", "remove_safedig": "handle",
            "check_config": "handle", "safedig_handle": "handle"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
