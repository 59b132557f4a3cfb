"""SAELens checkpoints: a directory with `cfg.json` + `sae_weights.safetensors` written by SAELens
3.x to 6.x (`read_saelens`), or a SAELens SAE object in memory (`saelens_to_weights`), TopK SAEs
only. Both go through one config check (`_saelens_plan`) and one tensor check and fold
(`_saelens_weights`), so an object loads bit-exactly as its saved directory does.

Every SAELens option that changes the function is folded into the four tensors (`_foreign.fold`)
so the ops compute spec §2 unchanged:

- `apply_b_dec_to_input: false` (encoder sees `x`): `b_enc += b_dec @ W_enc`.
- `rescale_acts_by_decoder_norm: true`: `W_enc`, `b_enc` times the decoder row norms `n`,
  `W_dec / n` (top-k is taken on `pre * n`, decode divides by `n`).
- the fine-tuning scaling factor `f` (pre-6 `finetuning_scaling_factor`): `W_dec * f`.
- `normalize_activations: "expected_average_only_in"` (trained on `x * s`): `s` from the
  `activation_scale` argument or the directory's `activation_scaler.json`, folded as
  `W_enc * s`, `W_dec / s`, `b_dec / s` and recorded in `metadata.activation_scale`.


Refused with `CheckpointError`: non-TopK architectures, per-token normalisation
(`constant_norm_rescale`, `layer_norm`), `hook_z` reshaping, SAELens >= 7.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .._io import dtype_from_name
from ._checks import (
    FLOAT_DTYPES,
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
    finite,
)
from ._files import read_header, read_json, read_tensors
from ._foreign import CFG_FILENAME, as_dir, check_site_args, fold, object_cfg, object_tensors, plain, site_fields
from .weights import TENSOR_NAMES, SAEMetadata, SAEWeights

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
SAELENS_MAX_MAJOR = 6  # checked against SAELens 6.18 (Oct 2025); 7.x may change the layout

_SAELENS_NORMS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_SAELENS_SCALES = ("scaling_factor", "finetuning_scaling_factor")  # optional fine-tuning decoder scales


def _saelens_version(cfg: dict[str, Any], path: Where) -> Optional[tuple[int, int, str]]:
    """(major, minor, key it came from) of the SAELens that wrote cfg, None when unrecorded
    (SAELens itself then assumes a pre-6 layout)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for src, key in ((cfg, "sae_lens_version"), (meta, "metadata.sae_lens_version"),
                     (cfg, "sae_lens_training_version"), (meta, "metadata.sae_lens_training_version")):
        value = src.get(key.removeprefix("metadata."))
        if value is None:
            continue
        m = re.match(r"^v?(\d+)\.(\d+)", str(value))
        if not m:
            raise CheckpointError(path, key, f"unparseable SAELens version {value!r}")
        return int(m.group(1)), int(m.group(2)), key
    return None


@dataclass
class _SAELensPlan:
    """A SAELens config, checked: what its tensors are then checked against and folded with."""

    cfg: dict[str, Any]  # as given, kept in metadata.extra["source_cfg"]
    label: str           # how messages name the config ("cfg.json", "sae.cfg")
    k: int
    d_in: int
    d_sae: int
    dtype: torch.dtype
    apply_b_dec: bool
    rescale: bool
    finetune: bool
    scale: float
    hook_name: str
    model_name: str


def _saelens_scaler(root: Path) -> Optional[float]:
    """s from a SAELens directory's `activation_scaler.json`, None when there is none."""
    scaler_path = root / SAELENS_SCALER
    if not scaler_path.exists():  # not is_file(): a FIFO there is an error, not absent
        return None
    scaler = read_json(scaler_path, "SAELens activation scaler")
    s = config_value(scaler, "scaling_factor", (int, float), scaler_path,
             what="the factor the SAE's inputs were multiplied by in training")
    if not (finite(s) and s > 0):
        raise CheckpointError(scaler_path, "scaling_factor", f"must be positive and finite, found {s}")
    return float(s)


def _saelens_plan(raw_cfg: dict[str, Any], cfg_path: Where, label: str, scale_arg: Optional[float],
                  read_scaler: Optional[Callable[[], Optional[float]]] = None) -> _SAELensPlan:
    """Check a SAELens config (cfg.json, or a SAE object's cfg as a dict). One set of rules for
    files and objects, so both fold the same options the same way."""
    cfg = raw_cfg
    version = _saelens_version(cfg, cfg_path)
    if version is not None and version[0] > SAELENS_MAX_MAJOR:
        raise CheckpointError(cfg_path, version[2], f"SAELens {version[0]}.{version[1]} is newer than "
                              f"the layouts this package knows (3.x to {SAELENS_MAX_MAJOR}.x)")
    meta = config_value(cfg, "metadata", (dict,), cfg_path, default={})
    # SAELens < 6 wrote some keys under older names; 6.x moved hook and model names into metadata.
    cfg = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)

    architecture = config_value(cfg, "architecture", (str,), cfg_path, default="standard")
    act = config_value(cfg, "activation_fn", (str,), cfg_path, default=None)
    act_kwargs = config_value(cfg, "activation_fn_kwargs", (dict,), cfg_path, default={})
    is_topk = architecture == "topk" or (architecture == "standard" and act == "topk")
    if not is_topk or (act is not None and act != "topk"):
        raise CheckpointError(cfg_path, "architecture", f"only TopK SAEs can be steered; found "
                              f"architecture {architecture!r} with activation_fn {act!r} (supported: "
                              f"architecture 'topk', or 'standard' with activation_fn 'topk')")
    if "k" in act_kwargs and "k" in cfg and act_kwargs["k"] != cfg["k"]:
        raise CheckpointError(cfg_path, "k", f"disagrees with activation_fn_kwargs.k "
                                             f"({cfg['k']!r} vs {act_kwargs['k']!r})")
    if "k" in cfg:
        k_key, k = "k", cfg["k"]
    elif "k" in act_kwargs:
        k_key, k = "activation_fn_kwargs.k", act_kwargs["k"]
    else:
        raise CheckpointError(cfg_path, "k", "missing (SAELens 6 writes 'k', older versions "
                                             "'activation_fn_kwargs': {'k': ...})")

    d_in = config_value(cfg, "d_in", (int,), cfg_path)
    d_sae = config_value(cfg, "d_sae", (int,), cfg_path)
    check_dims(cfg_path, "d_in", d_in, "d_sae", d_sae)
    k = check_k(cfg_path, k_key, k, d_sae)
    cfg_dtype_name = config_value(cfg, "dtype", (str,), cfg_path, default="float32")
    try:
        cfg_dtype = dtype_from_name(cfg_dtype_name, "dtype", allowed=FLOAT_DTYPES)
    except (TypeError, ValueError) as e:
        raise CheckpointError(cfg_path, "dtype", f"unknown dtype {cfg_dtype_name!r}; {e}") from None
    apply_b_dec = config_value(cfg, "apply_b_dec_to_input", (bool,), cfg_path, default=True)
    rescale = config_value(cfg, "rescale_acts_by_decoder_norm", (bool,), cfg_path, default=False)
    finetune = config_value(cfg, "finetuning_scaling_factor", (bool,), cfg_path, default=False)

    norm = config_value(cfg, "normalize_activations", (str, bool), cfg_path, default="none")
    if isinstance(norm, bool):  # SAELens < 3.5 wrote a bool: True meant the April-update scaling
        norm = "expected_average_only_in" if norm else "none"
    if norm not in _SAELENS_NORMS:
        raise CheckpointError(cfg_path, "normalize_activations", f"unknown mode {norm!r} "
                                                                 f"(SAELens knows {list(_SAELENS_NORMS)})")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise CheckpointError(cfg_path, "normalize_activations", f"{norm!r} rescales every token by "
                              f"its own norm/statistics; that is not a constant and cannot be folded "
                              f"into the weights (supported: 'none', 'expected_average_only_in')")
    scale = 1.0
    if norm == "expected_average_only_in":
        found = scale_arg if scale_arg is not None else (read_scaler() if read_scaler else None)
        if found is None:
            where_else = f" or put {SAELENS_SCALER} in the directory" if read_scaler else ""
            raise CheckpointError(cfg_path, "normalize_activations", f"'expected_average_only_in' means the "
                                  f"SAE was trained on x * s, but s is not in the checkpoint: pass "
                                  f"activation_scale=s (SAELens' norm_scaling_factor){where_else}")
        scale = found
    elif scale_arg is not None:
        scale = scale_arg

    reshape = config_value(cfg, "reshape_activations", (str,), cfg_path, default=None)
    hook_name = cfg.get("hook_name", meta.get("hook_name"))
    if hook_name is not None and not isinstance(hook_name, str):
        raise CheckpointError(cfg_path, "hook_name", f"expected str, found {hook_name!r}")
    if reshape is None:
        reshape = "hook_z" if hook_name and "hook_z" in hook_name else "none"
    if reshape != "none":
        raise CheckpointError(cfg_path, "reshape_activations", f"{reshape!r} reshapes per-head "
                              f"activations; only flat [..., d_in] activations are supported")
    model_name = cfg.get("model_name", meta.get("model_name")) or ""
    return _SAELensPlan(cfg=raw_cfg, label=label, k=k, d_in=d_in, d_sae=d_sae, dtype=cfg_dtype,
                        apply_b_dec=apply_b_dec, rescale=rescale, finetune=finetune, scale=scale,
                        hook_name=hook_name or "", model_name=str(model_name))


def _saelens_weights(plan: _SAELensPlan, tensors: dict[str, torch.Tensor], weights_path: Where,
                     device: torch.device, dtype: Optional[torch.dtype], site: Optional[str],
                     stream: Optional[str]) -> SAEWeights:
    """SAELens tensors (names checked already) checked against `plan`, folded into spec §2."""
    tensors = dict(tensors)
    why = f"{plan.label} has d_in = {plan.d_in}, d_sae = {plan.d_sae}"
    d_in, d_sae = plan.d_in, plan.d_sae
    for name, shape in (("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("W_dec", (d_sae, d_in)),
                        ("b_dec", (d_in,)), ("scaling_factor", (d_sae,)),
                        ("finetuning_scaling_factor", (d_sae,))):
        if name in tensors:
            check_tensor(weights_path, name, tensors[name], shape, why)
            check_finite(weights_path, name, tensors[name])
    # Mirrors SAELens' reader: a `scaling_factor` of (all close to) ones is a leftover and dropped;
    # any other fine-tuning scale multiplies the codes before decoding, and cfg must declare it.
    decoder_scale_key = None
    sf = tensors.get("scaling_factor")
    if sf is not None and torch.allclose(sf.float(), torch.ones_like(sf, dtype=torch.float32)):
        del tensors["scaling_factor"]
    for key in _SAELENS_SCALES:
        if key in tensors:
            if not plan.finetune:
                raise CheckpointError(weights_path, key, f"a fine-tuning scaling factor is present but "
                                      f"{plan.label} has finetuning_scaling_factor = false")
            if decoder_scale_key is not None:
                raise CheckpointError(weights_path, key, f"given twice (also as {decoder_scale_key!r})")
            decoder_scale_key = key
    if plan.finetune and decoder_scale_key is None:
        raise CheckpointError(weights_path, "finetuning_scaling_factor", f"missing tensor; {plan.label} has "
                                                                         f"finetuning_scaling_factor = true")
    target = dtype or plan.dtype
    folded = fold(weights_path, tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                   target, apply_b_dec_to_input=plan.apply_b_dec, rescale_by_decoder_norm=plan.rescale,
                   decoder_scale=tensors.get(decoder_scale_key) if decoder_scale_key else None,
                   activation_scale=plan.scale)
    folds = [name for name, on in (("apply_b_dec_to_input=false", not plan.apply_b_dec),
                                   ("rescale_acts_by_decoder_norm", plan.rescale),
                                   (decoder_scale_key or "", decoder_scale_key is not None),
                                   (f"activation_scale={plan.scale!r}", plan.scale != 1.0)) if on]
    site_name, used = site_fields(site, stream, plan.hook_name)
    metadata = SAEMetadata(model=plan.model_name, site=site_name, activation_scale=plan.scale, source="saelens",
                           extra={"source_cfg": plan.cfg, "folded": folds, **used})
    return finish(weights_path, folded, plan.k, metadata, device, target)


def read_saelens(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                 activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                 stream: Optional[str] = None) -> SAEWeights:
    """Read a SAELens TopK SAE directory (`cfg.json` + `sae_weights.safetensors`).

    `dtype` defaults to the config's `dtype`, as SAELens does. `activation_scale` is the
    norm scaling factor s of an `expected_average_only_in` SAE (SAELens' pretrained-SAE
    directory lists it as `norm_scaling_factor`; without it, `activation_scaler.json` in the
    directory is used), or for any SAE a scale it was trained with on `x * s`. The harm score
    is in the units of SAELens' `encode` output. `site`/`stream`: the diffusers site and
    stream the SAE was trained on (`site_fields`); the site defaults to the `hook_name`.
    """
    root = as_dir(path)
    dtype_ = as_dtype(dtype)
    device_ = as_device(device)
    scale_arg = as_scale(activation_scale)
    check_site_args(site, stream)
    cfg_path = root / CFG_FILENAME
    plan = _saelens_plan(read_json(cfg_path, "SAELens config"), cfg_path, CFG_FILENAME, scale_arg,
                         lambda: _saelens_scaler(root))
    weights_path = root / SAELENS_WEIGHTS
    check_keys(weights_path, read_header(weights_path)[1], TENSOR_NAMES, _SAELENS_SCALES)
    return _saelens_weights(plan, read_tensors(weights_path), weights_path, device_, dtype_, site, stream)


def saelens_to_weights(sae: Any, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                       activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                       stream: Optional[str] = None) -> SAEWeights:
    """The `SAEWeights` of a SAELens SAE object in memory, by the rules of `read_saelens`.

    Duck-typed (sae_lens is never imported): `sae.cfg` (its `to_dict()`, as SAELens writes
    cfg.json; else a dataclass or mapping), `sae.W_enc [d_in, d_sae]`, `b_enc`, `W_dec`,
    `b_dec`, and a fine-tuning `scaling_factor` / `finetuning_scaling_factor` where present.
    `device` defaults to the device of `sae.W_enc`, `dtype` to the config's. No activation
    scaler is stored in the object: pass `activation_scale` for an `expected_average_only_in` SAE.
    The result may share memory with the object's parameters when nothing is folded.
    """
    dtype_ = as_dtype(dtype)
    scale_arg = as_scale(activation_scale)
    check_site_args(site, stream)
    if getattr(sae, "cfg", None) is None:
        raise CheckpointError("sae", "cfg", f"missing: expected a SAELens SAE (with .cfg, .W_enc, .b_enc, .W_dec, "
                                            f".b_dec), got {type(sae).__name__}")
    cfg = object_cfg(sae.cfg, "sae.cfg")
    arch = getattr(sae.cfg, "architecture", None)
    if "architecture" not in cfg and callable(arch):  # SAELens 6 has it as a method, not a field
        cfg["architecture"] = plain(arch(), "sae.cfg")
    plan = _saelens_plan(cfg, "sae.cfg", "sae.cfg", scale_arg)
    tensors = object_tensors(sae, TENSOR_NAMES + _SAELENS_SCALES, "sae")
    check_keys("sae", list(tensors), TENSOR_NAMES, _SAELENS_SCALES, holder="the SAE")
    device_ = as_device(device) if device is not None else tensors["W_enc"].device
    return _saelens_weights(plan, tensors, "sae", device_, dtype_, site, stream)

