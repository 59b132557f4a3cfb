"""Argument checks shared by the ops, their fake kernels and the reference.

Every failure names the argument and says what was expected and what came. Only metadata is
inspected (shape, dtype, device), never values: a check must not sync with the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._library import MAX_FEATURES, MAX_K, SUPPORTED_DTYPES

_DTYPE_NAMES = "bfloat16, float16 or float32"


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(t: torch.Tensor, name: str, allow_float64: bool) -> None:
    ok = SUPPORTED_DTYPES + ((torch.float64,) if allow_float64 else ())
    if t.dtype not in ok:
        extra = " (float64 only in the reference)" if allow_float64 else ""
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}{extra}, got {t.dtype}")


def check_activation(x, name: str = "x", allow_float64: bool = False) -> torch.Tensor:
    x = _tensor(x, name)
    check_float_dtype(x, name, allow_float64)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, d] or [B, T, d], got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last dimension d, got shape {tuple(x.shape)}")
    return x


def check_like(t, name: str, shape: tuple, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """`t` must have `shape` and the dtype and device of `ref`."""
    t = _tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    return t


def check_encoder(x, W_enc, b_enc, b_dec, allow_float64: bool = False) -> tuple[int, int]:
    """Returns (d, F)."""
    x = check_activation(x, "x", allow_float64)
    d = x.shape[-1]
    W_enc = _tensor(W_enc, "W_enc")
    if W_enc.dim() != 2 or W_enc.shape[0] != d:
        raise ValueError(f"W_enc must be [d, F] with d = x.shape[-1] = {d}, got shape {tuple(W_enc.shape)}")
    F = W_enc.shape[1]
    if not 1 <= F <= MAX_FEATURES:
        raise ValueError(f"W_enc must have 1 <= F <= {MAX_FEATURES} features, got F = {F}")
    check_like(W_enc, "W_enc", (d, F), x, "x")
    check_like(b_enc, "b_enc", (F,), x, "x")
    check_like(b_dec, "b_dec", (d,), x, "x")
    return d, F


def check_k(k, F: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(F, MAX_K):
        raise ValueError(f"k must satisfy 1 <= k <= min(F, {MAX_K}) = {min(F, MAX_K)}, got k = {k}")
    return k


def check_codes(vals, idx, allow_float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    vals = _tensor(vals, "vals")
    idx = _tensor(idx, "idx")
    want = (torch.float32, torch.float64) if allow_float64 else (torch.float32,)
    if vals.dtype not in want:
        raise TypeError(f"vals must have dtype {' or '.join(map(str, want))}, got {vals.dtype}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must have dtype torch.int32 or torch.int64, got {idx.dtype}")
    if vals.dim() not in (2, 3):
        raise ValueError(f"vals must be [N, k] or [B, T, k], got shape {tuple(vals.shape)}")
    if tuple(idx.shape) != tuple(vals.shape):
        raise ValueError(f"idx must have the shape of vals {tuple(vals.shape)}, got {tuple(idx.shape)}")
    if idx.device != vals.device:
        raise ValueError(f"idx must be on the device of vals ({vals.device}), got {idx.device}")
    if not 1 <= vals.shape[-1] <= MAX_K:
        raise ValueError(f"vals must have 1 <= k <= {MAX_K} columns, got shape {tuple(vals.shape)}")
    return vals, idx


def check_decoder(W_dec, b_dec, d: Optional[int], F: Optional[int], device: torch.device,
                  allow_float64: bool = False) -> tuple[int, int]:
    W_dec = _tensor(W_dec, "W_dec")
    check_float_dtype(W_dec, "W_dec", allow_float64)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [F, d], got shape {tuple(W_dec.shape)}")
    Fw, dw = W_dec.shape
    if d is not None and dw != d:
        raise ValueError(f"W_dec must be [F, d] with d = {d}, got shape {tuple(W_dec.shape)}")
    if F is not None and Fw != F:
        raise ValueError(f"W_dec must be [F, d] with F = {F} (the encoder's width), got shape {tuple(W_dec.shape)}")
    if W_dec.device != device:
        raise ValueError(f"W_dec must be on device {device}, got {W_dec.device}")
    check_like(b_dec, "b_dec", (dw,), W_dec, "W_dec")
    return dw, Fw


def check_harmful_mask(mask, F: int, device: torch.device) -> torch.Tensor:
    mask = _tensor(mask, "harmful")
    if mask.dtype != torch.bool:
        raise TypeError(f"harmful must be a torch.bool mask of shape [F] = [{F}], got dtype {mask.dtype}")
    if tuple(mask.shape) != (F,):
        raise ValueError(f"harmful must have shape [F] = [{F}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"harmful must be on device {device}, got {mask.device}")
    return mask


def check_strength(t, name: str, device: torch.device) -> torch.Tensor:
    t = _tensor(t, name)
    if t.dim() != 0 or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a 0-d floating tensor, got dtype {t.dtype} and shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on device {device} (a CPU scalar would force a host sync), got {t.device}")
    return t


def check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k,
                allow_float64: bool = False) -> tuple[int, int]:
    d, F = check_encoder(x, W_enc, b_enc, b_dec, allow_float64)
    check_like(W_dec, "W_dec", (F, d), x, "x")
    check_k(k, F)
    check_harmful_mask(harmful, F, x.device)
    for t, name in ((beta, "beta"), (gamma, "gamma"), (tau, "tau")):
        check_strength(t, name, x.device)
    return d, F
