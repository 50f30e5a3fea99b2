"""The relevance realization, along the data flow: knowing -> balancing -> attending -> realizing."""

from __future__ import annotations

from torch import nn

from .attending import Allocation, BudgetCalculator, BudgetDecision, Region, TokenAllocator, resolve_budget
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


__all__ = [
    "Allocation", "BudgetCalculator", "BudgetDecision", "CouplingScorer", "InformationScorer", "Region",
    "RelevanceHeads", "RelevanceRealizer", "SalienceScorer", "TensionBalancer", "TokenAllocator",
    "cell_assignment", "resolve_budget",
]  # fmt: skip
