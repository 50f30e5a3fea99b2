"""Training objectives for the relevance heads, each selectable and weighted (`ObjectiveWeights`).

(a) answer    the answer's language-model loss with the compressed tokens (relevance-weighted pooling
              carries it back to the heads);
(b) distill   relevance distillation: the full-token backbone's own gradient attribution
              (|grad x input| of the answer loss per visual token) as the target distribution;
(c) budget    the budget head's survival model: the predicted probability that the answer survives the
              tokens it was given, against whether it did (greedy exact match under teacher forcing), over the
              samples the backbone answers right with every visual token (what a budget can keep);
(d) localise  when a sample has an ``answer_box``: the relevance map should cover the box
              (binary cross-entropy against each token's overlap with the box, plus the mass inside);
(e) consistency  for saccade encoding, the vision encoder itself: its gist tokens toward the frozen
              encoder's tokens of the whole image averaged per gist cell, its crop tokens toward the
              whole image's tokens at the same places, and its whole-image tokens unchanged (gist and crops
              with the vision tower's scoped LoRA on, as in a saccade: trained alone, it leaves the whole
              image exactly as it was);
(f) cover     when a sample has an ``answer_box``: the allocation toward the oracle's at the step's budget – the
              utility the allocator maximises (relevance x resolution) of its own allocation minus that of the
              oracle allocation (`data.boxes.oracle_allocation`), a structured hinge loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import ImageInput
from ..data.boxes import box_overlap_map, oracle_allocation
from ..relevance import ALL_TOKENS, RealizationRequest
from ..relevance.saccade import gist_cell_means, random_crops
from ..scoped_lora import lora_scope
from ..sequence import IGNORE_INDEX


@dataclass
class ObjectiveWeights:
    answer: float = 1.0
    distill: float = 0.0
    budget: float = 0.0
    localise: float = 0.0
    cover: float = 0.0
    consistency: float = 0.0

    @classmethod
    def parse(cls, spec: str | dict | None) -> ObjectiveWeights:
        """``"answer=1,localise=0.5"`` or a dict -> weights (unnamed objectives are off)."""
        if spec is None:
            return cls()
        if isinstance(spec, str):
            items = [kv.split("=") for kv in spec.split(",") if kv.strip()]
            try:
                spec = {k.strip(): float(v) for k, v in items}
            except ValueError as error:
                raise ValueError(f"objectives {spec!r}: expected name=weight pairs separated by commas") from error
        known = set(cls.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; expected some of {sorted(known)}")
        values = {"answer": 0.0, **spec}
        return cls(**values)


def mass_inside(relevance: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Share of the relevance mass on the box (token masses weighted by their overlap)."""
    return (relevance * overlap).sum() / relevance.sum().clamp_min(1e-6)


def localisation_loss(realizations, boxes, image_sizes) -> torch.Tensor:
    """(d): mean over images with a box of BCE(relevance, overlap) - log(mass inside)."""
    terms = []
    for r in realizations:
        box = boxes[r.sample_index]
        if box is None or (torch.is_tensor(box) and bool((box < 0).any())):
            continue
        overlap = box_overlap_map(box, tuple(int(v) for v in image_sizes[r.sample_index]), r.relevance.shape).to(
            r.relevance.device
        )
        positive = overlap.sum().clamp_min(1e-3)
        pos_weight = (overlap.numel() - positive) / positive
        bce = F.binary_cross_entropy(r.relevance.clamp(1e-5, 1 - 1e-5), overlap, reduction="none")
        bce = (bce * (1 + (pos_weight - 1) * overlap)).mean()
        terms.append(bce - torch.log(mass_inside(r.relevance, overlap) + 1e-6))
    return torch.stack(terms).mean() if terms else zero_loss(realizations)


def cover_loss(realizations, boxes, image_sizes, allocator) -> torch.Tensor:
    """(f): mean over images with a box of ``sum(relevance * (resolution_chosen - resolution_oracle)) / k``, where
    the resolutions are those of the allocation the model chose and of the oracle allocation at the same budget
    (`Allocation.resolution_map`) and k the tokens the box touches.

    The allocators pick the allocation of highest utility ``sum(relevance * resolution)``; this is the structured
    hinge loss of that choice against the oracle's (Taskar et al., 2003; Tsochantaridis et al., 2005, without the
    margin): zero when the oracle's allocation is worth as much under the relevance map, and otherwise its gradient
    raises relevance where the oracle spends more resolution (the box the allocation missed) and lowers it where the
    chosen allocation spent it instead. A constant map also scores zero, so pair it with ``localise``."""
    terms = []
    for r in realizations:
        box = boxes[r.sample_index]
        if box is None or (torch.is_tensor(box) and bool((box < 0).any())):
            continue
        size, grid = tuple(int(v) for v in image_sizes[r.sample_index]), tuple(r.relevance.shape)
        touched = float((box_overlap_map(box, size, grid) > 0).sum())
        oracle = oracle_allocation(allocator, box, size, grid, r.budget)
        gap = (r.allocation.resolution_map() - oracle.resolution_map()).to(r.relevance.device)
        terms.append((r.relevance * gap).sum() / max(touched, 1.0))
    return torch.stack(terms).mean() if terms else zero_loss(realizations)


def distillation_loss(realizations, targets: list[torch.Tensor]) -> torch.Tensor:
    """(b): cross-entropy of the relevance distribution against the target distribution, per image."""
    terms = []
    for r, target in zip(realizations, targets):
        q = r.relevance.flatten() / r.relevance.sum().clamp_min(1e-6)
        p = target.flatten().to(q) / target.sum().clamp_min(1e-12)
        terms.append(-(p * torch.log(q + 1e-8)).sum() - (-(p * torch.log(p + 1e-12)).sum()))  # KL(p || q)
    return torch.stack(terms).mean() if terms else zero_loss(realizations)


def per_sample_answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: mean next-token NLL over each sample's labelled tokens."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    mask = (shift_labels != IGNORE_INDEX).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1)


def answer_survived(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: every labelled token is the argmax of the logits before it – under teacher forcing, exactly when
    greedy decoding reproduces the labelled answer (and its end-of-turn token)."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    labelled = shift_labels != IGNORE_INDEX
    return ((shift_logits.argmax(-1) == shift_labels) | ~labelled).all(dim=1) & labelled.any(dim=1)


def budget_loss(realizations, survived: torch.Tensor, slope: torch.Tensor, confidence: float,
                readable: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(c): binary cross-entropy of the budget head's survival model against ``survived`` ([B] bool, per sample)
    at each image's tokens used T. With E the head's expected tokens (where survival is ``confidence``) and s its
    slope, the predicted log-odds are ``s * (log T - log E) + logit(confidence)`` – the same curve as
    ``s * (log T - log T*)`` (`relevance.BudgetCalculator`), so the objective trains T* and s together.

    ``readable`` ([B] bool): the samples answered right with every visual token; the others are left out, so
    survival is conditional on the answer being there to keep – an answer the backbone never reads would otherwise
    teach the head that no budget suffices and push every image toward ``max_tokens``."""
    logits, targets = [], []
    for r in realizations:
        if readable is not None and not bool(readable[r.sample_index]):
            continue
        used = torch.tensor(float(r.tokens_used), device=r.expected_tokens.device)
        logits.append(slope * (used.log() - r.expected_tokens.log()) + math.log(confidence / (1 - confidence)))
        targets.append(survived[r.sample_index].float().to(used.device))
    if not logits:  # nothing readable here
        return zero_loss(realizations)
    return F.binary_cross_entropy_with_logits(torch.stack(logits), torch.stack(targets))


@torch.enable_grad()
def attribution_targets(model, inputs: dict) -> list[torch.Tensor]:
    """(b)'s targets: |grad x input| of the answer loss for every visual token of the full-token model.

    Returns one [h, w] map per image (input order). The backbone's weights get no gradient.
    """
    images = model.image_inputs(inputs.get("pixel_values"), inputs["image_grid_thw"], inputs.get("image_features"))
    c = model.compress_inputs(inputs["input_ids"], inputs.get("attention_mask"), images, inputs.get("question_mask"),
                              inputs["labels"], RealizationRequest(budget=ALL_TOKENS, encoding="single"))  # fmt: skip
    embeds = c.inputs_embeds.detach().requires_grad_(True)
    extra = [e.detach() for e in c.visual_extra]
    out = model.adapter.language_model(embeds, c.attention_mask, c.position_ids, None, False, c.visual_mask, extra)
    logits = model.adapter.lm_head(out.last_hidden_state)
    loss = per_sample_answer_nll(logits, c.labels).sum()
    (grad,) = torch.autograd.grad(loss, embeds)
    saliency = (grad * embeds).sum(-1).abs().detach()  # [B, L']
    maps = []
    for r in c.realizations:
        row = saliency[r.sample_index][c.visual_mask[r.sample_index]]
        before = sum(
            x.native_count for x in c.realizations if x.sample_index == r.sample_index and x.image_index < r.image_index
        )
        maps.append(row[before : before + r.native_count].view(r.relevance.shape))
    return maps


@contextlib.contextmanager
def vision_encoder_swapped(model, visual: torch.nn.Module):
    """Run ``model``'s backbone with another vision tower (the frozen teacher of (e)) inside the block."""
    inner = model.vlm.model
    own = inner.visual
    inner.visual = visual
    try:
        yield
    finally:
        inner.visual = own


def consistency_loss(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, teacher: torch.nn.Module,
                     generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """(e): mean over images of the squared error of the vision encoder's gist, crop and whole-image tokens
    (with any extra per-token features) against the teacher's whole-image tokens, relative to the teacher
    tokens' mean square. ``teacher``: a frozen copy of the vision tower from before training."""
    adapter, config = model.adapter, model.config
    terms, start = [], 0
    for thw in image_grid_thw:
        pixels, start = pixel_values[start : start + int(thw.prod())], start + int(thw.prod())
        scale = ImageInput(adapter, pixels, thw, 0).gist_scale(config.gist_scale, config.gist_text_px)
        _, h, w = adapter.merged_grid(thw.tolist())
        with torch.no_grad(), vision_encoder_swapped(model, teacher):
            target = adapter.encode_images(pixels, thw[None])[0]
        full = adapter.encode_images(pixels, thw[None])[0]
        boxes = random_crops(h, w, scale, generator)
        with lora_scope(model, "vision"):  # the saccade's encodings: the vision tower's scoped LoRA is on
            gist = adapter.encode_images(*adapter.patch_geometry.gist(pixels, thw, scale))[0]
            crops = adapter.encode_crops(pixels, thw, boxes)
        for k, wanted in enumerate(_per_token(target)):
            grid = wanted.view(h, w, -1)
            pairs = [(_per_token(full)[k], wanted), (_per_token(gist)[k], gist_cell_means(wanted, h, w, scale))]
            pairs += [
                (_per_token(crop)[k], grid[y0:y1, x0:x1].reshape(-1, grid.shape[-1]))
                for crop, (y0, x0, y1, x1) in zip(crops, boxes)
            ]
            norm = wanted.float().pow(2).mean().clamp_min(1e-12)
            terms += [F.mse_loss(student.float(), goal.float()) / norm for student, goal in pairs]
    return torch.stack(terms).mean()


def _per_token(features) -> tuple[torch.Tensor, ...]:
    return (features.tokens, *features.extra)


def zero_loss(realizations) -> torch.Tensor:
    """0 as a tensor in the realizations' graph (every relevance map and budget estimate, so it reaches whichever
    heads train: a step that changes nothing rather than a loss without a gradient), on their device."""
    if not realizations:
        return torch.zeros(())
    return sum(r.relevance.sum() + r.expected_tokens for r in realizations) * 0.0


def expected_budget_share(realizations) -> float:
    """Mean expected tokens / native over images (for logging; before the budget rules' clip)."""
    values = [float(r.expected_tokens.detach()) / r.native_count for r in realizations]
    return sum(values) / max(len(values), 1) if values else math.nan
