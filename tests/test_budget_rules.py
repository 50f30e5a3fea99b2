"""The budget rules of docs/design.md and the allocation invariants, over many grids, maps and budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arr_coc.configuration_arr_coc import DEFAULT_LADDER
from arr_coc.relevance import Allocation, TokenAllocator, resolve_budget, shape_relevance
from arr_coc.relevance.realizing import cell_assignment

LADDERS = [list(DEFAULT_LADDER), [1, 4, 16], [4, 9, 36]]


@st.composite
def cases(draw):
    h, w = draw(st.integers(1, 36)), draw(st.integers(1, 36))
    allocator = draw(st.sampled_from(["ladder", "quadtree"]))
    region_size = draw(st.integers(2, 20))
    ladder = [lv for lv in draw(st.sampled_from(LADDERS)) if lv <= region_size**2] or [1]
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["uniform", "peak", "constant"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        relevance = torch.rand(h * w, generator=g)
    elif kind == "constant":
        relevance = torch.full((h * w,), 0.3)
    else:
        relevance = torch.zeros(h, w)
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        relevance[y0 : y0 + draw(st.integers(1, 4)), x0 : x0 + draw(st.integers(1, 6))] = 1.0
        relevance = relevance.flatten()
    budget = draw(st.integers(1, 2 * h * w + 5))
    return h, w, TokenAllocator(allocator, region_size, ladder), relevance, budget


def check_tiling(allocation: Allocation, h: int, w: int) -> None:
    assert (allocation.height, allocation.width) == (h, w)
    assert bool((allocation.coverage() == 1).all()), "every token is covered by exactly one region"
    for r in allocation.regions:
        assert 0 <= r.y0 < r.y1 <= h and 0 <= r.x0 < r.x1 <= w
        assert 1 <= r.k_h <= r.y1 - r.y0 and 1 <= r.k_w <= r.x1 - r.x0
    cell, centres = cell_assignment(allocation)
    assert sorted(set(cell.tolist())) == list(range(allocation.tokens_used))
    assert centres.shape == (allocation.tokens_used, 2)


@given(cases())
def test_explicit_budget_rules_and_tiling(case):
    h, w, allocator, relevance, budget = case
    native, floor = h * w, allocator.floor(h, w)
    if min(budget, native) < floor:
        with pytest.raises(ValueError, match=f"floor of {floor} tokens"):
            resolve_budget(native, floor, allocator.allocator, None, 64, 400, budget=budget)
        return
    decision = resolve_budget(native, floor, allocator.allocator, None, 64, 400, budget=budget)
    assert decision.tokens == min(budget, native)
    assert decision.clipped == (budget > native)
    allocation = allocator(relevance, h, w, decision.tokens)
    check_tiling(allocation, h, w)
    assert floor <= allocation.tokens_used <= decision.tokens
    if decision.tokens >= native:
        assert bool(allocation.detail_map().all())
    assert allocator(relevance.clone(), h, w, decision.tokens) == allocation  # deterministic


@given(cases(), st.floats(1.0, 64.0))
def test_compression_rule(case, ratio):
    h, w, allocator, _, _ = case
    native, floor = h * w, allocator.floor(h, w)
    expected = math.ceil(native / ratio)
    if expected < floor:
        with pytest.raises(ValueError, match="floor"):
            resolve_budget(native, floor, allocator.allocator, None, 64, 400, compression=ratio)
    else:
        assert resolve_budget(native, floor, allocator.allocator, None, 64, 400, compression=ratio).tokens == expected


@given(cases(), st.integers(1, 2000), st.integers(1, 300), st.integers(0, 300))
def test_automatic_budget_stays_in_range(case, auto, lo, span):
    h, w, allocator, _, _ = case
    native, floor = h * w, allocator.floor(h, w)
    d = resolve_budget(native, floor, allocator.allocator, auto, lo, lo + span)
    assert d.tokens == max(floor, min(native, max(lo, min(auto, lo + span))))


@given(st.integers(4, 32), st.integers(4, 32), st.integers(0, 10**6), st.integers(1, 4), st.integers(1, 6))
def test_quadtree_gives_a_relevant_box_full_detail_within_a_small_budget(h, w, seed, bh, bw):
    """A box of area A is cut out and opened within A + 6 tokens (two point splits + opening)."""
    g = torch.Generator().manual_seed(seed)
    y0, x0 = (
        int(torch.randint(0, h - min(bh, h) + 1, (1,), generator=g)),
        int(torch.randint(0, w - min(bw, w) + 1, (1,), generator=g)),
    )
    y1, x1 = min(h, y0 + bh), min(w, x0 + bw)
    relevance = torch.rand(h, w, generator=g) * 0.05
    relevance[y0:y1, x0:x1] = 1.0
    budget = min(h * w, (y1 - y0) * (x1 - x0) + 6)
    allocation = TokenAllocator("quadtree", 20, list(DEFAULT_LADDER))(relevance.flatten(), h, w, budget)
    assert allocation.tokens_used <= budget
    assert bool(allocation.detail_map()[y0:y1, x0:x1].all())


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10**6), st.integers(0, 3),
       st.sampled_from([0.0, 0.3, 0.7]))  # fmt: skip
def test_the_allocators_input_spreads_each_peak_and_drops_what_is_below_the_floor(h, w, seed, spread, floor):
    """`shape_relevance`: off is the identity; each token reads the largest relevance within ``spread`` tokens
    (so it never falls and a peak covers its whole (2 spread + 1)^2 square), then what is below ``floor`` times the
    largest is 0 – the largest survives."""
    g = torch.Generator().manual_seed(seed)
    relevance = torch.rand(h * w, generator=g)
    assert shape_relevance(relevance, h, w) is relevance
    shaped = shape_relevance(relevance, h, w, spread, floor).view(h, w)
    grid = relevance.view(h, w)
    for y in range(h):
        for x in range(w):
            near = grid[max(0, y - spread) : y + spread + 1, max(0, x - spread) : x + spread + 1].max()
            want = near if near >= floor * grid.max() else 0.0
            assert float(shaped[y, x]) == float(want)
    assert float(shaped.max()) == float(grid.max())


def test_a_spread_peak_opens_its_neighbourhood_and_the_floor_leaves_look_alikes_pooled():
    """One answer token with a weaker look-alike elsewhere: shaped, the answer's 3 x 3 neighbourhood opens to full
    detail and the look-alike stays pooled at the same budget; unshaped, the look-alike takes tokens instead."""
    h = w = 12
    relevance = torch.full((h, w), 0.05)
    relevance[3, 3], relevance[9, 9] = 1.0, 0.6  # the answer, a look-alike
    allocator = TokenAllocator("quadtree", 20, list(DEFAULT_LADDER))
    plain = allocator(relevance.flatten(), h, w, 16).detail_map()
    shaped = allocator(shape_relevance(relevance.flatten(), h, w, 1, 0.7), h, w, 16).detail_map()
    assert bool(shaped[2:5, 2:5].all()) and not bool(shaped[8:11, 8:11].any())
    assert bool(plain[9, 9]) and not bool(plain[2:5, 2:5].all())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None.__class__])
def test_invalid_budget_values_raise(bad):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(100, 1, "quadtree", None, 64, 400, budget=bad)


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan"), float("inf"), "2", True])
def test_invalid_compression_values_raise(bad):
    with pytest.raises(ValueError, match="compression"):
        resolve_budget(100, 1, "quadtree", None, 64, 400, compression=bad)


def test_budget_and_compression_together_raise():
    with pytest.raises(ValueError, match="either budget= or compression="):
        resolve_budget(100, 1, "quadtree", None, 64, 400, budget=10, compression=2)


def test_ladder_floor_error_names_the_allocator_that_reaches_lower():
    allocator = TokenAllocator("ladder", 4, [4, 16])
    floor = allocator.floor(16, 16)  # 16 regions at 4 tokens
    assert floor == 64
    with pytest.raises(ValueError, match="quadtree"):
        resolve_budget(256, floor, "ladder", None, 64, 400, budget=10)
    assert resolve_budget(256, floor, "ladder", 10, 1, 400).tokens == floor  # automatic: raised to the floor


def test_budget_specs_are_parsed_once_for_the_harness_and_the_trainer():
    from arr_coc.relevance import ALL_TOKENS, budget_from_spec, budget_options

    assert budget_options("1/8") == {"compression": 8.0} and budget_options("64") == {"budget": 64}
    assert budget_options(64) == {"budget": 64} and budget_options("full") == {"budget": ALL_TOKENS}
    assert budget_from_spec("1/3", 10) == 4 and budget_from_spec(12, 10) == 10
    for bad in ("1/0.5", "1/x", "0", "-3", "2.5", "half"):
        with pytest.raises(ValueError, match="expected '1/N'"):
            budget_options(bad)
