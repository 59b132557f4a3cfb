"""Framework integrations. Importing this package imports diffusers."""
from __future__ import annotations

from .diffusers import SafeDIGConfig, SafeDIGHandle, SiteConfig, apply_safedig, remove_safedig

__all__ = ["SiteConfig", "SafeDIGConfig", "SafeDIGHandle", "apply_safedig", "remove_safedig"]
