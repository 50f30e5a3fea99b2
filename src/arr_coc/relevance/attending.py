"""Attending: how many tokens an image gets (BudgetCalculator, `resolve_budget`) and where they go
(`TokenAllocator`: the `ladder` and `quadtree` allocators).

An `Allocation` tiles the whole merged grid with regions; each region is passed on as a
``k_h x k_w`` grid of pooled tokens (1 x 1: one gist token; its own size: full detail).
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Relevance is rounded to this many steps before allocating: near-ties become exact ties,
# broken by index, so float noise of another batch composition cannot flip an allocation.
RELEVANCE_STEPS = 4096
# Every token keeps a little relevance, so spare budget still buys detail everywhere.
RELEVANCE_FLOOR = 1.0 / RELEVANCE_STEPS


@dataclass(frozen=True)
class Region:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of the merged grid, passed on as ``k_h x k_w`` tokens."""

    y0: int
    x0: int
    y1: int
    x1: int
    k_h: int
    k_w: int

    @property
    def tokens(self) -> int:
        return self.k_h * self.k_w

    @property
    def full_detail(self) -> bool:
        return self.k_h == self.y1 - self.y0 and self.k_w == self.x1 - self.x0


@dataclass
class Allocation:
    """A complete tiling of an ``h x w`` grid into regions; ``budget`` is the T it had to fit."""

    height: int
    width: int
    regions: list[Region]
    budget: int

    @property
    def tokens_used(self) -> int:
        return sum(r.tokens for r in self.regions)

    def detail_map(self) -> torch.Tensor:
        """[h, w] bool: True where the token is passed at full detail."""
        out = torch.zeros(self.height, self.width, dtype=torch.bool)
        for r in self.regions:
            if r.full_detail:
                out[r.y0 : r.y1, r.x0 : r.x1] = True
        return out

    def resolution_map(self) -> torch.Tensor:
        """[h, w] float: each token's resolution – 1 at full detail, tokens / area for a region pooled to fewer
        tokens than it covers (the allocators' utility is the sum of relevance x resolution)."""
        out = torch.zeros(self.height, self.width)
        for r in self.regions:
            out[r.y0 : r.y1, r.x0 : r.x1] = r.tokens / ((r.y1 - r.y0) * (r.x1 - r.x0))
        return out

    def coverage(self) -> torch.Tensor:
        """[h, w] int: how many regions cover each token (1 everywhere for a valid tiling)."""
        out = torch.zeros(self.height, self.width, dtype=torch.long)
        for r in self.regions:
            out[r.y0 : r.y1, r.x0 : r.x1] += 1
        return out

    def check(self, height: int, width: int) -> None:
        """Raise `ValueError` unless this tiles an ``height x width`` grid exactly, each region at 1..its own size
        (a caller's fixed allocation)."""
        if (self.height, self.width) != (height, width):
            raise ValueError(f"allocation is for a {self.height}x{self.width} grid, the image has {height}x{width}")
        for r in self.regions:
            if not (
                0 <= r.y0 < r.y1 <= height
                and 0 <= r.x0 < r.x1 <= width
                and 1 <= r.k_h <= r.y1 - r.y0
                and 1 <= r.k_w <= r.x1 - r.x0
            ):
                raise ValueError(
                    f"allocation region {r} lies outside the {height}x{width} grid or asks for more cells than its size"
                )
        if not bool((self.coverage() == 1).all()):
            raise ValueError(
                "allocation regions must cover every token of the grid exactly once (no gaps, no overlaps)"
            )

    def to_dict(self) -> dict:
        return {
            "grid": [self.height, self.width],
            "budget": self.budget,
            "tokens_used": self.tokens_used,
            "regions": [[r.y0, r.x0, r.y1, r.x1, r.k_h, r.k_w] for r in self.regions],
        }

    @classmethod
    def uniform(cls, height: int, width: int, factor: int) -> Allocation:
        """``factor x factor`` blocks, each one token (edge blocks smaller): uniform pooling."""
        regions = [
            Region(y, x, min(y + factor, height), min(x + factor, width), 1, 1)
            for y in range(0, height, factor)
            for x in range(0, width, factor)
        ]
        return cls(height, width, regions, sum(r.tokens for r in regions))

    @classmethod
    def full(cls, height: int, width: int) -> Allocation:
        return cls(height, width, [Region(0, 0, height, width, height, width)], height * width)


# ----------------------------------------------------------------------------- budget


def _check_budget_value(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget={budget!r} is invalid: expected a positive integer number of visual tokens")
    if budget <= 0:
        raise ValueError(f"budget={budget} is invalid: expected a positive integer number of visual tokens")
    return int(budget)


def _check_compression_value(compression) -> float:
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real) or not math.isfinite(compression):
        raise ValueError(f"compression={compression!r} is invalid: expected a finite ratio >= 1")
    if compression < 1:
        raise ValueError(f"compression={compression} is invalid: expected a ratio >= 1 (T = ceil(N / ratio))")
    return float(compression)


ALL_TOKENS = 2**31 - 1  # a budget that every image's native count is below: "all visual tokens"


def budget_options(spec: str | int) -> dict:
    """A budget spec as call options: "1/8" -> ``{"compression": 8.0}``; "64" (or 64) -> ``{"budget": 64}``;
    "full" / "all" -> ``{"budget": ALL_TOKENS}``. Raises `ValueError` naming the accepted forms."""
    text = str(spec).strip()
    if text in ("full", "all"):
        return {"budget": ALL_TOKENS}
    try:
        if text.startswith("1/"):
            return {"compression": _check_compression_value(float(text[2:]))}
        return {"budget": _check_budget_value(int(text))}
    except ValueError:
        raise ValueError(
            f"budget spec {spec!r} is invalid: expected '1/N' (N >= 1, a share of the native count), a positive "
            "token count like '64', or 'full'"
        ) from None


def budget_from_spec(spec: str | int, native: int) -> int:
    """The budget a spec gives an image of ``native`` tokens: "1/8" -> ceil(N / 8); "64" -> min(64, N); "full" -> N."""
    options = budget_options(spec)
    if "compression" in options:
        return math.ceil(native / options["compression"])
    return min(options["budget"], native)


@dataclass(frozen=True)
class BudgetDecision:
    tokens: int  # T, after every rule
    requested: int  # before clipping to the native count
    clipped: bool  # a budget above native was clipped to native
    source: str  # "auto", "budget", "compression" or "allocation"


def resolve_budget(native: int, floor: int, allocator: str, auto_tokens: int | None, min_tokens: int,
                   max_tokens: int, budget=None, compression=None) -> BudgetDecision:  # fmt: skip
    """The budget rules of docs/design.md, the one formula everywhere.

    Automatic ``auto_tokens`` is kept in ``[min_tokens, max_tokens]``; an explicit ``budget`` or
    ``compression`` (T = ceil(N / r)) overrides that range. Then T = min(T, N) (clipped, reported)
    and T >= floor: an explicit budget below the allocator's floor raises `ValueError`.
    """
    if budget is not None and compression is not None:
        raise ValueError("pass either budget= or compression=, not both")
    if budget is not None:
        requested, source = _check_budget_value(budget), "budget"
    elif compression is not None:
        requested, source = math.ceil(native / _check_compression_value(compression)), "compression"
    else:
        requested, source = min(max(int(auto_tokens), min_tokens), max_tokens), "auto"
    tokens = min(requested, native)
    if tokens < floor:
        if source == "auto":
            tokens = floor
        else:  # only the ladder has a floor above 1
            raise ValueError(
                f"{source}={budget if source == 'budget' else compression} gives {tokens} tokens, below the "
                f"{allocator} allocator's floor of {floor} tokens for this {native}-token image; use a budget "
                f">= {floor}, or allocator='quadtree', which reaches lower (floor 1)"
            )
    return BudgetDecision(tokens, requested, requested > native, source)


def mass_tokens(relevance: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest tokens whose relevance holds ``share`` of the map's mass: relevance [n] -> count [] (long)."""
    ordered = relevance.sort(descending=True).values
    return (ordered.cumsum(0) < share * relevance.sum()).sum() + 1


class BudgetCalculator(nn.Module):
    """How many tokens this image needs for this question (before the budget rules of `resolve_budget`).

    Learned – a survival model: the answer survives a budget of T tokens with probability
    ``P(T) = sigmoid(s * (log T - log T*))``, where T* (the budget the answer survives half the time) comes from an
    MLP of the question and statistics of the relevance map, and the slope s > 0 is one learned number. The
    automatic budget is the smallest T with P(T) >= ``confidence``: ``T* * exp(logit(confidence) / s)``. The
    `budget` training objective fits it to whether each training answer survived the budget it was given
    (training/objectives.py). Training-free: the tokens that hold ``MASS_SHARE`` of the relevance mass, plus a gist
    of sqrt(N) tokens for the rest (docs/design.md, budget rules).
    """

    MASS_SHARE = 0.5  # the training-free rule's share of the relevance mass at full detail
    MIN_SLOPE = 0.25  # s > MIN_SLOPE: a flatter survival curve would put every budget at a bound

    def __init__(self, text_size: int, hidden_size: int):
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(text_size + 5, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1)
        )  # fmt: skip
        self.norm = nn.LayerNorm(text_size)
        self.log_slope = nn.Parameter(torch.zeros(()))  # s = MIN_SLOPE + softplus(log_slope); set in _init_weights

    @property
    def slope(self) -> torch.Tensor:
        """The survival curve's slope s [] (per unit of log T)."""
        return self.MIN_SLOPE + F.softplus(self.log_slope)

    def needed(self, relevance: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """log T* []: the log budget at which the answer survives half the time (learned). The relevance map
        [n] is read, not trained: no gradient flows back into it."""
        relevance = relevance.detach()
        q = self.norm(question).mean(dim=0) if question.shape[0] else relevance.new_zeros(self.norm.normalized_shape)
        log_n = torch.log(torch.ones_like(relevance).sum())  # log N as a tensor (exportable with a dynamic N)
        stats = torch.stack([
            log_n, torch.log1p(relevance.sum()), torch.log1p((relevance >= 0.5).sum().to(relevance.dtype)),
            torch.log(mass_tokens(relevance, self.MASS_SHARE).to(relevance.dtype)), relevance.max(),
        ])  # fmt: skip
        return log_n + self.head(torch.cat([q, stats])).squeeze(-1)

    def forward(self, relevance: torch.Tensor, question: torch.Tensor, trained: bool,
                confidence: float) -> torch.Tensor:  # fmt: skip
        """relevance [n], question [m, d_text] -> expected tokens [] (differentiable when ``trained``; the budget
        rules keep it in [min_tokens, max_tokens]). ``confidence`` in (0, 1): the survival probability the
        automatic budget is read at."""
        if trained:
            exponent = self.needed(relevance, question) + math.log(confidence / (1 - confidence)) / self.slope
            return torch.exp(exponent.clamp(max=math.log(ALL_TOKENS)))
        n = relevance.shape[0]
        needed = mass_tokens(relevance.detach(), self.MASS_SHARE) + math.ceil(math.sqrt(n))
        return needed.to(relevance.dtype)


# ----------------------------------------------------------------------------- allocators


def _prepare(relevance: torch.Tensor, height: int, width: int) -> np.ndarray:
    r = relevance.detach().to(torch.float64).cpu().numpy().reshape(height, width)
    return np.round(np.clip(r, 0.0, 1.0) * RELEVANCE_STEPS) / RELEVANCE_STEPS + RELEVANCE_FLOOR


def _integral(r: np.ndarray) -> np.ndarray:
    s = np.zeros((r.shape[0] + 1, r.shape[1] + 1))
    s[1:, 1:] = r.cumsum(0).cumsum(1)
    return s


def _mass(s: np.ndarray, y0, x0, y1, x1):
    return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]


def _best_splits(s: np.ndarray, y0: int, x0: int, y1: int, x1: int, mass: float):
    """The best 2-way and 4-way split points of a leaf, each as (n_children, (ratio, (ys, xs))).

    The point is the one that best separates relevance, maximising the between-children sum of
    squares (sum of M_c^2 / A_c), so a relevant box comes out as one homogeneous child. The ratio
    is the utility gained per token spent, looking one step ahead: the split alone, or the split
    followed by opening one child, whichever pays most per token.
    """
    ys = np.arange(y0, y1 + 1)[:, None]
    xs = np.arange(x0, x1 + 1)[None, :]
    shape = (ys.size, xs.size)
    areas, masses = [], []
    for cy0, cy1 in ((y0, ys), (ys, y1)):
        for cx0, cx1 in ((x0, xs), (xs, x1)):
            areas.append(np.broadcast_to((cy1 - cy0) * (cx1 - cx0), shape).astype(float))
            masses.append(np.broadcast_to(s[cy1, cx1] - s[cy0, cx1] - s[cy1, cx0] + s[cy0, cx0], shape))
    area, child_mass = np.stack(areas), np.stack(masses)  # [4, ny, nx]: the four quadrants of each point
    present, safe_area = area > 0, np.maximum(area, 1)
    n_children = present.sum(axis=0)
    separation = np.where(present, child_mass**2 / safe_area, 0.0).sum(axis=0)
    gain = np.where(present, child_mass / safe_area, 0.0).sum(axis=0) - mass / ((y1 - y0) * (x1 - x0))
    open_gain = np.where(area > 1, child_mass * (1 - 1 / safe_area), 0.0)
    splits = np.maximum(n_children - 1, 1)
    ahead = ((gain + open_gain) / (splits + np.maximum(area - 1, 0))).max(axis=0)
    ratio = np.maximum(gain / splits, ahead)
    out = []
    for k in (2, 4):
        candidates = np.where(n_children == k, separation, -np.inf)
        flat = int(np.argmax(candidates))  # first index on ties
        if np.isfinite(candidates.flat[flat]):
            iy, ix = divmod(flat, shape[1])
            out.append((k, (float(ratio.flat[flat]), (y0 + iy, x0 + ix))))
    return out


def shape_relevance(
    relevance: torch.Tensor, height: int, width: int, spread: int = 0, floor: float = 0.0
) -> torch.Tensor:
    """The relevance the allocator reads: relevance [h*w] -> [h*w].

    Each token first takes the largest relevance within ``spread`` tokens of it (a ``(2*spread+1)**2`` max-pool, a
    morphological dilation): trained scorers peak on the answer's glyphs, and the allocator would otherwise leave
    the rest of the answer's box or line pooled. Then every token below ``floor`` times the image's largest value is
    set to 0, so the tokens the relevant regions leave over are spent where relevance is 0 (the allocator's ties,
    often blank regions) rather than on regions that merely resemble the answer (the oracle allocation – relevance 1
    on the answer, 0 elsewhere – shows what distractors pooled away are worth). ``spread=0, floor=0`` return ``relevance`` itself. This project's own rule, measured in
    docs/benchmarks.md; no paper."""
    if spread == 0 and floor == 0:
        return relevance
    r = relevance.reshape(1, 1, height, width)
    if spread:
        r = F.max_pool2d(r, 2 * spread + 1, stride=1, padding=spread)
    r = r.flatten()
    if floor:
        r = r * (r >= floor * r.max())
    return r


class TokenAllocator:
    """Tiles the grid within T tokens, giving detail where relevance is high.

    Both allocators maximise the same utility, sum over tokens of relevance x resolution, where a
    token's resolution is 1 at full detail and 1/area for a pooled token covering ``area`` tokens,
    greedily by utility gained per token spent (ties broken by region index).

    ``ladder``: fixed ``region_size`` squares (edge regions smaller), each at one level of
    ``lod_ladder`` or at full detail. ``quadtree``: starts from one gist token for the whole image;
    a gist region either opens to full detail or splits at a point chosen to separate relevance
    (into 4 quadrants, or 2 halves when the point lies on an edge) – a point quadtree, so a small
    answer region can be cut out exactly.
    """

    def __init__(self, allocator: str, region_size: int, lod_ladder: list[int]):
        self.allocator, self.region_size, self.lod_ladder = allocator, region_size, list(lod_ladder)

    def decide(self, relevance: torch.Tensor, height: int, width: int, expected_tokens: float, min_tokens: int,
               max_tokens: int, budget=None, compression=None,
               allocation: Allocation | None = None) -> tuple[Allocation, BudgetDecision]:  # fmt: skip
        """The budget rules, then the allocation: (allocation, decision) for one image. A caller's fixed
        ``allocation`` is checked against the grid (`Allocation.check`) and used as given."""
        if allocation is not None:
            allocation.check(height, width)
            used = allocation.tokens_used
            return allocation, BudgetDecision(used, used, False, "allocation")
        decision = resolve_budget(height * width, self.floor(height, width), self.allocator, math.ceil(expected_tokens),
                                  min_tokens, max_tokens, budget, compression)  # fmt: skip
        return self(relevance, height, width, decision.tokens), decision

    def floor(self, height: int, width: int) -> int:
        """The fewest tokens this allocator can tile an ``h x w`` grid with."""
        if self.allocator == "quadtree":
            return 1
        return sum(self._levels(rh, rw)[0] for rh, rw in self._ladder_region_sizes(height, width))

    def __call__(self, relevance: torch.Tensor, height: int, width: int, budget: int) -> Allocation:
        """relevance [h*w] in [0, 1], budget T >= floor -> Allocation using at most T tokens."""
        if budget >= height * width:
            return (
                Allocation.full(height, width)
                if self.allocator == "quadtree"
                else self._ladder(None, height, width, budget)
            )
        r = _prepare(relevance, height, width)
        if self.allocator == "quadtree":
            return self._quadtree(r, height, width, budget)
        return self._ladder(r, height, width, budget)

    # ladder ---------------------------------------------------------------

    def _ladder_region_sizes(self, height: int, width: int):
        s = self.region_size
        return [(min(s, height - y), min(s, width - x)) for y in range(0, height, s) for x in range(0, width, s)]

    def _levels(self, rh: int, rw: int) -> list[int]:
        return sorted(
            {min(math.isqrt(level), rh) * min(math.isqrt(level), rw) for level in self.lod_ladder} | {rh * rw}
        )

    def _level_grid(self, rh: int, rw: int, tokens: int) -> tuple[int, int]:
        if tokens == rh * rw:
            return rh, rw
        for level in self.lod_ladder:
            k_h, k_w = min(math.isqrt(level), rh), min(math.isqrt(level), rw)
            if k_h * k_w == tokens:
                return k_h, k_w
        raise AssertionError("unreachable: tokens is always one of the region's levels")

    def _ladder(self, r: np.ndarray | None, height: int, width: int, budget: int) -> Allocation:
        s = self.region_size
        boxes = [(y, x, min(y + s, height), min(x + s, width)) for y in range(0, height, s) for x in range(0, width, s)]
        levels = [self._levels(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes]
        chosen = [0] * len(boxes)
        if r is None:  # budget >= native: everything at full detail
            chosen = [len(lv) - 1 for lv in levels]
        else:
            remaining = budget - sum(lv[0] for lv in levels)
            # Linear utility: every upgrade of a region gains its mean relevance per token, so regions
            # take turns by mean relevance and each rises to the highest level that still fits.
            means = [r[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes]
            for i in sorted(range(len(boxes)), key=lambda i: (-means[i], i)):
                for j in range(len(levels[i]) - 1, 0, -1):
                    cost = levels[i][j] - levels[i][0]
                    if cost <= remaining:
                        chosen[i], remaining = j, remaining - cost
                        break
        regions = [
            Region(y0, x0, y1, x1, *self._level_grid(y1 - y0, x1 - x0, lv[j]))
            for (y0, x0, y1, x1), lv, j in zip(boxes, levels, chosen)
        ]
        return Allocation(height, width, regions, budget)

    # quadtree -------------------------------------------------------------

    def _quadtree(self, r: np.ndarray, height: int, width: int, budget: int) -> Allocation:
        s = _integral(r)
        leaves: list[tuple[int, int, int, int]] = [(0, 0, height, width)]
        opened: set[int] = set()
        alive = {0}
        heap: list = []

        def push(leaf_id: int) -> None:
            y0, x0, y1, x1 = leaves[leaf_id]
            area = (y1 - y0) * (x1 - x0)
            if area == 1:
                return
            mass = _mass(s, y0, x0, y1, x1)
            open_gain = mass * (1 - 1 / area)
            heapq.heappush(heap, (-open_gain / (area - 1), leaf_id, 0, area - 1, None))
            for n_children, split in _best_splits(s, y0, x0, y1, x1, mass):
                ratio, point = split
                heapq.heappush(heap, (-ratio, leaf_id, n_children, n_children - 1, point))

        push(0)
        remaining = budget - 1
        while heap and remaining > 0:
            _, leaf_id, kind, cost, point = heapq.heappop(heap)
            if leaf_id not in alive or cost > remaining:
                continue
            alive.discard(leaf_id)
            remaining -= cost
            if kind == 0:
                opened.add(leaf_id)
                continue
            y0, x0, y1, x1 = leaves[leaf_id]
            ys, xs = point
            for cy0, cy1 in ((y0, ys), (ys, y1)):
                for cx0, cx1 in ((x0, xs), (xs, x1)):
                    if cy1 > cy0 and cx1 > cx0:
                        leaves.append((cy0, cx0, cy1, cx1))
                        alive.add(len(leaves) - 1)
                        push(len(leaves) - 1)
        regions = []
        for i in sorted(alive | opened):
            y0, x0, y1, x1 = leaves[i]
            k_h, k_w = (y1 - y0, x1 - x0) if i in opened else (1, 1)
            regions.append(Region(y0, x0, y1, x1, k_h, k_w))
        return Allocation(height, width, regions, budget)
