"""How the package's modules are imported: names on first use, and the module paths that moved.

- `lazy_exports` gives a package a module `__getattr__` that imports each public name from its
  submodule when first used, so `import safedig_kernels.workflow` (or `.integrations`) is cheap
  and never imports diffusers by itself.
- Module paths of 0.1 that moved stay importable: `import safedig_kernels.training.store` gives
  `safedig_kernels.workflow.store`, with a DeprecationWarning naming the new path. A finder on
  `sys.meta_path` answers for the old names only and imports the new module when an old name
  is first imported.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
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

MOVED = {
    "safedig_kernels.training.store": "safedig_kernels.workflow.store",
    "safedig_kernels.training.capture": "safedig_kernels.workflow.capture",
    "safedig_kernels.training.sae_train": "safedig_kernels.workflow.train",
    "safedig_kernels.training.adapt": "safedig_kernels.workflow.adapt",
    "safedig_kernels.training.synthetic": "safedig_kernels.workflow.synthetic",
    "safedig_kernels.steering.scoring": "safedig_kernels.workflow.score",
    "safedig_kernels.steering.routing": "safedig_kernels.workflow.route",
    "safedig_kernels.steering.generate": "safedig_kernels.workflow.generate",
    "safedig_kernels.demo": "safedig_kernels.workflow.demo",
}
# The 0.1 packages themselves, and the names they exported (name -> module that has it now).
MOVED_PACKAGES = {
    "safedig_kernels.training": {
        **dict.fromkeys(("AdaptConfig", "AdaptResult", "adapt_decoder"), "safedig_kernels.workflow.adapt"),
        **dict.fromkeys(("CaptureConfig", "capture"), "safedig_kernels.workflow.capture"),
        **dict.fromkeys(("PromptRecord", "load_prompts"), "safedig_kernels.workflow.prompts"),
        "load_pipeline": "safedig_kernels.workflow.pipelines",
        **dict.fromkeys(("TrainConfig", "TrainResult", "evaluate_sae", "train_sae"), "safedig_kernels.workflow.train"),
        **dict.fromkeys(("ActivationStore", "ActivationWriter", "ManifestError", "ShardError", "SiteSpec",
                         "rebuild_manifest"), "safedig_kernels.workflow.store"),
    },
    "safedig_kernels.steering": {
        **dict.fromkeys(("HarmfulRule", "ScoringReport", "score_features", "select_harmful"),
                        "safedig_kernels.workflow.score"),
        **dict.fromkeys(("OPERATORS", "RouteConfig", "RoutingReport", "route", "write_steering_config"),
                        "safedig_kernels.workflow.route"),
    },
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED and fullname not in MOVED_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        if spec.name in MOVED_PACKAGES:
            warnings.warn(f"{spec.name} moved to safedig_kernels.workflow; the old name will go in a later release",
                          DeprecationWarning, stacklevel=2)
            return None  # a fresh package module, filled by exec_module
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name will go in a later release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        for name, new in MOVED_PACKAGES.get(module.__name__, {}).items():
            setattr(module, name, getattr(importlib.import_module(new), name))


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy
