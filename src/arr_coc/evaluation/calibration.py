"""How well the automatic budget is calibrated: per sample, whether its answer survives at a ladder of budgets (the
smallest surviving one is what the budget head should predict), the automatic budget's own tokens and answer, and
the rank agreement of the two (Spearman's rho).

    calibration = measure_calibration(model, processor, samples)
    calibration.spearman()        # the automatic budget against each sample's smallest surviving budget
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.synthetic import normalize_answer
from ..relevance import RealizationRequest
from .harness import Batch, Harness

LADDER = (1, 2, 4, 8, 16, 32)  # compression ratios: native, 1/2, ... 1/32


@dataclass
class Calibration:
    """Per sample: ``natives`` (N), ``survives`` (per ratio of ``ladder``: the greedy answer at ceil(N / ratio)
    tokens is right), ``auto_tokens`` / ``auto_correct`` (the automatic budget's tokens used and answer)."""

    ladder: tuple[int, ...]
    natives: list[int]
    survives: list[list[bool]]
    auto_tokens: list[int]
    auto_correct: list[bool]

    def smallest_surviving(self) -> list[int | None]:
        """Per sample the fewest ladder tokens at which its answer survives (None: at none of them)."""
        out = []
        for n, row in zip(self.natives, self.survives):
            tokens = [math.ceil(n / r) for r, ok in zip(self.ladder, row) if ok]
            out.append(min(tokens) if tokens else None)
        return out

    def spearman(self) -> tuple[float, int]:
        """(rho, n): Spearman's rank correlation of the automatic budget's tokens with the smallest surviving
        budget, over the n samples that survive somewhere; NaN when either side is constant."""
        pairs = [(a, s) for a, s in zip(self.auto_tokens, self.smallest_surviving()) if s is not None]
        if len(pairs) < 2:
            return math.nan, len(pairs)
        a, s = (rank_average(v) for v in zip(*pairs))
        if a.std() == 0 or s.std() == 0:
            return math.nan, len(pairs)
        return float(np.corrcoef(a, s)[0, 1]), len(pairs)


def rank_average(values) -> np.ndarray:
    """Ranks 0..n-1 of ``values``, ties sharing their mean rank."""
    x = np.asarray(values, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, ranks) / counts)[inverse]


@torch.no_grad()
def measure_calibration(model, processor, samples: list[dict], ladder: tuple[int, ...] = LADDER,
                        batch_size: int = 8, mode: str = "trained") -> Calibration:  # fmt: skip
    """Greedy answers of ``samples`` (``{"image", "question", "answer"}``) at every compression of ``ladder`` and at
    the automatic budget (``mode``'s heads and rule), each image encoded once."""
    harness = Harness(model, processor)
    natives, survives, auto_tokens, auto_correct = [], [], [], []
    for start in range(0, len(samples), batch_size):
        batch = Batch(harness, samples[start : start + batch_size])
        rows = [_right(harness, batch, RealizationRequest(compression=float(r), encoding="single", mode=mode))[0]
                for r in ladder]  # fmt: skip
        hits, used = _right(harness, batch, RealizationRequest(encoding="single", mode=mode))
        natives += batch.natives
        survives += [list(row) for row in zip(*rows)]
        auto_tokens += [int(t) for t in used]
        auto_correct += hits
    return Calibration(tuple(ladder), natives, survives, auto_tokens, auto_correct)


def _right(harness: Harness, batch: Batch, request: RealizationRequest) -> tuple[list[bool], list[int]]:
    """Per sample of ``batch``: is its greedy answer under ``request`` right, and the visual tokens it used."""
    answers = harness.generate(batch.compress(request))
    hits = [normalize_answer(t) == normalize_answer(s["answer"]) for t, s in zip(answers.texts, batch.samples)]
    return hits, answers.tokens_used
