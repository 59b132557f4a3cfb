"""Triton, or a stand-in that lets kernel modules import where Triton is not installed.

The stand-in only makes `@triton.jit` definitions and `tl.constexpr` annotations importable;
nothing launches a kernel without Triton (see `_library.use_triton_for`).

`cdiv` and `next_pow2` are plain integer helpers for the launchers' host code: Triton 3.9's
`triton.cdiv` / `triton.next_power_of_2` are constexpr functions whose calls cost microseconds
each, on the path of every op call.
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

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=int)
    HAVE_TRITON = False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["triton", "tl", "HAVE_TRITON", "cdiv", "next_pow2"]
