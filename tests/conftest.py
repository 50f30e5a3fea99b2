"""Shared fixtures: a small project tokenizer, tiny random backbones of every family, processors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from PIL import Image

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.load_profile("ci")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tokenizer():
    from arr_coc.tiny.tokenizer import train_tokenizer

    return train_tokenizer(vocab_size=400, n=60)


@pytest.fixture(scope="session")
def make_backbone(tokenizer):
    """family -> a tiny random ``*ForConditionalGeneration`` from the real config classes (seeded, eval)."""
    from transformers import AutoModelForImageTextToText

    from arr_coc.backbones.shapes import tiny_config

    cache = {}

    def make(family: str = "qwen2_vl"):
        if family not in cache:
            torch.manual_seed(0)
            cache[family] = AutoModelForImageTextToText.from_config(tiny_config(family, tokenizer)).eval()
        return cache[family]

    return make


@pytest.fixture(scope="session")
def make_processor(tokenizer):
    from arr_coc import ArrCocProcessor
    from arr_coc.backbones.shapes import image_processor_for

    return lambda family="qwen2_vl": ArrCocProcessor(image_processor=image_processor_for(family), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def make_model(make_backbone):
    """family, **config overrides -> ArrCocForConditionalGeneration over a fresh copy of the tiny backbone."""
    import copy

    from arr_coc import ArrCocForConditionalGeneration

    def make(family: str = "qwen2_vl", **overrides):
        torch.manual_seed(1)
        return ArrCocForConditionalGeneration.from_backbone(copy.deepcopy(make_backbone(family)), **overrides).eval()

    return make


@pytest.fixture(scope="session")
def samples():
    """Small synthetic samples (both tasks), resized so the tests stay fast."""
    from arr_coc.data.synthetic import generate

    out = []
    for i, task in enumerate(["box-codes", "doc-fields", "box-codes", "doc-fields"]):
        s = generate(task, 10 + i)
        w, h = s["image"].size
        s["image"] = s["image"].resize((w * 3 // 5, h * 3 // 5), Image.BICUBIC)
        s["answer_box"] = tuple(v * 3 // 5 for v in s["answer_box"])
        out.append(s)
    return out
