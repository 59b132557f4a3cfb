"""safedig_kernels: SAE-based safety steering (SafeDIG) for diffusion transformers.

Importing the package registers the `torch.ops.safedig.*` custom ops. It works without CUDA
and without Triton (CPU tensors run the PyTorch reference), and it never imports diffusers:
the pipeline integration (`safedig_kernels.integrations`) and the SafeDIG workflow
(`safedig_kernels.workflow`) are imported on their own.

    sae = safedig_kernels.TopKSAE.load("site.safetensors")
    y, h = safedig_kernels.steer(x, sae, beta=0.5, gamma=1.0, tau=0.0)   # x: [N, d] or [B, T, d]

The kernel core imports strictly downward: `_library` -> `_checks` -> `reference` -> `ops`
-> `checkpoints` -> `sae`; `_io` (files and dtype names) sits beside them all.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checkpoints, ops, reference
from .checkpoints import FORMAT_VERSION, SAEMetadata, SAEWeights
from .ops import Harmful, Strength
from .sae import TopKSAE, load_sae, random_sae, save_sae

__version__ = "0.1.0"
__all__ = ["TopKSAE", "SAEMetadata", "SAEWeights", "FORMAT_VERSION", "random_sae", "load_sae", "save_sae",
           "encode", "decode", "steer", "ops", "reference", "checkpoints"]


def encode(x: torch.Tensor, sae: TopKSAE) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK codes of `x` `[N, d]` or `[B, T, d]`: `vals` fp32 and `idx` int32, `[..., k]`."""
    return sae.encode(x)


def decode(vals: torch.Tensor, idx: torch.Tensor, sae: TopKSAE) -> torch.Tensor:
    """Reconstruction `[..., d]` (SAE dtype) from codes `[..., k]`."""
    return sae.decode(vals, idx)


def steer(x: torch.Tensor, sae: TopKSAE, *, beta: Optional[Strength] = None, gamma: Optional[Strength] = None,
          tau: Optional[Strength] = None, harmful: Optional[Harmful] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend/Repel steering (spec §2) of `x` `[N, d]` or `[B, T, d]`, any strides.

    `y = x + g * (beta * (x_hat_safe - x) - gamma * r)`, g = 1 where the harm score h > tau.
    Unset strengths and harmful set come from the SAE. Returns `y` (x's shape and dtype) and
    `h` (fp32, `[N]` or `[B, T]`).
    """
    return sae.steer(x, beta=beta, gamma=gamma, tau=tau, harmful=harmful)

