"""Strengths and harmful sets given as Python values, turned into the device tensors the ops take.

A Python number passed to a compiled function becomes a constant of its graph, and changing it
recompiles; pass 0-d tensors there. Eagerly, the tensor made for a number or an id list is
cached per (value, device): making a fresh one would copy host to device and sync with the
stream on every call, stalling an eager pipeline. Only the ops read the cached tensors; nothing
mutates them.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .._checks import check_harmful_mask, harmful_ids, strength, strength_tensor

Strength = Union[float, int, torch.Tensor]
Harmful = Union[torch.Tensor, Sequence[int]]

__all__ = ["Strength", "Harmful", "as_strength", "as_harmful_mask", "strength_for_call", "harmful_for_call"]


def as_strength(value: Strength, name: str, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on `device` for a Python number, checked by the one rule for
    strengths (`_checks.strength`: finite in float32, beta in [0, 1]); a tensor is passed on as
    it is, its value checked where that needs no sync (`_checks.strength_tensor`)."""
    if isinstance(value, torch.Tensor):
        strength_tensor(value, name)
        return value
    return torch.tensor(strength(value, name), dtype=torch.float32, device=device)


def as_harmful_mask(harmful: Harmful, F: int, device: torch.device, name: str = "harmful") -> torch.Tensor:
    """A bool mask `[F]` on `device` from a bool mask (a tensor on any device, a numpy array or a
    sequence of F Python bools) or from integer feature ids in [0, F). A uint8 tensor is
    refused: torch has used it for masks, so it could mean either. Errors call the argument
    `name`. (A per-call mask goes through `harmful_for_call`, which never copies it.)"""
    if hasattr(harmful, "__array__") and not isinstance(harmful, torch.Tensor):  # numpy
        harmful = torch.as_tensor(harmful)
    if isinstance(harmful, torch.Tensor):
        if harmful.dtype == torch.bool:
            harmful = harmful.to(device)
            check_harmful_mask(harmful, F, device, name)
            return harmful
        if harmful.dtype == torch.uint8:
            raise TypeError(f"{name}: a uint8 tensor could be a mask or feature ids; pass a torch.bool mask of "
                            f"shape [F] = [{F}] or int64 ids")
    elif isinstance(harmful, (list, tuple)) and harmful and all(isinstance(j, bool) for j in harmful):
        if len(harmful) != F:
            raise ValueError(f"{name}: a sequence of bools is a mask and must have F = {F} entries, "
                             f"got {len(harmful)}")
        return torch.tensor(harmful, dtype=torch.bool, device=device)
    mask = torch.zeros(F, dtype=torch.bool)
    mask[harmful_ids(harmful, F, name)] = True
    return mask.to(device)


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
        # keyed by name (beta has a range of its own) and exact value (-0.0 is not 0.0); checked on a miss
        exact = value if isinstance(value, int) else value.hex()
        return _call_constant(("strength", name, exact, device), lambda: as_strength(value, name, device))
    return as_strength(value, name, device)  # tensors pass through; bad values get its error


def harmful_for_call(harmful: Harmful, F: int, device: torch.device) -> torch.Tensor:
    """`as_harmful_mask` for an argument of one call: a bool mask passes through (the op checks
    it), the mask of an id sequence is cached (read-only)."""
    if isinstance(harmful, torch.Tensor) and harmful.dtype == torch.bool:
        return harmful
    if not isinstance(harmful, (list, tuple)) or torch.compiler.is_compiling():
        return as_harmful_mask(harmful, F, device)  # the cache is for the id lists calls repeat
    try:
        key = ("harmful", F, device, tuple((type(j), j) for j in harmful))  # [1.0] is not [1]
        hash(key)
    except TypeError:  # not a sequence of hashable ids: let as_harmful_mask say what is wrong
        return as_harmful_mask(harmful, F, device)
    return _call_constant(key, lambda: as_harmful_mask(harmful, F, device))
