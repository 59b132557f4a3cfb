"""Argument checks for the ops, the reference and the SAE container: each written once here.

Every failure is a TypeError or ValueError that names the argument and says what was expected
and what came. Two kinds, so that each property of a call is checked exactly once:

- `check_*_types` (the public boundary, before the dispatcher): is each tensor argument a
  tensor, is `k` an int. The dispatcher would reject those with a RuntimeError that names no
  argument, and the wrappers need tensors to convert Python strengths and feature ids.
- `check_topk_encode`, `check_sparse_decode`, `check_steer` (inside each op: its eager body and
  its fake kernel): shapes, dtypes, devices and sizes, the op's contract. A relation between
  sizes that may be symbolic (`F`, `d`, ...) goes through `torch._check_value` when it is not a
  plain True, so under `torch.compile(dynamic=True)` it becomes a runtime assertion, not a guard
  that would recompile; concrete sizes take a plain comparison, and the message is only built
  when a check fails (these run on every eager call: 2026-12-01, this CPU, check_steer went
  from 8.2 to about 3 µs when closures stopped being made on the passing path).

Only metadata is inspected, never values: a check must not sync with the device. Values given
as Python numbers or ids (strengths, harmful features) are checked where they become tensors
(`finite_number`, `harmful_ids`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import torch

from ._library import MAX_FEATURES, MAX_K, SUPPORTED_DTYPES

_DTYPE_NAMES = "bfloat16, float16 or float32"


def _value(cond, message: Callable[[], str]) -> None:
    """Raise ValueError(message()) unless `cond`. Call sites test `cond is not True` first, so the
    message closure is only made on the slow path (a failure, or a symbolic size)."""
    if isinstance(cond, bool):
        if not cond:
            raise ValueError(message())
    else:  # a relation between symbolic sizes (fake kernels under dynamic shapes): no guard
        torch._check_value(cond, message)


def _type(message: Callable[[], str]) -> None:
    raise TypeError(message())  # dtypes and devices are never symbolic: a failed check raises


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


# -- types (the public boundary) ----------------------------------------------------------

def check_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_int(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    return k


def check_encoder_weight(W_enc: Any) -> int:
    """`W_enc` is a `[d, F]` tensor; returns F (the wrappers need it to build a harmful mask)."""
    check_tensor(W_enc, "W_enc")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d, F], got shape {_shape(W_enc)}")
    return W_enc.shape[1]


def check_steer_types(x, W_enc, b_enc, W_dec, b_dec, k) -> int:
    """Types of `steer`'s tensor arguments and k; returns F. Strengths and the harmful set are
    checked as they are converted to tensors."""
    for t, name in ((x, "x"), (b_enc, "b_enc"), (W_dec, "W_dec"), (b_dec, "b_dec")):
        check_tensor(t, name)
    check_int(k)
    return check_encoder_weight(W_enc)


def check_topk_encode_types(x, W_enc, b_enc, b_dec, k, enc_bias=None) -> None:
    for t, name in ((x, "x"), (W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec")):
        check_tensor(t, name)
    if enc_bias is not None:
        check_tensor(enc_bias, "enc_bias")
    check_int(k)


def check_sparse_decode_types(vals, idx, W_dec, b_dec) -> None:
    for t, name in ((vals, "vals"), (idx, "idx"), (W_dec, "W_dec"), (b_dec, "b_dec")):
        check_tensor(t, name)


# -- metadata (each op's contract) --------------------------------------------------------
# Their callers have checked the Python types already: the dispatcher (an op's tensor and int
# arguments), `check_*_types`, or `check_sae_tensors`.

def check_float_dtype(t: torch.Tensor, name: str, allow_float64: bool) -> None:
    if t.dtype not in SUPPORTED_DTYPES and not (allow_float64 and t.dtype == torch.float64):
        extra = (" (float64 only in the reference)" if allow_float64
                 else " (float64 only on the CPU, where the reference computes in it)" if t.dtype == torch.float64
                 else "")
        _type(lambda: f"{name} must have dtype {_DTYPE_NAMES}{extra}, got {t.dtype}")


def float64_allowed(t: torch.Tensor) -> bool:
    """Whether the ops take float64 on `t`'s device: on the CPU, where they run the reference,
    which computes in float64 (so `torch.autograd.gradcheck` can run against finite
    differences); the CUDA kernels take bf16, fp16 and fp32 only."""
    return t.device.type == "cpu"


def check_activation(x: torch.Tensor, name: str = "x", allow_float64: bool = False) -> None:
    check_float_dtype(x, name, allow_float64)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, d] or [B, T, d], got shape {_shape(x)}")
    if (ok := x.shape[-1] >= 1) is not True:
        _value(ok, lambda: f"{name} must have a non-empty last dimension d, got shape {_shape(x)}")


def check_like(t: torch.Tensor, name: str, shape: Sequence, ref: torch.Tensor, ref_name: str) -> None:
    """`t` must have `shape` and the dtype and device of `ref`."""
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_shape(t)}")
    for got, expected in zip(t.shape, shape):
        if (ok := got == expected) is not True:
            _value(ok, lambda: f"{name} must have shape {tuple(shape)}, got {_shape(t)}")
    if t.dtype != ref.dtype:
        _type(lambda: f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_k(k: int, F) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must satisfy 1 <= k <= min(F, {MAX_K}), got k = {k}")
    if (ok := k <= F) is not True:
        _value(ok, lambda: f"k must satisfy 1 <= k <= min(F, {MAX_K}) = {min(int(F), MAX_K)}, got k = {k}")


def check_encoder(x, W_enc, b_enc, b_dec, allow_float64: bool = False) -> tuple:
    """x and the encoder tensors agree; returns (d, F)."""
    check_activation(x, "x", allow_float64)
    d = x.shape[-1]
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d, F] with d = x.shape[-1] = {d}, got shape {_shape(W_enc)}")
    F = W_enc.shape[1]
    if (ok := 1 <= F) is not True:
        _value(ok, lambda: f"W_enc must have 1 <= F <= {MAX_FEATURES} features, got F = {F}")
    if (ok := F <= MAX_FEATURES) is not True:
        _value(ok, lambda: f"W_enc must have 1 <= F <= {MAX_FEATURES} features, got F = {F}")
    check_like(W_enc, "W_enc", (d, F), x, "x")
    check_like(b_enc, "b_enc", (F,), x, "x")
    check_like(b_dec, "b_dec", (d,), x, "x")
    return d, F


def check_enc_bias(enc_bias: Optional[torch.Tensor], F, device: torch.device) -> None:
    """The cached folded encoder bias `b_enc - b_dec @ W_enc`: float32 `[F]` on x's device."""
    if enc_bias is None:
        return

    def message() -> str:
        return (f"enc_bias must be float32 [F] = [{F}] on {device}, got {enc_bias.dtype} {_shape(enc_bias)} "
                f"on {enc_bias.device}")

    if enc_bias.dim() != 1 or enc_bias.dtype != torch.float32 or enc_bias.device != device:
        raise ValueError(message())
    if (ok := enc_bias.shape[0] == F) is not True:
        _value(ok, message)


def check_topk_encode(x, W_enc, b_enc, b_dec, k, enc_bias=None, allow_float64: bool = False) -> None:
    _, F = check_encoder(x, W_enc, b_enc, b_dec, allow_float64)
    check_k(k, F)
    check_enc_bias(enc_bias, F, x.device)


def check_codes(vals, idx, allow_float64: bool = False) -> None:
    if vals.dtype != torch.float32 and not (allow_float64 and vals.dtype == torch.float64):
        want = "torch.float32 or torch.float64" if allow_float64 else "torch.float32"
        _type(lambda: f"vals must have dtype {want}, got {vals.dtype}")
    if idx.dtype not in (torch.int32, torch.int64):
        _type(lambda: f"idx must have dtype torch.int32 or torch.int64, got {idx.dtype}")
    if vals.dim() not in (2, 3):
        raise ValueError(f"vals must be [N, k] or [B, T, k], got shape {_shape(vals)}")
    if idx.dim() != vals.dim():
        raise ValueError(f"idx must have the shape of vals {_shape(vals)}, got {_shape(idx)}")
    for a, b in zip(idx.shape, vals.shape):
        if (ok := a == b) is not True:
            _value(ok, lambda: f"idx must have the shape of vals {_shape(vals)}, got {_shape(idx)}")
    if idx.device != vals.device:
        raise ValueError(f"idx must be on the device of vals ({vals.device}), got {idx.device}")
    k = vals.shape[-1]
    if (ok := 1 <= k) is not True:
        _value(ok, lambda: f"vals must have 1 <= k <= {MAX_K} columns, got shape {_shape(vals)}")
    if (ok := k <= MAX_K) is not True:
        _value(ok, lambda: f"vals must have 1 <= k <= {MAX_K} columns, got shape {_shape(vals)}")


def check_decoder(W_dec, b_dec, device: torch.device, allow_float64: bool = False) -> tuple:
    """`W_dec` `[F, d]` and `b_dec` `[d]` of one float dtype on `device`; returns (d, F)."""
    check_float_dtype(W_dec, "W_dec", allow_float64)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [F, d], got shape {_shape(W_dec)}")
    F, d = W_dec.shape
    if W_dec.device != device:
        raise ValueError(f"W_dec must be on device {device}, got {W_dec.device}")
    check_like(b_dec, "b_dec", (d,), W_dec, "W_dec")
    return d, F


def check_sparse_decode(vals, idx, W_dec, b_dec, allow_float64: bool = False) -> None:
    check_codes(vals, idx, allow_float64)
    check_decoder(W_dec, b_dec, vals.device, allow_float64)
    if vals.dtype == torch.float64 and W_dec.dtype != torch.float64:  # the decode would round them silently
        _type(lambda: f"vals in float64 need W_dec in float64 (the float64 reference), got W_dec {W_dec.dtype}")


def check_harmful_mask(mask, F, device: torch.device, name: str = "harmful") -> None:
    if mask.dtype != torch.bool:
        _type(lambda: f"{name} must be a torch.bool mask of shape [F] = [{F}], got dtype {mask.dtype}")
    if mask.dim() != 1:
        raise ValueError(f"{name} must have shape [F] = [{F}], got {_shape(mask)}")
    if (ok := mask.shape[0] == F) is not True:
        _value(ok, lambda: f"{name} must have shape [F] = [{F}], got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on device {device}, got {mask.device}")


def check_strength(t, name: str, device: torch.device, samples) -> None:
    """A 0-d floating tensor (one value for every token) or one value per sample, `[samples]`
    (`x.shape[0]`: the batch of `[B, T, d]`, the token of `[N, d]`)."""
    if not t.dtype.is_floating_point or t.dim() > 1:
        _type(lambda: f"{name} must be a 0-d floating tensor or one per sample [{samples}], got dtype {t.dtype} "
                      f"and shape {_shape(t)}")
    if t.dim() == 1 and (ok := t.shape[0] == samples) is not True:
        _value(ok, lambda: f"{name} per sample must have shape [x.shape[0]] = [{samples}], got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on device {device} (a CPU scalar would force a host sync), got {t.device}")


def check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias=None,
                allow_float64: bool = False) -> None:
    d, F = check_encoder(x, W_enc, b_enc, b_dec, allow_float64)
    check_like(W_dec, "W_dec", (F, d), x, "x")
    check_k(k, F)
    check_harmful_mask(harmful, F, x.device)
    for t, name in ((beta, "beta"), (gamma, "gamma"), (tau, "tau")):
        check_strength(t, name, x.device, x.shape[0])
    check_enc_bias(enc_bias, F, x.device)


def code_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the codes and the harm score the ops return for activations `x`: float32, or
    float64 for float64 `x` (the reference's float64 mode)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shape(t: torch.Tensor, name: str, shape: tuple, what: str) -> None:
    """`t` has `shape`; `what` says where that shape comes from."""
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {_shape(t)}")
    for a, b in zip(t.shape, shape):
        if (eq := a == b) is not True:
            _value(eq, lambda: f"{name} must have shape {tuple(shape)} ({what}), got {_shape(t)}")


def _check_grad_codes(vals, idx, x, F, allow_float64: bool) -> None:
    """The codes a backward is given: `vals` (code dtype of x) and `idx` `[..., k]` with x's leading dims."""
    check_codes(vals, idx, allow_float64)
    lead = tuple(x.shape[:-1])
    _check_shape(vals, "vals", (*lead, vals.shape[-1]), "x.shape[:-1] + (k,)")
    if vals.dtype != code_dtype(x):
        _type(lambda: f"vals must have dtype {code_dtype(x)} (the codes of x's dtype {x.dtype}), got {vals.dtype}")
    if vals.device != x.device:
        raise ValueError(f"vals must be on the device of x ({x.device}), got {vals.device}")
    check_k(vals.shape[-1], F)


def check_topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, allow_float64: bool = False) -> None:
    """`safedig::topk_encode_backward`: the forward's x, W_enc, b_dec, its outputs, and the
    gradient of vals (vals' shape and dtype)."""
    check_activation(x, "x", allow_float64)
    d = x.shape[-1]
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d, F] with d = x.shape[-1] = {d}, got shape {_shape(W_enc)}")
    F = W_enc.shape[1]
    check_like(W_enc, "W_enc", (d, F), x, "x")
    check_like(b_dec, "b_dec", (d,), x, "x")
    _check_grad_codes(vals, idx, x, F, allow_float64)
    check_like(grad_vals, "grad_vals", tuple(vals.shape), vals, "vals")


def check_sparse_decode_backward(grad_out, vals, idx, W_dec, allow_float64: bool = False) -> None:
    """`safedig::sparse_decode_backward`: the forward's codes and decoder, and the gradient of
    its output (`[..., d]` in W_dec's dtype)."""
    check_codes(vals, idx, allow_float64)
    check_float_dtype(W_dec, "W_dec", allow_float64)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [F, d], got shape {_shape(W_dec)}")
    if W_dec.device != vals.device:
        raise ValueError(f"W_dec must be on device {vals.device}, got {W_dec.device}")
    if vals.dtype == torch.float64 and W_dec.dtype != torch.float64:
        _type(lambda: f"vals in float64 need W_dec in float64 (the float64 reference), got W_dec {W_dec.dtype}")
    _check_shape(grad_out, "grad_out", (*vals.shape[:-1], W_dec.shape[1]), "vals.shape[:-1] + (d,)")
    if grad_out.dtype != W_dec.dtype:
        _type(lambda: f"grad_out must have the dtype of W_dec ({W_dec.dtype}), got {grad_out.dtype}")
    if grad_out.device != vals.device:
        raise ValueError(f"grad_out must be on device {vals.device}, got {grad_out.device}")


def check_steer_backward(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx,
                         allow_float64: bool = False) -> None:
    """`safedig::steer_backward`: the forward's arguments (b_enc aside), its outputs h, the codes
    the forward steered with, and the gradients of y (x's shape and dtype) and h (h's, or None)."""
    check_activation(x, "x", allow_float64)
    d = x.shape[-1]
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d, F] with d = x.shape[-1] = {d}, got shape {_shape(W_enc)}")
    F = W_enc.shape[1]
    check_like(W_enc, "W_enc", (d, F), x, "x")
    check_like(W_dec, "W_dec", (F, d), x, "x")
    check_like(b_dec, "b_dec", (d,), x, "x")
    check_harmful_mask(harmful, F, x.device)
    for t, name in ((beta, "beta"), (gamma, "gamma"), (tau, "tau")):
        check_strength(t, name, x.device, x.shape[0])
    _check_grad_codes(vals, idx, x, F, allow_float64)
    lead = tuple(x.shape[:-1])
    _check_shape(h, "h", lead, "x.shape[:-1]")
    if h.dtype != code_dtype(x) or h.device != x.device:
        raise TypeError(f"h must be {code_dtype(x)} on {x.device} (the forward's harm score), got {h.dtype} on "
                        f"{h.device}")
    check_like(grad_y, "grad_y", tuple(x.shape), x, "x")
    if grad_h is not None:
        check_like(grad_h, "grad_h", lead, h, "h")


def check_sae_tensors(W_enc, b_enc, W_dec, b_dec, k) -> None:
    """The five things a `TopKSAE` holds: `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`,
    `b_dec` `[d]` of one float dtype (float64 allowed) on one device, and k."""
    for t, name in ((W_enc, "W_enc"), (b_enc, "b_enc"), (W_dec, "W_dec"), (b_dec, "b_dec")):
        check_tensor(t, name)
        check_float_dtype(t, name, allow_float64=True)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d, F], got shape {_shape(W_enc)}")
    d, F = W_enc.shape
    if not 1 <= F <= MAX_FEATURES:
        raise ValueError(f"W_enc must have 1 <= F <= {MAX_FEATURES} features, got F = {F}")
    for t, name, shape in ((b_enc, "b_enc", (F,)), (W_dec, "W_dec", (F, d)), (b_dec, "b_dec", (d,))):
        check_like(t, name, shape, W_enc, "W_enc")
    check_int(k)
    check_k(k, F)


# -- Python values on their way into tensors ----------------------------------------------

# The one rule for strengths and thresholds, at every entrance (per-call arguments, setters,
# configs, checkpoint metadata): finite as the float32 buffer holds them (1e39 is finite in
# Python but inf in float32, and an inf tau steers nothing), beta in [0, 1] (spec §2's Blend
# strength), gamma and tau any finite value (tau < 0 steers every token).
BETA_RANGE = (0.0, 1.0)
STRENGTH_NAMES = ("beta", "gamma", "tau")


def shown(x: Any) -> str:
    """repr for an error message, shortened for integers too long to be worth printing (Python
    refuses to print ints beyond 4300 digits at all)."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10 ** 20:
        try:
            return f"an integer of {len(str(abs(x)))} digits"
        except ValueError:
            return f"an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"
    return repr(x)


def finite_number(value: Any, name: str) -> float:
    """A Python number (not a bool) as a float; no range check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite float, got {shown(value)}") from None


def strength(value: Any, name: str, label: Optional[str] = None) -> float:
    """`value` checked as strength `name` ("beta", "gamma" or "tau") by the one rule above;
    errors call it `label` (default `name`)."""
    label = label or name
    v = finite_number(value, label)
    as_float32 = float(torch.tensor(v, dtype=torch.float32))
    if not math.isfinite(as_float32):
        raise ValueError(f"{label} must be finite (as float32, the dtype it is held in), got {shown(value)}")
    if name == "beta" and not BETA_RANGE[0] <= v <= BETA_RANGE[1]:
        raise ValueError(f"{label} must lie in [0, 1] (Blend strength, spec §2), got {v}")
    return v


def strength_tensor(t: torch.Tensor, name: str) -> None:
    """A strength given as a tensor (0-d, or one value per sample), checked by the same rule
    where that needs no device sync: a CPU float tensor's values. A CUDA tensor's values are
    the caller's to keep in range (reading them would stall the stream); its shape, dtype and
    device are the op's to check."""
    if t.device.type != "cpu" or t.dim() > 1 or not t.dtype.is_floating_point or torch.compiler.is_compiling():
        return
    if t.dim() == 0:
        strength(t.item(), name)
        return
    held = t.detach().to(torch.float32)
    bad = ~torch.isfinite(held)
    if name == "beta":
        bad |= (held < BETA_RANGE[0]) | (held > BETA_RANGE[1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        strength(float(t[i]), name, f"{name}[{i}]")  # raises the one rule's error for the first bad value
        raise ValueError(f"{name}[{i}] must be finite (as float32, the dtype it is held in), got {float(t[i])!r}")


def harmful_ids(ids: Any, F: Optional[int] = None, name: str = "harmful") -> list[int]:
    """Feature ids as a list of ints, each in [0, F) (or >= 0 while F is not known yet): a
    sequence of ints or a 1-D integer tensor or array. A bool mask is not ids: see
    `check_harmful_mask`."""
    if hasattr(ids, "__array__") and not isinstance(ids, torch.Tensor):  # numpy arrays
        ids = torch.as_tensor(ids)
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype in (torch.bool, torch.uint8):
            raise TypeError(f"{name} ids must be an integer tensor (not bool or uint8, which read as masks), "
                            f"got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{name} ids must be a 1-D sequence of feature ids, got shape {_shape(ids)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a bool mask [F] or a sequence of feature ids, got {type(ids).__name__}")
    out = []
    for j in ids:
        if isinstance(j, (list, tuple)):
            raise ValueError(f"{name} ids must be a 1-D sequence of feature ids, got a nested sequence")
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise TypeError(f"{name} ids must be ints, got {j!r} ({type(j).__name__})")
        out.append(int(j))
    bad = [j for j in out if j < 0 or (F is not None and j >= F)]
    if bad:
        where = "" if F is None else f" in [0, F) = [0, {F})"
        raise ValueError(f"{name} ids must be non-negative int feature ids{where}, got {bad[:8]}")
    return out


def strength_or_none(value: Any, name: str, label: Optional[str] = None) -> Optional[float]:
    """`None` (a config's "use the SAE's default"), or a strength checked by the one rule."""
    return None if value is None else strength(value, name, label)
