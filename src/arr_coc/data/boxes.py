"""Answer boxes on the merged grid: how much of each visual token's cell a sample's ``answer_box`` covers (the
localisation objective's target and the evaluation's localisation measure), and the allocation a perfect relevance
map would get (`oracle_allocation`, the evaluation's upper bound)."""

from __future__ import annotations

import torch

from ..relevance.attending import Allocation, TokenAllocator


def box_overlap_map(box, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """[h, w]: the fraction of each merged-grid token's cell covered by ``box`` (x0, y0, x1, y1 in image pixels)."""
    width, height = image_size
    h, w = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = torch.arange(w + 1, dtype=torch.float32) * width / w
    ys = torch.arange(h + 1, dtype=torch.float32) * height / h
    ox = (torch.minimum(xs[1:], torch.tensor(x1)) - torch.maximum(xs[:-1], torch.tensor(x0))).clamp_min(0) / (width / w)
    oy = (torch.minimum(ys[1:], torch.tensor(y1)) - torch.maximum(ys[:-1], torch.tensor(y0))).clamp_min(0) / (
        height / h
    )
    return (oy[:, None] * ox[None, :]).clamp(0.0, 1.0)


def oracle_allocation(allocator: TokenAllocator, box, image_size: tuple[int, int], grid: tuple[int, int],
                      budget: int) -> Allocation:  # fmt: skip
    """The allocation a perfect relevance map gets (docs/design.md, "oracle"): relevance 1 on every merged-grid token
    ``box`` (x0, y0, x1, y1 in image pixels) touches and 0 elsewhere, through ``allocator`` (the model's
    `TokenAllocator`) at ``budget`` tokens under the budget rules (clipped to native; below the allocator's floor
    `ValueError`). Pass it as ``allocation=`` to realize it; an upper bound in evaluation, never a method to pick."""
    h, w = grid
    relevance = (box_overlap_map(box, image_size, grid) > 0).float().flatten()
    return allocator.decide(relevance, h, w, expected_tokens=budget, min_tokens=1, max_tokens=budget, budget=budget)[0]
