"""The synthetic reading tasks `box-codes` and `doc-fields` (their contract: docs/tasks.md).

Each sample is ``{"image", "question", "answer", "answer_box", "task"}``; with
``layout=True`` it also carries ``"glyphs"``: one ``(char, x0, y0, x1, y1, group, index)``
per drawn character (ink box in pixels, the box colour or line label it belongs to, its
index inside the code/value or -1 for label text), and ``"items"``: the drawn boxes or lines
with their properties. The renderer knows where every character is, and the embedded
model's training uses that for dense supervision.

Samples are deterministic by ``(task, seed)``. Seeds at or above ``EVAL_SEED_START``
are held out for evaluation and never used by training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .spec import CHARSET, LABELS, PALETTE, TASKS

# Held-out evaluation seeds: [EVAL_SEED_START, EVAL_SEED_START + EVAL_SEED_COUNT).
EVAL_SEED_START = 1_000_000_000
EVAL_SEED_COUNT = 100_000
_TASK_SALT = {"box-codes": 0xB0C5, "doc-fields": 0xD0CF}


def font_path() -> str:
    """DejaVu Sans Bold, from matplotlib's data (or Debian's fonts-dejavu-core)."""
    import matplotlib

    candidates = [
        os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf"),
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"DejaVuSans-Bold.ttf not found in {candidates}; install matplotlib or fonts-dejavu-core")


@lru_cache(maxsize=64)
def font_at(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold at ``size`` px."""
    # BASIC layout: glyph positions must not depend on whether libraqm is installed.
    return ImageFont.truetype(font_path(), size, layout_engine=ImageFont.Layout.BASIC)


@dataclass(frozen=True)
class Glyph:
    char: str
    box: tuple[int, int, int, int]
    group: str
    index: int


def _text_extent(text: str, size: int) -> tuple[int, int, int, int]:
    """Ink box of ``text`` drawn at the origin: (x0, y0, x1, y1)."""
    return font_at(size).getbbox(text)


def draw_text(
    draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, size: int, fill, group: str, index_from: int | None
) -> list[Glyph]:
    """Draw ``text`` one character at a time (no kerning) and return each glyph's ink box."""
    font = font_at(size)
    x, y = origin
    glyphs = []
    for i, ch in enumerate(text):
        draw.text((x, y), ch, font=font, fill=fill)
        if not ch.isspace():
            bx0, by0, bx1, by1 = font.getbbox(ch)
            glyphs.append(
                Glyph(ch, (x + bx0, y + by0, x + bx1, y + by1), group, -1 if index_from is None else i - index_from)
            )
        x += font.getlength(ch)
    return glyphs


def _string_extent(text: str, size: int) -> tuple[float, int, int, int]:
    """Ink box of ``text`` as `draw_text` lays it out: (x0, y0, x1, y1) relative to the origin."""
    font = font_at(size)
    x, x0, x1, y0, y1 = 0.0, None, 0.0, 10**9, -(10**9)
    for ch in text:
        if not ch.isspace():
            bx0, by0, bx1, by1 = font.getbbox(ch)
            x0 = x + bx0 if x0 is None else x0
            x1 = x + bx1
            y0, y1 = min(y0, by0), max(y1, by1)
        x += font.getlength(ch)
    return x0 or 0.0, y0, x1, y1


def _code(rng: np.random.Generator, length: int) -> str:
    return "".join(CHARSET[i] for i in rng.integers(0, len(CHARSET), size=length))


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in rgb)


def dark_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A text colour: each channel in [0, 40]."""
    return tuple(int(c) for c in rng.integers(0, 41, size=3))


def _rng(task: str, seed: int) -> np.random.Generator:
    if task not in _TASK_SALT:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([_TASK_SALT[task], int(seed)])


def _box_codes(rng: np.random.Generator) -> tuple[Image.Image, str, str, tuple, list[Glyph]]:
    width, height = (int(v) for v in rng.integers(448, 673, size=2))
    background = tuple(int(c) for c in rng.integers(225, 256, size=3))
    n_boxes = int(rng.integers(3, 9))
    colours = [list(PALETTE)[i] for i in rng.permutation(len(PALETTE))[:n_boxes]]

    placed: list[tuple[int, int, int, int]] = []
    specs = []
    for colour in colours:
        for _ in range(200):
            size = int(rng.integers(18, 27))
            code = _code(rng, 4)
            ix0, iy0, ix1, iy1 = _string_extent(code, size)
            mx, my = (int(v) for v in rng.integers(12, 41, size=2))
            bw, bh = int(round(ix1 - ix0)) + 2 * mx, (iy1 - iy0) + 2 * my
            if bw > width or bh > height:
                continue
            x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(
                box[2] + 8 <= p[0] or p[2] + 8 <= box[0] or box[3] + 8 <= p[1] or p[3] + 8 <= box[1] for p in placed
            ):
                placed.append(box)
                specs.append((colour, code, size, box, (ix0, iy0, ix1, iy1)))
                break
    if len(specs) < 3:  # could not place 3 boxes: draw again from the same stream
        return _box_codes(rng)

    image = Image.new("RGB", (width, height), background)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.5, 6.0))
        noise = rng.normal(0.0, sigma, size=(height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    glyphs: list[Glyph] = []
    items = []
    for colour, code, size, box, (ix0, iy0, ix1, iy1) in specs:
        thickness = int(rng.integers(3, 6))
        items.append({"colour": colour, "code": code, "font_size": size, "box": box, "thickness": thickness})
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=_jitter(rng, PALETTE[colour]), width=thickness)
        # Centre the ink box of the code inside the box.
        ox = (box[0] + box[2]) / 2 - (ix0 + ix1) / 2
        oy = (box[1] + box[3]) / 2 - (iy0 + iy1) / 2
        glyphs += draw_text(draw, (round(ox), round(oy)), code, size, dark_colour(rng), colour, 0)
    target = int(rng.integers(0, len(specs)))
    colour, code, _, box, _ = specs[target]
    return image, f"What is the code in the {colour} box?", code, box, glyphs, items


def _doc_fields(rng: np.random.Generator) -> tuple[Image.Image, str, str, tuple, list[Glyph]]:
    width, height = int(rng.integers(448, 673)), int(rng.integers(560, 897))
    page = tuple(int(c) for c in rng.integers(245, 256, size=3))
    n_lines = int(rng.integers(5, 13))
    labels = [LABELS[i] for i in rng.permutation(len(LABELS))[:n_lines]]
    # The page's habits, each drawn per page so that no single one is all the model sees: one font size or one
    # per line, one ink colour or one per line, lines spread over the page or packed in a block down to the
    # contract's 6 px between rows, left edges free, in one column, or in a column with indented lines.
    page_size = int(rng.integers(16, 25)) if rng.random() < 0.5 else None
    page_ink = dark_colour(rng) if rng.random() < 0.5 else None
    packed = rng.random() < 0.6
    align = ("free", "column", "indented")[int(rng.integers(0, 3))]
    lines = []
    for label in labels:
        value = _code(rng, int(rng.integers(3, 7)))
        size = page_size or int(rng.integers(16, 25))
        lines.append((label, value, size, _string_extent(f"{label}: {value}", size)))

    ink_heights = [y1 - y0 for _, _, _, (_, y0, _, y1) in lines]
    slack = height - sum(ink_heights) - 6 * (n_lines - 1)
    # Split the vertical slack (all of it, or a share when packed: a block placed anywhere on the page) at random
    # between the margin above and the gaps (each gap >= 6 px).
    used = int(slack * rng.random() ** 2) if packed else slack
    cuts = np.sort(rng.integers(0, used + 1, size=n_lines))
    extra = np.diff(np.concatenate([[0], cuts]))
    extra[0] += int(rng.integers(0, slack - used + 1))
    widest = max(x1 - x0 for _, _, _, (x0, _, x1, _) in lines)
    column = int(rng.integers(0, max(1, int(width - widest))))
    image = Image.new("RGB", (width, height), page)
    draw = ImageDraw.Draw(image)
    glyphs: list[Glyph] = []
    boxes, items = [], []
    top = 0
    for i, ((label, value, size, (x0, y0, x1, y1)), gap) in enumerate(zip(lines, extra)):
        top += int(gap) + (6 if i else 0)
        line_w = x1 - x0
        if align == "free":
            ink_left = int(rng.integers(0, max(1, int(width - line_w))))
        else:
            indent = int(rng.integers(8, 121)) if align == "indented" and rng.random() < 0.4 else 0
            ink_left = min(column + indent, max(0, int(width - line_w) - 1))
        left = ink_left - int(x0)
        origin = (left, top - y0)
        text = f"{label}: {value}"
        glyphs += draw_text(draw, origin, text, size, page_ink or dark_colour(rng), label, len(label) + 2)
        boxes.append((int(np.floor(left + x0)), top, int(np.ceil(left + x1)), top + (y1 - y0)))
        items.append({"label": label, "value": value, "font_size": size, "box": boxes[-1]})
        top += y1 - y0
    target = int(rng.integers(0, n_lines))
    return image, f"What is the {labels[target]}?", lines[target][1], boxes[target], glyphs, items


_GENERATORS = {"box-codes": _box_codes, "doc-fields": _doc_fields}


def generate(task: str, seed: int, layout: bool = False) -> dict:
    """One sample of ``task`` (``"box-codes"`` or ``"doc-fields"``), deterministic by ``seed``."""
    rng = _rng(task, seed)
    image, question, answer, box, glyphs, items = _GENERATORS[task](rng)
    sample = {
        "image": image,
        "question": question,
        "answer": answer,
        "answer_box": tuple(int(v) for v in box),
        "task": task,
    }
    if layout:
        sample["glyphs"] = [(g.char, *(int(round(v)) for v in g.box), g.group, g.index) for g in glyphs]
        sample["items"] = items
    return sample


def eval_seeds(n: int, offset: int = 0) -> range:
    """The first ``n`` held-out evaluation seeds (after ``offset``)."""
    if n + offset > EVAL_SEED_COUNT:
        raise ValueError(f"only {EVAL_SEED_COUNT} evaluation seeds exist, asked for {n} after {offset}")
    return range(EVAL_SEED_START + offset, EVAL_SEED_START + offset + n)


def check_training_seed(seed: int) -> int:
    """Raise if ``seed`` is a held-out evaluation seed."""
    if seed >= EVAL_SEED_START:
        raise ValueError(f"seed {seed} is held out for evaluation (seeds >= {EVAL_SEED_START}); train on smaller seeds")
    return seed


def normalize_answer(text: str) -> str:
    """How answers are compared: ``strip()`` and upper-case (exact match)."""
    return text.strip().upper()


def dataset(tasks=TASKS, seeds=range(1000), streaming: bool = False):
    """The tasks as a `datasets.Dataset` (or `IterableDataset`) with an ``Image`` feature.

    Rows interleave the tasks: for each seed, one sample per task. ``seeds`` must all be training
    seeds or all held-out evaluation seeds (`eval_seeds`).
    """
    import datasets

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    seeds = list(seeds)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answer_box": datasets.Sequence(datasets.Value("int32"), length=4),
            "task": datasets.Value("string"),
            "seed": datasets.Value("int64"),
        }
    )
    kwargs = {"tasks": tuple(tasks), "seeds": seeds}  # shards split the seeds list
    if streaming:
        return datasets.IterableDataset.from_generator(_rows, features=features, gen_kwargs=kwargs)
    return datasets.Dataset.from_generator(_rows, features=features, gen_kwargs=kwargs)


def _rows(tasks: list[str], seeds: list[int]):
    for seed in seeds:
        for task in tasks:
            yield dict(generate(task, seed), seed=seed)


def write_samples(out_dir: str, tasks=TASKS, n: int = 20, seed_start: int = 0) -> str:
    """Write ``n`` samples per task as PNG files plus ``samples.jsonl``; returns the JSONL path."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "samples.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for seed in range(seed_start, seed_start + n):
            for task in [tasks] if isinstance(tasks, str) else tasks:
                sample = generate(task, seed)
                name = f"{task}-{seed}.png"
                sample["image"].save(os.path.join(out_dir, name))
                row = {k: v for k, v in sample.items() if k != "image"}
                f.write(json.dumps({"image": name, **row, "answer_box": list(row["answer_box"]), "seed": seed}) + "\n")
    return path
