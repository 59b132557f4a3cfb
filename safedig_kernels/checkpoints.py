"""TopK-SAE checkpoint formats: this project's own, SAELens directories, sparsify directories.

This is the format layer under `TopKSAE` (`sae.py`): readers return `SAEWeights`, the four
tensors with every foreign convention folded in, k and the `SAEMetadata`, and `TopKSAE.load`
builds the module from them. It imports nothing of the SAE container.

`read_sae(path)` tells the three formats apart by the path (docs/checkpoints.md has the details):

- a file: this project's format (`read_safedig`), one `.safetensors` file holding `W_enc [d, F]`,
  `b_enc [F]`, `W_dec [F, d]`, `b_dec [d]` and, under the key `"safedig_sae"` of the header
  metadata, a JSON object with `format_version`, `k` and every `SAEMetadata` field;
- a directory with `cfg.json` + `sae_weights.safetensors`: SAELens 3.x to 6.x, TopK SAEs only
  (`read_saelens`);
- a directory with `cfg.json` + `sae.safetensors`: one hookpoint of EleutherAI sparsify (and its
  predecessor `sae`), TopK only (`read_sparsify`).

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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._checks import STRENGTH_NAMES, strength
from ._io import MAX_JSON_DEPTH, atomic_write, dtype_from_name, json_too_deep, loads_json, regular_file
from ._library import MAX_FEATURES, MAX_K

__all__ = ["FORMAT_VERSION", "SAEMetadata", "SAEWeights", "CheckpointError", "CheckpointDtypeError", "HEADER_KEY",
           "read_sae", "read_safedig", "read_saelens", "read_sparsify", "write_safedig", "detect_format"]

PathLike = Union[str, "os.PathLike[str]"]
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
        raise ValueError(f"activation_scale must be a positive finite number, got {_show(scale)}")
    return float(scale)


def _finite(x: Union[int, float]) -> bool:
    """math.isfinite without its OverflowError for ints beyond the float range."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _show(x: Any) -> str:
    """repr, shortened for integers too long to be worth printing."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10 ** 20:
        return f"an integer of {len(str(abs(x)))} digits"
    return repr(x)


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


def _get(cfg: dict[str, Any], key: str, types: tuple, path: Path, default: Any = _MISSING,
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
        raise CheckpointError(path, key, f"expected {names}, found {_show(value)} ({type(value).__name__})")
    if isinstance(value, int) and not is_bool:
        if float in types and not _finite(value):
            raise CheckpointError(path, key, f"must be finite, found {_show(value)} (beyond the float range)")
        if float not in types and not -2 ** 63 <= value < 2 ** 63:
            raise CheckpointError(path, key, f"expected a 64-bit integer, found {_show(value)}")
    return value


def _check_tensor(path: Path, key: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise CheckpointDtypeError(path, key, f"expected a floating tensor (bfloat16, float16, "
                                              f"float32 or float64), found {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(path, key, f"expected shape {tuple(shape)} ({why}), found {tuple(t.shape)}")


def _check_finite(path: Path, key: str, t: torch.Tensor, context: str = "") -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(path, key, f"{n} non-finite value(s) (NaN or Inf){context}, "
                                         f"first at index {first}")


def _check_dims(path: Path, d_key: str, d: int, F_key: str, F: int) -> None:
    if d < 1:
        raise CheckpointError(path, d_key, f"the width d must be >= 1, found {d}")
    if F < 1:
        raise CheckpointError(path, F_key, f"the number of features F must be >= 1, found {F}")
    if F > MAX_FEATURES:
        raise CheckpointError(path, F_key, f"F = {F} features exceeds this package's limit "
                                           f"of {MAX_FEATURES}")


def _check_k(path: Path, key: str, k: Any, F: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise CheckpointError(path, key, f"k must be an integer, found {k!r} ({type(k).__name__})")
    if not 1 <= k <= F:
        raise CheckpointError(path, key, f"k must satisfy 1 <= k <= F = {F}, found k = {_show(k)}")
    if k > MAX_K:
        raise CheckpointError(path, key, f"k = {k} exceeds this package's limit of {MAX_K}")
    return k


def _check_keys(path: Path, names: list[str], required: tuple[str, ...],
                optional: tuple[str, ...] = (), hints: Optional[dict[str, str]] = None) -> None:
    missing = [k for k in required if k not in names]
    if missing:
        raise CheckpointError(path, missing[0], f"missing tensor; the file holds {sorted(names)}, "
                                                f"this format needs {list(required)}")
    extra = sorted(set(names) - set(required) - set(optional))
    if extra:
        hint = (hints or {}).get(extra[0], "")
        raise CheckpointError(path, extra[0], f"unexpected tensor{hint}; this format holds "
                                              f"{list(required) + list(optional)}")


def _finish(path: Path, weights: dict[str, torch.Tensor], k: int, metadata: SAEMetadata,
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
    for name in ("beta", "gamma", "tau"):
        if not _finite(getattr(meta, name)):
            raise ValueError(f"cannot save: {name} = {_show(getattr(meta, name))} is not finite")
    if not (_finite(meta.activation_scale) and meta.activation_scale > 0):
        raise ValueError(f"cannot save: metadata.activation_scale must be positive and finite, "
                         f"got {_show(meta.activation_scale)}")
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
        raise CheckpointError(path, "format_version", f"unknown format version {_show(version)} "
                                                      f"(this package reads 1..{FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, "format_version", f"format version {_show(version)} is newer than this "
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
                                                            f"[0, F) = [0, {F}), found {_show(i)}")
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


def _fold(path: Path, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
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


def _same_dtype(path: Path, tensors: dict[str, torch.Tensor], ref: str) -> torch.dtype:
    """The dtype every tensor shares with tensors[ref]; names the first one that differs."""
    dtype = tensors[ref].dtype
    for key, t in tensors.items():
        if t.dtype != dtype:
            raise CheckpointDtypeError(path, key, f"dtype {t.dtype} differs from {ref}'s {dtype}; "
                                                  f"all tensors of this format share one dtype")
    return dtype


# -- SAELens ---------------------------------------------------------------------------------
_SAELENS_NORMS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def _saelens_version(cfg: dict[str, Any], path: Path) -> Optional[tuple[int, int, str]]:
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


def read_saelens(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                 activation_scale: Optional[float] = None) -> SAEWeights:
    """Read a SAELens TopK SAE directory (`cfg.json` + `sae_weights.safetensors`).

    `dtype` defaults to the config's `dtype`, as SAELens does. `activation_scale` is the
    norm scaling factor s of an `expected_average_only_in` SAE (SAELens' pretrained-SAE
    directory lists it as `norm_scaling_factor`; without it, `activation_scaler.json` in the
    directory is used), or for any SAE a scale it was trained with on `x * s`. The harm score
    is in the units of SAELens' `encode` output.
    """
    root = _as_dir(path)
    dtype_ = _as_dtype(dtype)
    device_ = _as_device(device)
    scale_arg = _as_scale(activation_scale)
    cfg_path = root / CFG_FILENAME
    cfg = _read_json(cfg_path, "SAELens config")
    version = _saelens_version(cfg, cfg_path)
    if version is not None and version[0] > SAELENS_MAX_MAJOR:
        raise CheckpointError(cfg_path, version[2], f"SAELens {version[0]}.{version[1]} is newer than "
                              f"the layouts this package knows (3.x to {SAELENS_MAX_MAJOR}.x)")
    meta = _get(cfg, "metadata", (dict,), cfg_path, default={})
    # SAELens < 6 wrote some keys under older names; 6.x moved hook and model names into metadata.
    raw_cfg, cfg = cfg, dict(cfg)
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
        if scale_arg is not None:
            scale = scale_arg
        elif (root / SAELENS_SCALER).exists():  # not is_file(): a FIFO there is an error, not absent
            scaler_path = root / SAELENS_SCALER
            scaler = _read_json(scaler_path, "SAELens activation scaler")
            s = _get(scaler, "scaling_factor", (int, float), scaler_path,
                     what="the factor the SAE's inputs were multiplied by in training")
            if not (_finite(s) and s > 0):
                raise CheckpointError(scaler_path, "scaling_factor", f"must be positive and finite, found {s}")
            scale = float(s)
        else:
            raise CheckpointError(cfg_path, "normalize_activations", f"'expected_average_only_in' means the "
                                  f"SAE was trained on x * s, but s is not in the checkpoint: pass "
                                  f"activation_scale=s (SAELens' norm_scaling_factor) or put "
                                  f"{SAELENS_SCALER} in the directory")
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

    weights_path = root / SAELENS_WEIGHTS
    _check_keys(weights_path, _read_header(weights_path)[1], _TENSOR_NAMES,
                ("scaling_factor", "finetuning_scaling_factor"))
    tensors = _read_tensors(weights_path)
    why = f"cfg.json has d_in = {d_in}, d_sae = {d_sae}"
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
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in tensors:
            if not finetune:
                raise CheckpointError(weights_path, key, "a fine-tuning scaling factor is present but "
                                      "cfg.json has finetuning_scaling_factor = false")
            if decoder_scale_key is not None:
                raise CheckpointError(weights_path, key, f"given twice (also as {decoder_scale_key!r})")
            decoder_scale_key = key
    if finetune and decoder_scale_key is None:
        raise CheckpointError(weights_path, "finetuning_scaling_factor", "missing tensor; cfg.json has "
                                                                         "finetuning_scaling_factor = true")
    target = dtype_ or cfg_dtype
    folded = _fold(weights_path, tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                   target, apply_b_dec_to_input=apply_b_dec, rescale_by_decoder_norm=rescale,
                   decoder_scale=tensors.get(decoder_scale_key) if decoder_scale_key else None,
                   activation_scale=scale)
    folds = [name for name, on in (("apply_b_dec_to_input=false", not apply_b_dec),
                                   ("rescale_acts_by_decoder_norm", rescale),
                                   (decoder_scale_key or "", decoder_scale_key is not None),
                                   (f"activation_scale={scale!r}", scale != 1.0)) if on]
    metadata = SAEMetadata(model=str(model_name), site=hook_name or "", activation_scale=scale,
                           source="saelens", extra={"source_cfg": raw_cfg, "folded": folds})
    return _finish(weights_path, folded, k, metadata, device_, target)


# -- EleutherAI sparsify ---------------------------------------------------------------------
_SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def read_sparsify(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                  activation_scale: Optional[float] = None) -> SAEWeights:
    """Read one hookpoint directory of an EleutherAI sparsify TopK SAE (`cfg.json` +
    `sae.safetensors`). `dtype` defaults to the file's dtype, as sparsify does.
    `activation_scale` folds a scale s for an SAE trained on `x * s` (sparsify itself does not
    scale activations). The directory name is recorded as the site."""
    root = _as_dir(path)
    dtype_ = _as_dtype(dtype)
    device_ = _as_device(device)
    scale = _as_scale(activation_scale) or 1.0
    cfg_path = root / CFG_FILENAME
    cfg = _read_json(cfg_path, "sparsify config")
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

    weights_path = root / SPARSIFY_WEIGHTS
    _check_keys(weights_path, _read_header(weights_path)[1], _SPARSIFY_KEYS,
                hints={"W_skip": " (a skip connection, which cfg.json does not declare)"})
    tensors = _read_tensors(weights_path)
    how = (f"num_latents = {num_latents}" if num_latents
           else f"num_latents = d_in * expansion_factor = {d_in} * {expansion}")
    why = f"cfg.json has d_in = {d_in}, {how}"
    for name, shape in (("encoder.weight", (F, d_in)), ("encoder.bias", (F,)), ("W_dec", (F, d_in)),
                        ("b_dec", (d_in,))):
        _check_tensor(weights_path, name, tensors[name], shape, why)
    file_dtype = _same_dtype(weights_path, tensors, "encoder.weight")
    for name in _SPARSIFY_KEYS:
        _check_finite(weights_path, name, tensors[name])
    target = dtype_ or file_dtype
    folded = _fold(weights_path, tensors["encoder.weight"].t().contiguous(), tensors["encoder.bias"],
                   tensors["W_dec"], tensors["b_dec"], target, activation_scale=scale)
    folds = ["encoder.weight transposed"] + ([f"activation_scale={scale!r}"] if scale != 1.0 else [])
    metadata = SAEMetadata(site=root.resolve().name, activation_scale=scale, source="sparsify",
                           extra={"source_cfg": cfg, "folded": folds})
    return _finish(weights_path, folded, k, metadata, device_, target)


# -- dispatch --------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """"safedig" for a file, "saelens" or "sparsify" for a directory holding their files."""
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        _regular_file(p, "checkpoint file")
        return "safedig"
    # exists(), not is_file(): a FIFO or directory in their place is the reader's error, not absent
    has_cfg = (p / CFG_FILENAME).exists()
    saelens, sparsify = (p / SAELENS_WEIGHTS).exists(), (p / SPARSIFY_WEIGHTS).exists()
    if saelens and sparsify:
        raise CheckpointError(p, None, f"holds both {SAELENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} "
                                       f"(sparsify); call load_saelens or load_sparsify (safedig_kernels.sae)")
    if has_cfg and saelens:
        return "saelens"
    if has_cfg and sparsify:
        return "sparsify"
    if saelens or sparsify:
        raise CheckpointError(p, None, f"{CFG_FILENAME} is missing next to the weights")
    subdirs = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / CFG_FILENAME).is_file())
    hint = f"; these subdirectories hold one SAE each: {subdirs[:8]}" if subdirs else ""
    raise CheckpointError(p, None, f"not a checkpoint directory: expected {CFG_FILENAME} with "
                                   f"{SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify){hint}")


def read_sae(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
             activation_scale: Optional[float] = None) -> SAEWeights:
    """Read a TopK SAE from `path`, whose format is detected (`detect_format`).

    `device` defaults to CPU, `dtype` to the checkpoint's own. `activation_scale` is for
    SAELens and sparsify SAEs trained on `x * s`; this project's files have it folded already.
    """
    fmt = detect_format(path)
    if fmt == "safedig":
        if activation_scale is not None:
            raise ValueError(f"activation_scale applies to SAELens and sparsify checkpoints; {path} is "
                             f"a safedig file, whose weights already have it folded in")
        return read_safedig(path, device=device, dtype=dtype)
    loader = read_saelens if fmt == "saelens" else read_sparsify
    return loader(path, device=device, dtype=dtype, activation_scale=activation_scale)
