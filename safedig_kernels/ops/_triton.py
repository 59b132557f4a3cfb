"""Triton, or a stand-in that lets kernel modules import where Triton is not installed.

The stand-in only makes `@triton.jit` definitions and `tl.constexpr` annotations importable;
nothing launches a kernel without Triton (see `_library.use_triton_for`).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs, macOS, Windows
    import types

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, (int(n) - 1).bit_length()))
    tl = types.SimpleNamespace(constexpr=int)
    HAVE_TRITON = False

__all__ = ["triton", "tl", "HAVE_TRITON"]
