"""Models shipped inside the package: ``arr-coc-tiny``, loadable by name with no network."""

from __future__ import annotations

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_MODELS = {"arr-coc-tiny": os.path.join(ASSETS_DIR, "arr-coc-tiny")}


def resolve_model_path(name_or_path):
    """An embedded model's folder for its name; anything else unchanged (a local dir or a Hub id)."""
    key = str(name_or_path)
    if key in EMBEDDED_MODELS and not os.path.isdir(key):
        path = EMBEDDED_MODELS[key]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"the embedded model {key!r} is missing from this installation ({path})")
        return path
    return name_or_path
