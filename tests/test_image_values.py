"""One rule for the values of every PIL mode and array dtype (issue 16, item 4): a case per row of the table in
docs/reliability.md, checked through `load_image` and through the processor the model reads from."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from arr_coc.images import InvalidImageError, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 6, 8


def _mode(mode: str, value) -> Image.Image:
    return Image.new(mode, (W, H), value)


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (W, H), 1)
    image.putpalette([255, 0, 0, 30, 140, 220] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


def _through_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _array(value, dtype, channels: int = 3):
    return np.full((H, W, channels) if channels else (H, W), value, dtype=dtype)


GREY = lambda v: (v, v, v)  # noqa: E731
REFUSED = "refused"

# table row (as in docs/reliability.md) -> [(case id, input, RGB the model sees, or REFUSED with a message part)]
TABLE = {
    "PIL `1`": [("1 white", _mode("1", 1), GREY(255)), ("1 black", _mode("1", 0), GREY(0))],
    "PIL `L`": [("L", _mode("L", 77), GREY(77))],
    "PIL `P`": [("P", _palette(False), (30, 140, 220))],
    "PIL `RGB`": [("RGB", _mode("RGB", (10, 20, 30)), (10, 20, 30))],
    "PIL `RGBA`, `LA`, `PA`, `P` with transparency": [
        ("RGBA half", _mode("RGBA", (0, 0, 0, 128)), GREY(127)),
        ("RGBA opaque", _mode("RGBA", (10, 20, 30, 255)), (10, 20, 30)),
        ("LA", _mode("LA", (0, 0)), GREY(255)),
        ("PA", _mode("RGBA", (30, 140, 220, 255)).convert("PA"), (30, 140, 220)),
        ("P transparent", _palette(True), GREY(255)),
        ("P transparent via PNG", _through_png(_palette(True)), GREY(255)),
    ],
    "PIL `RGBa`, `La` (premultiplied alpha)": [
        ("RGBa", _mode("RGBA", (200, 100, 50, 255)).convert("RGBa"), (200, 100, 50)),
        ("La", _mode("LA", (90, 255)).convert("La"), GREY(90)),
    ],
    "PIL `CMYK`, `YCbCr`, `HSV`": [
        ("CMYK", _mode("CMYK", (0, 255, 255, 0)), (255, 0, 0)),
        ("YCbCr", _mode("YCbCr", (128, 128, 128)), GREY(128)),
        ("HSV", _mode("HSV", (0, 255, 255)), (255, 0, 0)),
    ],
    "PIL `I;16` (`I;16L`, `I;16B`)": [
        ("I;16", Image.fromarray(_array(25700, np.uint16, 0)), GREY(100)),
        ("I;16B", Image.frombytes("I;16B", (W, H), _array(65535, ">u2", 0).tobytes()), GREY(255)),
        ("16-bit PNG", _through_png(Image.fromarray(_array(51400, np.uint16, 0))), GREY(200)),
    ],
    "PIL `I` (32-bit integers)": [
        ("I in 16 bits", Image.fromarray(_array(12850, np.int32, 0)), GREY(50)),
        ("I over 16 bits", Image.fromarray(_array(70000, np.int32, 0)), (REFUSED, "0-65535")),
        ("I negative", Image.fromarray(_array(-1, np.int32, 0)), (REFUSED, "0-65535")),
    ],
    "PIL `F` (32-bit floats)": [
        ("F in [0, 1]", Image.fromarray(_array(0.5, np.float32, 0)), GREY(128)),
        ("F in (1, 255]", Image.fromarray(_array(200.0, np.float32, 0)), GREY(200)),
        ("F over 255", Image.fromarray(_array(300.0, np.float32, 0)), (REFUSED, r"expected \[0, 1\]")),
        ("F negative", Image.fromarray(_array(-0.5, np.float32, 0)), (REFUSED, r"\[0, 255\]")),
        ("F NaN", Image.fromarray(_array(np.nan, np.float32, 0)), (REFUSED, "NaN")),
    ],
    "`uint8` array or tensor": [
        ("numpy uint8", _array(33, np.uint8), GREY(33)),
        ("torch uint8 CxHxW", torch.full((3, H, W), 33, dtype=torch.uint8), GREY(33)),
        ("numpy uint8 grey", _array(33, np.uint8, 0), GREY(33)),
    ],
    "`uint16` array or tensor": [
        ("numpy uint16", _array(25700, np.uint16), GREY(100)),
        ("torch uint16", torch.full((H, W), 51400, dtype=torch.uint16), GREY(200)),
    ],
    "`int32` / `uint32` array or tensor": [
        ("numpy int32", _array(65535, np.int32), GREY(255)),
        ("numpy uint32", _array(257, np.uint32), GREY(1)),
        ("torch int32", torch.full((3, H, W), 25700, dtype=torch.int32), GREY(100)),
        ("numpy int32 over 16 bits", _array(2**20, np.int32), (REFUSED, "16-bit values")),
        ("torch int32 negative", torch.full((H, W), -5, dtype=torch.int32), (REFUSED, "16-bit values")),
    ],
    "`bool` array or tensor": [
        ("numpy bool", _array(True, np.bool_, 0), GREY(255)),
        ("torch bool", torch.zeros((H, W), dtype=torch.bool), GREY(0)),
    ],
    "float array or tensor (`float16`, `float32`, `float64`, `bfloat16`)": [
        ("float32 in [0, 1]", _array(0.2, np.float32), GREY(51)),
        ("float64 in (1, 255]", _array(254.6, np.float64), GREY(255)),
        ("float16 in [0, 1]", _array(1.0, np.float16), GREY(255)),
        ("torch bfloat16 CxHxW", torch.full((3, H, W), 0.5, dtype=torch.bfloat16), GREY(128)),
        ("torch float32 in (1, 255]", torch.full((H, W, 3), 12.0), GREY(12)),
        ("float over 255", _array(256.0, np.float32), (REFUSED, r"expected \[0, 1\]")),
        ("float negative", _array(-1.0, np.float64), (REFUSED, "rescale")),
        ("float inf", _array(np.inf, np.float32), (REFUSED, "NaN or infinite")),
    ],
    "other integer dtypes (`int8`, `int16`, `int64`, `uint64`)": [
        ("numpy int64", _array(100, np.int64), (REFUSED, "astype")),
        ("numpy int8", _array(100, np.int8), (REFUSED, "dtype int8")),
        ("torch int16", torch.full((H, W), 100, dtype=torch.int16), (REFUSED, "dtype int16")),
        ("numpy uint64", _array(100, np.uint64), (REFUSED, "uint64")),
    ],
}
CASES = [(row, case, value, expected) for row, cases in TABLE.items() for case, value, expected in cases]


def test_every_row_of_the_documented_table_has_cases_here():
    text = open(os.path.join(ROOT, "docs", "reliability.md"), encoding="utf-8").read()
    section = text.split("<!-- image-values -->")[1].split("<!-- /image-values -->")[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if re.match(r"\| [^-]", line)][1:]
    assert rows == list(TABLE)


@pytest.mark.parametrize(("row", "case", "value", "expected"), CASES, ids=[c[1] for c in CASES])
def test_one_rule_for_every_mode_and_dtype(row, case, value, expected):
    if expected[0] == REFUSED:
        with pytest.raises(InvalidImageError, match=expected[1]):
            load_image(value)
        return
    image = load_image(value)
    assert image.mode == "RGB" and image.size == (W, H)
    seen = np.asarray(image)
    assert (seen == np.array(expected, dtype=np.uint8)).all(), (case, seen[0, 0].tolist(), expected)


def test_the_processor_reads_the_same_values(make_processor):
    """What reaches the image processor is the rule's RGB image, for a 16-bit, a float and a 32-bit input."""
    processor = make_processor("qwen2_vl")
    size = (56, 56)
    cases = [
        (np.full(size, 25700, dtype=np.uint16), 100),
        (torch.full((3, *size), 0.2), 51),
        (Image.fromarray(np.full(size, 200.0, dtype=np.float32)), 200),
        (Image.fromarray(np.full(size, 12850, dtype=np.int32)), 50),
    ]
    for value, grey in cases:
        got = processor(images=[value], text=["What is there?"])["pixel_values"]
        want = processor(images=[Image.new("RGB", size, (grey,) * 3)], text=["What is there?"])["pixel_values"]
        assert torch.equal(got, want), grey
    with pytest.raises(InvalidImageError, match="0-65535"):
        processor(images=[np.full(size, 2**20, dtype=np.int32)], text=["What is there?"])
