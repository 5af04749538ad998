"""Old module names kept working for one release (0.1.x): `import tfemde.runs` gives `tfemde.training.runs` itself.

Each old name imports the module at its new home, warns once with a `DeprecationWarning` naming it, and binds the
same module object under the old name, so attributes, `monkeypatch` and `isinstance` checks all see one module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "tfemde.runs": "tfemde.training.runs",
    "tfemde.callbacks": "tfemde.training.callbacks",
    "tfemde.plots": "tfemde.training.plots",
    "tfemde.run_folder": "tfemde.models.run_folder",
    "tfemde.quantize": "tfemde.export.quantize",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names in `MOVED` and loads each as the module at its new home."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old name goes away after tfemde 0.1",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed at its new home


def install():
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
