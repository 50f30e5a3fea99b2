"""The methods users would pick instead, on the same backbone and harness (each described, with where the port to
Qwen2-VL had to choose, in docs/benchmarks.md's method table, from `evaluation.methods`).

Each keeps at most the budget T of visual tokens and reports what it really used:

- ``downsample``: the largest resize of the image whose native count fits T (the ``max_pixels`` route).
- ``uniform-pool``: the same pooling everywhere – the smallest block factor f with ceil(h/f) x ceil(w/f) <= T.
- ``random``: a seeded random subset of T tokens, each at its own M-RoPE position.
- ``query-agnostic``: VisionZip – "dominant" tokens by attention received in a late vision block (Qwen-VL
  has no CLS token: mean over queries and heads, summed over each token's 2 x 2 patches) plus
  "contextual" tokens that merge the rest by key similarity (54 + 10 of 64, the published split).
- ``cdpruner`` / ``divprune``: the first T picks of a greedy order over the encoder's tokens (`greedy_realizer`
  with `pruners.cdpruner_order` / `divprune_order`).
- ``pixelprune``: pixel-duplicate blocks dropped before the encoder (`pixelprune_realizer`); unbudgeted.

The methods inside the language model (FastV, DART) live in `evaluation.lm_pruning`. ``random``,
``query-agnostic``, ``cdpruner`` and ``divprune`` act after the encoder and ``pixelprune`` before it: they are
realize steps (`relevance.realizing`'s protocol) that the harness hands to the model's `compress_inputs`, like
arr-coc's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ..relevance import Allocation, Realize
from .pruners import merged_pixel_blocks, pixelprune_select


@dataclass
class TokenSelection:
    """What a pruning baseline passed on for one image (a `relevance.Realization`, like `RelevanceRealization`)."""

    kept: torch.Tensor  # [h*w] bool: native tokens passed on as themselves
    positions: torch.Tensor  # [T', 3]
    grid: tuple[int, int]
    tokens_used: int
    native_count: int
    sample_index: int = 0
    image_index: int = 0

    def detail_map(self) -> torch.Tensor:
        return self.kept.view(*self.grid)


def grid_positions(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[k] rows, [k] columns on the merged grid -> [k, 3] (t, y, x) positions relative to the image's first."""
    rows, cols = rows.float(), cols.float()
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1)


def _selection(keep: torch.Tensor, h: int, w: int) -> TokenSelection:
    """Native tokens ``keep`` [k] (raster indices, ascending) of an ``h x w`` grid passed on at their own positions."""
    kept = torch.zeros(h * w, dtype=torch.bool)
    kept[keep] = True
    return TokenSelection(kept, grid_positions(keep // w, keep % w), (h, w), len(keep), h * w)


def _select(features, keep: torch.Tensor) -> tuple[list[torch.Tensor], TokenSelection]:
    """Kept tokens in raster order, at their own positions."""
    _, h, w = features.grid
    keep = torch.sort(keep.cpu()).values
    pieces = [x[keep.to(x.device)] for x in [features.tokens, *features.extra]]
    return pieces, _selection(keep, h, w)


def random_realizer(seed: int = 0) -> Realize:
    """A realize step keeping T tokens drawn at random (seeded per image size and T)."""

    def realize(image, question, ask):
        features = image.features
        _, h, w = features.grid
        n = h * w
        t = min(int(ask.budget), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + t)
        return _select(features, torch.randperm(n, generator=g)[:t])

    return realize


def visionzip_realizer(readouts: list, contextual_share: float = 10 / 64) -> Realize:
    """A realize step for VisionZip; ``readouts[k]`` = (attention received [h*w], keys [h*w, d]) of the batch's image
    k (`readouts.vision_attention_received`)."""

    def realize(image, question, ask):
        received, keys = (x.detach().float().cpu() for x in readouts[image.index])
        features = image.features
        _, h, w = features.grid
        n = h * w
        t = min(int(ask.budget), n)
        contextual = min(t - 1, round(t * contextual_share)) if t > 1 and t < n else 0
        dominant = torch.topk(received, t - contextual).indices.sort().values
        pieces, selection = _select(features, dominant)
        if contextual:
            rest = torch.ones(n, dtype=torch.bool)
            rest[dominant] = False
            rest_idx = rest.nonzero().flatten()
            # targets spread uniformly over the remaining tokens; each remaining token joins its most similar target
            targets = rest_idx[torch.linspace(0, len(rest_idx) - 1, contextual).round().long()]
            k = torch.nn.functional.normalize(keys.float(), dim=-1)
            assign = (k[rest_idx] @ k[targets].T).argmax(dim=1)  # [n_rest]
            rows, cols = (rest_idx // w).float(), (rest_idx % w).float()
            merged = []
            for x in [features.tokens, *features.extra]:
                xr = x[rest_idx.to(x.device)].float()
                total = torch.zeros(contextual, x.shape[-1], device=x.device).index_add_(0, assign.to(x.device), xr)
                count = torch.zeros(contextual, device=x.device).index_add_(
                    0, assign.to(x.device), torch.ones(len(rest_idx), device=x.device)
                )
                merged.append((total / count.clamp_min(1)[:, None]).to(x.dtype))
            count = torch.zeros(contextual).index_add_(0, assign, torch.ones(len(rest_idx))).clamp_min(1)
            centre_r = torch.zeros(contextual).index_add_(0, assign, rows) / count
            centre_c = torch.zeros(contextual).index_add_(0, assign, cols) / count
            pieces = [torch.cat([p, m]) for p, m in zip(pieces, merged)]
            selection.positions = torch.cat([selection.positions, grid_positions(centre_r, centre_c)])
            selection.tokens_used += contextual
        return pieces, selection

    return realize


def greedy_realizer(order: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], orders: dict,
                    largest: list[int]) -> Realize:  # fmt: skip
    """A realize step keeping the first T tokens of a greedy selection order whose first j picks are the answer for
    budget j (CDPruner, DivPrune): ``order(tokens [n, d], question [m, d], k)`` -> the k first picks. The order is
    computed once per image, at the largest budget the run asks of it (``largest[image.index]``), kept in ``orders``
    and sliced for every smaller budget."""

    def realize(image, question, ask):
        features = image.features
        n = features.tokens.shape[0]
        t = min(int(ask.budget), n)
        if len(orders.get(image.index, ())) < t:
            orders[image.index] = order(features.tokens, question, min(max(t, largest[image.index]), n))
        return _select(features, orders[image.index][:t])

    return realize


def pixelprune_realizer(tolerance: float, image_mean, image_std) -> Realize:
    """A realize step for PixelPrune: the image's merged pixel blocks (pixels un-normalised by the processor's
    ``image_mean`` / ``image_std``) that do not match their 2-D prediction within ``tolerance``
    (`pruners.pixelprune_select`), encoded alone at their true positions (`BackboneAdapter.encode_cells`); never
    reads the whole image's encoding. Unbudgeted: the request's budget is not read."""

    def realize(image, question, ask):
        adapter = image.adapter
        geometry = adapter.patch_geometry
        blocks = merged_pixel_blocks(image.patches, image.thw[None], image_mean, image_std, geometry.merge,
                                     geometry.temporal)[0]  # fmt: skip
        keep = pixelprune_select(blocks, tolerance)
        encoded = adapter.encode_cells(image.patches, image.thw, [keep.to(image.thw.device)])[0]
        _, h, w = image.grid
        return [encoded.tokens, *encoded.extra], _selection(keep, h, w)

    return realize


def uniform_factor(h: int, w: int, budget: int) -> int:
    """The smallest block factor whose pooled grid fits the budget."""
    f = 1
    while math.ceil(h / f) * math.ceil(w / f) > budget:
        f += 1
    return f


def uniform_allocation(h: int, w: int, budget: int) -> Allocation:
    return Allocation.uniform(h, w, uniform_factor(h, w, budget))


def native_tokens(image_processor, width: int, height: int) -> int:
    """Visual tokens the processor gives an image of this size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    rh, rw = smart_resize(
        height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )
    return (rh // factor) * (rw // factor)


def downsample_image(image: Image.Image, image_processor, budget: int) -> Image.Image:
    """The largest uniform resize of ``image`` whose native token count is at most ``budget``."""
    width, height = image.size
    if native_tokens(image_processor, width, height) <= budget:
        return image
    lo, hi = 0.0, 1.0  # the count is non-decreasing in the scale: binary search the largest that fits
    for _ in range(30):
        mid = (lo + hi) / 2
        w, h = max(1, round(width * mid)), max(1, round(height * mid))
        if native_tokens(image_processor, w, h) <= budget:
            lo = mid
        else:
            hi = mid
    w, h = max(1, round(width * lo)), max(1, round(height * lo))
    return image.resize((w, h), Image.BICUBIC)
