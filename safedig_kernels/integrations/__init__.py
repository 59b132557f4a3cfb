"""Framework integrations. Today one: diffusers (`integrations.diffusers`), whose public names
are re-exported here (`from safedig_kernels.integrations import apply_safedig`). Names are
imported on first use; the hooks import diffusers."""
from __future__ import annotations

from .._imports import lazy_exports

__all__ = ["SiteConfig", "SafeDIGConfig", "SafeDIGHandle", "apply_safedig", "remove_safedig", "check_config"]
__getattr__, __dir__ = lazy_exports(__name__, {name: "diffusers" for name in __all__})
