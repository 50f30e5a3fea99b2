"""Batches for training: image + question + answer examples -> processor outputs with answer-only labels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VQACollator:
    """Collates ``{"image", "question", "answer"}`` examples (the synthetic tasks' and the VQA adapters'
    schema) into a left-padded batch whose ``labels`` cover the answer and its end-of-turn token only."""

    processor: object

    def __call__(self, examples: list[dict]) -> dict:
        return dict(
            self.processor(
                images=[e["image"] for e in examples],
                text=[e["question"] for e in examples],
                answers=[e["answer"] for e in examples],
            )
        )
