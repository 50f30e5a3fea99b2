"""Realizing: turn an image's encoder output into the tokens the language model receives, with honest positions.

The **realize protocol** is the one way an image becomes language-model tokens – arr-coc's single encoding, its
saccade, and the evaluation's post-encoder baselines all implement it::

    realize(image, question, ask) -> (tokens, realization)

``image``: the model's `ImageInput` (the processor's patches; ``image.features`` is the vision encoder's output,
encoded on first use); ``question``: the question's token embeddings [m, d]; ``ask``: an `ImageRequest` (the
call's options for this image). ``tokens``: [T', d_k] per feature kind (the main tokens, then e.g. Qwen3-VL's
deepstack features, pooled alike); ``realization``: a `Realization` – why the tokens are what they are.

A call's options arrive as one `RealizationRequest` (budget, compression, allocation, pooling, encoding, mode and
an optional other realize step), resolved against the config and broadcast to one `ImageRequest` per image.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

from .attending import Allocation, BudgetDecision

MODES = ("training_free", "trained")
ENCODINGS = ("single", "saccade")
POOLINGS = ("relevance", "mean")


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else `ValueError` naming the option, the value and the choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {choices}")
    return value


def check_margin(margin) -> int:
    """``margin`` if it is an integer >= 0 (merged cells of context around each crop), else `ValueError`."""
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"crop_margin={margin!r} is invalid: expected an integer >= 0 (merged cells of context "
                         "encoded around each crop and dropped after the encoder)")  # fmt: skip
    return margin


def check_confidence(confidence) -> float:
    """``confidence`` as a float if it is a probability strictly between 0 and 1 (the budget head's survival
    probability; a Python or NumPy number or a 0-d tensor), else `ValueError`."""
    if hasattr(confidence, "item") and getattr(confidence, "ndim", 1) == 0:  # NumPy scalars, 0-d tensors
        confidence = confidence.item()
    if isinstance(confidence, (list, tuple)) or getattr(confidence, "ndim", 0) > 0:
        raise ValueError(f"budget_confidence={confidence!r} is invalid: it takes one value per call (per-sample "
                         "confidences are not supported); call once per value")  # fmt: skip
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"budget_confidence={confidence!r} is invalid: expected a probability strictly between 0 and "
                         "1 (the chance the answer survives the automatic budget; higher: more tokens)")  # fmt: skip
    return float(confidence)


def _explicit_everywhere(value) -> bool:
    """Whether a budget / compression / allocation call option gives every image its own (no None left to the
    automatic budget)."""
    if value is None:
        return False
    if isinstance(value, (list, tuple)):
        return all(_explicit_everywhere(v) for v in value)
    return True


# ----------------------------------------------------------------------------- the protocol


class Realization(Protocol):
    """What any realize step reports for one image: `RelevanceRealization` (arr-coc) or a baseline's selection."""

    positions: torch.Tensor  # [T', 3] (t, y, x) of the tokens passed on, relative to the image's first position
    native_count: int  # N: the image's visual tokens before any compression
    sample_index: int  # set by `compress_inputs`
    image_index: int  # within its sample, set by `compress_inputs`

    @property
    def tokens_used(self) -> int: ...

    def detail_map(self) -> torch.Tensor:
        """[h, w] bool: True where a native token is passed on as itself (full detail)."""
        ...


Realize = Callable[[Any, torch.Tensor, "ImageRequest"], tuple[list[torch.Tensor], Realization]]


@dataclass(frozen=True)
class ImageRequest:
    """One image's share of a `RealizationRequest`: its explicit budget or compression, or a fixed allocation, and
    the resolved pooling, mode, crop margin (the saccade's) and the automatic budget's survival probability."""

    budget: int | None
    compression: float | None
    allocation: Allocation | None
    pooling: str
    mode: str
    crop_margin: int
    budget_confidence: float


@dataclass(frozen=True)
class RealizationRequest:
    """What one call asks of the relevance realization (the call options of `forward`, `generate`,
    `realize_relevance`; the request of `compress_inputs`).

    budget / compression: an explicit T or N/T ratio – one value, one per sample, or per sample a list with one per
    image (None: the automatic budget). allocation: a fixed `Allocation`, broadcast alike (bypasses the budget and
    the allocator). pooling ("relevance" / "mean"), encoding ("single" / "saccade"), mode ("training_free" /
    "trained"), crop_margin (merged cells of context around each saccade crop, an integer >= 0), budget_confidence (the
    automatic budget's survival probability, in (0, 1); unused by explicit budgets): this call's choices (None: the
    config's). realize: another realize step for every image (the evaluation's post-encoder baselines;
    None: the model's own for the encoding).
    """

    budget: Any = None
    compression: Any = None
    allocation: Any = None
    pooling: str | None = None
    encoding: str | None = None
    mode: str | None = None
    crop_margin: int | None = None
    budget_confidence: float | None = None
    realize: Realize | None = None

    def resolve(self, config) -> RealizationRequest:
        """The config's choices where this call made none; `ValueError` naming the choices for a misspelt one (or the
        range of a crop margin that is not an integer >= 0, or of a budget_confidence outside (0, 1)), for a
        budget_confidence no image would use (training-free mode, an explicit budget for every image), and for a config setting changed since loading to a value
        outside its range (`ArrCocConfig.check`)."""
        config.check()
        mode = check_choice("mode", self.mode or config.mode, MODES)
        if self.budget_confidence is not None:  # an option no image would use is refused, not ignored
            if mode == "training_free":
                raise ValueError("budget_confidence applies to the trained budget head, and this call uses "
                                 "mode='training_free' (its automatic budget is the tokens holding half the relevance "
                                 "mass plus a gist): drop budget_confidence, or pass mode='trained'")  # fmt: skip
            if any(_explicit_everywhere(v) for v in (self.budget, self.compression, self.allocation)):
                raise ValueError("budget_confidence chooses the automatic budget, and this call gives every image an "
                                 "explicit budget, compression or allocation: drop one of them (None in a per-sample "
                                 "list leaves that image to the automatic budget)")  # fmt: skip
        return replace(
            self,
            pooling=check_choice("pooling", self.pooling or config.pooling, POOLINGS),
            encoding=check_choice("encoding", self.encoding or config.encoding, ENCODINGS),
            mode=mode,
            crop_margin=check_margin(config.crop_margin if self.crop_margin is None else self.crop_margin),
            budget_confidence=check_confidence(
                config.budget_confidence if self.budget_confidence is None else self.budget_confidence
            ),
        )

    def check_no_images(self) -> None:
        """For a call without images (text only, or a decoding step): `ValueError` naming the options it was given,
        since no image would use them (refused, not ignored)."""
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        if given:
            verb, it = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise ValueError(f"{', '.join(given)} {verb} to images, and this call has none (no pixel_values or "
                             f"image_features): leave {it} out for a text-only prompt or a decoding step")  # fmt: skip

    def per_image(self, images_per_sample: list[int]) -> list[ImageRequest]:
        """One `ImageRequest` per image, in input order (call `resolve` first). Raises `ValueError` when a per-sample
        or per-image list does not match the batch."""
        budgets, ratios, fixed = (
            _per_image(value, name, images_per_sample)
            for name, value in (("budget", self.budget), ("compression", self.compression),
                                ("allocation", self.allocation))
        )  # fmt: skip
        return [ImageRequest(b, r, a, self.pooling, self.mode, self.crop_margin, self.budget_confidence)
                for b, r, a in zip(budgets, ratios, fixed)]  # fmt: skip


def _per_image(value, name: str, images_per_sample: list[int]) -> list:
    """Broadcast a call option to one value per image: None or a scalar (every image), one value per sample (each of
    its images), or per sample a list with one value per image."""
    n_images = sum(images_per_sample)
    if value is None or isinstance(value, (numbers.Number, Allocation)) or (torch.is_tensor(value) and value.ndim == 0):
        value = value.item() if torch.is_tensor(value) else value
        return [value] * n_images
    values = value.tolist() if torch.is_tensor(value) else list(value)
    if len(values) != len(images_per_sample):
        raise ValueError(
            f"{name} has {len(values)} entries for a batch of {len(images_per_sample)} samples: pass one value, "
            f"one per sample, or per sample one per image"
        )
    out = []
    for v, n in zip(values, images_per_sample):
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise ValueError(f"{name} gives {len(v)} values for a sample with {n} images")
            out += list(v)
        else:
            out += [v] * n
    return out


# ----------------------------------------------------------------------------- arr-coc's realization


@dataclass
class RelevanceMaps:
    """What the relevance heads say about one image's tokens (each [n] on the grid they were computed on)."""

    information: torch.Tensor
    salience: torch.Tensor
    coupling: torch.Tensor
    relevance: torch.Tensor
    balance_weights: torch.Tensor  # [3]: information, salience, coupling


@dataclass
class RelevanceRealization:
    """Why one image's tokens went where they went (all maps are [h, w] on the merged grid)."""

    information: torch.Tensor
    salience: torch.Tensor
    coupling: torch.Tensor
    relevance: torch.Tensor
    balance_weights: torch.Tensor  # [3]: information, salience, coupling
    allocation: Allocation
    budget: int  # T after every budget rule
    requested_budget: int  # before clipping to native
    budget_clipped: bool
    budget_source: str  # "auto", "budget", "compression" or "allocation"
    expected_tokens: torch.Tensor  # the budget head's (differentiable) estimate
    native_count: int
    positions: torch.Tensor  # [T', 3] (t, y, x) relative to the image's first position
    sample_index: int = 0
    image_index: int = 0  # within its sample
    encoding: str = "single"  # "saccade": maps come from the gist; regions finer than it from crops
    gist_scale: int | None = None  # the saccade's gist: one token per gist_scale x gist_scale native tokens

    @property
    def tokens_used(self) -> int:
        return self.allocation.tokens_used

    @property
    def budget_text(self) -> str:
        """The budget as the CLI and the app print it: T, and what was asked when the rules clipped it to native."""
        if not self.budget_clipped:
            return str(self.budget)
        return f"{self.budget}: {self.requested_budget} asked, clipped to the image's {self.native_count} native tokens"

    @property
    def pooled(self) -> bool:
        """Whether a region passes fewer tokens than it covers (the allocation tiles the whole grid, so: whether
        fewer tokens than native were passed on) – where the language model's scoped LoRA is on."""
        return self.tokens_used < self.native_count

    def detail_map(self) -> torch.Tensor:
        """[h, w] bool: True where the token is passed at full detail."""
        return self.allocation.detail_map()

    def to_dict(self) -> dict:
        """JSON-ready summary (maps as nested lists)."""
        return {
            "sample_index": self.sample_index,
            "image_index": self.image_index,
            "encoding": self.encoding,
            "gist_scale": self.gist_scale,
            "tokens_used": self.tokens_used,
            "native_count": self.native_count,
            "budget": self.budget,
            "requested_budget": self.requested_budget,
            "budget_clipped": self.budget_clipped,
            "budget_source": self.budget_source,
            "balance_weights": [round(float(w), 4) for w in self.balance_weights],
            "allocation": self.allocation.to_dict(),
            "relevance": [[round(float(v), 4) for v in row] for row in self.relevance],
        }


def realize_allocation(features: list[torch.Tensor], maps: RelevanceMaps, expected_tokens: torch.Tensor,
                       allocation: Allocation, decision: BudgetDecision, pooling: str, encoding: str = "single",
                       gist_scale: int | None = None) -> tuple[list[torch.Tensor], RelevanceRealization]:  # fmt: skip
    """The realizing step of both encodings: ``features`` ([h*w, d_k] per kind, on the native grid) pooled per
    region of the allocation, weighted by ``maps.relevance`` ([h*w]), and the `RelevanceRealization` that explains
    them -> (tokens [T', d_k] per kind, realization)."""
    h, w = allocation.height, allocation.width
    pooled, centres = RelevanceRealizer(pooling)(features, allocation, maps.relevance)
    positions = torch.cat([torch.zeros_like(centres[:, :1]), centres], dim=1)
    realization = RelevanceRealization(
        information=maps.information.view(h, w), salience=maps.salience.view(h, w), coupling=maps.coupling.view(h, w),
        relevance=maps.relevance.view(h, w), balance_weights=maps.balance_weights, allocation=allocation,
        budget=decision.tokens, requested_budget=decision.requested, budget_clipped=decision.clipped,
        budget_source=decision.source, expected_tokens=expected_tokens, native_count=h * w, positions=positions,
        encoding=encoding, gist_scale=gist_scale,
    )  # fmt: skip
    return pooled, realization


# ----------------------------------------------------------------------------- pooling


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

    def __call__(self, features: list[torch.Tensor], allocation: Allocation,
                 relevance: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """features: tensors [h*w, d_k] pooled alike; relevance [h*w] ->
        (pooled tensors [T', d_k], positions [T', 2] as (y, x) centres on the native grid)."""
        cell, centres = cell_assignment(allocation)
        cell, centres = cell.to(relevance.device), centres.to(relevance.device)
        n_out = centres.shape[0]
        if n_out == cell.numel():  # all at full detail: the tokens pass through untouched
            order = torch.argsort(cell)
            return [x[order] for x in features], centres
        if self.pooling == "mean":
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
