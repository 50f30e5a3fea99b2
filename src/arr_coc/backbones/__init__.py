"""Backbone adapters: one small module per VLM family (see `base.BackboneAdapter`).

Adding a family = one file with a `BackboneAdapter` subclass, plus its line here.
"""

from __future__ import annotations

import importlib

# model_type -> "module:Class" (imported on first use)
SUPPORTED_FAMILIES = {
    "qwen2_vl": "qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "qwen2_5_vl:Qwen2_5_VLAdapter",
    "qwen3_vl": "qwen3_vl:Qwen3VLAdapter",
}


def adapter_for(vlm):
    """The adapter of ``vlm``'s family (by its config's ``model_type``)."""
    family = vlm.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"backbone model_type={family!r} is not supported; expected one of {sorted(SUPPORTED_FAMILIES)}"
        )
    module, name = SUPPORTED_FAMILIES[family].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(vlm)
