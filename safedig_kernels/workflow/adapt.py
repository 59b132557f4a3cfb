"""Decoder-only adaptation of a source SAE to a target risk domain (SafeDIG step 3).

The encoder (`W_enc`, `b_enc`) is frozen and returned bit-identical: it is the reusable safety
dictionary, so the harmful feature ids found on the source keep their meaning. Only `W_dec` and
`b_dec` are trained, on batches that mix target activations with a `replay` share of source
activations, minimising

    sum_i ||x_i - x_hat_i||^2 / v(domain_i) / batch
        +  prox_coef * (||W_dec - W_dec0||^2 + ||b_dec - b_dec0||^2) / ||W_dec0||^2

where `v` is the per-token variance of each domain (so both count as fractions of variance) and
the last term keeps the decoder near the source one. `b_dec` also centres the encoder's input
(spec §2: `pre = (x - b_dec) W_enc + b_enc`), so adapting it moves the pre-activations by
`-Δb_dec W_enc`; the proximity term keeps that small, and `train_b_dec=False` keeps the
encoding function exactly the source's.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..reference import gather_sum
from ..sae import TopKSAE
from .train import BatchOrder, evaluate_sae

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4096


@dataclass
class AdaptConfig:
    """Adaptation settings; `batch_size` counts target and replayed source tokens together.

    `batch_size=None` (the default) takes `DEFAULT_BATCH_SIZE` tokens, or fewer when the data
    holds fewer: the largest batch whose target share and replayed source share both fit
    (`fitting_batch_size`). A batch size given explicitly that does not fit is an error.
    """

    steps: int = 500
    batch_size: Optional[int] = None
    lr: float = 1e-3
    replay: float = 0.2
    prox_coef: float = 0.1
    train_b_dec: bool = True
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if (v is not None or name == "steps") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int{' or None' if name == 'batch_size' else ''}, "
                                 f"got {v!r}")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must lie in [0, 1) (the share of source tokens in a batch), got {self.replay}")
        if not (self.lr > 0 and self.prox_coef >= 0):
            raise ValueError(f"lr must be > 0 and prox_coef >= 0, got lr={self.lr}, prox_coef={self.prox_coef}")


@dataclass
class AdaptResult:
    sae: TopKSAE
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _split(batch_size: int, replay: float) -> tuple[int, int]:
    """(target, source) tokens of a batch of `batch_size` with a `replay` share of source."""
    n_src = int(round(replay * batch_size))
    return batch_size - n_src, n_src


def fitting_batch_size(n_target: int, n_source: Optional[int], replay: float,
                       cap: int = DEFAULT_BATCH_SIZE) -> int:
    """The largest batch size <= `cap` whose target share fits in `n_target` tokens and whose
    replayed source share fits in `n_source` (no source: `replay` is 0)."""
    if n_source is None:
        replay = 0.0
    b = min(cap, int(n_target / (1.0 - replay)) + 1)
    if n_source is not None and replay > 0:
        b = min(b, int((n_source + 0.5) / replay) + 1)
    while b > 1:
        n_tgt, n_src = _split(b, replay)
        if n_tgt <= n_target and (n_source is None or n_src <= n_source):
            break
        b -= 1
    return b


def _variance_per_token(x: torch.Tensor) -> float:
    x64 = x.double()
    return max(float((x64 - x64.mean(0)).pow(2).sum(-1).mean()), 1e-12)


def adapt_decoder(sae: TopKSAE, target: torch.Tensor, source: Optional[torch.Tensor] = None,
                  config: AdaptConfig = AdaptConfig(), *, device: Union[str, torch.device, None] = None,
                  progress: bool = True) -> AdaptResult:
    """Adapt `sae`'s decoder to `target` `[N_t, d]` replaying `source` `[N_s, d]`.

    Returns a new `TopKSAE` (same dtype, encoder tensors bit-identical, harmful set and
    strengths kept) and metrics: FVU on target and source before and after, and the relative
    change of the decoder `||ΔW_dec|| / ||W_dec0||`.
    """
    return _fit(sae, target, source, config, train_encoder=False, device=device, progress=progress)


def finetune_sae(sae: TopKSAE, target: torch.Tensor, source: Optional[torch.Tensor] = None,
                 config: AdaptConfig = AdaptConfig(), *, device: Union[str, torch.device, None] = None,
                 progress: bool = True) -> AdaptResult:
    """The baseline SafeDIG is compared with: fine-tune the *whole* SAE (encoder too) on
    `target`, with the same loss, replay and proximity term (on every tensor) as
    `adapt_decoder`. The encoder changes, so the source's harmful feature ids lose their meaning:
    a caller re-scores the harmful set with the fine-tuned SAE."""
    return _fit(sae, target, source, config, train_encoder=True, device=device, progress=progress)


def _fit(sae: TopKSAE, target: torch.Tensor, source: Optional[torch.Tensor], config: AdaptConfig, *,
         train_encoder: bool, device: Union[str, torch.device, None], progress: bool) -> AdaptResult:
    from tqdm.auto import tqdm

    for name, x in (("target", target), ("source", source)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sae.d or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [N, d] tensor with d = {sae.d} (the SAE's width), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
    replay = config.replay if source is not None else 0.0
    n_source = None if source is None else source.shape[0]
    batch_size = config.batch_size
    if batch_size is None:
        batch_size = fitting_batch_size(target.shape[0], n_source, replay)
        if batch_size < DEFAULT_BATCH_SIZE:
            logger.info("adapt: batch size %d, the largest that fits the data (%d target%s tokens; the default %d "
                        "needs more)", batch_size, target.shape[0],
                        "" if n_source is None else f" and {n_source} source", DEFAULT_BATCH_SIZE)
    n_tgt, n_src = _split(batch_size, replay)
    if n_tgt < 1:
        raise ValueError(f"batch_size {batch_size} with replay {replay} leaves no target tokens per batch")
    for name, need, have in (("target", n_tgt, target.shape[0]), ("source", n_src, n_source or 0)):
        if need > have:
            raise ValueError(f"batch_size {batch_size} takes {need} {name} tokens per batch (replay {replay}), "
                             f"which exceeds the number of training tokens in {name} ({have}); pass a smaller "
                             f"batch_size, or None for the largest that fits")
    device = torch.device(device) if device is not None else sae.device
    cd = torch.float64 if sae.dtype == torch.float64 else torch.float32
    We0 = sae.W_enc.to(device, cd).clone()
    be0 = sae.b_enc.to(device, cd).clone()
    W_enc = torch.nn.Parameter(We0.clone(), requires_grad=train_encoder)
    b_enc = torch.nn.Parameter(be0.clone(), requires_grad=train_encoder)
    W0 = sae.W_dec.to(device, cd).clone()
    b0 = sae.b_dec.to(device, cd).clone()
    W_dec = torch.nn.Parameter(W0.clone())
    b_dec = torch.nn.Parameter(b0.clone(), requires_grad=config.train_b_dec)
    params = [W_dec] + ([b_dec] if config.train_b_dec else []) + ([W_enc, b_enc] if train_encoder else [])
    opt = torch.optim.Adam(params, lr=config.lr)
    w0_sq = max(float(W0.double().pow(2).sum()), 1e-12)
    we0_sq = max(float(We0.double().pow(2).sum()), 1e-12)
    var_t = _variance_per_token(target)
    var_s = _variance_per_token(source) if n_src else 1.0
    tgt_batches = BatchOrder(target.shape[0], n_tgt, config.seed)
    src_batches = BatchOrder(source.shape[0], n_src, config.seed + 1) if n_src else None
    before = {"fvu_target_before": evaluate_sae(sae, target)["fvu"]}
    if source is not None:
        before["fvu_source_before"] = evaluate_sae(sae, source)["fvu"]

    history: list[dict[str, float]] = []
    desc = "fine-tune SAE" if train_encoder else "adapt decoder"
    for step in tqdm(range(config.steps), desc=desc, unit="step", disable=not progress):
        xt = target[tgt_batches(step)].to(device, cd)
        parts = [(xt, var_t)]
        if src_batches is not None:
            parts.append((source[src_batches(step)].to(device, cd), var_s))
        recon = torch.zeros((), dtype=cd, device=device)
        for x, var in parts:
            pre = (x - b_dec) @ W_enc + b_enc
            vals, idx = pre.topk(sae.k, dim=-1, sorted=False)
            x_hat = b_dec + gather_sum(idx, torch.relu(vals), W_dec)
            recon = recon + (x - x_hat).pow(2).sum() / var
        recon = recon / batch_size
        prox = ((W_dec - W0).pow(2).sum() + (b_dec - b0).pow(2).sum()) / w0_sq
        if train_encoder:
            prox = prox + ((W_enc - We0).pow(2).sum() + (b_enc - be0).pow(2).sum()) / we0_sq
        loss = recon + config.prox_coef * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if config.log_every and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            history.append({"step": step + 1, "loss": float(loss.detach()), "recon": float(recon.detach()),
                            "prox": float(prox.detach())})

    meta = dataclasses.replace(sae.metadata)
    with torch.no_grad():
        change = float((W_dec - W0).double().norm() / W0.double().norm().clamp_min(1e-12))
        meta.extra = dict(sae.metadata.extra, adapt={"steps": config.steps, "batch_size": batch_size, "replay": replay,
                                                     "prox_coef": config.prox_coef, "train_encoder": train_encoder,
                                                     "train_b_dec": config.train_b_dec, "decoder_change": change})
        if train_encoder:
            enc = (W_enc.detach().to(sae.device, sae.dtype), b_enc.detach().to(sae.device, sae.dtype))
        else:  # the source's own encoder tensors (cloned), never recomputed: bit-identical
            enc = (sae.W_enc.clone(), sae.b_enc.clone())
        out = TopKSAE(*enc, W_dec.detach().to(sae.device, sae.dtype), b_dec.detach().to(sae.device, sae.dtype),
                      k=sae.k, metadata=meta)
    metrics: dict[str, Any] = dict(before, fvu_target_after=evaluate_sae(out, target)["fvu"], decoder_change=change,
                                   batch_size=batch_size)
    if source is not None:
        metrics["fvu_source_after"] = evaluate_sae(out, source)["fvu"]
    return AdaptResult(sae=out, metrics=metrics, history=history)
