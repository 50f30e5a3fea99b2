"""The independent contract generator (`arr_coc.data.contract`) keeps every rule of the task contract, on a
fixed sweep of evaluation seeds, checked both on its scene and on the rendered pixels; and it reaches the
whole space the contract allows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from arr_coc.data import contract as c

SEEDS = [c.SEED_START + i for i in range(40)]
SWEEP = range(c.SEED_START, c.SEED_START + 400)
INK = 40  # a pixel differing from the background by more than this (max over channels) is drawn, not noise


def _inside(rect, width, height):
    x0, y0, x1, y1 = rect
    return 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def _ink_bbox(diff: np.ndarray):
    ys, xs = np.nonzero(diff > INK)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


def _diff(pixels: np.ndarray, colour) -> np.ndarray:
    return np.abs(pixels.astype(np.int32) - np.asarray(colour)).max(-1)


def _check_text_pixels(pixels: np.ndarray, background, text: c.Text) -> None:
    """The text's drawn pixels lie inside its ink rectangle and reach (within 2 px) each of its sides; its
    core is dark (pixels of exactly the text colour, ≤ 40 per channel)."""
    x0, y0, x1, y1 = text.ink
    region = pixels[y0:y1, x0:x1]
    assert (np.all(region == text.colour, axis=-1)).sum() >= 10, text
    ix0, iy0, ix1, iy1 = _ink_bbox(_diff(region, background))
    assert ix0 <= 2 and iy0 <= 2 and ix1 >= x1 - x0 - 2 and iy1 >= y1 - y0 - 2, (text, (ix0, iy0, ix1, iy1))


def test_unknown_task_and_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="box-codes.*doc-fields"):
        c.generate("box_codes", 1)
    with pytest.raises(TypeError, match="integer"):
        c.generate("box-codes", 1.5)
    with pytest.raises(ValueError, match="n must be"):
        c.samples("doc-fields", -1)


@pytest.mark.parametrize("task", c.TASKS)
def test_generation_is_deterministic_by_seed_and_samples_use_the_evaluation_seeds(task):
    a, b, other = c.generate(task, 7), c.generate(task, 7), c.generate(task, 8)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert a["image"].tobytes() != other["image"].tobytes()
    batch = c.samples(task, 2)
    for i, s in enumerate(batch):
        ref = c.generate(task, c.SEED_START + i)
        assert s["image"].tobytes() == ref["image"].tobytes() and s["answer_box"] == ref["answer_box"]
    assert set(batch[0]) == {"image", "question", "answer", "answer_box", "task"}
    assert batch[0]["task"] == task and batch[0]["image"].mode == "RGB"


@pytest.mark.parametrize("seed", SEEDS)
def test_box_codes_keep_the_contract(seed):
    scene, sample = c.layout("box-codes", seed), c.generate("box-codes", seed)
    width, height = sample["image"].size
    assert scene.size == (width, height) and 448 <= width <= 672 and 448 <= height <= 672
    assert all(225 <= v <= 255 for v in scene.background) and 0 <= scene.noise <= 6
    assert 3 <= len(scene.boxes) <= 8
    assert len({b.name for b in scene.boxes}) == len(scene.boxes)
    for box in scene.boxes:
        assert all(abs(v - p) <= 15 for v, p in zip(box.colour, c.PALETTE[box.name]))
        assert 3 <= box.thickness <= 5 and _inside(box.rect, width, height)
        code = box.code
        assert len(code.text) == 4 and set(code.text) <= set(c.CHARSET)
        assert 18 <= code.size <= 26 and all(v <= 40 for v in code.colour)
        left, top = code.ink[0] - box.rect[0], code.ink[1] - box.rect[1]
        right, bottom = box.rect[2] - code.ink[2], box.rect[3] - code.ink[3]
        assert left == right and top == bottom and 12 <= left <= 40 and 12 <= top <= 40, box  # centred
    for a, b in itertools.combinations([b.rect for b in scene.boxes], 2):
        assert a[2] + 8 <= b[0] or b[2] + 8 <= a[0] or a[3] + 8 <= b[1] or b[3] + 8 <= a[1], (a, b)

    named = [b for b in scene.boxes if sample["question"] == f"What is the code in the {b.name} box?"]
    assert len(named) == 1
    assert sample["answer"] == named[0].code.text and sample["answer_box"] == named[0].rect

    pixels = np.asarray(sample["image"])
    drawn = np.zeros((height, width), dtype=bool)
    for box in scene.boxes:
        x0, y0, x1, y1 = box.rect
        t, xc, yc = box.thickness, (x0 + x1) // 2, (y0 + y1) // 2
        # the outline: t pixels of the box colour from each outer edge, then the background
        for edge in (
            pixels[y0 : y0 + t, xc],
            pixels[y1 - t : y1, xc],
            pixels[yc, x0 : x0 + t],
            pixels[yc, x1 - t : x1],
        ):
            assert (edge == box.colour).all(), box
        for inner in (pixels[y0 + t, xc], pixels[y1 - t - 1, xc], pixels[yc, x0 + t], pixels[yc, x1 - t - 1]):
            assert _diff(inner[None], scene.background)[0] <= INK, box
        ix0, iy0, ix1, iy1 = _ink_bbox(_diff(pixels[y0 + t : y1 - t, x0 + t : x1 - t], scene.background))
        cx0, cy0, cx1, cy1 = box.code.ink  # inside the outline only the code is drawn
        assert cx0 <= ix0 + x0 + t and cy0 <= iy0 + y0 + t and ix1 + x0 + t <= cx1 and iy1 + y0 + t <= cy1, box
        _check_text_pixels(pixels, scene.background, box.code)
        drawn[y0:y1, x0:x1] = True
    # outside the boxes: the background, flat or with noise of σ ≤ 6
    outside = pixels[~drawn].astype(np.float64)
    if scene.noise == 0:
        assert (outside == scene.background).all()
    else:
        assert (_diff(outside, scene.background) <= INK).all()
        assert outside.std(axis=0).max() <= 6.3


@pytest.mark.parametrize("seed", SEEDS)
def test_doc_fields_keep_the_contract(seed):
    scene, sample = c.layout("doc-fields", seed), c.generate("doc-fields", seed)
    width, height = sample["image"].size
    assert scene.size == (width, height) and 448 <= width <= 672 and 560 <= height <= 896
    assert all(v >= 245 for v in scene.background) and scene.noise == 0 and not scene.boxes
    assert 5 <= len(scene.lines) <= 12
    assert len({line.label for line in scene.lines}) == len(scene.lines)
    for line in scene.lines:
        assert line.label in c.LABELS and line.text.text == f"{line.label}: {line.value}"
        assert 3 <= len(line.value) <= 6 and set(line.value) <= set(c.CHARSET)
        assert 16 <= line.text.size <= 24 and all(v <= 40 for v in line.text.colour)
        assert _inside(line.text.ink, width, height), line
    rows = sorted((line.text.ink for line in scene.lines), key=lambda r: r[1])
    for upper, lower in zip(rows, rows[1:]):
        assert lower[1] - upper[3] >= 6, (upper, lower)

    named = [line for line in scene.lines if sample["question"] == f"What is the {line.label}?"]
    assert len(named) == 1
    assert sample["answer"] == named[0].value and sample["answer_box"] == named[0].text.ink

    pixels = np.asarray(sample["image"])
    drawn = np.zeros((height, width), dtype=bool)
    for line in scene.lines:
        _check_text_pixels(pixels, scene.background, line.text)
        x0, y0, x1, y1 = line.text.ink
        drawn[y0:y1, x0:x1] = True
    assert (pixels[~drawn] == scene.background).all()  # a flat page; every drawn pixel lies in a line's box


def test_the_sweep_reaches_the_whole_contract_space():
    boxes = [c.layout("box-codes", s) for s in SWEEP]
    docs = [c.layout("doc-fields", s) for s in SWEEP]
    every_box = [b for s in boxes for b in s.boxes]
    assert {len(s.boxes) for s in boxes} == set(range(3, 9))
    assert {b.name for b in every_box} == set(c.PALETTE)
    assert {b.thickness for b in every_box} == {3, 4, 5}
    assert {b.code.size for b in every_box} == set(range(18, 27))
    margins = {b.code.ink[0] - b.rect[0] for b in every_box} | {b.code.ink[1] - b.rect[1] for b in every_box}
    assert {12, 40} <= margins
    assert min(v for s in boxes for v in s.size) <= 460 and max(v for s in boxes for v in s.size) >= 660
    assert {s.noise > 0 for s in boxes} == {True, False} and max(s.noise for s in boxes) > 5.5
    assert min(min(s.background) for s in boxes) <= 228
    jitter = [abs(v - p) for b in every_box for v, p in zip(b.colour, c.PALETTE[b.name])]
    assert max(jitter) == 15 and min(jitter) == 0
    gaps = [
        max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
        for s in boxes
        for a, b in itertools.combinations([b.rect for b in s.boxes], 2)
    ]
    assert min(gaps) == 8 and max(gaps) > 200
    assert any(b.rect[0] == 0 or b.rect[1] == 0 for b in every_box)
    assert max(v for b in every_box for v in b.code.colour) == 40

    every_line = [line for s in docs for line in s.lines]
    assert {len(s.lines) for s in docs} == set(range(5, 13))
    assert {line.label for line in every_line} == set(c.LABELS)
    assert {len(line.value) for line in every_line} == {3, 4, 5, 6}
    assert {line.text.size for line in every_line} == set(range(16, 25))
    assert any(len({line.text.size for line in s.lines}) > 4 for s in docs)  # large and small on one page
    assert any(line.text.ink[0] > s.size[0] / 2 for s in docs for line in s.lines)  # big left offsets
    assert any(line.text.ink[0] == 0 for line in every_line)
    assert min(s.size[1] for s in docs) <= 580 and max(s.size[1] for s in docs) >= 880
    row_gaps = [
        lower[1] - upper[3]
        for s in docs
        for upper, lower in itertools.pairwise(sorted((line.text.ink for line in s.lines), key=lambda r: r[1]))
    ]
    assert min(row_gaps) == 6 and max(row_gaps) > 100
    assert max(v for line in every_line for v in line.text.colour) == 40
    assert {min(s.background) == 255 for s in docs} == {True, False}
