"""Pruning inside the language model: FastV (``text-attention``) and DART share one loop; the rule is passed in.

Every token runs through decoder layers 0..K-1; before layer K a rule picks each sample's kept image tokens and the
others leave the sequence – hidden states, attention mask and M-RoPE positions take the same columns, so the kept
tokens and the text after the image keep the positions the full image gave them – and layers K.. run on the rest.
The decoder layers are run by hand with the backbone's own attention implementation (SDPA, FlashAttention; no eager
switch: the rules read projections, never attention weights).

Decoding runs on a KV cache whose layers < K hold every token and layers >= K only the kept ones, each layer's mask
sized against its own cache (`create_causal_mask(..., layer_idx=)`): what recomputing the pruned prefill at every
step gives (FastV's and DART's reference loops), without the recomputation. Qwen3-VL's deepstack features are added
after the layers the stock decoder adds them at, to the visual tokens still in the sequence (every one before layer
K, the kept ones from layer K on).

Layers 0..K-1 do not depend on the budget: `run_prefix` runs them once per batch (`LayerPrefix`) and every budget
and rule continues from it (`pruned_generate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..padding import left_pad
from .baselines import TokenSelection, grid_positions
from .pruners import dart_select
from .readouts import layer_keys, text_attention_from_last


@dataclass
class LayerPrefix:
    """A batch's all-token sequence (left-padded) after decoder layers 0..K-1, and what the rules read there."""

    layer: int  # K: the first layer that sees only the kept tokens
    before: torch.Tensor  # [B, L, d] the input of layer K-1
    hidden: torch.Tensor  # [B, L, d] the input of layer K (deepstack added where the stock decoder adds it)
    positions: torch.Tensor  # [3, B, L]
    mask: torch.Tensor  # [B, L]
    visual: torch.Tensor  # [B, L] bool
    visual_extra: list[torch.Tensor]  # per deepstack level: [n_visual, d] in sequence order (Qwen3-VL)
    keys: list[tuple[torch.Tensor, torch.Tensor]]  # layers 0..K-1: the cached (keys, values) [B, kv heads, L, d_h]
    realizations: list  # the all-token realizations: each image's grid, in raster order


# (adapter, prefix, keep per sample) -> per sample the kept indices among its visual tokens, ascending
Rule = Callable[[object, LayerPrefix, list[int]], list[torch.Tensor]]


@dataclass
class PrunedAnswers:
    """Greedy answers of a pruned decoder: new tokens [B, n]; per image what it kept; the prompt's positions
    [3, B, L'] and visual mask [B, L'] as layers K.. saw them."""

    tokens: torch.Tensor
    selections: list[TokenSelection]
    positions: torch.Tensor
    visual_mask: torch.Tensor


def _add_deepstack(hidden: torch.Tensor, visual: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's `_deepstack_process`: ``extra`` [n_visual, d] added at the ``visual`` [B, L] positions."""
    hidden = hidden.clone()
    hidden[visual] = hidden[visual] + extra.to(hidden.device, hidden.dtype)
    return hidden


def _causal_mask(decoder, hidden: torch.Tensor, mask: torch.Tensor, cache, layer: int):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask, cache=cache,
                              position_ids=None, layer_idx=layer)  # fmt: skip


@torch.no_grad()
def run_prefix(model, full, layer: int) -> LayerPrefix:
    """Decoder layers 0..``layer``-1 on the batch's all-token `CompressedInputs` ``full`` (deepstack included).
    Raises `ValueError` for a layer outside [1, layers - 1]."""
    from transformers import DynamicCache

    decoder = model.adapter.decoder
    if not 0 < layer < len(decoder.layers):
        raise ValueError(f"the pruning layer K={layer} must lie in [1, {len(decoder.layers) - 1}] for a "
                         f"{len(decoder.layers)}-layer language model")  # fmt: skip
    hidden, mask, positions, visual = full.inputs_embeds, full.attention_mask, full.position_ids, full.visual_mask
    cache = DynamicCache(config=decoder.config)
    causal = _causal_mask(decoder, hidden, mask, cache, 0)
    cos_sin = decoder.rotary_emb(hidden, positions)
    for i in range(layer):
        before = hidden
        hidden = decoder.layers[i](hidden, attention_mask=causal, position_ids=None, cache=cache, use_cache=True,
                                   position_embeddings=cos_sin)  # fmt: skip
        if i < len(full.visual_extra):
            hidden = _add_deepstack(hidden, visual, full.visual_extra[i])
    keys = [(cache.layers[i].keys, cache.layers[i].values) for i in range(layer)]
    return LayerPrefix(layer, before, hidden, positions, mask, visual, full.visual_extra, keys, full.realizations)


def fastv_rule(adapter, prefix: LayerPrefix, keep: list[int]) -> list[torch.Tensor]:
    """FastV (Chen et al., ECCV 2024): per sample the ``keep[b]`` image tokens the last prompt token attends to most at
    layer K (mean over heads; ties to the lower index)."""
    scores = text_attention_from_last(adapter, prefix.layer, prefix.hidden, prefix.positions, prefix.mask)
    kept = []
    for b in range(prefix.visual.shape[0]):
        idx = prefix.visual[b].nonzero().flatten()
        order = torch.sort(scores[b, idx].cpu(), descending=True, stable=True).indices
        kept.append(torch.sort(order[: min(int(keep[b]), len(idx))]).values)
    return kept


def dart_rule(adapter, prefix: LayerPrefix, keep: list[int]) -> list[torch.Tensor]:
    """DART (Wen et al., EMNLP 2025) at layer K, per image (`pruners.dart_select`): layer K-1's output through the
    final norm, its post-RoPE keys (KV heads side by side; GQA repetition does not change an L1 ranking), and as text
    the prompt from the image's end on. Raises `ValueError` for a sample with more than one image (one budget per
    sample)."""
    keys = layer_keys(adapter, prefix.layer - 1, prefix.before, prefix.positions)
    hidden = adapter.decoder.norm(prefix.hidden)
    kept = []
    for b in range(prefix.visual.shape[0]):
        if sum(r.sample_index == b for r in prefix.realizations) > 1:
            raise ValueError("DART selects per image with one budget per sample; pass one image per sample")
        idx = prefix.visual[b].nonzero().flatten()
        after = torch.arange(int(idx[-1]) + 1, prefix.visual.shape[1], device=idx.device)  # from <|vision_end|>
        kept.append(dart_select(hidden[b, idx], keys[b, idx], int(keep[b]), hidden[b, after], keys[b, after]).cpu())
    return kept


def _selections(prefix: LayerPrefix, kept: list[torch.Tensor]) -> tuple[torch.Tensor, list[TokenSelection]]:
    """The columns that go on (valid text and kept image tokens) [B, L], and per image its `TokenSelection`."""
    go_on = prefix.mask.bool() & ~prefix.visual
    selections = []
    for b, local in enumerate(kept):
        idx = prefix.visual[b].nonzero().flatten()
        go_on[b, idx[local.to(idx.device)]] = True
        chosen = torch.zeros(len(idx), dtype=torch.bool)
        chosen[local] = True
        start = 0
        for r in (r for r in prefix.realizations if r.sample_index == b):  # full-token realizations: raster order
            part = chosen[start : start + r.native_count]
            h, w = r.relevance.shape
            at = part.nonzero().flatten()
            selections.append(TokenSelection(part.clone(), grid_positions(at // w, at % w), (h, w), int(part.sum()),
                                             r.native_count, b, r.image_index))  # fmt: skip
            start += r.native_count
    return go_on, selections


def _compact(x: torch.Tensor, go_on: torch.Tensor, fill=0) -> torch.Tensor:
    """[B, L, ...] -> each row's ``go_on`` columns, left-padded to the longest (`padding.left_pad`)."""
    return left_pad([x[b, go_on[b]] for b in range(x.shape[0])], fill)


@torch.no_grad()
def pruned_generate(model, prefix: LayerPrefix, keep: list[int], rule: Rule, max_new_tokens: int = 8,
                    eos_token_id: int | None = None) -> PrunedAnswers:  # fmt: skip
    """Greedy decoding from ``prefix`` with sample b keeping ``keep[b]`` image tokens (chosen once, by ``rule``) from
    layer K on; a finished sample keeps emitting its end token. Returns `PrunedAnswers`."""
    from transformers import DynamicCache

    adapter = model.adapter
    decoder = adapter.decoder
    k = prefix.layer
    go_on, selections = _selections(prefix, rule(adapter, prefix, keep))
    cache = DynamicCache(config=decoder.config)
    for i, (keys, values) in enumerate(prefix.keys):  # the shared prefix's cache, never written to
        cache.update(keys, values, i)
    hidden = _compact(prefix.hidden, go_on)  # the prefill goes on from layer K with the kept columns
    kept_mask = _compact(prefix.mask, go_on)
    kept_positions = _compact(prefix.positions.permute(1, 2, 0), go_on).permute(2, 0, 1)
    kept_visual = _compact(prefix.visual, go_on, False)
    extra_rows = go_on[prefix.visual]  # which visual tokens, in sequence order, go on
    full_mask, positions, first_layer = prefix.mask, kept_positions, k
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if step:  # one new token through every layer: layers < K over every token so far, layers >= K the kept
            hidden, positions, first_layer = adapter.embed_tokens(new_tokens[-1][:, None]), positions[..., -1:] + 1, 0
            full_mask = torch.cat([full_mask, full_mask.new_ones(len(hidden), 1)], dim=1)
            kept_mask = torch.cat([kept_mask, kept_mask.new_ones(len(hidden), 1)], dim=1)
        masks = (_causal_mask(decoder, hidden, full_mask, cache, 0), _causal_mask(decoder, hidden, kept_mask, cache, k))
        cos_sin = decoder.rotary_emb(hidden, positions)
        for i in range(first_layer, len(decoder.layers)):
            hidden = decoder.layers[i](hidden, attention_mask=masks[i >= k], position_ids=None, cache=cache,
                                       use_cache=True, position_embeddings=cos_sin)  # fmt: skip
            if step == 0 and k <= i < len(prefix.visual_extra):
                hidden = _add_deepstack(hidden, kept_visual, prefix.visual_extra[i][extra_rows])
        token = adapter.lm_head(decoder.norm(hidden[:, -1:]))[:, -1].argmax(-1)
        if eos_token_id is not None and new_tokens:
            finished = (torch.stack(new_tokens, 1) == eos_token_id).any(1)
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        new_tokens.append(token)
        if eos_token_id is not None and bool((torch.stack(new_tokens, 1) == eos_token_id).any(1).all()):
            break
    return PrunedAnswers(torch.stack(new_tokens, 1), selections, kept_positions, kept_visual)
