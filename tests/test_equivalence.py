"""arr-coc against the stock backbone: exact at full budget, and an independent pooling computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arr_coc import Allocation
from conftest import FAMILIES

STOCK_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def stock_inputs(inputs):
    return {k: inputs[k] for k in STOCK_KEYS}


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_at_or_above_native_equals_stock_backbone(family, make_model, make_processor, samples):
    model, processor = make_model(family), make_processor(family)
    inputs = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    with torch.no_grad():
        stock = model.vlm(**stock_inputs(inputs)).logits
        ours = model(**inputs, budget=10**6)
    assert ours.logits.shape == stock.shape
    assert (ours.logits - stock).abs().max().item() <= 1e-4
    assert torch.equal(ours.tokens_used, ours.native_tokens)
    assert all(r.budget_clipped and r.budget == r.native_count for r in ours.realizations)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_2x2_allocation_equals_stock_lm_on_avg_pooled_tokens(family, make_model, make_processor, samples):
    """The realizer's output, checked against avg_pool2d of the encoder tokens fed to the stock LM by hand."""
    model, processor = make_model(family), make_processor(family)
    sample = samples[0]
    patch = 32 if family == "qwen3_vl" else 28
    image = sample["image"].resize((patch * 10, patch * 8))  # an even 8 x 10 merged grid
    inputs = processor(images=[image], text=[sample["question"]])
    t, gh, gw = inputs["image_grid_thw"][0].tolist()
    h, w = gh // 2, gw // 2
    vlm = model.vlm
    with torch.no_grad():
        ours = model(**inputs, allocation=Allocation.uniform(h, w, 2), pooling="mean")

        # Independent computation: pool the stock encoder's tokens, place them at block centres.
        enc = vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        maps = [enc.pooler_output[0]] + [f[0] for f in getattr(enc, "deepstack_features", None) or []]
        pooled = [F.avg_pool2d(m.T.reshape(1, -1, h, w), 2).reshape(m.shape[1], -1).T for m in maps]
        ids = inputs["input_ids"][0]
        image_at = (ids == vlm.config.image_token_id).nonzero().flatten()
        start, stop = int(image_at[0]), int(image_at[-1]) + 1
        text = vlm.get_input_embeddings()(ids)
        embeds = torch.cat([text[:start], pooled[0], text[stop:]])[None]
        ys, xs = torch.meshgrid(torch.arange(h // 2) * 2 + 0.5, torch.arange(w // 2) * 2 + 0.5, indexing="ij")
        image_pos = torch.stack([torch.zeros(ys.numel()), ys.flatten(), xs.flatten()]) + start
        before = torch.arange(start, dtype=torch.float32).expand(3, -1)
        after = torch.arange(len(ids) - stop, dtype=torch.float32).expand(3, -1) + start + max(h, w)
        positions = torch.cat([before, image_pos, after], dim=1)[:, None]
        extra = {}
        if len(pooled) > 1:
            visual = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
            visual[0, start : start + pooled[0].shape[0]] = True
            extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": pooled[1:]}
        hidden = vlm.model.language_model(inputs_embeds=embeds, position_ids=positions, **extra).last_hidden_state
        expected = vlm.lm_head(hidden)
    assert ours.tokens_used.tolist() == [h * w // 4]
    assert ours.logits.shape == expected.shape
    assert (ours.logits - expected).abs().max().item() <= 1e-4
