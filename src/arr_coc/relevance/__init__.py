"""The relevance realization, along the data flow: knowing -> balancing -> attending -> realizing."""

from __future__ import annotations

import torch
from torch import nn

from .attending import (
    ALL_TOKENS,
    Allocation,
    BudgetCalculator,
    BudgetDecision,
    Region,
    TokenAllocator,
    budget_from_spec,
    budget_options,
    expand_gist,
    gist_grid,
    reads_full_resolution,
    resolve_budget,
    saccade_crops,
)
from .balancing import TensionBalancer
from .knowing import CouplingScorer, InformationScorer, SalienceScorer
from .realizing import RelevanceRealizer, cell_assignment


class RelevanceHeads(nn.Module):
    """The learnable parts: three scorers, the balancer and the budget head.

    Any head can be replaced by a module with the same call signature (see docs/training.md).
    """

    def __init__(self, visual_size: int, text_size: int, hidden_size: int, coupling_size: int, balance_weights):
        super().__init__()
        self.information = InformationScorer(visual_size, hidden_size)
        self.salience = SalienceScorer(visual_size, hidden_size)
        self.coupling = CouplingScorer(visual_size, text_size, coupling_size)
        self.balancer = TensionBalancer(text_size, hidden_size, balance_weights)
        self.budget = BudgetCalculator(text_size, hidden_size)

    def forward(self, tokens, grid: tuple[int, int], question, trained: bool, min_tokens: int, max_tokens: int,
                to_native=None):  # fmt: skip
        """tokens [h*w, d], question [m, d_text] -> (information, salience, coupling, relevance [h*w],
        balance weights [3], expected tokens []): knowing, then balancing, then the budget head.

        ``to_native``: maps a coarse grid's values to the native grid (a saccade's gist), so the budget
        head judges the image at the resolution its tokens are counted in."""
        info = self.information(tokens, grid, trained)
        salience = self.salience(tokens, grid, trained)
        coupling = self.coupling(tokens, question, trained)
        relevance, weights = self.balancer(torch.stack([info, salience, coupling]), question, trained)
        native = to_native(relevance) if to_native is not None else relevance
        expected = self.budget(native, question, min_tokens, max_tokens, trained)
        return info, salience, coupling, relevance, weights, expected


__all__ = [
    "ALL_TOKENS",
    "budget_from_spec", "budget_options",
    "Allocation", "BudgetCalculator", "BudgetDecision", "CouplingScorer", "InformationScorer", "Region",
    "RelevanceHeads", "RelevanceRealizer", "SalienceScorer", "TensionBalancer", "TokenAllocator",
    "cell_assignment", "expand_gist", "gist_grid", "reads_full_resolution", "resolve_budget", "saccade_crops",
]  # fmt: skip
