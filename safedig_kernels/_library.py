"""What this machine can run, and every environment variable the package reads.

| variable | effect |
|---|---|
| `SAFEDIG_DISABLE_TRITON=1` | CUDA tensors run the PyTorch reference instead of the Triton kernels |
| `SAFEDIG_TUNE=1` | the first call per shape times each exact selection variant, keeps the fastest (`ops._tuning`) |
| `TRITON_INTERPRET=1` | (read by Triton) kernels run on the CPU; tests use it to call launchers on CPU tensors |

Importing this module never fails: not without CUDA, not without Triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

NAMESPACE = "safedig"

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_FEATURES = 131072  # 2**17: index packing in the reference's int64 sort key
MAX_K = 256


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


def use_triton_for(t: torch.Tensor) -> bool:
    """Whether the kernels (not the reference) handle tensors on `t`'s device."""
    return t.is_cuda and has_triton() and not env_flag("SAFEDIG_DISABLE_TRITON")


@functools.lru_cache(maxsize=None)
def mm_has_out_dtype() -> bool:
    """torch.mm(a, b, out_dtype=float32) on bf16/fp16 CUDA inputs (torch >= 2.8)."""
    return "dtype" in torch.ops.aten.mm.overloads()
