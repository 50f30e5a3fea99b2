"""The knowing scorers: the coupling scorer's context correction (what a token's neighbours show)."""

from __future__ import annotations

import math

import pytest
import torch

from arr_coc.relevance import CouplingScorer


def _scorer(seed: int, trained_context: bool) -> CouplingScorer:
    torch.manual_seed(seed)
    scorer = CouplingScorer(visual_size=12, text_size=10, coupling_size=8)
    if trained_context:  # as after training: the output layer no longer zero
        torch.nn.init.normal_(scorer.context[-1].weight, std=0.5)
    return scorer.eval()


def test_a_new_context_correction_is_zero_so_older_heads_score_as_before():
    scorer = _scorer(0, trained_context=False)
    tokens, question = torch.randn(6 * 9, 12), torch.randn(4, 10)
    keys, queries = scorer.visual_proj(tokens), scorer.text_proj(question)
    per_token = torch.logsumexp(queries @ keys.T / math.sqrt(8), dim=0) - math.log(4)
    torch.testing.assert_close(scorer(tokens, (6, 9), question, True), torch.sigmoid(per_token + scorer.bias))


@pytest.mark.parametrize("grid", [(9, 17), (5, 30), (12, 7)])
def test_a_token_changes_the_scores_of_its_neighbourhood_and_nothing_beyond(grid):
    scorer = _scorer(1, trained_context=True).double()  # double: exact zeros where nothing changed
    h, w = grid
    tokens, question = torch.randn(h * w, 12, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    y, x = h // 2, w // 2
    moved = tokens.clone()
    moved[y * w + x] = torch.randn(12, dtype=torch.float64)  # (a constant shift would vanish in LayerNorm)
    with torch.no_grad():
        changed = (scorer(moved, grid, question, True) - scorer(tokens, grid, question, True)).abs().view(h, w) > 1e-12
    kh, kw = CouplingScorer.CONTEXT_KERNEL
    ry, rx = 2 * (kh // 2), 2 * (kw // 2)  # two layers: 5 x 13 tokens
    reach = torch.zeros(h, w, dtype=torch.bool)
    reach[max(0, y - ry) : y + ry + 1, max(0, x - rx) : x + rx + 1] = True
    assert not (changed & ~reach).any()  # nothing beyond the neighbourhood
    assert changed[y, x] and changed[y, min(w - 1, x + rx)] and changed[max(0, y - ry), x]  # its edges are reached


def test_the_context_reads_any_grid_and_an_empty_question():
    scorer = _scorer(2, trained_context=True)
    for grid in [(1, 1), (1, 20), (20, 1)]:
        out = scorer(torch.randn(grid[0] * grid[1], 12), grid, torch.randn(2, 10), True)
        assert out.shape == (grid[0] * grid[1],) and bool(((out > 0) & (out < 1)).all())
    empty = scorer(torch.randn(12, 12), (3, 4), torch.zeros(0, 10), True)
    assert torch.equal(empty, torch.sigmoid(scorer.bias).expand(12))
