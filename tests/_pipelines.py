"""Tiny FLUX and SD3 pipelines built in code for the CPU tests of the diffusers integration,
with the fixed prompt embeddings and SAEs they steer with."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

import safedig_kernels as sk

D, F, K = 16, 64, 4   # site width (2 heads x 8), SAE features, top-k
HARM_A = list(range(0, F, 8))
HARM_B = list(range(3, F, 5))
STEPS = 4             # default FlowMatchEuler schedule: progress 0, .25, .5, .75


def _vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def flux_pipe(num_layers: int = 2, num_single_layers: int = 2, t5: bool = False) -> FluxPipeline:
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    text_encoder_2 = None
    if t5:
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(0)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=32, d_model=D, d_kv=8, d_ff=32, num_layers=1,
                                                 num_heads=2)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=None, tokenizer=None,
                        text_encoder_2=text_encoder_2, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe(num_layers: int = 2) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=D, joint_attention_dim=16,
                               pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_G = torch.Generator().manual_seed(1)
EMB = {"prompt_embeds": torch.randn(1, 8, 16, generator=_G), "pooled_prompt_embeds": torch.randn(1, 16, generator=_G),
       "negative_prompt_embeds": torch.randn(1, 8, 16, generator=_G),
       "negative_pooled_prompt_embeds": torch.randn(1, 16, generator=_G)}


def generate(pipe, steps: int = STEPS, **kw) -> torch.Tensor:
    args = dict(num_inference_steps=steps, height=8, width=8, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kw)
    emb = {k: v.to(pipe.transformer.device) for k, v in EMB.items()}
    if isinstance(pipe, FluxPipeline):
        args.update(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"])
    else:
        args.update(emb)
        args.setdefault("guidance_scale", 5.0)
    return pipe(**args).images


def sae(seed: int, harmful=HARM_A, d: int = D) -> sk.TopKSAE:
    return sk.random_sae(d, F, K, harmful=harmful, seed=seed)
