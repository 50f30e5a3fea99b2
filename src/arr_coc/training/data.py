"""Batches for training: image + question + answer examples -> processor outputs with answer-only labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VQACollator:
    """Collates ``{"image", "question", "answer"}`` examples (the synthetic tasks' and the VQA adapters'
    schema) into a left-padded batch whose ``labels`` cover the answer and its end-of-turn token only;
    an ``answer_box`` (x0, y0, x1, y1 pixels) is passed on with the image size for localisation."""

    processor: object

    def __call__(self, examples: list[dict]) -> dict:
        images = [e["image"].convert("RGB") if hasattr(e["image"], "convert") else e["image"] for e in examples]
        batch = dict(
            self.processor(
                images=images, text=[e["question"] for e in examples], answers=[e["answer"] for e in examples]
            )
        )
        if any(e.get("answer_box") is not None for e in examples):
            # the localisation objective's input: the box in image pixels (-1 where a sample has none)
            batch["answer_box"] = torch.tensor(
                [list(e["answer_box"]) if e.get("answer_box") is not None else [-1] * 4 for e in examples],
                dtype=torch.float32,
            )
            batch["image_size"] = torch.tensor([list(getattr(img, "size", (0, 0))) for img in images], dtype=torch.long)
        return batch
