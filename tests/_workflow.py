"""Shared builders for the workflow tests: hand-made SAEs and planted activation stores.

An orthonormal SAE (`W_enc = Q`, `W_dec = Q^T`, zero biases) encodes a token built as
`sum_j c_j Q[:, j]` to exactly its largest coefficients, so a planted feature is a known id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from safedig_kernels import TopKSAE
from safedig_kernels.workflow.store import ActivationWriter, SiteSpec


def orthonormal_basis(d: int, seed: int) -> torch.Tensor:
    """`[d, d]` with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()


def orthonormal_sae(Q: torch.Tensor, k: int) -> TopKSAE:
    d = Q.shape[0]
    return TopKSAE(Q.clone(), torch.zeros(d), Q.t().contiguous(), torch.zeros(d), k=k)


def planted_tokens(Q: torch.Tensor, n: int, gen: torch.Generator, background: Sequence[int],
                   planted: Mapping[int, tuple[float, float]] = {}) -> torch.Tensor:
    """`[n, d]` tokens: three random background features of size ~1 each, plus each planted
    feature j with probability p at magnitude m (`planted = {j: (p, m)}`). With k <= 3 the
    top k of every token are real features, never float-noise codes of absent ones."""
    d = Q.shape[0]
    c = torch.zeros(n, d)
    bg = torch.tensor(list(background))
    for i in range(n):
        pick = bg[torch.randperm(len(bg), generator=gen)[:3]]
        c[i, pick] = 0.8 + 0.4 * torch.rand(3, generator=gen)
        for j, (p, m) in planted.items():
            if float(torch.rand((), generator=gen)) < p:
                c[i, j] = m
    return c @ Q.t()


def write_store(directory: Path, prompts: Mapping[str, tuple[str, Mapping[str, torch.Tensor]]],
                tokens_total: int = 64) -> Path:
    """A capture directory with one step per prompt: `prompts[id] = (label, {site: [T, d]})`."""
    w = ActivationWriter(directory, {"synthetic": True}, shard_bytes=1 << 16)
    for pid, (label, sites) in prompts.items():
        for site, x in sites.items():
            w.add(x, site=SiteSpec.parse(site), step=0, prompt_id=pid, label=label, tokens_total=tokens_total)
        w.finish_prompt(pid, label)
    w.close()
    return Path(directory)
