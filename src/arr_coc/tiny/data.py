"""What arr-coc-tiny's backbone trains on: the synthetic tasks cropped and rescaled per curriculum stage, pages of
random words, and the dense targets the renderer's layout gives: characters (per 14-px patch and per merged token,
from the glyph boxes) and box outlines' colours (per merged token, from box-codes' drawn boxes).

Every step's samples are deterministic by (stage, step, seed), so a resumed run sees the same data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.boxes import box_overlap_map
from ..data.synthetic import PALETTE, TASKS, dark_colour, draw_text, font_at, generate
from ..padding import left_pad
from ..processing_arr_coc import chat_prompt
from .model import GLYPH_CHARS, GROUPS, IGNORE, MAX_INDEX, SLOT_COLS, SLOT_ROWS


@dataclass(frozen=True)
class Stage:
    p_full: float  # probability of the whole canvas (else a crop around the answer box)
    max_margin: int  # largest crop margin in px
    batch_size: int
    lm_weight: float  # the answer's language-model loss (0: vision only)
    notes: str  # what the stage teaches (the model card's stage table)
    min_scale: float = 1.0  # native dynamic resolution: each image resized by a random factor in [min_scale, 1]
    p_unscaled: float = 1.0  # probability of keeping the image's own scale
    cached: bool = False  # vision encoder frozen: the language model trains on a pool encoded once (`cached`)


# A stage's place in this dict seeds its data (`batch_samples`): new stages go at the end.
STAGES = {
    "sheets": Stage(0.0, 0, 8, 0.0, "pages of random words: characters per 14-px patch and per token (no question yet)"),
    "glyphs": Stage(0.0, 28, 32, 1.0, "tight crops around the answer's box/line: reading the code in order"),
    "crops": Stage(0.1, 224, 16, 1.0, "crops with up to 224 px of context, 10% whole images"),
    "full": Stage(0.6, 448, 8, 1.0, "whole images 60% of the time, crops with up to 448 px of context otherwise"),
    "native": Stage(
        0.6, 448, 16, 1.0,
        "native dynamic resolution: whole images 60% of the time, else crops with up to 448 px of context given "
        "as the image; 65% of images resized by a random factor in [0.45, 1] (glyphs down to ~8 px)",
        min_scale=0.45, p_unscaled=0.35,
    ),
    "select": Stage(
        0.8, 448, 16, 1.0,
        "the language model alone on a pool encoded once (vision frozen): finding the named box or line, whole "
        "images 80% of the time, 60% of images resized by a random factor in [0.45, 1]",
        min_scale=0.45, p_unscaled=0.4, cached=True,
    ),
    "reading": Stage(
        0.0, 224, 32, 1.0,
        "reading where it is cheap: crops with up to 224 px of context around the answer, given as the image, 65% "
        "resized by a random factor in [0.45, 1] (no whole pages: their attention is most of a `native` step)",
        min_scale=0.45, p_unscaled=0.35,
    ),
}  # fmt: skip

RESAMPLING = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)


def rescale_sample(sample: dict, scale: float, resample: int = Image.Resampling.BICUBIC) -> dict:
    """The sample with its image resized by ``scale`` (at least 28 px a side), boxes and glyphs scaled alike."""
    image: Image.Image = sample["image"]
    W, H = image.size
    size = (max(28, round(W * scale)), max(28, round(H * scale)))
    sx, sy = size[0] / W, size[1] / H
    out = dict(sample)
    out["image"] = image.resize(size, resample)
    if sample.get("answer_box") is not None:
        x0, y0, x1, y1 = sample["answer_box"]
        out["answer_box"] = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
    if "glyphs" in sample:
        out["glyphs"] = [(ch, gx0 * sx, gy0 * sy, gx1 * sx, gy1 * sy, group, index)
                         for ch, gx0, gy0, gx1, gy1, group, index in sample["glyphs"]]  # fmt: skip
    if "items" in sample:
        out["items"] = [moved(item, 0, 0, sx, sy) for item in sample["items"]]
    return out


def moved(item: dict, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> dict:
    """A layout item (`data.synthetic.generate`'s ``items``) with its box shifted by (-dx, -dy), then scaled by
    (sx, sy); a box outline's thickness scales with the mean of the two."""
    x0, y0, x1, y1 = item["box"]
    out = dict(item, box=((x0 - dx) * sx, (y0 - dy) * sy, (x1 - dx) * sx, (y1 - dy) * sy))
    if "thickness" in item:
        out["thickness"] = item["thickness"] * (sx + sy) / 2
    return out


def random_scale(sample: dict, rng: np.random.Generator, spec: Stage) -> dict:
    """Native dynamic resolution: keep the sample's scale with probability ``p_unscaled``, else resize it by a
    factor drawn uniformly from [min_scale, 1] with a random resampling filter."""
    if spec.min_scale >= 1.0 or rng.random() < spec.p_unscaled:
        return sample
    scale = float(rng.uniform(spec.min_scale, 1.0))
    return rescale_sample(sample, scale, RESAMPLING[int(rng.integers(0, len(RESAMPLING)))])


def crop_sample(sample: dict, rng: np.random.Generator, p_full: float, max_margin: int) -> dict:
    """Crop the canvas around the answer box with random margins (or keep it whole)."""
    image: Image.Image = sample["image"]
    if rng.random() < p_full:
        return sample
    W, H = image.size
    x0, y0, x1, y1 = sample["answer_box"]
    m = rng.integers(0, max_margin + 1, size=4)
    cx0, cy0 = max(0, x0 - int(m[0])), max(0, y0 - int(m[1]))
    cx1, cy1 = min(W, x1 + int(m[2])), min(H, y1 + int(m[3]))
    # At least 56 px each way (the processor's minimum), grown inside the canvas.
    for lo, hi, size in ((0, 2, W), (1, 3, H)):
        box = [cx0, cy0, cx1, cy1]
        short = 56 - (box[hi] - box[lo])
        if short > 0:
            box[lo] = max(0, box[lo] - short // 2 - 1)
            box[hi] = min(size, box[lo] + 56)
            box[lo] = box[hi] - 56
        cx0, cy0, cx1, cy1 = box
    out = dict(sample)
    out["image"] = image.crop((cx0, cy0, cx1, cy1))
    out["answer_box"] = (x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0)
    glyphs = []
    for ch, gx0, gy0, gx1, gy1, group, index in sample["glyphs"]:
        inside = gx0 >= cx0 and gy0 >= cy0 and gx1 <= cx1 and gy1 <= cy1
        touches = gx1 > cx0 and gy1 > cy0 and gx0 < cx1 and gy0 < cy1
        if touches:
            glyphs.append((ch, gx0 - cx0, gy0 - cy0, gx1 - cx0, gy1 - cy0, group, index if inside else None))
    out["glyphs"] = glyphs
    if "items" in sample:
        out["items"] = [moved(item, cx0, cy0) for item in sample["items"]]
    return out


def dense_targets(glyphs, size: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """[h*w, 12, 3] (char, index, group) class targets per merged token (h, w: the patch grid halved).

    A token's slots are its upper and lower half, each holding up to 6 characters in left-to-right
    order (those whose ink centre falls there): reading order, not sub-pixel position. A half that
    touches a glyph cut by a crop is ignored.
    """
    W, H = size
    gh, gw = grid_hw  # patch grid (14 px)
    sx, sy = gw * 14 / W, gh * 14 / H
    th, tw = gh // 2, gw // 2
    targets = torch.empty(th * tw, SLOT_ROWS * SLOT_COLS, 3, dtype=torch.long)
    targets[..., 0] = len(GLYPH_CHARS)
    targets[..., 1] = MAX_INDEX + 1
    targets[..., 2] = len(GROUPS)
    halves: dict[tuple[int, int], list] = {}
    for ch, x0, y0, x1, y1, group, index in glyphs:
        cx, cy = (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy
        # a glyph cut by the crop may have its centre outside the image: it marks the edge token's half
        cx, cy = min(max(cx, 0.0), tw * 28 - 1e-3), min(max(cy, 0.0), th * 28 - 1e-3)
        token = int(cy // 28) * tw + int(cx // 28)
        half = min(int((cy % 28) // 14), SLOT_ROWS - 1)
        halves.setdefault((token, half), []).append((cx, ch, group, index))
    for (token, half), chars in halves.items():
        slots = slice(half * SLOT_COLS, (half + 1) * SLOT_COLS)
        if len(chars) > SLOT_COLS or any(index is None for *_, index in chars):
            targets[token, slots] = IGNORE
            continue
        for k, (_, ch, group, index) in enumerate(sorted(chars, key=lambda c: c[0])):
            group_class = GROUPS.index(group) if group is not None else len(GROUPS)
            targets[token, half * SLOT_COLS + k] = torch.tensor(
                [GLYPH_CHARS.index(ch), index if index >= 0 else MAX_INDEX, group_class]
            )
    return targets


def outline_targets(items: list[dict], size: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """[(gh // 2) * (gw // 2)] per merged token (28 x 28 px of the image as the processor resized it to the patch
    grid): the palette index (`data.spec.PALETTE` order) of the box outline covering the most of the token, if it
    covers at least ``OUTLINE_MIN_AREA`` px² of its 784 (in those resized px), else ``len(PALETTE)`` ("none").

    ``items``: the sample's layout items (box-codes' boxes carry ``colour`` and ``thickness``; others are skipped);
    ``size``: the image's (W, H) in px; ``grid_hw``: its 14-px patch grid (gh, gw). A box's outline is its rectangle
    less the rectangle ``thickness`` px inside it (each a `data.boxes.box_overlap_map`); the part of a box a crop
    cut off counts for nothing.
    """
    grid = (grid_hw[0] // 2, grid_hw[1] // 2)
    best = torch.full(grid, OUTLINE_MIN_AREA / 28**2)
    labels = torch.full(grid, len(PALETTE), dtype=torch.long)
    for item in items:
        if "colour" not in item:
            continue
        (x0, y0, x1, y1), t = item["box"], item["thickness"]
        ring = box_overlap_map(item["box"], size, grid) - box_overlap_map((x0 + t, y0 + t, x1 - t, y1 - t), size, grid)
        wins = ring >= best
        best = torch.where(wins, ring, best)
        labels[wins] = list(PALETTE).index(item["colour"])
    return labels.reshape(-1)


OUTLINE_MIN_AREA = 24.0  # px² of a token's 784: a 3-px outline along 8 px of it


def collate(samples: list[dict], tokenizer, image_processor, with_answers: bool = True) -> dict:
    """A left-padded batch (`padding.left_pad`, the one rule for every batch the language model reads): prompt and,
    ``with_answers``, the answer with its labels; the dense targets (characters, box outlines) when the samples carry
    glyphs."""
    vis = image_processor([s["image"] for s in samples], return_tensors="pt")
    grid = vis["image_grid_thw"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows, labels, dense, patches, outlines = [], [], [], [], []
    for s, (_, gh, gw) in zip(samples, grid.tolist()):
        n = gh * gw // 4
        prompt = chat_prompt(s["question"]).replace("<|image_pad|>", "<|image_pad|>" * n)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        lab = [IGNORE] * len(ids)
        if with_answers:
            ans = tokenizer(s["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids, lab = ids + ans, lab + ans
        rows.append(torch.tensor(ids))
        labels.append(torch.tensor(lab))
        if "glyphs" in s:
            dense.append(dense_targets(s["glyphs"], s["image"].size, (gh, gw)))
            patches.append(patch_targets(s["glyphs"], s["image"].size, (gh, gw)))
            outlines.append(outline_targets(s.get("items", []), s["image"].size, (gh, gw)))
    input_ids = left_pad(rows, tokenizer.pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": left_pad([torch.ones_like(r) for r in rows], 0),
        "mm_token_type_ids": (input_ids == image_id).int(),
        "pixel_values": vis["pixel_values"],
        "image_grid_thw": grid,
        "labels": left_pad(labels, IGNORE),
    }
    if dense:
        batch["dense_targets"], batch["patch_targets"] = torch.cat(dense), torch.cat(patches)
        batch["outline_targets"] = torch.cat(outlines)
    return batch


def glyph_sheet(rng: np.random.Generator) -> dict:
    """A page of random words from the tasks' glyph set (rows of 16-26 px text), for learning to read."""
    width, height = (int(v) for v in rng.integers(224, 449, size=2))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(225, 256, size=3)))
    draw = ImageDraw.Draw(image)
    glyphs, y = [], int(rng.integers(2, 12))
    while True:
        size = int(rng.integers(16, 27))
        font = font_at(size)
        top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
        if y + bottom - top + 2 > height:
            break
        x = int(rng.integers(0, 20))
        while x < width - 30:
            word = "".join(GLYPH_CHARS[i] for i in rng.integers(0, len(GLYPH_CHARS), size=int(rng.integers(2, 9))))
            advance = font.getlength(word)
            if x + advance > width - 2:
                break
            glyphs += draw_text(draw, (x, y - top), word, size, dark_colour(rng), None, 0)
            x += int(advance) + int(rng.integers(6, 40))
        y += bottom - top + int(rng.integers(6, 20))
    return {"image": image, "question": "What is written?", "answer": "", "answer_box": None, "task": "sheet",
            "glyphs": [(g.char, *(int(round(v)) for v in g.box), g.group, g.index) for g in glyphs]}  # fmt: skip


def patch_targets(glyphs, size: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """[gh*gw] per 14-px patch, in the processor's patch order: the character covering most of the patch
    (at least a quarter of its ink box inside the patch), else "none"; a glyph cut by a crop: ignored."""
    W, H = size
    gh, gw = grid_hw
    sx, sy = gw * 14 / W, gh * 14 / H
    best = torch.zeros(gh, gw)
    labels = torch.full((gh, gw), len(GLYPH_CHARS), dtype=torch.long)
    for ch, x0, y0, x1, y1, _, index in glyphs:
        X0, X1, Y0, Y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        area = max((X1 - X0) * (Y1 - Y0), 1.0)
        for r in range(max(0, int(Y0 // 14)), min(gh, int(Y1 // 14) + 1)):
            for c in range(max(0, int(X0 // 14)), min(gw, int(X1 // 14) + 1)):
                overlap = max(0.0, min(X1, (c + 1) * 14) - max(X0, c * 14)) * max(
                    0.0, min(Y1, (r + 1) * 14) - max(Y0, r * 14)
                )
                if overlap / area >= 0.25 and overlap > best[r, c]:
                    best[r, c] = overlap
                    labels[r, c] = IGNORE if index is None else GLYPH_CHARS.index(ch)
    return labels.view(gh // 2, 2, gw // 2, 2).permute(0, 2, 1, 3).reshape(-1)


def batch_samples(stage: str, step: int, batch_size: int, seed: int) -> list[dict]:
    """The samples of one step: deterministic by (stage, step, seed), tasks alternating."""
    spec = STAGES[stage]
    rng = np.random.default_rng([seed, list(STAGES).index(stage), step])
    if stage == "sheets":
        return [glyph_sheet(rng) for _ in range(batch_size)]
    samples = []
    for i in range(batch_size):
        task = TASKS[(step * batch_size + i) % 2]
        sample_seed = int(rng.integers(0, 500_000_000))
        sample = crop_sample(generate(task, sample_seed, layout=True), rng, spec.p_full, spec.max_margin)
        samples.append(random_scale(sample, rng, spec))
    return samples


class StepBatches(torch.utils.data.IterableDataset):
    """Collated batches of steps ``[start, stop)``, built in a worker process ahead of the model."""

    def __init__(self, stage: str, start: int, stop: int, batch_size: int, seed: int, tokenizer, image_processor):
        super().__init__()
        self.args = (stage, start, stop, batch_size, seed)
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __iter__(self):
        stage, start, stop, batch_size, seed = self.args
        worker = torch.utils.data.get_worker_info()
        # Worker k builds steps start+k, start+k+n, ...; the loader reads workers round-robin, so steps stay in order.
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(start + first, stop, stride):
            yield collate(batch_samples(stage, step, batch_size, seed), self.tokenizer, self.image_processor)
