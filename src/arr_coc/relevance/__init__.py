"""The relevance realization, along the data flow: knowing -> balancing -> attending -> realizing
(`knowing`, `balancing`, `attending`, `realizing` – with the realize protocol every encoding and baseline
follows), and the saccade's own room (`saccade`: the gist, the crops, the native grid they fill)."""

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
    resolve_budget,
    shape_relevance,
)
from .balancing import TensionBalancer
from .knowing import CouplingScorer, InformationScorer, SalienceScorer
from .realizing import (
    ENCODINGS,
    MODES,
    POOLINGS,
    ImageRequest,
    Realization,
    RealizationRequest,
    Realize,
    RelevanceMaps,
    RelevanceRealization,
    RelevanceRealizer,
    cell_assignment,
    realize_allocation,
)
from .saccade import (
    PatchGeometry,
    expand_gist,
    expand_maps,
    gist_grid,
    native_features,
    reads_full_resolution,
    saccade_crops,
)


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

    def maps(self, tokens: torch.Tensor, grid: tuple[int, int], question: torch.Tensor, trained: bool) -> RelevanceMaps:
        """tokens [h*w, d], question [m, d_text] -> the three knowing maps and relevance [h*w] with the balance
        weights [3]: knowing, then balancing."""
        info = self.information(tokens, grid, trained)
        salience = self.salience(tokens, grid, trained)
        coupling = self.coupling(tokens, grid, question, trained)
        relevance, weights = self.balancer(torch.stack([info, salience, coupling]), question, trained)
        return RelevanceMaps(info, salience, coupling, relevance, weights)

    def forward(self, tokens, grid: tuple[int, int], question, trained: bool, confidence: float):
        """tokens [h*w, d], question [m, d_text] -> (information, salience, coupling, relevance [h*w],
        balance weights [3], expected tokens [] at survival probability ``confidence``): knowing, then balancing,
        then the budget head – the heads as one module (what `export.export_heads` exports)."""
        m = self.maps(tokens, grid, question, trained)
        expected = self.budget(m.relevance, question, trained, confidence)
        return m.information, m.salience, m.coupling, m.relevance, m.balance_weights, expected


__all__ = [
    "ALL_TOKENS", "ENCODINGS", "MODES", "POOLINGS",
    "Allocation", "BudgetCalculator", "BudgetDecision", "CouplingScorer", "ImageRequest", "InformationScorer",
    "PatchGeometry", "Realization", "RealizationRequest", "Realize", "Region", "RelevanceHeads", "RelevanceMaps",
    "RelevanceRealization", "RelevanceRealizer", "SalienceScorer", "TensionBalancer", "TokenAllocator",
    "budget_from_spec", "budget_options", "cell_assignment", "expand_gist", "expand_maps", "gist_grid",
    "native_features", "reads_full_resolution", "realize_allocation", "resolve_budget", "saccade_crops", "shape_relevance",
]  # fmt: skip
