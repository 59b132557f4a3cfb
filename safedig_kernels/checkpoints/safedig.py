"""This project's format: one `.safetensors` file holding `W_enc [d, F]`, `b_enc [F]`,
`W_dec [F, d]`, `b_dec [d]` and, under the key `"safedig_sae"` of the header metadata, a JSON
object with `format_version`, `k` and every `SAEMetadata` field (docs/checkpoints.md). A
directory holding that file as `safedig_sae.safetensors` is the same format (`hub.write_pretrained`,
a Hub repo's layout). Writing is atomic and never pickles; reading checks every field before
anything is returned.
"""
from __future__ import annotations

import json
from typing import Optional

from safetensors.torch import save_file

from .._checks import STRENGTH_NAMES, shown, strength
from .._io import MAX_JSON_DEPTH, atomic_write, json_too_deep
from ._checks import (
    MISSING,
    CheckpointError,
    DeviceLike,
    DTypeLike,
    PathLike,
    as_device,
    as_dtype,
    as_path,
    check_dims,
    check_finite,
    check_k,
    check_keys,
    check_tensor,
    config_value,
    finish,
    finite,
    same_dtype,
)
from ._files import parse_json, read_header, read_tensors
from .weights import FORMAT_VERSION, TENSOR_NAMES, SAEMetadata, SAEWeights

HEADER_KEY = "safedig_sae"

PRETRAINED_WEIGHTS = "safedig_sae.safetensors"

_META_FIELDS = {"format_version": (int,), "k": (int,), "model": (str,), "site": (str,),
                "harmful_features": (list,), "beta": (int, float), "gamma": (int, float),
                "tau": (int, float), "activation_scale": (int, float), "source": (str,),
                "extra": (dict,)}


def header_json(weights: SAEWeights) -> str:
    """The header JSON of `weights`, refusing what `read_safedig` would refuse, so what is saved loads."""
    meta = weights.metadata
    F = weights.W_enc.shape[1]
    ids = meta.harmful_features
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < F for i in ids):
        raise ValueError(f"cannot save: metadata.harmful_features must be a list of feature ids in [0, {F}), "
                         f"got {ids!r}")
    for name in STRENGTH_NAMES:  # the rule the reader applies, so what is saved loads
        strength(getattr(meta, name), name, f"cannot save: {name}")
    if not (finite(meta.activation_scale) and meta.activation_scale > 0):
        raise ValueError(f"cannot save: metadata.activation_scale must be positive and finite, "
                         f"got {shown(meta.activation_scale)}")
    scale = float(meta.activation_scale)
    for name in ("model", "site", "source"):
        if not isinstance(getattr(meta, name), str):
            found = type(getattr(meta, name)).__name__
            raise TypeError(f"cannot save: metadata.{name} must be a str, got {found}")
    if not isinstance(meta.extra, dict):
        raise TypeError(f"cannot save: metadata.extra must be a dict, got {type(meta.extra).__name__}")
    if json_too_deep(meta.extra, MAX_JSON_DEPTH - 1):  # the header is one level more
        raise ValueError(f"cannot save: metadata.extra is nested too deeply (more than {MAX_JSON_DEPTH - 1} "
                         f"levels of lists and dicts), which the reader refuses")
    doc = {"format_version": FORMAT_VERSION, "k": int(weights.k), "model": meta.model, "site": meta.site,
           "harmful_features": list(ids), "beta": float(meta.beta), "gamma": float(meta.gamma),
           "tau": float(meta.tau), "activation_scale": scale, "source": meta.source, "extra": meta.extra}
    try:
        return json.dumps(doc, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot save: metadata.extra must hold only JSON values "
                        f"(str, finite numbers, bool, None, lists, dicts with str keys): {e}") from e


def write_safedig(path: PathLike, weights: SAEWeights) -> None:
    """Write `weights` to the single file `path` in this project's format (module docstring).

    Atomic (`_io.atomic_write`): an interrupted save leaves the old file or the new one under
    `path`, never a partial one, and the new file keeps the old one's permissions. Never pickles.
    """
    if not isinstance(weights, SAEWeights):
        raise TypeError(f"weights must be SAEWeights, got {type(weights).__name__}")
    path = as_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; this format is a single file "
                                f"(e.g. {path / 'sae.safetensors'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the parent directory {path.parent} does not exist")
    header = header_json(weights)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.tensors().items()}
    for name, t in tensors.items():
        check_finite(path, name, t, " (refusing to save)")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: header}))


def read_safedig(path: PathLike, device: Optional[DeviceLike] = None,
                 dtype: Optional[DTypeLike] = None) -> SAEWeights:
    """Read a file written by `write_safedig`. Weights keep their stored dtype (bitwise) unless
    `dtype` is given; they are placed on `device` (default CPU)."""
    path = as_path(path)
    dtype_ = as_dtype(dtype)
    device_ = as_device(device)
    if path.is_dir():
        raise CheckpointError(path, None, "is a directory; a safedig checkpoint is one file "
                                          "(read_sae reads SAELens and sparsify directories)")
    header, names = read_header(path)
    if HEADER_KEY not in header:
        raise CheckpointError(path, HEADER_KEY, f"missing from the safetensors header metadata "
                              f"(found {sorted(header)}): not a safedig checkpoint. SAELens and "
                              f"sparsify checkpoints are directories: pass the directory")
    doc = parse_json(header[HEADER_KEY], path, HEADER_KEY)

    version = doc.get("format_version", MISSING)
    if version is MISSING:
        raise CheckpointError(path, "format_version", "missing from the metadata")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(path, "format_version", f"unknown format version {shown(version)} "
                                                      f"(this package reads 1..{FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, "format_version", f"format version {shown(version)} is newer than this "
                              f"package reads ({FORMAT_VERSION}); upgrade safedig_kernels")
    missing = sorted(set(_META_FIELDS) - set(doc))
    if missing:
        raise CheckpointError(path, missing[0], f"missing from the metadata (format version {version} "
                                                f"needs {sorted(_META_FIELDS)})")
    unknown = sorted(set(doc) - set(_META_FIELDS))
    if unknown:
        raise CheckpointError(path, unknown[0], f"unknown metadata key for format version {version}")
    for key, types in _META_FIELDS.items():
        config_value(doc, key, types, path)
    for key in ("beta", "gamma", "tau", "activation_scale"):
        if not finite(doc[key]):
            raise CheckpointError(path, key, f"must be finite, found {doc[key]}")
    if doc["activation_scale"] <= 0:
        raise CheckpointError(path, "activation_scale", f"must be positive, found {doc['activation_scale']}")
    for key in STRENGTH_NAMES:  # the one rule for strengths (finite as float32, beta in [0, 1])
        try:
            strength(doc[key], key)
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, key, str(e)) from None

    check_keys(path, names, TENSOR_NAMES)
    tensors = read_tensors(path)
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise CheckpointError(path, "W_enc", f"expected a 2-D [d, F] tensor, found shape {tuple(W_enc.shape)}")
    d, F = W_enc.shape
    check_dims(path, "W_enc", d, "W_enc", F)
    why = f"for W_enc of shape [d, F] = [{d}, {F}]"
    for name, shape in (("W_enc", (d, F)), ("b_enc", (F,)), ("W_dec", (F, d)), ("b_dec", (d,))):
        check_tensor(path, name, tensors[name], shape, why)
    same_dtype(path, tensors, "W_enc")
    for name in TENSOR_NAMES:
        check_finite(path, name, tensors[name])
    k = check_k(path, "k", doc["k"], F)
    harmful = doc["harmful_features"]
    for i in harmful:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < F:
            raise CheckpointError(path, "harmful_features", f"feature ids must be integers in "
                                                            f"[0, F) = [0, {F}), found {shown(i)}")
    metadata = SAEMetadata(format_version=version, model=doc["model"], site=doc["site"],
                           harmful_features=list(harmful), beta=float(doc["beta"]),
                           gamma=float(doc["gamma"]), tau=float(doc["tau"]),
                           activation_scale=float(doc["activation_scale"]), source=doc["source"],
                           extra=doc["extra"])
    return finish(path, {n: tensors[n] for n in TENSOR_NAMES}, k, metadata, device_,
                   dtype_ or W_enc.dtype)

