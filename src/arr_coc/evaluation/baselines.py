"""The methods users would pick instead, on the same backbone and harness (each described, with where the port to
Qwen2-VL had to choose, in docs/benchmarks.md's method table, from `evaluation.methods`).

Each keeps at most the budget T of visual tokens and reports what it really used:

- ``downsample``: the largest resize of the image whose native count fits T (the ``max_pixels`` route).
- ``uniform-pool``: the same pooling everywhere – the smallest block factor f with ceil(h/f) x ceil(w/f) <= T.
- ``random``: a seeded random subset of T tokens, each at its own M-RoPE position.
- ``query-agnostic``: VisionZip – "dominant" tokens by attention received in a late vision block (Qwen-VL
  has no CLS token: mean over queries and heads, summed over each token's 2 x 2 patches) plus
  "contextual" tokens that merge the rest by key similarity (54 + 10 of 64, the published split).
- ``text-attention``: FastV – all tokens up to language-model layer K, then only the T image tokens the
  last prompt token attends to most (mean over heads); decoded without a KV cache (prefill pruning
  recomputed per step), the K layers before see every token.

``random`` and ``query-agnostic`` act after the encoder: they are realize steps (`relevance.realizing`'s
protocol) that the harness hands to the model's `compress_inputs`, like arr-coc's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from ..padding import left_pad
from ..relevance import Allocation, Realize
from .readouts import text_attention_from_last


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


def _positions(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    rows, cols = rows.float(), cols.float()
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1)


def _select(features, keep: torch.Tensor) -> tuple[list[torch.Tensor], TokenSelection]:
    """Kept tokens in raster order, at their own positions."""
    _, h, w = features.grid
    keep = torch.sort(keep.cpu()).values
    kept = torch.zeros(h * w, dtype=torch.bool)
    kept[keep] = True
    pieces = [x[keep.to(x.device)] for x in [features.tokens, *features.extra]]
    return pieces, TokenSelection(kept, _positions(keep // w, keep % w), (h, w), len(keep), h * w)


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
            selection.positions = torch.cat([selection.positions, _positions(centre_r, centre_c)])
            selection.tokens_used += contextual
        return pieces, selection

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


@torch.no_grad()
def fastv_generate(model, full, keep: list[int], layer: int = 2, max_new_tokens: int = 8,
                   eos_token_id: int | None = None) -> tuple[torch.Tensor, list[TokenSelection]]:  # fmt: skip
    """Greedy decoding with FastV pruning at decoder layer ``layer``: sample b keeps ``keep[b]`` image tokens after
    that layer (chosen once, from the prompt's last token). ``full``: the batch's all-token `CompressedInputs`.
    Returns (new tokens [B, n], selections). Raises `ValueError` for a backbone whose decoder adds per-layer visual
    features (deepstack), which these hand-run layers do not add."""
    from transformers.masking_utils import create_causal_mask

    adapter = model.adapter
    if adapter.deepstack:
        raise ValueError("the text-attention (FastV) baseline runs the decoder layers by hand and does not add the "
                         "deepstack features this backbone's decoder needs (Qwen3-VL); it runs on Qwen2-VL and "
                         "Qwen2.5-VL")  # fmt: skip
    lm = adapter.decoder
    embeds, mask, positions, visual = full.inputs_embeds, full.attention_mask, full.position_ids, full.visual_mask
    batch = embeds.shape[0]
    selections: list[TokenSelection] = []
    drop = None
    new_tokens = []
    for _ in range(max_new_tokens):
        hidden = embeds
        cos_sin = lm.rotary_emb(hidden, positions)
        causal = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=None
        )
        for i, decoder_layer in enumerate(lm.layers):
            if i == layer:
                if drop is None:
                    scores = text_attention_from_last(adapter, i, hidden, positions, mask)
                    drop, selections = _fastv_drop(scores, visual, keep, full.realizations)
                hidden, mask_k, pos_k = _compact(hidden, mask, positions, ~drop)
                cos_sin = lm.rotary_emb(hidden, pos_k)
                causal = create_causal_mask(
                    config=lm.config, inputs_embeds=hidden, attention_mask=mask_k, cache=None, position_ids=None
                )
            hidden = decoder_layer(hidden, attention_mask=causal, position_embeddings=cos_sin, position_ids=None)
        logits = adapter.lm_head(lm.norm(hidden[:, -1:]))
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None and new_tokens:  # a finished sample keeps emitting its end token
            finished = (torch.stack(new_tokens, 1) == eos_token_id).any(1)
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        new_tokens.append(token)
        if eos_token_id is not None and bool((torch.stack(new_tokens, 1) == eos_token_id).any(1).all()):
            break
        embeds = torch.cat([embeds, adapter.embed_tokens(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        visual = torch.cat([visual, visual.new_zeros(batch, 1)], dim=1)
        drop = torch.cat([drop, drop.new_zeros(batch, 1)], dim=1)
    return torch.stack(new_tokens, 1), selections


def _fastv_drop(scores, visual, keep, realizations):
    """Per sample: drop every image token but the ``keep[b]`` most attended (ties by index)."""
    drop = torch.zeros_like(visual)
    selections = []
    for b in range(visual.shape[0]):
        idx = visual[b].nonzero().flatten()
        t = min(int(keep[b]), len(idx))
        order = torch.sort(scores[b, idx].cpu(), descending=True, stable=True).indices
        kept_local = torch.zeros(len(idx), dtype=torch.bool)
        kept_local[order[:t]] = True
        drop[b, idx[~kept_local.to(idx.device)]] = True
        start = 0
        for r in (r for r in realizations if r.sample_index == b):  # full-token realizations: raster order
            part = kept_local[start : start + r.native_count]
            h, w = r.relevance.shape
            kept_idx = part.nonzero().flatten()
            selections.append(TokenSelection(part.clone(), _positions(kept_idx // w, kept_idx % w), (h, w),
                                             int(part.sum()), r.native_count, b, r.image_index))  # fmt: skip
            start += r.native_count
    return drop, selections


def _compact(hidden, mask, positions, keep_mask):
    """Keep the unmasked positions of each row, left-padded to the longest (`padding.left_pad`)."""
    kept = [keep_mask[b].nonzero().flatten() for b in range(hidden.shape[0])]
    return (
        left_pad([hidden[b, idx] for b, idx in enumerate(kept)]),
        left_pad([mask[b, idx] for b, idx in enumerate(kept)]),
        left_pad([positions[:, b, idx].T for b, idx in enumerate(kept)]).permute(2, 0, 1),
    )
