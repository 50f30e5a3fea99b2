"""An independent generator written from the task contract in docs/tasks.md, for evaluation only.

A second implementation of the two synthetic reading tasks (``box-codes``, ``doc-fields``), written from the
contract text alone and never from the training generator (`arr_coc.data.synthetic`): a model that reads
these samples as well as the training generator's has learned the contract, not one renderer's habits.
Nothing here trains a model.

It draws from the *whole* space the contract allows, on purpose including what a first implementation may
leave out: any canvas size in range, boxes scattered anywhere or packed at the minimum 8 px gap against each
other and the canvas edges, every outline thickness, font size and per-side margin in range, palette colours
jittered by up to ±15 per channel, dark-grey text (any channel up to 40), tinted and noisy backgrounds
(σ up to 6, grey or per-channel), pages mixing large and small fonts, lines aligned, indented or each at its
own left edge (up to the right border), and rows from the minimum 6 px apart to spread over the page.

Readings of the contract (where it leaves room):

- Font size is the TrueType size in pixels per em, an integer (box-codes 18-26, doc-fields 16-24).
- "The text" of a code or line is its ink: the tight rectangle of the pixels the font draws.
- box-codes: a box's size is measured on its outer rectangle, so each side's margin (outer edge to the
  code's ink) is 12-40 px; "centred" means equal margins left and right and equal margins top and bottom
  (the horizontal and the vertical margin are drawn independently). Boxes are ≥ 8 px apart: at least 8
  background pixels between two outer rectangles along x or along y. Boxes may touch the canvas edge.
- box-codes: noise is Gaussian, added to the background before the boxes and codes are drawn; the text
  colour is its own rule (each channel 0-40), the ±15 jitter applies to the palette colours.
- doc-fields: "rows ≥ 6 px apart" is at least 6 px between the ink rectangles of consecutive lines; the
  page is flat (the contract allows noise on box-codes only); lines may touch the page edges.
- Rectangles (``answer_box``, and every rectangle of a `Scene`) are ``(x0, y0, x1, y1)`` with ``x1``, ``y1``
  exclusive: the pixel columns x0 .. x1 - 1, i.e. the continuous extent [x0, x1) the harness expects.
  For box-codes ``answer_box`` is the outline's outer rectangle; for doc-fields the ink rectangle of the
  whole ``{Label}: {value}`` line.

Seeds: any integer is a sample, deterministic across processes and platforms (the random stream is seeded
from ``"{task}|{seed}"`` through SHA-512, see `random.seed`). Evaluation with this generator uses seeds from
`SEED_START` (10**12) upward, far from every seed the project trains on; the streams are also this module's
own, so no seed renders a training generator's image.

    >>> s = generate("box-codes", SEED_START)
    >>> sorted(s)
    ['answer', 'answer_box', 'image', 'question', 'task']
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import cache
from numbers import Integral

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .spec import CHARSET, LABELS, PALETTE, TASKS

SEED_START = 10**12

# The contract's ranges (inclusive).
BOX_CANVAS = (448, 672)
BOX_COUNT = (3, 8)
BOX_BACKGROUND = (225, 255)
BOX_NOISE_MAX = 6.0
BOX_GAP = 8
BOX_THICKNESS = (3, 5)
BOX_FONT = (18, 26)
BOX_MARGIN = (12, 40)
CODE_LENGTH = 4
COLOUR_JITTER = 15
TEXT_MAX = 40
DOC_WIDTH = (448, 672)
DOC_HEIGHT = (560, 896)
DOC_PAGE_MIN = 245
DOC_LINES = (5, 12)
DOC_ROW_GAP = 6
DOC_FONT = (16, 24)
VALUE_LENGTH = (3, 6)

RGB = tuple[int, int, int]
Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class Text:
    """A string drawn at ``origin`` (the font's top-left anchor) whose ink fills exactly ``ink``."""

    text: str
    size: int
    colour: RGB
    origin: tuple[int, int]
    ink: Rect


@dataclass(frozen=True)
class Box:
    """A box-codes box: an outline ``thickness`` px thick whose outer rectangle is ``rect``."""

    name: str
    colour: RGB
    rect: Rect
    thickness: int
    code: Text


@dataclass(frozen=True)
class Line:
    """A doc-fields line ``{label}: {value}``."""

    label: str
    value: str
    text: Text


@dataclass(frozen=True)
class Scene:
    """Everything one sample draws, before drawing: `render` turns it into the image."""

    task: str
    size: tuple[int, int]  # (width, height)
    background: RGB
    noise: float  # Gaussian σ in grey levels; 0 = flat
    noise_per_channel: bool
    noise_seed: int
    boxes: tuple[Box, ...]
    lines: tuple[Line, ...]
    question: str
    answer: str
    answer_box: Rect


def font_path() -> str:
    """DejaVu Sans Bold: matplotlib's bundled copy, else Debian's fonts-dejavu-core.

    Raises FileNotFoundError when neither is installed."""
    candidates = []
    try:
        import matplotlib

        candidates.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf"))
    except ImportError:
        pass
    candidates.append("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"DejaVuSans-Bold.ttf not found in {candidates}; install matplotlib or Debian's fonts-dejavu-core"
    )


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), size)


def _ink_offset(text: str, size: int) -> Rect:
    """(dx, dy, width, height): the ink of ``text`` drawn at origin (0, 0) spans [dx, dx + width) x [dy, dy + height)."""
    font = _font(size)
    pad = size
    left, top, right, bottom = font.getbbox(text)
    scratch = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(scratch).text((pad, pad), text, font=font, fill=255)
    x0, y0, x1, y1 = scratch.getbbox()
    return x0 - pad, y0 - pad, x1 - x0, y1 - y0


def _placed(text: str, size: int, colour: RGB, x: int, y: int) -> Text:
    """``text`` drawn so that its ink's top-left corner lands on (x, y)."""
    dx, dy, width, height = _ink_offset(text, size)
    return Text(text, size, colour, (x - dx, y - dy), (x, y, x + width, y + height))


def _dark(rng: random.Random) -> RGB:
    """Black or dark grey, possibly tinted: each channel 0-40."""
    if rng.random() < 0.5:
        level = rng.randint(0, TEXT_MAX)
        return (level, level, level)
    return tuple(rng.randint(0, TEXT_MAX) for _ in range(3))


def _jitter(colour: RGB, rng: random.Random) -> RGB:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in colour)


def _chars(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHARSET) for _ in range(n))


# --- box-codes ---------------------------------------------------------------------------------------------


def _apart(a: Rect, b: Rect) -> bool:
    """At least BOX_GAP background pixels between the two rectangles along x or along y."""
    return a[2] + BOX_GAP <= b[0] or b[2] + BOX_GAP <= a[0] or a[3] + BOX_GAP <= b[1] or b[3] + BOX_GAP <= a[1]


def _candidate(rng: random.Random, packed: bool, placed: list[Rect], w: int, h: int, size: tuple[int, int]) -> Rect:
    """A top-left corner for a ``w`` x ``h`` box: anywhere, or (packed) 8-16 px from a placed box or on an edge."""
    width, height = size
    if not packed or rng.random() < 0.15:
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    elif not placed or rng.random() < 0.25:  # against a canvas edge
        side = rng.choice("lrtb")
        x = {"l": 0, "r": width - w}.get(side, rng.randint(0, width - w))
        y = {"t": 0, "b": height - h}.get(side, rng.randint(0, height - h))
    else:  # next to a placed box, at a small gap, overlapping its span on the other axis
        x0, y0, x1, y1 = rng.choice(placed)
        gap = rng.randint(BOX_GAP, BOX_GAP + 8)
        side = rng.choice("lrtb")
        x = {"l": x0 - gap - w, "r": x1 + gap}.get(side, rng.randint(x0 - w + 1, x1 - 1))
        y = {"t": y0 - gap - h, "b": y1 + gap}.get(side, rng.randint(y0 - h + 1, y1 - 1))
        x, y = min(max(x, 0), width - w), min(max(y, 0), height - h)
    return (x, y, x + w, y + h)


def _box_codes(rng: random.Random) -> Scene:
    size = (rng.randint(*BOX_CANVAS), rng.randint(*BOX_CANVAS))
    if rng.random() < 0.5:  # near-neutral light grey or white
        level = rng.randint(*BOX_BACKGROUND)
        background = tuple(min(255, max(BOX_BACKGROUND[0], level + rng.randint(-3, 3))) for _ in range(3))
    else:  # any light tint
        background = tuple(rng.randint(*BOX_BACKGROUND) for _ in range(3))
    noise = rng.uniform(0.5, BOX_NOISE_MAX) if rng.random() < 0.5 else 0.0
    noise_per_channel = rng.random() < 0.5
    n = rng.randint(*BOX_COUNT)
    names = rng.sample(list(PALETTE), n)
    packed = rng.random() < 0.4
    boxes = None
    for _ in range(1000):  # a failed layout is redrawn whole: sizes, codes, positions
        boxes = _try_boxes(rng, names, size, packed)
        if boxes is not None:
            break
    if boxes is None:
        raise RuntimeError(f"no box-codes layout of {n} boxes on {size} after 1000 tries")
    target = rng.choice(boxes)
    return Scene(
        "box-codes", size, background, noise, noise_per_channel, rng.getrandbits(63), tuple(boxes), (),
        f"What is the code in the {target.name} box?", target.code.text, target.rect,
    )  # fmt: skip


def _try_boxes(rng: random.Random, names: list[str], size: tuple[int, int], packed: bool) -> list[Box] | None:
    placed: list[Rect] = []
    boxes = []
    for name in names:
        code, font_size = _chars(rng, CODE_LENGTH), rng.randint(*BOX_FONT)
        mx, my = rng.randint(*BOX_MARGIN), rng.randint(*BOX_MARGIN)
        _, _, text_w, text_h = _ink_offset(code, font_size)
        w, h = text_w + 2 * mx, text_h + 2 * my
        for _ in range(200):
            rect = _candidate(rng, packed, placed, w, h, size)
            if all(_apart(rect, other) for other in placed):
                break
        else:
            return None
        placed.append(rect)
        text = _placed(code, font_size, _dark(rng), rect[0] + mx, rect[1] + my)
        boxes.append(Box(name, _jitter(PALETTE[name], rng), rect, rng.randint(*BOX_THICKNESS), text))
    return boxes


# --- doc-fields --------------------------------------------------------------------------------------------


def _spread(rng: random.Random, total: int, slots: int) -> list[int]:
    """``total`` px split at random over ``slots`` (each ≥ 0, sum ≤ total): sometimes even, sometimes lumpy."""
    weights = [rng.expovariate(1.0) ** rng.choice((0.3, 1.0, 2.5)) for _ in range(slots)]
    scale = total / sum(weights)
    return [int(w * scale) for w in weights]


def _doc_fields(rng: random.Random) -> Scene:
    width, height = rng.randint(*DOC_WIDTH), rng.randint(*DOC_HEIGHT)
    page = (255, 255, 255) if rng.random() < 0.3 else tuple(rng.randint(DOC_PAGE_MIN, 255) for _ in range(3))
    n = rng.randint(*DOC_LINES)
    labels = rng.sample(LABELS, n)
    values = [_chars(rng, rng.randint(*VALUE_LENGTH)) for _ in labels]
    one_size = rng.randint(*DOC_FONT) if rng.random() < 0.5 else None
    sizes = [one_size or rng.randint(*DOC_FONT) for _ in labels]
    one_colour = _dark(rng) if rng.random() < 0.7 else None
    strings = [f"{label}: {value}" for label, value in zip(labels, values)]
    extents = [_ink_offset(s, size)[2:] for s, size in zip(strings, sizes)]

    # rows: ink heights plus 6 px between neighbours; some share of the rest spread over the n + 1 gaps
    free = height - sum(h for _, h in extents) - DOC_ROW_GAP * (n - 1)
    used = free if rng.random() < 0.3 else int(free * rng.random())
    extra = _spread(rng, used, n + 1)
    top = extra[0] + rng.randint(0, free - sum(extra))  # the block may sit anywhere on the page

    # left edges: one column, one column with indents, or each line anywhere it fits
    widest = max(w for w, _ in extents)
    style = rng.choice(("column", "indented", "free"))
    column = rng.randint(0, width - widest)
    lines = []
    y = top
    for i, (label, value, s, size, (w, h)) in enumerate(zip(labels, values, strings, sizes, extents)):
        if style == "column":
            x = column
        elif style == "indented":
            x = min(column + rng.choice((0, 0, rng.randint(8, 120))), width - w)
        else:
            x = rng.randint(0, width - w)
        lines.append(Line(label, value, _placed(s, size, one_colour or _dark(rng), x, y)))
        y += h + DOC_ROW_GAP + extra[i + 1]
    target = rng.choice(lines)
    return Scene(
        "doc-fields", (width, height), page, 0.0, False, 0, (), tuple(lines),
        f"What is the {target.label}?", target.value, target.text.ink,
    )  # fmt: skip


# --- public ------------------------------------------------------------------------------------------------


def layout(task: str, seed: int) -> Scene:
    """The scene of sample ``seed`` of ``task`` (deterministic by seed).

    Raises ValueError for a task not in `TASKS` and TypeError for a seed that is not an integer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(f"{task}|{int(seed)}")
    return _box_codes(rng) if task == "box-codes" else _doc_fields(rng)


def render(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``: background (plus noise), box outlines, then every text."""
    width, height = scene.size
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = scene.background
    if scene.noise > 0:
        noise_rng = np.random.default_rng(scene.noise_seed)
        shape = (height, width, 3) if scene.noise_per_channel else (height, width, 1)
        pixels += noise_rng.normal(0.0, scene.noise, shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for box in scene.boxes:
        x0, y0, x1, y1 = box.rect
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=box.colour, width=box.thickness)
    for text in [b.code for b in scene.boxes] + [line.text for line in scene.lines]:
        draw.text(text.origin, text.text, font=_font(text.size), fill=text.colour)
    return image


def generate(task: str, seed: int) -> dict:
    """One sample ``{"image": PIL RGB, "question", "answer", "answer_box": (x0, y0, x1, y1) px, "task"}``.

    Deterministic by ``seed``; see `layout` for the errors raised."""
    scene = layout(task, seed)
    return {
        "image": render(scene),
        "question": scene.question,
        "answer": scene.answer,
        "answer_box": scene.answer_box,
        "task": task,
    }


def samples(task: str, n: int, seed_start: int = SEED_START) -> list[dict]:
    """``n`` samples of ``task`` from seeds ``seed_start`` .. ``seed_start + n - 1`` (the evaluation range by
    default). Raises ValueError for a negative ``n``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate(task, seed_start + i) for i in range(n)]
