"""Submodules on first attribute access (PEP 562): ``import arr_coc`` then ``arr_coc.data.synthetic.generate(...)``
works without importing each subpackage first, and ``import arr_coc`` stays light (a subpackage's dependencies load
only when it is used)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable


def submodule_getattr(package: str, path: Iterable[str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` (its ``__name__``; ``path``: its ``__path__``) that imports a
    submodule or subpackage on first access. Raises AttributeError for any other name, as a module does."""
    names = {  # modules and (also namespace) subpackages: pkgutil lists no folder without an __init__.py
        entry.name.removesuffix(".py")
        for folder in path
        for entry in os.scandir(folder)
        if (entry.name.endswith(".py") or entry.is_dir()) and not entry.name.startswith(("_", "."))
    }

    def __getattr__(name: str) -> object:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
