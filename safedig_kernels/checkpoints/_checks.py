"""The checks every format shares, each written once: `CheckpointError`, the readers' arguments
(path, device, dtype, activation scale), values read from a config (`config_value`: types, 64-bit
integers, the float range), tensor shapes, dtypes and finiteness, and `finish`, the last
conversion every reader ends with."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .._checks import shown
from .._io import dtype_from_name
from .._library import MAX_FEATURES, MAX_K
from .weights import TENSOR_NAMES, SAEMetadata, SAEWeights

PathLike = Union[str, "os.PathLike[str]"]
Where = Union[str, Path]  # what a CheckpointError names: a file, or an argument ("sae.cfg") for objects
DTypeLike = Union[torch.dtype, str]
DeviceLike = Union[torch.device, str]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved: names the file, the key and the problem."""

    def __init__(self, path: Union[str, Path], key: Optional[str], problem: str):
        self.path = str(path)
        self.key = key
        where = f"{self.path}: key {key!r}" if key else self.path
        super().__init__(f"{where}: {problem}")


class CheckpointDtypeError(CheckpointError, TypeError):
    """A tensor with a dtype the format does not allow (also a TypeError)."""


def as_path(path: Any, name: str = "path") -> Path:
    if isinstance(path, (str, os.PathLike)):
        return Path(os.fspath(path))
    raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")


def as_dtype(dtype: Optional[DTypeLike]) -> Optional[torch.dtype]:
    return None if dtype is None else dtype_from_name(dtype, "dtype", allowed=FLOAT_DTYPES)


def as_device(device: Optional[DeviceLike]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    raise TypeError(f"device must be a torch.device or a str, got {type(device).__name__}")


def as_scale(scale: Optional[float]) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"activation_scale must be a float, got {type(scale).__name__}")
    if not (finite(scale) and scale > 0):
        raise ValueError(f"activation_scale must be a positive finite number, got {shown(scale)}")
    return float(scale)


def finite(x: Union[int, float]) -> bool:
    """math.isfinite without its OverflowError for ints beyond the float range."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


MISSING = object()


def config_value(cfg: dict[str, Any], key: str, types: tuple, path: Where, default: Any = MISSING,
                 what: str = "") -> Any:
    """cfg[key] checked against `types` (bool is never accepted as an int). An integer must fit
    64 bits, or, where a float is accepted, the float range: nothing downstream overflows."""
    if key not in cfg or cfg[key] is None and default is not MISSING:
        if default is MISSING:
            raise CheckpointError(path, key, f"missing{' (' + what + ')' if what else ''}")
        return default
    value = cfg[key]
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise CheckpointError(path, key, f"expected {names}, found {shown(value)} ({type(value).__name__})")
    if isinstance(value, int) and not is_bool:
        if float in types and not finite(value):
            raise CheckpointError(path, key, f"must be finite, found {shown(value)} (beyond the float range)")
        if float not in types and not -2 ** 63 <= value < 2 ** 63:
            raise CheckpointError(path, key, f"expected a 64-bit integer, found {shown(value)}")
    return value


def check_tensor(path: Where, key: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise CheckpointDtypeError(path, key, f"expected a floating tensor (bfloat16, float16, "
                                              f"float32 or float64), found {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(path, key, f"expected shape {tuple(shape)} ({why}), found {tuple(t.shape)}")


def check_finite(path: Where, key: str, t: torch.Tensor, context: str = "") -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(path, key, f"{n} non-finite value(s) (NaN or Inf){context}, "
                                         f"first at index {first}")


def check_dims(path: Where, d_key: str, d: int, F_key: str, F: int) -> None:
    if d < 1:
        raise CheckpointError(path, d_key, f"the width d must be >= 1, found {d}")
    if F < 1:
        raise CheckpointError(path, F_key, f"the number of features F must be >= 1, found {F}")
    if F > MAX_FEATURES:
        raise CheckpointError(path, F_key, f"F = {F} features exceeds this package's limit "
                                           f"of {MAX_FEATURES}")


def check_k(path: Where, key: str, k: Any, F: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise CheckpointError(path, key, f"k must be an integer, found {k!r} ({type(k).__name__})")
    if not 1 <= k <= F:
        raise CheckpointError(path, key, f"k must satisfy 1 <= k <= F = {F}, found k = {shown(k)}")
    if k > MAX_K:
        raise CheckpointError(path, key, f"k = {k} exceeds this package's limit of {MAX_K}")
    return k


def check_keys(path: Where, names: list[str], required: tuple[str, ...],
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


def finish(path: Where, weights: dict[str, torch.Tensor], k: int, metadata: SAEMetadata,
           device: torch.device, dtype: torch.dtype) -> SAEWeights:
    """Convert the validated `[d, F]`/`[F]`/`[F, d]`/`[d]` tensors.

    The stored tensors were checked finite already; this checks again after folding and
    conversion, so an overflow (e.g. float32 weights above 65504 read as float16) is an error
    rather than an SAE full of Inf."""
    out = {}
    for name in TENSOR_NAMES:
        t = weights[name].to(dtype=dtype)
        check_finite(path, name, t, f" after folding the format's options and converting to {dtype}")
        out[name] = t.to(device).contiguous()
    return SAEWeights(out["W_enc"], out["b_enc"], out["W_dec"], out["b_dec"], k=k, metadata=metadata)


def same_dtype(path: Where, tensors: dict[str, torch.Tensor], ref: str) -> torch.dtype:
    """The dtype every tensor shares with tensors[ref]; names the first one that differs."""
    dtype = tensors[ref].dtype
    for key, t in tensors.items():
        if t.dtype != dtype:
            raise CheckpointDtypeError(path, key, f"dtype {t.dtype} differs from {ref}'s {dtype}; "
                                                  f"all tensors of this format share one dtype")
    return dtype
