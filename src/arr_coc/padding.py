"""Left padding: the one rule for every batch the language model reads (the processor's token rows, the model's
compressed rows, a baseline's pruned rows), so the last prompt token of every sample sits in the last column."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[torch.Tensor], value: float | int | bool = 0, length: int | None = None) -> torch.Tensor:
    """Stack rows of different lengths, each right-aligned and padded on the left with ``value``.

    ``rows``: tensors [n_i, *rest] of one dtype and device (at least one row) -> [len(rows), length, *rest], where
    ``length`` defaults to the longest n_i. Raises `ValueError` when a row is longer than ``length``.
    """
    length = max(row.shape[0] for row in rows) if length is None else length
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for b, row in enumerate(rows):
        n = row.shape[0]
        if n > length:
            raise ValueError(f"row {b} has {n} entries, more than the padded length {length}")
        out[b, length - n :] = row
    return out
