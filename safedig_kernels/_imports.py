"""Names imported on first use.

`lazy_exports` gives a package a module `__getattr__` that imports each public name from its
submodule when first used, so `import safedig_kernels.workflow` (or `.integrations`) is cheap
and never imports diffusers by itself.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, serving `exports` (public name -> the submodule,
    relative to `package`, that defines it)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
