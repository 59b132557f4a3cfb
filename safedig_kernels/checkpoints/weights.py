"""What every reader returns and every writer takes: `SAEWeights` (the four tensors as the ops
compute with them, k) and its `SAEMetadata` (site, harmful features, default strengths, where
the weights came from). Nothing here reads or writes a file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
FORMAT_VERSION = 1


@dataclass
class SAEMetadata:
    """What a checkpoint says about its SAE besides the weights (JSON-serialisable)."""

    format_version: int = FORMAT_VERSION
    model: str = ""                    # e.g. "black-forest-labs/FLUX.1-dev"
    site: str = ""                     # e.g. "single_transformer_blocks.9"
    harmful_features: list[int] = field(default_factory=list)
    beta: float = 0.0                  # default Blend strength
    gamma: float = 0.0                 # default Repel strength
    tau: float = 0.0                   # default gate threshold
    activation_scale: float = 1.0      # trained on x * scale; already folded into the weights
    source: str = "safedig"            # format the weights were read from
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEMetadata":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAE metadata keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class SAEWeights:
    """What a checkpoint holds, as the ops compute with it: `W_enc` `[d, F]`, `b_enc` `[F]`,
    `W_dec` `[F, d]`, `b_dec` `[d]` (one dtype, every foreign convention folded in), k, and the
    metadata (harmful features and default strengths included)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    k: int
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

