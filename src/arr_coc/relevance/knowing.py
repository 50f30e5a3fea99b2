"""Knowing: three scores per visual token, each in [0, 1].

InformationScorer – what is there; SalienceScorer – what stands out; CouplingScorer – what the
question needs. Each has a training-free rule and a learnable head (used when ``trained``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] (a constant map becomes all zeros)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def local_mean(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean of each token's 3 x 3 neighbourhood on the grid: [h*w, d] -> [h*w, d]."""
    h, w = grid
    maps = tokens.unflatten(0, (h, w)).permute(2, 0, 1).unsqueeze(0)  # [1, d, h, w]
    pooled = F.avg_pool2d(maps, 3, stride=1, padding=1, count_include_pad=False)
    return pooled[0].permute(1, 2, 0).contiguous().flatten(0, 1)


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, 1))


class InformationScorer(nn.Module):
    """Training-free: distance of each token from the image's median token (the background)."""

    def __init__(self, visual_size: int, hidden_size: int):
        super().__init__()
        self.head = _mlp(visual_size, hidden_size)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], trained: bool) -> torch.Tensor:
        """tokens [h*w, d] -> info [h*w]."""
        if trained:
            return torch.sigmoid(self.head(tokens).squeeze(-1))
        return min_max((tokens - tokens.median(dim=0).values).norm(dim=-1))


class SalienceScorer(nn.Module):
    """Training-free: centre-surround contrast, the distance of a token from its 3 x 3 neighbourhood."""

    def __init__(self, visual_size: int, hidden_size: int):
        super().__init__()
        self.head = _mlp(2 * visual_size, hidden_size)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], trained: bool) -> torch.Tensor:
        """tokens [h*w, d] -> salience [h*w]."""
        contrast = tokens - local_mean(tokens, grid)
        if trained:
            return torch.sigmoid(self.head(torch.cat([tokens, contrast], dim=-1)).squeeze(-1))
        return min_max(contrast.norm(dim=-1))


class CouplingScorer(nn.Module):
    """Training-free: the best cosine similarity between a token and any question token.

    Learned: a bilinear match in a shared space of ``coupling_size``, smooth-maxed over the
    question's tokens, then read in context: a two-layer convolution over the token grid (each layer
    ``CONTEXT_KERNEL`` tokens, rows by columns; 5 x 13 tokens together) sees the match map with
    ``CONTEXT_FEATURES`` channels of each token's projection and adds a correction to every token's
    match. So a token can be needed for what its neighbours show – the value beside the label a
    question names, the code inside the outline of the box it names – which a per-token match cannot
    express. The correction's last layer starts at zero: heads saved before it existed score as they did.
    With no question tokens every token gets the same score.
    """

    CONTEXT_KERNEL = (3, 7)
    CONTEXT_FEATURES = 8
    CONTEXT_HIDDEN = 16

    def __init__(self, visual_size: int, text_size: int, coupling_size: int):
        super().__init__()
        self.visual_proj = nn.Sequential(nn.LayerNorm(visual_size), nn.Linear(visual_size, coupling_size))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_size), nn.Linear(text_size, coupling_size))
        self.bias = nn.Parameter(torch.zeros(()))
        kh, kw = self.CONTEXT_KERNEL
        self.context_features = nn.Linear(coupling_size, self.CONTEXT_FEATURES)
        self.context = nn.Sequential(
            nn.Conv2d(1 + self.CONTEXT_FEATURES, self.CONTEXT_HIDDEN, (kh, kw), padding=(kh // 2, kw // 2)),
            nn.GELU(),
            nn.Conv2d(self.CONTEXT_HIDDEN, 1, (kh, kw), padding=(kh // 2, kw // 2)),
        )
        self.context[-1].starts_at_zero = True  # read by `ArrCocPreTrainedModel._init_weights` as well
        nn.init.zeros_(self.context[-1].weight)
        nn.init.zeros_(self.context[-1].bias)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], question: torch.Tensor, trained: bool
    ) -> torch.Tensor:
        """tokens [h*w, d] on a grid (h, w), question [m, d_text] -> coupling [h*w] (a `torch.Tensor`)."""
        if question.shape[0] == 0:
            return (torch.sigmoid(self.bias) if trained else tokens.new_zeros(())).expand(tokens.shape[0])
        if trained:
            keys, queries = self.visual_proj(tokens), self.text_proj(question)
            logits = queries @ keys.T / math.sqrt(keys.shape[-1])  # [m, n]
            count = torch.ones_like(logits[:, :1]).sum(0)  # m, as a tensor (exportable with a dynamic m)
            match = torch.logsumexp(logits, dim=0) - torch.log(count)  # [n]
            maps = torch.cat([match[:, None], self.context_features(keys)], dim=-1)  # [n, 1 + features]
            maps = maps.unflatten(0, grid).permute(2, 0, 1).unsqueeze(0)  # [1, 1 + features, h, w]
            return torch.sigmoid(match + self.context(maps).flatten() + self.bias)
        similarity = F.normalize(question, dim=-1) @ F.normalize(tokens, dim=-1).T
        return min_max(similarity.max(dim=0).values)
