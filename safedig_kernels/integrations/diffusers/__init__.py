"""SafeDIG steering inside diffusers pipelines (FLUX.1, SD3/SD3.5), built on diffusers' hooks.

    config = SafeDIGConfig(sites=[
        SiteConfig("single_transformer_blocks.9", sae="sb9.safetensors", beta=0.5, gamma=1.0, window=(0.0, 0.4)),
        SiteConfig("transformer_blocks.3", sae=sae_txt, stream="text"),
    ])
    handle = apply_safedig(pipe, config)
    image = pipe(prompt).images[0]
    handle.set_site("single_transformer_blocks.9", gamma=2.0)   # no recompile, no re-hook
    handle.set_requests(beta=[0.5, 0.0], enabled=[True, False])  # per image of a 2-image batch
    print(handle.telemetry())
    remove_safedig(pipe)

The rooms: `config` (the configs and their JSON; imports no diffusers), `sites` (the one site
model: which module, which stream of its output, timesteps and CFG batches), `hooks` (clock,
site state, hooks, handle), `runner` (one prompt through a pipeline, latents to images).

Names are imported on first use, so `config` and `sites` work where diffusers is not
installed (routing writes steering configs without a pipeline); `hooks` imports diffusers.
"""
from __future__ import annotations

from ..._imports import lazy_exports

_EXPORTS = {"SiteConfig": "config", "SafeDIGConfig": "config", "SafeDIGHandle": "hooks",
            "apply_safedig": "hooks", "remove_safedig": "hooks", "check_config": "hooks"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
