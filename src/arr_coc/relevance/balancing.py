"""Balancing: mix the three knowing maps into one relevance map, weighted by the question."""

from __future__ import annotations

import torch
from torch import nn


class TensionBalancer(nn.Module):
    """relevance = w_info * info + w_salience * salience + w_coupling * coupling, weights summing to 1.

    Training-free: the fixed ``balance_weights`` of the config. Learned: the weights come from the
    question (a softmax over an MLP of its mean token), so "what is the code in the red box" can lean on
    coupling while a question with no anchor leans on information and salience.
    """

    def __init__(self, text_size: int, hidden_size: int, default_weights: list[float]):
        super().__init__()
        # a plain tuple, not a buffer: from_pretrained builds models on the meta device and would leave a
        # non-persistent buffer uninitialised
        total = float(sum(default_weights))
        self.default_weights = tuple(float(w) / total for w in default_weights)
        self.head = nn.Sequential(
            nn.LayerNorm(text_size), nn.Linear(text_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 3)
        )

    def forward(self, scores: torch.Tensor, question: torch.Tensor, trained: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [3, n] (info, salience, coupling), question [m, d_text] -> (relevance [n], weights [3])."""
        if trained and question.shape[0] > 0:
            weights = torch.softmax(self.head(question.mean(dim=0)), dim=-1)
        else:
            weights = scores.new_tensor(self.default_weights)
        return (weights[:, None] * scores).sum(dim=0).clamp(0.0, 1.0), weights
