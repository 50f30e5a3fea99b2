"""The synthetic tasks against the task contract (docs/tasks.md): determinism, the contract, coverage of the whole space."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from arr_coc.data.synthetic import (
    CHARSET,
    EVAL_SEED_START,
    LABELS,
    PALETTE,
    check_training_seed,
    dataset,
    eval_seeds,
    generate,
    write_samples,
)

N = 300


@pytest.fixture(scope="module")
def box_codes():
    return [generate("box-codes", s, layout=True) for s in range(N)]


@pytest.fixture(scope="module")
def doc_fields():
    return [generate("doc-fields", s, layout=True) for s in range(N)]


@pytest.mark.parametrize("task", ["box-codes", "doc-fields"])
def test_deterministic_by_seed(task):
    a, b, c = generate(task, 42), generate(task, 42), generate(task, 43)
    assert a["question"] == b["question"] and a["answer"] == b["answer"] and a["answer_box"] == b["answer_box"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"])) or a["answer"] != c["answer"]


def _separated(a, b, gap=8):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def test_box_codes_samples_follow_the_contract(box_codes):
    for s in box_codes:
        image, items = s["image"], s["items"]
        w, h = image.size
        assert image.mode == "RGB" and 448 <= w <= 672 and 448 <= h <= 672
        assert 3 <= len(items) <= 8
        assert len({it["colour"] for it in items}) == len(items)
        m = re.fullmatch(r"What is the code in the (\w+) box\?", s["question"])
        assert m and m.group(1) in PALETTE
        target = next(it for it in items if it["colour"] == m.group(1))
        assert s["answer"] == target["code"] and tuple(s["answer_box"]) == tuple(target["box"])
        assert len(s["answer"]) == 4 and set(s["answer"]) <= set(CHARSET)
        for i, it in enumerate(items):
            x0, y0, x1, y1 = it["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 18 <= it["font_size"] <= 26 and 3 <= it["thickness"] <= 5
            assert all(_separated(it["box"], other["box"]) for other in items[i + 1 :])
            ink = [g for g in s["glyphs"] if g[5] == it["colour"]]
            gx0, gy0 = min(g[1] for g in ink), min(g[2] for g in ink)
            gx1, gy1 = max(g[3] for g in ink), max(g[4] for g in ink)
            for margin in (gx0 - x0, x1 - gx1, gy0 - y0, y1 - gy1):  # the box is 12-40 px larger than the text
                assert 11 <= margin <= 41, margin
            assert abs((gx0 - x0) - (x1 - gx1)) <= 2 and abs((gy0 - y0) - (y1 - gy1)) <= 2  # centred
        # the background is light (corner pixels, away from every box)
        arr = np.asarray(image, dtype=float)
        corners = [arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]]
        assert any(np.all(c >= 225 - 20) for c in corners)


def test_doc_fields_samples_follow_the_contract(doc_fields):
    for s in doc_fields:
        image, items = s["image"], s["items"]
        w, h = image.size
        assert 448 <= w <= 672 and 560 <= h <= 896
        assert 5 <= len(items) <= 12 and len({it["label"] for it in items}) == len(items)
        m = re.fullmatch(r"What is the (\w+)\?", s["question"])
        assert m and m.group(1) in LABELS
        target = next(it for it in items if it["label"] == m.group(1))
        assert s["answer"] == target["value"] and tuple(s["answer_box"]) == tuple(target["box"])
        assert 3 <= len(s["answer"]) <= 6 and set(s["answer"]) <= set(CHARSET)
        tops = sorted(items, key=lambda it: it["box"][1])
        for a, b in zip(tops, tops[1:]):
            assert b["box"][1] - a["box"][3] >= 6  # rows >= 6 px apart
        for it in items:
            x0, y0, x1, y1 = it["box"]
            assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h and 16 <= it["font_size"] <= 24
        page = np.asarray(image)
        assert np.all(page[0, :, :] >= 245) or np.all(page[-1, :, :] >= 245) or np.all(page[:, 0, :] >= 245)


def test_the_whole_space_is_covered(box_codes, doc_fields):
    target_colours = {re.search(r"the (\w+) box", s["question"]).group(1) for s in box_codes}
    assert target_colours == set(PALETTE)
    assert {len(s["items"]) for s in box_codes} >= {3, 8}
    sizes = [it["font_size"] for s in box_codes for it in s["items"]]
    assert min(sizes) == 18 and max(sizes) == 26
    widths = [s["image"].size[0] for s in box_codes]
    assert min(widths) <= 455 and max(widths) >= 665
    target_labels = {re.search(r"the (\w+)\?", s["question"]).group(1) for s in doc_fields}
    assert target_labels == set(LABELS)
    assert {len(s["items"]) for s in doc_fields} >= {5, 12}
    sizes = [it["font_size"] for s in doc_fields for it in s["items"]]
    assert min(sizes) == 16 and max(sizes) == 24
    heights = [s["image"].size[1] for s in doc_fields]
    assert min(heights) <= 575 and max(heights) >= 880
    values = [len(s["answer"]) for s in doc_fields]
    assert {3, 6} <= set(values)
    # rows from the contract's 6 px apart (a packed block) to spread over the page; left edges free, in one column
    # and in a column with indented lines
    gaps = [[b["box"][1] - a["box"][3] for a, b in zip(rows, rows[1:])]
            for rows in (sorted(s["items"], key=lambda it: it["box"][1]) for s in doc_fields)]  # fmt: skip
    assert min(min(g) for g in gaps) == 6 and sum(max(g) <= 12 for g in gaps) >= 10
    assert sum(min(g) >= 20 for g in gaps) >= 30
    lefts = [len({it["box"][0] for it in s["items"]}) for s in doc_fields]
    assert sum(n == 1 for n in lefts) >= 30 and sum(n == 2 for n in lefts) >= 10
    assert sum(len({it["font_size"] for it in s["items"]}) == 1 for s in doc_fields) >= 100


@pytest.mark.parametrize("task", ["box-codes", "doc-fields"])
def test_answer_box_contains_the_answer_pixels(task):
    for seed in range(40):
        s = generate(task, seed, layout=True)
        x0, y0, x1, y1 = s["answer_box"]
        group = s["question"].split("the ")[-1].split(" box")[0].rstrip("?")
        answer_glyphs = [g for g in s["glyphs"] if g[5] == group and g[6] >= 0]
        assert "".join(g[0] for g in answer_glyphs) == s["answer"]
        dark = np.asarray(s["image"].convert("L")) < 100
        for _, gx0, gy0, gx1, gy1, *_ in answer_glyphs:
            assert x0 <= gx0 and y0 <= gy0 and gx1 <= x1 and gy1 <= y1
            assert dark[gy0:gy1, gx0:gx1].any(), "the glyph was drawn where the layout says"


def test_seeds_splits_datasets_and_sample_writer(tmp_path):
    assert eval_seeds(3)[0] == EVAL_SEED_START
    with pytest.raises(ValueError, match="held out"):
        check_training_seed(EVAL_SEED_START + 5)
    with pytest.raises(ValueError, match="unknown task"):
        generate("charts", 1)
    d = dataset(seeds=range(2))
    assert len(d) == 4 and d.features["image"].__class__.__name__ == "Image"
    assert d[0]["answer"] == generate("box-codes", 0)["answer"]
    stream = dataset("doc-fields", eval_seeds(2), streaming=True)
    assert [row["seed"] for row in stream] == list(eval_seeds(2))
    path = write_samples(str(tmp_path), n=2)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 4 and all((tmp_path / r["image"]).exists() for r in rows)
