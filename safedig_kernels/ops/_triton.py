"""Triton, or a stand-in that lets kernel modules import where Triton is not installed.

The stand-in only makes `@triton.jit` definitions and `tl.constexpr` annotations importable;
nothing launches a kernel without Triton (see `_library.use_triton_for`).

`launchable(kernel)` is what a launcher indexes with its grid: inside a `torch.library.triton_op`
traced by torch.compile, torch.export or make_fx, the kernel wrapped by
`torch.library.wrap_triton`, so the graph holds the Triton kernel itself (inductor sees it,
AOTInductor packages it); in an eager call, the kernel, launched directly.

`cdiv` and `next_pow2` are plain integer helpers for the launchers' host code: Triton 3.9's
`triton.cdiv` / `triton.next_power_of_2` are constexpr functions whose calls cost microseconds
each, on the path of every op call.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._library import triton_interpreting

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    HAVE_TRITON = True
except ImportError:  # CPU-only installs, macOS, Windows
    import types

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=int)
    HAVE_TRITON = False


def traced() -> bool:
    """Whether a compiler, a tracer or fake tensors run this code, not plain eager PyTorch.
    (is_compiling first: dynamo cannot trace the dispatch-mode query.)"""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def launchable(kernel):
    """`kernel`, or its traceable wrapper while the launcher is `traced`."""
    if HAVE_TRITON and traced() and not triton_interpreting():
        return wrap_triton(kernel)
    return kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["triton", "tl", "HAVE_TRITON", "traced", "launchable", "cdiv", "next_pow2"]
