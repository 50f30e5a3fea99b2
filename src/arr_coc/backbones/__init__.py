"""Backbone adapters: one small module per VLM family (see `base.BackboneAdapter`).

Adding a family = one file with a `BackboneAdapter` subclass (it registers itself by its ``family``),
imported here.
"""

from __future__ import annotations

from . import qwen2_5_vl, qwen2_vl, qwen3_vl  # noqa: F401  (each registers its adapter)
from .base import ADAPTERS

SUPPORTED_FAMILIES = tuple(ADAPTERS)


def adapter_for(vlm):
    """The adapter of ``vlm``'s family (by its config's ``model_type``)."""
    family = vlm.config.model_type
    if family not in ADAPTERS:
        raise ValueError(f"backbone model_type={family!r} is not supported; expected one of {sorted(ADAPTERS)}")
    return ADAPTERS[family](vlm)
