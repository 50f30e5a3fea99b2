"""How well arr-coc-tiny's backbone reads: exact match with every visual token, on the tasks' own held-out seeds
and under the conditions a real Qwen2-VL takes in its stride – the page resized before the processor, a crop
around the answer given as the whole image – and on samples of an independently written generator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.synthetic import EVAL_SEED_START, TASKS, generate, normalize_answer
from .data import collate, rescale_sample

VALID_SEED_START = 900_000_000  # validation during training: never trained on, not the held-out test seeds
SCALES = (0.85, 0.7, 0.5)  # the page resized by these factors (bicubic) before the processor
CROP_MARGIN = (28, 112)  # px of context around the answer's box, per side, for the crop condition


def crop_around_answer(sample: dict, seed: int, margin: tuple[int, int] = CROP_MARGIN) -> dict:
    """The sample's image cropped to its answer box plus a margin drawn per side from ``margin`` (px, seeded by
    ``seed``, clipped to the canvas); the answer box moves with it."""
    rng = np.random.default_rng([seed, 0xC40])
    W, H = sample["image"].size
    x0, y0, x1, y1 = sample["answer_box"]
    m = rng.integers(margin[0], margin[1] + 1, size=4)
    box = (max(0, x0 - int(m[0])), max(0, y0 - int(m[1])), min(W, x1 + int(m[2])), min(H, y1 + int(m[3])))
    out = dict(sample, image=sample["image"].crop(box))
    out["answer_box"] = (x0 - box[0], y0 - box[1], x1 - box[0], y1 - box[1])
    return out


def condition_samples(task: str, n: int, seeds_from: int = EVAL_SEED_START, scale: float = 1.0, crop: bool = False,
                      generator: Callable[[str, int], dict] = generate) -> list[dict]:  # fmt: skip
    """``n`` samples of ``task`` from ``generator`` under one condition: resized by ``scale`` and/or cropped around
    the answer (`crop_around_answer`)."""
    out = []
    for seed in range(seeds_from, seeds_from + n):
        sample = generator(task, seed)
        sample = crop_around_answer(sample, seed) if crop else sample
        out.append(rescale_sample(sample, scale) if scale != 1.0 else sample)
    return out


@torch.no_grad()
def evaluate_model(model, tokenizer, image_processor, n: int = 100, seeds_from: int = VALID_SEED_START,
                   device: str = "cpu", batch_size: int = 8, first: int | None = None, scale: float = 1.0,
                   crop: bool = False, generator: Callable[[str, int], dict] = generate) -> dict:  # fmt: skip
    """Exact match per task with all visual tokens (greedy decoding, the stock backbone) on `condition_samples`;
    with ``first``, also the exact match of the first ``first`` samples per task under ``"first_{first}"``."""
    model.eval()
    result, head = {}, {}
    for task in TASKS:
        samples = condition_samples(task, n, seeds_from, scale, crop, generator)
        correct = []
        for start in range(0, n, batch_size):
            chunk = samples[start : start + batch_size]
            batch = collate(chunk, tokenizer, image_processor, with_answers=False)
            batch.pop("labels")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=8, do_sample=False)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += [normalize_answer(t) == normalize_answer(s["answer"]) for t, s in zip(texts, chunk)]
        result[task] = sum(correct) / n
        if first:
            head[task] = sum(correct[:first]) / first
    return {**result, f"first_{first}": head} if first else result


def reading_report(model, tokenizer, image_processor, n: int = 200, first: int = 40, device: str = "cpu") -> dict:
    """Held-out exact match at full scale, at each of `SCALES`, on crops around the answer, and on the independently
    written generator's samples (`arr_coc.data.contract`): ``{condition: {task: accuracy, "first_40": {...}}}``.
    ``"first_40"`` is what the test suite's guards recompute."""
    from ..data import contract

    conditions = {
        "full": {},
        **{f"scale_{s}": {"scale": s} for s in SCALES},
        "crop": {"crop": True},
        "second_generator": {"generator": contract.generate, "seeds_from": contract.SEED_START},
    }
    return {
        name: evaluate_model(
            model,
            tokenizer,
            image_processor,
            n=n,
            device=device,
            first=first,
            **{"seeds_from": EVAL_SEED_START, **options},
        )  # fmt: skip
        for name, options in conditions.items()
    }
