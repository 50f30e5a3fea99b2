"""The saccade gist's scale per image (`gist_scale="auto"`): the image's text measured, the coarsest scale that keeps
it legible chosen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from arr_coc import ArrCocForConditionalGeneration, ArrCocProcessor
from arr_coc.backbones.base import ImageInput
from arr_coc.data.contract import generate as contract_generate
from arr_coc.data.synthetic import generate
from arr_coc.relevance.saccade import AUTO_GIST_SCALES, NO_TEXT_GIST_SCALE, choose_gist_scale, text_height

TEXT_PX = 8.0
FACTORS = (0.75, 1.0, 1.5, 2.0, 3.0)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255


def _resized(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)


def _project_pages():
    """(image, its characters' median ink height in px) for pages of both tasks of the project's generator."""
    for task in ("box-codes", "doc-fields"):
        for seed in range(3):
            s = generate(task, seed, layout=True)
            yield s["image"], float(np.median([g[4] - g[2] for g in s["glyphs"]]))


@pytest.mark.parametrize("factor", (0.75, 1.0, 2.0))
def test_text_height_follows_the_characters_ink_height(factor):
    for image, glyph_h in _project_pages():
        measured = text_height(_pixels(_resized(image, factor)))
        assert 0.75 * glyph_h * factor <= measured <= 1.35 * glyph_h * factor, (measured, glyph_h * factor)


def test_text_height_is_none_without_text_and_the_rule_falls_back():
    blank = torch.full((3, 200, 300), 0.9)
    assert text_height(blank) is None
    assert choose_gist_scale("auto", TEXT_PX, None) == NO_TEXT_GIST_SCALE
    assert choose_gist_scale(3, TEXT_PX, 40.0) == 3  # a fixed scale is kept, whatever the text


def test_rule_is_the_coarsest_legible_scale_within_its_range():
    low, high = AUTO_GIST_SCALES
    for height in np.linspace(1, 120, 239):
        g = choose_gist_scale("auto", TEXT_PX, float(height))
        assert low <= g <= high
        assert g == low or height / g >= TEXT_PX  # legible on the gist
        assert g == high or height / (g + 1) < TEXT_PX  # and no coarser scale would be


def test_auto_scale_keeps_the_answer_legible_at_every_page_size_through_the_processor():
    """The model's path: the processor resizes each page (its pixel range), the image's patches are measured. On pages
    of both generators at five sizes the answer's text (its glyphs' ink height, or the contract generator's answer box)
    stays near ``gist_text_px`` on the gist: legible unless the scale is already the finest, and too small at the next
    coarser scale unless the scale is already the coarsest."""
    model = ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny")
    processor = ArrCocProcessor.from_pretrained("arr-coc-tiny")
    pages = [(image, h) for image, h in _project_pages()]
    pages += [(s["image"], float(s["answer_box"][3] - s["answer_box"][1]))
              for s in (contract_generate("doc-fields", seed) for seed in range(3))]  # fmt: skip
    low, high = AUTO_GIST_SCALES
    chosen = {}
    for factor in FACTORS:
        for k, (page, answer_h) in enumerate(pages):
            image = _resized(page, factor)
            out = processor.image_processor(images=[image], return_tensors="pt")
            thw = out["image_grid_thw"][0]
            seen = answer_h * factor * int(thw[1]) * 14 / image.height  # px tall in the processor's pixels
            g = ImageInput(model.adapter, out["pixel_values"], thw, 0).gist_scale("auto", TEXT_PX)
            assert g == low or seen / g >= 0.6 * TEXT_PX, (factor, k, g, seen)
            assert g == high or seen / (g + 1) < 1.4 * TEXT_PX, (factor, k, g, seen)
            chosen[factor, k] = g
    assert max(chosen.values()) > min(chosen.values())  # the scale follows the page, not a constant


def test_a_batch_of_two_text_sizes_gets_a_gist_scale_per_image():
    model = ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny").eval()
    processor = ArrCocProcessor.from_pretrained("arr-coc-tiny")
    page = generate("doc-fields", 0)
    images = [page["image"], _resized(page["image"].crop((0, 0, 300, 300)), 3.0)]  # within the processor's range
    inputs = processor(images=images, text=[page["question"]] * 2)
    realizations = model.realize_relevance(**inputs, compression=8, encoding="saccade")
    scales = [r.gist_scale for r in realizations]
    assert scales[0] == AUTO_GIST_SCALES[0] and scales[1] > scales[0]
    assert model.config.gist_scale == "auto"


def test_auto_and_its_text_height_round_trip(make_model, tmp_path):
    model = make_model("qwen2_vl", encoding="saccade", gist_scale="auto", gist_text_px=6.5)
    model.save_pretrained(tmp_path)
    loaded = ArrCocForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.config.gist_scale, loaded.config.gist_text_px) == ("auto", 6.5)
