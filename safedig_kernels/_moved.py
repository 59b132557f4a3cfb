"""Module paths of 0.1 that moved, kept importable: `import safedig_kernels.training.store`
gives `safedig_kernels.workflow.store` (with a DeprecationWarning naming the new path).

A finder on `sys.meta_path` answers for the old names only, and imports the new module when an
old name is first imported, so importing the package stays as light as before.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "safedig_kernels.training": "safedig_kernels.workflow",
    "safedig_kernels.training.store": "safedig_kernels.workflow.store",
    "safedig_kernels.training.capture": "safedig_kernels.workflow.capture",
    "safedig_kernels.training.sae_train": "safedig_kernels.workflow.train",
    "safedig_kernels.training.adapt": "safedig_kernels.workflow.adapt",
    "safedig_kernels.training.synthetic": "safedig_kernels.workflow.synthetic",
    "safedig_kernels.steering": "safedig_kernels.workflow",
    "safedig_kernels.steering.scoring": "safedig_kernels.workflow.score",
    "safedig_kernels.steering.routing": "safedig_kernels.workflow.route",
    "safedig_kernels.steering.generate": "safedig_kernels.workflow.generate",
    "safedig_kernels.demo": "safedig_kernels.workflow.demo",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name will go in a later release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy
