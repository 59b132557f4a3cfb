"""What differs between diffusion-transformer families beyond diffusers' block metadata: how a
transformer class's pipelines pass the timestep (so a call can be placed in the steering
window), how they batch classifier-free guidance (so rows map to requests), and where a text
stream is narrower than the blocks. Read from diffusers' pipelines (0.42.1) and checked on tiny
models in tests/_families.py and tests/integrations/diffusers/test_families_steering.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["Family", "FAMILIES", "WRONG_METADATA", "family_of"]


@dataclass(frozen=True)
class Family:
    """What steering needs to know about a transformer class beyond diffusers' block metadata,
    read from diffusers' pipelines (and checked on tiny models: tests/_families.py).

    `progress`: schedule progress `p` of one timestep value as its pipelines pass it (0 at pure
    noise, 1 at the clean image; `1 - sigma` for flow matching, `1 - t / 1000` for discrete
    DDPM-style timesteps); None: not known, so only the whole schedule can be a window.
    `timestep_arg`: the forward argument holding it. `cfg`: how its pipelines run
    classifier-free guidance: `"separate"` (one call per branch, as FLUX true CFG, or one call
    with a guidance embedding), `"batched"` (one call on `[uncond; cond]`), `"batched_cond_first"`
    (one call on `[cond; uncond]`), `"unknown"`. `reads_guidance`: a batched call's pipeline says
    through `do_classifier_free_guidance` whether each call is guided (False where it batches
    only some steps, as Z-Image after `cfg_truncation`). `text_width`: the text stream's width
    where it is not the blocks' inner width.
    """

    name: str
    progress_of: Optional[Callable[[torch.Tensor], torch.Tensor]]
    cfg: str
    timestep_arg: str = "timestep"
    reads_guidance: bool = True
    text_width: Optional[Callable[[Any], Optional[int]]] = None

    @property
    def knows_progress(self) -> bool:
        return self.progress_of is not None

    def progress(self, timestep: torch.Tensor) -> torch.Tensor:
        """Progress of a call (0-d fp32 on the timestep's device). A call whose timesteps differ
        per sample or token (Wan 2.2 TI2V holds a clean first frame at t = 0) is as far along as
        its noisiest entry."""
        assert self.progress_of is not None
        return self.progress_of(timestep.detach().to(torch.float32)).amin()


def _sigma(t):          # timestep = sigma: FLUX.1, FLUX.2, Qwen-Image
    return 1.0 - t


def _per_mille(t):      # timestep = 1000 * sigma, or a discrete DDPM/DDIM step out of 1000
    return 1.0 - t / 1000.0


def _rising(t):         # timestep = 1 - sigma: Z-Image
    return t


def _rising_per_mille(t):  # timestep = 1000 * (1 - sigma): Mochi
    return t / 1000.0


# By class name, looked up along the class's MRO (a subclass keeps its parent's facts).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("FluxTransformer2DModel", _sigma, "separate"),
    Family("Flux2Transformer2DModel", _sigma, "separate"),
    Family("SD3Transformer2DModel", _per_mille, "batched", text_width=lambda c: c.caption_projection_dim),
    Family("QwenImageTransformer2DModel", _sigma, "separate"),
    Family("WanTransformer3DModel", _per_mille, "separate"),
    Family("WanVACETransformer3DModel", _per_mille, "separate"),
    Family("HunyuanVideoTransformer3DModel", _per_mille, "separate"),
    Family("HunyuanVideoFramepackTransformer3DModel", _per_mille, "separate"),
    Family("LTXVideoTransformer3DModel", _per_mille, "batched"),
    Family("CogVideoXTransformer3DModel", _per_mille, "batched"),
    Family("ZImageTransformer2DModel", _rising, "batched_cond_first", timestep_arg="t", reads_guidance=False),
    Family("HunyuanImageTransformer2DModel", _per_mille, "separate"),
    # CogView4's pipeline passes the unshifted t while its scheduler steps shifted sigmas: p here
    # is 1 - t / 1000, the fraction of the unshifted schedule.
    Family("CogView4Transformer2DModel", _per_mille, "separate"),
    Family("MochiTransformer3DModel", _rising_per_mille, "batched", text_width=lambda c: c.pooled_projection_dim),
    Family("MotifVideoTransformer3DModel", _per_mille, "separate"),
    Family("Kandinsky5Transformer3DModel", _per_mille, "separate"),
    Family("Cosmos3OmniTransformer", _per_mille, "separate", timestep_arg="vision_timesteps"),
    Family("PixArtTransformer2DModel", _per_mille, "batched"),
    Family("DiTTransformer2DModel", _per_mille, "batched_cond_first"),
)}

# Registrations diffusers gets wrong (diffusers 0.42.1, checked on tiny models in
# tests/integrations/diffusers/test_families_build.py): BriaTransformerBlock returns
# (encoder_hidden_states, hidden_states) but is registered with its image stream at index 0,
# which is its text stream. Refused while diffusers still says so; a corrected registration of
# one's own is taken as given.
WRONG_METADATA = {"BriaTransformerBlock": (0, None)}


def family_of(transformer: torch.nn.Module) -> Family:
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return Family(type(transformer).__name__, None, "unknown")
