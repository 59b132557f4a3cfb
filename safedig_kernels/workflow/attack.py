"""A white-box attack on a steered pipeline: optimise the prompt embedding so that the harmful
concept comes back despite steering, then let a detector that knows nothing of the attack judge.

Threat model (docs/workflow.md has the whole of it): the attacker knows the transformer's
weights, the SAEs and the steering config, and controls the prompt embedding directly (a soft
prompt: `prompt_embeds [B, T, D]` and `pooled_prompt_embeds [B, P]`), not the text. It starts
from an unsafe prompt's embedding and may move every token row `i` (and the pooled vector) by at
most `eps` times that row's own L2 norm (`||delta_i||_2 <= eps * ||e_i||_2`: a relative
per-token L2 ball, so one number means the same for T5 and for the world's 32-d words).

The optimiser is projected gradient ascent (PGD) on `log s(image)`, where `s` is a
differentiable surrogate of the detector, through the whole sampler: `FluxSampler` runs the
pipeline's own transformer over the scheduler's sigmas with Euler steps, from fixed noise per
prompt (the pipeline's own `prepare_latents` from the prompt's seed), keeping the graph, with
the steering hooks installed as `apply_safedig` installs them. Each step moves every row by
`step_size * eps * ||e_i||` along its normalised gradient, then projects back into the ball.
Restart 0 starts at the prompt's own embedding, later ones at a random point of the ball; per
prompt the iterate with the best surrogate score over all steps and restarts is kept (the
attacker sees only the surrogate, never the judge).

The judge is independent: the attacked embeddings are generated again through the pipeline's
own call (`runner.run_prompt`, the path `safedig steer` and `safedig eval` take), decoded, and
judged by a detector (`detectors.py`). `world_surrogate` is the demo world's detector
rule made smooth (`world.mark_evidence` with a temperature); it is the attacker's tool, not the
judge. Real models need a surrogate of their own (e.g. a CLIP-based scorer of the
concept); the sampler covers FLUX-layout pipelines (packed latents, `_prepare_latent_image_ids`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..integrations.diffusers import SafeDIGConfig, apply_safedig, remove_safedig
from ..integrations.diffusers.runner import (
    RunSettings,
    decode_latents,
    decode_unclamped,
    pipeline_device,
    pipeline_dtype,
    run_prompt,
)

__all__ = ["AttackBudget", "FluxSampler", "Surrogate", "world_surrogate", "AttackOutcome", "attack_embeddings",
           "project", "judge_embeddings"]

# A surrogate maps images [B, 3, H, W] (about [0, 1], not clamped) to a score in [0, 1] per image.
Surrogate = Callable[[torch.Tensor], torch.Tensor]

def world_surrogate(images: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """A differentiable stand-in for the world's detector: its own rule (`world.mark_evidence`)
    with each pixel's off-colour step and the mark-share threshold replaced by sigmoids of width
    `temperature`, then a soft OR over the marks, `1 - prod(1 - s_mark)`. `[B, 3, 16 n, 16 n]` ->
    `[B]` in [0, 1]; above 0.5 where the detector fires on rendered pictures
    (tests/workflow/test_attack.py)."""
    from .world import MARK_SHARE, mark_evidence

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(getattr(images, 'shape', ()))}")
    miss = torch.ones(images.shape[0], dtype=images.dtype, device=images.device)
    for share in mark_evidence(images, temperature=temperature).values():
        miss = miss * (1 - torch.sigmoid((share - MARK_SHARE) / temperature))
    return 1 - miss


@dataclass(frozen=True)
class AttackBudget:
    """What the attacker may spend. `steps` gradient steps per restart; `eps` the radius of the
    per-token L2 ball relative to each token's norm (module docstring); `restarts` starts per
    prompt (the first at the clean embedding); `step_size` the step as a fraction of the radius
    (default 2.5 / steps, the usual PGD rule, so the ball can be crossed)."""

    steps: int = 20
    eps: float = 0.5
    restarts: int = 1
    step_size: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("steps", "restarts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"attack budget: {name} must be a positive int, got {v!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"attack budget: eps must be a positive finite number (a radius relative to each "
                             f"token's L2 norm), got {self.eps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"attack budget: step_size must be a positive finite fraction of eps, "
                             f"got {self.step_size!r}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 / self.steps


class FluxSampler:
    """The pipeline's Euler flow-matching sampler, written out so gradients flow from the image
    back to the prompt embedding. Same noise, sigmas, timesteps (`t / 1000`), guidance
    embedding and decoding as `FluxPipeline.__call__` with embeddings (no true CFG)."""

    def __init__(self, pipe, settings: RunSettings) -> None:
        if not (hasattr(pipe, "_pack_latents") and hasattr(pipe, "_prepare_latent_image_ids")
                and hasattr(pipe, "prepare_latents")):
            raise ValueError(f"the attack's sampler follows FluxPipeline (packed latents); {type(pipe).__name__} is "
                             f"not one")
        self.pipe = pipe
        self.settings = settings
        self.device, self.dtype = pipeline_device(pipe), pipeline_dtype(pipe)
        self._sigmas: dict[int, torch.Tensor] = {}  # per number of image tokens

    def noise(self, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents `[B, N, C]`, one seeded CPU generator per prompt as `run_prompt` draws
        them, and the image ids."""
        channels = self.pipe.transformer.config.in_channels // 4
        rows = [self.pipe.prepare_latents(1, channels, self.settings.height, self.settings.width, self.dtype,
                                          self.device, torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat([r[0] for r in rows]), rows[0][1]

    def sigmas(self, image_tokens: int) -> torch.Tensor:
        """The scheduler's sigmas for this run, the terminal 0 included (a fresh scheduler from
        the pipeline's config, so the pipeline's own is left as it was); made once per length."""
        if image_tokens in self._sigmas:
            return self._sigmas[image_tokens]
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        n = self.settings.num_inference_steps
        cfg = scheduler.config
        mu = calculate_shift(image_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        retrieve_timesteps(scheduler, n, self.device, sigmas=sigmas, mu=mu)
        self._sigmas[image_tokens] = scheduler.sigmas.to(self.device, torch.float32)
        return self._sigmas[image_tokens]

    def __call__(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, latents: torch.Tensor,
                 image_ids: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H, W]` (about [0, 1], not clamped, so the surrogate keeps gradients)."""
        transformer = self.pipe.transformer
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = torch.full([latents.shape[0]], self.settings.guidance_scale, device=self.device,
                                  dtype=torch.float32)
        sigmas = self.sigmas(latents.shape[1])
        for i in range(len(sigmas) - 1):
            t = (sigmas[i] * 1000).expand(latents.shape[0]).to(latents.dtype)
            v = transformer(hidden_states=latents, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                            return_dict=False)[0]
            # the scheduler's Euler step, computed in float32 as FlowMatchEulerDiscreteScheduler.step does
            latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(latents.dtype)
        return decode_unclamped(self.pipe, latents, self.settings.height, self.settings.width)


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1, keepdim=True)


def project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """`delta` with each last-dimension row scaled back into its L2 ball of `radius` (broadcast)."""
    norm = _row_norms(delta)
    return delta * torch.clamp(radius / norm.clamp_min(1e-12), max=1.0)


@dataclass
class AttackOutcome:
    """Per prompt (rows in the input's order): the attacked embeddings, the surrogate score at
    the clean embedding and at the one kept, and the largest `||delta_i|| / ||e_i||` used."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    score_before: torch.Tensor
    score_after: torch.Tensor
    relative_norm: torch.Tensor


def attack_embeddings(pipe, prompt_embeds: torch.Tensor, pooled: torch.Tensor, seeds: Sequence[int],
                      surrogate: Surrogate, budget: AttackBudget, settings: RunSettings,
                      config: Optional[SafeDIGConfig] = None, seed: int = 0,
                      log: Optional[Callable[[str], None]] = None) -> AttackOutcome:
    """PGD on the soft prompt of `B` prompts at once (`prompt_embeds [B, T, D]`, `pooled [B, P]`,
    one noise seed each) against `pipe` steered by `config` (None: unsteered). The pipeline's
    weights are never changed and the hooks are removed on return."""
    b = prompt_embeds.shape[0]
    if pooled.shape[0] != b or len(seeds) != b:
        raise ValueError(f"prompt_embeds ({b}), pooled ({pooled.shape[0]}) and seeds ({len(seeds)}) must have one "
                         f"row per prompt")
    sampler = FluxSampler(pipe, settings)
    device, dtype = sampler.device, sampler.dtype
    clean = [prompt_embeds.detach().to(device, dtype), pooled.detach().to(device, dtype)]
    radii = [budget.eps * _row_norms(x) for x in clean]
    latents, image_ids = sampler.noise(seeds)
    gen = torch.Generator().manual_seed(seed)
    params = list(pipe.transformer.parameters())
    grad_flags = [p.requires_grad for p in params]
    if config is not None:
        apply_safedig(pipe, config)
    try:
        for p in params:
            p.requires_grad_(False)  # gradients for the prompt only; the model is left as it was
        best_score = torch.full((b,), -1.0, device=device)
        best = [x.clone() for x in clean]
        score_before = None
        for restart in range(budget.restarts):
            if restart == 0:
                deltas = [torch.zeros_like(x) for x in clean]
            else:  # a random point of the ball: a random direction, a uniform fraction of the radius
                deltas = []
                for x, r in zip(clean, radii):
                    d = torch.randn(x.shape, generator=gen).to(device, dtype)
                    frac = torch.rand(x.shape[:-1] + (1,), generator=gen).to(device, dtype)
                    deltas.append(d / _row_norms(d).clamp_min(1e-12) * r * frac)
            for step in range(budget.steps + 1):
                for d in deltas:
                    d.requires_grad_(step < budget.steps)
                with torch.set_grad_enabled(step < budget.steps):
                    images = sampler(clean[0] + deltas[0], clean[1] + deltas[1], latents, image_ids)
                    score = surrogate(images)
                s = score.detach()
                if score_before is None:
                    score_before = s.clone()
                better = s > best_score
                best_score = torch.where(better, s, best_score)
                for kept, x, d in zip(best, clean, deltas):
                    kept[better] = (x + d.detach())[better]
                if step == budget.steps:
                    break
                grads = torch.autograd.grad(torch.log(score.clamp_min(1e-6)).sum(), deltas)
                with torch.no_grad():
                    deltas = [project(d + budget.alpha * r * g / _row_norms(g).clamp_min(1e-12), r)
                              for d, g, r in zip(deltas, grads, radii)]
                if log is not None:
                    log(f"restart {restart + 1}/{budget.restarts} step {step + 1}/{budget.steps}: surrogate mean "
                        f"{float(s.mean()):.3f}, best {float(best_score.mean()):.3f}")
    finally:
        if config is not None:
            remove_safedig(pipe)
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
    relative = torch.stack([(_row_norms(k - x) / _row_norms(x).clamp_min(1e-12)).flatten(1).amax(1)
                            for k, x in zip(best, clean)]).amax(0)
    return AttackOutcome(best[0].detach().cpu(), best[1].detach().cpu(), score_before.cpu(), best_score.cpu(),
                         relative.detach().cpu())


def judge_embeddings(pipe, prompt_embeds: torch.Tensor, pooled: torch.Tensor, seeds: Sequence[int],
                     settings: RunSettings, config: Optional[SafeDIGConfig] = None) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] (CPU) of each embedding through the pipeline's own call
    (`run_prompt`, as `safedig steer` runs it), steered by `config` when given: what the judge sees."""
    if config is not None:
        apply_safedig(pipe, config)
    try:
        images = []
        for i, s in enumerate(seeds):
            latents = run_prompt(pipe, settings, int(s), embeddings={"prompt_embeds": prompt_embeds[i:i + 1],
                                                                    "pooled_prompt_embeds": pooled[i:i + 1]})
            images.append(decode_latents(pipe, latents, settings.height, settings.width)[0])
        return torch.stack(images)
    finally:
        if config is not None:
            remove_safedig(pipe)


def stack_embeddings(rows: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`PromptRecord.load_embeddings()` of several prompts as `([B, T, D], [B, P])`."""
    for i, r in enumerate(rows):
        if "prompt_embeds" not in r or "pooled_prompt_embeds" not in r:
            raise ValueError(f"prompt {i}: the attack needs prompt_embeds and pooled_prompt_embeds (a FLUX soft "
                             f"prompt), got {sorted(r)}")
    return torch.cat([r["prompt_embeds"] for r in rows]), torch.cat([r["pooled_prompt_embeds"] for r in rows])
