"""EleutherAI sparsify checkpoints (and its predecessor `sae`): one hookpoint directory with
`cfg.json` + `sae.safetensors` (`read_sparsify`), or a `SparseCoder` in memory
(`sparsify_to_weights`), TopK only; one config check and one tensor check for both.

sparsify's `encoder.weight [F, d]` is transposed to `W_enc [d, F]`; sparsify applies ReLU before
top-k, which only changes the indices of zero-valued codes (docs/checkpoints.md). Refused with
`CheckpointError`: `skip_connection`, `transcode`, `activation: groupmax`, `signed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._checks import (
    CheckpointError,
    DeviceLike,
    DTypeLike,
    PathLike,
    Where,
    as_device,
    as_dtype,
    as_scale,
    check_dims,
    check_finite,
    check_k,
    check_keys,
    check_tensor,
    config_value,
    finish,
    same_dtype,
)
from ._files import read_header, read_json, read_tensors
from ._foreign import CFG_FILENAME, as_dir, check_site_args, fold, object_cfg, object_tensors, plain, site_fields
from .weights import SAEMetadata, SAEWeights

SPARSIFY_WEIGHTS = "sae.safetensors"

_SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
_SPARSIFY_HINTS = {"W_skip": " (a skip connection, which the config does not declare)"}


@dataclass
class _SparsifyPlan:
    """A sparsify config, checked."""

    cfg: dict[str, Any]
    d_in: int
    F: int
    k: int
    why: str  # the shapes' reason, for messages


def _sparsify_plan(cfg: dict[str, Any], cfg_path: Where, label: str) -> _SparsifyPlan:
    """Check a sparsify config (cfg.json, or a coder's cfg plus its d_in): one set of rules for
    files and objects."""
    d_in = config_value(cfg, "d_in", (int,), cfg_path)
    activation = config_value(cfg, "activation", (str,), cfg_path, default="topk")
    if activation != "topk":
        raise CheckpointError(cfg_path, "activation", f"only 'topk' SAEs can be steered, found {activation!r}")
    for key, why in (("skip_connection", "adds x @ W_skip.T to the output, which the ops do not compute"),
                     ("transcode", "predicts another module's output: not an autoencoder of x"),
                     ("signed", "selects by |pre| and keeps negative codes")):
        if config_value(cfg, key, (bool,), cfg_path, default=False):
            raise CheckpointError(cfg_path, key, f"true is not supported: it {why}")
    num_latents = config_value(cfg, "num_latents", (int,), cfg_path, default=0)
    expansion = config_value(cfg, "expansion_factor", (int,), cfg_path, default=32)
    F = num_latents or d_in * expansion
    check_dims(cfg_path, "d_in", d_in, "num_latents" if num_latents else "expansion_factor", F)
    k = check_k(cfg_path, "k", config_value(cfg, "k", (int,), cfg_path), F)
    how = (f"num_latents = {num_latents}" if num_latents
           else f"num_latents = d_in * expansion_factor = {d_in} * {expansion}")
    return _SparsifyPlan(cfg=cfg, d_in=d_in, F=F, k=k, why=f"{label} has d_in = {d_in}, {how}")


def _sparsify_weights(plan: _SparsifyPlan, tensors: dict[str, torch.Tensor], weights_path: Where,
                      device: torch.device, dtype: Optional[torch.dtype], scale: float, site: Optional[str],
                      stream: Optional[str], default_site: str) -> SAEWeights:
    """sparsify tensors (names checked already) checked against `plan`, in spec §2's layout."""
    F, d_in = plan.F, plan.d_in
    for name, shape in (("encoder.weight", (F, d_in)), ("encoder.bias", (F,)), ("W_dec", (F, d_in)),
                        ("b_dec", (d_in,))):
        check_tensor(weights_path, name, tensors[name], shape, plan.why)
    stored_dtype = same_dtype(weights_path, tensors, "encoder.weight")
    for name in _SPARSIFY_KEYS:
        check_finite(weights_path, name, tensors[name])
    target = dtype or stored_dtype
    folded = fold(weights_path, tensors["encoder.weight"].t().contiguous(), tensors["encoder.bias"],
                   tensors["W_dec"], tensors["b_dec"], target, activation_scale=scale)
    folds = ["encoder.weight transposed"] + ([f"activation_scale={scale!r}"] if scale != 1.0 else [])
    site_name, used = site_fields(site, stream, default_site)
    metadata = SAEMetadata(site=site_name, activation_scale=scale, source="sparsify",
                           extra={"source_cfg": plan.cfg, "folded": folds, **used})
    return finish(weights_path, folded, plan.k, metadata, device, target)


def read_sparsify(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                  activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                  stream: Optional[str] = None) -> SAEWeights:
    """Read one hookpoint directory of an EleutherAI sparsify TopK SAE (`cfg.json` +
    `sae.safetensors`). `dtype` defaults to the file's dtype, as sparsify does.
    `activation_scale` folds a scale s for an SAE trained on `x * s` (sparsify itself does not
    scale activations). The directory name (sparsify names it after the hooked module) is
    recorded as the site unless `site` is given; `stream` as `site_fields` says."""
    root = as_dir(path)
    dtype_ = as_dtype(dtype)
    device_ = as_device(device)
    scale = as_scale(activation_scale) or 1.0
    check_site_args(site, stream)
    cfg_path = root / CFG_FILENAME
    plan = _sparsify_plan(read_json(cfg_path, "sparsify config"), cfg_path, CFG_FILENAME)
    weights_path = root / SPARSIFY_WEIGHTS
    check_keys(weights_path, read_header(weights_path)[1], _SPARSIFY_KEYS, hints=_SPARSIFY_HINTS)
    return _sparsify_weights(plan, read_tensors(weights_path), weights_path, device_, dtype_, scale, site,
                             stream, root.resolve().name)


def sparsify_to_weights(coder: Any, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                        activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                        stream: Optional[str] = None) -> SAEWeights:
    """The `SAEWeights` of a sparsify `SparseCoder` in memory, by the rules of `read_sparsify`.

    Duck-typed (sparsify is never imported): `coder.cfg` (its `to_dict()`, else a dataclass
    or mapping) plus `coder.d_in`, as sparsify's `save_to_disk` writes them to cfg.json;
    `coder.encoder.weight [F, d_in]`, `coder.encoder.bias`, `coder.W_dec [F, d_in]`,
    `coder.b_dec`. A coder does not know its hookpoint: give `site` (else none is recorded).
    `device` defaults to the device of the encoder weight, `dtype` to the tensors' own."""
    dtype_ = as_dtype(dtype)
    scale = as_scale(activation_scale) or 1.0
    check_site_args(site, stream)
    if getattr(coder, "cfg", None) is None:
        raise CheckpointError("coder", "cfg", f"missing: expected a sparsify SparseCoder (with .cfg, .d_in, "
                                              f".encoder, .W_dec, .b_dec), got {type(coder).__name__}")
    cfg = object_cfg(coder.cfg, "coder.cfg")
    if "d_in" not in cfg and hasattr(coder, "d_in"):  # save_to_disk writes cfg plus the coder's d_in
        cfg["d_in"] = plain(coder.d_in, "coder.d_in")
    plan = _sparsify_plan(cfg, "coder.cfg", "coder.cfg")
    tensors = object_tensors(coder, _SPARSIFY_KEYS + ("W_skip",), "coder")
    check_keys("coder", list(tensors), _SPARSIFY_KEYS, hints=_SPARSIFY_HINTS, holder="the coder")
    device_ = as_device(device) if device is not None else tensors["encoder.weight"].device
    return _sparsify_weights(plan, tensors, "coder", device_, dtype_, scale, site, stream, "")

