"""The compressed sequence the language model reads: each sample's image placeholders found (`image_spans`), its
text and realized image tokens spliced at their positions (`splice`), the rows left-padded into one batch (`pad`) –
the named steps of `ArrCocForConditionalGeneration.compress_inputs`, as transformers' model files name theirs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .backbones.base import ImageInput
from .padding import left_pad
from .relevance import Realization, Realize, RelevanceRealization

IGNORE_INDEX = -100


@dataclass
class CompressedInputs:
    """The language model's inputs after the relevance realization (left-padded)."""

    inputs_embeds: torch.Tensor  # [B, L', d]
    attention_mask: torch.Tensor  # [B, L']
    position_ids: torch.Tensor  # [3, B, L'] float (pooled tokens sit at fractional centres)
    labels: torch.Tensor | None  # [B, L']
    visual_mask: torch.Tensor  # [B, L'] bool
    visual_extra: list[torch.Tensor]  # per extra feature: [n_visual, d] in sequence order
    input_ids: torch.Tensor  # [B, L'] the caller's text ids, the image placeholder id on visual tokens, pad on padding
    realizations: list[Realization] = field(default_factory=list)
    tokens_used: torch.Tensor | None = None  # [B]
    native_tokens: torch.Tensor | None = None  # [B]
    pooled: torch.Tensor | None = (
        None  # [B] bool: the sequence holds a pooled visual token (`RelevanceRealization.pooled`)
    )

    def generate_inputs(self, copies: int = 1) -> dict:
        """Keyword arguments for ``generate`` on this sequence (no ``pixel_values``): its ``input_ids`` – what
        generation options that read the prompt see (repetition penalties, n-gram bans, prompt lookup) – with the
        prefill's embeddings standing in for them (``prefill_embeds``), its mask and positions, and the per-token
        extra features repeated ``copies`` times per sample, as ``generate`` repeats every sample per beam or returned
        sequence. ``generate`` then returns ``input_ids`` followed by the new tokens."""
        inputs = {"input_ids": self.input_ids, "prefill_embeds": self.inputs_embeds,
                  "attention_mask": self.attention_mask, "position_ids": self.position_ids}  # fmt: skip
        if self.visual_extra:
            per_sample = self.visual_mask.sum(dim=1).tolist()
            inputs["visual_pos_masks"] = self.visual_mask
            inputs["deepstack_visual_embeds"] = [
                torch.cat([part for part in x.split(per_sample) for _ in range(copies)]) for x in self.visual_extra
            ]
        inputs["pooled"] = self.pooled  # the language model's scoped LoRA: the rows it is on for (`scoped_lora`)
        return inputs


@dataclass
class Row:
    """One sample's spliced sequence before padding (n tokens)."""

    embeds: torch.Tensor  # [n, d]
    ids: torch.Tensor  # [n] text ids; the image placeholder id on visual tokens
    positions: torch.Tensor  # [n, 3]
    labels: torch.Tensor | None  # [n]
    visual: torch.Tensor  # [n] bool
    extras: list[list[torch.Tensor]]  # per image: its extra features [T', d] each


def pad_id(input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_pad) -> int:
    """The id that pads the caller's rows (its tokenizer's), else ``generation_pad`` (the generation config's
    ``pad_token_id``: an int, a list or None), else 0."""
    padding = input_ids[attention_mask == 0]
    if padding.numel():
        return int(padding[0])
    pad = generation_pad
    return int(pad[0] if isinstance(pad, (list, tuple)) else pad) if pad is not None else 0


def image_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[ImageInput],
                image_token: int) -> list[tuple[torch.Tensor, list[tuple[int, int, int]]]]:  # fmt: skip
    """Per sample (valid [L] bool: its tokens, spans): runs of placeholders among its valid tokens, cut by each
    image's native count and matched to the images in order – per image (start, stop, its index k)."""
    layouts, k = [], 0
    for b in range(input_ids.shape[0]):
        valid = attention_mask[b].bool()
        is_image = (input_ids[b][valid] == image_token).tolist()
        spans, i = [], 0
        while i < len(is_image):
            if not is_image[i]:
                i += 1
                continue
            if k >= len(images):
                raise ValueError("input_ids hold more image placeholder tokens than image_grid_thw has images")
            n = math.prod(images[k].grid)
            if is_image[i : i + n] != [True] * n:
                raise ValueError(
                    f"sample {b}: image {k} needs {n} placeholder tokens in a row (its grid {images[k].grid}); "
                    "process the text with the model's processor"
                )
            spans.append((i, i + n, k))
            k, i = k + 1, i + n
        layouts.append((valid, spans))
    if k != len(images):
        raise ValueError(f"image_grid_thw has {len(images)} images but input_ids hold placeholders for {k}")
    return layouts


def splice(sample: int, spans: list[tuple[int, int, int]], embeds: torch.Tensor, ids: torch.Tensor,
           question_mask: torch.Tensor | None, labels: torch.Tensor | None, images: list[ImageInput], asks,
           realize: Realize, adapter) -> tuple[Row, list[Realization]]:  # fmt: skip
    """One sample's sequence: its text runs at consecutive positions with each image's realized tokens in
    between, at the image's first position plus their own; text after an image resumes past it (the
    backbone's rule). ``embeds`` [n, d], ``ids`` / ``question_mask`` / ``labels`` [n]: the sample's tokens;
    ``adapter``: the backbone's (`BackboneAdapter`: its image token id and position span)."""
    question = embeds[question_positions(ids, question_mask, spans)]
    pieces, kept_ids, positions, kept_labels, visual, extras, found = [], [], [], [], [], [], []
    pos, cursor, device = 0.0, 0, embeds.device
    for image_index, (start, stop, k) in enumerate([*spans, (len(ids), len(ids), None)]):
        n = start - cursor  # the text before this image (the last span: the text after every image)
        pieces.append(embeds[cursor:start])
        kept_ids.append(ids[cursor:start])
        positions.append(pos + torch.arange(n, dtype=torch.float32, device=device)[:, None].expand(n, 3))
        visual.append(torch.zeros(n, dtype=torch.bool, device=device))
        kept_labels.append(labels[cursor:start] if labels is not None else None)
        pos, cursor = pos + n, stop
        if k is None:
            break
        tokens, realization = realize(images[k], question, next(asks))
        realization.sample_index, realization.image_index = sample, image_index
        found.append(realization)
        t = tokens[0].shape[0]
        pieces.append(tokens[0].to(embeds.dtype))
        kept_ids.append(ids.new_full((t,), adapter.image_token_id))
        positions.append(pos + realization.positions.to(device))
        visual.append(torch.ones(t, dtype=torch.bool, device=device))
        kept_labels.append(labels.new_full((t,), IGNORE_INDEX) if labels is not None else None)
        extras.append(tokens[1:])
        pos += adapter.image_position_span(images[k].grid)
    row_labels = torch.cat(kept_labels) if labels is not None else None
    row = Row(torch.cat(pieces), torch.cat(kept_ids), torch.cat(positions), row_labels, torch.cat(visual), extras)
    return row, found


def pad(rows: list[Row], realizations: list[Realization], mask_dtype: torch.dtype,
        pad_id: int) -> CompressedInputs:  # fmt: skip
    """Left-pad the rows to the longest (`padding.left_pad`; ids with ``pad_id``) and count each sample's visual
    tokens."""
    embeds = left_pad([r.embeds for r in rows])
    mask = left_pad([torch.ones(len(r.embeds), dtype=mask_dtype, device=embeds.device) for r in rows])
    positions = left_pad([r.positions for r in rows]).permute(2, 0, 1).contiguous()
    labels = left_pad([r.labels for r in rows], IGNORE_INDEX) if rows[0].labels is not None else None
    extras = [e for r in rows for e in r.extras]
    visual_extra = [torch.cat([e[j] for e in extras]) for j in range(len(extras[0]) if extras else 0)]
    per_sample = [[r for r in realizations if r.sample_index == b] for b in range(len(rows))]
    tokens_used = torch.tensor([sum(r.tokens_used for r in rs) for rs in per_sample])
    native = torch.tensor([sum(r.native_count for r in rs) for rs in per_sample])
    pooled = torch.tensor([any(isinstance(r, RelevanceRealization) and r.pooled for r in rs) for rs in per_sample])
    return CompressedInputs(embeds, mask, positions, labels, left_pad([r.visual for r in rows], False),
                            visual_extra, left_pad([r.ids for r in rows], pad_id), realizations, tokens_used,
                            native, pooled)  # fmt: skip


def question_positions(ids: torch.Tensor, question_mask: torch.Tensor | None, spans) -> torch.Tensor:
    """Where the question's tokens are: the processor's question_mask, else the text after the last image."""
    if question_mask is not None:
        return question_mask.bool()
    after = torch.zeros_like(ids, dtype=torch.bool)
    after[(spans[-1][1] if spans else 0) :] = True
    return after
