"""The `safedig` custom ops: importing this package registers `torch.ops.safedig.*`.

Each op runs the PyTorch reference on CPU tensors and the Triton kernels on CUDA tensors
(`_library.use_triton_for`). The functions here are the raw-tensor entry points; they accept
Python numbers for the strengths and feature ids for the harmful set and turn them into the
device tensors the ops take.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._checks import check_activation, check_harmful_mask, check_k, check_strength
from .sparse_decode import sparse_decode
from .steer import _steer_op
from .topk_encode import encoder_bias, topk_encode

Strength = Union[float, int, torch.Tensor]
Harmful = Union[torch.Tensor, Sequence[int]]

__all__ = ["topk_encode", "sparse_decode", "steer", "encoder_bias", "as_strength", "as_harmful_mask"]


def as_strength(value: Strength, name: str, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on `device`. Pass tensors under torch.compile: a Python number
    becomes a constant of the compiled graph, and changing it would recompile."""
    if isinstance(value, torch.Tensor):
        return check_strength(value, name, device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def as_harmful_mask(harmful: Harmful, F: int, device: torch.device) -> torch.Tensor:
    """A bool mask `[F]` on `device` from a mask or from feature ids in [0, F)."""
    if isinstance(harmful, torch.Tensor) and harmful.dtype == torch.bool:
        return check_harmful_mask(harmful, F, device)
    ids = torch.as_tensor(harmful if not isinstance(harmful, torch.Tensor) else harmful.cpu(), dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"harmful ids must be a 1-D sequence of feature ids, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= F):
        raise ValueError(f"harmful ids must lie in [0, F) = [0, {F}), got min {int(ids.min())} max {int(ids.max())}")
    mask = torch.zeros(F, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)


# Device copies of the Python numbers and id lists that per-call arguments arrive as, made once
# per (value, device): making a fresh one would copy host to device and sync with the stream on
# every call, stalling an eager pipeline. Only the ops read them; nothing mutates them.
_CALL_CONSTANTS: dict = {}
_CALL_CONSTANTS_MAX = 64


def _call_constant(key, make) -> torch.Tensor:
    t = _CALL_CONSTANTS.get(key)
    if t is None:
        if len(_CALL_CONSTANTS) >= _CALL_CONSTANTS_MAX:
            _CALL_CONSTANTS.clear()
        t = _CALL_CONSTANTS[key] = make()
    return t


def strength_for_call(value: Strength, name: str, device: torch.device) -> torch.Tensor:
    """`as_strength` for an argument of one call: a Python number's tensor is cached (read-only)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not torch.compiler.is_compiling():
        return _call_constant(("strength", float(value).hex(), device), lambda: as_strength(value, name, device))
    return as_strength(value, name, device)  # tensors pass through; bad values get its error


def harmful_for_call(harmful: Harmful, F: int, device: torch.device) -> torch.Tensor:
    """`as_harmful_mask` for an argument of one call: the mask of an id sequence is cached (read-only)."""
    if isinstance(harmful, torch.Tensor) or torch.compiler.is_compiling():
        return as_harmful_mask(harmful, F, device)
    try:
        key = ("harmful", F, device, tuple(harmful))
        hash(key)
    except TypeError:  # not a sequence of hashable ids: let as_harmful_mask say what is wrong
        return as_harmful_mask(harmful, F, device)
    return _call_constant(key, lambda: as_harmful_mask(harmful, F, device))


def steer(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
          harmful: Harmful, beta: Strength, gamma: Strength, tau: Strength, k: int,
          *, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend/Repel steering of `x` `[N, d]` or `[B, T, d]` (any strides), SPEC §2.

    SAE tensors `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`, `b_dec` `[d]` in x's dtype and
    device; `harmful` a bool mask `[F]` or feature ids; `beta`, `gamma`, `tau` floats or 0-d
    tensors on x's device. Returns `y` (x's shape and dtype) and the harm score `h` (fp32,
    x's shape without d); non-finite tokens come back unchanged with h = NaN.
    """
    check_activation(x)
    if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 2:
        raise ValueError(f"W_enc must be a [d, F] tensor, got {getattr(W_enc, 'shape', type(W_enc).__name__)}")
    check_k(k, W_enc.shape[1])
    device = x.device
    mask = harmful_for_call(harmful, W_enc.shape[1], device)
    return _steer_op(x, W_enc, b_enc, W_dec, b_dec, mask, strength_for_call(beta, "beta", device),
                     strength_for_call(gamma, "gamma", device), strength_for_call(tau, "tau", device), k, enc_bias)
