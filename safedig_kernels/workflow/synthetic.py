"""Tiny seeded stand-ins for real models and prompt sets (tests, examples, CPU-only runs).

`tiny_flux_pipeline` is a FLUX-architecture pipeline small enough to run on a CPU in well under
a second per image; it has no text encoders, so prompts come as embeddings.
`write_synthetic_prompts` writes a prompt file whose unsafe prompts carry a planted "concept"
direction in their text embeddings, one per category.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from .prompts import PathLike, check_label

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
TINY_TEXT_TOKENS = 8


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A FluxPipeline with random weights: width d = 32, 2 double and 2 single blocks, a 2-level
    VAE; 32x32 images give 64 image tokens. No text encoders: call it with prompt_embeds
    `[B, T, 32]` and pooled_prompt_embeds `[B, 16]`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_FLUX)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    # .to(dtype) warns about keep-in-fp32 modules even when nothing changes; skip the no-op.
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def concept_directions(categories: list[str], dim: int, shared: float, seed: int) -> dict[str, torch.Tensor]:
    """Unit directions `[dim]`, one per category: `shared` is the cosine each one has with a
    common "unsafe" direction, so categories overlap more as it grows."""
    g = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    out = {}
    for c in categories:
        own = torch.randn(dim, generator=g)
        own = torch.nn.functional.normalize(own - (own @ common) * common, dim=0)
        out[c] = shared * common + (1 - shared ** 2) ** 0.5 * own
    return out


def write_synthetic_prompts(directory: PathLike, counts: Mapping[str, int], *, seed: int = 0,
                            strength: float = 4.0, shared: float = 0.7, text_tokens: int = TINY_TEXT_TOKENS,
                            embed_dim: int = TINY_FLUX["joint_attention_dim"],
                            pooled_dim: int = TINY_FLUX["pooled_projection_dim"]) -> Path:
    """Write `prompts.jsonl` and `embeddings.safetensors` into `directory`; returns the JSONL path.

    `counts` maps labels to numbers of prompts, e.g. `{"safe": 8, "unsafe/nudity": 8}`. Every
    prompt's text embedding `[text_tokens, embed_dim]` is Gaussian noise; unsafe ones add
    `strength` times their category's direction (`concept_directions`) to every token.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    labels = [check_label(lbl, "counts") for lbl in counts]
    cats = sorted({lbl for lbl in labels if lbl.startswith("unsafe")})
    dirs = concept_directions(cats, embed_dim, shared, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors, lines = {}, []
    for label in labels:
        for i in range(int(counts[label])):
            pid = f"{label.replace('/', '-')}-{i:04d}"
            emb = torch.randn(text_tokens, embed_dim, generator=g)
            if label in dirs:
                emb = emb + strength * dirs[label]
            tensors[f"{pid}.prompt_embeds"] = emb
            tensors[f"{pid}.pooled_prompt_embeds"] = torch.randn(pooled_dim, generator=g)
            lines.append(json.dumps({"id": pid, "label": label, "embeddings": "embeddings.safetensors",
                                     "embeddings_prefix": f"{pid}."}))
    save_file(tensors, str(d / "embeddings.safetensors"))
    path = d / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
