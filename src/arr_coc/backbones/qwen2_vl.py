"""Qwen2-VL: the base adapter as it stands (one token per 28 px, text resumes at max(h, w))."""

from .base import BackboneAdapter


class Qwen2VLAdapter(BackboneAdapter):
    family = "qwen2_vl"
