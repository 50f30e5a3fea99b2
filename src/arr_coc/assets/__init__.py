"""Models shipped inside the package: ``arr-coc-tiny``, loadable by name with no network.

Every arr-coc entry point takes the name (`resolve_model_path`); a local folder of that name wins, as in
transformers. transformers' own entry points (``pipeline(..., model=NAME)``, the Auto classes) look a name up
on the Hub before any arr-coc code runs, so there it fails at once with the way in (`guard_hub_lookups`)
instead of retrying the Hub for a minute.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_MODELS = {"arr-coc-tiny": os.path.join(ASSETS_DIR, "arr-coc-tiny")}


def resolve_model_path(name_or_path):
    """An embedded model's folder for its name; a path starting with ``~`` expanded; anything else unchanged (a local
    dir or a Hub id). A local folder with the embedded model's name wins, as in transformers.

    Raises `FileNotFoundError` if the installation lacks the embedded model's files."""
    key = str(name_or_path)
    if key in EMBEDDED_MODELS and not os.path.isdir(key):
        path = EMBEDDED_MODELS[key]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"the embedded model {key!r} is missing from this installation ({path})")
        return path
    if key.startswith("~"):  # a home-relative path, which transformers does not expand
        return os.path.expanduser(key)
    return name_or_path


def refuse_embedded_names(request) -> None:
    """A huggingface_hub request hook: a Hub request for an embedded model's name raises `ValueError` (which
    transformers passes on as an `OSError` with this message) naming `resolve_model_path`."""
    from huggingface_hub import constants

    parts = request.url.path.strip("/").split("/")
    name = parts[2] if parts[:2] == ["api", "models"] and len(parts) > 2 else parts[0]
    if name in EMBEDDED_MODELS and request.url.host == urlparse(constants.ENDPOINT).hostname:
        raise ValueError(
            f"{name!r} is the model embedded in arr-coc, not a Hub repository, and transformers looks a name up on "
            f"the Hub before arr-coc's code runs: pass its folder, arr_coc.resolve_model_path({name!r}) (e.g. "
            f"pipeline('relevance-vqa', model=arr_coc.resolve_model_path({name!r})); pipeline('relevance-vqa') with "
            "no model uses it too)"
        )


def guard_hub_lookups() -> None:
    """Put `refuse_embedded_names` on huggingface_hub's HTTP client, through its client-factory hook
    (`huggingface_hub.set_client_factory`, chained to the factory in place; idempotent)."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
    if getattr(previous, "refuses_embedded_names", False):
        return

    def factory():
        client = previous()
        client.event_hooks["request"] = [refuse_embedded_names, *client.event_hooks["request"]]
        return client

    factory.refuses_embedded_names = True
    set_client_factory(factory)
