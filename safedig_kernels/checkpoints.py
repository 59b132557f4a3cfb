"""TopK-SAE checkpoint formats: this project's own, SAELens directories, sparsify directories.

This is the format layer under `TopKSAE` (`sae.py`): readers return `SAEWeights`, the four
tensors with every foreign convention folded in, k and the `SAEMetadata`, and `TopKSAE.load`
builds the module from them. It imports nothing of the SAE container.

`read_sae(path)` tells the three formats apart by the path (docs/checkpoints.md has the details):

- a file: this project's format (`read_safedig`), one `.safetensors` file holding `W_enc [d, F]`,
  `b_enc [F]`, `W_dec [F, d]`, `b_dec [d]` and, under the key `"safedig_sae"` of the header
  metadata, a JSON object with `format_version`, `k` and every `SAEMetadata` field; or a
  directory holding that file as `safedig_sae.safetensors` (`write_pretrained`, a Hub repo's layout);
- a directory with `cfg.json` + `sae_weights.safetensors`: SAELens 3.x to 6.x, TopK SAEs only
  (`read_saelens`);
- a directory with `cfg.json` + `sae.safetensors`: one hookpoint of EleutherAI sparsify (and its
  predecessor `sae`), TopK only (`read_sparsify`).

`read_pretrained` reads any of them from a local path or a Hugging Face Hub repo (huggingface_hub
is imported only then). `saelens_to_weights` / `sparsify_to_weights` take the libraries' SAE
objects in memory (duck-typed; neither library is imported) through the same checks and folds as
the file readers, which share one function per library with them.

Every foreign option that changes the function is folded into the four tensors so the ops
compute spec §2 unchanged:

- SAELens `apply_b_dec_to_input: false` (encoder sees `x`): `b_enc += b_dec @ W_enc`.
- SAELens `rescale_acts_by_decoder_norm: true`: `W_enc`, `b_enc` times the decoder row norms
  `n`, `W_dec / n` (top-k is taken on `pre * n`, decode divides by `n`).
- SAELens fine-tuning scaling factor `f` (pre-6 `finetuning_scaling_factor`): `W_dec * f`.
- SAELens `normalize_activations: "expected_average_only_in"` (trained on `x * s`): `s` from
  the `activation_scale` argument or the directory's `activation_scaler.json`, folded as
  `W_enc * s`, `W_dec / s`, `b_dec / s` and recorded in `metadata.activation_scale`.
- sparsify `encoder.weight [F, d]` is transposed to `W_enc [d, F]`; sparsify applies ReLU
  before top-k, which only changes the indices of zero-valued codes (see docs).

Rejected with `CheckpointError`: non-TopK architectures, per-token normalisation
(`constant_norm_rescale`, `layer_norm`), `hook_z` reshaping, SAELens >= 7, sparsify
`skip_connection`, `transcode`, `activation: groupmax`, `signed`. Nothing is ever unpickled.
Every check runs before anything is returned, so a failed load leaves nothing behind. Every file
is checked to be a regular file before it is opened (`_io.regular_file`: a FIFO would hang the
open), JSON nested deeper than `_io.MAX_JSON_DEPTH` is refused, and numbers beyond the 64-bit
integer or the float range are a `CheckpointError` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._checks import STRENGTH_NAMES, shown, strength
from ._io import MAX_JSON_DEPTH, atomic_write, dtype_from_name, json_too_deep, loads_json, regular_file
from ._library import MAX_FEATURES, MAX_K

__all__ = ["FORMAT_VERSION", "SAEMetadata", "SAEWeights", "CheckpointError", "CheckpointDtypeError", "HEADER_KEY",
           "read_sae", "read_safedig", "read_saelens", "read_sparsify", "write_safedig", "detect_format",
           "saelens_to_weights", "sparsify_to_weights", "read_pretrained", "write_pretrained", "PRETRAINED_WEIGHTS",
           "STREAMS", "HUB_SCHEME", "is_hub_uri", "parse_hub_uri", "hub_uri"]

PathLike = Union[str, "os.PathLike[str]"]
Where = Union[str, Path]  # what a CheckpointError names: a file, or an argument ("sae.cfg") for objects
DTypeLike = Union[torch.dtype, str]
DeviceLike = Union[torch.device, str]

HEADER_KEY = "safedig_sae"
CFG_FILENAME = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_MAX_MAJOR = 6  # checked against SAELens 6.18 (Oct 2025); 7.x may change the layout

_TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# safetensors < 0.4.2 did not export its error type at the top level.
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved: names the file, the key and the problem."""

    def __init__(self, path: Union[str, Path], key: Optional[str], problem: str):
        self.path = str(path)
        self.key = key
        where = f"{self.path}: key {key!r}" if key else self.path
        super().__init__(f"{where}: {problem}")


class CheckpointDtypeError(CheckpointError, TypeError):
    """A tensor with a dtype the format does not allow (also a TypeError)."""


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
        return {name: getattr(self, name) for name in _TENSOR_NAMES}


# -- argument helpers ------------------------------------------------------------------------
def _as_path(path: Any, name: str = "path") -> Path:
    if isinstance(path, (str, os.PathLike)):
        return Path(os.fspath(path))
    raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")


def _as_dtype(dtype: Optional[DTypeLike]) -> Optional[torch.dtype]:
    return None if dtype is None else dtype_from_name(dtype, "dtype", allowed=_FLOAT_DTYPES)


def _as_device(device: Optional[DeviceLike]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    raise TypeError(f"device must be a torch.device or a str, got {type(device).__name__}")


def _as_scale(scale: Optional[float]) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"activation_scale must be a float, got {type(scale).__name__}")
    if not (_finite(scale) and scale > 0):
        raise ValueError(f"activation_scale must be a positive finite number, got {shown(scale)}")
    return float(scale)


def _finite(x: Union[int, float]) -> bool:
    """math.isfinite without its OverflowError for ints beyond the float range."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


# -- reading ---------------------------------------------------------------------------------
def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(path, None, f"not a readable safetensors file (truncated or corrupted?): "
                                       f"{type(e).__name__}: {e}")


def _regular_file(path: Path, what: str) -> Path:
    """`_io.regular_file`, refusing a FIFO, device or directory with a CheckpointError."""
    return regular_file(path, what, error=lambda p, problem: CheckpointError(p, None, problem))


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """The header metadata and tensor names of a safetensors file, without reading the data.
    Opening validates the whole header against the file size, so truncated files and corrupted
    headers or offsets fail here."""
    _regular_file(path, "checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from e


def _parse_json(text: str, path: Path, key: Optional[str]) -> dict[str, Any]:
    try:
        obj = loads_json(text)  # also refuses JSON nested too deeply and overlong integers
    except json.JSONDecodeError as e:
        raise CheckpointError(path, key, f"malformed JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(path, key, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_json(path: Path, what: str) -> dict[str, Any]:
    _regular_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, None, f"not UTF-8 text: {e}") from e
    return _parse_json(text, path, None)


_MISSING = object()


def _get(cfg: dict[str, Any], key: str, types: tuple, path: Where, default: Any = _MISSING,
         what: str = "") -> Any:
    """cfg[key] checked against `types` (bool is never accepted as an int). An integer must fit
    64 bits, or, where a float is accepted, the float range: nothing downstream overflows."""
    if key not in cfg or cfg[key] is None and default is not _MISSING:
        if default is _MISSING:
            raise CheckpointError(path, key, f"missing{' (' + what + ')' if what else ''}")
        return default
    value = cfg[key]
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise CheckpointError(path, key, f"expected {names}, found {shown(value)} ({type(value).__name__})")
    if isinstance(value, int) and not is_bool:
        if float in types and not _finite(value):
            raise CheckpointError(path, key, f"must be finite, found {shown(value)} (beyond the float range)")
        if float not in types and not -2 ** 63 <= value < 2 ** 63:
            raise CheckpointError(path, key, f"expected a 64-bit integer, found {shown(value)}")
    return value


def _check_tensor(path: Where, key: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise CheckpointDtypeError(path, key, f"expected a floating tensor (bfloat16, float16, "
                                              f"float32 or float64), found {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(path, key, f"expected shape {tuple(shape)} ({why}), found {tuple(t.shape)}")


def _check_finite(path: Where, key: str, t: torch.Tensor, context: str = "") -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(path, key, f"{n} non-finite value(s) (NaN or Inf){context}, "
                                         f"first at index {first}")


def _check_dims(path: Where, d_key: str, d: int, F_key: str, F: int) -> None:
    if d < 1:
        raise CheckpointError(path, d_key, f"the width d must be >= 1, found {d}")
    if F < 1:
        raise CheckpointError(path, F_key, f"the number of features F must be >= 1, found {F}")
    if F > MAX_FEATURES:
        raise CheckpointError(path, F_key, f"F = {F} features exceeds this package's limit "
                                           f"of {MAX_FEATURES}")


def _check_k(path: Where, key: str, k: Any, F: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise CheckpointError(path, key, f"k must be an integer, found {k!r} ({type(k).__name__})")
    if not 1 <= k <= F:
        raise CheckpointError(path, key, f"k must satisfy 1 <= k <= F = {F}, found k = {shown(k)}")
    if k > MAX_K:
        raise CheckpointError(path, key, f"k = {k} exceeds this package's limit of {MAX_K}")
    return k


def _check_keys(path: Where, names: list[str], required: tuple[str, ...],
                optional: tuple[str, ...] = (), hints: Optional[dict[str, str]] = None,
                holder: str = "the file") -> None:
    missing = [k for k in required if k not in names]
    if missing:
        raise CheckpointError(path, missing[0], f"missing tensor; {holder} holds {sorted(names)}, "
                                                f"this format needs {list(required)}")
    extra = sorted(set(names) - set(required) - set(optional))
    if extra:
        hint = (hints or {}).get(extra[0], "")
        raise CheckpointError(path, extra[0], f"unexpected tensor{hint}; this format holds "
                                              f"{list(required) + list(optional)}")


def _finish(path: Where, weights: dict[str, torch.Tensor], k: int, metadata: SAEMetadata,
            device: torch.device, dtype: torch.dtype) -> SAEWeights:
    """Convert the validated `[d, F]`/`[F]`/`[F, d]`/`[d]` tensors.

    The stored tensors were checked finite already; this checks again after folding and
    conversion, so an overflow (e.g. float32 weights above 65504 read as float16) is an error
    rather than an SAE full of Inf."""
    out = {}
    for name in _TENSOR_NAMES:
        t = weights[name].to(dtype=dtype)
        _check_finite(path, name, t, f" after folding the format's options and converting to {dtype}")
        out[name] = t.to(device).contiguous()
    return SAEWeights(out["W_enc"], out["b_enc"], out["W_dec"], out["b_dec"], k=k, metadata=metadata)


# -- this project's format -------------------------------------------------------------------
_META_FIELDS = {"format_version": (int,), "k": (int,), "model": (str,), "site": (str,),
                "harmful_features": (list,), "beta": (int, float), "gamma": (int, float),
                "tau": (int, float), "activation_scale": (int, float), "source": (str,),
                "extra": (dict,)}


def _header_json(weights: SAEWeights) -> str:
    meta = weights.metadata
    F = weights.W_enc.shape[1]
    ids = meta.harmful_features
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < F for i in ids):
        raise ValueError(f"cannot save: metadata.harmful_features must be a list of feature ids in [0, {F}), "
                         f"got {ids!r}")
    for name in STRENGTH_NAMES:  # the rule the reader applies, so what is saved loads
        strength(getattr(meta, name), name, f"cannot save: {name}")
    if not (_finite(meta.activation_scale) and meta.activation_scale > 0):
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
    path = _as_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; this format is a single file "
                                f"(e.g. {path / 'sae.safetensors'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the parent directory {path.parent} does not exist")
    header = _header_json(weights)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.tensors().items()}
    for name, t in tensors.items():
        _check_finite(path, name, t, " (refusing to save)")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: header}))


def read_safedig(path: PathLike, device: Optional[DeviceLike] = None,
                 dtype: Optional[DTypeLike] = None) -> SAEWeights:
    """Read a file written by `write_safedig`. Weights keep their stored dtype (bitwise) unless
    `dtype` is given; they are placed on `device` (default CPU)."""
    path = _as_path(path)
    dtype_ = _as_dtype(dtype)
    device_ = _as_device(device)
    if path.is_dir():
        raise CheckpointError(path, None, "is a directory; a safedig checkpoint is one file "
                                          "(read_sae reads SAELens and sparsify directories)")
    header, names = _read_header(path)
    if HEADER_KEY not in header:
        raise CheckpointError(path, HEADER_KEY, f"missing from the safetensors header metadata "
                              f"(found {sorted(header)}): not a safedig checkpoint. SAELens and "
                              f"sparsify checkpoints are directories: pass the directory")
    doc = _parse_json(header[HEADER_KEY], path, HEADER_KEY)

    version = doc.get("format_version", _MISSING)
    if version is _MISSING:
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
        _get(doc, key, types, path)
    for key in ("beta", "gamma", "tau", "activation_scale"):
        if not _finite(doc[key]):
            raise CheckpointError(path, key, f"must be finite, found {doc[key]}")
    if doc["activation_scale"] <= 0:
        raise CheckpointError(path, "activation_scale", f"must be positive, found {doc['activation_scale']}")
    for key in STRENGTH_NAMES:  # the one rule for strengths (finite as float32, beta in [0, 1])
        try:
            strength(doc[key], key)
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, key, str(e)) from None

    _check_keys(path, names, _TENSOR_NAMES)
    tensors = _read_tensors(path)
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise CheckpointError(path, "W_enc", f"expected a 2-D [d, F] tensor, found shape {tuple(W_enc.shape)}")
    d, F = W_enc.shape
    _check_dims(path, "W_enc", d, "W_enc", F)
    why = f"for W_enc of shape [d, F] = [{d}, {F}]"
    for name, shape in (("W_enc", (d, F)), ("b_enc", (F,)), ("W_dec", (F, d)), ("b_dec", (d,))):
        _check_tensor(path, name, tensors[name], shape, why)
    _same_dtype(path, tensors, "W_enc")
    for name in _TENSOR_NAMES:
        _check_finite(path, name, tensors[name])
    k = _check_k(path, "k", doc["k"], F)
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
    return _finish(path, {n: tensors[n] for n in _TENSOR_NAMES}, k, metadata, device_,
                   dtype_ or W_enc.dtype)


# -- folding foreign conventions into spec §2 ---------------------------------------------------
def _compute_dtype(*dtypes: Optional[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _fold(path: Where, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
          target: torch.dtype, *, apply_b_dec_to_input: bool = True, rescale_by_decoder_norm: bool = False,
          decoder_scale: Optional[torch.Tensor] = None, activation_scale: float = 1.0,
          weights_key: str = "W_dec") -> dict[str, torch.Tensor]:
    """The four spec §2 tensors, computed in float32 (float64 when the stored or the `target`
    dtype is float64); returned unchanged when there is nothing to fold.

    Foreign forward (s = activation_scale, n = decoder row norms, f = decoder_scale):
        pre = ((s x - [apply] b_dec) W_enc + b_enc) * [rescale] n
        x_hat = (b_dec + sum_j z_j / [rescale] n_j * [f] f_j * W_dec[j]) / s
    Returned: W_enc' = s W_enc n, b_enc' = (b_enc + [not apply] b_dec W_enc) n,
    W_dec' = W_dec f / (n s), b_dec' = b_dec / s, so that
    (x - b_dec') W_enc' + b_enc' = pre and b_dec' + sum_j z_j W_dec'[j] = x_hat.
    """
    if (apply_b_dec_to_input and not rescale_by_decoder_norm and decoder_scale is None
            and activation_scale == 1.0):
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cd = _compute_dtype(target, *(t.dtype for t in (W_enc, b_enc, W_dec, b_dec)))
    W_enc, b_enc, W_dec, b_dec = (t.to(cd) for t in (W_enc, b_enc, W_dec, b_dec))
    if rescale_by_decoder_norm:
        norms = W_dec.norm(dim=-1)
        zero = (norms == 0).nonzero().flatten()
        if zero.numel():
            raise CheckpointError(path, weights_key, f"rescale_acts_by_decoder_norm needs nonzero decoder "
                                  f"rows, but row(s) {zero[:8].tolist()} are all zero (the library "
                                  f"itself would produce NaN for them)")
    if not apply_b_dec_to_input:
        b_enc = b_enc + b_dec @ W_enc
    if decoder_scale is not None:
        W_dec = W_dec * decoder_scale.to(cd)[:, None]
    if rescale_by_decoder_norm:
        W_enc = W_enc * norms[None, :]
        b_enc = b_enc * norms
        W_dec = W_dec / norms[:, None]
    if activation_scale != 1.0:
        W_enc, W_dec, b_dec = W_enc * activation_scale, W_dec / activation_scale, b_dec / activation_scale
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def _as_dir(path: Any) -> Path:
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such directory")
    if not p.is_dir():
        raise CheckpointError(p, None, "SAELens and sparsify checkpoints are directories "
                                       "(cfg.json plus a .safetensors file), this is a file")
    return p


def _same_dtype(path: Where, tensors: dict[str, torch.Tensor], ref: str) -> torch.dtype:
    """The dtype every tensor shares with tensors[ref]; names the first one that differs."""
    dtype = tensors[ref].dtype
    for key, t in tensors.items():
        if t.dtype != dtype:
            raise CheckpointDtypeError(path, key, f"dtype {t.dtype} differs from {ref}'s {dtype}; "
                                                  f"all tensors of this format share one dtype")
    return dtype


# -- external SAEs: where they are used, and library objects in memory ------------------------
STREAMS = ("image", "text", "both")


def _check_site_args(site: Optional[str], stream: Optional[str]) -> None:
    if site is not None and (not isinstance(site, str) or not site):
        raise TypeError(f"site must be a non-empty str naming a diffusers module (e.g. 'transformer_blocks.12'), "
                        f"got {site!r}")
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")


def _site_fields(site: Optional[str], stream: Optional[str], default_site: str) -> tuple[str, dict[str, Any]]:
    """(metadata.site, metadata.extra entries) of an external SAE. Given `site` or `stream`,
    they are recorded as this project's training records its own (`metadata.site`,
    `extra["stream"]`, the stream defaulting to "image", a block's hidden_states output), and
    the integration then refuses the SAE at another site; the site defaults to the library's
    own name for it (SAELens' hook_name, sparsify's directory name). Neither given: only that
    name, which is not checked."""
    if site is None and stream is None:
        return default_site, {}
    used: dict[str, Any] = {"stream": stream or "image"}
    if site is not None and default_site and site != default_site:
        used["source_site"] = default_site  # the library's own name, kept for provenance
    return site or default_site, used


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """`value` as JSON (a config object's fields go into metadata.extra, which is saved as
    JSON): nested configs become dicts, tuples lists, dtypes and other objects their str."""
    if depth > MAX_JSON_DEPTH - 2:  # the header and extra add two levels
        raise CheckpointError(where, None, f"nested more than {MAX_JSON_DEPTH - 2} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy and other integer scalars
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if _finite(value) else str(value)  # JSON has no NaN/Inf
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    if callable(getattr(value, "to_dict", None)) and not isinstance(value, type):
        return _plain(value.to_dict(), where, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where, depth + 1)
    if isinstance(value, SimpleNamespace):
        return _plain(vars(value), where, depth + 1)
    return str(value)


def _object_cfg(cfg: Any, where: str) -> dict[str, Any]:
    """A library's config object as the dict its save writes to cfg.json: its `to_dict()`
    (SAELens and sparsify configs have one), else a mapping's, dataclass's or object's fields."""
    if isinstance(cfg, Mapping):
        d: Any = cfg
    elif callable(getattr(cfg, "to_dict", None)):
        d = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    elif hasattr(cfg, "__dict__"):
        d = vars(cfg)
    else:
        raise CheckpointError(where, None, f"expected the library's config object (with to_dict(), a dataclass "
                                           f"or a mapping), found {type(cfg).__name__}")
    if not isinstance(d, Mapping):
        raise CheckpointError(where, None, f"to_dict() returned {type(d).__name__}, expected a dict")
    return _plain(d, where)


def _object_tensors(obj: Any, names: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """The tensors of a library object by attribute path ("encoder.weight"), detached. Absent
    or None ones are left out (the key check names what is missing); all share one device."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(where, name, f"expected a torch.Tensor, found {type(value).__name__}")
        out[name] = value.detach()
    devices = {t.device for t in out.values()}
    if len(devices) > 1:
        found = ", ".join(f"{n} on {t.device}" for n, t in out.items())
        raise CheckpointError(where, None, f"tensors on more than one device ({found}); move the object to one")
    return out


# -- SAELens ---------------------------------------------------------------------------------
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
    scaler = _read_json(scaler_path, "SAELens activation scaler")
    s = _get(scaler, "scaling_factor", (int, float), scaler_path,
             what="the factor the SAE's inputs were multiplied by in training")
    if not (_finite(s) and s > 0):
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
    meta = _get(cfg, "metadata", (dict,), cfg_path, default={})
    # SAELens < 6 wrote some keys under older names; 6.x moved hook and model names into metadata.
    cfg = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)

    architecture = _get(cfg, "architecture", (str,), cfg_path, default="standard")
    act = _get(cfg, "activation_fn", (str,), cfg_path, default=None)
    act_kwargs = _get(cfg, "activation_fn_kwargs", (dict,), cfg_path, default={})
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

    d_in = _get(cfg, "d_in", (int,), cfg_path)
    d_sae = _get(cfg, "d_sae", (int,), cfg_path)
    _check_dims(cfg_path, "d_in", d_in, "d_sae", d_sae)
    k = _check_k(cfg_path, k_key, k, d_sae)
    cfg_dtype_name = _get(cfg, "dtype", (str,), cfg_path, default="float32")
    try:
        cfg_dtype = dtype_from_name(cfg_dtype_name, "dtype", allowed=_FLOAT_DTYPES)
    except (TypeError, ValueError) as e:
        raise CheckpointError(cfg_path, "dtype", f"unknown dtype {cfg_dtype_name!r}; {e}") from None
    apply_b_dec = _get(cfg, "apply_b_dec_to_input", (bool,), cfg_path, default=True)
    rescale = _get(cfg, "rescale_acts_by_decoder_norm", (bool,), cfg_path, default=False)
    finetune = _get(cfg, "finetuning_scaling_factor", (bool,), cfg_path, default=False)

    norm = _get(cfg, "normalize_activations", (str, bool), cfg_path, default="none")
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

    reshape = _get(cfg, "reshape_activations", (str,), cfg_path, default=None)
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
            _check_tensor(weights_path, name, tensors[name], shape, why)
            _check_finite(weights_path, name, tensors[name])
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
    folded = _fold(weights_path, tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                   target, apply_b_dec_to_input=plan.apply_b_dec, rescale_by_decoder_norm=plan.rescale,
                   decoder_scale=tensors.get(decoder_scale_key) if decoder_scale_key else None,
                   activation_scale=plan.scale)
    folds = [name for name, on in (("apply_b_dec_to_input=false", not plan.apply_b_dec),
                                   ("rescale_acts_by_decoder_norm", plan.rescale),
                                   (decoder_scale_key or "", decoder_scale_key is not None),
                                   (f"activation_scale={plan.scale!r}", plan.scale != 1.0)) if on]
    site_name, used = _site_fields(site, stream, plan.hook_name)
    metadata = SAEMetadata(model=plan.model_name, site=site_name, activation_scale=plan.scale, source="saelens",
                           extra={"source_cfg": plan.cfg, "folded": folds, **used})
    return _finish(weights_path, folded, plan.k, metadata, device, target)


def read_saelens(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                 activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                 stream: Optional[str] = None) -> SAEWeights:
    """Read a SAELens TopK SAE directory (`cfg.json` + `sae_weights.safetensors`).

    `dtype` defaults to the config's `dtype`, as SAELens does. `activation_scale` is the
    norm scaling factor s of an `expected_average_only_in` SAE (SAELens' pretrained-SAE
    directory lists it as `norm_scaling_factor`; without it, `activation_scaler.json` in the
    directory is used), or for any SAE a scale it was trained with on `x * s`. The harm score
    is in the units of SAELens' `encode` output. `site`/`stream`: the diffusers site and
    stream the SAE was trained on (`_site_fields`); the site defaults to the `hook_name`.
    """
    root = _as_dir(path)
    dtype_ = _as_dtype(dtype)
    device_ = _as_device(device)
    scale_arg = _as_scale(activation_scale)
    _check_site_args(site, stream)
    cfg_path = root / CFG_FILENAME
    plan = _saelens_plan(_read_json(cfg_path, "SAELens config"), cfg_path, CFG_FILENAME, scale_arg,
                         lambda: _saelens_scaler(root))
    weights_path = root / SAELENS_WEIGHTS
    _check_keys(weights_path, _read_header(weights_path)[1], _TENSOR_NAMES, _SAELENS_SCALES)
    return _saelens_weights(plan, _read_tensors(weights_path), weights_path, device_, dtype_, site, stream)


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
    dtype_ = _as_dtype(dtype)
    scale_arg = _as_scale(activation_scale)
    _check_site_args(site, stream)
    if getattr(sae, "cfg", None) is None:
        raise CheckpointError("sae", "cfg", f"missing: expected a SAELens SAE (with .cfg, .W_enc, .b_enc, .W_dec, "
                                            f".b_dec), got {type(sae).__name__}")
    cfg = _object_cfg(sae.cfg, "sae.cfg")
    arch = getattr(sae.cfg, "architecture", None)
    if "architecture" not in cfg and callable(arch):  # SAELens 6 has it as a method, not a field
        cfg["architecture"] = _plain(arch(), "sae.cfg")
    plan = _saelens_plan(cfg, "sae.cfg", "sae.cfg", scale_arg)
    tensors = _object_tensors(sae, _TENSOR_NAMES + _SAELENS_SCALES, "sae")
    _check_keys("sae", list(tensors), _TENSOR_NAMES, _SAELENS_SCALES, holder="the SAE")
    device_ = _as_device(device) if device is not None else tensors["W_enc"].device
    return _saelens_weights(plan, tensors, "sae", device_, dtype_, site, stream)


# -- EleutherAI sparsify ---------------------------------------------------------------------
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
    d_in = _get(cfg, "d_in", (int,), cfg_path)
    activation = _get(cfg, "activation", (str,), cfg_path, default="topk")
    if activation != "topk":
        raise CheckpointError(cfg_path, "activation", f"only 'topk' SAEs can be steered, found {activation!r}")
    for key, why in (("skip_connection", "adds x @ W_skip.T to the output, which the ops do not compute"),
                     ("transcode", "predicts another module's output: not an autoencoder of x"),
                     ("signed", "selects by |pre| and keeps negative codes")):
        if _get(cfg, key, (bool,), cfg_path, default=False):
            raise CheckpointError(cfg_path, key, f"true is not supported: it {why}")
    num_latents = _get(cfg, "num_latents", (int,), cfg_path, default=0)
    expansion = _get(cfg, "expansion_factor", (int,), cfg_path, default=32)
    F = num_latents or d_in * expansion
    _check_dims(cfg_path, "d_in", d_in, "num_latents" if num_latents else "expansion_factor", F)
    k = _check_k(cfg_path, "k", _get(cfg, "k", (int,), cfg_path), F)
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
        _check_tensor(weights_path, name, tensors[name], shape, plan.why)
    stored_dtype = _same_dtype(weights_path, tensors, "encoder.weight")
    for name in _SPARSIFY_KEYS:
        _check_finite(weights_path, name, tensors[name])
    target = dtype or stored_dtype
    folded = _fold(weights_path, tensors["encoder.weight"].t().contiguous(), tensors["encoder.bias"],
                   tensors["W_dec"], tensors["b_dec"], target, activation_scale=scale)
    folds = ["encoder.weight transposed"] + ([f"activation_scale={scale!r}"] if scale != 1.0 else [])
    site_name, used = _site_fields(site, stream, default_site)
    metadata = SAEMetadata(site=site_name, activation_scale=scale, source="sparsify",
                           extra={"source_cfg": plan.cfg, "folded": folds, **used})
    return _finish(weights_path, folded, plan.k, metadata, device, target)


def read_sparsify(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                  activation_scale: Optional[float] = None, *, site: Optional[str] = None,
                  stream: Optional[str] = None) -> SAEWeights:
    """Read one hookpoint directory of an EleutherAI sparsify TopK SAE (`cfg.json` +
    `sae.safetensors`). `dtype` defaults to the file's dtype, as sparsify does.
    `activation_scale` folds a scale s for an SAE trained on `x * s` (sparsify itself does not
    scale activations). The directory name (sparsify names it after the hooked module) is
    recorded as the site unless `site` is given; `stream` as `_site_fields` says."""
    root = _as_dir(path)
    dtype_ = _as_dtype(dtype)
    device_ = _as_device(device)
    scale = _as_scale(activation_scale) or 1.0
    _check_site_args(site, stream)
    cfg_path = root / CFG_FILENAME
    plan = _sparsify_plan(_read_json(cfg_path, "sparsify config"), cfg_path, CFG_FILENAME)
    weights_path = root / SPARSIFY_WEIGHTS
    _check_keys(weights_path, _read_header(weights_path)[1], _SPARSIFY_KEYS, hints=_SPARSIFY_HINTS)
    return _sparsify_weights(plan, _read_tensors(weights_path), weights_path, device_, dtype_, scale, site,
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
    dtype_ = _as_dtype(dtype)
    scale = _as_scale(activation_scale) or 1.0
    _check_site_args(site, stream)
    if getattr(coder, "cfg", None) is None:
        raise CheckpointError("coder", "cfg", f"missing: expected a sparsify SparseCoder (with .cfg, .d_in, "
                                              f".encoder, .W_dec, .b_dec), got {type(coder).__name__}")
    cfg = _object_cfg(coder.cfg, "coder.cfg")
    if "d_in" not in cfg and hasattr(coder, "d_in"):  # save_to_disk writes cfg plus the coder's d_in
        cfg["d_in"] = _plain(coder.d_in, "coder.d_in")
    plan = _sparsify_plan(cfg, "coder.cfg", "coder.cfg")
    tensors = _object_tensors(coder, _SPARSIFY_KEYS + ("W_skip",), "coder")
    _check_keys("coder", list(tensors), _SPARSIFY_KEYS, hints=_SPARSIFY_HINTS, holder="the coder")
    device_ = _as_device(device) if device is not None else tensors["encoder.weight"].device
    return _sparsify_weights(plan, tensors, "coder", device_, dtype_, scale, site, stream, "")


# -- dispatch --------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """"safedig" for a file or a directory holding `safedig_sae.safetensors` (`write_pretrained`),
    "saelens" or "sparsify" for a directory holding their files."""
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        _regular_file(p, "checkpoint file")
        return "safedig"
    # exists(), not is_file(): a FIFO or directory in their place is the reader's error, not absent
    has_cfg = (p / CFG_FILENAME).exists()
    ours = (p / PRETRAINED_WEIGHTS).exists()
    saelens, sparsify = (p / SAELENS_WEIGHTS).exists(), (p / SPARSIFY_WEIGHTS).exists()
    if saelens and sparsify:
        raise CheckpointError(p, None, f"holds both {SAELENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} "
                                       f"(sparsify); call load_saelens or load_sparsify (safedig_kernels.sae)")
    if ours and (saelens or sparsify):
        other = SAELENS_WEIGHTS if saelens else SPARSIFY_WEIGHTS
        raise CheckpointError(p, None, f"holds both {PRETRAINED_WEIGHTS} (this project's) and {other}; load the "
                                       f"file {p / PRETRAINED_WEIGHTS} or call load_saelens / load_sparsify")
    if ours:
        return "safedig"
    if has_cfg and saelens:
        return "saelens"
    if has_cfg and sparsify:
        return "sparsify"
    if saelens or sparsify:
        raise CheckpointError(p, None, f"{CFG_FILENAME} is missing next to the weights")
    subdirs = sorted(c.name for c in p.iterdir() if c.is_dir() and ((c / CFG_FILENAME).is_file()
                                                                    or (c / PRETRAINED_WEIGHTS).is_file()))
    hint = f"; these subdirectories hold one SAE each: {subdirs[:8]}" if subdirs else ""
    raise CheckpointError(p, None, f"not a checkpoint directory: expected {PRETRAINED_WEIGHTS} (this project's), "
                                   f"or {CFG_FILENAME} with {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} "
                                   f"(sparsify){hint}")


def read_sae(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
             activation_scale: Optional[float] = None, *, site: Optional[str] = None,
             stream: Optional[str] = None) -> SAEWeights:
    """Read a TopK SAE from `path`, whose format is detected (`detect_format`).

    `device` defaults to CPU, `dtype` to the checkpoint's own. `activation_scale`, `site` and
    `stream` are for SAELens and sparsify SAEs (`read_saelens`); this project's files have the
    scale folded and the site recorded already.
    """
    fmt = detect_format(path)
    if fmt == "safedig":
        if activation_scale is not None:
            raise ValueError(f"activation_scale applies to SAELens and sparsify checkpoints; {path} is in this "
                             f"project's format, whose weights already have it folded in")
        if site is not None or stream is not None:
            raise ValueError(f"{'site' if site is not None else 'stream'} applies to SAELens and sparsify "
                             f"checkpoints; {path} is in this project's format, whose metadata records its site")
        p = _as_path(path)
        return read_safedig(p / PRETRAINED_WEIGHTS if p.is_dir() else p, device=device, dtype=dtype)
    loader = read_saelens if fmt == "saelens" else read_sparsify
    return loader(path, device=device, dtype=dtype, activation_scale=activation_scale, site=site, stream=stream)


# -- directories and the Hugging Face Hub ----------------------------------------------------
PRETRAINED_WEIGHTS = "safedig_sae.safetensors"
HUB_SCHEME = "hf://"
HUB_EXTRA = "pip install 'safedig-kernels[diffusers]'"
# What a repo (or its subfolder) may hold of an SAE: only these are downloaded.
_HUB_FILES = (PRETRAINED_WEIGHTS, CFG_FILENAME, SAELENS_WEIGHTS, SAELENS_SCALER, SPARSIFY_WEIGHTS)
_HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")  # the Hub's owner/name rules
_HUB_FORM = "hf://owner/name[/subfolder][@revision]"


def write_pretrained(directory: PathLike, weights: SAEWeights) -> Path:
    """Write `weights` as `directory/safedig_sae.safetensors` (this project's format, atomic),
    the layout `read_pretrained` reads and a Hub repo (or one subfolder of it) holds. The
    header holds k, the harmful set, strengths and metadata, so no other file is needed.
    Makes the directory; refuses one holding a SAELens or sparsify checkpoint (a mix would be
    ambiguous). Returns the file's path."""
    if not isinstance(weights, SAEWeights):
        raise TypeError(f"weights must be SAEWeights, got {type(weights).__name__}")
    d = _as_path(directory, "directory")
    if d.exists() and not d.is_dir():
        raise CheckpointError(d, None, f"exists and is not a directory; save_pretrained writes a directory "
                                       f"holding {PRETRAINED_WEIGHTS} (TopKSAE.save writes one file)")
    foreign = [n for n in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) if (d / n).exists()]
    if foreign:
        raise CheckpointError(d, None, f"already holds {foreign[0]} (a SAELens or sparsify checkpoint); writing "
                                       f"{PRETRAINED_WEIGHTS} next to it would make the directory ambiguous")
    _header_json(weights)  # refuse unsavable metadata before making the directory
    d.mkdir(parents=True, exist_ok=True)
    write_safedig(d / PRETRAINED_WEIGHTS, weights)
    return d / PRETRAINED_WEIGHTS


def is_hub_uri(name: Any) -> bool:
    """Whether `name` is a string naming an SAE on the Hub (`hf://...`)."""
    return isinstance(name, str) and name.startswith(HUB_SCHEME)


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(_HUB_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts)


def _check_subfolder(subfolder: Any, argument: str) -> Optional[str]:
    if subfolder is None:
        return None
    if not isinstance(subfolder, str):
        raise TypeError(f"{argument} must be a str (a folder inside the repo), got {type(subfolder).__name__}")
    parts = subfolder.strip("/").split("/")
    if subfolder.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{argument} must be a relative folder inside the repo without '.', '..' or empty "
                         f"parts, got {subfolder!r}")
    return "/".join(parts)


def _check_revision(revision: Any, argument: str) -> Optional[str]:
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise TypeError(f"{argument} must be a non-empty str (a branch, tag or commit), got {revision!r}")
    return revision


def parse_hub_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(repo_id, subfolder, revision) of `"hf://owner/name[/subfolder][@revision]"`. The
    revision follows the first `@` and may hold `/` (`@refs/pr/3`); repo names never hold `@`."""
    if not is_hub_uri(uri):
        raise CheckpointError(repr(uri), None, f"expected a str of the form {_HUB_FORM}")
    path, at, revision = uri[len(HUB_SCHEME):].partition("@")
    parts = path.split("/")
    if len(parts) < 2 or not _is_repo_id("/".join(parts[:2])):
        raise CheckpointError(uri, None, f"expected {_HUB_FORM}, with owner and name made of letters, digits, "
                              f"'-', '_' and '.'")
    try:
        subfolder = _check_subfolder("/".join(parts[2:]), "the subfolder") if len(parts) > 2 else None
        revision = _check_revision(revision if at else None, "the revision after '@'")
    except (TypeError, ValueError) as e:
        raise CheckpointError(uri, None, f"{e} (expected {_HUB_FORM})") from None
    return "/".join(parts[:2]), subfolder, revision


def hub_uri(repo_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None) -> str:
    """The `hf://` name of a repo, subfolder and revision (`parse_hub_uri`'s inverse)."""
    return f"{HUB_SCHEME}{repo_id}{'/' + subfolder if subfolder else ''}{'@' + revision if revision else ''}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id: str, subfolder: Optional[str], revision: Optional[str], cache_dir: Optional[PathLike],
                  local_files_only: bool, token: Any) -> tuple[Path, bool]:
    """The local snapshot folder of `repo_id` at `revision`, holding the SAE files of `subfolder`
    that the repo has (downloaded into the Hub cache, or those cached when offline), and
    whether it was found offline."""
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import utils as hub_utils
    except ImportError as e:
        raise ImportError(f"loading an SAE from the Hugging Face Hub ({hub_uri(repo_id, subfolder, revision)}) "
                          f"needs huggingface_hub, which comes with the diffusers extra: {HUB_EXTRA}") from e
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; setting it later must still keep us offline
    offline = bool(local_files_only) or bool(hub_constants.HF_HUB_OFFLINE) or _env_flag("HF_HUB_OFFLINE")
    prefix = f"{subfolder}/" if subfolder else ""
    name = hub_uri(repo_id, subfolder, revision)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            allow_patterns=[prefix + f for f in _HUB_FILES], local_files_only=offline, token=token)
    except hub_utils.LocalEntryNotFoundError as e:
        cache = os.fspath(cache_dir) if cache_dir is not None else hub_constants.HF_HUB_CACHE
        why = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else "the Hub could not be reached")
        raise FileNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'!r}) is not in the local "
                                f"Hugging Face cache {cache} and {why}; download it once online "
                                f"(TopKSAE.from_pretrained({name!r}) or `hf download {repo_id}`)") from e
    except hub_utils.RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r} (a branch, tag or "
                                f"commit)") from e
    except hub_utils.RepositoryNotFoundError as e:  # also private or gated without access
        raise FileNotFoundError(f"Hub repo {repo_id!r} does not exist, or is private or gated and the token "
                                f"given (token=, HF_TOKEN or `hf auth login`) has no access") from e
    return Path(folder), offline


def read_pretrained(repo_id_or_path: Any, *, subfolder: Optional[str] = None, revision: Optional[str] = None,
                    device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                    activation_scale: Optional[float] = None, site: Optional[str] = None,
                    stream: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False, token: Any = None) -> SAEWeights:
    """Read an SAE from a local path or a Hugging Face Hub repo.

    `repo_id_or_path`: an existing local file or directory (this project's file or
    `write_pretrained` directory, a SAELens or sparsify directory: `read_sae`); an
    `"owner/name"` Hub repo id (used when no such local path exists); or `"hf://owner/name
    [/subfolder][@revision]"`. `subfolder` is a folder inside the directory or repo (e.g. one
    sparsify hookpoint), `revision` a branch, tag or commit of the repo. Hub files are
    downloaded into the Hub cache (`cache_dir`, default `HF_HUB_CACHE`) through
    `huggingface_hub.snapshot_download`, only those an SAE is made of; with `HF_HUB_OFFLINE=1`
    or `local_files_only=True` they are read from the cache without network. `token` is
    passed to huggingface_hub (private and gated repos). The rest is `read_sae`'s.
    """
    subfolder = _check_subfolder(subfolder, "subfolder")
    revision = _check_revision(revision, "revision")
    hub = dict(device=device, dtype=dtype, activation_scale=activation_scale, site=site, stream=stream,
               cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if is_hub_uri(repo_id_or_path):
        repo_id, sub, rev = parse_hub_uri(repo_id_or_path)
        for argument, ours, theirs in (("subfolder", subfolder, sub), ("revision", revision, rev)):
            if ours is not None and theirs is not None and ours != theirs:
                raise ValueError(f"{argument}={ours!r} disagrees with the {argument} {theirs!r} in "
                                 f"{repo_id_or_path!r}; give it once")
        return _read_hub(repo_id, subfolder or sub, revision or rev, **hub)
    if isinstance(repo_id_or_path, os.PathLike) or (isinstance(repo_id_or_path, str)
                                                       and (os.path.exists(repo_id_or_path)
                                                            or not _is_repo_id(repo_id_or_path))):
        path = _as_path(repo_id_or_path, "repo_id_or_path")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {str(path)!r} is a local path")
        if not path.exists():
            raise FileNotFoundError(f"repo_id_or_path {str(path)!r}: no such file or directory, and not a Hub "
                                    f"repo id ('owner/name') or {_HUB_FORM}")
        return read_sae(path / subfolder if subfolder else path, device=device, dtype=dtype,
                        activation_scale=activation_scale, site=site, stream=stream)
    if isinstance(repo_id_or_path, str):
        try:
            return _read_hub(repo_id_or_path, subfolder, revision, **hub)
        except FileNotFoundError as e:  # the name may have been meant as a local path
            raise FileNotFoundError(f"{e} (nor is there a local path {repo_id_or_path!r})") from e
    raise TypeError(f"repo_id_or_path must be a str (a local path, 'owner/name' or {_HUB_FORM}) or "
                    f"os.PathLike, got {type(repo_id_or_path).__name__}")


def _read_hub(repo_id: str, subfolder: Optional[str], revision: Optional[str], *, device: Optional[DeviceLike],
              dtype: Optional[DTypeLike], activation_scale: Optional[float], site: Optional[str],
              stream: Optional[str], cache_dir: Optional[PathLike], local_files_only: bool,
              token: Any) -> SAEWeights:
    root, offline = _hub_snapshot(repo_id, subfolder, revision, cache_dir, local_files_only, token)
    folder = root / subfolder if subfolder else root
    name = hub_uri(repo_id, subfolder, revision)
    if not folder.is_dir():  # only SAE files are fetched: a folder without any is not there at all
        place = f"folder {subfolder!r}" if subfolder else "root folder"
        cached = " that are in the local cache (offline)" if offline else ""
        raise FileNotFoundError(f"{name}: no SAE files{cached} in the repo's {place} ({', '.join(_HUB_FILES)}); "
                                f"snapshot {root}")
    try:
        detect_format(folder)
    except CheckpointError as e:
        raise CheckpointError(name, e.key, f"holds no SAE this package reads: {e}") from e
    weights = read_sae(folder, device=device, dtype=dtype, activation_scale=activation_scale, site=site,
                       stream=stream)
    if subfolder is None and site is None and weights.metadata.source == "sparsify":
        weights.metadata.site = ""  # the snapshot folder is named after a commit, not the hooked module
    return weights
