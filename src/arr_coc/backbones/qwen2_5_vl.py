"""Qwen2.5-VL: its encoder reorders tokens by window internally and returns them in raster order."""

from .base import BackboneAdapter


class Qwen2_5_VLAdapter(BackboneAdapter):
    family = "qwen2_5_vl"
