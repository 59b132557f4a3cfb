"""Framework integrations. Today one: diffusers (`integrations.diffusers`), whose public names
are re-exported here (`from safedig_kernels.integrations import apply_safedig`). Names are
imported on first use; the hooks import diffusers."""
from __future__ import annotations

from typing import Any

__all__ = ["SiteConfig", "SafeDIGConfig", "SafeDIGHandle", "apply_safedig", "remove_safedig", "check_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
