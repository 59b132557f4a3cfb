"""Tiny transformers, one per DiT family whose blocks diffusers registers in
``diffusers.hooks._helpers.TransformerBlockRegistry``, with the keyword arguments of one forward call
in the family's own conventions. Built in code, seeded, CPU-sized (heads x head_dim = 2 x 8).

Each ``Family`` says how its main pipeline calls the transformer:

- ``call_kwargs(batch, device, dtype, p=...)`` gives the keyword arguments of one call whose timestep
  sits at schedule progress ``p`` (0 = pure noise, 1 = clean), written the way the pipeline writes it
  (``timestep_arg`` names that argument; its value may be ``[B]``, ``[B, tokens]`` or ``[tokens]``).
- ``progress(timestep)`` maps that value back to ``p``. For flow-matching families ``p = 1 - sigma``;
  for discrete DDPM/DDIM families (``discrete_timesteps``) it is ``1 - t / 1000``, the fraction of the
  1000 training steps already walked, not ``1 - sigma``.
- ``cfg``: how classifier-free guidance reaches the transformer (see ``CFG_STYLES``), and
  ``cache_contexts`` the names the pipeline passes to ``transformer.cache_context`` (empty: none).
- ``stacks``: the attributes of the transformer holding registered blocks (all direct children).
- ``streams``: per stack, the token counts of the two streams at the registry's indexes for one
  ``call_kwargs`` call: ``(hidden, text)``, ``text`` None where the block returns no text stream; a list
  gives one pair per block where blocks of a stack differ. ``text_width`` is the text stream's width.
- ``pipeline()`` (where the main pipeline runs without text encoders and with a tiny or no VAE) builds
  that pipeline around a fresh tiny transformer, with the keyword arguments of a guided call on two
  prompts (true CFG for the distilled FLUX.1 and HunyuanVideo).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import torch

W_HEADS, W_HEAD_DIM = 2, 8
WIDTH = W_HEADS * W_HEAD_DIM     # inner width of every tiny transformer's blocks
TEXT_LEN = 8                     # text tokens per prompt
TEXT_DIM = 16                    # text-encoder width fed to the transformer

# How classifier-free guidance reaches the transformer in the family's main pipeline.
CFG_STYLES = {
    "separate": "cond and uncond are two transformer calls of batch B each (cond first)",
    "uncond_cond": "one call of batch 2B, rows [uncond; cond]",
    "cond_uncond": "one call of batch 2B, rows [cond; uncond]",
    "distilled": "guidance-distilled: one call of batch B with the guidance scale embedded; the pipeline's "
                 "optional true CFG (negative prompt, true_cfg_scale > 1) adds a separate uncond call after it",
}


@dataclass
class PipelineCase:
    """A tiny pipeline and one guided call of it. ``cond``/``uncond`` are the per-prompt embeddings
    handed to the pipeline: a transformer row whose ``text_arg`` equals ``cond[i]`` is prompt i's cond row."""
    pipe: diffusers.DiffusionPipeline
    kwargs: dict
    text_arg: str
    cond: torch.Tensor
    uncond: torch.Tensor | None


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str
    stacks: tuple[str, ...]
    build: Callable[[], torch.nn.Module]
    call_kwargs: Callable[..., dict]
    progress: Callable[[torch.Tensor], torch.Tensor]
    pipeline_class_name: str
    cfg: str
    cache_contexts: tuple[str, ...] = ()
    timestep_arg: str = "timestep"
    discrete_timesteps: bool = False
    text_width: int = WIDTH
    streams: dict = field(default_factory=dict)
    batched: bool = True            # False: the model packs one sample per call (batch must be 1)
    pipeline: Callable[[], PipelineCase] | None = None
    notes: str = ""


def _g(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, device, dtype, seed):
    return torch.randn(*shape, generator=_g(seed)).to(device=device, dtype=dtype)


def _seeded(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return make().eval()
    return build


def _rows(batch: int, value: float, device) -> torch.Tensor:
    return torch.full((batch,), float(value), device=device)


# Timestep conventions (the value the pipeline passes, written from progress p, and back).
def _sigma(p: float) -> float:
    return 1.0 - p


def _progress_from_sigma(ts: torch.Tensor) -> torch.Tensor:          # timestep = sigma (FLUX, Qwen)
    return 1.0 - ts.float()


def _progress_from_t1000(ts: torch.Tensor) -> torch.Tensor:          # timestep = 1000 * sigma
    return 1.0 - ts.float() / 1000.0


def _progress_from_one_minus_sigma(ts: torch.Tensor) -> torch.Tensor:  # Z-Image: t = 1 - sigma
    return ts.float()


def _progress_from_mochi(ts: torch.Tensor) -> torch.Tensor:          # Mochi: t = 1000 * (1 - sigma)
    return ts.float() / 1000.0


def _text(batch, device, dtype, seed=2, length=TEXT_LEN, dim=TEXT_DIM):
    return _randn(batch, length, dim, device=device, dtype=dtype, seed=seed)


def _text_mask(batch, device, length=TEXT_LEN):
    """Last two tokens of the second prompt are padding, as a tokenizer pads a shorter prompt."""
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if batch > 1:
        mask[1, -2:] = 0
    return mask


def _flux_ids(h: int, w: int, axes: int, device, batched: int | None = None):
    img = torch.zeros(h, w, axes)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    img = img.reshape(h * w, axes).to(device)
    txt = torch.zeros(TEXT_LEN, axes, device=device)
    if batched:
        return img.expand(batched, -1, -1), txt.expand(batched, -1, -1)
    return img, txt


# ---- FLUX.1 (dev: guidance-distilled) ---------------------------------------------------------
def _flux_build():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def _flux_kwargs(batch, device, dtype, p=0.25):
    img_ids, txt_ids = _flux_ids(4, 4, 3, device)
    return dict(hidden_states=_randn(batch, 16, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                pooled_projections=_randn(batch, TEXT_DIM, device=device, dtype=dtype, seed=3),
                timestep=_rows(batch, _sigma(p), device).to(dtype), guidance=_rows(batch, 3.5, device).to(dtype),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


# ---- FLUX.2 ----------------------------------------------------------------------------------
def _flux2_build(guidance_embeds=True):
    # guidance_embeds=True is FLUX.2 [dev]; the Klein models have no guidance embedding.
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds)


def _flux2_kwargs(batch, device, dtype, p=0.25, guidance=4.0):
    img_ids, txt_ids = _flux_ids(4, 4, 4, device, batched=batch)
    return dict(hidden_states=_randn(batch, 16, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype), timestep=_rows(batch, _sigma(p), device).to(dtype),
                guidance=None if guidance is None else _rows(batch, guidance, device).to(dtype),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _flux2_klein_kwargs(batch, device, dtype, p=0.25):
    return _flux2_kwargs(batch, device, dtype, p, guidance=None)


# ---- SD3 / SD3.5 (JointTransformerBlock) -----------------------------------------------------
def _sd3_build():
    # Three blocks: the first with SD3.5's dual attention, the last text-free (context_pre_only).
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, joint_attention_dim=TEXT_DIM, caption_projection_dim=WIDTH,
        pooled_projection_dim=TEXT_DIM, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
        qk_norm="rms_norm")


def _sd3_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                pooled_projections=_randn(batch, TEXT_DIM, device=device, dtype=dtype, seed=3),
                timestep=_rows(batch, 1000 * _sigma(p), device), return_dict=False)


# ---- Qwen-Image --------------------------------------------------------------------------------
def _qwen_build():
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4))


def _qwen_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 16, 16, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_hidden_states_mask=_text_mask(batch, device),
                timestep=_rows(batch, _sigma(p), device).to(dtype), img_shapes=[[(1, 4, 4)]] * batch,
                return_dict=False)


# ---- Wan 2.1 / 2.2 -------------------------------------------------------------------------------
def _wan_build():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, in_channels=4,
        out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _wan_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 2, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                timestep=_rows(batch, 1000 * _sigma(p), device), return_dict=False)


def _wan_ti2v_kwargs(batch, device, dtype, p=0.25):
    # Wan 2.2 TI2V (expand_timesteps): one timestep per patch token, [B, F * H/2 * W/2]; an image-
    # conditioned first frame carries t = 0 (clean), the rest the step's t.
    kwargs = _wan_kwargs(batch, device, dtype, p)
    per_token = torch.full((batch, 2, 4, 4), 1000 * _sigma(p), device=device)
    per_token[:, 0] = 0.0
    kwargs["timestep"] = per_token.flatten(1)
    return kwargs


# ---- HunyuanVideo (guidance-distilled) and its token-replace I2V variant ------------------------
def _hunyuan_video_build(image_condition_type=None):
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
        image_condition_type=image_condition_type)


def _hunyuan_video_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 2, 4, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_attention_mask=_text_mask(batch, device),
                pooled_projections=_randn(batch, 8, device=device, dtype=dtype, seed=3),
                timestep=_rows(batch, 1000 * _sigma(p), device).to(dtype),
                guidance=_rows(batch, 6.0 * 1000.0, device).to(dtype), return_dict=False)


# ---- LTX-Video -----------------------------------------------------------------------------------
def _ltx_build():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=W_HEADS,
        attention_head_dim=W_HEAD_DIM, cross_attention_dim=WIDTH, num_layers=2, caption_channels=TEXT_DIM)


def _ltx_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 2 * 4 * 4, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                timestep=_rows(batch, 1000 * _sigma(p), device),
                encoder_attention_mask=_text_mask(batch, device), num_frames=2, height=4, width=4,
                rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


# ---- CogVideoX (discrete DDIM/DPM timesteps) -----------------------------------------------------
def _cogvideox_build():
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN)


def _cogvideox_kwargs(batch, device, dtype, p=0.25):
    t = round(999 * (1.0 - p))
    return dict(hidden_states=_randn(batch, 2, 4, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                timestep=torch.full((batch,), t, dtype=torch.long, device=device), return_dict=False)


# ---- Z-Image -------------------------------------------------------------------------------------
def _z_image_build():
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=WIDTH, n_layers=2, n_refiner_layers=2,
        n_heads=W_HEADS, n_kv_heads=W_HEADS, cap_feat_dim=TEXT_DIM, axes_dims=[2, 2, 4], axes_lens=[64, 16, 16])


def _z_image_kwargs(batch, device, dtype, p=0.25):
    # The pipeline passes lists, one [C, 1, H, W] latent and one [L_i, D] caption per row; a shorter
    # second caption makes the unified sequence padded, as it is with real prompts.
    x = _randn(batch, 4, 1, 8, 8, device=device, dtype=dtype, seed=1)
    caps = _text(batch, device, dtype)
    return dict(x=list(x.unbind(0)), t=_rows(batch, 1.0 - _sigma(p), device).to(dtype),
                cap_feats=[caps[i, : TEXT_LEN - 2 * (i % 2)] for i in range(batch)], return_dict=False)


# ---- HunyuanImage 2.1 -------------------------------------------------------------------------------
def _hunyuan_image_build():
    return diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=TEXT_DIM, rope_axes_dim=(4, 4))


def _hunyuan_image_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 4, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_attention_mask=_text_mask(batch, device),
                timestep=_rows(batch, 1000 * _sigma(p), device).to(dtype), return_dict=False)


# ---- CogView4 -----------------------------------------------------------------------------------------
def _cogview4_build():
    return diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, text_embed_dim=TEXT_DIM, time_embed_dim=8, condition_dim=4,
        pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8))


def _cogview4_kwargs(batch, device, dtype, p=0.25):
    size = torch.tensor([[64, 64]] * batch, dtype=dtype, device=device)
    return dict(hidden_states=_randn(batch, 4, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                timestep=_rows(batch, 1000 * _sigma(p), device), original_size=size, target_size=size,
                crop_coords=torch.zeros_like(size), return_dict=False)


# ---- Mochi ---------------------------------------------------------------------------------------------
def _mochi_build():
    # The text stream is pooled_projection_dim wide (1536 in Mochi-1 against 3072 for video): 8 here.
    return diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, num_layers=2,
        pooled_projection_dim=8, in_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=4,
        max_sequence_length=TEXT_LEN)


def _mochi_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 2, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_attention_mask=_text_mask(batch, device),
                timestep=_rows(batch, 1000 * p, device).to(dtype), return_dict=False)


# ---- MotifVideo ------------------------------------------------------------------------------------------
def _motif_build():
    # One decoder single block (num_decoder_layers=1): there the "encoder" stream is image tokens.
    return diffusers.MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, num_layers=2,
        num_single_layers=3, num_decoder_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4))


def _motif_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 9, 2, 4, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_attention_mask=_text_mask(batch, device),
                timestep=_rows(batch, 1000 * _sigma(p), device), return_dict=False)


# ---- Bria ---------------------------------------------------------------------------------------------------
def _bria_build():
    return diffusers.BriaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=W_HEAD_DIM,
        num_attention_heads=W_HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=[2, 2, 4])


def _bria_kwargs(batch, device, dtype, p=0.25):
    img_ids, txt_ids = _flux_ids(4, 4, 3, device)
    return dict(hidden_states=_randn(batch, 16, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                timestep=_rows(batch, 1000 * _sigma(p), device), img_ids=img_ids, txt_ids=txt_ids,
                return_dict=False)


# ---- Kandinsky 5 --------------------------------------------------------------------------------------------
def _kandinsky5_build():
    return diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM, time_dim=16, out_visual_dim=4,
        patch_size=(1, 2, 2), model_dim=WIDTH, ff_dim=32, num_text_blocks=2, num_visual_blocks=2, axes_dims=(2, 2, 4))


def _kandinsky5_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 2, 8, 8, 4, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                pooled_projections=_randn(batch, TEXT_DIM, device=device, dtype=dtype, seed=3),
                timestep=_rows(batch, 1000 * _sigma(p), device).to(dtype),
                visual_rope_pos=[torch.arange(2, device=device), torch.arange(4, device=device),
                                 torch.arange(4, device=device)],
                text_rope_pos=torch.arange(TEXT_LEN, device=device), return_dict=False)


# ---- Cosmos 3 (packed: one sample per call) ----------------------------------------------------------------------
def _cosmos3_build():
    return diffusers.Cosmos3OmniTransformer(
        head_dim=W_HEAD_DIM, hidden_size=WIDTH, intermediate_size=32, latent_channel=4, latent_patch_size=1,
        num_attention_heads=W_HEADS, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=4,
        rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 2], vocab_size=32)


def _cosmos3_kwargs(batch, device, dtype, p=0.25):
    if batch != 1:
        raise ValueError(f"Cosmos3OmniTransformer packs one sample per call; batch must be 1, got {batch}")
    und, vis = TEXT_LEN, 2 * 2 * 3           # text tokens, then 2 frames x 2 x 3 vision patches
    seq = und + vis
    vision = torch.arange(und, seq, device=device)
    return dict(input_ids=torch.arange(und, device=device) % 32, text_indexes=torch.arange(und, device=device),
                position_ids=torch.arange(seq, device=device).expand(3, -1), und_len=und, sequence_length=seq,
                vision_tokens=[_randn(1, 4, 2, 2, 3, device=device, dtype=dtype, seed=1)],
                vision_token_shapes=[(2, 2, 3)], vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                vision_timesteps=torch.full((vis,), 1000 * _sigma(p), device=device),
                vision_noisy_frame_indexes=[torch.arange(2, device=device)], return_dict=False)


# ---- BasicTransformerBlock users: PixArt-alpha/sigma, DiT ----------------------------------------------------
def _pixart_build():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=WIDTH, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, norm_num_groups=1)


def _discrete(batch, p, device):
    return torch.full((batch,), round(999 * (1.0 - p)), dtype=torch.long, device=device)


def _pixart_kwargs(batch, device, dtype, p=0.25):
    return dict(hidden_states=_randn(batch, 4, 8, 8, device=device, dtype=dtype, seed=1),
                encoder_hidden_states=_text(batch, device, dtype),
                encoder_attention_mask=_text_mask(batch, device), timestep=_discrete(batch, p, device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def _dit_build():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=W_HEADS, attention_head_dim=W_HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1)


def _dit_kwargs(batch, device, dtype, p=0.25):
    labels = torch.tensor([(7 * i) % 1000 for i in range(batch)], device=device)
    return dict(hidden_states=_randn(batch, 4, 8, 8, device=device, dtype=dtype, seed=1),
                timestep=_discrete(batch, p, device), class_labels=labels, return_dict=False)



# ---- Tiny pipelines: each main pipeline around a fresh tiny transformer, one guided call on two prompts ----
PIPE_STEPS = 2
PIPE_PROMPTS = 2
_FM = diffusers.FlowMatchEulerDiscreteScheduler


def _emb(seed, length=TEXT_LEN, dim=TEXT_DIM):
    return torch.randn(PIPE_PROMPTS, length, dim, generator=_g(seed))


def _pooled(seed, dim=TEXT_DIM):
    return torch.randn(PIPE_PROMPTS, dim, generator=_g(seed))


def _mask(length=TEXT_LEN):
    return torch.ones(PIPE_PROMPTS, length, dtype=torch.long)


def _call(**kwargs):
    return dict(num_inference_steps=PIPE_STEPS, output_type="latent", generator=_g(0), **kwargs)


def _no_text(**components):
    return dict(text_encoder=None, tokenizer=None, **components)


def _vae_kl(latent_channels=4):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                                   shift_factor=0.0)


def _flux_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.FluxPipeline(scheduler=_FM(), vae=None, transformer=FAMILIES["flux"].build(),
                                  **_no_text(text_encoder_2=None, tokenizer_2=None))
    return PipelineCase(pipe, _call(prompt_embeds=c, pooled_prompt_embeds=_pooled(13), negative_prompt_embeds=u,
                                    negative_pooled_prompt_embeds=_pooled(14), true_cfg_scale=2.0, height=32,
                                    width=32), "encoder_hidden_states", c, u)


def _flux2_pipe():
    c = _emb(11)
    pipe = diffusers.Flux2Pipeline(scheduler=_FM(), vae=None, transformer=FAMILIES["flux2"].build(), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, height=32, width=32), "encoder_hidden_states", c, None)


def _flux2_klein_pipe():
    c, u = _emb(11), _emb(12)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                                       up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=1,
                                       norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.Flux2KleinPipeline(scheduler=_FM(), vae=vae, transformer=FAMILIES["flux2_klein"].build(),
                                        **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=4.0, height=16,
                                    width=16), "encoder_hidden_states", c, u)


def _sd3_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=_FM(shift=3.0), vae=None, transformer=FAMILIES["sd3"].build(),
        **_no_text(text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None))
    return PipelineCase(pipe, _call(prompt_embeds=c, pooled_prompt_embeds=_pooled(13), negative_prompt_embeds=u,
                                    negative_pooled_prompt_embeds=_pooled(14), guidance_scale=5.0, height=64,
                                    width=64), "encoder_hidden_states", c, u)


def _qwen_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.QwenImagePipeline(scheduler=_FM(), vae=None, transformer=FAMILIES["qwenimage"].build(),
                                       **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_embeds_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_embeds_mask=_mask(), true_cfg_scale=4.0, height=32, width=32),
                        "encoder_hidden_states", c, u)


def _wan_pipe(expand_timesteps=False):
    c, u = _emb(11), _emb(12)
    family = "wan_ti2v" if expand_timesteps else "wan"
    pipe = diffusers.WanPipeline(scheduler=_FM(shift=5.0), vae=None, transformer=FAMILIES[family].build(),
                                 expand_timesteps=expand_timesteps, **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=5.0, height=64,
                                    width=64, num_frames=5), "encoder_hidden_states", c, u)


def _hunyuan_video_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.HunyuanVideoPipeline(scheduler=_FM(shift=7.0), vae=None,
                                          transformer=FAMILIES["hunyuanvideo"].build(),
                                          **_no_text(text_encoder_2=None, tokenizer_2=None))
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_attention_mask=_mask(), pooled_prompt_embeds=_pooled(13, 8),
                                    negative_prompt_embeds=u, negative_prompt_attention_mask=_mask(),
                                    negative_pooled_prompt_embeds=_pooled(14, 8), true_cfg_scale=2.0, height=32,
                                    width=32, num_frames=5), "encoder_hidden_states", c, u)


def _ltx_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.LTXPipeline(scheduler=_FM(), vae=None, transformer=FAMILIES["ltx"].build(), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_attention_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_attention_mask=_mask(), guidance_scale=3.0, height=32, width=32,
                                    num_frames=9), "encoder_hidden_states", c, u)


def _cogvideox_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.CogVideoXPipeline(scheduler=diffusers.CogVideoXDDIMScheduler(timestep_spacing="trailing"),
                                       vae=None, transformer=FAMILIES["cogvideox"].build(), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=6.0, height=64,
                                    width=64, num_frames=5), "encoder_hidden_states", c, u)


def _z_image_pipe():
    c, u = _emb(11), _emb(12)
    c_list, u_list = [c[0], c[1, :-2]], [u[0], u[1, :-2]]      # captions of different lengths, as real prompts
    pipe = diffusers.ZImagePipeline(scheduler=_FM(shift=3.0), vae=None, transformer=FAMILIES["z_image"].build(),
                                    **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c_list, negative_prompt_embeds=u_list, guidance_scale=4.0,
                                    height=64, width=64), "cap_feats", c_list, u_list)


def _hunyuan_image_pipe():
    c, u = _emb(11), _emb(12)
    c2, u2 = _emb(15, 4, 8), _emb(16, 4, 8)          # ByT5 embeddings: required, unused by this tiny model
    pipe = diffusers.HunyuanImagePipeline(scheduler=_FM(shift=5.0), vae=None,
                                          transformer=FAMILIES["hunyuanimage"].build(),
                                          guider=diffusers.ClassifierFreeGuidance(guidance_scale=3.5),
                                          **_no_text(text_encoder_2=None, tokenizer_2=None))
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_embeds_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_embeds_mask=_mask(), prompt_embeds_2=c2,
                                    prompt_embeds_mask_2=_mask(4), negative_prompt_embeds_2=u2,
                                    negative_prompt_embeds_mask_2=_mask(4), height=128, width=128),
                        "encoder_hidden_states", c, u)


def _cogview4_pipe():
    c, u = _emb(11), _emb(12)
    scheduler = _FM(use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75, base_image_seq_len=256)
    pipe = diffusers.CogView4Pipeline(scheduler=scheduler, vae=None, transformer=FAMILIES["cogview4"].build(),
                                      **_no_text())
    kwargs = _call(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=5.0, height=64, width=64)
    kwargs["num_inference_steps"] = 3           # a middle step shows t and the shifted sigma apart
    return PipelineCase(pipe, kwargs, "encoder_hidden_states", c, u)


def _mochi_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.MochiPipeline(scheduler=_FM(invert_sigmas=True), vae=None, transformer=FAMILIES["mochi"].build(),
                                   **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_attention_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_attention_mask=_mask(), guidance_scale=4.5, height=64, width=64,
                                    num_frames=7), "encoder_hidden_states", c, u)


def _motif_pipe():
    c, u = _emb(11), _emb(12)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    pipe = diffusers.MotifVideoPipeline(scheduler=_FM(), vae=vae, transformer=FAMILIES["motif_video"].build(),
                                        guider=diffusers.ClassifierFreeGuidance(guidance_scale=5.0), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_attention_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_attention_mask=_mask(), height=32, width=32, num_frames=5),
                        "encoder_hidden_states", c, u)


def _bria_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.BriaPipeline(scheduler=_FM(), vae=_vae_kl(), transformer=FAMILIES["bria"].build(), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=5.0, height=8, width=8),
                        "encoder_hidden_states", c, u)


def _kandinsky5_pipe():
    c, u = _emb(11), _emb(12)
    cu_seqlens = torch.arange(PIPE_PROMPTS + 1, dtype=torch.int32) * TEXT_LEN
    pipe = diffusers.Kandinsky5T2VPipeline(scheduler=_FM(shift=5.0), vae=None,
                                           transformer=FAMILIES["kandinsky5"].build(),
                                           **_no_text(text_encoder_2=None, tokenizer_2=None))
    return PipelineCase(pipe, _call(prompt_embeds_qwen=c, prompt_embeds_clip=_pooled(13), negative_prompt_embeds_qwen=u,
                                    negative_prompt_embeds_clip=_pooled(14), prompt_cu_seqlens=cu_seqlens,
                                    negative_prompt_cu_seqlens=cu_seqlens, guidance_scale=5.0, height=64, width=64,
                                    num_frames=5), "encoder_hidden_states", c, u)


def _pixart_pipe():
    c, u = _emb(11), _emb(12)
    pipe = diffusers.PixArtAlphaPipeline(scheduler=diffusers.DPMSolverMultistepScheduler(), vae=None,
                                         transformer=FAMILIES["pixart"].build(), **_no_text())
    return PipelineCase(pipe, _call(prompt_embeds=c, prompt_attention_mask=_mask(), negative_prompt_embeds=u,
                                    negative_prompt_attention_mask=_mask(), negative_prompt=None, guidance_scale=4.5,
                                    height=64, width=64, use_resolution_binning=False), "encoder_hidden_states", c, u)


def _dit_pipe():
    labels = torch.tensor([3, 5])
    pipe = diffusers.DiTPipeline(transformer=FAMILIES["dit"].build(), vae=_vae_kl(),
                                 scheduler=diffusers.DPMSolverMultistepScheduler())
    kwargs = dict(class_labels=labels.tolist(), guidance_scale=4.0, num_inference_steps=PIPE_STEPS, output_type="pt",
                  generator=_g(0))
    return PipelineCase(pipe, kwargs, "class_labels", labels, torch.full((PIPE_PROMPTS,), 1000))


_IMG = "transformer_blocks", "single_transformer_blocks"
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("flux", "FluxTransformer2DModel", _IMG, _seeded(_flux_build), _flux_kwargs, _progress_from_sigma,
           "FluxPipeline", "distilled", ("cond", "uncond"), streams={_IMG[0]: (16, 8), _IMG[1]: (16, 8)},
           pipeline=_flux_pipe,
           notes="true CFG (true_cfg_scale > 1 and a negative prompt) is a second call under cache_context('uncond')"),
    Family("flux2", "Flux2Transformer2DModel", _IMG, _seeded(_flux2_build), _flux2_kwargs, _progress_from_sigma,
           "Flux2Pipeline", "distilled", streams={_IMG[0]: (16, 8), _IMG[1]: (24, None)}, pipeline=_flux2_pipe,
           notes="single blocks return one tensor: the joint [text; image] sequence"),
    Family("flux2_klein", "Flux2Transformer2DModel", _IMG, _seeded(lambda: _flux2_build(guidance_embeds=False)),
           _flux2_klein_kwargs, _progress_from_sigma, "Flux2KleinPipeline", "separate", ("cond", "uncond"),
           streams={_IMG[0]: (16, 8), _IMG[1]: (24, None)}, pipeline=_flux2_klein_pipe),
    Family("sd3", "SD3Transformer2DModel", ("transformer_blocks",), _seeded(_sd3_build), _sd3_kwargs,
           _progress_from_t1000, "StableDiffusion3Pipeline", "uncond_cond",
           streams={"transformer_blocks": [(16, 8), (16, 8), (16, None)]}, pipeline=_sd3_pipe),
    Family("qwenimage", "QwenImageTransformer2DModel", ("transformer_blocks",), _seeded(_qwen_build), _qwen_kwargs,
           _progress_from_sigma, "QwenImagePipeline", "separate", ("cond", "uncond"),
           streams={"transformer_blocks": (16, 8)}, pipeline=_qwen_pipe),
    Family("wan", "WanTransformer3DModel", ("blocks",), _seeded(_wan_build), _wan_kwargs, _progress_from_t1000,
           "WanPipeline", "separate", ("cond", "uncond"), streams={"blocks": (32, None)}, pipeline=_wan_pipe),
    Family("wan_ti2v", "WanTransformer3DModel", ("blocks",), _seeded(_wan_build), _wan_ti2v_kwargs,
           _progress_from_t1000, "WanPipeline", "separate", ("cond", "uncond"), streams={"blocks": (32, None)},
           pipeline=lambda: _wan_pipe(expand_timesteps=True), notes="expand_timesteps=True: timestep is [B, tokens]"),
    Family("hunyuanvideo", "HunyuanVideoTransformer3DModel", _IMG, _seeded(_hunyuan_video_build),
           _hunyuan_video_kwargs, _progress_from_t1000, "HunyuanVideoPipeline", "distilled", ("cond", "uncond"),
           streams={_IMG[0]: (32, 8), _IMG[1]: (32, 8)}, pipeline=_hunyuan_video_pipe,
           notes="true CFG (true_cfg_scale > 1 and a negative prompt) is a second call under cache_context('uncond')"),
    Family("hunyuanvideo_token_replace", "HunyuanVideoTransformer3DModel", _IMG,
           _seeded(lambda: _hunyuan_video_build("token_replace")), _hunyuan_video_kwargs, _progress_from_t1000,
           "HunyuanVideoImageToVideoPipeline", "distilled", streams={_IMG[0]: (32, 8), _IMG[1]: (32, 8)},
           notes="true CFG is a second call, without cache_context; the first latent frame is the clean image"),
    Family("ltx", "LTXVideoTransformer3DModel", ("transformer_blocks",), _seeded(_ltx_build), _ltx_kwargs,
           _progress_from_t1000, "LTXPipeline", "uncond_cond", ("cond_uncond",),
           streams={"transformer_blocks": (32, None)}, pipeline=_ltx_pipe),
    Family("cogvideox", "CogVideoXTransformer3DModel", ("transformer_blocks",), _seeded(_cogvideox_build),
           _cogvideox_kwargs, _progress_from_t1000, "CogVideoXPipeline", "uncond_cond", ("cond_uncond",),
           discrete_timesteps=True, streams={"transformer_blocks": (32, 8)}, pipeline=_cogvideox_pipe),
    Family("z_image", "ZImageTransformer2DModel", ("noise_refiner", "context_refiner", "layers"),
           _seeded(_z_image_build), _z_image_kwargs, _progress_from_one_minus_sigma, "ZImagePipeline",
           "cond_uncond", timestep_arg="t", pipeline=_z_image_pipe,
           # every sequence is padded to a multiple of 32: 16 image tokens -> 32, 8 or 6 caption tokens -> 32
           streams={"noise_refiner": (32, None), "context_refiner": (32, None), "layers": (64, None)}),
    Family("hunyuanimage", "HunyuanImageTransformer2DModel", _IMG, _seeded(_hunyuan_image_build),
           _hunyuan_image_kwargs, _progress_from_t1000, "HunyuanImagePipeline", "separate",
           ("pred_cond", "pred_uncond"), streams={_IMG[0]: (16, 8), _IMG[1]: (16, 8)}, pipeline=_hunyuan_image_pipe),
    Family("cogview4", "CogView4Transformer2DModel", ("transformer_blocks",), _seeded(_cogview4_build),
           _cogview4_kwargs, _progress_from_t1000, "CogView4Pipeline", "separate", ("cond", "uncond"),
           streams={"transformer_blocks": (16, 8)}, pipeline=_cogview4_pipe,
           notes="the pipeline passes unshifted t while the scheduler steps shifted sigmas: 1 - t/1000 != 1 - sigma"),
    Family("mochi", "MochiTransformer3DModel", ("transformer_blocks",), _seeded(_mochi_build), _mochi_kwargs,
           _progress_from_mochi, "MochiPipeline", "uncond_cond", ("cond_uncond",), text_width=8,
           streams={"transformer_blocks": (32, 8)}, pipeline=_mochi_pipe,
           notes="the last block (context_pre_only) returns its text input unchanged, the same tensor object"),
    Family("motif_video", "MotifVideoTransformer3DModel", _IMG, _seeded(_motif_build), _motif_kwargs,
           _progress_from_t1000, "MotifVideoPipeline", "separate", ("pred_cond", "pred_uncond"),
           streams={_IMG[0]: (32, 8), _IMG[1]: [(32, 8), (32, 8), (32, 32)]}, pipeline=_motif_pipe,
           notes="decoder single blocks (the last num_decoder_layers) get image tokens as their 'encoder' stream"),
    Family("bria", "BriaTransformer2DModel", ("transformer_blocks",), _seeded(_bria_build), _bria_kwargs,
           _progress_from_t1000, "BriaPipeline", "uncond_cond", streams={"transformer_blocks": (16, None)},
           pipeline=_bria_pipe,
           notes="BriaTransformerBlock returns (text, image) but is registered with hidden index 0; "
                 "BriaSingleTransformerBlock is not registered"),
    Family("kandinsky5", "Kandinsky5Transformer3DModel", ("visual_transformer_blocks",), _seeded(_kandinsky5_build),
           _kandinsky5_kwargs, _progress_from_t1000, "Kandinsky5T2VPipeline", "separate",
           streams={"visual_transformer_blocks": (32, None)}, pipeline=_kandinsky5_pipe,
           notes="text_transformer_blocks (Kandinsky5TransformerEncoderBlock) are not registered"),
    Family("cosmos3", "Cosmos3OmniTransformer", ("layers",), _seeded(_cosmos3_build), _cosmos3_kwargs,
           _progress_from_t1000, "Cosmos3OmniPipeline", "separate", ("cond", "uncond"),
           timestep_arg="vision_timesteps", batched=False, streams={"layers": (12, 8)},
           notes="packed [tokens, width] streams without a batch dimension; per-token timesteps"),
    Family("pixart", "PixArtTransformer2DModel", ("transformer_blocks",), _seeded(_pixart_build), _pixart_kwargs,
           _progress_from_t1000, "PixArtAlphaPipeline", "uncond_cond", discrete_timesteps=True,
           streams={"transformer_blocks": (16, None)}, pipeline=_pixart_pipe),
    Family("dit", "DiTTransformer2DModel", ("transformer_blocks",), _seeded(_dit_build), _dit_kwargs,
           _progress_from_t1000, "DiTPipeline", "cond_uncond", discrete_timesteps=True,
           streams={"transformer_blocks": (16, None)}, pipeline=_dit_pipe),
]}
