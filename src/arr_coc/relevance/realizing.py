"""Realizing: turn an allocation into the tokens the language model receives, with honest positions."""

from __future__ import annotations

import numpy as np
import torch

from .attending import Allocation


def cell_assignment(allocation: Allocation) -> tuple[torch.Tensor, torch.Tensor]:
    """Which output token each native token falls in, and each output token's centre.

    Returns (cell [h*w] long, centres [T', 2] float as (y, x) on the native grid), output tokens in
    raster order of their centres – at full detail everywhere, exactly the native raster order.
    """
    h, w = allocation.height, allocation.width
    cell = torch.empty(h, w, dtype=torch.long)
    centres = []
    for region in allocation.regions:
        rh, rw = region.y1 - region.y0, region.x1 - region.x0
        row_edges = [region.y0 + (i * rh) // region.k_h for i in range(region.k_h + 1)]
        col_edges = [region.x0 + (j * rw) // region.k_w for j in range(region.k_w + 1)]
        for i in range(region.k_h):
            for j in range(region.k_w):
                cell[row_edges[i] : row_edges[i + 1], col_edges[j] : col_edges[j + 1]] = len(centres)
                centres.append(((row_edges[i] + row_edges[i + 1] - 1) / 2, (col_edges[j] + col_edges[j + 1] - 1) / 2))
    centres_t = torch.tensor(centres, dtype=torch.float64)
    order = torch.from_numpy(np.lexsort((centres_t[:, 1].numpy(), centres_t[:, 0].numpy())))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank[cell.flatten()], centres_t[order].to(torch.float32)


class RelevanceRealizer:
    """Pools the visual tokens of every output cell, weighted by relevance (or plainly averaged).

    A full-detail token is passed on unchanged; a pooled token is sum(w_i v_i) / sum(w_i) over
    its cell with w = relevance, so the language model's loss reaches the relevance heads.
    """

    def __init__(self, pooling: str = "relevance"):
        self.pooling = pooling

    def __call__(self, features: list[torch.Tensor], allocation: Allocation, relevance: torch.Tensor,
                 pooling: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """features: tensors [h*w, d_k] pooled alike; relevance [h*w] ->
        (pooled tensors [T', d_k], positions [T', 2] as (y, x) centres on the native grid)."""
        cell, centres = cell_assignment(allocation)
        cell, centres = cell.to(relevance.device), centres.to(relevance.device)
        n_out = centres.shape[0]
        if n_out == cell.numel():  # all at full detail: the tokens pass through untouched
            order = torch.argsort(cell)
            return [x[order] for x in features], centres
        if (pooling or self.pooling) == "mean":
            weights = torch.ones_like(relevance, dtype=torch.float32)
        else:
            weights = relevance.float().clamp_min(1e-4)
        denominator = torch.zeros(n_out, device=weights.device).index_add_(0, cell, weights)
        # a cell of one token passes it on unchanged (not w * x / w)
        count = torch.zeros(n_out, device=cell.device).index_add_(0, cell, torch.ones_like(weights))
        single = (count[cell] == 1).nonzero().flatten()
        pooled = []
        for x in features:  # sums in fp32 whatever the backbone's dtype
            total = torch.zeros(n_out, x.shape[-1], device=x.device).index_add_(0, cell, x.float() * weights[:, None])
            out = (total / denominator[:, None]).to(x.dtype)
            out[cell[single]] = x[single]
            pooled.append(out)
        return pooled, centres
