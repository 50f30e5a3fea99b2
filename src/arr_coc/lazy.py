"""Submodules on first attribute access (PEP 562): ``import arr_coc`` then ``arr_coc.data.synthetic.generate(...)``
works without importing each subpackage first, and a subpackage's dependencies still load only when it is used."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable


def submodule_getattr(package: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` (its ``__name__``) that imports a submodule or subpackage on first
    access. Raises AttributeError for a name that is no submodule, as a module does (and the submodule's own
    ImportError, e.g. a missing optional dependency, when it fails to import)."""

    def __getattr__(name: str) -> object:
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
